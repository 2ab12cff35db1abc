"""Open Inference Protocol (KServe v2) over gRPC: the official client and our own stubs.

The official ``tritonclient[grpc]`` runs in a subprocess (``triton_client_probe.py``)
because it registers the same ``inference.*`` protobuf names as ``protos.inference``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from protos.inference import grpc_service_pb2 as v2
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores, write_linear_model
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTH = len(TEST_FEATURES)
MAX_BATCH = 16
SERVER_OPTIONS = [f"models.defaults.max_batch_size={MAX_BATCH}"]

Rows = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Repo:
    """A repository with ``lin`` versions 1 and 2 and each version's weights."""

    path: Path
    params: dict[str, tuple[npt.NDArray[np.float32], float]]

    def p1(self, version: str, rows: Rows) -> npt.NDArray[np.float64]:
        weights, bias = self.params[version]
        return linear_scores(rows, weights, bias)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    path = tmp_path / "models"
    params: dict[str, tuple[npt.NDArray[np.float32], float]] = {}
    for version in ("1", "2"):
        _, weights, bias = write_linear_model(
            path, "lin", version, TEST_FEATURES, seed=int(version)
        )
        params[version] = (weights, bias)
    return Repo(path, params)


def _rows(count: int, seed: int = 3) -> Rows:
    return np.random.default_rng(seed).normal(size=(count, WIDTH)).astype(np.float32)


def _request(
    rows: Rows,
    *,
    raw: bool,
    version: str = "",
    request_id: str = "req-1",
    outputs: tuple[str, ...] = (),
) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="lin", model_version=version, id=request_id)
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _check_scores(probabilities: Rows, labels: npt.NDArray[Any], p1: npt.NDArray[Any]) -> None:
    np.testing.assert_allclose(probabilities[:, 1], p1, atol=1e-6)
    np.testing.assert_allclose(probabilities[:, 0], 1.0 - p1, atol=1e-6)
    np.testing.assert_array_equal(labels, (p1 > 0.5).astype(np.int64))


# --------------------------------------------------------------------------- tritonclient


