"""Pure tile/window math for stream features: no I/O, no clock.

Every function takes explicit epoch-millisecond timestamps. The stream worker
(events -> tile updates), the tile store (Redis hash <-> tiles), the server
(tiles -> feature values at request time) and the backfill (event log -> values
at past times) all call this module, so online and offline values agree.

API by caller (``plan = GroupPlan.of(defs, name)``, once)::

    worker      event_key(plan, ev), event_time(plan, ev), is_too_late(ms, max_seen, L),
                updates_for_event(plan, ev) -> [TileUpdate]   (InvalidEventError: drop+count)
    tile store  TileUpdate.args(), expired_fields(plan, hkeys, now), plan.retention_ms
    server      read_hash(plan, hgetall_result, t) -> {feature: float}
                (the server's hot path uses hash_reader.HashWindowReader, held equal to it)
    backfill    point_in_time_values(plan, events, times), or fold + read_window
    in memory   fold, merge_tiles, read_window, tiles_to_hash / tiles_from_hash

Slots and tiles
---------------
A :class:`GroupPlan` is compiled once from a stream group definition. Each
aggregation reads one or two *slots*: a mergeable intermediate of one kind
(count, sum, min, max, last) over one value field, one ``where`` filter and one
tile size. Aggregations share slots (``count_5m`` and ``count_1h`` both read
``count@1m``)::

    count            -> count                  sum  -> sum(f)
    mean             -> sum(f), count          min  -> min(f)     max -> max(f)
    last             -> last(f): (ts, value) of the event with the greatest (ts, value)
    time_since_last  -> max(<event time field>)

An event with event time ``e`` is folded into the tile starting at
``tile_start(e, T) = floor(e / T) * T`` of each slot whose filter it passes.
Merging never subtracts: counts and sums add, min/max compare, and ``last``
keeps the greater ``(ts, value)`` pair (ties on ``ts`` go to the larger value), so
tiles are the same whatever order events arrive in.

Window semantics (exact)
------------------------
Feature ``(agg, window W, tile T)`` read at request time ``t`` merges every tile
of its slots whose start ``s`` satisfies::

    floor(t - W, T) <= s < t

For tiles built from the events with ``ts < t`` (what the backfill folds, see
:func:`point_in_time_values`) the value is exactly the aggregate of the events with
``floor(t - W, T) <= ts < t``: a sawtooth window whose start snaps to a tile
boundary, between ``W`` and ``W + T`` long, that excludes the event being scored
(``ts == t``). Online, the store holds every event already applied, so the head
tile (``s < t < s + T``) also contributes applied events with ``ts >= t`` (client
clock skew, or ``t`` behind the stream); tiles starting at or after ``t`` never do.
A count thus falls to 0 by itself once ``floor(t - W, T)`` passes the last event.

Finalize, when the window holds no event: the aggregation's ``default``.
Otherwise ``count`` -> n, ``sum``, ``mean`` -> sum / n, ``min``, ``max``,
``last`` -> its value, ``time_since_last`` -> ``min(max(t - ts_last, 0), W) / 1000``
seconds (capped at the window, never negative). Every value is a ``float``. A window's
sum over tiles is correctly rounded (``math.fsum``), so it does not depend on the order
tiles are read in; within a tile, sums are exact up to float rounding in arrival order
(Redis ``HINCRBYFLOAT`` uses long double).

Redis hash layout
-----------------
One hash per (group, entity key). Tile fields are ``"<tile_start_ms>:<slot name>"``
holding a decimal number; a ``last`` slot also has ``"<tile_start_ms>:<slot
name>:ts"`` holding the integer event time. Fields that do not start with a
digit belong to the store (e.g. its offset guard) and are ignored here; fields
of slots no longer defined are ignored on read and listed by :func:`expired_fields`.
:func:`updates_for_event` turns one event into :class:`TileUpdate` s the apply
script performs (each on a distinct field, so in any order) with these semantics,
numbers compared as numbers (``cur`` = ``HGET field``)::

    incr  HINCRBYFLOAT field value                  (count, sum: additive)
    min   if cur == nil or value < cur then HSET field value
    max   if cur == nil or value > cur then HSET field value
    last  c = HGET ts_field
          if c == nil or ts > c or (ts == c and value > cur)
          then HSET field value ts_field ts

:func:`read_hash` turns a fetched hash back into feature values at ``t``.

Expiry and lateness
-------------------
An event is too late when ``event_ms < max_seen_ms - allowed_lateness`` for its
key/partition (:func:`is_too_late`); the worker counts and drops it. With ``now``
the latest event time seen for the key, a slot's tile is expired when
``s < floor(now - lateness - H, T)``, ``H`` being the longest window reading the
slot: no read at ``t >= now - lateness`` and no accepted late event touches it.
:attr:`GroupPlan.retention_ms` is how long after its last write a whole hash stays
useful.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from feature_streams.definitions import (
    AggKind,
    FeatureDefinitions,
    StreamGroup,
    format_duration,
)
from feature_streams.entity_keys import EntityKeyError, KeyType, entity_key

__all__ = [
    "GroupPlan",
    "InvalidEventError",
    "LastValue",
    "OutputPlan",
    "Slot",
    "SlotKind",
    "SlotValue",
    "TileUpdate",
    "Tiles",
    "UpdateOp",
    "drop_expired",
    "event_key",
    "event_time",
    "expired_fields",
    "expiry_cutoff",
    "field_name",
    "finalize",
    "fold",
    "is_too_late",
    "merge_tiles",
    "merge_value",
    "point_in_time_values",
    "read_hash",
    "read_window",
    "tile_start",
    "tiles_from_hash",
    "tiles_to_hash",
    "updates_for_event",
    "window_start",
]

logger = logging.getLogger(__name__)

MAX_EVENT_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the latest event time accepted."""

