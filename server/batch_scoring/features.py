"""Feature values for one spine chunk, as the model's ``[N, F]`` float32 matrix.

:class:`PointInTimeFeatures` computes them with the backfill's own code
(:func:`feature_streams.backfill.backfill_table`, i.e.
:func:`feature_streams.point_in_time.point_in_time_table`) from the event log and
batch snapshot files, the inputs ``streamscore features backfill`` takes.

Chunks are independent, so any chunking (and any number of workers or Spark
partitions) gives the same values: a row's point-in-time value depends only on the
complete log of its own keys (the lateness rule is per (group, key), the
dead-letter rule per record), and every chunk reads the complete log of the keys it
holds. A Parquet event log is scanned column-wise and only the records carrying one
of the chunk's keys (normalised by the entity's key rule) reach the Python fold, so
memory per chunk is the chunk plus its keys' history; a JSON-lines log is replayed
whole per chunk (convert it to Parquet for large runs). Spines sorted or partitioned
by entity keep each chunk's key set, and so its share of the log, small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.backfill import EventSource, backfill_table, read_event_records
from feature_streams.definitions import (
    Entity,
    EntityKeyError,
    FeatureDefinitions,
    FeatureSource,
)
from feature_streams.definitions import resolve_features as _resolve
from feature_streams.point_in_time import BackfillError, EventRecord

__all__ = ["PointInTimeFeatures", "feature_matrix", "key_entities"]

_PARQUET: Final = frozenset({".parquet", ".pq"})
_SCAN_ROWS: Final = 262_144


def key_entities(definitions: FeatureDefinitions, features: Sequence[str]) -> list[str]:
    """Entities whose ids the features need (batch and stream groups), in order."""
    resolution = _resolve(definitions, features)
    names = [definitions.batch_groups[g].entity for g in resolution.batch_groups]
    names += [definitions.stream_groups[g].entity for g in resolution.stream_groups]
    return list(dict.fromkeys(names))


def feature_matrix(table: pa.Table, features: Sequence[str]) -> npt.NDArray[np.float32]:
    """``[N, F]`` float32 in the manifest's column order (the row the server builds)."""
    columns = [table.column(n).to_numpy(zero_copy_only=False) for n in features]
    return np.ascontiguousarray(np.column_stack(columns).astype(np.float32))


@dataclass(frozen=True)
class PointInTimeFeatures:
    """Point-in-time features from files (picklable: worker processes rebuild nothing)."""

    definitions: FeatureDefinitions
    features: tuple[str, ...]
    events: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
    """One log, or ``topic -> log`` when the definitions read several topics."""
    batch_snapshots: Mapping[str, Sequence[tuple[int, str]]] = field(default_factory=dict)
    allow_missing_columns: bool = False

    def check(self) -> None:
        """Refuse unreadable event files before any work (``BackfillError``)."""
        for source in self._sources().values():
            read_event_records(source)

    def _sources(self) -> dict[str, str | os.PathLike[str]]:
        if isinstance(self.events, Mapping):
            return dict(self.events)
        return {"": self.events}

    def table(self, chunk: pa.Table) -> pa.Table:
        """The chunk plus the features' point-in-time values (``ts_ms`` is its time)."""
        spine = chunk.drop_columns([c for c in chunk.column_names if c in self._computed()])
        events: EventSource | dict[str, EventSource]
        if isinstance(self.events, Mapping):
            events = {t: self._events_for(s, spine) for t, s in self.events.items()}
        else:
            events = self._events_for(self.events, spine)
        table, _ = backfill_table(
            self.definitions,
            events,
            spine,
            batch_snapshots=self.batch_snapshots,
            features=self.features,
            allow_missing_columns=self.allow_missing_columns,
        )
        return table

    def _computed(self) -> set[str]:
        refs = _resolve(self.definitions, self.features).refs
        return {r.name for r in refs if r.source is not FeatureSource.REQUEST}

    def _events_for(self, source: str | os.PathLike[str], spine: pa.Table) -> EventSource:
        path = Path(source)
        if path.suffix.lower() not in _PARQUET:
            return source  # JSON lines: the whole log, read by the backfill
        return _FilteredParquetEvents(path, self._wanted(spine))

    def _wanted(self, spine: pa.Table) -> tuple[_Wanted, ...]:
        """Per stream group read: its event key field, entity and the chunk's keys."""
        defs = self.definitions
        out: list[_Wanted] = []
        for group_name in _resolve(defs, self.features).stream_groups:
            group = defs.stream_groups[group_name]
            entity = defs.entities[group.entity]
            keys: set[str] = set()
            if group.entity in spine.column_names:
                for value in pc.unique(spine.column(group.entity)).to_pylist():
                    key = _key(entity, value)
                    if key is not None:
                        keys.add(key)
            out.append(_Wanted(group.key, entity, frozenset(keys)))
        return tuple(out)


def _key(entity: Entity, value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return entity.key(value)
    except EntityKeyError:
        return None  # no key (the spine check refused spine ids; events: malformed)


@dataclass(frozen=True)
class _Wanted:
    field: str
    entity: Entity
    keys: frozenset[str]


@dataclass(frozen=True)
class _FilteredParquetEvents:
    """A Parquet event log's records (in file order) that carry a wanted key.

    A record whose key fields hold none of the wanted keys cannot change a wanted
    key's values: lateness is tracked per (group, key) and a malformed record feeds
    no group at all, so dropping it is exact for the rows of this chunk.
    """

    path: Path
    wanted: tuple[_Wanted, ...]

    def __iter__(self) -> Iterator[EventRecord]:
        try:
            reader = pq.ParquetFile(self.path)
            for batch in reader.iter_batches(batch_size=_SCAN_ROWS):
                mask = self._mask(batch)
                if mask is None:
                    continue
                for row in batch.filter(mask).to_pylist():
                    yield {k: v for k, v in row.items() if v is not None}
        except (OSError, pa.ArrowException) as exc:
            raise BackfillError(f"{self.path}: cannot read events: {exc}") from None

    def _mask(self, batch: pa.RecordBatch) -> pa.Array | None:
        mask: pa.Array | None = None
        for wanted in self.wanted:
            if wanted.field not in batch.schema.names or not wanted.keys:
                continue
            column = batch.column(wanted.field)
            raw = pc.unique(column).to_pylist()
            hits = [v for v in raw if _key(wanted.entity, v) in wanted.keys]
            if not hits:
                continue
            these = pc.is_in(column, value_set=pa.array(hits, column.type))
            mask = these if mask is None else pc.or_(mask, these)
        if mask is None or not pc.any(mask).as_py():
            return None
        return mask
