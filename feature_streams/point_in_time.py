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

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

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
    RequestFeature,
    UndefinedFeaturesError,
    feature_sources,
    resolve_features,
)
from feature_streams.key_columns import already_keys
from feature_streams.point_in_time_events import ColumnarEvents, GroupEvents, LogReader
from feature_streams.point_in_time_windows import GroupWindows
from feature_streams.windows import GroupPlan

__all__ = [
    "DEFAULT_TIMESTAMP_COLUMN",
    "BackfillError",
    "BackfillReport",
    "BatchSnapshots",
    "ColumnarEvents",
    "ColumnarSnapshot",
    "EventRecord",
    "EventSource",
    "PointInTimeIndex",
    "SnapshotColumns",
    "SnapshotRows",
    "point_in_time_table",
]

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

DEFAULT_TIMESTAMP_COLUMN: Final = "ts_ms"

EventRecord = Mapping[str, object] | bytes
"""An event as a dict, or a raw record value (JSON bytes) as the worker reads it."""
SnapshotRows = Iterable[tuple[object, Mapping[str, float]]]
"""One batch snapshot: ``(entity id, {field: value})`` pairs (absent field: default)."""
EventSource = Iterable[EventRecord] | ColumnarEvents
"""One topic's log: records in log order, or a columnar (Parquet) log."""
BatchSnapshots = Mapping[str, Sequence[tuple[int, SnapshotRows]]]
"""Batch group -> ``(valid_from_ms, rows)``: which snapshot was active from when."""
SnapshotColumns = tuple[Sequence[str], Mapping[str, F64], Mapping[str, Mask]]
"""A snapshot column-wise: canonical unique keys, per field values and presence."""


@runtime_checkable
class ColumnarSnapshot(Protocol):
    """Snapshot rows that can also be read column-wise (a Parquet batch file)."""

    def columns(self) -> SnapshotColumns | None:
        """The rows column-wise, or ``None`` when they must be read row by row."""


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


def _times(table: pa.Table, column: str) -> I64:
    if column not in table.column_names:
        raise BackfillError(
            f"the spine has no timestamp column {column!r} "
            f"(columns: {', '.join(table.column_names)})"
        )
    col = table.column(column)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    if pa.types.is_integer(col.type) and col.null_count == 0:
        return np.asarray(col.to_numpy(), dtype=np.int64)
    out: list[int] = []
    for row, value in enumerate(col.to_pylist(), start=1):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BackfillError(
                f"spine column {column!r}, row {row}: {value!r} is not epoch milliseconds"
            )
        out.append(value)
    return np.array(out, np.int64)


def _request_values(
    table: pa.Table, ref: FeatureRef, definitions: FeatureDefinitions, invalid: dict[str, int]
) -> F64:
    rows = table.num_rows
    if ref.name not in table.column_names:
        return np.full(rows, ref.default, np.float64)
    rule = definitions.request_features[ref.name]
    column = table.column(ref.name)
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), np.bool_)
        cast = pc.cast(column, pa.float64(), safe=False)
        out = np.asarray(cast.fill_null(ref.default).to_numpy(zero_copy_only=False), np.float64)
    elif pa.types.is_null(kind):
        present = np.zeros(rows, np.bool_)
        out = np.full(rows, ref.default, np.float64)
    else:
        present = np.ones(rows, np.bool_)
        out = np.empty(rows, np.float64)
        for i, value in enumerate(column.to_pylist()):
            if value is None:
                out[i], present[i] = ref.default, False
                continue
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                raise BackfillError(
                    f"spine column {ref.name!r}, row {i + 1}: {value!r} is not a number"
                ) from None
    bad = int(np.count_nonzero(present & _violations(rule, out)))
    if bad:
        invalid[ref.name] = bad
        logger.warning(
            "%d spine values of %s would be refused online (kept as they are)", bad, ref.name
        )
    return out


