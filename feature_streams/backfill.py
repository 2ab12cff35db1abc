"""The backfill's I/O: event logs, spines and batch files in, a Parquet file out.

``streamscore features backfill`` (:mod:`feature_streams.backfill_cli`) and
:func:`backfill` read
their inputs, compute with :func:`feature_streams.point_in_time.point_in_time_table`
(the pure point-in-time logic, semantics documented there: the values the online
path would have served) and write the result.

Inputs:

* events: JSON lines (``.jsonl``/``.ndjson``/``.json``: one Kafka record value per
  line, the JSON the worker consumes) or Parquet (``.parquet``/``.pq``: one column
  per event field, nulls meaning "field absent"); or an iterable of event dicts (or
  raw JSON bytes); or a mapping ``topic -> one of those`` when the definitions read
  several topics (a single source is replayed as the log of every topic);
* spine: Parquet or CSV (or a ``pyarrow.Table``) with a timestamp column of integer
  epoch milliseconds (``ts_ms`` by default; a Parquet timestamp type is converted)
  and entity columns named after the entities (``card_id``…);
* batch snapshots: ``{group: [(valid_from_ms, file), ...]}``, files read and
  validated by :mod:`feature_streams.batch_load` (only those of selected groups).

Output (Parquet, written atomically): see :mod:`feature_streams.point_in_time`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.batch_load import (
    BatchFileError,
    iter_file_rows,
    read_file_columns,
    validate_file,
)
from feature_streams.definitions import FeatureDefinitions
from feature_streams.point_in_time import (
    DEFAULT_TIMESTAMP_COLUMN,
    BackfillError,
    BackfillReport,
    EventRecord,
    PointInTimeIndex,
    SnapshotColumns,
    SnapshotRows,
    point_in_time_table,
)
from feature_streams.point_in_time_events import present_columns

__all__ = [
    "DEFAULT_TIMESTAMP_COLUMN",
    "BackfillError",
    "BackfillReport",
    "EventSource",
    "ParquetEvents",
    "SnapshotSchedule",
    "backfill",
    "backfill_index",
    "backfill_table",
    "event_file",
    "read_event_records",
    "read_manifest_features",
    "read_spine",
]

logger = logging.getLogger(__name__)

_JSON_SUFFIXES: Final = frozenset({".jsonl", ".ndjson", ".json"})
_PARQUET_SUFFIXES: Final = frozenset({".parquet", ".pq"})
_PARQUET_BATCH_ROWS: Final = 65_536
_LOG_BATCH_ROWS: Final = 1 << 18
"""Rows per batch of a columnar log read: a batch's distinct keys are looked up once, so
fewer, larger batches look up fewer keys (a batch: some 25 MiB of Arrow and numpy)."""

EventSource = str | os.PathLike[str] | Iterable[EventRecord]
"""A JSON-lines or Parquet file, or the records themselves, in log order."""
SnapshotSchedule = Mapping[str, Sequence[tuple[int, str | os.PathLike[str]]]]
"""Batch group -> ``(valid_from_ms, file)`` entries: which file was active from when."""


# --- reading inputs -----------------------------------------------------------------


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def read_event_records(path: str | os.PathLike[str]) -> Iterator[EventRecord]:
    """Records of an events file in file order: raw JSON bytes per line of a JSON-lines
    file (blank lines skipped), dicts per Parquet row (null cells left out)."""
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in _JSON_SUFFIXES | _PARQUET_SUFFIXES:
        raise BackfillError(
            f"{p}: unknown events file type {p.suffix!r} "
            "(use .jsonl, .ndjson, .json, .parquet or .pq)"
        )
    if not p.is_file():
        raise BackfillError(f"{p}: no such events file")
    return _iter_records(p, suffix in _PARQUET_SUFFIXES)


def _iter_records(path: Path, parquet: bool) -> Iterator[EventRecord]:
    try:
        if parquet:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield {k: v for k, v in row.items() if v is not None}
        else:
            with path.open("rb") as handle:
                for line in handle:
                    if line.strip():
                        yield line
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise BackfillError(f"{path}: cannot read events: {exc}") from None


def read_spine(
    path: str | os.PathLike[str],
    definitions: FeatureDefinitions,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
) -> pa.Table:
    """A Parquet or CSV spine as a table (CSV: entity columns read as text and the
    timestamp column as int64)."""
    p = Path(path)
    suffix = _suffix(p)
    try:
        if suffix in _PARQUET_SUFFIXES:
            return pq.read_table(p)
        if suffix == ".csv":
            types = {name: pa.string() for name in definitions.entities}
            types[timestamp_column] = pa.int64()
            return pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(column_types=types))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise BackfillError(f"{p}: cannot read the spine: {exc}") from None
    raise BackfillError(f"{p}: unknown spine file type {p.suffix!r} (use .parquet, .pq or .csv)")


def read_manifest_features(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The ordered feature list of a model manifest (``manifest.json`` or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        names = json.loads(p.read_text(encoding="utf-8")).get("features")
    except (OSError, ValueError, AttributeError) as exc:
        raise BackfillError(f"{p}: cannot read the manifest: {exc}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BackfillError(f"{p}: 'features' is not a non-empty list of names")
    return tuple(names)


class _EventFile:
    """The records of an events file, read afresh on every iteration (checked now)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = path
        read_event_records(path)  # unknown type or missing file: refused before any work

    def __iter__(self) -> Iterator[EventRecord]:
        return read_event_records(self._path)


