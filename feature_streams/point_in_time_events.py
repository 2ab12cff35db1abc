"""An event log as columns per stream group: the worker's rules applied, vectorised.

The point-in-time code (:mod:`feature_streams.point_in_time`) needs, per stream
group, the events the worker would have folded: the records valid for *every* group
of their topic (:func:`feature_streams.events.validate_event`, the dead-letter rule),
minus those later than ``allowed_lateness`` behind the newest event applied for their
(group, key) in log order (:func:`feature_streams.windows.is_too_late`). This module
turns a log into :class:`GroupEvents`: per group, in log order, each event's key (as
a code into the group's key list), event time and, per slot of the group's plan,
whether the event feeds the slot (its ``where`` filter) and the value it adds.

Two readers give identical results:

* records (dicts or raw JSON bytes), validated one by one with the worker's own
  functions;
* Arrow record batches (a Parquet log, :class:`ColumnarEvents`), validated column-wise.
  A Parquet row is the dict of its non-null cells, so a cell's Python value decides
  exactly as it would in a dict: key, ``where`` and odd-typed cells are judged once
  per distinct value (with the worker's functions), integer and float columns of
  event times and values by the same rule in numpy.

The lateness rule is applied to the whole log at once: an event is late when its time
is below (the greatest time among the earlier events of its key) minus the lateness.
That is the worker's rule, because a dropped event is never the newest one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]

from feature_streams.entity_keys import EntityKeyError, entity_key
from feature_streams.events import MalformedEventError, decode_event, validate_event
from feature_streams.key_columns import already_keys
from feature_streams.windows import (
    MAX_EVENT_MS,
    GroupPlan,
    InvalidEventError,
    Slot,
    SlotKind,
    event_time,
)

__all__ = [
    "ColumnarEvents",
    "GroupEvents",
    "LogReader",
    "exclusive_running_max",
    "plan_fields",
    "present_columns",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


@runtime_checkable
class ColumnarEvents(Protocol):
    """An event log readable as Arrow record batches (one column per event field,
    null meaning "field absent"), in log order."""

    def record_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The log's batches in order; ``columns``: at least these of the log's fields
        (those it has; others may be left out), default every field."""
        ...


@dataclass
class GroupEvents:
    """One stream group's events valid for its topic, in log order (before lateness)."""

    plan: GroupPlan
    keys: list[str] = field(default_factory=list)
    """Key code -> key."""
    codes: dict[str, int] = field(default_factory=dict)
    """Key -> key code."""
    _key: list[I64] = field(default_factory=list)
    _ts: list[I64] = field(default_factory=list)
    _feeds: dict[str, list[Mask]] = field(default_factory=dict)
    _value: dict[str, list[F64]] = field(default_factory=dict)

    def code_of(self, key: str) -> int:
        """The code of ``key`` (a new one when unseen)."""
        code = self.codes.get(key)
        if code is None:
            code = self.codes[key] = len(self.keys)
            self.keys.append(key)
        return code

    def codes_for(self, keys: Sequence[str | None]) -> I64:
        """:meth:`code_of` of each key in order (``-1`` for ``None``): unseen keys get new
        codes in order of first appearance, as one :meth:`code_of` call per key would."""
        codes: dict[str | None, int] = self.codes  # type: ignore[assignment]  # None: absent
        if not codes and not self.keys:  # nothing coded yet (a log's first batch)
            return self._first_codes(keys)
        found = np.fromiter(map(codes.get, keys, itertools.repeat(-1)), np.int64, len(keys))
        missing = np.flatnonzero(found < 0)
        if not len(missing):
            return found
        absent = [keys[i] for i in missing.tolist()]
        fresh = dict.fromkeys(absent)
        fresh.pop(None, None)
        if fresh:
            start = len(self.keys)
            codes.update(zip(fresh, range(start, start + len(fresh)), strict=True))
            self.keys.extend(fresh)  # type: ignore[arg-type]  # None popped
            found[missing] = np.fromiter(
                map(codes.get, absent, itertools.repeat(-1)), np.int64, len(absent)
            )
        return found

    def _first_codes(self, keys: Sequence[str | None]) -> I64:
        """:meth:`codes_for` when no key is coded yet (a log's first batch)."""
        fresh = dict.fromkeys(keys)
        fresh.pop(None, None)
        self.keys.extend(fresh)  # type: ignore[arg-type]  # None popped
        self.codes.update(zip(self.keys, range(len(self.keys)), strict=True))
        if len(fresh) == len(keys):  # distinct, no None (a batch's dictionary): in order
            return np.arange(len(keys), dtype=np.int64)
        codes: dict[str | None, int] = self.codes  # type: ignore[assignment]  # None: absent
        return np.fromiter(map(codes.get, keys, itertools.repeat(-1)), np.int64, len(keys))

    def append(
        self, key: I64, ts: I64, feeds: Mapping[str, Mask], value: Mapping[str, F64]
    ) -> None:
        """Add events (already valid) in log order."""
        self._key.append(key)
        self._ts.append(ts)
        for slot in self.plan.slots:
            self._feeds.setdefault(slot.name, []).append(feeds[slot.name])
            self._value.setdefault(slot.name, []).append(value[slot.name])

    def columns(self) -> tuple[I64, I64, dict[str, Mask], dict[str, F64]]:
        """``(key codes, times, feeds per slot, value per slot)``, whole log."""
        key = np.concatenate(self._key) if self._key else np.empty(0, np.int64)
        ts = np.concatenate(self._ts) if self._ts else np.empty(0, np.int64)
        feeds: dict[str, Mask] = {}
        value: dict[str, F64] = {}
        for s in self.plan.slots:
            fed = self._feeds.get(s.name)
            feeds[s.name] = np.concatenate(fed) if fed else np.empty(0, np.bool_)
            got = self._value.get(s.name)
            value[s.name] = np.concatenate(got) if got else np.empty(0, np.float64)
        return key, ts, feeds, value


