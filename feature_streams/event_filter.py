"""A Parquet event log restricted to the records of some entity keys (no file I/O until read).

A chunk or partition of a spine needs only the log of the keys it holds: lateness
is tracked per (group, key) and a malformed record feeds no group at all, so
dropping the records that carry none of the wanted keys is exact for those rows.
The score-batch engines and the Spark backfill read their share of the log through
:func:`events_for` (a JSON-lines log is returned as is: replayed whole).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import Entity, EntityKeyError, FeatureDefinitions
from feature_streams.definitions import resolve_features as _resolve
from feature_streams.key_columns import already_keys
from feature_streams.point_in_time import BackfillError, EventRecord
from feature_streams.point_in_time_events import present_columns

__all__ = ["FilteredParquetEvents", "Wanted", "entity_key", "events_for", "wanted_keys"]

_PARQUET: Final = frozenset({".parquet", ".pq"})
_SCAN_ROWS: Final = 262_144


def entity_key(entity: Entity, value: object) -> str | None:
    """The key of a raw id, ``None`` for a missing or malformed one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return entity.key(value)
    except EntityKeyError:
        return None  # no key (the spine check refused spine ids; events: malformed)


@dataclass(frozen=True)
class Wanted:
    """One stream group's read: the event's key field, its entity and the keys wanted."""

    field: str
    entity: Entity
    keys: frozenset[str]


def wanted_keys(
    definitions: FeatureDefinitions, features: Sequence[str], spine: pa.Table
) -> tuple[Wanted, ...]:
    """Per stream group the features read: its event key field, entity and the spine's keys."""
    out: list[Wanted] = []
    for group_name in _resolve(definitions, features).stream_groups:
        group = definitions.stream_groups[group_name]
        entity = definitions.entities[group.entity]
        keys: set[str] = set()
        if group.entity in spine.column_names:
            for value in pc.unique(spine.column(group.entity)).to_pylist():
                key = entity_key(entity, value)
                if key is not None:
                    keys.add(key)
        out.append(Wanted(group.key, entity, frozenset(keys)))
    return tuple(out)


def events_for(
    source: str | os.PathLike[str], wanted: tuple[Wanted, ...]
) -> str | os.PathLike[str] | FilteredParquetEvents:
    """A Parquet log filtered to ``wanted``; any other log unchanged (read whole)."""
    path = Path(source)
    if path.suffix.lower() not in _PARQUET:
        return source
    return FilteredParquetEvents(path, wanted)


@dataclass(frozen=True)
class FilteredParquetEvents:
    """A Parquet event log's records (in file order) that carry a wanted key."""

    path: Path
    wanted: tuple[Wanted, ...]

    def record_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The log's batches in order, each cut to the rows carrying a wanted key
        (read column-wise by the point-in-time code, as a whole Parquet log is);
        ``columns``: only those (that the file has), default every one."""
        try:
            reader = pq.ParquetFile(self.path)
            names = reader.schema_arrow.names
            kept = present_columns(names, columns)
            read = kept
            if kept is not None:  # the key fields too, to filter by
                read = present_columns(names, [*kept, *(w.field for w in self.wanted)])
            for batch in reader.iter_batches(batch_size=_SCAN_ROWS, columns=read):
                mask = self._mask(batch)
                if mask is not None:
                    batch = batch.filter(mask)
                    yield batch if kept is None else batch.select(kept)
        except (OSError, pa.ArrowException) as exc:
            raise BackfillError(f"{self.path}: cannot read events: {exc}") from None

    def __iter__(self) -> Iterator[EventRecord]:
        for batch in self.record_batches():
            for row in batch.to_pylist():
                yield {k: v for k, v in row.items() if v is not None}

    def _mask(self, batch: pa.RecordBatch) -> pa.Array | None:
        mask: pa.Array | None = None
        for wanted in self.wanted:
            if wanted.field not in batch.schema.names or not wanted.keys:
                continue
            column = batch.column(wanted.field)
            if already_keys(column, wanted.entity.key_type):  # ids are their keys
                hits = pa.array(sorted(wanted.keys), column.type)
            else:
                raw = pc.unique(column).to_pylist()
                hits = pa.array(
                    [v for v in raw if entity_key(wanted.entity, v) in wanted.keys], column.type
                )
            if not len(hits):
                continue
            these = pc.is_in(column, value_set=hits)
            mask = these if mask is None else pc.or_(mask, these)
        if mask is None or not pc.any(mask).as_py():
            return None
        return mask
