"""Point-in-time feature values: the pure logic of the backfill (no file I/O).

:func:`point_in_time_table` takes a *spine* (a ``pyarrow.Table``: one row per
training example, entity id columns plus a request time), the event records and the
batch snapshots in memory, and adds for every row each feature's value as of that
instant. :mod:`feature_streams.backfill` reads them from files and writes the result;
a batch scorer or a Spark job can call this module with in-memory data.

* **request features**: the spine column of that name when present and not null,
  else the defined default (values are not range-checked; out-of-range ones are
  counted in :attr:`BackfillReport.invalid_request_values`);
* **batch groups**: the row of the row's entity in the snapshot active at ``t``,
  i.e. the schedule entry with the greatest ``valid_from_ms <= t``; every field
  takes its default when no snapshot was active yet, the entity has no row, or the
  cell was empty (exactly what :mod:`feature_streams.batch_store` serves);
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

Output: the spine's columns in spine order (minus columns named after a selected
request feature), then the selected features in the order asked (default: request
features, batch fields, stream aggregations, in definition order) as ``float64``. A
spine column named after a selected batch or stream feature is refused: it would be
ambiguous.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import (
    Entity,
    EntityKeyError,
    FeatureDefinitions,
    FeatureRef,
    FeatureSource,
    UndefinedFeaturesError,
    feature_sources,
    resolve_features,
)
from feature_streams.events import MalformedEventError, decode_event, validate_event
from feature_streams.windows import GroupPlan, is_too_late, point_in_time_values

__all__ = [
    "DEFAULT_TIMESTAMP_COLUMN",
    "BackfillError",
    "BackfillReport",
    "BatchSnapshots",
    "EventRecord",
    "SnapshotRows",
    "point_in_time_table",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMESTAMP_COLUMN: Final = "ts_ms"

EventRecord = Mapping[str, object] | bytes
"""An event as a dict, or a raw record value (JSON bytes) as the worker reads it."""
SnapshotRows = Iterable[tuple[object, Mapping[str, float]]]
"""One batch snapshot: ``(entity id, {field: value})`` pairs (absent field: default)."""
BatchSnapshots = Mapping[str, Sequence[tuple[int, SnapshotRows]]]
"""Batch group -> ``(valid_from_ms, rows)``: which snapshot was active from when."""


class BackfillError(ValueError):
    """An input (spine, events, schedule, feature list) cannot be used."""


@dataclass(frozen=True)
class BackfillReport:
    """What a backfill computed. Event counts are per stream group unless noted."""

    out: str | None
    """The Parquet file written (``None`` when none was written)."""
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


def _events_by_topic(
    events: Iterable[EventRecord] | Mapping[str, Iterable[EventRecord]], topics: Sequence[str]
) -> dict[str, Iterable[EventRecord]]:
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
    if len(topics) > 1 and isinstance(events, Iterator):
        events = list(events)  # replayed once per topic
    return dict.fromkeys(topics, events)


# --- batch snapshots ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshots:
    valid_from: tuple[int, ...]
    rows: tuple[Mapping[str, Mapping[str, float]], ...]


def _snapshots(
    definitions: FeatureDefinitions,
    group: str,
    entries: Sequence[tuple[int, SnapshotRows]],
    wanted: frozenset[str],
) -> _Snapshots:
    """A group's snapshots by start time, holding only the rows of ``wanted`` keys."""
    ordered = sorted(entries, key=lambda e: int(e[0]))
    starts = [int(e[0]) for e in ordered]
    if len(set(starts)) != len(starts):
        raise BackfillError(f"batch group {group!r}: two snapshots share a valid_from time")
    entity = definitions.entities[definitions.batch_groups[group].entity]
    rows: list[Mapping[str, Mapping[str, float]]] = []
    for valid_from, snapshot in ordered:
        kept: dict[str, Mapping[str, float]] = {}
        for raw, fields in snapshot:
            try:
                key = entity.key(raw)
            except EntityKeyError as exc:
                raise BackfillError(
                    f"batch group {group!r}, snapshot from {valid_from}: {exc}"
                ) from None
            if key in wanted:
                kept[key] = fields
        rows.append(kept)
    return _Snapshots(tuple(starts), tuple(rows))


# --- the computation ----------------------------------------------------------------------


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


def point_in_time_table(
    definitions: FeatureDefinitions,
    events: Iterable[EventRecord] | Mapping[str, Iterable[EventRecord]],
    spine: pa.Table,
    *,
    batch_snapshots: BatchSnapshots | None = None,
    features: Sequence[str] | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
) -> tuple[pa.Table, BackfillReport]:
    """The spine plus each row's point-in-time feature values, and the report.

    ``events``: the records in log order, or ``topic -> records`` when the definitions
    read several topics (one iterable is replayed as the log of every topic).
    ``batch_snapshots``: ``group -> [(valid_from_ms, rows)]``, rows being
    ``(entity id, {field: value})`` pairs (ids become keys by the entity's rule).
    ``features`` selects and orders the feature columns (default: every defined
    feature). Raises :class:`BackfillError` for unusable input.
    """
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
        for topic, records in _events_by_topic(events, needed_topics).items():
            r, m = _replay_topic(records, topic_plans[topic], logs)
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
    schedule: Sequence[tuple[int, SnapshotRows]],
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
    snaps = _snapshots(definitions, group, schedule, wanted)
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
