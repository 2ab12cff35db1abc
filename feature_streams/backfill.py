"""Point-in-time feature backfill: the values the online path would have served.

``streamscore features backfill`` (:func:`main_backfill`) and :func:`backfill` take a
*spine* (one row per training example: entity id columns plus a request time) and
add, for every row, each feature's value as of that instant:

* **request features**: the spine column of that name when present and not null,
  else the defined default (values are not range-checked; out-of-range ones are
  counted in :attr:`BackfillReport.invalid_request_values`);
* **batch groups**: the row of the row's entity in the snapshot active at ``t``,
  i.e. the schedule entry with the greatest ``valid_from_ms <= t``; every field
  takes its default when no snapshot was active yet, the entity has no row, or the
  cell was empty (exactly what :mod:`feature_streams.batch_store` serves). Files are
  read and validated by :mod:`feature_streams.batch_load`;
* **stream groups**: :func:`feature_streams.windows.point_in_time_values` over the
  entity's events, i.e. exactly the worker's fold and the server's window read, from
  the events with event time ``< t``. Before that the worker's rules are replayed
  in log (file) order: a record malformed for any group of its topic feeds none
  (:func:`feature_streams.events.validate_event`, the dead-letter rule), and an
  event later than ``allowed_lateness`` behind the newest event *applied* for its
  (group, key) is dropped (:func:`feature_streams.windows.is_too_late`, the rule the
  tile store's apply script enforces). The file order must therefore be each key's
  log order (a topic partitioned by entity key, as the worker expects).

Spine entity ids and event keys become keys by the entity's rule
(:meth:`feature_streams.definitions.Entity.key`: ``" c-1"`` is ``"c-1"``, an ``int``
entity's ``"042"`` is ``"42"``), as the loader and the worker make them; a spine id
that cannot be a key is refused naming column and row. A row whose entity id is null
or blank, or whose spine lacks the entity's column, gets the group's defaults, as a
request without that entity id does online.

Where online and offline can differ (see :mod:`feature_streams.windows`): online, the
head tile of a window also holds events applied with event time ``>= t`` (the
stream is ahead of ``t``); offline never counts them. For a time ``t`` after every
event of the row's keys (``t > newest event time``) the two agree exactly.

Inputs:

* events: JSON lines (``.jsonl``/``.ndjson``/``.json``: one Kafka record value per
  line, the JSON the worker consumes) or Parquet (``.parquet``/``.pq``: one column
  per event field, nulls meaning "field absent"); or an iterable of event dicts (or
  raw JSON bytes); or a mapping ``topic -> one of those`` when the definitions read
  several topics (a single source is replayed as the log of every topic);
* spine: Parquet or CSV (or a ``pyarrow.Table``) with a timestamp column of integer
  epoch milliseconds (``ts_ms`` by default; a Parquet timestamp type is converted)
  and entity columns named after the entities (``card_id``…);
* batch snapshots: ``{group: [(valid_from_ms, file), ...]}``.

Output (Parquet, written atomically): the spine's columns in spine order (minus
columns named after a selected request feature), then the selected features in the
order asked (default: request features, batch fields, stream aggregations, in
definition order) as ``float64``. A spine column named after a selected batch or
stream feature is refused: it would be ambiguous.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.batch_load import BatchFileError, iter_file_rows, validate_file
from feature_streams.definitions import (
    DefinitionError,
    Entity,
    EntityKeyError,
    FeatureDefinitions,
    FeatureRef,
    FeatureSource,
    UndefinedFeaturesError,
    feature_sources,
    load_definitions,
    resolve_features,
)
from feature_streams.events import MalformedEventError, decode_event, validate_event
from feature_streams.windows import GroupPlan, is_too_late, point_in_time_values

__all__ = [
    "DEFAULT_TIMESTAMP_COLUMN",
    "BackfillError",
    "BackfillReport",
    "EventSource",
    "SnapshotSchedule",
    "backfill",
    "backfill_table",
    "main_backfill",
    "read_event_records",
    "read_manifest_features",
    "read_spine",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMESTAMP_COLUMN: Final = "ts_ms"
_JSON_SUFFIXES: Final = frozenset({".jsonl", ".ndjson", ".json"})
_PARQUET_SUFFIXES: Final = frozenset({".parquet", ".pq"})
_PARQUET_BATCH_ROWS: Final = 65_536

EventRecord = Mapping[str, object] | bytes
"""An event as a dict, or a raw record value (JSON bytes) as the worker reads it."""
EventSource = str | os.PathLike[str] | Iterable[EventRecord]
"""A JSON-lines or Parquet file, or the records themselves, in log order."""
SnapshotSchedule = Mapping[str, Sequence[tuple[int, str | os.PathLike[str]]]]
"""Batch group -> ``(valid_from_ms, file)`` entries: which file was active from when."""


class BackfillError(ValueError):
    """An input (spine, events, schedule, feature list) cannot be used."""


@dataclass(frozen=True)
class BackfillReport:
    """What a backfill computed. Event counts are per stream group unless noted."""

    out: str | None
    """The Parquet file written (``None`` from :func:`backfill_table`)."""
    rows: int
    columns: tuple[str, ...]
    features: tuple[str, ...]
    events_read: int
    """Records read (all topics)."""
    events_malformed: int
    """Records the worker would have sent to the dead-letter topic."""
    events_applied: Mapping[str, int]
    """Events the worker would fold, over every key (not only the spine's)."""
    events_late: Mapping[str, int]
    """Events the worker would drop as too late, over every key."""
    defaulted_rows: Mapping[str, int]
    """Per batch/stream group: rows served the group's defaults (no entity id, or for a
    batch group no active snapshot or no row for the entity)."""
    invalid_request_values: Mapping[str, int] = field(default_factory=dict)
    """Per request feature: spine values the server would refuse (kept as they are)."""
    elapsed_s: float = 0.0


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


# --- the spine ------------------------------------------------------------------------


def _entity_key(entity: Entity, value: object) -> str | None:
    """A spine cell as the entity's key (``None``: null or blank, no id)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return entity.key(value)


def _times(table: pa.Table, column: str) -> list[int]:
    if column not in table.column_names:
        raise BackfillError(
            f"the spine has no timestamp column {column!r} "
            f"(columns: {', '.join(table.column_names)})"
        )
    col = table.column(column)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    values = col.to_pylist()
    out: list[int] = []
    for row, value in enumerate(values, start=1):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BackfillError(
                f"spine column {column!r}, row {row}: {value!r} is not epoch milliseconds"
            )
        out.append(value)
    return out


def _request_values(
    table: pa.Table, ref: FeatureRef, definitions: FeatureDefinitions, invalid: dict[str, int]
) -> npt.NDArray[np.float64]:
    rows = table.num_rows
    if ref.name not in table.column_names:
        return np.full(rows, ref.default, np.float64)
    rule = definitions.request_features[ref.name]
    out = np.empty(rows, np.float64)
    bad = 0
    for i, value in enumerate(table.column(ref.name).to_pylist()):
        if value is None:
            out[i] = ref.default
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BackfillError(
                f"spine column {ref.name!r}, row {i + 1}: {value!r} is not a number"
            ) from None
        out[i] = number
        if rule.violation(number) is not None:
            bad += 1
    if bad:
        invalid[ref.name] = bad
        logger.warning(
            "%d spine values of %s would be refused online (kept as they are)", bad, ref.name
        )
    return out


# --- events -----------------------------------------------------------------------------


@dataclass
class _GroupLog:
    """One stream group's kept events per key, with the worker's lateness state."""

    plan: GroupPlan
    keys: frozenset[str]
    kept: dict[str, list[Mapping[str, object]]] = field(default_factory=dict)
    newest: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    late: int = 0

    def offer(self, key: str, ts: int, event: Mapping[str, object]) -> None:
        newest = self.newest.get(key)
        if is_too_late(ts, newest, self.plan.group.allowed_lateness_ms):
            self.late += 1
            return
        self.newest[key] = ts if newest is None else max(newest, ts)
        self.applied += 1
        if key in self.keys:  # only events of keys some spine row reads are kept
            self.kept.setdefault(key, []).append(event)


def _replay_topic(
    records: Iterable[EventRecord], plans: Sequence[GroupPlan], logs: Mapping[str, _GroupLog]
) -> tuple[int, int]:
    """Feed one topic's log to the groups reading it; returns ``(read, malformed)``."""
    read = malformed = 0
    for record in records:
        read += 1
        try:
            event = decode_event(record) if isinstance(record, bytes) else record
            checked = [validate_event(plan, event) for plan in plans]
        except MalformedEventError:
            malformed += 1
            continue
        for plan, group_event in zip(plans, checked, strict=True):
            log = logs.get(plan.group.name)
            if log is not None:
                log.offer(group_event.key, group_event.ts_ms, event)
    return read, malformed


def _sources_by_topic(
    events: EventSource | Mapping[str, EventSource], topics: Sequence[str]
) -> dict[str, EventSource]:
    if isinstance(events, Mapping):
        unknown = [t for t in events if t not in topics]
        if unknown:
            raise BackfillError(
                f"events given for topics no stream group reads: {', '.join(map(str, unknown))}"
            )
        missing = [t for t in topics if t not in events]
        if missing:
            logger.warning("no events for topics %s: their windows are empty", missing)
        return {t: events[t] for t in topics if t in events}
    if len(topics) > 1 and not isinstance(events, str | os.PathLike):
        events = list(events)  # replayed once per topic
    return dict.fromkeys(topics, events)


def _records(source: EventSource) -> Iterable[EventRecord]:
    if isinstance(source, str | os.PathLike):
        return read_event_records(source)
    return source


# --- batch snapshots ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshots:
    valid_from: tuple[int, ...]
    rows: tuple[Mapping[str, Mapping[str, float]], ...]


def _load_snapshots(
    definitions: FeatureDefinitions,
    group: str,
    entries: Sequence[tuple[int, str | os.PathLike[str]]],
    wanted: frozenset[str],
    allow_missing_columns: bool,
) -> _Snapshots:
    ordered = sorted(entries, key=lambda e: int(e[0]))
    starts = [int(e[0]) for e in ordered]
    if len(set(starts)) != len(starts):
        raise BackfillError(f"batch group {group!r}: two snapshots share a valid_from time")
    rows: list[Mapping[str, Mapping[str, float]]] = []
    for _, path in ordered:
        validate_file(definitions, group, path, allow_missing_columns=allow_missing_columns)
        rows.append(
            {
                entity: values
                for entity, values in iter_file_rows(
                    definitions, group, path, allow_missing_columns=allow_missing_columns
                )
                if entity in wanted
            }
        )
    return _Snapshots(tuple(starts), tuple(rows))


# --- the computation ------------------------------------------------------------------------


def _selected(definitions: FeatureDefinitions, features: Sequence[str] | None) -> list[FeatureRef]:
    if features is None:
        return list(feature_sources(definitions).values())
    duplicated = sorted({n for n in features if list(features).count(n) > 1})
    if duplicated:
        raise BackfillError(f"features listed twice: {', '.join(duplicated)}")
    try:
        return list(resolve_features(definitions, features).refs)
    except UndefinedFeaturesError as exc:
        raise BackfillError(str(exc)) from None


def _entity_ids(
    table: pa.Table, definitions: FeatureDefinitions, entity: str
) -> list[str | None] | None:
    if entity not in table.column_names:
        return None
    spec = definitions.entities[entity]
    out: list[str | None] = []
    for row, value in enumerate(table.column(entity).to_pylist(), start=1):
        try:
            out.append(_entity_key(spec, value))
        except EntityKeyError as exc:
            raise BackfillError(f"spine column {entity!r}, row {row}: {exc}") from None
    return out


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
    started = time.monotonic()
    refs = _selected(definitions, features)
    names = [r.name for r in refs]
    computed = {r.name for r in refs if r.source is not FeatureSource.REQUEST}
    clashes = [c for c in spine.column_names if c in computed]
    if clashes:
        raise BackfillError(
            f"spine columns named like computed features: {', '.join(clashes)} (drop or rename)"
        )
    if timestamp_column in names:
        raise BackfillError(f"the timestamp column {timestamp_column!r} is also a feature name")
    times = _times(spine, timestamp_column)
    n_rows = len(times)
    batch_snapshots = batch_snapshots or {}
    unknown = [g for g in batch_snapshots if g not in definitions.batch_groups]
    if unknown:
        raise BackfillError(f"unknown batch groups in the schedule: {', '.join(unknown)}")

    batch_groups = list(dict.fromkeys(r.group for r in refs if r.source is FeatureSource.BATCH))
    stream_groups = list(dict.fromkeys(r.group for r in refs if r.source is FeatureSource.STREAM))
    ids: dict[str, list[str | None] | None] = {}
    for group in batch_groups:
        ids.setdefault(definitions.batch_groups[str(group)].entity, None)
    for group in stream_groups:
        ids.setdefault(definitions.stream_groups[str(group)].entity, None)
    for entity in ids:
        ids[entity] = _entity_ids(spine, definitions, entity)
        if ids[entity] is None:
            logger.warning("the spine has no %r column: its groups get defaults", entity)

    values: dict[str, npt.NDArray[np.float64]] = {}
    defaulted: dict[str, int] = {}
    invalid: dict[str, int] = {}
    for ref in refs:
        if ref.source is FeatureSource.REQUEST:
            values[ref.name] = _request_values(spine, ref, definitions, invalid)

    for group in map(str, batch_groups):
        _fill_batch(
            definitions,
            group,
            [r for r in refs if r.group == group and r.source is FeatureSource.BATCH],
            ids[definitions.batch_groups[group].entity],
            times,
            batch_snapshots.get(group, ()),
            allow_missing_columns,
            values,
            defaulted,
        )

    read = malformed = 0
    applied: dict[str, int] = {}
    late: dict[str, int] = {}
    if stream_groups:
        logs: dict[str, _GroupLog] = {}
        for group in map(str, stream_groups):
            keys = ids[definitions.stream_groups[group].entity] or []
            plan = GroupPlan.of(definitions, group)
            logs[group] = _GroupLog(plan, frozenset(k for k in keys if k is not None))
        # Every group of a topic validates a record (all or nothing, as the worker does).
        topic_plans: dict[str, list[GroupPlan]] = {}
        for name, sg in definitions.stream_groups.items():
            plan = logs[name].plan if name in logs else GroupPlan.of(definitions, name)
            topic_plans.setdefault(sg.topic, []).append(plan)
        needed_topics = list(dict.fromkeys(logs[g].plan.group.topic for g in logs))
        for topic, source in _sources_by_topic(events, needed_topics).items():
            r, m = _replay_topic(_records(source), topic_plans[topic], logs)
            read += r
            malformed += m
        for group, log in logs.items():
            applied[group], late[group] = log.applied, log.late
            group_refs = [r for r in refs if r.group == group and r.source is FeatureSource.STREAM]
            entity_ids = ids[log.plan.group.entity]
            defaulted[group] = _fill_stream(log, group_refs, entity_ids, times, values)

    arrays = [spine.column(c) for c in spine.column_names if c not in values]
    columns = [c for c in spine.column_names if c not in values]
    for name in names:
        arrays.append(pa.array(values[name], type=pa.float64()))
        columns.append(name)
    table = pa.Table.from_arrays(arrays, names=columns)
    report = BackfillReport(
        out=None,
        rows=n_rows,
        columns=tuple(columns),
        features=tuple(names),
        events_read=read,
        events_malformed=malformed,
        events_applied=applied,
        events_late=late,
        defaulted_rows=defaulted,
        invalid_request_values=invalid,
        elapsed_s=time.monotonic() - started,
    )
    return table, report


def _fill_batch(
    definitions: FeatureDefinitions,
    group: str,
    refs: Sequence[FeatureRef],
    entity_ids: Sequence[str | None] | None,
    times: Sequence[int],
    schedule: Sequence[tuple[int, str | os.PathLike[str]]],
    allow_missing_columns: bool,
    values: dict[str, npt.NDArray[np.float64]],
    defaulted: dict[str, int],
) -> None:
    n_rows = len(times)
    columns = {r.name: np.full(n_rows, r.default, np.float64) for r in refs}
    values.update(columns)
    if entity_ids is None:
        defaulted[group] = n_rows
        return
    wanted = frozenset(e for e in entity_ids if e is not None)
    try:
        snaps = _load_snapshots(definitions, group, schedule, wanted, allow_missing_columns)
    except BatchFileError as exc:
        raise BackfillError(str(exc)) from None
    missing = 0
    for i, (entity, t) in enumerate(zip(entity_ids, times, strict=True)):
        which = bisect.bisect_right(snaps.valid_from, t) - 1
        row = snaps.rows[which].get(entity) if which >= 0 and entity is not None else None
        if row is None:
            missing += 1
            continue
        for name, column in columns.items():
            value = row.get(name)
            if value is not None:
                column[i] = value
    defaulted[group] = missing


def _fill_stream(
    log: _GroupLog,
    refs: Sequence[FeatureRef],
    entity_ids: Sequence[str | None] | None,
    times: Sequence[int],
    values: dict[str, npt.NDArray[np.float64]],
) -> int:
    n_rows = len(times)
    columns = {r.name: np.full(n_rows, r.default, np.float64) for r in refs}
    values.update(columns)
    if entity_ids is None:
        return n_rows
    rows_of: dict[str, list[int]] = {}
    for i, entity in enumerate(entity_ids):
        if entity is not None:
            rows_of.setdefault(entity, []).append(i)
    for entity, rows in rows_of.items():
        results = point_in_time_values(log.plan, log.kept.get(entity, ()), [times[i] for i in rows])
        for i, result in zip(rows, results, strict=True):
            for name, column in columns.items():
                column[i] = result[name]
    return n_rows - sum(len(r) for r in rows_of.values())


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


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamscore features backfill",
        description="Point-in-time feature values for a spine, as the online path serves them.",
    )
    p.add_argument(
        "--events",
        action="append",
        required=True,
        metavar="[TOPIC=]FILE",
        help="event log (JSON lines or Parquet) in log order; TOPIC= when several topics",
    )
    p.add_argument("--spine", required=True, type=Path, help="Parquet or CSV spine")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p.add_argument("--definitions", type=Path, default=Path("features.yaml"))
    p.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="GROUP=VALID_FROM_MS:FILE",
        help="a batch snapshot file and when it became active; repeatable",
    )
    select = p.add_mutually_exclusive_group()
    select.add_argument(
        "--features-from-manifest",
        type=Path,
        metavar="PATH",
        help="only the features of this manifest.json (or version directory), in its order",
    )
    select.add_argument("--features", metavar="A,B,...", help="only these features, in order")
    p.add_argument("--timestamp-column", default=DEFAULT_TIMESTAMP_COLUMN)
    p.add_argument(
        "--allow-missing-columns", action="store_true", help="batch files may lack fields"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _parse_batch(specs: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for spec in specs:
        group, sep, rest = spec.partition("=")
        start, colon, path = rest.partition(":")
        if not (sep and colon and group and path) or not start.lstrip("-").isdigit():
            raise BackfillError(f"--batch {spec!r}: expected GROUP=VALID_FROM_MS:FILE")
        out.setdefault(group, []).append((int(start), path))
    return out


def _parse_events(
    specs: Sequence[str], definitions: FeatureDefinitions
) -> EventSource | dict[str, EventSource]:
    topics = {g.topic for g in definitions.stream_groups.values()}
    by_topic: dict[str, EventSource] = {}
    for spec in specs:
        topic, sep, path = spec.partition("=")
        if not sep or topic not in topics:
            if len(specs) > 1:
                raise BackfillError(f"--events {spec!r}: with several files, write TOPIC=FILE")
            return spec
        by_topic[topic] = path
    return by_topic


def main_backfill(argv: Sequence[str] | None = None) -> int:
    """``streamscore features backfill`` entry point; returns the exit status.

    A leading ``--`` is ignored (``streamscore features backfill -- --events ...``).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(words[1:] if words[:1] == ["--"] else words)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        definitions = load_definitions(args.definitions)
        features: Sequence[str] | None = None
        if args.features_from_manifest is not None:
            features = read_manifest_features(args.features_from_manifest)
        elif args.features:
            features = [n.strip() for n in args.features.split(",") if n.strip()]
        report = backfill(
            definitions,
            _parse_events(args.events, definitions),
            args.spine,
            args.out,
            batch_snapshots=_parse_batch(args.batch),
            features=features,
            timestamp_column=args.timestamp_column,
            allow_missing_columns=args.allow_missing_columns,
        )
    except (DefinitionError, BackfillError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "%d rows x %d features -> %s in %.2fs (%d events read, %d malformed, late %s)",
        report.rows,
        len(report.features),
        report.out,
        report.elapsed_s,
        report.events_read,
        report.events_malformed,
        dict(report.events_late),
    )
    return 0
