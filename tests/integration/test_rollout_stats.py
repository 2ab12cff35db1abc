"""Rollout statistics against a real redis-server: per-process counts summed exactly."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from devstack.services import redis_server
from server.rollout.policy import (
    LATENCY_BUCKETS,
    SCORE_BINS,
    RolloutPolicy,
    RolloutState,
    RolloutStep,
    StepWindow,
    WindowStats,
    latency_bucket,
    score_bin,
)
from server.rollout.stats import (
    StatsRecorder,
    read_observation,
    stats_from_hash,
    stats_key,
)
from server.router import Route
from tests.support.readers import read_stats

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

POLICY = RolloutPolicy(
    steps=(RolloutStep(share_bp=100, hold_s=10), RolloutStep(share_bp=5000, hold_s=10))
)


def window(step: int = 0) -> StepWindow:
    return StepWindow("fraud", "r1", step, champion="1", canary="2")


class Reference:
    """The same samples folded naively, to compare Redis's sums with."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.latency = [0] * LATENCY_BUCKETS
        self.scores = [0] * SCORE_BINS

    def add(self, ok: bool, latency_s: float, score: float) -> None:
        self.requests += 1
        self.latency[latency_bucket(latency_s)] += 1
        if ok:
            self.scores[score_bin(score)] += 1
        else:
            self.errors += 1

    def stats(self) -> WindowStats:
        return WindowStats(self.requests, self.errors, tuple(self.latency), tuple(self.scores))


def feed(
    recorder: StatsRecorder,
    rng: random.Random,
    n: int,
    version: str,
    route: Route,
    reference: Reference | None,
) -> None:
    for _ in range(n):
        ok = rng.random() > 0.05
        latency = rng.lognormvariate(-6, 0.5)
        score = rng.random()
        recorder.record("fraud", version, route, ok=ok, latency_s=latency, score=score)
        if reference is not None:
            reference.add(ok, latency, score)


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[Redis, Redis, Redis]]:
    """Two 'processes' and a reader, each with its own connection pool."""
    made = [Redis.from_url(redis_url) for _ in range(3)]
    try:
        yield made[0], made[1], made[2]
    finally:
        for client in made:
            await client.aclose()


async def test_two_processes_sum_exactly(clients: tuple[Redis, Redis, Redis]) -> None:
    first, second, reader = clients
    recorders = [StatsRecorder(first), StatsRecorder(second)]
    canary, champion = Reference(), Reference()
    rng = random.Random(1)
    for recorder in recorders:
        recorder.set_window("fraud", window())
    for _ in range(3):  # several flushes per process: HINCRBY accumulates
        for recorder in recorders:
            feed(recorder, rng, 200, "2", Route.CANARY, canary)
            feed(recorder, rng, 700, "1", Route.CHAMPION, champion)
            assert await recorder.flush()
            assert recorder.pending_requests() == 0
    state = RolloutState("fraud", "r1", "1", "2", POLICY, 100, 0.0)
    observed = await read_observation(reader, state)
    assert observed.canary == canary.stats()
    assert observed.champion == champion.stats()
    assert observed.champion_history == champion.stats()
    assert observed.canary.requests == 1200
    assert observed.canary.errors > 0


async def test_only_rollout_traffic_is_counted(clients: tuple[Redis, Redis, Redis]) -> None:
    first, _, reader = clients
    recorder = StatsRecorder(first)
    recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.5)
    assert recorder.pending_requests() == 0  # no window yet
    recorder.set_window("fraud", window())
    recorder.record("fraud", "2", Route.PINNED, ok=True, latency_s=0.001, score=0.5)
    recorder.record("fraud", "3", Route.CANARY, ok=True, latency_s=0.001, score=0.5)
    recorder.record("fraud", "2", Route.CHAMPION, ok=True, latency_s=0.001, score=0.5)
    recorder.record("other", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.5)
    assert recorder.pending_requests() == 0
    recorder.record("fraud", "2", Route.CANARY, ok=False, latency_s=0.001, score=0.5)
    recorder.record("fraud", "1", Route.CHAMPION, ok=True, latency_s=0.001, score=0.5)
    assert recorder.pending_requests() == 2
    recorder.set_window("fraud", None)
    recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.5)
    assert await recorder.flush()
    canary, champion = await read_stats(reader, "fraud", "r1", [0], "2") + await read_stats(
        reader, "fraud", "r1", [0], "1"
    )
    assert (canary.requests, canary.errors, canary.scored) == (1, 1, 0)
    assert (champion.requests, champion.errors, champion.scored) == (1, 0, 1)


async def test_each_step_starts_fresh_and_history_sums_the_champion(
    clients: tuple[Redis, Redis, Redis],
) -> None:
    first, _, reader = clients
    recorder = StatsRecorder(first, key_ttl_s=3600)
    recorder.set_window("fraud", window(0))
    for _ in range(10):
        recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.1)
        recorder.record("fraud", "1", Route.CHAMPION, ok=True, latency_s=0.001, score=0.1)
    recorder.set_window("fraud", window(1))
    for _ in range(3):
        recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.1)
        recorder.record("fraud", "1", Route.CHAMPION, ok=True, latency_s=0.001, score=0.1)
    assert await recorder.flush()
    observed = await read_observation(
        reader, RolloutState("fraud", "r1", "1", "2", POLICY, 5000, 0.0)
    )
    assert observed.canary.requests == 3
    assert observed.champion.requests == 3
    assert observed.champion_history.requests == 13
    key = stats_key("fraud", "r1", 1, "2")
    assert key == "streamscore:rollout:v1:{fraud:r1}:1:2"
    assert 0 < await reader.ttl(key) <= 3600
    raw = await reader.hgetall(key)
    assert raw[b"requests"] == b"3"
    assert b"errors" not in raw  # zero counters are not written
    assert stats_from_hash(raw) == observed.canary


async def test_counts_survive_a_redis_outage() -> None:
    failures: list[BaseException] = []
    with redis_server() as server:
        client = Redis.from_url(server.url)
        try:
            recorder = StatsRecorder(client, on_flush_failure=failures.append)
            recorder.set_window("fraud", window())
            for _ in range(5):
                recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.2)
            assert await recorder.flush()
            server.stop()
            for _ in range(7):
                recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.2)
            assert not await recorder.flush()
            assert len(failures) == 1
            recorder.record("fraud", "2", Route.CANARY, ok=False, latency_s=0.001)
            assert recorder.pending_requests() == 8
            server.restart()  # no persistence: the first 5 are gone with the old process
            assert await recorder.flush()
            (stats,) = await read_stats(client, "fraud", "r1", [0], "2")
            assert (stats.requests, stats.errors, stats.scored) == (8, 1, 7)
        finally:
            await client.aclose()


async def test_background_flush_and_final_flush_on_stop(
    clients: tuple[Redis, Redis, Redis],
) -> None:
    first, _, reader = clients
    flushed = asyncio.Event()
    recorder = StatsRecorder(first, flush_interval_s=0.05, on_flushed=lambda n: flushed.set())
    recorder.set_window("fraud", window())
    await recorder.start()
    try:
        recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.2)
        async with asyncio.timeout(5):
            await flushed.wait()
        assert (await read_stats(reader, "fraud", "r1", [0], "2"))[0].requests == 1
        recorder.record("fraud", "2", Route.CANARY, ok=True, latency_s=0.001, score=0.2)
    finally:
        await recorder.stop()
    await recorder.stop()  # idempotent
    assert (await read_stats(reader, "fraud", "r1", [0], "2"))[0].requests == 2