def exclusive_running_max(
    codes: I64, ts: I64, by_key: npt.NDArray[np.intp] | None = None
) -> tuple[Mask, I64]:
    """Per event (log order): whether an earlier event has its key, and the greatest
    time among those earlier events (0 where none). ``by_key``: the events' stable sort
    by key code, when the caller has it."""
    n = len(ts)
    if n == 0:
        return np.zeros(0, np.bool_), np.zeros(0, np.int64)
    order = np.argsort(codes, kind="stable") if by_key is None else by_key
    c, t = codes[order], ts[order]
    base = int(t.min())
    span = int(t.max()) - base + 1
    uniq: I64 | None = None
    if int(c[0]) >= 0 and (int(c[-1]) + 1) * span < 1 << 62:
        rank, width = t - base, np.int64(span)  # times packed as they are: no ranking sort
    else:
        uniq, inverse = np.unique(t, return_inverse=True)
        rank, width = inverse.astype(np.int64), np.int64(len(uniq))
    # Segments by key are increasing blocks of c * width + rank: one running max resets
    # at every key because each block starts above everything before it.
    running = np.maximum.accumulate(c.astype(np.int64) * width + rank)
    first = np.ones(n, np.bool_)
    first[1:] = c[1:] != c[:-1]
    prev_rank = np.empty(n, np.int64)
    prev_rank[0] = 0
    prev_rank[1:] = running[:-1] - c[1:].astype(np.int64) * width
    prev_rank[first] = 0
    has = np.empty(n, np.bool_)
    has[order] = ~first
    newest = np.empty(n, np.int64)
    newest[order] = np.where(first, 0, prev_rank + base if uniq is None else uniq[prev_rank])
    return has, newest


# --- reading a log ------------------------------------------------------------------