TS_SUFFIX = ":ts"
"""Suffix of the hash field holding a ``last`` slot's event time."""


class InvalidEventError(ValueError):
    """An event lacks a field the group needs, or holds a non-number there."""


class SlotKind(StrEnum):
    """Kinds of mergeable per-tile intermediate."""

    COUNT = "count"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    LAST = "last"


class LastValue(NamedTuple):
    """Intermediate of a ``last`` slot; compares as ``(ts_ms, value)``."""

    ts_ms: int
    value: float


SlotValue = float | LastValue
"""A slot's intermediate in one tile: ``LastValue`` for ``last``, else a float."""

Tiles = dict[str, dict[int, SlotValue]]
"""In-memory tiles of one entity in one group: slot name -> tile start ms -> value."""

WhereItems = tuple[tuple[str, bool | int | str], ...]


@dataclass(frozen=True, slots=True)
class Slot:
    """One mergeable intermediate kept per tile. ``name`` is stable and readable,
    e.g. ``count@1m``, ``sum(amount)@1h``, ``count[is_international=1]@1h``."""

    name: str
    kind: SlotKind
    tile_ms: int
    field: str | None
    where: WhereItems

    @classmethod
    def make(cls, kind: SlotKind, tile_ms: int, field: str | None, where: WhereItems = ()) -> Slot:
        """Build a slot with its canonical name (``where`` is sorted by field)."""
        where = tuple(sorted(where))
        name = kind.value if field is None else f"{kind.value}({field})"
        if where:
            name += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in where) + "]"
        return cls(f"{name}@{format_duration(tile_ms)}", kind, tile_ms, field, where)


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """One stream feature: which slots it reads and how it is finalized.
    ``slots`` is ``(sum, count)`` for mean and a single slot otherwise."""

    name: str
    agg: AggKind
    window_ms: int
    tile_ms: int
    default: float
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """A stream group compiled for tile math. Build with :meth:`build`."""

    group: StreamGroup
    slots: tuple[Slot, ...]
    outputs: tuple[OutputPlan, ...]
    by_name: Mapping[str, Slot]
    horizon_ms: Mapping[str, int]
    """Slot name -> longest window that reads it."""
    retention_ms: int
    """``max(H + T) + lateness`` over slots: after this long without writes (in event
    time) every tile of a hash is expired, so the store may expire the whole key."""
    field_suffixes: Mapping[str | bytes, tuple[Slot, bool]]
    """Hash field text after ``"<start>:"`` (str and bytes) -> (slot, is the ts half)."""
    key_type: KeyType = "str"
    """The group's entity's key type: how :func:`event_key` makes an event's key."""

    @classmethod
    def of(cls, definitions: FeatureDefinitions, name: str) -> GroupPlan:
        """The plan of the defined stream group ``name``, keyed by its entity's rule."""
        group = definitions.stream_groups[name]
        return cls.build(group, definitions.entities[group.entity].key_type)

    @classmethod
    def build(cls, group: StreamGroup, key_type: KeyType = "str") -> GroupPlan:
        """Compile a (validated) stream group whose entity has ``key_type``
        (:meth:`of` looks it up in the definitions)."""
        slots: dict[str, Slot] = {}
        horizon: dict[str, int] = {}
        outputs: list[OutputPlan] = []

        for agg in group.aggregations:
            tile = group.tile_for(agg)
            where: WhereItems = tuple(agg.where.items())
            if agg.agg is AggKind.MEAN:
                wanted = [(SlotKind.SUM, agg.field), (SlotKind.COUNT, None)]
            elif agg.agg is AggKind.TIME_SINCE_LAST:
                wanted = [(SlotKind.MAX, group.event_time_field)]
            elif agg.agg is AggKind.COUNT:
                wanted = [(SlotKind.COUNT, None)]
            else:
                wanted = [(SlotKind(agg.agg.value), agg.field)]
            used: list[Slot] = []
            for kind, fld in wanted:
                slot = Slot.make(kind, tile, fld, where)
                slot = slots.setdefault(slot.name, slot)
                horizon[slot.name] = max(horizon.get(slot.name, 0), agg.window_ms)
                used.append(slot)
            outputs.append(
                OutputPlan(agg.name, agg.agg, agg.window_ms, tile, agg.default_value, tuple(used))
            )
        retention = max(horizon[s.name] + s.tile_ms for s in slots.values())
        suffixes: dict[str | bytes, tuple[Slot, bool]] = {}
        for slot in slots.values():
            for text, is_ts in ((slot.name, False), (slot.name + TS_SUFFIX, True)):
                if is_ts and slot.kind is not SlotKind.LAST:
                    continue
                suffixes[text] = suffixes[text.encode()] = (slot, is_ts)
        return cls(
            group=group,
            slots=tuple(slots.values()),
            outputs=tuple(outputs),
            by_name=MappingProxyType(slots),
            horizon_ms=MappingProxyType(horizon),
            retention_ms=retention + group.allowed_lateness_ms,
            field_suffixes=MappingProxyType(suffixes),
            key_type=key_type,
        )