def _violations(rule: RequestFeature, x: F64) -> Mask:
    """Per value: :meth:`RequestFeature.violation` is not ``None``."""
    nan = np.isnan(x)
    inf = np.isinf(x)
    bad = inf.copy()
    if not rule.allow_nan:
        bad |= nan
    finite = ~nan & ~inf
    with np.errstate(invalid="ignore"):
        wrong = np.zeros(len(x), np.bool_)
        if rule.dtype != "float":
            wrong |= np.floor(x) != x
        if rule.ge is not None:
            wrong |= ~(x >= rule.ge)
        if rule.gt is not None:
            wrong |= ~(x > rule.gt)
        if rule.le is not None:
            wrong |= ~(x <= rule.le)
        if rule.lt is not None:
            wrong |= ~(x < rule.lt)
    return bad | (finite & wrong)


@dataclass(frozen=True)
class _SpineKeys:
    """One entity column of a spine as keys: distinct keys and each row's index."""

    keys: list[str | None]
    row_index: npt.NDArray[np.intp]

    def per_row(self, lookup: Mapping[str, int]) -> I64:
        """``lookup[key]`` per row (``-1``: no id, or not in ``lookup``)."""
        get: Callable[[str | None, int], int] = lookup.get  # type: ignore[assignment]
        codes = np.fromiter(map(get, self.keys, itertools.repeat(-1)), np.int64, len(self.keys))
        return codes[self.row_index] if len(codes) else np.full(len(self.row_index), -1)

    def missing(self) -> Mask:
        """Rows without an id (null or blank)."""
        none = np.array([k is None for k in self.keys], np.bool_)
        return none[self.row_index] if len(none) else np.ones(len(self.row_index), np.bool_)


def _spine_keys(table: pa.Table, definitions: FeatureDefinitions, entity: str) -> _SpineKeys | None:
    if entity not in table.column_names:
        return None
    spec = definitions.entities[entity]
    column = table.column(entity).combine_chunks()
    encoded = pc.dictionary_encode(column, null_encoding="encode")
    index = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.intp)
    if already_keys(encoded.dictionary, spec.key_type):
        return _SpineKeys(encoded.dictionary.to_pylist(), index)
    keys: list[str | None] = []
    for u, value in enumerate(encoded.dictionary.to_pylist()):
        try:
            keys.append(_entity_key(spec, value))
        except EntityKeyError as exc:
            row = int(np.flatnonzero(index == u)[0]) + 1
            raise BackfillError(f"spine column {entity!r}, row {row}: {exc}") from None
    return _SpineKeys(keys, index)


def _entity_key(entity: Entity, value: object) -> str | None:
    """A spine cell as the entity's key (``None``: null or blank, no id)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return entity.key(value)


# --- events -----------------------------------------------------------------------------


def _events_by_topic(
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
    if len(topics) > 1 and isinstance(events, Iterator):
        events = list(events)  # replayed once per topic
    return dict.fromkeys(topics, events)


# --- batch snapshots ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    """One snapshot's rows: key -> row, and per field its values and presence."""

    rows: Mapping[str, int]
    values: Mapping[str, F64]
    present: Mapping[str, Mask]

    @classmethod
    def of_columns(
        cls,
        keys: Sequence[str],
        values: Mapping[str, F64],
        present: Mapping[str, Mask],
        fields: Sequence[str],
        wanted: frozenset[str] | None,
    ) -> _Snapshot:
        """From column-wise rows (canonical unique keys), keeping the ``wanted`` keys."""
        if wanted is None:
            return cls(
                {key: i for i, key in enumerate(keys)},
                {f: values[f] for f in fields},
                {f: present[f] for f in fields},
            )
        at = [i for i, key in enumerate(keys) if key in wanted]
        take = np.array(at, np.int64)
        return cls(
            {keys[i]: j for j, i in enumerate(at)},
            {f: values[f][take] for f in fields},
            {f: present[f][take] for f in fields},
        )