@dataclass
class LogReader:
    """Reads topics' logs into the :class:`GroupEvents` of the selected groups."""

    topic_plans: Mapping[str, Sequence[GroupPlan]]
    """Every group of each topic (all validate a record)."""
    selected: Mapping[str, GroupEvents]
    """Group name -> where its events go (only groups asked for)."""
    read: int = 0
    malformed: int = 0

    def read_topic(self, topic: str, source: Iterable[object] | ColumnarEvents) -> None:
        """Feed one topic's log (records, or a columnar log) to its groups."""
        plans = self.topic_plans[topic]
        if isinstance(source, ColumnarEvents):
            for batch in source.record_batches(columns=plan_fields(plans)):
                self._batch(plans, batch)
        else:
            self._records(plans, source)

    # records, one by one (the worker's functions) ------------------------------------

    def _records(self, plans: Sequence[GroupPlan], records: Iterable[object]) -> None:
        mine = [p for p in plans if p.group.name in self.selected]
        rows: dict[str, list[tuple[int, int, list[bool], list[float]]]] = {
            p.group.name: [] for p in mine
        }
        for record in records:
            self.read += 1
            try:
                event = decode_event(record) if isinstance(record, bytes) else record
                if not isinstance(event, Mapping):
                    raise MalformedEventError("not a JSON object")
                checked = [validate_event(plan, event) for plan in plans]
            except MalformedEventError:
                self.malformed += 1
                continue
            by_group = {g.group: g for g in checked}
            for plan in mine:
                out = self.selected[plan.group.name]
                ge = by_group[plan.group.name]
                feeds, values = _contributions(plan, event, ge.ts_ms)
                rows[plan.group.name].append((out.code_of(ge.key), ge.ts_ms, feeds, values))
        for plan in mine:
            got = rows[plan.group.name]
            out = self.selected[plan.group.name]
            names = [s.name for s in plan.slots]
            key = np.array([r[0] for r in got], np.int64)
            ts = np.array([r[1] for r in got], np.int64)
            feeds_m = np.array([r[2] for r in got], np.bool_).reshape(len(got), len(names))
            vals_m = np.array([r[3] for r in got], np.float64).reshape(len(got), len(names))
            out.append(
                key,
                ts,
                {n: feeds_m[:, j].copy() for j, n in enumerate(names)},
                {n: vals_m[:, j].copy() for j, n in enumerate(names)},
            )

    # columns ---------------------------------------------------------------------

    def _batch(self, plans: Sequence[GroupPlan], batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        self.read += n
        if n == 0:
            return
        valid = np.ones(n, np.bool_)
        parsed: dict[
            str, tuple[list[str | None], npt.NDArray[np.intp], I64, dict[str, Mask], dict[str, F64]]
        ] = {}
        shared = _BatchColumns()
        for plan in plans:
            ok, keys, key_index, ts, feeds, values = _check_batch(plan, batch, shared)
            valid &= ok
            parsed[plan.group.name] = (keys, key_index, ts, feeds, values)
        self.malformed += int(n - valid.sum())
        rows = np.flatnonzero(valid)
        for plan in plans:
            out = self.selected.get(plan.group.name)
            if out is None:
                continue
            keys, key_index, ts, feeds, values = parsed[plan.group.name]
            lookup = out.codes_for(keys)
            out.append(
                lookup[key_index[rows]] if len(keys) else np.empty(0, np.int64),
                ts[rows],
                {s: m[rows] for s, m in feeds.items()},
                {s: v[rows] for s, v in values.items()},
            )


def plan_fields(plans: Sequence[GroupPlan]) -> list[str]:
    """Every event field the plans' rules read (keys, times, filters, values): a columnar
    log's other fields cannot change a verdict or a value, so they need not be read."""
    fields: list[str] = []
    for plan in plans:
        fields += [plan.group.key, plan.group.event_time_field]
        for slot in plan.slots:
            fields += [name for name, _ in slot.where]
            if slot.field is not None:
                fields.append(slot.field)
    return list(dict.fromkeys(fields))


def present_columns(names: Sequence[str], wanted: Sequence[str] | None) -> list[str] | None:
    """The ``wanted`` fields a log with columns ``names`` has, in its order (``None``:
    every column)."""
    if wanted is None:
        return None
    keep = set(wanted)
    return [n for n in names if n in keep]


def _contributions(
    plan: GroupPlan, event: Mapping[str, object], ts: int
) -> tuple[list[bool], list[float]]:
    """Per slot of a valid event: whether it feeds the slot, and its value there."""
    feeds: list[bool] = []
    values: list[float] = []
    for slot in plan.slots:
        fed = all(name in event and event[name] == want for name, want in slot.where)
        value = 0.0
        if fed:
            if slot.kind is SlotKind.COUNT:
                value = 1.0
            elif slot.field == plan.group.event_time_field:
                value = float(ts)
            elif slot.field is not None:
                value = float(event[slot.field])  # type: ignore[arg-type]
        feeds.append(fed)
        values.append(value)
    return feeds, values


def _uniques(column: pa.Array) -> tuple[list[object], npt.NDArray[np.intp]] | None:
    """Distinct Python values of a column and each row's index into them (``None``
    when Arrow cannot hash the type)."""
    encoded = _encoded(column)
    return None if encoded is None else _python_uniques(encoded)


def _encoded(column: pa.Array) -> pa.DictionaryArray | None:
    """The column dictionary encoded (nulls a value), ``None`` when Arrow cannot hash it."""
    try:
        return pc.dictionary_encode(column, null_encoding="encode")
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _python_uniques(encoded: pa.DictionaryArray) -> tuple[list[object], npt.NDArray[np.intp]]:
    values = encoded.dictionary.to_pylist()
    index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.intp)
    return values, index


