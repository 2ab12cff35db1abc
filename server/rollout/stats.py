"""Canary/champion statistics: counted per process, summed across processes in Redis.

Every server process owns one :class:`StatsRecorder`. The request path calls
:meth:`StatsRecorder.record` (no I/O: a few integer increments) for each request
routed to the champion or the canary of an endpoint's active rollout window; a
background task flushes the deltas every ``flush_interval_s`` with ``HINCRBY`` into
one hash per (endpoint, rollout id, step, version). Any process can then read the
sums with :func:`read_observation`.

Redis key layout (``v1`` names the bucket layout of ``server.rollout.policy``; changing
``LATENCY_BOUNDS_S`` or ``SCORE_CUTS`` must bump it)::

    streamscore:rollout:v1:{<endpoint>:<rollout_id>}:<step>:<version>   hash
        requests   requests routed to <version> in that step (answered + failed)
        errors     of which failed after routing
        lat:<i>    requests in latency bucket i (server.rollout.policy.LATENCY_BOUNDS_S)
        score:<i>  answered requests in score bin i (server.rollout.policy.score_bin)

Only non-zero fields are written. The ``{...}`` hash tag puts every key of one
rollout in one Redis Cluster slot, so a flush is one ``MULTI``/``EXEC`` per rollout
and a read is one pipeline. Each flush refreshes a TTL (``key_ttl_s``, default 7
days): the numbers outlive the rollout for post-mortems, then expire.

Failure: a flush that fails is merged back into the pending counts and retried at
the next flush (memory stays bounded: counts, not events), so a Redis outage delays
numbers but loses none. The only double count possible is a transaction whose
``EXEC`` reply was lost after Redis applied it; guard ratios tolerate that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from feature_streams.redis_client import AnyRedis
from server.rollout.policy import (
    LATENCY_BUCKETS,
    SCORE_BINS,
    Observation,
    RolloutState,
    StepWindow,
    WindowStats,
    latency_bucket,
    score_bin,
)
from server.router import Route

logger = logging.getLogger(__name__)

KEY_PREFIX = "streamscore:rollout:v1"
REQUESTS_FIELD = "requests"
ERRORS_FIELD = "errors"
LATENCY_FIELD_PREFIX = "lat:"
SCORE_FIELD_PREFIX = "score:"
DEFAULT_KEY_TTL_S = 7 * 24 * 3600


def hash_tag(endpoint: str, rollout_id: str) -> str:
    """The Redis Cluster hash tag shared by every key of one rollout."""
    return f"{{{endpoint}:{rollout_id}}}"


def stats_key(endpoint: str, rollout_id: str, step: int, version: str) -> str:
    """Key of the counters of ``version`` during ``step`` of a rollout."""
    return f"{KEY_PREFIX}:{hash_tag(endpoint, rollout_id)}:{step}:{version}"


def stats_from_hash(fields: Mapping[bytes | str, bytes | str]) -> WindowStats:
    """Parse a stats hash (``HGETALL`` reply); unknown or out-of-range fields are ignored."""
    requests = errors = 0
    latency = [0] * LATENCY_BUCKETS
    scores = [0] * SCORE_BINS
    for raw_name, raw_value in fields.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        value = int(raw_value)
        if name == REQUESTS_FIELD:
            requests = value
        elif name == ERRORS_FIELD:
            errors = value
        else:
            if name.startswith(LATENCY_FIELD_PREFIX):
                target, index_text = latency, name[len(LATENCY_FIELD_PREFIX) :]
            elif name.startswith(SCORE_FIELD_PREFIX):
                target, index_text = scores, name[len(SCORE_FIELD_PREFIX) :]
            else:
                continue
            if index_text.isdigit() and int(index_text) < len(target):
                target[int(index_text)] = value
    return WindowStats(requests, errors, tuple(latency), tuple(scores))


class _Counts:
    """Mutable counters of one version in one window (one process, not yet flushed)."""

    __slots__ = ("errors", "latency", "requests", "scores")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * LATENCY_BUCKETS
        self.scores = [0] * SCORE_BINS

    def add(self, ok: bool, latency_s: float, score: float | None) -> None:
        self.requests += 1
        self.latency[latency_bucket(latency_s)] += 1
        if not ok:
            self.errors += 1
        elif score is not None:
            self.scores[score_bin(score)] += 1

    def merge(self, other: _Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for index, count in enumerate(other.latency):
            self.latency[index] += count
        for index, count in enumerate(other.scores):
            self.scores[index] += count

    def fields(self) -> dict[str, int]:
        """Non-zero counters as hash fields."""
        out = {REQUESTS_FIELD: self.requests}
        if self.errors:
            out[ERRORS_FIELD] = self.errors
        out.update(
            (f"{LATENCY_FIELD_PREFIX}{i}", count) for i, count in enumerate(self.latency) if count
        )
        out.update(
            (f"{SCORE_FIELD_PREFIX}{i}", count) for i, count in enumerate(self.scores) if count
        )
        return out


@dataclass(frozen=True, slots=True)
class _Active:
    """An endpoint's current window with its two keys precomputed."""

    window: StepWindow
    tag: str
    champion_key: str
    canary_key: str


# tag -> key -> counts
_Pending = dict[str, dict[str, _Counts]]