@dataclass(frozen=True)
class _BatchIndex:
    """A batch group's snapshots by start time."""

    valid_from: I64
    snapshots: tuple[_Snapshot, ...]

    @classmethod
    def build(
        cls,
        definitions: FeatureDefinitions,
        group: str,
        entries: Sequence[tuple[int, SnapshotRows]],
        fields: Sequence[str],
        wanted: frozenset[str] | None,
    ) -> _BatchIndex:
        ordered = sorted(entries, key=lambda e: int(e[0]))
        starts = [int(e[0]) for e in ordered]
        if len(set(starts)) != len(starts):
            raise BackfillError(f"batch group {group!r}: two snapshots share a valid_from time")
        entity = definitions.entities[definitions.batch_groups[group].entity]
        snapshots: list[_Snapshot] = []
        for valid_from, snapshot in ordered:
            columns = snapshot.columns() if isinstance(snapshot, ColumnarSnapshot) else None
            if columns is not None:
                snapshots.append(_Snapshot.of_columns(*columns, fields, wanted))
                continue
            kept: dict[str, Mapping[str, float]] = {}
            for raw, row in snapshot:
                try:
                    key = entity.key(raw)
                except EntityKeyError as exc:
                    raise BackfillError(
                        f"batch group {group!r}, snapshot from {valid_from}: {exc}"
                    ) from None
                if wanted is None or key in wanted:
                    kept[key] = row
            rows = {key: i for i, key in enumerate(kept)}
            values: dict[str, F64] = {}
            present: dict[str, Mask] = {}
            for name in fields:
                cells = [row.get(name) for row in kept.values()]
                present[name] = np.array([c is not None for c in cells], np.bool_)
                values[name] = np.array([0.0 if c is None else c for c in cells], np.float64)
            snapshots.append(_Snapshot(rows, values, present))
        return cls(np.array(starts, np.int64), tuple(snapshots))

    def fill(self, keys: _SpineKeys, times: I64, columns: Mapping[str, F64]) -> int:
        """Write the active snapshot's values into ``columns``; returns rows defaulted."""
        which = np.searchsorted(self.valid_from, times, side="right") - 1
        found = np.zeros(len(times), np.bool_)
        for s, snapshot in enumerate(self.snapshots):
            rows = np.flatnonzero(which == s)
            if not len(rows):
                continue
            at = keys.per_row(snapshot.rows)[rows]
            hit = at >= 0
            rows, at = rows[hit], at[hit]
            found[rows] = True
            for name, column in columns.items():
                have = snapshot.present[name][at]
                column[rows[have]] = snapshot.values[name][at[have]]
        return int(len(times) - found.sum())


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


