"""Model repository loading: refused artifacts are logged, counted and skipped.

Each case breaks ``lin/2`` in one way; ``lin/1`` must keep serving.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from server.manifest import MANIFEST_FILE, MODEL_FILE
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores, write_linear_model
from tests.support.server import RunningServer, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

FAILURES = "streamscore_model_load_failures_total"
LOADED = "streamscore_model_versions_loaded"


def _edit_manifest(version_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = version_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _flip_byte(version_dir: Path) -> None:
    path = version_dir / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rename_input(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m["input"].__setitem__("name", "inputs"))


def _drop_feature(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m.__setitem__("features", m["features"][:-1]))


def _rename_output(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m["outputs"][0].__setitem__("name", "labels"))


def _wrong_output_dtype(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m["outputs"][0].__setitem__("dtype", "int32"))


def _float64_input(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m["input"].__setitem__("dtype", "float64"))


def _remove_manifest(version_dir: Path) -> None:
    (version_dir / MANIFEST_FILE).unlink()


def _remove_model(version_dir: Path) -> None:
    (version_dir / MODEL_FILE).unlink()


def _invalid_json(version_dir: Path) -> None:
    (version_dir / MANIFEST_FILE).write_text('{"name": "lin", "version": ')


def _manifest_version(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m.__setitem__("version", "3"))


def _manifest_name(version_dir: Path) -> None:
    _edit_manifest(version_dir, lambda m: m.__setitem__("name", "other"))


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "server.registry" and r.getMessage() == "model refused"
    ]


async def _score(srv: RunningServer, version: str = "") -> pb.ScoreResponse:
    request = pb.ScoreRequest(
        model="lin", model_version=version, features={f: 0.5 for f in TEST_FEATURES}
    )
    return await srv.scoring.Score(request, timeout=5)


def _failures(srv: RunningServer) -> float | None:
    return srv.app.metrics.registry.get_sample_value(FAILURES)


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        (_flip_byte, "sha256 mismatch"),
        (_rename_input, "manifest says 'inputs'"),
        (_drop_feature, "7 features"),
        (_rename_output, "'labels' not in graph outputs"),
        (_wrong_output_dtype, "manifest says int32"),
        (_float64_input, "input.dtype must be float32"),
        (_remove_manifest, "no manifest"),
        (_remove_model, f"{MODEL_FILE} is missing"),
        (_invalid_json, "invalid manifest"),
        (_manifest_version, "manifest says lin/3, directory is lin/2"),
        (_manifest_name, "manifest says other/2, directory is lin/2"),
    ],
    ids=[
        "sha256",
        "input-name",
        "feature-count",
        "output-name",
        "output-dtype",
        "input-not-float32",
        "no-manifest",
        "no-model-file",
        "invalid-json",
        "dir-version",
        "dir-name",
    ],
)
async def test_broken_version_is_refused_and_the_other_serves(
    linear_repository: Path,
    caplog: pytest.LogCaptureFixture,
    breakage: Callable[[Path], None],
    needle: str,
) -> None:
    broken = linear_repository / "lin" / "2"
    breakage(broken)
    async with running_server(linear_repository) as srv:
        assert srv.app.registry.versions("lin") == ["1"]
        assert srv.app.ready is True
        assert _failures(srv) == 1
        assert srv.app.metrics.registry.get_sample_value(LOADED) == 1
        answer = await _score(srv)
        assert answer.model_version == "1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _score(srv, version="2")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        ready = await srv.inference.ModelReady(v2.ModelReadyRequest(name="lin", version="2"))
        assert ready.ready is False
    (record,) = _refusals(caplog)
    assert record.levelno == logging.ERROR
    error = str(getattr(record, "error", ""))
    assert str(broken) in error, error
    assert needle in error, error
    assert getattr(record, "path", None) == str(broken)


async def test_configured_versions_only(linear_repository: Path) -> None:
    async with running_server(linear_repository, ["models.per_model.lin.versions=[1]"]) as srv:
        assert srv.app.registry.versions("lin") == ["1"]
        assert _failures(srv) == 0
        assert (await _score(srv)).model_version == "1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _score(srv, version="2")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_refusal_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repository = tmp_path / "models"
    good_dir, weights, bias = write_linear_model(repository, "good", "1", TEST_FEATURES, seed=5)
    for version in ("1", "2", "3"):
        write_linear_model(repository, "bad", version, TEST_FEATURES, seed=int(version))
    _flip_byte(repository / "bad" / "1")
    _remove_manifest(repository / "bad" / "2")
    shutil.copytree(good_dir, repository / "good" / "4")  # manifest still says version 1
    _invalid_json(repository / "bad" / "3")
    async with running_server(repository) as srv:
        assert _failures(srv) == 4
        assert srv.app.registry.names() == ["good"]
        assert srv.app.registry.versions("good") == ["1"]
        answer = await srv.scoring.Score(
            pb.ScoreRequest(model="good", features={f: 1.0 for f in TEST_FEATURES}), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(
                pb.ScoreRequest(model="bad", features={f: 1.0 for f in TEST_FEATURES}), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    expected = linear_scores(np.ones((1, len(TEST_FEATURES)), np.float32), weights, bias)
    assert answer.score == pytest.approx(float(expected[0]), abs=1e-6)
    paths = sorted(str(getattr(r, "path", "")) for r in _refusals(caplog))
    assert paths == sorted(
        str(repository / name / version)
        for name, version in [("bad", "1"), ("bad", "2"), ("bad", "3"), ("good", "4")]
    )