class StatsRecorder:
    """Per-process counters of every active rollout window, flushed to Redis periodically.

    ``set_window`` follows the routing state (the process that applies a new share
    calls it); ``record`` is the request-path hook; ``start``/``stop`` run the flush
    task (``stop`` flushes one last time). Does not own ``redis``. ``on_flushed``
    gets the number of requests each successful flush wrote; ``on_flush_failure``
    the error of each failed rollout write.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        flush_interval_s: float = 1.0,
        key_ttl_s: int = DEFAULT_KEY_TTL_S,
        on_flush_failure: Callable[[BaseException], None] | None = None,
        on_flushed: Callable[[int], None] | None = None,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be > 0")
        if key_ttl_s <= 0:
            raise ValueError("key_ttl_s must be > 0")
        self._redis = redis
        self._flush_interval_s = flush_interval_s
        self._key_ttl_s = key_ttl_s
        self._on_flush_failure = on_flush_failure
        self._on_flushed = on_flushed
        self._active: dict[str, _Active] = {}
        self._pending: _Pending = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def set_window(self, endpoint: str, window: StepWindow | None) -> None:
        """Count ``endpoint``'s champion and canary into ``window`` from now on; None stops."""
        if window is None:
            self._active.pop(endpoint, None)
            return
        if window.endpoint != endpoint:
            raise ValueError(f"window is for {window.endpoint!r}, not {endpoint!r}")
        self._active[endpoint] = _Active(
            window,
            hash_tag(endpoint, window.rollout_id),
            stats_key(endpoint, window.rollout_id, window.step, window.champion),
            stats_key(endpoint, window.rollout_id, window.step, window.canary),
        )

    def window(self, endpoint: str) -> StepWindow | None:
        """The window ``endpoint`` is counted into, if any."""
        active = self._active.get(endpoint)
        return active.window if active else None

    def record(
        self,
        endpoint: str,
        version: str,
        route: str,
        *,
        ok: bool,
        latency_s: float,
        score: float | None = None,
    ) -> None:
        """Count one request that was routed to ``version`` by ``route``.

        Ignored unless ``endpoint`` has an active window and the request went to its
        champion by the champion route or to its canary by the canary route (pinned
        calls and other versions are not samples of the rollout). ``ok`` False =
        failed after routing; ``score`` only counts when ``ok``.
        """
        active = self._active.get(endpoint)
        if active is None:
            return
        if route == Route.CANARY and version == active.window.canary:
            key = active.canary_key
        elif route == Route.CHAMPION and version == active.window.champion:
            key = active.champion_key
        else:
            return
        by_key = self._pending.get(active.tag)
        if by_key is None:
            by_key = self._pending[active.tag] = {}
        counts = by_key.get(key)
        if counts is None:
            counts = by_key[key] = _Counts()
        counts.add(ok, latency_s, score)

    def pending_requests(self) -> int:
        """Requests counted here and not yet flushed."""
        return sum(c.requests for by_key in self._pending.values() for c in by_key.values())

    async def flush(self) -> bool:
        """Write pending counts to Redis; True when everything was written.

        One ``MULTI``/``EXEC`` per rollout; a failed one is kept for the next flush.
        """
        async with self._flush_lock:
            pending, self._pending = self._pending, {}
            ok = True
            written = 0
            for tag, by_key in pending.items():
                try:
                    await self._write(by_key)
                    written += sum(c.requests for c in by_key.values())
                except (RedisError, OSError) as exc:
                    ok = False
                    self._restore(tag, by_key)
                    logger.warning(
                        "rollout stats flush failed; kept for the next flush",
                        extra={"rollout": tag, "error": repr(exc)},
                    )
                    if self._on_flush_failure is not None:
                        self._on_flush_failure(exc)
            if written and self._on_flushed is not None:
                self._on_flushed(written)
            return ok

    async def _write(self, by_key: Mapping[str, _Counts]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for key, counts in by_key.items():
                for name, count in counts.fields().items():
                    pipe.hincrby(key, name, count)
                pipe.expire(key, self._key_ttl_s)
            await pipe.execute()

    def _restore(self, tag: str, by_key: Mapping[str, _Counts]) -> None:
        current = self._pending.setdefault(tag, {})
        for key, counts in by_key.items():
            existing = current.get(key)
            if existing is None:
                current[key] = counts
            else:
                existing.merge(counts)

    async def start(self) -> None:
        """Start the periodic flush task."""
        if self._task is not None:
            raise RuntimeError("recorder already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="rollout-stats-flush")

    async def stop(self) -> None:
        """Stop the flush task, then flush once more. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task
        await self.flush()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._flush_interval_s)
            if not self._stopping.is_set():
                try:
                    await self.flush()
                except Exception:
                    logger.exception("rollout stats flush crashed; retrying next interval")


async def read_observation(redis: AnyRedis, state: RolloutState) -> Observation:
    """Canary and champion of ``state``'s current step, and the champion over all steps."""
    step = state.step
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(stats_key(state.endpoint, state.rollout_id, step, state.canary))
        for index in range(step + 1):
            pipe.hgetall(stats_key(state.endpoint, state.rollout_id, index, state.champion))
        replies = await pipe.execute()
    canary = stats_from_hash(replies[0])
    champion_steps = [stats_from_hash(reply) for reply in replies[1:]]
    history = WindowStats()
    for stats in champion_steps:
        history = history + stats
    return Observation(canary=canary, champion=champion_steps[-1], champion_history=history)