@dataclass(frozen=True)
class PointInTimeIndex:
    """An event log and batch snapshots prepared once for many spines (or chunks).

    :meth:`build` replays the log by the worker's rules and indexes each selected
    stream group's kept events and each batch group's snapshots; :meth:`table` adds the
    point-in-time values to a spine. ``keys`` (entity -> keys) keeps only the snapshot
    rows of those keys (the event index always holds every key)."""

    definitions: FeatureDefinitions
    refs: tuple[FeatureRef, ...]
    windows: Mapping[str, GroupWindows]
    batches: Mapping[str, _BatchIndex]
    events_read: int
    events_malformed: int

    @classmethod
    def build(
        cls,
        definitions: FeatureDefinitions,
        events: EventSource | Mapping[str, EventSource],
        *,
        batch_snapshots: BatchSnapshots | None = None,
        features: Sequence[str] | None = None,
        keys: Mapping[str, frozenset[str]] | None = None,
    ) -> PointInTimeIndex:
        """Read ``events`` and ``batch_snapshots`` for ``features`` (default: all)."""
        refs = tuple(_selected(definitions, features))
        batch_snapshots = batch_snapshots or {}
        unknown = [g for g in batch_snapshots if g not in definitions.batch_groups]
        if unknown:
            raise BackfillError(f"unknown batch groups in the schedule: {', '.join(unknown)}")
        batch_groups = list(dict.fromkeys(r.group for r in refs if r.source is FeatureSource.BATCH))
        stream_groups = list(
            dict.fromkeys(str(r.group) for r in refs if r.source is FeatureSource.STREAM)
        )

        def build_batches() -> dict[str, _BatchIndex]:
            batches: dict[str, _BatchIndex] = {}
            for group in map(str, batch_groups):
                fields = [
                    r.name for r in refs if r.group == group and r.source is FeatureSource.BATCH
                ]
                entity = definitions.batch_groups[group].entity
                batches[group] = _BatchIndex.build(
                    definitions,
                    group,
                    batch_snapshots.get(group, ()),
                    fields,
                    None if keys is None else keys.get(entity, frozenset()),
                )
            return batches

        # The snapshots are read and indexed on a thread while the log is (Arrow and
        # numpy release the GIL for most of both); the pool is joined before returning.
        with ThreadPoolExecutor(3, thread_name_prefix="point-in-time") as pool:
            snapshots = pool.submit(build_batches)
            try:
                read, malformed, windows = _stream_windows(definitions, events, stream_groups, pool)
            except BaseException:
                snapshots.result()  # a snapshot error first, as when built first
                raise
            batches = snapshots.result()
        return cls(definitions, refs, windows, batches, read, malformed)

    def table(
        self, spine: pa.Table, timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN
    ) -> tuple[pa.Table, BackfillReport]:
        """The spine plus each row's point-in-time feature values, and the report."""
        started = time.monotonic()
        definitions, refs = self.definitions, self.refs
        names, times = _check_spine(refs, spine, timestamp_column)
        n_rows = len(times)
        entities: dict[str, _SpineKeys | None] = {}
        for group in self.batches:
            entities.setdefault(definitions.batch_groups[group].entity, None)
        for group in self.windows:
            entities.setdefault(definitions.stream_groups[group].entity, None)
        for entity in entities:
            entities[entity] = _spine_keys(spine, definitions, entity)
            if entities[entity] is None:
                logger.warning("the spine has no %r column: its groups get defaults", entity)

        values: dict[str, F64] = {}
        defaulted: dict[str, int] = {}
        invalid: dict[str, int] = {}
        for ref in refs:
            if ref.source is FeatureSource.REQUEST:
                values[ref.name] = _request_values(spine, ref, definitions, invalid)
        for group, index in self.batches.items():
            columns = {
                r.name: np.full(n_rows, r.default, np.float64)
                for r in refs
                if r.group == group and r.source is FeatureSource.BATCH
            }
            values.update(columns)
            keys = entities[definitions.batch_groups[group].entity]
            defaulted[group] = n_rows if keys is None else index.fill(keys, times, columns)
        for group, windows in self.windows.items():
            keys = entities[definitions.stream_groups[group].entity]
            wanted = [r.name for r in refs if r.group == group and r.source is FeatureSource.STREAM]
            if keys is None:
                got = windows.values(np.full(n_rows, -1, np.int64), times)
                defaulted[group] = n_rows
            else:
                got = windows.values(keys.per_row(windows.codes), times)
                defaulted[group] = int(keys.missing().sum())
            for name in wanted:
                values[name] = got[name]

        arrays = [spine.column(c) for c in spine.column_names if c not in values]
        columns_out = [c for c in spine.column_names if c not in values]
        for name in names:
            arrays.append(pa.array(values[name], type=pa.float64()))
            columns_out.append(name)
        table = pa.Table.from_arrays(arrays, names=columns_out)
        report = BackfillReport(
            out=None,
            rows=n_rows,
            columns=tuple(columns_out),
            features=tuple(names),
            events_read=self.events_read,
            events_malformed=self.events_malformed,
            events_applied={g: w.applied for g, w in self.windows.items()},
            events_late={g: w.late for g, w in self.windows.items()},
            defaulted_rows=defaulted,
            invalid_request_values=invalid,
            elapsed_s=time.monotonic() - started,
        )
        return table, report


