"""Shadow records and traffic log through a real Tansu broker, from a real server's versions.

The first tests drive ``ShadowRunner`` and ``TrafficLog`` directly with a running
server's registry and real pipeline answers (the row handed over is the exact
assembled row, ``echo_features``, the live model saw); the ``wired`` ones go through
the server's own hook, for Score and v2 ModelInfer calls.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from devstack.services import KafkaBroker, free_port, kafka_broker
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from server.clients.replay import read_topic, read_topic_values
from server.records.kafka_sink import KafkaSink, Payload, SinkConfig, SinkMetrics
from server.records.shadow import (
    ShadowMetrics,
    ShadowOptions,
    ShadowRunner,
    live_backlog,
)
from server.records.traffic_log import DECISION_SCHEMA, TrafficLog
from server.router import Route
from server.scoring_types import ScoreInput, ScoreResult
from tests.conftest import TEST_FEATURES
from tests.support.readers import records_of
from tests.support.server import RunningServer, running_server

pytestmark = pytest.mark.integration

T0_MS = 1_700_000_000_000


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def features(i: int) -> dict[str, float]:
    values = np.random.default_rng(i).normal(size=len(TEST_FEATURES))
    return {name: float(v) for name, v in zip(TEST_FEATURES, values, strict=True)}


def score_input(i: int, version: str | None) -> ScoreInput:
    return ScoreInput(
        model="lin",
        request_id=f"r{i}",
        features=features(i),
        model_version=version,
        event_time_ms=T0_MS + i,
        echo_features=True,
        overrides_allowed=True,  # a recorded time, as a replay sends it
    )


async def answer(srv: RunningServer, i: int, version: str | None = "1") -> ScoreResult:
    """A real live answer, with the assembled row echoed."""
    return await srv.app.pipeline.score(score_input(i, version), None)


def row_of(result: ScoreResult) -> npt.NDArray[np.float32]:
    return np.array([[value for _, value in result.features]], dtype=np.float32)


def sink_config(bootstrap: str, **overrides: Any) -> SinkConfig:
    return SinkConfig(bootstrap_servers=bootstrap, linger_ms=2, **overrides)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def shadow_runner(
    srv: RunningServer, sink: KafkaSink | None, topic: str | None, metrics: CollectorRegistry
) -> ShadowRunner:
    registry = srv.app.registry
    runner = ShadowRunner(
        registry.get,
        ShadowMetrics(metrics),
        sink=sink,
        options=ShadowOptions(records_topic=topic),
        is_busy=live_backlog(registry.all_versions, 64),
    )
    return runner


async def test_shadow_records_and_metrics_from_real_versions(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    topic = unique("shadow")
    n = 60
    async with running_server(linear_repository) as srv:
        metrics = CollectorRegistry()
        sink = KafkaSink(sink_config(kafka.bootstrap_servers), SinkMetrics(metrics))
        sink.start()
        runner = shadow_runner(srv, sink, topic, metrics)
        live = [await answer(srv, i, "1") for i in range(n)]
        for result in live:
            runner.submit(
                request_id=result.request_id,
                model="lin",
                live=srv.app.registry.get("lin", result.version),
                live_score=result.score,
                route=result.route.value,
                row=row_of(result),
                shadows=("2",),
            )
        reference = {r.request_id: r.score for r in [await answer(srv, i, "2") for i in range(n)]}
        await runner.close()
        await sink.close()
        assert sink.sent[topic] >= 1 and not sink.dropped
    values = await read_topic_values(kafka.bootstrap_servers, topic)
    records = [r for v in values for r in records_of(v)]
    assert len(records) == n
    by_id = {r["request_id"]: r for r in records}
    agreed = 0
    for result in live:
        record = by_id[result.request_id]
        assert record["live"]["version"] == "1" and record["live"]["score"] == result.score
        assert record["live"]["route"] == "pinned"
        assert record["shadow"]["version"] == "2"
        # the shadow scored the same row the v2 model scores when pinned
        assert record["shadow"]["score"] == pytest.approx(reference[result.request_id], abs=1e-6)
        agreed += record["agree"]
    labels = {"model": "lin", "live_version": "1", "version": "2"}
    assert sample(metrics, "streamscore_shadow_compared_total", **labels) == n
    assert sample(metrics, "streamscore_shadow_agreed_total", **labels) == agreed
    assert sample(metrics, "streamscore_shadow_score_diff_count", **labels) == n
    assert 1 <= sample(metrics, "streamscore_record_sink_sent_total", topic=topic) <= n  # messages


class ListSink:
    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        self.values.extend(records_of(value if isinstance(value, bytes) else value()))
        self.changed.set()
        return True


async def test_a_failing_shadow_never_fails_the_live_answer(linear_repository: Path) -> None:
    async with running_server(linear_repository) as srv:
        sink = ListSink()
        metrics = CollectorRegistry()
        runner = ShadowRunner(
            srv.app.registry.get,
            ShadowMetrics(metrics),
            sink=sink,
            options=ShadowOptions(records_topic="t"),
        )
        shadow = srv.app.registry.get("lin", "2")

        async def broken(rows: npt.NDArray[np.float32]) -> Any:
            raise RuntimeError("shadow model crashed")

        shadow.model.run = broken  # type: ignore[method-assign]
        for i in range(10):
            result = await answer(srv, i, "1")
            runner.submit(
                request_id=result.request_id,
                model="lin",
                live=srv.app.registry.get("lin", "1"),
                live_score=result.score,
                route=result.route.value,
                row=row_of(result),
                shadows=("2", "404"),
            )
            # the answer path keeps working while shadows fail
            response = await srv.scoring.Score(
                pb.ScoreRequest(model="lin", model_version="1", features=features(i))
            )
            assert response.score == pytest.approx(result.score)
        async with asyncio.timeout(5):
            while len(sink.values) < 10:
                sink.changed.clear()
                await sink.changed.wait()
        await runner.close()
    assert {v["shadow"]["error"] for v in sink.values} == {"inference"}
    errors = "streamscore_shadow_errors_total"
    assert sample(metrics, errors, model="lin", version="2", reason="inference") == 10
    assert sample(metrics, errors, model="lin", version="404", reason="not_loaded") == 10


class NullSink:
    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        return True


def test_traffic_log_sampling_rate_is_respected_and_deterministic() -> None:
    ids = [f"req-{i}" for i in range(2000)]
    log = TrafficLog(NullSink(), "t", 0.25, sample_salt=b"server secret")
    chosen = [log.sampled(request_id) for request_id in ids]
    assert 0.25 * 2000 - 90 <= sum(chosen) <= 0.25 * 2000 + 90  # ~4 sigma
    same_salt = TrafficLog(NullSink(), "t", 0.25, sample_salt=b"server secret")
    assert chosen == [same_salt.sampled(r) for r in ids]  # every process, every replay
    # keyed by the server's salt: ids a caller found sampled under one salt (or with the
    # unkeyed hash) are no more likely to be sampled under another
    picked = [r for r, c in zip(ids, chosen, strict=True) if c]
    for other in (TrafficLog(NullSink(), "t", 0.25), TrafficLog(NullSink(), "t", 0.25)):
        hits = sum(other.sampled(r) for r in picked)
        assert hits < 0.25 * len(picked) + 4 * (0.25 * 0.75 * len(picked)) ** 0.5
    assert not any(TrafficLog(NullSink(), "t", 0.0).sampled(r) for r in ids)
    assert all(TrafficLog(NullSink(), "t", 1.0).sampled(r) for r in ids)
    with pytest.raises(ValueError, match="sample_rate"):
        TrafficLog(NullSink(), "t", 1.5)


async def test_traffic_log_records_reach_kafka_with_assembled_features(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    topic = unique("traffic")
    n = 40
    async with running_server(linear_repository) as srv:
        metrics = CollectorRegistry()  # its own: once wired, the app registers these families
        sink = KafkaSink(sink_config(kafka.bootstrap_servers), SinkMetrics(metrics))
        sink.start()
        log = TrafficLog(sink, topic, 0.5, registry=metrics)
        results: dict[str, tuple[ScoreInput, ScoreResult]] = {}
        for i in range(n):
            request = score_input(i, None)
            result = await srv.app.pipeline.score(request, None)
            loaded = srv.app.registry.get("lin", result.version)
            queued = log.offer(
                request,
                result,
                names=loaded.layout.names,
                row=row_of(result),
                t_ms=T0_MS + i,
                threshold=loaded.model.manifest.threshold,
                timings={"pipeline_us": 100},
            )
            assert queued == log.sampled(request.request_id)
            results[request.request_id] = (request, result)
        await sink.close()
    sampled = [r for r in results if log.sampled(r)]
    assert 0 < len(sampled) < n
    assert sample(metrics, "streamscore_traffic_log_sampled_total") == len(sampled)
    records, skipped = await read_topic(kafka.bootstrap_servers, topic)
    assert skipped == 0
    assert sorted(r.request_id for r in records) == sorted(sampled)
    raw = json.loads((await read_topic_values(kafka.bootstrap_servers, topic))[0])
    assert raw["schema"] == DECISION_SCHEMA
    assert set(raw) >= {"request", "features", "score", "version", "route", "timings", "ts"}
    for record in records:
        request, result = results[record.request_id]
        assert list(record.features) == list(TEST_FEATURES)  # model order
        assert list(record.features.values()) == row_of(result)[0].tolist()
        assert record.request_features == request.features
        assert record.score == result.score and record.version == result.version == "2"
        assert record.route == Route.CHAMPION.value and record.t_ms == T0_MS + int(
            record.request_id[1:]
        )


async def test_sink_burst_beyond_its_buffer_drops_the_excess(kafka: KafkaBroker) -> None:
    topic = unique("burst")
    sink = KafkaSink(sink_config(kafka.bootstrap_servers, max_buffered=100))
    sink.start()
    accepted = sum(sink.offer(topic, f"{i}".encode()) for i in range(1000))
    assert accepted == 100 and sink.dropped["buffer_full"] == 900
    await sink.close()
    assert sink.sent[topic] == 100
    values = await read_topic_values(kafka.bootstrap_servers, topic)
    assert sorted(int(v) for v in values) == list(range(100))


async def test_sink_survives_kafka_coming_and_going(tmp_path: Path) -> None:
    """Down at start: drops, counted; Kafka starts: records flow; Kafka stops: drops again.

    Offers never block at any point.
    """
    port = free_port()
    topic = unique("flaky")
    config = SinkConfig(
        bootstrap_servers=f"127.0.0.1:{port}",
        linger_ms=2,
        retry_interval_s=0.2,
        request_timeout_ms=1000,
        connect_timeout_s=2.0,
    )
    sink = KafkaSink(config)
    sink.start()
    slowest = 0.0

    async def offer_until(done: Any, what: str) -> None:
        nonlocal slowest
        deadline = time.monotonic() + 20
        i = 0
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            started = time.perf_counter()
            sink.offer(topic, f"{what}-{i}".encode())
            slowest = max(slowest, time.perf_counter() - started)
            i += 1
            await asyncio.sleep(0.02)  # offer pacing, not synchronisation

    await offer_until(lambda: sink.dropped["kafka_unavailable"] > 0, "down")
    with kafka_broker(port=port, log_file=tmp_path / "broker.log"):
        await offer_until(lambda: sink.sent[topic] >= 5, "up")
    before = sink.dropped["send_failed"] + sink.dropped["kafka_unavailable"]
    await offer_until(
        lambda: sink.dropped["send_failed"] + sink.dropped["kafka_unavailable"] > before + 5,
        "gone",
    )
    started = time.perf_counter()
    await sink.close(timeout_s=3.0)
    assert time.perf_counter() - started < 5.0
    assert slowest < 0.05  # an offer is a deque append or a counted drop


# --------------------------------------------------------------------------- wired in
# Through the real server: the pipeline hands answers to the ShadowRunner and the
# TrafficLog the AppContext builds.


async def set_shadows(srv: RunningServer, *versions: str) -> None:
    from server.routing.changes import Actor

    assert srv.app.routing_changes is not None
    await srv.app.routing_changes.set_routing(
        "lin",
        champion=None,
        canary=None,
        shadows=versions,
        rollout=None,
        actor=Actor("test"),
        reason="shadow test",
    )


async def test_wired_shadow_records_for_real_score_calls(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    topic = unique("shadow-wired")
    overrides = [
        f"shadow.records_topic={topic}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
    ]
    answers: dict[str, float] = {}
    async with running_server(linear_repository, overrides) as srv:
        await set_shadows(srv, "1")  # champion is 2; 1 shadows it
        for i in range(50):
            request = pb.ScoreRequest(model="lin", request_id=f"w{i}", features=features(i))
            response = await srv.scoring.Score(request)
            assert response.model_version == "2"
            answers[response.request_id] = response.score
        pinned = await srv.scoring.Score(
            pb.ScoreRequest(
                model="lin", model_version="2", request_id="pinned", features=features(0)
            )
        )
        assert pinned.score == answers["w0"]
        metrics = srv.app.metrics.registry
    # leaving the server drained the shadows and flushed the sink
    labels = {"model": "lin", "live_version": "2", "version": "1"}
    assert sample(metrics, "streamscore_shadow_compared_total", **labels) == 50
    values = await read_topic_values(kafka.bootstrap_servers, topic)
    records = [r for v in values for r in records_of(v)]
    assert {r["request_id"] for r in records} == set(answers)  # pinned calls are not shadowed
    for record in records:
        assert record["live"]["score"] == answers[record["request_id"]]
        assert record["shadow"]["version"] == "1" and "score" in record["shadow"]


async def test_wired_failing_shadow_never_fails_the_answer(linear_repository: Path) -> None:
    async with running_server(linear_repository, ["shadow.records_topic=null"]) as srv:
        await set_shadows(srv, "1")

        async def broken(rows: npt.NDArray[np.float32]) -> Any:
            raise RuntimeError("shadow model crashed")

        srv.app.registry.get("lin", "1").model.run = broken  # type: ignore[method-assign]
        for i in range(20):
            response = await srv.scoring.Score(pb.ScoreRequest(model="lin", features=features(i)))
            assert response.model_version == "2"
        metrics = srv.app.metrics.registry
    # leaving the server drained the shadows
    errors = "streamscore_shadow_errors_total"
    assert sample(metrics, errors, model="lin", version="1", reason="inference") == 20


async def test_wired_traffic_log_samples_real_calls(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    topic = unique("traffic-wired")
    overrides = [
        "traffic_log.sample_rate=0.5",
        "traffic_log.sample_salt=wired-salt",
        f"traffic_log.topic={topic}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
    ]
    sent: dict[str, pb.ScoreResponse] = {}
    async with running_server(linear_repository, overrides) as srv:
        for i in range(60):
            request = pb.ScoreRequest(
                model="lin", request_id=f"t{i}", features=features(i), echo_features=True
            )
            sent[request.request_id] = await srv.scoring.Score(request)
        log = TrafficLog(NullSink(), topic, 0.5, sample_salt=b"wired-salt")
    records, skipped = await read_topic(kafka.bootstrap_servers, topic)
    assert skipped == 0
    assert sorted(r.request_id for r in records) == sorted(r for r in sent if log.sampled(r))
    for record in records:
        response = sent[record.request_id]
        assert record.score == response.score and record.version == response.model_version
        assert list(record.features.values()) == [f.value for f in response.features]


def v2_request(rows: npt.NDArray[np.float32], request_id: str, version: str = "") -> Any:
    request = v2.ModelInferRequest(model_name="lin", model_version=version, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


def v2_scores(response: Any) -> list[float]:
    """P(positive) per row of a v2 answer (raw ``probabilities`` output, [N, 2])."""
    index = [o.name for o in response.outputs].index("probabilities")
    values = np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(-1, 2)
    return [float(v) for v in values[:, 1]]


async def test_v2_infer_rows_are_shadowed_and_logged_like_score_calls(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    shadow_topic, traffic_topic = unique("shadow-v2"), unique("traffic-v2")
    overrides = [
        f"shadow.records_topic={shadow_topic}",
        "traffic_log.sample_rate=1.0",
        f"traffic_log.topic={traffic_topic}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
    ]
    rows = np.random.default_rng(5).normal(size=(4, len(TEST_FEATURES))).astype(np.float32)
    async with running_server(linear_repository, overrides) as srv:
        await set_shadows(srv, "1")  # champion is 2; 1 shadows it
        response = await srv.inference.ModelInfer(v2_request(rows, "call-a"))
        pinned = await srv.inference.ModelInfer(v2_request(rows[:1], "call-p", version="2"))
        live = v2_scores(response)
        metrics = srv.app.metrics.registry
    labels = {"model": "lin", "live_version": "2", "version": "1"}
    assert sample(metrics, "streamscore_shadow_compared_total", **labels) == 4
    values = await read_topic_values(kafka.bootstrap_servers, shadow_topic)
    shadows = {r["request_id"]: r for v in values for r in records_of(v)}
    assert set(shadows) == {f"call-a#{i}" for i in range(4)}  # the pinned call is not
    for i, score in enumerate(live):
        assert shadows[f"call-a#{i}"]["live"]["score"] == pytest.approx(score, abs=1e-7)

    records, skipped = await read_topic(kafka.bootstrap_servers, traffic_topic)
    assert skipped == 0
    by_id = {r.request_id: r for r in records}
    assert set(by_id) == {*(f"call-a#{i}" for i in range(4)), "call-p#0"}
    for i, score in enumerate(live):
        record = by_id[f"call-a#{i}"]
        assert record.version == "2" and record.score == pytest.approx(score, abs=1e-7)
        # the row the model saw, by name: a replay with frozen features scores it again
        assert list(record.features) == list(TEST_FEATURES)
        np.testing.assert_array_equal(np.array(list(record.features.values()), np.float32), rows[i])
    assert by_id["call-p#0"].score == pytest.approx(v2_scores(pinned)[0], abs=1e-7)