# --- time ----------------------------------------------------------------------


def tile_start(ts_ms: int, tile_ms: int) -> int:
    """Start of the tile of size ``tile_ms`` holding event time ``ts_ms``."""
    return ts_ms - ts_ms % tile_ms


def window_start(t_ms: int, window_ms: int, tile_ms: int) -> int:
    """Earliest tile start read at ``t_ms``: ``floor(t - W, T)``."""
    return tile_start(t_ms - window_ms, tile_ms)


def is_too_late(event_ms: int, max_seen_ms: int | None, lateness_ms: int) -> bool:
    """Whether an event is later than the allowed lateness behind the latest event
    time seen (for its key or partition); ``None`` means nothing seen yet."""
    return max_seen_ms is not None and event_ms < max_seen_ms - lateness_ms


# --- events --------------------------------------------------------------------


def event_time(plan: GroupPlan, event: Mapping[str, object]) -> int:
    """The event's event time in ms; raises :class:`InvalidEventError`."""
    name = plan.group.event_time_field
    value = event.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EVENT_MS:
        shown = repr(value)[:40]
        raise InvalidEventError(
            f"event field {name!r}: expected epoch milliseconds up to 9999-12-31, got {shown}"
        )
    return value


def event_key(plan: GroupPlan, event: Mapping[str, object]) -> str:
    """The event's entity key (:func:`feature_streams.entity_keys.entity_key` under the
    plan's ``key_type``); raises :class:`InvalidEventError`."""
    name = plan.group.key
    value = event.get(name)
    if value is None:
        raise InvalidEventError(f"event field {name!r}: expected a key, got {value!r}")
    try:
        return entity_key(plan.key_type, value)
    except EntityKeyError as exc:
        raise InvalidEventError(f"event field {name!r}: {exc}"[:300]) from None


