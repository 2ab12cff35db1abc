"""The decision record against a real Redis and broker: one record per answered request
(Score, ScoreStream, v2 rows) with feature sources, lineage, decision and reasons;
``streamscore decisions show`` finds one by time lookup (unknown id: exit 1);
``decisions reproduce`` and ``replay --reproduce`` agree 100% on a recorded run.
The demo models (with explainers) are trained once for the module."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from demo.synthetic import DEMO_FEATURES, generate_dataset
from demo.train import build_demo_repository
from devstack.services import KafkaBroker
from feature_streams.batch_store import activate, write_snapshot
from feature_streams.definitions import load_definitions
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.clients.decisions import main_decisions
from server.clients.replay import ReplayConfig, read_topic_values, run_replay
from server.manifest import ModelManifest
from tests.conftest import TEST_FEATURES, free_port
from tests.support.server import TEST_OVERRIDE_TOKEN, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
FEATURES_YAML = REPO_ROOT / "features.yaml"
F32 = npt.NDArray[np.float32]
REQUEST_FEATURES = frozenset(
    {
        "amount",
        "mcc",
        "channel",
        "hour_of_day",
        "day_of_week",
        "is_international",
        "card_present",
        "distance_from_home_km",
    }
)
N = 60


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    build_demo_repository(repo, n_rows=8_000, validate=False)
    return repo


@pytest.fixture(scope="module")
def rows() -> F32:
    x, _ = generate_dataset(400, seed=4242)
    return x


@pytest.fixture
async def snapshot_id(redis_url: str) -> AsyncIterator[str]:
    """A loaded customer_profile snapshot for cust-0..cust-2 (card_profile never loaded)."""
    definitions = load_definitions(FEATURES_YAML)
    fields = definitions.batch_groups["customer_profile"].fields
    client = Redis.from_url(redis_url)
    try:
        rows = [(f"cust-{i}", {f: float(i + 1) for f in fields}) for i in range(3)]
        info = await write_snapshot(client, "customer_profile", rows)
        await activate(client, "customer_profile", info.snapshot_id)
        yield info.snapshot_id
    finally:
        await client.aclose()


def _request(row: F32, i: int) -> pb.ScoreRequest:
    features = {
        n: float(v)
        for n, v in zip(DEMO_FEATURES, row.tolist(), strict=True)
        if n in REQUEST_FEATURES
    }
    features["amount"] = 40.0 + 90.0 * (i % 30)  # some flagged, some not
    return pb.ScoreRequest(
        model="fraud",
        request_id=f"dec-{i}",
        features=features,
        entity_ids={"customer_id": f"cust-{i % 3}", "card_id": f"card-{i}"},
    )


async def _run(stack: Any, rows: F32) -> tuple[dict[str, pb.ScoreResponse], list[str]]:
    """Score N requests unary, 10 on a ScoreStream and 3 v2 rows; answers by id."""
    srv = stack
    answers: dict[str, pb.ScoreResponse] = {}
    for i in range(N):
        answer: pb.ScoreResponse = await srv.scoring.Score(_request(rows[i], i), timeout=20)
        answers[answer.request_id] = answer
    stream_requests = [_request(rows[i], i) for i in range(N, N + 10)]
    call = srv.scoring.ScoreStream(iter(stream_requests), timeout=20)
    async for item in call:
        assert not item.HasField("error")
        answers[item.request_id] = item
    v2_request = v2.ModelInferRequest(model_name="fraud", id="v2call")
    manifest = srv.app.registry.get("fraud", answers["dec-0"].model_version).model.manifest
    tensor = v2_request.inputs.add(name=manifest.input.name, datatype="FP32", shape=[3, 20])
    tensor.shape[:] = [3, len(DEMO_FEATURES)]
    tensor.contents.fp32_contents.extend(rows[200:203].ravel().tolist())
    await srv.inference.ModelInfer(v2_request, timeout=20, metadata=srv.overrides)
    return answers, [f"v2call#{i}" for i in range(3)]


def _records(values: list[bytes]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        record = json.loads(value)
        out.setdefault(record["request_id"], record)  # at least once: first copy wins
    return out


async def _cli(*argv: str) -> tuple[int, str]:
    """``main_decisions`` in a thread (it runs its own event loop), stdout and stderr
    captured together."""

    buffer = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return main_decisions(list(argv))

    code = await asyncio.to_thread(run)
    return code, buffer.getvalue()


async def test_every_decision_recorded_found_and_reproduced(
    demo_repo: Path,
    rows: F32,
    redis_url: str,
    snapshot_id: str,
    kafka: KafkaBroker,
    tmp_path: Path,
) -> None:
    topic = f"decisions-{uuid.uuid4().hex[:8]}"
    common = [
        f"features.definitions_path={FEATURES_YAML}",
        f"redis.url={redis_url}",
        "features.fetch_timeout_s=2.0",
        "redis.socket_timeout_s=5.0",  # each read's own bound (0.2 s) trips on a loaded machine
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
        f"traffic_log.topic={topic}",
        "traffic_log.sample_rate=1.0",  # the product default; test servers turn it off
        "models.per_model.fraud.reasons.when=above_threshold",
    ]
    async with running_server(demo_repo, common) as srv:
        answers, v2_ids = await _run(srv, rows)
    # leaving the server flushed the records
    records = _records(await read_topic_values(kafka.bootstrap_servers, topic))
    assert set(answers) | set(v2_ids) <= set(records)
    flagged = 0
    for request_id, answer in answers.items():
        record = records[request_id]
        manifest = ModelManifest.read(demo_repo / "fraud" / answer.model_version)
        assert record["score"] == pytest.approx(answer.score, abs=1e-7)
        assert record["version"] == answer.model_version and record["route"] == "champion"
        assert record["decision"] == answer.decision
        assert record["threshold"] == pytest.approx(manifest.threshold)
        assert record["artifact_sha256"] == manifest.sha256 == answer.artifact_sha256
        assert record["lineage"]["data_snapshot"] == manifest.training.data_snapshot
        assert record["lineage"]["code_commit"] == manifest.training.code_commit
        assert record["process"] == {"pid": os.getpid(), "index": 0}
        assert record["latency_us"] > 0
        assert record["request"]["entity_ids"]["card_id"] == record["request_id"].replace(
            "dec-", "card-"
        )
        sources = record["feature_sources"]
        assert set(sources) == set(record["features"]) == set(manifest.features)
        for name in REQUEST_FEATURES & set(manifest.features):
            assert sources[name] == "request"
        assert sources["credit_limit"] == f"snapshot:customer_profile/{snapshot_id}"
        assert sources["card_age_days"] == "default"  # card_profile never loaded
        assert any(s.startswith("stream:card_activity") for s in sources.values())
        if answer.reasons:
            flagged += 1
            assert [r["code"] for r in record["reasons"]] == [r.code for r in answer.reasons]
            assert record["reasons"][0]["features"]
        else:
            assert record["reasons"] is None
    assert 0 < flagged < len(answers)
    for item_id in v2_ids:
        assert set(records[item_id]["feature_sources"].values()) == {"request"}

    # show: found by time lookup, printed with sources, reasons and lineage
    some_flagged = next(i for i, a in answers.items() if a.reasons)
    code, out = await _cli(
        "show", some_flagged, "--topic", topic, "--bootstrap-servers", kafka.bootstrap_servers
    )
    assert code == 0, out
    assert some_flagged in out and f"snapshot:customer_profile/{snapshot_id}" in out
    assert answers[some_flagged].reasons[0].code in out and "data snapshot" in out
    code, out = await _cli(
        "show", "no-such-id", "--topic", topic, "--bootstrap-servers", kafka.bootstrap_servers
    )
    assert code == 1 and out.startswith(f"no-such-id not found in {topic} since ")
    assert out.count("\n") == 1
    # a window starting now holds none of them: the lookup starts at the time offset
    code, out = await _cli(
        "show", some_flagged, "--since", "0s", "--topic", topic,
        "--bootstrap-servers", kafka.bootstrap_servers,
    )  # fmt: skip
    assert code == 1 and "not found" in out

    # reproduce: a fresh server without the store (recorded features are sent, which
    # needs the overrides permission: without its token the server refuses them)
    token_file = tmp_path / "override-token"
    token_file.write_text(TEST_OVERRIDE_TOKEN + "\n")
    async with running_server(demo_repo, [f"features.definitions_path={FEATURES_YAML}"]) as srv:
        code, out = await _cli(
            "reproduce", some_flagged, "--target", srv.target, "--topic", topic,
            "--bootstrap-servers", kafka.bootstrap_servers,
        )  # fmt: skip
        assert code == 1 and "INVALID_ARGUMENT" in out, out
        code, out = await _cli(
            "reproduce", some_flagged, "--target", srv.target, "--topic", topic,
            "--bootstrap-servers", kafka.bootstrap_servers,
            "--override-token-file", str(token_file),
        )  # fmt: skip
        assert code == 0, out
        assert "reproduced" in out and "NOT" not in out
        report = await run_replay(
            ReplayConfig(
                target=srv.target,
                topic=topic,
                bootstrap_servers=kafka.bootstrap_servers,
                pace=None,
                reproduce=True,
                override_token=TEST_OVERRIDE_TOKEN,
            )
        )
    assert report.errors == {} and report.ok == report.records >= len(answers) + 3
    assert report.reproduced == report.ok and report.mismatched == ()
    assert report.reasons_compared >= flagged and report.reasons_agreed == report.reasons_compared
    assert report.agreement_rate == 1.0


async def test_v2_rows_needing_reasons_are_recorded_with_them_as_one_job(
    demo_repo: Path, rows: F32, kafka: KafkaBroker
) -> None:
    """Under ``reasons.when: always`` a v2 call's recorded rows are explained together,
    one job in the reasons queue: with room for only 2 jobs every one of 16 rows is
    recorded with its reasons (queued row by row, 14 were refused: ``explain_failed``)."""
    topic = f"decisions-{uuid.uuid4().hex[:8]}"
    settings = [
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
        f"traffic_log.topic={topic}",
        "traffic_log.sample_rate=1.0",
        "models.per_model.fraud.reasons.when=always",
        "models.per_model.fraud.reasons.max_queue_size=2",
    ]
    batch = rows[:16]
    async with running_server(demo_repo, settings) as srv:
        request = v2.ModelInferRequest(model_name="fraud", model_version="2", id="v2rows")
        tensor = request.inputs.add(name="features", datatype="FP32", shape=list(batch.shape))
        tensor.contents.fp32_contents.extend(batch.ravel().tolist())
        await srv.inference.ModelInfer(request, timeout=20, metadata=srv.overrides)
    # leaving the server waited for the explanations and flushed the records
    records = _records(await read_topic_values(kafka.bootstrap_servers, topic))
    ids = [f"v2rows#{i}" for i in range(len(batch))]
    assert set(ids) <= set(records)
    for item_id in ids:
        assert records[item_id]["degraded_reasons"] == [], item_id
        assert records[item_id]["reasons"] is not None, item_id
        assert records[item_id]["reasons_base_value"] != 0.0


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _serving(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Wait until the subprocess server answers health SERVING."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        for _ in range(600):
            assert process.returncode is None, _tail(log)
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never SERVING:\n{_tail(log)}")
    finally:
        await channel.close(None)


async def test_sigterm_with_records_buffered_spills_and_the_next_start_sends_them(
    linear_repository: Path, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """A real ``streamscore serve`` whose Kafka is away: answered decisions are held; on
    SIGTERM they reach the spill file, and the next start sends every one of them."""
    topic = f"decisions-{uuid.uuid4().hex[:8]}"
    spill = tmp_path / "spill"
    durable = [
        "traffic_log.sample_rate=1.0",
        "traffic_log.delivery=durable",
        f"records.durable.spill_dir={spill}",
        f"traffic_log.topic={topic}",
    ]
    port = free_port()
    log = tmp_path / "server.log"
    sets = [
        f"server.port={port}",
        "server.metrics_port=0",
        f"models.repository={linear_repository}",
        "features.definitions_path=null",
        f"routing.file_path={tmp_path / 'routing.json'}",
        f"kafka.bootstrap_servers=127.0.0.1:{free_port()}",  # nobody listens there
        *durable,
    ]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "serve",
            *(item for s in sets for item in ("--set", s)),
            cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        await _serving(port, process, log)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ScoringStub(channel)
        ids = [f"term-{i}" for i in range(40)]
        for i, request_id in enumerate(ids):
            features = {f: float(i) / 10 for f in TEST_FEATURES}
            await stub.Score(
                pb.ScoreRequest(model="lin", request_id=request_id, features=features), timeout=10
            )
        await channel.close(None)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, _tail(log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert any(p.is_file() and p.stat().st_size for p in spill.rglob("*"))
    # the next start (the broker back) sends what the last one spilled
    async with running_server(
        linear_repository, [f"kafka.bootstrap_servers={kafka.bootstrap_servers}", *durable]
    ) as srv:
        sink = srv.app.durable_sink
        assert sink is not None
        for _ in range(600):
            if sink.spill.pending == 0:
                break
            await asyncio.sleep(0.05)
        assert sink.spill.pending == 0
    records = _records(await read_topic_values(kafka.bootstrap_servers, topic))
    assert set(ids) <= set(records)
    assert all(records[i]["schema"] == "streamscore.decision/1" for i in ids)


async def test_v2_rows_are_recorded_with_the_reasons_their_policy_computes(
    demo_repo: Path, rows: F32, kafka: KafkaBroker
) -> None:
    """Every row of a ModelInfer call gets a record; under ``above_threshold`` the
    flagged rows carry the reasons a Score of the same row (asking for them) gets, the
    others none; under ``always``, or ``on_request`` with the call asking
    (``parameters["reasons"]``), every row carries them."""
    matrix = rows[:40].copy()
    amount = DEMO_FEATURES.index("amount")
    matrix[:, amount] = 40.0 + 90.0 * (np.arange(40) % 30)  # some flagged, some not
    for when in ("above_threshold", "always", "on_request"):
        topic = f"decisions-v2-{uuid.uuid4().hex[:8]}"
        settings = [
            f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
            f"traffic_log.topic={topic}",
            "traffic_log.sample_rate=1.0",
            f"models.per_model.fraud.reasons.when={when}",
        ]
        async with running_server(demo_repo, settings) as srv:
            manifest = srv.app.registry.get("fraud", "2").model.manifest
            request = v2.ModelInferRequest(model_name="fraud", model_version="2", id="v2r")
            tensor = request.inputs.add(name=manifest.input.name, datatype="FP32")
            tensor.shape[:] = [len(matrix), len(DEMO_FEATURES)]
            tensor.contents.fp32_contents.extend(matrix.ravel().tolist())
            if when == "on_request":
                request.parameters["reasons"].bool_param = True
            await srv.inference.ModelInfer(request, timeout=20, metadata=srv.overrides)
            expected: dict[str, list[str]] = {}
            for i, row in enumerate(matrix):
                features = dict(zip(DEMO_FEATURES, row.tolist(), strict=True))
                answer = await srv.scoring.Score(
                    pb.ScoreRequest(
                        model="fraud", model_version="2", features=features, explain=True
                    ),
                    timeout=20,
                    metadata=srv.overrides,
                )
                expected[f"v2r#{i}"] = [r.code for r in answer.reasons]
        records = _records(await read_topic_values(kafka.bootstrap_servers, topic))
        flagged = 0
        for item_id, codes in expected.items():
            record = records[item_id]  # every row recorded
            needs = when != "above_threshold" or record["decision"]
            flagged += record["decision"]
            if needs:
                assert record["reasons"] is not None, (when, item_id)
                assert [r["code"] for r in record["reasons"]] == codes
                assert record["reasons_base_value"] != 0.0
            else:
                assert record["reasons"] is None
        assert 0 < flagged < len(expected)
