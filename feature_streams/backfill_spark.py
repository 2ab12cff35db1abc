"""``streamscore features backfill --engine spark``: the same point-in-time code per partition.

The spine is distributed by the hash of an entity column
(:func:`feature_streams.spark_engine.partition_entity`) and every partition runs
:func:`feature_streams.backfill.backfill_table` on its rows, with its share of the
event log (a Parquet log is filtered to the partition's keys, which is exact: see
:mod:`feature_streams.event_filter`; a JSON-lines log is replayed whole by each
partition). The output equals the local engine's, row for row, in spine order.

Event counts (read, malformed, late) are the local engine's report: a partition sees
only its keys' records, so they are not summed here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.backfill import EventSource, SnapshotSchedule, backfill_table, read_spine
from feature_streams.definitions import FeatureDefinitions, feature_sources
from feature_streams.event_filter import events_for, wanted_keys
from feature_streams.point_in_time import DEFAULT_TIMESTAMP_COLUMN, BackfillError
from feature_streams.spark_engine import map_by_entity, partition_entity, spark_session

__all__ = ["SparkBackfillReport", "backfill_spark"]

logger = logging.getLogger(__name__)

EventPaths = str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
"""One event log file, or ``topic -> file`` (executors read them by path)."""


@dataclass(frozen=True)
class SparkBackfillReport:
    """What a Spark backfill wrote."""

    out: str
    rows: int
    columns: tuple[str, ...]
    features: tuple[str, ...]
    elapsed_s: float


@dataclass(frozen=True)
class _Partition:
    """The per-partition computation (picklable: shipped to executors)."""

    definitions: FeatureDefinitions
    events: EventPaths
    batch_snapshots: SnapshotSchedule
    features: tuple[str, ...] | None
    timestamp_column: str
    allow_missing_columns: bool

    def __call__(self, spine: pa.Table) -> pa.Table:
        names = self.features or tuple(feature_sources(self.definitions))
        wanted = wanted_keys(self.definitions, names, spine)
        events: EventSource | Mapping[str, EventSource]
        if isinstance(self.events, Mapping):
            by_topic: dict[str, EventSource] = {}
            for topic, path in self.events.items():
                by_topic[topic] = events_for(path, wanted)
            events = by_topic
        else:
            events = events_for(self.events, wanted)
        table, _ = backfill_table(
            self.definitions,
            events,
            spine,
            batch_snapshots=self.batch_snapshots,
            features=self.features,
            timestamp_column=self.timestamp_column,
            allow_missing_columns=self.allow_missing_columns,
        )
        return table


def backfill_spark(
    definitions: FeatureDefinitions,
    events: EventPaths,
    spine: str | os.PathLike[str] | pa.Table,
    out: str | os.PathLike[str],
    *,
    master: str = "local[*]",
    batch_snapshots: SnapshotSchedule | None = None,
    features: Sequence[str] | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
    allow_missing_columns: bool = False,
) -> SparkBackfillReport:
    """:func:`feature_streams.backfill.backfill` on Spark (same output file).

    Raises :class:`BackfillError` for unusable input (checked on the driver on the
    first spine row before any Spark work; nothing is written then) and
    :class:`~feature_streams.spark_engine.SparkUnavailable` without PySpark.
    """
    started = time.monotonic()
    table = (
        spine if isinstance(spine, pa.Table) else read_spine(spine, definitions, timestamp_column)
    )
    part = _Partition(
        definitions,
        events,
        {g: list(entries) for g, entries in (batch_snapshots or {}).items()},
        tuple(features) if features is not None else None,
        timestamp_column,
        allow_missing_columns,
    )
    schema = part(table.slice(0, min(1, table.num_rows))).schema  # bad input refused here
    spark = spark_session(master, "streamscore-backfill")
    names = part.features or tuple(feature_sources(definitions))
    key = partition_entity(definitions, names)
    result = map_by_entity(spark, table, key, part, schema)
    if result.num_rows != table.num_rows:  # pragma: no cover - a Spark-side loss
        raise BackfillError(f"spark returned {result.num_rows} rows for {table.num_rows}")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(result, tmp)
    tmp.replace(target)
    features_out = tuple(n for n in names if n in result.column_names)
    return SparkBackfillReport(
        str(target),
        result.num_rows,
        tuple(result.column_names),
        features_out,
        time.monotonic() - started,
    )