def _number(event: Mapping[str, object], name: str) -> float:
    value = event.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        if math.isfinite(number):
            return number
    shown = repr(value)[:40]
    raise InvalidEventError(f"event field {name!r}: expected a finite number, got {shown}")


def _matches(where: WhereItems, event: Mapping[str, object]) -> bool:
    return all(name in event and event[name] == want for name, want in where)


def _contributions(
    plan: GroupPlan, event: Mapping[str, object]
) -> tuple[int, list[tuple[Slot, SlotValue]]]:
    ts = event_time(plan, event)
    out: list[tuple[Slot, SlotValue]] = []
    for slot in plan.slots:
        if slot.where and not _matches(slot.where, event):
            continue
        if slot.kind is SlotKind.COUNT:
            out.append((slot, 1.0))
        elif slot.field is None:  # pragma: no cover - Slot.make never builds this
            raise AssertionError(slot.name)
        elif slot.field == plan.group.event_time_field:
            out.append((slot, float(ts)))
        elif slot.kind is SlotKind.LAST:
            out.append((slot, LastValue(ts, _number(event, slot.field))))
        else:
            out.append((slot, _number(event, slot.field)))
    return ts, out


# --- in-memory tiles -----------------------------------------------------------


def merge_value(kind: SlotKind, a: SlotValue, b: SlotValue) -> SlotValue:
    """Merge two intermediates of one slot kind (commutative and associative)."""
    if isinstance(a, LastValue) and isinstance(b, LastValue):
        if kind is not SlotKind.LAST:
            raise TypeError(f"{kind} slot holds a LastValue")
        return a if a >= b else b
    if isinstance(a, LastValue) or isinstance(b, LastValue) or kind is SlotKind.LAST:
        raise TypeError(f"mismatched intermediates for a {kind} slot: {a!r}, {b!r}")
    if kind is SlotKind.MIN:
        return min(a, b)
    if kind is SlotKind.MAX:
        return max(a, b)
    return a + b


def _put(tiles: Tiles, slot: Slot, start: int, value: SlotValue) -> None:
    per_slot = tiles.setdefault(slot.name, {})
    current = per_slot.get(start)
    per_slot[start] = value if current is None else merge_value(slot.kind, current, value)


def fold(plan: GroupPlan, tiles: Tiles, event: Mapping[str, object]) -> None:
    """Fold one event into ``tiles`` in place; raises :class:`InvalidEventError`."""
    ts, contributions = _contributions(plan, event)
    for slot, value in contributions:
        _put(tiles, slot, tile_start(ts, slot.tile_ms), value)


def merge_tiles(plan: GroupPlan, a: Tiles, b: Tiles) -> Tiles:
    """A new tile set holding both ``a`` and ``b`` (slots unknown to ``plan`` are dropped)."""
    out: Tiles = {}
    for tiles in (a, b):
        for name, per_slot in tiles.items():
            slot = plan.by_name.get(name)
            if slot is not None:
                for start, value in per_slot.items():
                    _put(out, slot, start, value)
    return out


def _merge_range(
    slot: Slot, per_slot: Mapping[int, SlotValue] | None, lo: int, t_ms: int
) -> SlotValue | None:
    if not per_slot:
        return None
    step = slot.tile_ms
    if (t_ms - lo + step - 1) // step < len(per_slot):  # fewer candidates than tiles: probe
        values = [v for s in range(lo, t_ms, step) if (v := per_slot.get(s)) is not None]
    else:
        values = [v for s, v in per_slot.items() if lo <= s < t_ms]
    if not values:
        return None
    # The same result as folding merge_value over them, with builtins for speed; sums
    # are correctly rounded (fsum), so the order tiles come in never changes a value.
    if slot.kind is SlotKind.LAST:
        return max(v for v in values if isinstance(v, LastValue))
    numbers = [v for v in values if not isinstance(v, LastValue)]
    if slot.kind is SlotKind.MIN:
        return min(numbers)
    if slot.kind is SlotKind.MAX:
        return max(numbers)
    return math.fsum(numbers)


def finalize(output: OutputPlan, merged: Sequence[SlotValue | None], t_ms: int) -> float:
    """Feature value from the window's merged intermediates (one per ``output.slots``)."""
    first = merged[0]
    if first is None:
        return output.default
    if isinstance(first, LastValue):
        return first.value
    if output.agg is AggKind.MEAN:
        count = merged[1]
        if not isinstance(count, float) or count <= 0:
            return output.default
        return first / count
    if output.agg is AggKind.TIME_SINCE_LAST:
        return min(max(t_ms - first, 0.0), float(output.window_ms)) / 1000.0
    return first


