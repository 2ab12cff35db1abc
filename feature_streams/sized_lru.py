"""A least-recently-used map bounded in entries and in estimated bytes. Pure.

The storage under the fetcher's in-process caches (:mod:`feature_streams.batch_cache`,
:mod:`feature_streams.tile_cache`): they decide what to keep and what it costs; this
keeps it within both bounds, oldest use first out. Not thread-safe (one event loop).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["SizedLru"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLru(Generic[K, V]):
    """At most ``max_entries`` values and ``max_bytes`` of their stated sizes; a zero
    bound disables it (:attr:`enabled` False, nothing is kept)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        """Sum of the kept values' sizes."""
        self.evictions = 0
        """Values dropped to stay within the bounds."""

    @property
    def enabled(self) -> bool:
        """False when built with a zero bound."""
        return self._max_entries > 0 and self._max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """The kept keys, least recently used first (do not change the map meanwhile)."""
        return iter(self._items)

    def get(self, key: K) -> V | None:
        """The value kept for ``key`` (now the most recently used), or ``None``."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Keep ``value`` under ``key`` (replacing any), then evict the least recently
        used until within both bounds; whether ``value`` is still kept."""
        self.pop(key)
        if not self.enabled:
            return False
        self._items[key] = (value, size)
        self.bytes += size
        items = self._items
        while items and (len(items) > self._max_entries or self.bytes > self._max_bytes):
            _, (_, dropped) = items.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1
        return key in items

    def pop(self, key: K) -> V | None:
        """Forget ``key``; its value, or ``None``."""
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]
