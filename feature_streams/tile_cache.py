"""Each tile hash's last read and the window merges made on it, kept in process. Pure.

Evaluating a stream group's windows on a fetched tile hash merges its tiles per window
(:class:`~feature_streams.hash_reader.HashWindowReader`); the merged values depend only
on the hash's fields and on the read layout (``t`` up to one tile step, a minute for
the demo groups). A hot entity (a merchant, a busy card) is read many times between two
of its events, each time with the same fields. :class:`TileCache` keeps the last
``HGETALL`` reply of each hash with a memo of the merges made on it: a read whose reply
equals the kept one (one C-level ``dict`` comparison) reuses the merges, and any change
of the hash (an event applied, a late event within the lateness, a trim, the hash
expired or re-created) makes the reply differ, so the memo starts afresh. Exact by
construction: the values are those of the reply itself.

(The first version of this module kept sealed tiles, older than the allowed lateness
behind the hash's ``_last_ts``, and read only the open ones with a Lua script that
filtered the hash in Redis. Measured in Redis, that script cost 62 us per call against
8 us for ``HGETALL`` of the same card hash, and on the bench's shared cores it lowered
Score throughput with features fetched; see bench/RESULTS.md.)

Bounded in entries and in estimated bytes (least recently used first out);
``max_entries == 0`` disables it. One per fetcher, used on the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ENTRY_BYTES", "FIELD_BYTES", "TileCache", "TileCacheStats"]

FIELD_BYTES = 150
"""Estimated bytes per kept field besides its name and value (dict slot, two objects)."""
ENTRY_BYTES = 400
"""Estimated bytes per kept hash besides its fields (key, dict, memo)."""


@dataclass(frozen=True, slots=True)
class TileCacheStats:
    """Counters of one :class:`TileCache`."""

    entries: int
    bytes: int
    hits: int
    """Reads whose reply equalled the kept one (merges reused)."""
    misses: int
    evictions: int


class TileCache:
    """Bounded LRU of tile hash replies with their merge memos (see the module doc)."""

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Mapping[bytes, bytes], dict[object, object], int]]
        self._entries = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        """False when built with ``max_entries == 0`` or ``max_bytes == 0``."""
        return self._max_entries > 0 and self._max_bytes > 0

    def stats(self) -> TileCacheStats:
        """Current size and counters."""
        return TileCacheStats(
            len(self._entries), self._bytes, self._hits, self._misses, self._evictions
        )

    def memo(self, key: str, fields: Mapping[bytes, bytes]) -> dict[object, object] | None:
        """The merge memo to read ``fields`` (``key``'s reply just read) with: the kept
        one when the reply is unchanged, else a fresh one kept with it. ``None`` for an
        empty reply (a hash that does not exist: nothing to merge)."""
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            if entry[0] == fields:
                self._hits += 1
                entries.move_to_end(key)
                return entry[1]
            del entries[key]
            self._bytes -= entry[2]
        self._misses += 1
        if not fields or not self.enabled:
            return None
        size = (
            ENTRY_BYTES + len(key) + sum(FIELD_BYTES + len(n) + len(v) for n, v in fields.items())
        )
        memo: dict[object, object] = {}
        entries[key] = (fields, memo, size)
        self._bytes += size
        while entries and (len(entries) > self._max_entries or self._bytes > self._max_bytes):
            _, (_, _, dropped) = entries.popitem(last=False)
            self._bytes -= dropped
            self._evictions += 1
        return memo

    def drop(self, key: str) -> None:
        """Forget ``key`` (its read failed)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]
