"""The server's side of the feature store: the failure policy around the one fetch.

:class:`FeatureStore` completes each micro-batch's prepared rows with
:class:`feature_streams.fetcher.FeatureFetcher` (one Redis round trip; batch
snapshots and stream windows, see there) and adds what the server decides:

* Redis unreachable or too slow (``StoreOptions.timeout_s``): the model's policy
  decides for the micro-batch that failed, and only for it. ``degrade`` (the
  default) answers with defaults and flags the responses ``redis_unavailable`` — a
  fraud score from request features beats no answer for a card authorisation that
  cannot wait; ``fail`` answers UNAVAILABLE.
* Repeated failures (``StoreOptions.breaker``: so many within a window, no success
  between) open a :class:`~server.circuit_breaker.CircuitBreaker`: while open every
  micro-batch is answered by the policy at once, so an outage costs no timeout per
  request; then one micro-batch probes Redis, and its success closes the breaker
  (Redis back: served again within ``open_s`` plus one round trip, no restart).
* A problem of one key (``WRONGTYPE``, a value that is no number) is no store failure:
  the fetcher degrades only the rows reading that key (``store_key_error``,
  ``store_value_invalid``) and the breaker counts a success.
* On a Redis Cluster each node is read by its own pipeline and guarded by its own
  breaker (:class:`~server.circuit_breaker.NodeBreakers`, same options): a failed or
  slow node degrades only the rows reading a key it holds (``redis_node_unavailable``,
  defaults served; with the ``fail`` policy the micro-batch answers UNAVAILABLE) and
  counts a failure on that node's breaker only, so its keys are degraded at once while
  it is open and the other nodes are served as usual. The store-wide breaker counts a
  success when any node answered; it counts a failure only when the fetch as a whole
  failed (no node reachable, a store-wide error). After a failover the slot map is
  refreshed and the replica's (new) breaker starts closed.
* Batch-snapshot rows read once are kept in process by snapshot id
  (:class:`~feature_streams.batch_cache.BatchValueCache`, bounded by
  ``StoreOptions.batch_cache_entries`` / ``batch_cache_bytes``): a snapshot never
  changes, and the pointer flip moves reads to the new id. A micro-batch whose every
  value is cached makes no round trip (and gives the breaker no verdict). While the
  breaker is open nothing is served from the cache: the policy decides, as before.
* Stream tile hashes read once are kept in process by their version field
  (:class:`~feature_streams.tile_cache.TileHashCache`, ``StoreOptions.tile_cache_entries``
  / ``tile_cache_bytes``; standalone Redis only): the micro-batch's round trip reads
  only each kept hash's version and Kafka offset fields, and a changed hash is read
  whole in a second round trip, so an unchanged hash costs neither the transfer nor the
  parse nor the window merge.
* The round trip is reported to ``on_fetch`` (the fetch latency metric), breaker
  changes to ``on_breaker`` (its state gauge) and a node breaker's changes to
  ``on_node_breaker`` (the per-node state gauge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from feature_streams.batch_cache import BatchValueCache
from feature_streams.fetcher import (
    NODE_UNAVAILABLE,
    BatchSnapshotCache,
    FeatureFetcher,
    default_all,
)
from feature_streams.redis_client import AnyRedis, RedisOptions
from feature_streams.tile_cache import TileHashCache
from server.circuit_breaker import BreakerOptions, BreakerState, CircuitBreaker, NodeBreakers
from server.errors import DependencyUnavailable
from server.features import FailurePolicy, FeatureLayout, Prepared
from server.settings import FeaturesSettings, RedisSettings

__all__ = [
    "REDIS_NODE_UNAVAILABLE",
    "REDIS_UNAVAILABLE",
    "FeatureStore",
    "StoreOptions",
    "store_options",
]

logger = logging.getLogger(__name__)

REDIS_UNAVAILABLE = "redis_unavailable"
"""Degraded reason: the store could not be read, store columns hold their defaults."""

REDIS_NODE_UNAVAILABLE = NODE_UNAVAILABLE
"""Degraded reason (cluster): a node holding this request's keys failed; those values
are defaults, the rest was read."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How the server talks to the feature store."""

    timeout_s: float = 0.05
    breaker: BreakerOptions = field(default_factory=BreakerOptions)
    batch_cache_entries: int = 100_000
    """Batch-snapshot rows kept in process (0: none, every micro-batch reads them)."""
    batch_cache_bytes: int = 64 * 1024 * 1024
    """Estimated bytes those rows may take."""
    tile_cache_entries: int = 100_000
    """Tile hashes kept by version (0: none, every micro-batch reads them whole)."""
    tile_cache_bytes: int = 128 * 1024 * 1024
    """Estimated bytes those hashes may take."""


