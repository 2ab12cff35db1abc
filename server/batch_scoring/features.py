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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from feature_streams.backfill import EventSource, backfill_table, read_event_records
from feature_streams.definitions import FeatureDefinitions, FeatureSource
from feature_streams.definitions import resolve_features as _resolve
from feature_streams.event_filter import events_for, wanted_keys

__all__ = ["PointInTimeFeatures", "feature_matrix", "key_entities"]


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
        return events_for(source, wanted_keys(self.definitions, self.features, spine))