def read_window(
    plan: GroupPlan, tiles: Mapping[str, Mapping[int, SlotValue]], t_ms: int
) -> dict[str, float]:
    """Every feature of the group at request time ``t_ms`` (see module docstring)."""
    cache: dict[tuple[str, int], SlotValue | None] = {}
    out: dict[str, float] = {}
    for output in plan.outputs:
        lo = window_start(t_ms, output.window_ms, output.tile_ms)
        merged: list[SlotValue | None] = []
        for slot in output.slots:
            key = (slot.name, lo)
            if key not in cache:
                cache[key] = _merge_range(slot, tiles.get(slot.name), lo, t_ms)
            merged.append(cache[key])
        out[output.name] = finalize(output, merged, t_ms)
    return out


def expiry_cutoff(plan: GroupPlan, slot: Slot, now_ms: int) -> int:
    """Tiles of ``slot`` starting before this are expired at ``now_ms``."""
    horizon = plan.horizon_ms[slot.name]
    return tile_start(now_ms - plan.group.allowed_lateness_ms - horizon, slot.tile_ms)


def drop_expired(plan: GroupPlan, tiles: Tiles, now_ms: int) -> None:
    """Remove expired tiles (and slots unknown to ``plan``) from ``tiles`` in place."""
    for name in list(tiles):
        slot = plan.by_name.get(name)
        if slot is None:
            del tiles[name]
            continue
        cutoff = expiry_cutoff(plan, slot, now_ms)
        per_slot = tiles[name]
        for start in [s for s in per_slot if s < cutoff]:
            del per_slot[start]


def point_in_time_values(
    plan: GroupPlan, events: Sequence[Mapping[str, object]], times: Sequence[int]
) -> list[dict[str, float]]:
    """Backfill reference for one entity: the group's values at each of ``times``
    (any order), each from exactly the events with event time ``< t``.

    Apply the worker's lateness filter to ``events`` first (in log order) to
    reproduce what the online store kept.
    """
    timed = sorted(((event_time(plan, e), i) for i, e in enumerate(events)))
    order = sorted(range(len(times)), key=times.__getitem__)
    trim_every = max(slot.tile_ms for slot in plan.slots)
    tiles: Tiles = {}
    results: list[dict[str, float]] = [{} for _ in times]
    j = 0
    last_trim: int | None = None
    for k in order:
        t = times[k]
        while j < len(timed) and timed[j][0] < t:
            fold(plan, tiles, events[timed[j][1]])
            j += 1
        if last_trim is None or t - last_trim >= trim_every:
            drop_expired(plan, tiles, t)
            last_trim = t
        results[k] = read_window(plan, tiles, t)
    return results


# --- Redis hash representation -------------------------------------------------


class UpdateOp(StrEnum):
    """Operations of the tile apply script (see module docstring)."""

    INCR = "incr"
    MIN = "min"
    MAX = "max"
    LAST = "last"


_OP_OF_KIND = {
    SlotKind.COUNT: UpdateOp.INCR,
    SlotKind.SUM: UpdateOp.INCR,
    SlotKind.MIN: UpdateOp.MIN,
    SlotKind.MAX: UpdateOp.MAX,
    SlotKind.LAST: UpdateOp.LAST,
}


def _fmt(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True, slots=True)
class TileUpdate:
    """One hash-field update; ``ts_field``/``ts_ms`` are set for ``last`` only."""

    op: UpdateOp
    field: str
    value: float
    ts_field: str = ""
    ts_ms: int = 0

    def args(self) -> tuple[str, str, str, str, str]:
        """Script arguments ``op, field, value, ts_field, ts`` (empty strings when unused)."""
        ts = str(self.ts_ms) if self.op is UpdateOp.LAST else ""
        return (self.op.value, self.field, _fmt(self.value), self.ts_field, ts)


def field_name(slot_name: str, start_ms: int) -> str:
    """Hash field of one slot's tile: ``"<start_ms>:<slot name>"``."""
    return f"{start_ms}:{slot_name}"


