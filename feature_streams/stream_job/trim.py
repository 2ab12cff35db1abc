"""Trimming expired tiles of the keys a worker wrote, a bounded chunk at a time.

Every ``trim_interval_s`` the keys written since the last round are queued; each
loop iteration then trims up to ``trim_batch_keys`` of them, so a round never stalls
consumption for long. A failed trim puts its keys back for the next round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from redis.exceptions import RedisError

from feature_streams.stream_job.metrics import WorkerMetrics
from feature_streams.tile_store import TileStore
from feature_streams.windows import GroupPlan

__all__ = ["Trimmer"]

logger = logging.getLogger(__name__)


class Trimmer:
    """Keys written per group, and the trim rounds over them."""

    def __init__(
        self,
        plans: Mapping[str, GroupPlan],
        metrics: WorkerMetrics,
        interval_s: float,
        batch_keys: int,
    ) -> None:
        self._plans = plans
        self._metrics = metrics
        self._interval = interval_s
        self._batch_keys = batch_keys
        self._touched: dict[str, set[str]] = {n: set() for n in plans}
        self._queue: list[tuple[str, str]] = []
        self._last = time.monotonic()

    def touched(self, groups: Iterable[str], keys: Iterable[str]) -> None:
        """Remember keys written (``groups[i]`` is the group of ``keys[i]``)."""
        for group, key in zip(groups, keys, strict=True):
            self._touched[group].add(key)

    def untouch(self, group: str, key: str) -> None:
        """Forget a key that was not written after all (nothing to trim)."""
        self._touched[group].discard(key)

    async def maybe_trim(self, store: TileStore, force: bool = False) -> None:
        """Start a round when due (or ``force``), then trim the next chunk (all of the
        queue when ``force``)."""
        now = time.monotonic()
        if not self._queue and (force or now - self._last >= self._interval):
            self._last = now
            for group, keys in self._touched.items():
                self._queue.extend((group, k) for k in keys)
                keys.clear()
        if not self._queue:
            return
        take = len(self._queue) if force else self._batch_keys
        chunk = self._queue[-take:]
        del self._queue[-take:]
        by_group: dict[str, list[str]] = {}
        for group, key in chunk:
            by_group.setdefault(group, []).append(key)
        for group, names in by_group.items():
            try:
                deleted = await store.trim(self._plans[group], names)
            except (RedisError, OSError) as exc:
                logger.warning("tile trim failed, will retry: %r", exc)
                self._touched[group].update(names)
                continue
            self._metrics.trimmed.labels(group).inc(deleted)
