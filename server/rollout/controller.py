"""The rollout controller: one process at a time judges every active canary rollout.

Every server process runs a :class:`RolloutController`; only the holder of a Redis
lease acts. Each tick (``tick_s``) a process:

1. reads the active rollouts from the routing state (``rollouts`` callable) and
   exports their step/share gauges (every process, leader or not);
2. takes or renews the lease: ``SET <lease_key> <holder id> NX PX <ttl>`` to take
   it, a compare-and-``PEXPIRE`` script to renew it, compare-and-``DEL`` on stop.
   A holder that stalls past the TTL loses it; the routing-state callbacks must
   therefore be conditional on ``rollout_id`` (and may check the current share)
   so that a late action of a former leader is refused, not applied twice;
3. as leader, for each rollout whose ``policy.evaluation_interval_s`` has passed,
   reads the summed statistics (``server.rollout.stats.read_observation``), calls
   :func:`server.rollout.policy.evaluate` with ``now`` from the injected clock and applies
   the decision through :class:`RolloutActions`.

A decision is applied at most once per observed state (rollout id, share and the
time that share took effect): until the routing state shows the change, the
controller waits rather than repeating it. A failing callback is retried at the
next evaluation. Errors never stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import Enum as EnumMetric
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import RedisError

from feature_streams.redis_client import AnyRedis
from server.rollout.policy import (
    Advance,
    Decision,
    Hold,
    Promote,
    Rollback,
    RolloutState,
    evaluate,
)
from server.rollout.stats import KEY_PREFIX, read_observation

logger = logging.getLogger(__name__)

DEFAULT_LEASE_KEY = f"{KEY_PREFIX}:leader"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RolloutActions(Protocol):
    """What the routing-state API offers the controller; each call is audit-logged there.

    ``numbers`` are the measurements behind the decision (see ``server.rollout.policy.evaluate``).
    Implementations must refuse (raise or no-op) a call whose ``rollout_id`` is not the
    endpoint's active rollout any more.
    """

    async def set_canary_share(
        self,
        endpoint: str,
        share_bp: int,
        reason: str,
        numbers: Mapping[str, float],
        *,
        rollout_id: str,
    ) -> None:
        """Move the canary to ``share_bp`` and stamp when the share took effect."""

    async def promote(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        """Make the canary the champion and end the rollout."""

    async def rollback(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        """Give the canary no traffic and end the rollout."""


RolloutSource = Callable[[], Awaitable[Sequence[RolloutState]]]


class ControllerOptions(BaseModel):
    """Timing of the controller loop and its leader lease."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tick_s: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="Loop period.")
    lease_ttl_s: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="Leader lease lifetime."
    )
    lease_key: str = Field(default=DEFAULT_LEASE_KEY, min_length=1, description="Lease key.")

    @model_validator(mode="after")
    def _renewed_in_time(self) -> ControllerOptions:
        if self.lease_ttl_s < 3 * self.tick_s:
            raise ValueError(
                f"lease_ttl_s ({self.lease_ttl_s}) must be at least 3 x tick_s ({self.tick_s})"
            )
        return self


_DECISION_KINDS = ("none", Hold.kind, Advance.kind, Promote.kind, Rollback.kind)
_OBSERVED = ("error_rate_ratio", "p99_latency_ratio", "psi")