class ParquetEvents(_EventFile):
    """A Parquet events file, read column-wise by the point-in-time code
    (:class:`feature_streams.point_in_time.ColumnarEvents`); iterating gives its records."""

    def record_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The file's record batches in order (``columns``: only those the file has)."""
        try:
            reader = pq.ParquetFile(self._path)
            kept = present_columns(reader.schema_arrow.names, columns)
            yield from reader.iter_batches(batch_size=_LOG_BATCH_ROWS, columns=kept)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise BackfillError(f"{self._path}: cannot read events: {exc}") from None


def event_file(path: str | os.PathLike[str]) -> _EventFile:
    """An events file as a log source: Parquet read column-wise, JSON lines by record."""
    if _suffix(Path(path)) in _PARQUET_SUFFIXES:
        return ParquetEvents(path)
    return _EventFile(path)


class _BatchFile:
    """A batch file's rows, validated when first iterated (only selected groups are)."""

    def __init__(
        self,
        definitions: FeatureDefinitions,
        group: str,
        path: str | os.PathLike[str],
        allow_missing_columns: bool,
    ) -> None:
        self._args = (definitions, group, path)
        self._allow = allow_missing_columns

    def __iter__(self) -> Iterator[tuple[object, Mapping[str, float]]]:
        try:
            validate_file(*self._args, allow_missing_columns=self._allow)
            yield from iter_file_rows(*self._args, allow_missing_columns=self._allow)
        except BatchFileError as exc:
            raise BackfillError(str(exc)) from None

    def columns(self) -> SnapshotColumns | None:
        """The rows column-wise when the file allows it (Parquet, valid: see
        :func:`read_file_columns`), else ``None`` (iterate it: the row rules)."""
        try:
            read = read_file_columns(*self._args, allow_missing_columns=self._allow)
        except BatchFileError as exc:
            raise BackfillError(str(exc)) from None
        return None if read is None else (read.keys, read.values, read.present)


def _events(
    events: EventSource | Mapping[str, EventSource],
) -> Iterable[EventRecord] | Mapping[str, Iterable[EventRecord]]:
    def records(source: EventSource) -> Iterable[EventRecord]:
        return event_file(source) if isinstance(source, str | os.PathLike) else source

    if isinstance(events, Mapping):
        return {topic: records(source) for topic, source in events.items()}
    return records(events)


def backfill_table(
    definitions: FeatureDefinitions,
    events: EventSource | Mapping[str, EventSource],
    spine: pa.Table,
    *,
    batch_snapshots: SnapshotSchedule | None = None,
    features: Sequence[str] | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
    allow_missing_columns: bool = False,
) -> tuple[pa.Table, BackfillReport]:
    """:func:`backfill` without file output: the output table and its report."""
    return point_in_time_table(
        definitions,
        _events(events),
        spine,
        batch_snapshots=_snapshot_files(definitions, batch_snapshots, allow_missing_columns),
        features=features,
        timestamp_column=timestamp_column,
    )


def _snapshot_files(
    definitions: FeatureDefinitions,
    batch_snapshots: SnapshotSchedule | None,
    allow_missing_columns: bool,
) -> dict[str, list[tuple[int, SnapshotRows]]]:
    snapshots: dict[str, list[tuple[int, SnapshotRows]]] = {}
    for group, entries in (batch_snapshots or {}).items():
        if group in definitions.batch_groups:
            snapshots[group] = [
                (int(valid_from), _BatchFile(definitions, group, path, allow_missing_columns))
                for valid_from, path in entries
            ]
        else:
            snapshots[group] = []  # refused by name
    return snapshots


def backfill_index(
    definitions: FeatureDefinitions,
    events: EventSource | Mapping[str, EventSource],
    *,
    batch_snapshots: SnapshotSchedule | None = None,
    features: Sequence[str] | None = None,
    allow_missing_columns: bool = False,
) -> PointInTimeIndex:
    """The whole event log and every snapshot row read once, for many spines or chunks
    (:meth:`PointInTimeIndex.table` gives what :func:`backfill_table` gives)."""
    return PointInTimeIndex.build(
        definitions,
        _events(events),
        batch_snapshots=_snapshot_files(definitions, batch_snapshots, allow_missing_columns),
        features=features,
    )


def backfill(
    definitions: FeatureDefinitions,
    events: EventSource | Mapping[str, EventSource],
    spine: str | os.PathLike[str] | pa.Table,
    out: str | os.PathLike[str],
    *,
    batch_snapshots: SnapshotSchedule | None = None,
    features: Sequence[str] | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
    allow_missing_columns: bool = False,
) -> BackfillReport:
    """Write the spine plus each row's point-in-time feature values to ``out`` (Parquet).

    ``features`` selects and orders the feature columns (e.g. a model manifest's
    list; default every defined feature). ``allow_missing_columns`` reads batch
    files as ``streamscore features load --allow-missing-columns`` does. Raises
    :class:`BackfillError` for unusable input (nothing is written then).
    """
    started = time.monotonic()
    table = (
        spine if isinstance(spine, pa.Table) else read_spine(spine, definitions, timestamp_column)
    )
    result, report = backfill_table(
        definitions,
        events,
        table,
        batch_snapshots=batch_snapshots,
        features=features,
        timestamp_column=timestamp_column,
        allow_missing_columns=allow_missing_columns,
    )
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(result, tmp)
    tmp.replace(target)
    final = dataclasses.replace(report, out=str(target), elapsed_s=time.monotonic() - started)
    logger.info(
        "backfill written",
        extra={
            "out": final.out,
            "rows": final.rows,
            "features": len(final.features),
            "events_read": final.events_read,
            "events_malformed": final.events_malformed,
            "events_late": dict(final.events_late),
        },
    )
    return final