def updates_for_event(plan: GroupPlan, event: Mapping[str, object]) -> list[TileUpdate]:
    """The field updates folding ``event`` into its tiles; applying them to a hash has
    the effect of :func:`fold`. Raises :class:`InvalidEventError`."""
    ts, contributions = _contributions(plan, event)
    updates: list[TileUpdate] = []
    for slot, value in contributions:
        name = field_name(slot.name, tile_start(ts, slot.tile_ms))
        if isinstance(value, LastValue):
            updates.append(TileUpdate(UpdateOp.LAST, name, value.value, name + TS_SUFFIX, ts))
        else:
            updates.append(TileUpdate(_OP_OF_KIND[slot.kind], name, value))
    return updates


def tiles_to_hash(tiles: Mapping[str, Mapping[int, SlotValue]]) -> dict[str, str]:
    """Tiles as the flat hash fields the apply script maintains."""
    out: dict[str, str] = {}
    for name, per_slot in tiles.items():
        for start, value in per_slot.items():
            key = field_name(name, start)
            if isinstance(value, LastValue):
                out[key] = _fmt(value.value)
                out[key + TS_SUFFIX] = str(value.ts_ms)
            else:
                out[key] = _fmt(value)
    return out


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _is_tile_field(key: str) -> bool:
    start, sep, _ = key.partition(":")
    return bool(sep) and start.isdigit()


def tiles_from_hash(
    plan: GroupPlan,
    fields: Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, float],
    t_ms: int | None = None,
    t_last_ms: int | None = None,
) -> Tiles:
    """Parse a fetched hash (``str`` or ``bytes``); ignores non-tile and unknown fields.

    With ``t_ms`` (and ``t_last_ms`` >= it, for reads at several times), tiles no
    window reads at those times (older than the slot's longest window before
    ``t_ms``, or starting at or after ``t_last_ms``) are skipped without being
    parsed: a read then costs what the windows hold, not what the hash has kept.
    """
    suffixes = plan.field_suffixes
    earliest: dict[str, int] = {}
    if t_ms is not None:
        earliest = {
            s.name: window_start(t_ms, plan.horizon_ms[s.name], s.tile_ms) for s in plan.slots
        }
    latest = t_last_ms if t_last_ms is not None else t_ms
    tiles: Tiles = {}
    halves: dict[tuple[str, int], list[float | None]] = {}  # (slot, start) -> [value, ts]
    items: Iterable[tuple[str | bytes, str | bytes | float]] = fields.items()
    for key, raw in items:
        start, _, rest = key.partition(b":") if isinstance(key, bytes) else key.partition(":")
        entry = suffixes.get(rest)
        if entry is None or not start.isdigit():
            continue
        slot, is_ts = entry
        tile = int(start)
        if latest is not None and (tile >= latest or tile < earliest[slot.name]):
            continue
        if slot.kind is SlotKind.LAST:
            pair = halves.setdefault((slot.name, tile), [None, None])
            pair[1 if is_ts else 0] = float(raw)
        else:
            per_slot = tiles.get(slot.name)
            if per_slot is None:
                per_slot = tiles[slot.name] = {}
            per_slot[tile] = float(raw)
    for (name, tile), (value, ts) in halves.items():
        if value is None or ts is None:
            logger.warning("half-written last tile %s", field_name(name, tile))
            continue
        tiles.setdefault(name, {})[tile] = LastValue(int(ts), value)
    return tiles


def read_hash(
    plan: GroupPlan,
    fields: Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, float],
    t_ms: int,
) -> dict[str, float]:
    """Every feature of the group at ``t_ms`` from a fetched hash (``HGETALL``)."""
    return read_window(plan, tiles_from_hash(plan, fields, t_ms), t_ms)


def expired_fields(plan: GroupPlan, fields: Iterable[str | bytes], now_ms: int) -> list[str]:
    """Tile fields to delete at ``now_ms``: expired tiles and slots no longer defined.
    Non-tile fields are never returned."""
    out: list[str] = []
    for raw in fields:
        key = _text(raw)
        if not _is_tile_field(key):
            continue
        start, _, rest = key.partition(":")
        entry = plan.field_suffixes.get(rest)
        if entry is None or int(start) < expiry_cutoff(plan, entry[0], now_ms):
            out.append(key)
    return out
