"""Drift monitoring end to end: two server processes (AppContexts) share one Redis.

Traffic drawn from the reference gives PSI < 0.02 on every feature and the score;
a stream with one feature shifted crosses the threshold and yields exactly ONE
drift event per breach episode (Kafka ``drift.topic`` and the audit log), even
though both processes judge windows; the gauges are exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import generate_latest

from devstack.services import KafkaBroker
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.admin.cli import format_drift
from server.clients.replay import read_topic_values
from server.governance.profile import SCORE
from server.routing.store import RedisRoutingStore
from server.settings import RoutingSettings
from tests.conftest import TEST_FEATURES
from tests.support.admin import CREDENTIALS, TOKEN
from tests.support.drift import draw, write_reference_profile
from tests.support.model_factory import write_linear_model
from tests.support.server import RunningServer, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPIC = "streamscore-drift-test"


def repository_with_profile(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    version_dir, weights, bias = write_linear_model(repository, "lin", "1", TEST_FEATURES, seed=3)
    profile = write_reference_profile(version_dir, weights, bias)
    assert profile.distributions["f7"].categories is not None
    return repository


def infer(rows: npt.NDArray[np.float32]) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="lin")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


class Traffic:
    """Sends 64-row v2 batches to both servers, alternately, with a settable shift."""

    def __init__(self, servers: list[RunningServer]) -> None:
        self.servers = servers
        self.shift = 0.0
        self.sent = 0
        self._rng = np.random.default_rng(7)

    async def run(self) -> None:
        i = 0
        while True:
            server = self.servers[i % len(self.servers)]
            await server.inference.ModelInfer(infer(draw(self._rng, 64, shift=self.shift)))
            self.sent += 64
            i += 1
            await asyncio.sleep(0.002)


async def wait_for(check: Callable[[], object], timeout_s: float, what: str) -> None:
    until = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def two_servers(
    repository: Path, redis_url: str, kafka: KafkaBroker
) -> AsyncIterator[list[RunningServer]]:
    overrides = [
        "routing.store=redis",
        f"redis.url={redis_url}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
        "drift.bucket_s=1",
        "drift.short_window_buckets=2",
        "drift.long_window_buckets=4",
        "drift.flush_interval_s=0.1",
        "drift.evaluate_interval_s=0.1",
        "drift.grace_s=0.3",
        "drift.defaults.consecutive=2",
        "drift.defaults.min_rows=200",
        f"drift.topic={TOPIC}",
        f"server.admin_token={TOKEN}",
    ]
    async with (
        running_server(repository, overrides) as one,
        running_server(repository, overrides) as two,
    ):
        yield [one, two]


def judged(servers: list[RunningServer]) -> int:
    """The newest bucket every process has looked at."""
    marks = []
    for server in servers:
        assert server.app.drift is not None
        version = server.app.drift._versions[("lin", "1")]
        marks.append(version.last_judged if version.last_judged is not None else -1)
    return min(marks)


async def drift_audit(redis_url: str) -> list[dict[str, object]]:
    from redis.asyncio import Redis

    settings = RoutingSettings()
    client = Redis.from_url(redis_url)
    try:
        store = RedisRoutingStore(client, settings.redis_key, settings.audit_key)
        entries = await store.audit("lin", 1000)
    finally:
        await client.aclose()
    return [dict(e.detail or {}) for e in entries if e.action == "drift"]


async def test_reference_traffic_is_quiet_and_a_shift_gives_one_event_per_episode(
    tmp_path: Path, redis_url: str, kafka: KafkaBroker
) -> None:
    repository = repository_with_profile(tmp_path)
    async with two_servers(repository, redis_url, kafka) as servers:
        traffic = Traffic(servers)
        sender = asyncio.create_task(traffic.run())
        try:
            monitors = [s.app.drift for s in servers]
            assert all(m is not None for m in monitors)

            def view_rows() -> int:
                view = monitors[0].view("lin", "1") if monitors[0] else None
                return view.short.rows if view else 0

            # 1. reference traffic: every column quiet, counts merged from both processes
            await wait_for(lambda: view_rows() >= 4000, 30, "4000 rows in the short window")
            view = monitors[0].view("lin", "1") if monitors[0] else None
            assert view is not None
            psi = {c.name: c.psi for c in view.short.columns}
            assert set(psi) == {*TEST_FEATURES, SCORE}
            assert max(psi.values()) < 0.02, psi
            f7 = next(c for c in view.short.columns if c.name == "f7")
            assert f7.js is not None and f7.js < 0.01
            assert view.open_breaches == ()
            scraped = generate_latest(servers[1].app.metrics.registry).decode()
            for name in (
                'streamscore_drift_psi{feature="f0",model="lin",version="1"}',
                'streamscore_drift_score_psi{model="lin",version="1"}',
                'streamscore_drift_js{feature="f7",model="lin",version="1"}',
                'streamscore_drift_defaulted_share{feature="f0",model="lin",version="1"}',
            ):
                assert name in scraped, name
            assert await drift_audit(redis_url) == []

            # 2. shifted f0: one event, and still one after more windows over the threshold
            traffic.shift = 3.0

            async def f0_events() -> int:
                return sum(1 for d in await drift_audit(redis_url) if d["feature"] == "f0")

            until = time.monotonic() + 30
            while await f0_events() < 1:
                assert time.monotonic() < until, "no drift event for the shifted feature"
                await asyncio.sleep(0.1)
            mark = judged(servers)
            await wait_for(lambda: judged(servers) >= mark + 4, 30, "four more judged windows")
            assert await f0_events() == 1
            for monitor in monitors:
                assert monitor is not None
                seen = monitor.view("lin", "1")
                assert seen is not None and "f0" in seen.open_breaches
            listed = await apb_grpc.AdminStub(servers[0].channel).ListModels(
                apb.ListModelsRequest(endpoint="lin"), metadata=CREDENTIALS, timeout=10
            )
            (version,) = listed.models[0].versions
            drift = version.drift
            assert drift.monitored and "f0" in drift.breaching
            assert drift.short_window.window_s == 2 and drift.long_window.window_s == 4
            features = {f.feature: f for f in drift.short_window.features}
            assert features["f0"].psi > 0.2 and features["f1"].psi < 0.05
            assert features["f7"].HasField("js") and not features["f0"].HasField("js")
            text = format_drift(listed)
            assert "lin/1  breaching " in text and "f0" in text

            # 3. back to the reference closes the episode; a new shift is a new episode
            traffic.shift = 0.0

            def closed() -> bool:
                views = [m.view("lin", "1") if m else None for m in monitors]
                return all(v is not None and "f0" not in v.open_breaches for v in views)

            await wait_for(closed, 30, "the breach episode to close")
            assert await f0_events() == 1
            traffic.shift = -3.0
            until = time.monotonic() + 30
            while await f0_events() < 2:
                assert time.monotonic() < until, "no event for the second episode"
                await asyncio.sleep(0.1)
            mark = judged(servers)
            await wait_for(lambda: judged(servers) >= mark + 3, 30, "three more judged windows")
            assert await f0_events() == 2
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        for server in servers:
            assert server.app.record_sink is not None
            await server.app.record_sink.flush(5.0)

    events = [json.loads(v) for v in await read_topic_values(kafka.bootstrap_servers, TOPIC)]
    f0 = [e for e in events if e["feature"] == "f0"]
    assert len(f0) == 2, events
    assert f0[0]["psi"] > 0.2 and f0[0]["model"] == "lin" and f0[0]["version"] == "1"


async def test_a_lone_callers_answers_are_all_counted(tmp_path: Path, redis_url: str) -> None:
    """One caller at a time takes the batcher's idle fast path: its rows count too."""
    from redis.asyncio import Redis

    repository = repository_with_profile(tmp_path)
    overrides = [
        "routing.store=redis",
        f"redis.url={redis_url}",
        "drift.flush_interval_s=60",  # flushed by the test only
        "drift.grace_s=60",
    ]
    rng = np.random.default_rng(11)
    async with running_server(repository, overrides) as server:
        for _ in range(40):
            await server.inference.ModelInfer(infer(draw(rng, 1)))
        monitor = server.app.drift
        assert monitor is not None
        assert await monitor.flush()
        version = monitor._versions[("lin", "1")]
        client = Redis.from_url(redis_url)
        try:
            counts = await version.read_window(client, int(time.time() // 60), 2)
        finally:
            await client.aclose()
    assert int(counts[-1]) == 40


async def test_a_final_bucket_is_read_once_then_kept_summed(tmp_path: Path, redis_url: str) -> None:
    """An evaluation reads from Redis only the buckets not yet final: one closed
    ``grace_s`` ago is kept summed (gone from Redis, it still counts); a recent one is
    read again every round (its flushes keep changing it)."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from server.drift.metrics import DriftMetrics
    from server.drift.monitor import DriftMonitor
    from server.manifest import ModelManifest
    from server.settings import DriftSettings

    version_dir, weights, bias = write_linear_model(tmp_path, "cached", "1", TEST_FEATURES)
    write_reference_profile(version_dir, weights, bias, rows=2000)
    settings = DriftSettings(
        bucket_s=1,
        short_window_buckets=2,
        long_window_buckets=4,
        flush_interval_s=0.5,
        grace_s=0.5,  # the test flushes itself: a bucket is final half a second after
    )
    now = [100.5]
    client = Redis.from_url(redis_url)
    try:
        registry = DriftMetrics(CollectorRegistry())
        monitor = DriftMonitor(settings, client, registry, clock=lambda: now[0])
        drift = monitor.attach(version_dir, ModelManifest.read(version_dir), TEST_FEATURES)
        assert drift is not None
        rng = np.random.default_rng(3)

        async def send(rows: int) -> None:
            probabilities = rng.random((rows, 2)).astype(np.float32)
            drift.observe(draw(rng, rows), {"probabilities": probabilities}, [])
            assert await monitor.flush()

        def long_rows() -> int:
            view = monitor.view("cached", "1")
            assert view is not None
            return view.long.rows

        await send(10)  # bucket 100
        now[0] = 102.5  # bucket 100 is final, 102 is the current one
        await monitor.evaluate()
        assert long_rows() == 10
        await client.delete(f"{drift.key}:b:100")
        await send(5)  # bucket 102
        await monitor.evaluate()
        assert long_rows() == 15  # 100 from the cache, 102 read
        await send(5)  # bucket 102 again: this process's field grows to 10
        await monitor.evaluate()
        assert long_rows() == 20
    finally:
        await client.aclose()


async def test_a_fold_during_the_flush_write_is_flushed_and_a_failed_write_is_kept(
    tmp_path: Path, redis_url: str
) -> None:
    """The dirty flags of a flush are taken before it awaits Redis: rows folded while the
    write is on the wire mark their bucket again and reach Redis at the next flush (the
    flags cleared after the await lost them: nothing else would send that bucket after
    its rollover). A write that fails keeps the flags: the next flush sends them."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from server.drift.metrics import DriftMetrics
    from server.drift.monitor import DriftMonitor
    from server.manifest import ModelManifest
    from server.settings import DriftSettings
    from tests.conftest import free_port

    version_dir, weights, bias = write_linear_model(tmp_path, "flags", "1", TEST_FEATURES)
    write_reference_profile(version_dir, weights, bias, rows=2000)
    now = [1_000.5]  # in bucket 16 of 60 s
    client = Redis.from_url(redis_url)
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        monitor = DriftMonitor(
            DriftSettings(), client, DriftMetrics(CollectorRegistry()), clock=lambda: now[0]
        )
        drift = monitor.attach(version_dir, ModelManifest.read(version_dir), TEST_FEATURES)
        assert drift is not None
        rng = np.random.default_rng(5)

        def fold(rows: int) -> None:
            probabilities = rng.random((rows, 2)).astype(np.float32)
            drift.observe(draw(rng, rows), {"probabilities": probabilities}, [])
            drift.fold()

        async def rows_in_redis(bucket: int) -> int:
            return int((await drift.read_window(client, bucket, 1))[-1])

        fold(10)
        flushing = asyncio.create_task(drift.flush(client, "p1"))
        await asyncio.sleep(0)  # the flush runs up to its first wait: Redis's answer
        assert not flushing.done()
        fold(7)  # folded while the write of the first 10 is on the wire
        await flushing
        assert await rows_in_redis(16) == 10  # the write carried the vector it was given
        now[0] += 120  # rollover: nothing folds into bucket 16 any more
        await drift.flush(client, "p1")
        assert await rows_in_redis(16) == 17  # marked again by the fold, so sent

        fold(3)  # bucket 18
        with pytest.raises((RedisConnectionError, OSError)):
            await drift.flush(down, "p1")
        assert await rows_in_redis(18) == 0
        await drift.flush(client, "p1")  # the failed write's flags were kept
        assert await rows_in_redis(18) == 3
    finally:
        await client.aclose()
        await down.aclose()


async def test_a_flush_folds_behind_the_next_answer_or_alone_when_idle(
    tmp_path: Path, redis_url: str
) -> None:
    """The periodic flush does not fold in the middle of traffic: it waits for the next
    answered request and folds right after it; with no request coming it folds alone.
    Every row reaches Redis either way."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from server.batcher import BatchPolicy, MicroBatcher
    from server.drift.metrics import DriftMetrics
    from server.drift.monitor import DriftMonitor
    from server.executor import Job, JobResult, VersionBatchRunner
    from server.features import FeatureLayout
    from server.manifest import ModelManifest
    from server.runtime import RuntimeOptions, load_version
    from server.settings import DriftSettings

    version_dir, weights, bias = write_linear_model(tmp_path, "lin", "1", TEST_FEATURES)
    write_reference_profile(version_dir, weights, bias, rows=2000)
    manifest = ModelManifest.read(version_dir)
    client = Redis.from_url(redis_url)
    model = load_version(version_dir, RuntimeOptions())
    monitor = DriftMonitor(
        DriftSettings(), client, DriftMetrics(CollectorRegistry()), clock=lambda: 120.0
    )
    drift = monitor.attach(version_dir, manifest, TEST_FEATURES)
    assert drift is not None
    events: list[str] = []
    fold = drift.fold

    def recorded_fold() -> None:
        if drift.pending_rows:  # a fold with rows to fold
            events.append("fold")
        fold()

    drift.fold = recorded_fold  # type: ignore[method-assign]
    runner = VersionBatchRunner(
        model, FeatureLayout.from_manifest(manifest), None, "degrade", on_batch=drift.observe
    )
    batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
        "lin/1", runner.run, BatchPolicy(lone_probe_interval_s=3600.0), run_now=runner.run_now
    )
    rng = np.random.default_rng(8)

    async def ask() -> None:
        await batcher.submit(Job(rows=draw(rng, 1)))
        events.append("answer")

    async def stored_rows() -> int:
        return int((await drift.read_window(client, 2, 1))[-1])

    try:
        for _ in range(5):
            await ask()
        await asyncio.sleep(0.01)
        events.clear()
        flushing = asyncio.create_task(monitor.flush(fold_wait_s=30.0))
        await asyncio.sleep(0.05)
        assert events == []  # waiting for an answer to fold behind
        await ask()
        assert await asyncio.wait_for(flushing, 5.0)
        assert events == ["answer", "fold"]
        assert await stored_rows() == 6

        await ask()
        await asyncio.sleep(0.01)
        started = time.monotonic()
        assert await monitor.flush(fold_wait_s=0.2)  # no request comes: folds alone
        assert 0.2 <= time.monotonic() - started < 2.0
        assert await stored_rows() == 7
    finally:
        await batcher.close()
        model.close()
        await client.aclose()