async def _run_probe(target: str, rows: Rows, request_id: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.triton_client_probe",
        "--url",
        target,
        "--model",
        "lin",
        "--rows-json",
        json.dumps(rows.tolist()),
        "--request-id",
        request_id,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def test_official_triton_client(repo: Repo) -> None:
    rows = _rows(5)
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        result = await _run_probe(srv.target, rows, "triton-7")

    assert result["live"] is True
    assert result["ready"] is True
    assert result["model_ready"] is True
    assert result["model_ready_unknown"] is False
    assert result["model_ready_unknown_version"] is False
    assert result["server_metadata"]["name"] == "streamscore"
    assert result["server_metadata"]["version"]
    assert "model_configuration" in result["server_metadata"]["extensions"]

    meta = result["model_metadata"]
    assert meta["name"] == "lin"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, WIDTH]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]

    config = result["model_config"]
    assert config["name"] == "lin"
    assert config["max_batch_size"] == MAX_BATCH
    assert config["inputs"] == [
        {"name": "features", "data_type": "TYPE_FP32", "dims": [WIDTH], "reshape": None}
    ]
    assert config["outputs"] == [  # [batch] label: Triton's dims [1] + empty reshape
        {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": []},
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2], "reshape": None},
    ]

    infer = result["infer"]
    assert infer["id"] == "triton-7"
    assert (infer["model_name"], infer["model_version"]) == ("lin", "2")
    assert infer["raw_output_count"] == 2  # raw in, raw out
    outputs = infer["outputs"]
    assert outputs["probabilities"]["shape"] == [5, 2]
    assert outputs["label"] == {
        "datatype": "INT64",
        "shape": [5],
        "values": (repo.p1("2", rows) > 0.5).astype(int).tolist(),
    }
    _check_scores(
        np.asarray(outputs["probabilities"]["values"], dtype=np.float32),
        np.asarray(outputs["label"]["values"]),
        repo.p1("2", rows),
    )

    subset = result["infer_subset"]
    assert subset["id"] == "triton-7-subset"
    assert list(subset["outputs"]) == ["probabilities"]
    np.testing.assert_allclose(
        np.asarray(subset["outputs"]["probabilities"]["values"])[:, 1],
        repo.p1("2", rows),
        atol=1e-6,
    )

    refused = result["refused"]
    assert refused["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in refused["unknown_model"]["message"]
    assert refused["metadata_unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert refused["bad_width"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].shape" in refused["bad_width"]["message"]


# --------------------------------------------------------------------------- our stubs


async def test_typed_contents_in_typed_contents_out(repo: Repo) -> None:
    rows = _rows(6)
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        response = await srv.inference.ModelInfer(_request(rows, raw=False, request_id="t-1"))
    assert (response.model_name, response.model_version, response.id) == ("lin", "2", "t-1")
    assert len(response.raw_output_contents) == 0
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name) == ["label", "probabilities"]
    label, probs = by_name["label"], by_name["probabilities"]
    assert (label.datatype, list(label.shape)) == ("INT64", [6])
    assert (probs.datatype, list(probs.shape)) == ("FP32", [6, 2])
    _check_scores(
        np.asarray(probs.contents.fp32_contents, dtype=np.float32).reshape(6, 2),
        np.asarray(label.contents.int64_contents),
        repo.p1("2", rows),
    )


async def test_raw_in_raw_out_and_pinned_version(repo: Repo) -> None:
    rows = _rows(3, seed=9)
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        response = await srv.inference.ModelInfer(
            _request(rows, raw=True, version="1", request_id="r-1")
        )
    assert (response.model_version, response.id) == ("1", "r-1")
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    assert len(response.raw_output_contents) == 2
    for output in response.outputs:
        assert not output.contents.ListFields(), f"{output.name} carries typed contents too"
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    probs = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(3, 2)
    _check_scores(probs, labels, repo.p1("1", rows))


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
async def test_requested_outputs_subset(repo: Repo, raw: bool) -> None:
    rows = _rows(4)
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        response = await srv.inference.ModelInfer(_request(rows, raw=raw, outputs=("label",)))
    assert [o.name for o in response.outputs] == ["label"]
    expected = (repo.p1("2", rows) > 0.5).astype(np.int64)
    if raw:
        assert len(response.raw_output_contents) == 1
        labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    else:
        labels = np.asarray(response.outputs[0].contents.int64_contents)
    np.testing.assert_array_equal(labels, expected)


def _set_datatype(r: v2.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP64"


def _set_shape(shape: list[int]) -> Callable[[v2.ModelInferRequest], None]:
    def mutate(r: v2.ModelInferRequest) -> None:
        del r.inputs[0].shape[:]
        r.inputs[0].shape.extend(shape)

    return mutate


def _truncate_raw(r: v2.ModelInferRequest) -> None:
    r.raw_input_contents[0] = r.raw_input_contents[0][:-4]


def _add_contents_to_raw(r: v2.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend([0.0] * 2 * WIDTH)


def _drop_typed_value(r: v2.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.pop()


def _rename_input(r: v2.ModelInferRequest) -> None:
    r.inputs[0].name = "feats"


def _unknown_output(r: v2.ModelInferRequest) -> None:
    r.outputs.add(name="score")


def _nan_row(r: v2.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents[1 * WIDTH + 3] = math.nan


def _second_input(r: v2.ModelInferRequest) -> None:
    r.inputs.add(name="extra", datatype="FP32", shape=[2, WIDTH])


@pytest.mark.parametrize(
    ("raw", "mutate", "needles"),
    [
        (False, _set_datatype, ["inputs[0].datatype", "FP32", "FP64"]),
        (False, _set_shape([2, WIDTH - 1]), ["inputs[0].shape", f"[2, {WIDTH - 1}]"]),
        (False, _set_shape([2 * WIDTH]), ["inputs[0].shape"]),
        (False, _set_shape([1, 2, WIDTH]), ["inputs[0].shape"]),
        (True, _set_shape([0, WIDTH]), ["inputs[0].shape", "[0, 8]"]),
        (True, _truncate_raw, ["raw_input_contents[0]", f"{2 * WIDTH * 4 - 4} bytes"]),
        (True, _add_contents_to_raw, ["raw_input_contents", "contents"]),
        (False, _drop_typed_value, ["inputs[0].contents.fp32_contents"]),
        (False, _rename_input, ["inputs[0].name", "feats"]),
        (False, _second_input, ["inputs", "exactly 1"]),
        (False, _unknown_output, ["outputs[0].name", "score"]),
        (False, _nan_row, ["inputs[0]", "row 1", "'f3'"]),
    ],
    ids=[
        "datatype",
        "width",
        "rank-1",
        "rank-3",
        "zero-rows",
        "raw-byte-count",
        "raw-and-contents",
        "typed-value-count",
        "unknown-input",
        "two-inputs",
        "unknown-output",
        "nan",
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    repo: Repo, raw: bool, mutate: Callable[[v2.ModelInferRequest], None], needles: list[str]
) -> None:
    request = _request(_rows(2), raw=raw)
    mutate(request)
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.inference.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        for needle in needles:
            assert needle in details, details
        ok = await srv.inference.ModelInfer(_request(_rows(2), raw=raw))  # still serving
        assert len(ok.outputs) == 2


async def test_more_rows_than_max_batch_size(repo: Repo) -> None:
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        exact = await srv.inference.ModelInfer(_request(_rows(MAX_BATCH), raw=True))
        assert list(exact.outputs[1].shape) == [MAX_BATCH, 2]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.inference.ModelInfer(_request(_rows(MAX_BATCH + 1), raw=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert str(MAX_BATCH + 1) in details and "max_batch_size" in details, details


@pytest.mark.parametrize(
    ("model", "version", "needle"),
    [("nope", "", "'nope'"), ("lin", "7", "'7'")],
    ids=["unknown-model", "unknown-version"],
)
async def test_unknown_model_or_version_is_not_found(
    repo: Repo, model: str, version: str, needle: str
) -> None:
    request = _request(_rows(1), raw=False)
    request.model_name, request.model_version = model, version
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        calls: dict[str, Awaitable[object]] = {
            "infer": srv.inference.ModelInfer(request),
            "metadata": srv.inference.ModelMetadata(
                v2.ModelMetadataRequest(name=model, version=version)
            ),
            "config": srv.inference.ModelConfig(v2.ModelConfigRequest(name=model, version=version)),
        }
        for what, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, what
            assert needle in (caught.value.details() or ""), what
        ready = await srv.inference.ModelReady(v2.ModelReadyRequest(name=model, version=version))
        assert ready.ready is False


async def test_model_ready_and_pinned_metadata(repo: Repo) -> None:
    async with running_server(repo.path, SERVER_OPTIONS) as srv:
        for version in ("", "1", "2"):
            ready = await srv.inference.ModelReady(
                v2.ModelReadyRequest(name="lin", version=version)
            )
            assert ready.ready is True, version
        meta = await srv.inference.ModelMetadata(v2.ModelMetadataRequest(name="lin", version="1"))
        config = await srv.inference.ModelConfig(v2.ModelConfigRequest(name="lin", version="1"))
        no_name = srv.inference.ModelInfer(v2.ModelInferRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await no_name
    assert list(meta.versions) == ["1", "2"]
    assert config.config.max_batch_size == MAX_BATCH
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in (caught.value.details() or "")


async def test_model_config_reports_the_serving_queue_delay(repo: Repo) -> None:
    overrides = [*SERVER_OPTIONS, "models.per_model.lin.max_queue_delay_ms=2.5"]
    async with running_server(repo.path, overrides) as srv:
        config = await srv.inference.ModelConfig(v2.ModelConfigRequest(name="lin"))
    assert config.config.dynamic_batching.max_queue_delay_microseconds == 2500
