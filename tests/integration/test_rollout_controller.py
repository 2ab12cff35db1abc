"""The rollout controller against a real redis-server, with two simulated processes.

Each 'process' is a ``StatsRecorder`` on its own connection pool; a fake routing
state applies the controller's actions (and re-windows the recorders, as the real
routing state will); the clock is injected, so minutes of hold time take no time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.rollout.controller import (
    DEFAULT_LEASE_KEY,
    ControllerOptions,
    RolloutController,
    RolloutMetrics,
)
from server.rollout.policy import (
    FULL_SHARE_BP,
    Advance,
    Promote,
    Rollback,
    RolloutPolicy,
    RolloutState,
    RolloutStep,
)
from server.rollout.stats import StatsRecorder
from server.router import Route

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T0 = 1_700_000_000.0
INTERVAL_S = 10.0
HOLD_S = 60.0
SHARES = (100, 500, 2500, 5000, FULL_SHARE_BP)
POLICY = RolloutPolicy(
    steps=tuple(RolloutStep(share_bp=bp, hold_s=HOLD_S) for bp in SHARES),
    min_requests=500,
    min_champion_requests=500,
    max_error_rate_ratio=2.0,
    error_rate_floor=0.001,
    max_p99_latency_ratio=1.5,
    max_psi=0.2,
    evaluation_interval_s=INTERVAL_S,
)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Call:
    action: str
    endpoint: str
    rollout_id: str
    reason: str
    numbers: dict[str, float]
    at: float
    share_bp: int | None = None


@dataclass
class FakeRouting:
    """Routing-state stand-in implementing ``RolloutActions``; records every call."""

    clock: FakeClock
    recorders: Sequence[StatsRecorder]
    states: dict[str, RolloutState] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    apply_changes: bool = True
    fail_next: int = 0

    def begin(self, state: RolloutState) -> None:
        self.states[state.endpoint] = state
        self._rewindow(state.endpoint)

    async def active(self) -> Sequence[RolloutState]:
        return list(self.states.values())

    def _rewindow(self, endpoint: str) -> None:
        state = self.states.get(endpoint)
        for recorder in self.recorders:
            recorder.set_window(endpoint, state.window() if state else None)

    def _check(self, endpoint: str, rollout_id: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("routing state store unavailable")
        assert self.states[endpoint].rollout_id == rollout_id

    async def set_canary_share(
        self,
        endpoint: str,
        share_bp: int,
        reason: str,
        numbers: Mapping[str, float],
        *,
        rollout_id: str,
    ) -> None:
        self._check(endpoint, rollout_id)
        now = self.clock()
        self.calls.append(
            Call("set_canary_share", endpoint, rollout_id, reason, dict(numbers), now, share_bp)
        )
        if self.apply_changes:
            self.states[endpoint] = dataclasses.replace(
                self.states[endpoint], share_bp=share_bp, step_started_at=now
            )
            self._rewindow(endpoint)

    async def promote(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        self._end("promote", endpoint, reason, numbers, rollout_id)

    async def rollback(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        self._end("rollback", endpoint, reason, numbers, rollout_id)

    def _end(
        self, action: str, endpoint: str, reason: str, numbers: Mapping[str, float], rid: str
    ) -> None:
        self._check(endpoint, rid)
        self.calls.append(Call(action, endpoint, rid, reason, dict(numbers), self.clock()))
        del self.states[endpoint]
        self._rewindow(endpoint)
        self.ended.set()


@dataclass(frozen=True)
class Behaviour:
    """How a version answers: every ``error_every``-th request fails; scores shift up."""

    error_every: int = 100
    latency_s: float = 0.002
    score_shift: float = 0.0


GOOD = Behaviour()


def serve(
    recorders: Sequence[StatsRecorder],
    rng: random.Random,
    state: RolloutState,
    canary: Behaviour,
    champion: Behaviour = GOOD,
    canary_n: int = 200,
    champion_n: int = 600,
) -> int:
    """One interval of traffic through every 'process'; returns canary requests sent."""
    sent = 0
    for recorder in recorders:
        jobs = [(state.canary, Route.CANARY, canary, canary_n)]
        if state.share_bp < FULL_SHARE_BP:
            jobs.append((state.champion, Route.CHAMPION, champion, champion_n))
        for version, route, behaviour, n in jobs:
            for i in range(n):
                ok = (i + 1) % behaviour.error_every != 0
                recorder.record(
                    state.endpoint,
                    version,
                    route,
                    ok=ok,
                    latency_s=behaviour.latency_s * rng.lognormvariate(0, 0.3),
                    score=min(1.0, rng.betavariate(1, 12) + behaviour.score_shift),
                )
        sent += canary_n
    return sent


def new_state(clock: FakeClock, rollout_id: str = "r1") -> RolloutState:
    return RolloutState("fraud", rollout_id, "1", "2", POLICY, SHARES[0], clock())


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[Redis]]:
    """Process A, process B, and a third connection for the controller / inspection."""
    made = [Redis.from_url(redis_url) for _ in range(3)]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def recorders(clients: list[Redis]) -> list[StatsRecorder]:
    return [StatsRecorder(clients[0]), StatsRecorder(clients[1])]


@pytest.fixture
def routing(clock: FakeClock, recorders: list[StatsRecorder]) -> FakeRouting:
    return FakeRouting(clock, recorders)


@pytest.fixture
def metrics() -> RolloutMetrics:
    return RolloutMetrics(CollectorRegistry())


@pytest.fixture
async def controller(
    clients: list[Redis], routing: FakeRouting, clock: FakeClock, metrics: RolloutMetrics
) -> AsyncIterator[RolloutController]:
    made = RolloutController(
        clients[2], routing, routing.active, metrics=metrics, clock=clock, holder_id="ctl-a"
    )
    try:
        yield made
    finally:
        await made.stop()


def sample(metrics: RolloutMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def flush_all(recorders: Sequence[StatsRecorder]) -> None:
    for recorder in recorders:
        assert await recorder.flush()


async def test_good_canary_walks_every_step_and_is_promoted(
    controller: RolloutController,
    routing: FakeRouting,
    recorders: list[StatsRecorder],
    clock: FakeClock,
    metrics: RolloutMetrics,
) -> None:
    routing.begin(new_state(clock))
    rng = random.Random(11)
    sent_in_step = 0
    advanced_with: list[float] = []
    for _ in range(100):
        if routing.ended.is_set():
            break
        state = routing.states["fraud"]
        # traffic varies per interval, so a window mixing steps would show in the counts
        sent_in_step += serve(recorders, rng, state, GOOD, canary_n=rng.randint(150, 260))
        await flush_all(recorders)
        clock.now += INTERVAL_S
        decision = (await controller.run_once()).get("fraud")
        assert not isinstance(decision, Rollback), decision.reason
        if isinstance(decision, Advance | Promote):
            advanced_with.append(decision.numbers["canary_requests"])
            # each step is judged on its own window: exactly this step's canary traffic
            assert decision.numbers["canary_requests"] == sent_in_step
            sent_in_step = 0
    assert controller.is_leader
    assert [c.action for c in routing.calls] == ["set_canary_share"] * 4 + ["promote"]
    assert [c.share_bp for c in routing.calls[:4]] == list(SHARES[1:])
    times = [T0, *(c.at for c in routing.calls)]
    assert all(b - a >= HOLD_S for a, b in itertools.pairwise(times))
    assert all(c.rollout_id == "r1" for c in routing.calls)
    assert "advancing to 500 bp" in routing.calls[0].reason
    promote = routing.calls[-1]
    assert "every step passed" in promote.reason
    assert promote.numbers["reference_is_history"] == 1.0  # 100%: champion had no traffic
    assert promote.numbers["psi"] < POLICY.max_psi
    assert len(advanced_with) == 5
    advances = sample(
        metrics, "streamscore_rollout_decisions_total", endpoint="fraud", decision="advance"
    )
    assert advances == 4
    last = {"endpoint": "fraud", "streamscore_rollout_last_decision": "promote"}
    assert sample(metrics, "streamscore_rollout_last_decision", **last) == 1
    assert sample(metrics, "streamscore_rollout_step", endpoint="fraud") == 4
    await controller.run_once()  # the next tick sees no rollout any more
    assert sample(metrics, "streamscore_rollout_step", endpoint="fraud") == -1
    assert sample(metrics, "streamscore_rollout_canary_share_bp", endpoint="fraud") == 0


@pytest.mark.parametrize(
    ("canary", "check", "words"),
    [
        (Behaviour(error_every=20), "error_rate", "error-rate ratio 5.00 > 2.00"),
        (Behaviour(score_shift=0.15), "psi", "score PSI"),
        (Behaviour(latency_s=0.008), "p99_latency", "p99 latency ratio"),
    ],
    ids=["errors", "scores", "latency"],
)
async def test_bad_canary_is_rolled_back_with_the_tripping_numbers(
    controller: RolloutController,
    routing: FakeRouting,
    recorders: list[StatsRecorder],
    clock: FakeClock,
    metrics: RolloutMetrics,
    canary: Behaviour,
    check: str,
    words: str,
) -> None:
    routing.begin(new_state(clock))
    rng = random.Random(12)
    for _ in range(10):
        if routing.ended.is_set():
            break
        serve(recorders, rng, routing.states["fraud"], canary=canary)
        await flush_all(recorders)
        clock.now += INTERVAL_S
        await controller.run_once()
    assert [c.action for c in routing.calls] == ["rollback"]
    rollback = routing.calls[0]
    assert words in rollback.reason
    assert rollback.at - T0 < HOLD_S  # pulled as soon as min_requests allowed a judgement
    assert rollback.numbers["canary_requests"] >= POLICY.min_requests
    measured = {"error_rate": "error_rate_ratio", "psi": "psi", "p99_latency": "p99_latency_ratio"}
    limit = {"error_rate": 2.0, "psi": 0.2, "p99_latency": 1.5}[check]
    value = rollback.numbers[measured[check]]
    assert value > limit
    assert f"{value:.2f}" in rollback.reason
    breaches = sample(metrics, "streamscore_rollout_breaches_total", endpoint="fraud", check=check)
    assert breaches == 1
    observed = sample(
        metrics, "streamscore_rollout_observed", endpoint="fraud", check=measured[check]
    )
    assert observed == pytest.approx(value)
    assert recorders[0].window("fraud") is None  # the routing state stopped the counting


async def test_one_leader_at_a_time(
    clients: list[Redis], routing: FakeRouting, recorders: list[StatsRecorder], clock: FakeClock
) -> None:
    options = ControllerOptions(tick_s=1.0, lease_ttl_s=30.0)
    a = RolloutController(clients[0], routing, routing.active, options=options, holder_id="a")
    b = RolloutController(clients[1], routing, routing.active, options=options, holder_id="b")
    try:
        routing.begin(new_state(clock))
        held = await b.run_once(T0)
        assert b.is_leader  # b came first and took the lease
        assert "canary has 0 of 500" in held["fraud"].reason
        bad = Behaviour(error_every=10)
        serve(recorders, random.Random(13), routing.states["fraud"], bad, canary_n=300)
        await flush_all(recorders)
        assert await a.run_once(T0 + 1) == {}
        assert not a.is_leader
        await b.stop()  # gives the lease up
        assert await clients[2].get(DEFAULT_LEASE_KEY) is None
        decisions = await a.run_once(T0 + 2)
        assert a.is_leader
        assert isinstance(decisions["fraud"], Rollback)
        # someone else holds the key now (our lease expired and was taken): we stop acting
        await clients[2].set(DEFAULT_LEASE_KEY, "c")
        routing.begin(new_state(clock, "r2"))
        assert await a.run_once(T0 + 100) == {}
        assert not a.is_leader
        assert [c.action for c in routing.calls] == ["rollback"]
    finally:
        await a.stop()
        await b.stop()
    assert await clients[2].get(DEFAULT_LEASE_KEY) == b"c"  # a never deletes another's lease


async def test_an_action_is_applied_once_per_state_and_retried_after_a_failure(
    controller: RolloutController,
    routing: FakeRouting,
    recorders: list[StatsRecorder],
    clock: FakeClock,
    metrics: RolloutMetrics,
) -> None:
    routing.begin(new_state(clock))
    serve(recorders, random.Random(14), routing.states["fraud"], GOOD, canary_n=300)
    await flush_all(recorders)
    routing.fail_next = 1
    first = await controller.run_once(T0 + HOLD_S)
    assert isinstance(first["fraud"], Advance)
    assert routing.calls == []  # the callback raised
    assert sample(metrics, "streamscore_rollout_failures_total", stage="action") == 1
    assert await controller.run_once(T0 + HOLD_S + 1) == {}  # not due before the interval
    routing.apply_changes = False  # the routing state lags behind the action
    for tick in range(1, 4):
        await controller.run_once(T0 + HOLD_S + tick * INTERVAL_S)
    assert [c.share_bp for c in routing.calls] == [500]


async def test_background_loop_acts_and_releases_the_lease_on_stop(
    clients: list[Redis], routing: FakeRouting, recorders: list[StatsRecorder], clock: FakeClock
) -> None:
    routing.begin(new_state(clock))
    bad = Behaviour(error_every=10)
    serve(recorders, random.Random(15), routing.states["fraud"], bad, canary_n=300)
    await flush_all(recorders)
    controller = RolloutController(
        clients[2],
        routing,
        routing.active,
        options=ControllerOptions(tick_s=0.02, lease_ttl_s=1.0),
        clock=clock,
    )
    await controller.start()
    try:
        async with asyncio.timeout(10):
            await routing.ended.wait()
    finally:
        await controller.stop()
    assert [c.action for c in routing.calls] == ["rollback"]
    assert await clients[2].get(DEFAULT_LEASE_KEY) is None
