"""The server's side of the feature store: the failure policy around the one fetch.

:class:`FeatureStore` completes each micro-batch's prepared rows with
:class:`feature_streams.fetcher.FeatureFetcher` (one Redis round trip; batch
snapshots and stream windows, see there) and adds what the server decides:

* Redis unreachable or too slow (``StoreOptions.timeout_s``): the model's policy
  decides. ``degrade`` (the default) answers with defaults and flags the response
  ``degraded`` — a fraud score from request features beats no answer for a card
  authorisation that cannot wait; ``fail`` answers UNAVAILABLE.
* After a failure the store waits ``retry_interval_s`` before touching Redis again,
  so an outage costs no connect timeout per request, and it reconnects by itself
  when Redis is back.
* The round trip is reported to ``on_fetch`` (the fetch latency metric).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from feature_streams.fetcher import BatchSnapshotCache, FeatureFetcher, default_all
from feature_streams.redis_client import AnyRedis
from server.errors import DependencyUnavailable
from server.features import FailurePolicy, FeatureLayout, Prepared

__all__ = ["REDIS_UNAVAILABLE", "FeatureStore", "StoreOptions"]

logger = logging.getLogger(__name__)

REDIS_UNAVAILABLE = "redis_unavailable"
"""Degraded reason: the store could not be read, store columns hold their defaults."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How the server talks to the feature store."""

    timeout_s: float = 0.05
    retry_interval_s: float = 0.5


class FeatureStore:
    """Fills micro-batches of prepared rows from Redis; one per process."""

    def __init__(
        self,
        client: AnyRedis,
        snapshots: BatchSnapshotCache,
        options: StoreOptions = StoreOptions(),
        clock: Callable[[], float] = time.time,
        on_fetch: Callable[[float, int], None] | None = None,
    ) -> None:
        self._fetcher = FeatureFetcher(client, snapshots)
        self._options = options
        self._clock = clock
        self._on_fetch = on_fetch
        self._down_until = 0.0

    @property
    def fetcher(self) -> FeatureFetcher:
        """The online fetcher this store applies its policy to."""
        return self._fetcher

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
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            self._unavailable(layout, batch, policy)
            return
        try:
            result = await self._fetcher.fetch(plan, batch, self._options.timeout_s)
        except (RedisError, OSError, TimeoutError) as error:
            self._down_until = loop.time() + self._options.retry_interval_s
            logger.warning("feature store unreachable", extra={"error": repr(error)})
            self._unavailable(layout, batch, policy)
            return
        if self._on_fetch is not None and result.round_trip_s is not None:
            self._on_fetch(result.round_trip_s, len(batch))

    @staticmethod
    def _unavailable(
        layout: FeatureLayout, batch: Sequence[Prepared], policy: FailurePolicy
    ) -> None:
        if policy == "fail":
            raise DependencyUnavailable(f"feature store unavailable ({REDIS_UNAVAILABLE})")
        for item in batch:
            item.degraded.append(REDIS_UNAVAILABLE)
            default_all(layout.fetch, item)