class RolloutMetrics:
    """Prometheus families of rollouts, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.step = Gauge(
            "streamscore_rollout_step",
            "Current step index of the endpoint's canary rollout; -1 = no rollout.",
            ["endpoint"],
            registry=registry,
        )
        self.share = Gauge(
            "streamscore_rollout_canary_share_bp",
            "Canary share of the endpoint's rollout, basis points; 0 = no rollout.",
            ["endpoint"],
            registry=registry,
        )
        self.last_decision = EnumMetric(
            "streamscore_rollout_last_decision",
            "Last decision of the rollout controller for the endpoint (leader only).",
            ["endpoint"],
            states=list(_DECISION_KINDS),
            registry=registry,
        )
        self.decisions = Counter(
            "streamscore_rollout_decisions",
            "Rollout decisions by endpoint and kind (leader only).",
            ["endpoint", "decision"],
            registry=registry,
        )
        self.breaches = Counter(
            "streamscore_rollout_breaches",
            "Guard breaches that rolled a canary back, by endpoint and check.",
            ["endpoint", "check"],
            registry=registry,
        )
        self.observed = Gauge(
            "streamscore_rollout_observed",
            "Last measured guard value (canary vs champion) by endpoint and check.",
            ["endpoint", "check"],
            registry=registry,
        )
        self.leader = Gauge(
            "streamscore_rollout_leader",
            "1 while this process holds the rollout controller lease.",
            registry=registry,
        )
        self.failures = Counter(
            "streamscore_rollout_failures",
            "Rollout controller or stats failures, by stage (lease, evaluate, action, flush).",
            ["stage"],
            registry=registry,
        )
        self._endpoints: set[str] = set()

    def observe_states(self, states: Sequence[RolloutState]) -> None:
        """Step and share of every active rollout; endpoints without one go to -1/0."""
        current = {s.endpoint for s in states}
        for endpoint in self._endpoints - current:
            self.step.labels(endpoint).set(-1)
            self.share.labels(endpoint).set(0)
        for state in states:
            self.step.labels(state.endpoint).set(state.step)
            self.share.labels(state.endpoint).set(state.share_bp)
        self._endpoints |= current

    def observe_decision(self, endpoint: str, decision: Decision) -> None:
        """Count a decision and export what it measured."""
        self.last_decision.labels(endpoint).state(decision.kind)
        self.decisions.labels(endpoint, decision.kind).inc()
        for check in _OBSERVED:
            value = decision.numbers.get(check)
            if value is not None:
                self.observed.labels(endpoint, check).set(value)
        if isinstance(decision, Rollback):
            for breach in decision.breaches:
                self.breaches.labels(endpoint, breach.check).inc()

    def failed(self, stage: str) -> None:
        """Count one failure of ``stage``."""
        self.failures.labels(stage).inc()

    def flush_failed(self, exc: BaseException) -> None:
        """``StatsRecorder(on_flush_failure=...)`` hook."""
        self.failed("flush")


def _holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


_StateKey = tuple[str, int, float]


class RolloutController:
    """Evaluates every active rollout each interval, in the one process holding the lease.

    Does not own ``redis``. ``clock`` gives the ``now`` passed to the policy (seconds,
    the same clock the routing state stamps ``step_started_at`` with).
    """

    def __init__(
        self,
        redis: AnyRedis,
        actions: RolloutActions,
        rollouts: RolloutSource,
        *,
        options: ControllerOptions | None = None,
        metrics: RolloutMetrics | None = None,
        clock: Callable[[], float] = time.time,
        holder_id: str | None = None,
    ) -> None:
        self._redis = redis
        self._actions = actions
        self._rollouts = rollouts
        self._options = options or ControllerOptions()
        self._metrics = metrics
        self._clock = clock
        self.holder_id = holder_id or _holder_id()
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._leader = False
        self._last_evaluated: dict[tuple[str, str], float] = {}
        self._acted: dict[str, _StateKey] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        """True while this controller holds the lease (as of its last tick)."""
        return self._leader

    async def run_once(self, now: float | None = None) -> dict[str, Decision]:
        """One tick; returns the decisions taken by endpoint (empty when not leader)."""
        now = self._clock() if now is None else now
        states = await self._rollouts()
        if self._metrics is not None:
            self._metrics.observe_states(states)
        if not await self._hold_lease():
            return {}
        active = {(s.endpoint, s.rollout_id) for s in states}
        for key in set(self._last_evaluated) - active:
            del self._last_evaluated[key]
        decisions: dict[str, Decision] = {}
        for state in states:
            decision = await self._tick_rollout(state, now)
            if decision is not None:
                decisions[state.endpoint] = decision
        return decisions

    async def _tick_rollout(self, state: RolloutState, now: float) -> Decision | None:
        key = (state.endpoint, state.rollout_id)
        state_key: _StateKey = (state.rollout_id, state.share_bp, state.step_started_at)
        if self._acted.get(state.endpoint) == state_key:
            return None  # our last action is not visible in the routing state yet
        last = self._last_evaluated.get(key)
        if last is not None and now - last < state.policy.evaluation_interval_s:
            return None
        self._last_evaluated[key] = now
        try:
            observed = await read_observation(self._redis, state)
            decision = evaluate(state, observed, now)
        except (RedisError, OSError, ValueError):
            logger.exception("rollout evaluation failed", extra={"endpoint": state.endpoint})
            self._failed("evaluate")
            return None
        if self._metrics is not None:
            self._metrics.observe_decision(state.endpoint, decision)
        if isinstance(decision, Hold):
            logger.debug(
                "rollout hold",
                extra={"endpoint": state.endpoint, "reason": decision.reason},
            )
            return decision
        try:
            await self._apply(state, decision)
        except Exception:
            logger.exception(
                "rollout action failed; retrying at the next evaluation",
                extra={"endpoint": state.endpoint, "decision": decision.kind},
            )
            self._failed("action")
            return decision
        self._acted[state.endpoint] = state_key
        return decision

    async def _apply(self, state: RolloutState, decision: Advance | Promote | Rollback) -> None:
        endpoint, numbers = state.endpoint, dict(decision.numbers)
        extra = {
            "endpoint": endpoint,
            "rollout_id": state.rollout_id,
            "canary": state.canary,
            "champion": state.champion,
            "decision": decision.kind,
            "reason": decision.reason,
            "numbers": numbers,
        }
        if isinstance(decision, Rollback):
            logger.warning("rolling canary back", extra=extra)
            await self._actions.rollback(
                endpoint, decision.reason, numbers, rollout_id=state.rollout_id
            )
        elif isinstance(decision, Promote):
            logger.info("promoting canary", extra=extra)
            await self._actions.promote(
                endpoint, decision.reason, numbers, rollout_id=state.rollout_id
            )
        else:
            logger.info("advancing canary", extra=extra)
            await self._actions.set_canary_share(
                endpoint, decision.share_bp, decision.reason, numbers, rollout_id=state.rollout_id
            )

    async def _hold_lease(self) -> bool:
        ttl_ms = int(self._options.lease_ttl_s * 1000)
        key = self._options.lease_key
        try:
            if self._leader:
                renewed = await self._renew(keys=[key], args=[self.holder_id, ttl_ms])
                if not renewed:
                    logger.warning(
                        "rollout controller lease lost", extra={"holder": self.holder_id}
                    )
                    self._set_leader(False)
            if not self._leader:
                taken = await self._redis.set(key, self.holder_id, nx=True, px=ttl_ms)
                if taken:
                    logger.info("rollout controller lease taken", extra={"holder": self.holder_id})
                    self._set_leader(True)
        except (RedisError, OSError) as exc:
            logger.warning("rollout controller lease check failed", extra={"error": repr(exc)})
            self._failed("lease")
            self._set_leader(False)
        return self._leader

    def _set_leader(self, leader: bool) -> None:
        self._leader = leader
        if self._metrics is not None:
            self._metrics.leader.set(1 if leader else 0)

    def _failed(self, stage: str) -> None:
        if self._metrics is not None:
            self._metrics.failed(stage)

    async def start(self) -> None:
        """Start the loop (first tick right away)."""
        if self._task is not None:
            raise RuntimeError("controller already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="rollout-controller")

    async def stop(self) -> None:
        """Stop the loop and give up the lease. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task
        if self._leader:
            try:
                await self._release(keys=[self._options.lease_key], args=[self.holder_id])
            except (RedisError, OSError) as exc:
                logger.warning("rollout lease release failed", extra={"error": repr(exc)})
            self._set_leader(False)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                logger.exception("rollout controller tick failed")
                self._failed("tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._options.tick_s)