def _python_values(column: pa.Array) -> list[object]:
    return list(column.to_pylist())


def _per_value(column: pa.Array, judge: object) -> npt.NDArray[np.generic]:
    """``judge(value)`` for every row, computed once per distinct value."""
    assert callable(judge)
    found = _uniques(column)
    if found is None:
        return np.array([judge(v) for v in _python_values(column)])
    values, index = found
    judged = np.array([judge(v) for v in values])
    return judged[index] if len(values) else np.empty(len(column), judged.dtype)


def _time_column(plan: GroupPlan, column: pa.Array | None, n: int) -> tuple[Mask, I64]:
    """(valid, event time) per row, by :func:`feature_streams.windows.event_time`."""
    if column is None:
        return np.zeros(n, np.bool_), np.zeros(n, np.int64)
    kind = column.type
    present = ~column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind):
        raw = column.fill_null(0).to_numpy(zero_copy_only=False)
        if pa.types.is_unsigned_integer(kind):
            ok = present & (raw <= MAX_EVENT_MS)
        else:
            ok = present & (raw >= 0) & (raw <= MAX_EVENT_MS)
        return ok, np.where(ok, raw, 0).astype(np.int64)
    if pa.types.is_floating(kind):
        raw_f = column.cast(pa.float64(), safe=False).fill_null(0.0).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            ok = present & np.isfinite(raw_f) & (np.floor(raw_f) == raw_f)
            ok &= (raw_f >= 0) & (raw_f <= MAX_EVENT_MS)
        return ok, np.where(ok, raw_f, 0).astype(np.int64)

    def judge(value: object) -> int:
        try:
            return event_time(plan, {plan.group.event_time_field: value})
        except InvalidEventError:
            return -1

    times = _per_value(column, judge).astype(np.int64)
    return times >= 0, np.maximum(times, 0)


def _is_finite_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number_column(column: pa.Array | None, n: int) -> tuple[Mask, F64]:
    """(a finite number, its float) per row, as ``validate_event`` judges a value field."""
    if column is None:
        return np.zeros(n, np.bool_), np.zeros(n, np.float64)
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        present = ~column.is_null().to_numpy(zero_copy_only=False)
        raw = column.cast(pa.float64(), safe=False).fill_null(0.0).to_numpy(zero_copy_only=False)
        ok = present & np.isfinite(raw)
        return ok, np.where(ok, raw, 0.0)
    ok_l = _per_value(column, _is_finite_number).astype(np.bool_)
    vals = _per_value(column, lambda v: float(v) if _is_finite_number(v) else 0.0)
    return ok_l, vals.astype(np.float64)


@dataclass
class _BatchColumns:
    """A batch's columns as judged once for every group and slot reading them: number
    fields, and event times of numeric columns (other types are judged per plan)."""

    times: dict[str, tuple[Mask, I64]] = field(default_factory=dict)
    numbers: dict[str, tuple[Mask, F64]] = field(default_factory=dict)

    def time_column(self, plan: GroupPlan, column: pa.Array | None, n: int) -> tuple[Mask, I64]:
        """:func:`_time_column`, shared when the rule does not depend on the plan."""
        if column is None or not (
            pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        ):
            return _time_column(plan, column, n)
        name = plan.group.event_time_field
        if name not in self.times:
            self.times[name] = _time_column(plan, column, n)
        return self.times[name]

    def number_column(self, name: str, column: pa.Array | None, n: int) -> tuple[Mask, F64]:
        """:func:`_number_column` of field ``name``."""
        if name not in self.numbers:
            self.numbers[name] = _number_column(column, n)
        return self.numbers[name]


