"""Decoded batch-snapshot rows kept in process, keyed by snapshot id. Pure.

A batch snapshot is never written again once active (:mod:`feature_streams.batch_store`),
so the row one entity has in one snapshot id is the same for as long as that id is read:
:class:`BatchValueCache` keeps the decoded rows the fetcher read, and a micro-batch
reads from Redis only the entities it does not hold.

* Keyed by ``(group, snapshot id, fields, entity id)``: a read with the group's current
  snapshot id can only find rows of that id, so a micro-batch never mixes snapshots.
* The pointer flip invalidates: the first lookup or store with a group's new snapshot id
  drops every row of its old one (a scan, once per flip). A row read from the old id
  after the flip (a micro-batch in flight across it) is not stored.
* Bounded in rows (``max_entries``) and in estimated bytes (``max_bytes``), least
  recently used first out. ``max_entries == 0`` disables it.
* Only complete reads are stored: an entity whose key answered an error, or whose node
  was down, is read again next time; a row absent from the snapshot (defaults) is
  stored, since it stays absent in that snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from feature_streams.sized_lru import SizedLru

__all__ = ["BatchRow", "BatchValueCache", "CacheStats"]

ROW_OVERHEAD_BYTES = 400
"""Estimated bytes of one stored row besides its fields (key tuple, row, dict)."""
FIELD_BYTES = 60
"""Estimated bytes per field of a stored row (dict slot and float)."""


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One entity's decoded row of one snapshot (never mutated once built)."""

    values: Mapping[str, float]
    """Every requested field: the stored value or the field's default."""
    missing: bool
    """No row in the snapshot: every value is a default."""
    absent: tuple[str, ...] = ()
    """Fields of a present row served as defaults (no value, or no finite number)."""
    invalid: tuple[str, ...] = ()
    """Fields holding something that is no finite number (among ``absent``)."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one :class:`BatchValueCache`."""

    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    invalidations: int


_Key = tuple[str, str, tuple[str, ...], str]


class BatchValueCache:
    """Bounded LRU of decoded batch-snapshot rows; one per fetcher, on the event loop."""

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._rows: SizedLru[_Key, BatchRow] = SizedLru(max_entries, max_bytes)
        self._current: dict[str, str] = {}  # group -> the snapshot id its rows belong to
        self._hits = 0
        self._misses = 0
        self._invalidations = 0

    @property
    def enabled(self) -> bool:
        """False when built with a zero bound (nothing is ever stored)."""
        return self._rows.enabled

    def stats(self) -> CacheStats:
        """Current size and counters."""
        rows = self._rows
        return CacheStats(
            len(rows), rows.bytes, self._hits, self._misses, rows.evictions, self._invalidations
        )

    def lookup(
        self, group: str, snapshot_id: str, fields: tuple[str, ...], entity_ids: Iterable[str]
    ) -> tuple[dict[str, BatchRow], list[str]]:
        """The stored rows of ``entity_ids`` in ``snapshot_id``, and the distinct ids
        not stored (to read), in first-seen order."""
        self._follow(group, snapshot_id)
        hits: dict[str, BatchRow] = {}
        missing: dict[str, None] = {}
        rows = self._rows
        for entity_id in entity_ids:
            if entity_id in hits or entity_id in missing:
                continue
            key = (group, snapshot_id, fields, entity_id)
            row = rows.get(key)
            if row is None:
                missing[entity_id] = None
            else:
                hits[entity_id] = row
        self._hits += len(hits)
        self._misses += len(missing)
        return hits, list(missing)

    def store(
        self, group: str, snapshot_id: str, fields: tuple[str, ...], rows: Mapping[str, BatchRow]
    ) -> None:
        """Keep ``rows`` (entity id -> row) read from ``snapshot_id``; ignored when the
        group has since moved to another snapshot id (or was invalidated): only rows of
        the id the last :meth:`lookup` of the group followed are kept."""
        if not self.enabled or self._current.get(group) != snapshot_id:
            return
        for entity_id, row in rows.items():
            key = (group, snapshot_id, fields, entity_id)
            size = ROW_OVERHEAD_BYTES + FIELD_BYTES * len(fields) + len(entity_id)
            self._rows.put(key, row, size)

    def invalidate(self, group: str) -> None:
        """Drop every row of ``group`` (e.g. its snapshot was found being deleted)."""
        self._current.pop(group, None)
        self._drop(group)

    def _follow(self, group: str, snapshot_id: str) -> None:
        """Make ``snapshot_id`` the group's current id, dropping the old id's rows."""
        current = self._current.get(group)
        if current == snapshot_id:
            return
        if current is not None:
            self._drop(group)
        self._current[group] = snapshot_id

    def _drop(self, group: str) -> None:
        stale = [key for key in self._rows if key[0] == group]
        for key in stale:
            self._rows.pop(key)
        if stale:
            self._invalidations += 1
