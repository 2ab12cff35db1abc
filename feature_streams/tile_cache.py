"""Fetched tile hashes kept in process by version, checked with one small read. Pure.

Every write that changes a tile hash raises its version field
(:data:`~feature_streams.keys.VERSION_FIELD`, see :mod:`feature_streams.tile_store`),
in the same atomic script call. So a hash read at version ``v`` is, field for field,
the hash as long as the version is still ``v``: :class:`TileHashCache` keeps the
decoded ``HGETALL`` reply of each hash the fetcher read (and the window merges
computed from it, by read layout), and the next micro-batch reads only ``HMGET key _v
<offset fields>`` for it, in its one round trip. The same values: the held hash is
served (no transfer, no parse, no merge); any other: the hash is read whole in a second
round trip. The offset fields make the check safe while stream workers of an older
release (which do not raise ``_v``) still apply events: every apply moves an offset.
A value is never served from a hash older than the one Redis held when the
micro-batch read the version.

A check that answers "changed" costs one more round trip for the micro-batch. It is
not done in the first one by a script (``if HGET == v then 1 else HGETALL``): Redis
spends ~50 us converting a ~63-field hash to Lua and back, against ~12 us for a plain
``HGETALL`` and ~5 us for the unchanged answer (``INFO commandstats``, bench/RESULTS.md).

* Keyed by the hash's Redis key; an entry holds the version it was read at.
* Only hashes that carry a version are kept (a hash written before versions existed,
  or by something else, is read whole every time).
* Bounded in hashes (``max_entries``) and estimated bytes (``max_bytes``), least
  recently used first out. ``max_entries == 0`` disables it.
* On a Redis Cluster the fetcher does not use it (plain ``HGETALL`` per node).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from feature_streams.keys import OFFSET_FIELD_PREFIX, VERSION_FIELD, VERSION_FIELD_BYTES
from feature_streams.sized_lru import SizedLru

__all__ = [
    "CacheStats",
    "TileEntry",
    "TileHashCache",
    "check_fields",
    "hash_version",
]

ENTRY_OVERHEAD_BYTES = 600
"""Estimated bytes of one entry besides its fields (entry, dict, key)."""
FIELD_OVERHEAD_BYTES = 110
"""Estimated bytes per field of a kept hash besides the names' and values' lengths
(two ``bytes`` objects and a dict slot)."""

_OFFSET = OFFSET_FIELD_PREFIX + ":"
_OFFSET_BYTES = _OFFSET.encode()

_MAX_MERGES = 4
"""Window merges kept per hash (one per read layout; layouts change once a step)."""


def hash_version(fields: Mapping[Any, Any]) -> bytes | str | None:
    """The version field of a fetched hash (``bytes`` or ``str`` as the client
    decodes), ``None`` when it has none."""
    version = fields.get(VERSION_FIELD_BYTES)
    if version is None:
        version = fields.get(VERSION_FIELD)
    return version


def check_fields(fields: Mapping[Any, Any]) -> tuple[Any, ...]:
    """The fields a kept hash is checked by: its version, then every Kafka offset field
    it holds (sorted), named as the client returned them."""
    version = VERSION_FIELD_BYTES if VERSION_FIELD_BYTES in fields else VERSION_FIELD
    offsets = sorted(
        name
        for name in fields
        if (name.startswith(_OFFSET_BYTES) if isinstance(name, bytes) else name.startswith(_OFFSET))
    )
    return (version, *offsets)


@dataclass(slots=True)
class TileEntry:
    """One hash as read at ``version``; ``fields`` is never mutated once kept.

    ``check`` names the fields re-read to confirm the hash unchanged (:func:`check_fields`)
    and ``expected`` their values as read. Besides the version they hold the hash's
    offset fields: a stream worker of an older release applies events without raising
    the version, but it always moves its partition's offset, so a hash it changed is
    read again instead of being served as kept (mixed-release rollouts).
    """

    version: bytes | str
    fields: Mapping[Any, Any]
    size: int
    check: tuple[Any, ...] = ()
    expected: list[Any] = field(default_factory=list)
    merges: dict[object, Any] = field(default_factory=dict)
    """Window merges of these fields by read layout (see ``HashWindowReader``)."""

    def merge_memo(self) -> dict[object, Any]:
        """The merges memo, emptied first when it holds :data:`_MAX_MERGES` layouts."""
        if len(self.merges) >= _MAX_MERGES:
            self.merges.clear()
        return self.merges


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one :class:`TileHashCache`."""

    entries: int
    bytes: int
    hits: int
    """Checks answered unchanged (the held hash served)."""
    misses: int
    """Hashes read whole: not held, or changed since."""
    evictions: int


class TileHashCache:
    """Bounded LRU of fetched tile hashes by version; one per fetcher, on the loop."""

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 128 * 1024 * 1024) -> None:
        self._entries: SizedLru[str, TileEntry] = SizedLru(max_entries, max_bytes)
        self._hits = 0
        self._misses = 0

    @property
    def enabled(self) -> bool:
        """False when built with a zero bound (nothing is ever kept)."""
        return self._entries.enabled

    def stats(self) -> CacheStats:
        """Current size and counters."""
        entries = self._entries
        return CacheStats(len(entries), entries.bytes, self._hits, self._misses, entries.evictions)

    def get(self, key: str) -> TileEntry | None:
        """The entry held for ``key`` (most recently used now), or ``None``."""
        return self._entries.get(key)

    def hit(self, entry: TileEntry) -> Mapping[Any, Any]:
        """``entry``'s fields, its version just confirmed current (counted)."""
        self._hits += 1
        return entry.fields

    def store(self, key: str, fields: Mapping[Any, Any]) -> TileEntry | None:
        """Keep ``fields``, the hash of ``key`` just read whole (counted as a miss);
        returns its entry, or ``None`` when it carries no version (and any entry held
        for ``key`` is dropped) or the cache is disabled."""
        self._misses += 1
        self._entries.pop(key)
        version = hash_version(fields)
        if version is None or not self.enabled:
            return None
        size = ENTRY_OVERHEAD_BYTES + len(key) + FIELD_OVERHEAD_BYTES * len(fields)
        size += sum(len(name) + len(value) for name, value in fields.items())
        check = check_fields(fields)
        entry = TileEntry(version, fields, size, check, [fields.get(name) for name in check])
        return entry if self._entries.put(key, entry, size) else None

    def discard(self, key: str) -> None:
        """Forget ``key`` (e.g. it answered an error)."""
        self._entries.pop(key)