def _check_batch(
    plan: GroupPlan, batch: pa.RecordBatch, shared: _BatchColumns | None = None
) -> tuple[Mask, list[str | None], npt.NDArray[np.intp], I64, dict[str, Mask], dict[str, F64]]:
    """One group's verdict on a batch: (valid, distinct keys, row -> key index, times,
    feeds per slot, values per slot); ``shared``: columns judged for other groups."""
    shared = shared if shared is not None else _BatchColumns()
    n = batch.num_rows
    names = set(batch.schema.names)
    group = plan.group

    def col(name: str) -> pa.Array | None:
        return batch.column(name) if name in names else None

    key_col = col(group.key)
    keys: list[str | None]
    if key_col is None:
        keys, key_index = [None], np.zeros(n, np.intp)
    else:
        encoded = _encoded(key_col)
        raw_keys, key_index = (
            _python_uniques(encoded)
            if encoded is not None
            else (_python_values(key_col), np.arange(n, dtype=np.intp))
        )
        # the distinct ids (not every row's) checked: the same verdict, one hash pass
        if encoded is not None and already_keys(encoded.dictionary, plan.key_type):
            keys = cast(list[str | None], raw_keys)  # every id its own key, nulls none
        else:
            keys = [_key_or_none(plan, v) for v in raw_keys]
    key_ok = np.array([k is not None for k in keys], np.bool_)[key_index]
    ts_ok, ts = shared.time_column(plan, col(group.event_time_field), n)
    valid = key_ok & ts_ok
    feeds: dict[str, Mask] = {}
    values: dict[str, F64] = {}
    where_cache: dict[tuple[str, object], tuple[Mask, Mask]] = {}
    for slot in plan.slots:
        fed = np.ones(n, np.bool_)
        for name, want in slot.where:
            cached = where_cache.get((name, want))
            if cached is None:
                cached = _where_column(col(name), want, n)
                where_cache[(name, want)] = cached
            scalar, equal = cached
            valid &= scalar
            fed &= equal
        feeds[slot.name] = fed
        values[slot.name] = _slot_values(plan, slot, col, fed, ts, valid, n, shared)
    return valid, keys, key_index, ts, feeds, values


def _slot_values(
    plan: GroupPlan,
    slot: Slot,
    col: object,
    fed: Mask,
    ts: I64,
    valid: Mask,
    n: int,
    shared: _BatchColumns,
) -> F64:
    """A slot's value per row; rows fed a non-number become invalid (``valid`` in place)."""
    assert callable(col)
    if slot.kind is SlotKind.COUNT:
        return np.where(fed, 1.0, 0.0)
    if slot.field is None or slot.field == plan.group.event_time_field:
        return np.where(fed, ts.astype(np.float64), 0.0)
    ok, number = shared.number_column(slot.field, col(slot.field), n)
    valid &= ~fed | ok
    return np.where(fed & ok, number, 0.0)


def _key_or_none(plan: GroupPlan, value: object) -> str | None:
    if value is None:
        return None
    try:
        return entity_key(plan.key_type, value)
    except EntityKeyError:
        return None


def _where_column(column: pa.Array | None, want: object, n: int) -> tuple[Mask, Mask]:
    """(a JSON scalar, equal to ``want``) per row, as ``validate_event`` judges a filter."""
    if column is None:
        return np.zeros(n, np.bool_), np.zeros(n, np.bool_)

    def judge(value: object) -> tuple[bool, bool]:
        scalar = value is not None and isinstance(value, str | int | float)
        return scalar, bool(scalar and value == want)

    judged = _per_value(column, judge)
    if judged.size == 0:
        return np.zeros(n, np.bool_), np.zeros(n, np.bool_)
    return judged[:, 0].astype(np.bool_), judged[:, 1].astype(np.bool_)