def store_options(features: FeaturesSettings) -> StoreOptions:
    """The store's options from the ``features`` settings."""
    return StoreOptions(
        features.fetch_timeout_s,
        BreakerOptions(
            failure_threshold=features.breaker_failures,
            failure_window_s=features.breaker_window_s,
            open_s=features.retry_interval_s,
        ),
        batch_cache_entries=features.batch_cache_entries,
        batch_cache_bytes=features.batch_cache_bytes,
        tile_cache_entries=features.tile_cache_entries,
        tile_cache_bytes=features.tile_cache_bytes,
    )


def redis_options(redis: RedisSettings, features: FeaturesSettings) -> RedisOptions:
    """The server's Redis client options. Its per-read socket timeout is at least
    ``features.fetch_timeout_s`` when a feature store is configured: a shorter socket
    timeout would cut every read short of the fetch budget the operator set."""
    timeout = redis.socket_timeout_s
    if features.definitions_path is not None:
        timeout = max(timeout, features.fetch_timeout_s)
    return RedisOptions(
        redis.url, redis.mode, max_connections=redis.pool_max_connections, socket_timeout_s=timeout
    )


class FeatureStore:
    """Fills micro-batches of prepared rows from Redis; one per process."""

    def __init__(
        self,
        client: AnyRedis,
        snapshots: BatchSnapshotCache,
        options: StoreOptions = StoreOptions(),
        clock: Callable[[], float] = time.time,
        on_fetch: Callable[[float, int], None] | None = None,
        on_breaker: Callable[[BreakerState], None] | None = None,
        on_node_breaker: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self._options = options
        self._clock = clock
        self._on_fetch = on_fetch
        self._on_node_breaker = on_node_breaker
        self._breaker = CircuitBreaker(options.breaker, time.monotonic, on_breaker)
        self._node_breakers = NodeBreakers(options.breaker, time.monotonic, self._node_changed)
        self._fetcher = FeatureFetcher(
            client,
            snapshots,
            self._node_breakers,
            BatchValueCache(options.batch_cache_entries, options.batch_cache_bytes),
            TileHashCache(options.tile_cache_entries, options.tile_cache_bytes),
        )

    def _node_changed(self, node: str, state: BreakerState) -> None:
        _log_node_breaker(node, state)
        if self._on_node_breaker is not None:
            self._on_node_breaker(node, state)

    @property
    def breaker(self) -> CircuitBreaker:
        """The breaker guarding Redis (its ``state`` for health and tests)."""
        return self._breaker

    @property
    def node_breakers(self) -> NodeBreakers:
        """Per-node breakers (Redis Cluster; unused on a standalone Redis)."""
        return self._node_breakers

    @property
    def fetcher(self) -> FeatureFetcher:
        """The online fetcher this store applies its policy to."""
        return self._fetcher

    async def aclose(self) -> None:
        """Stop the fetcher's background work (the client is the caller's)."""
        await self._fetcher.aclose()

    def now_ms(self) -> int:
        """The store's clock, epoch milliseconds (injectable for tests)."""
        return int(self._clock() * 1000)

    async def fill(
        self, layout: FeatureLayout, batch: Sequence[Prepared], policy: FailurePolicy
    ) -> None:
        """Complete every row of ``batch`` in place with one Redis round trip."""
        plan = layout.fetch
        if not plan.uses_store or not batch:
            return
        breaker = self._breaker
        if not breaker.allow():
            self._unavailable(layout, batch, policy)
            return
        try:
            result = await self._fetcher.fetch(plan, batch, self._options.timeout_s)
        except (RedisError, OSError, TimeoutError) as error:
            breaker.failure()
            logger.warning(
                "feature store unreachable: %r (breaker %s)",
                error,
                breaker.state,
                extra={"error": repr(error), "breaker": breaker.state},
            )
            self._unavailable(layout, batch, policy)
            return
        except BaseException:
            breaker.abandon()  # cancelled (or a bug): no verdict on Redis
            raise
        if result.round_trip_s is None:
            breaker.abandon()  # nothing was read: no verdict on Redis
            return
        breaker.success()
        if self._on_fetch is not None:
            self._on_fetch(result.round_trip_s, len(batch))
        if result.unavailable_nodes and policy == "fail":
            raise DependencyUnavailable(
                f"feature store node(s) {', '.join(result.unavailable_nodes)} unavailable"
                f" ({NODE_UNAVAILABLE})"
            )

    @staticmethod
    def _unavailable(
        layout: FeatureLayout, batch: Sequence[Prepared], policy: FailurePolicy
    ) -> None:
        if policy == "fail":
            raise DependencyUnavailable(f"feature store unavailable ({REDIS_UNAVAILABLE})")
        for item in batch:
            item.degraded.append(REDIS_UNAVAILABLE)
            default_all(layout.fetch, item)


def _log_node_breaker(node: str, state: BreakerState) -> None:
    logger.warning("redis node %s breaker %s", node, state, extra={"node": node, "breaker": state})