def _stream_windows(
    definitions: FeatureDefinitions,
    events: EventSource | Mapping[str, EventSource],
    stream_groups: Sequence[str],
    pool: Executor,
) -> tuple[int, int, dict[str, GroupWindows]]:
    """The log read by the worker's rules and each group's windows (built in ``pool``):
    (records read, records malformed, group -> windows)."""
    if not stream_groups:
        return 0, 0, {}
    selected = {g: GroupEvents(GroupPlan.of(definitions, g)) for g in stream_groups}
    topic_plans: dict[str, list[GroupPlan]] = {}
    for name, sg in definitions.stream_groups.items():
        plan = selected[name].plan if name in selected else GroupPlan.of(definitions, name)
        topic_plans.setdefault(sg.topic, []).append(plan)
    reader = LogReader(topic_plans, selected)
    needed = list(dict.fromkeys(g.plan.group.topic for g in selected.values()))
    for topic, source in _events_by_topic(events, needed).items():
        reader.read_topic(topic, source)
    built = {g: pool.submit(GroupWindows.build, e) for g, e in selected.items()}
    return reader.read, reader.malformed, {g: f.result() for g, f in built.items()}


def _check_spine(
    refs: Sequence[FeatureRef], spine: pa.Table, timestamp_column: str
) -> tuple[list[str], I64]:
    """Feature names and the spine's times; refuses ambiguous or missing columns."""
    names = [r.name for r in refs]
    computed = {r.name for r in refs if r.source is not FeatureSource.REQUEST}
    clashes = [c for c in spine.column_names if c in computed]
    if clashes:
        raise BackfillError(
            f"spine columns named like computed features: {', '.join(clashes)} (drop or rename)"
        )
    if timestamp_column in names:
        raise BackfillError(f"the timestamp column {timestamp_column!r} is also a feature name")
    return names, _times(spine, timestamp_column)


def _spine_key_sets(
    definitions: FeatureDefinitions, refs: Sequence[FeatureRef], spine: pa.Table
) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for ref in refs:
        if ref.source is FeatureSource.BATCH:
            entity = definitions.batch_groups[str(ref.group)].entity
            if entity not in out:
                keys = _spine_keys(spine, definitions, entity)
                out[entity] = frozenset(k for k in (keys.keys if keys else []) if k is not None)
    return out


def point_in_time_table(
    definitions: FeatureDefinitions,
    events: EventSource | Mapping[str, EventSource],
    spine: pa.Table,
    *,
    batch_snapshots: BatchSnapshots | None = None,
    features: Sequence[str] | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
) -> tuple[pa.Table, BackfillReport]:
    """The spine plus each row's point-in-time feature values, and the report.

    ``events``: the records in log order (or a :class:`ColumnarEvents` log), or
    ``topic -> records`` when the definitions read several topics (one source is
    replayed as the log of every topic). ``batch_snapshots``: ``group ->
    [(valid_from_ms, rows)]``, rows being ``(entity id, {field: value})`` pairs (ids
    become keys by the entity's rule). ``features`` selects and orders the feature
    columns (default: every defined feature). Raises :class:`BackfillError` for
    unusable input.
    """
    started = time.monotonic()
    refs = _selected(definitions, features)
    _check_spine(refs, spine, timestamp_column)
    index = PointInTimeIndex.build(
        definitions,
        events,
        batch_snapshots=batch_snapshots,
        features=features,
        keys=_spine_key_sets(definitions, refs, spine),
    )
    table, report = index.table(spine, timestamp_column)
    return table, dataclasses.replace(report, elapsed_s=time.monotonic() - started)
