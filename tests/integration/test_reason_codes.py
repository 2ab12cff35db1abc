"""Reason codes served over gRPC: each ``reasons.when`` mode, the catalogue from
features.yaml, FAILED_PRECONDITION without an explainer, a tampered explainer refused
at load while the other version serves, and lineage in Score / ModelMetadata /
ListModels. The demo models are trained once for the module (small snapshots)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from demo.synthetic import DEMO_FEATURES, generate_dataset
from demo.train import build_demo_repository
from feature_streams.definitions import load_definitions
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import scoring_pb2 as pb
from server.explain.explainer import load_explainer
from server.explain.service import Explained, VersionReasons, catalogue_for
from server.manifest import ModelManifest
from tests.support.admin import CREDENTIALS, admin_server
from tests.support.server import RunningServer, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FEATURES_YAML = Path(__file__).resolve().parents[2] / "features.yaml"
F32 = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    build_demo_repository(repo, n_rows=8_000, validate=False)
    return repo


@pytest.fixture(scope="module")
def rows() -> F32:
    x, _ = generate_dataset(3_000, seed=777)
    return x


def _request(row: F32, **kwargs: object) -> pb.ScoreRequest:
    features = {name: float(v) for name, v in zip(DEMO_FEATURES, row.tolist(), strict=True)}
    return pb.ScoreRequest(model="fraud", model_version="2", features=features, **kwargs)  # type: ignore[arg-type]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


async def _score(srv: RunningServer, request: pb.ScoreRequest) -> pb.ScoreResponse:
    response: pb.ScoreResponse = await srv.scoring.Score(request, timeout=20)
    return response


async def test_on_request_gives_exact_reasons_only_when_asked(
    demo_repo: Path, rows: F32, redis_url: str
) -> None:
    overrides = [
        f"features.definitions_path={FEATURES_YAML}",
        f"redis.url={redis_url}",
        "server.overrides.allow_all=true",  # every column sent: the rows explained are known
    ]
    definitions = load_definitions(FEATURES_YAML)
    manifest = ModelManifest.read(demo_repo / "fraud" / "2")
    explainer = load_explainer(demo_repo / "fraud" / "2", manifest)
    assert explainer is not None
    catalogue = catalogue_for(manifest, definitions)
    async with running_server(demo_repo, overrides) as srv:
        # request features only (store features come from Redis: empty here, defaults)
        request_features = {"amount", "mcc", "channel", "hour_of_day", "day_of_week"}
        request_features |= {"is_international", "card_present", "distance_from_home_km"}
        base = {n: float(v) for n, v in zip(DEMO_FEATURES, rows[0].tolist(), strict=True)}
        features = {n: v for n, v in base.items() if n in request_features}
        features["amount"] = 2_500.0
        plain = await _score(
            srv, pb.ScoreRequest(model="fraud", model_version="2", features=features)
        )
        assert not plain.reasons
        assert plain.artifact_sha256 == manifest.sha256
        assert plain.threshold == pytest.approx(manifest.threshold)
        assert plain.decision == (plain.score >= manifest.threshold)
        asked = await _score(
            srv,
            pb.ScoreRequest(
                model="fraud",
                model_version="2",
                features=features,
                explain=True,
                echo_features=True,
            ),
        )
    assert 1 <= len(asked.reasons) <= 4
    texts = {r.code: r.text for r in definitions.reasons.values()}
    contributions = [r.contribution for r in asked.reasons]
    assert contributions == sorted(contributions, reverse=True) and contributions[-1] > 0
    for reason in asked.reasons:
        assert reason.text == texts[reason.code]
        assert {f.name for f in reason.features} == set(definitions.reasons[reason.code].features)
        assert reason.contribution == pytest.approx(sum(f.contribution for f in reason.features))
    # the served reasons are the explainer's on the very row the model saw
    row = np.array([[f.value for f in asked.features]], dtype=np.float32)
    explanation = explainer.explain(row)
    assert asked.reasons_base_value == pytest.approx(explanation.base_value)
    assert float(explanation.margin[0]) == pytest.approx(_logit(asked.score), abs=1e-4)
    (expected,) = catalogue.top(explanation.values, row, 4)
    assert [r.code for r in asked.reasons] == [r.code for r in expected]


async def test_always_and_above_threshold_modes(demo_repo: Path, rows: F32) -> None:
    manifest = ModelManifest.read(demo_repo / "fraud" / "2")
    async with running_server(demo_repo, ["models.defaults.reasons.when=always"]) as srv:
        for row in rows[:5]:
            answer = await _score(srv, _request(row))
            assert answer.reasons_base_value != 0.0  # computed for every answer
            assert len(answer.reasons) <= 4
    async with running_server(
        demo_repo,
        [
            "models.per_model.fraud.reasons.when=above_threshold",
            "models.per_model.fraud.reasons.top_n=2",
        ],
    ) as srv:
        flagged = unflagged = 0
        calm = rows[0]
        for row in rows[:400]:
            answer = await _score(srv, _request(row))
            assert answer.decision == (answer.score >= manifest.threshold)
            if answer.decision:
                flagged += 1
                assert 1 <= len(answer.reasons) <= 2 and answer.reasons_base_value != 0.0
            else:
                unflagged += 1
                calm = row
                assert not answer.reasons and answer.reasons_base_value == 0.0
        assert flagged and unflagged
        # an explicit ask is honoured in every mode
        asked = await _score(srv, _request(calm, explain=True))
        assert asked.reasons_base_value != 0.0


def _infer(rows: F32, version: str = "2", **parameters: v2.InferParameter) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="fraud", model_version=version, id="v2-call")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    for key, parameter in parameters.items():
        request.parameters[key].CopyFrom(parameter)
    return request


async def test_v2_infer_gives_each_rows_reasons_when_asked(demo_repo: Path, rows: F32) -> None:
    """``parameters["reasons"]`` on ModelInfer: every row's reasons in the response's
    ``reasons`` parameter, the same as a Score asking for them on that row; none when
    not asked; a non-bool parameter is INVALID_ARGUMENT naming it."""
    batch = rows[:3]
    async with running_server(demo_repo, ["server.overrides.allow_all=true"]) as srv:
        plain = await srv.inference.ModelInfer(_infer(batch), timeout=20)
        asked = await srv.inference.ModelInfer(
            _infer(batch, reasons=v2.InferParameter(bool_param=True)), timeout=20
        )
        scored = [await _score(srv, _request(row, explain=True)) for row in batch]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.inference.ModelInfer(
                _infer(batch, reasons=v2.InferParameter(string_param="yes")), timeout=20
            )
    assert "reasons" not in plain.parameters
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.reasons" in (info.value.details() or "")
    explained = json.loads(asked.parameters["reasons"].string_param)
    assert len(explained) == len(batch)
    probabilities = np.array(asked.outputs[1].contents.fp32_contents).reshape(len(batch), 2)
    for row, answer, score in zip(explained, scored, probabilities[:, 1], strict=True):
        assert score == pytest.approx(answer.score, abs=1e-6)
        assert row["reasons_base_value"] == pytest.approx(answer.reasons_base_value)
        assert [r["code"] for r in row["reasons"]] == [r.code for r in answer.reasons]
        for mine, theirs in zip(row["reasons"], answer.reasons, strict=True):
            assert mine["contribution"] == pytest.approx(theirs.contribution)
            assert [f["name"] for f in mine["features"]] == [f.name for f in theirs.features]


def _strict_json(text: str) -> Any:
    """``text`` parsed as standard JSON: NaN / Infinity (Python's extension) refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _scored_rows(srv: RunningServer) -> float:
    """Rows fraud/2's scoring batcher has run (its batch-size histogram's sum)."""
    labels = {"model": "fraud", "version": "2"}
    value = srv.app.metrics.registry.get_sample_value("streamscore_batch_size_rows_sum", labels)
    return value or 0.0


async def test_v2_reasons_are_one_job_admitted_or_refused_whole(demo_repo: Path, rows: F32) -> None:
    """A v2 call's rows are one explanation job: with room for only 2 calls in the
    reasons queue, a 12-row call gets every row's reasons (queued row by row it was
    refused part-way, after scoring); and with that queue full, a call is refused
    RESOURCE_EXHAUSTED whole, before its rows are scored."""
    batch = rows[:12]
    asked = v2.InferParameter(bool_param=True)
    async with running_server(
        demo_repo,
        ["server.overrides.allow_all=true", "models.defaults.reasons.max_queue_size=2"],
    ) as srv:
        answer = await srv.inference.ModelInfer(_infer(batch, reasons=asked), timeout=20)
        explained = _strict_json(answer.parameters["reasons"].string_param)
        assert len(explained) == len(batch)
        assert all(row["reasons_base_value"] != 0.0 for row in explained)

        reasons = srv.app.registry.get("fraud", "2").reasons
        assert reasons is not None
        entered, release = threading.Event(), threading.Event()
        explain_now = reasons.explain_now

        def held(x: F32) -> list[Explained]:
            entered.set()
            release.wait(20)
            return explain_now(x)

        reasons.explain_now = held  # type: ignore[method-assign]

        def call() -> asyncio.Future[v2.ModelInferResponse]:
            return asyncio.ensure_future(
                srv.inference.ModelInfer(_infer(batch[:4], reasons=asked), timeout=20)
            )

        try:
            running = [call()]  # explained in a batch of its own, held
            assert await asyncio.to_thread(entered.wait, 10)
            running += [call(), call()]  # waiting: the reasons queue is full
            deadline = time.monotonic() + 10
            while _scored_rows(srv) < len(batch) + 3 * 4:
                assert time.monotonic() < deadline, "the three calls were not scored"
                await asyncio.sleep(0.01)
            scored = _scored_rows(srv)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await srv.inference.ModelInfer(_infer(batch, reasons=asked), timeout=20)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "reasons" in (info.value.details() or "")
            assert _scored_rows(srv) == scored  # refused before scoring
            plain = await srv.inference.ModelInfer(_infer(batch), timeout=20)
            assert "reasons" not in plain.parameters  # scoring alone still served
        finally:
            release.set()
        for answered in await asyncio.gather(*running):
            assert len(_strict_json(answered.parameters["reasons"].string_param)) == 4


async def test_v2_reasons_parameter_is_strict_json_with_a_missing_value(
    demo_repo: Path, rows: F32, tmp_path: Path
) -> None:
    """A feature that may be missing (``nan_allowed``) sent as NaN: the ``reasons``
    parameter stays standard JSON, the missing value ``null``."""
    repo = tmp_path / "models"
    shutil.copytree(demo_repo, repo)
    version_dir = repo / "fraud" / "2"
    missing = "amount"
    manifest = ModelManifest.read(version_dir)
    manifest.model_copy(update={"nan_allowed": frozenset({missing})}).write(version_dir)
    batch = rows[:32].copy()
    batch[:, DEMO_FEATURES.index(missing)] = np.nan
    async with running_server(
        repo, ["server.overrides.allow_all=true", "models.defaults.reasons.top_n=64"]
    ) as srv:
        answer = await srv.inference.ModelInfer(
            _infer(batch, reasons=v2.InferParameter(bool_param=True)), timeout=20
        )
    explained = _strict_json(answer.parameters["reasons"].string_param)
    assert len(explained) == len(batch)
    values = [
        feature["value"]
        for row in explained
        for reason in row["reasons"]
        for feature in reason["features"]
        if feature["name"] == missing
    ]
    assert values and all(value is None for value in values)


async def test_no_explainer_is_failed_precondition_and_tampered_is_refused(
    demo_repo: Path, rows: F32, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(demo_repo, repo)
    bare_dir = repo / "fraud" / "1"
    bare = ModelManifest.read(bare_dir).model_copy(update={"explainer": None})
    bare.write(bare_dir)
    tampered = repo / "fraud" / "2" / "explainer.json"
    document = json.loads(tampered.read_text())
    document["covers"][0] += 1.0
    tampered.write_text(json.dumps(document))
    async with admin_server(repo) as admin:
        srv = admin.srv
        assert srv.app.registry.versions("fraud") == ["1"]  # 2 refused, 1 serves
        request = _request(rows[0])
        request.model_version = "1"
        answer = await _score(srv, request)
        assert answer.artifact_sha256 == bare.sha256 and not answer.reasons
        request.explain = True
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _score(srv, request)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'fraud'" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.inference.ModelInfer(
                _infer(rows[:2], "1", reasons=v2.InferParameter(bool_param=True)), timeout=20
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'fraud'" in (info.value.details() or "")
        listed = await admin.stub.ListModels(
            apb.ListModelsRequest(endpoint="fraud"), metadata=CREDENTIALS, timeout=10
        )
        versions = {v.version: v for v in listed.models[0].versions}
        assert versions["2"].status == apb.VERSION_STATUS_FAILED
        assert "explainer" in versions["2"].error
        assert versions["1"].lineage.artifact_sha256 == bare.sha256
        assert not versions["1"].lineage.explainer


async def test_lineage_in_metadata_and_list_models(demo_repo: Path) -> None:
    async with admin_server(demo_repo) as admin:
        for version in ("1", "2"):
            manifest = ModelManifest.read(demo_repo / "fraud" / version)
            assert manifest.explainer is not None
            meta = await admin.srv.inference.ModelMetadata(
                v2.ModelMetadataRequest(name="fraud", version=version), timeout=10
            )
            assert meta.lineage["artifact_sha256"] == manifest.sha256
            assert meta.lineage["data_snapshot"] == manifest.training.data_snapshot
            assert meta.lineage["code_commit"] == manifest.training.code_commit
            assert meta.lineage["explainer"] == "true"
            assert meta.lineage["explainer_sha256"] == manifest.explainer.sha256
        listed = await admin.stub.ListModels(
            apb.ListModelsRequest(endpoint="fraud"), metadata=CREDENTIALS, timeout=10
        )
        for entry in listed.models[0].versions:
            manifest = ModelManifest.read(demo_repo / "fraud" / entry.version)
            assert entry.lineage.artifact_sha256 == manifest.sha256
            assert entry.lineage.data_snapshot == manifest.training.data_snapshot
            assert entry.lineage.explainer


async def test_score_stream_explains_the_items_that_ask(demo_repo: Path, rows: F32) -> None:
    """On a stream, items asking for reasons get them (explained off the batch) and the
    others are answered without; every item answers exactly once."""
    async with running_server(demo_repo, []) as srv:
        requests = [
            _request(row, request_id=f"r{i}", explain=(i % 2 == 0))
            for i, row in enumerate(rows[:40])
        ]
        answers = [a async for a in srv.scoring.ScoreStream(iter(requests), timeout=60)]
        unary = {r.request_id: await _score(srv, r) for r in requests[:4]}
    by_id = {a.request_id: a for a in answers}
    assert sorted(by_id) == sorted(r.request_id for r in requests)
    for i, request in enumerate(requests):
        answer = by_id[request.request_id]
        assert not answer.HasField("error")
        if i % 2 == 0:
            assert 1 <= len(answer.reasons) <= 4 and answer.reasons_base_value != 0.0
        else:
            assert not answer.reasons
    for request_id, reference in unary.items():
        assert by_id[request_id].score == pytest.approx(reference.score)
        assert [r.code for r in by_id[request_id].reasons] == [r.code for r in reference.reasons]


async def test_a_lone_callers_row_is_explained_on_the_loop_and_concurrent_ones_off_it(
    demo_repo: Path, rows: F32, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lone caller: after the first (measured) explanation, rows are explained at once on
    the loop thread; under concurrency (the scoring batcher batches) always on a worker
    thread, as with ``reasons.inline_max_ms=0``; the reasons are the same either way."""
    threads: list[bool] = []  # per row, True: explained on the loop's (main) thread
    explain_now = VersionReasons.explain_now

    def spy(self: VersionReasons, x: F32) -> list[Explained]:
        threads.extend([threading.current_thread() is threading.main_thread()] * x.shape[0])
        return explain_now(self, x)

    monkeypatch.setattr(VersionReasons, "explain_now", spy)
    answers: dict[str, list[str]] = {}
    always = "models.defaults.reasons.when=always"
    # a budget no row exceeds even on a loaded machine: the test is of the choice
    async with running_server(
        demo_repo, [always, "models.defaults.reasons.inline_max_ms=100"]
    ) as srv:
        for row in rows[:6]:
            answers.setdefault("lone", []).extend(
                r.code for r in (await _score(srv, _request(row))).reasons
            )
        assert threads == [False, True, True, True, True, True]  # first one measures the cost
        for _ in range(3):
            threads.clear()
            await asyncio.gather(*(_score(srv, _request(row)) for row in rows[:32]))
        assert len(threads) == 32 and not any(threads)  # batched: nobody waits on the loop
    async with running_server(
        demo_repo,
        [always, "models.defaults.reasons.inline_max_ms=0"],
    ) as srv:
        threads.clear()
        for row in rows[:6]:
            answers.setdefault("off", []).extend(
                r.code for r in (await _score(srv, _request(row))).reasons
            )
        assert threads == [False] * 6
    assert answers["lone"] == answers["off"]
