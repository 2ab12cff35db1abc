"""Tile/window math against a brute-force fold of the raw events (Chronon-style)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_streams.definitions import AggKind, parse_definitions
from feature_streams.windows import (
    GroupPlan,
    InvalidEventError,
    LastValue,
    OutputPlan,
    Tiles,
    TileUpdate,
    UpdateOp,
    drop_expired,
    event_key,
    expired_fields,
    expiry_cutoff,
    fold,
    is_too_late,
    merge_tiles,
    merge_value,
    point_in_time_values,
    read_hash,
    read_window,
    tile_start,
    tiles_from_hash,
    tiles_to_hash,
    updates_for_event,
    window_start,
)

MIN = 60_000
HOUR = 60 * MIN
LATENESS = 10 * MIN
BASE = 1_700_000_001_234  # deliberately not on a tile boundary

GROUP_YAML = """
entities: {card_id: {}}
stream_groups:
  g:
    topic: transactions
    entity: card_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles:
      - {size: 1m, max_window: 1h}
      - {size: 1h, max_window: 7d}
    aggregations:
      - {name: count_5m, agg: count, window: 5m}
      - {name: count_2h, agg: count, window: 2h}
      - {name: count_3m_hourly, agg: count, window: 3h, tile: 1h}
      - {name: sum_5m, agg: sum, field: amount, window: 5m}
      - {name: sum_3h, agg: sum, field: amount, window: 3h}
      - {name: mean_30m, agg: mean, field: amount, window: 30m, default: -1.0}
      - {name: mean_2h, agg: mean, field: amount, window: 2h, default: -1.0}
      - {name: min_2h, agg: min, field: amount, window: 2h, default: -2.0}
      - {name: max_5m, agg: max, field: amount, window: 5m, default: -3.0}
      - {name: last_1h, agg: last, field: amount, window: 1h, default: -4.0}
      - {name: last_3h, agg: last, field: amount, window: 3h, default: -4.0}
      - {name: since_30m, agg: time_since_last, window: 30m, default: 1800.0}
      - {name: since_2h, agg: time_since_last, window: 2h, default: 7200.0}
      - {name: flagged_10m, agg: count, window: 10m, where: {flag: 1}}
      - {name: flagged_max_2h, agg: max, field: amount, window: 2h, where: {flag: 1},
         default: -5.0}
"""
PLAN = GroupPlan.build(parse_definitions(GROUP_YAML).stream_groups["g"])
AGG_BY_NAME = {a.name: a for a in PLAN.group.aggregations}


@dataclass(frozen=True)
class Ev:
    ts: int
    amount: float
    flag: int

    def as_event(self) -> dict[str, object]:
        return {"card_id": "c1", "ts": self.ts, "amount": self.amount, "flag": self.flag}


# --- brute force: straight from the raw event list -----------------------------


def brute_force(out: OutputPlan, events: Sequence[Ev], t: int, *, online: bool) -> float:
    """The documented semantics, computed without tiles.

    Backfill (``online=False``): events with ``floor(t - W, T) <= ts < t``.
    Online (everything applied): events whose tile starts in ``[floor(t - W, T), t)``.
    """
    size = out.tile_ms
    lo = (t - out.window_ms) // size * size
    where = AGG_BY_NAME[out.name].where
    chosen = [
        e
        for e in events
        if lo <= e.ts
        and ((e.ts // size * size) < t if online else e.ts < t)
        and all(getattr(e, k) == v for k, v in where.items())
    ]
    if not chosen:
        return out.default
    amounts = [e.amount for e in chosen]
    if out.agg is AggKind.COUNT:
        return float(len(chosen))
    if out.agg is AggKind.SUM:
        return sum(amounts)
    if out.agg is AggKind.MEAN:
        return sum(amounts) / len(amounts)
    if out.agg is AggKind.MIN:
        return min(amounts)
    if out.agg is AggKind.MAX:
        return max(amounts)
    if out.agg is AggKind.LAST:
        return max((e.ts, e.amount) for e in chosen)[1]
    assert out.agg is AggKind.TIME_SINCE_LAST
    latest = max(e.ts for e in chosen)
    return min(max(t - latest, 0), out.window_ms) / 1000.0


def brute_all(events: Sequence[Ev], t: int, *, online: bool) -> dict[str, float]:
    return {o.name: brute_force(o, events, t, online=online) for o in PLAN.outputs}


def fold_all(events: Sequence[Ev]) -> Tiles:
    tiles: Tiles = {}
    for e in events:
        fold(PLAN, tiles, e.as_event())
    return tiles


def apply_updates(hash_: dict[str, str], updates: Sequence[TileUpdate]) -> None:
    """What the Redis apply script does, using only the string arguments it receives."""
    for update in updates:
        op, field, value, ts_field, ts = update.args()
        current = hash_.get(field)
        if op == "incr":
            hash_[field] = repr(float(current or 0.0) + float(value))
        elif op == "min":
            if current is None or float(value) < float(current):
                hash_[field] = value
        elif op == "max":
            if current is None or float(value) > float(current):
                hash_[field] = value
        elif op == "last":
            current_ts = hash_.get(ts_field)
            if (
                current_ts is None
                or int(ts) > int(current_ts)
                or (int(ts) == int(current_ts) and float(value) > float(current or "-inf"))
            ):
                hash_[field] = value
                hash_[ts_field] = ts
        else:  # pragma: no cover
            raise AssertionError(op)


# --- strategies ----------------------------------------------------------------


@st.composite
def arrivals(draw: st.DrawFn) -> list[Ev]:
    """Events in arrival order: out of order, but never later than the lateness."""
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 20 * MIN),  # watermark advance
                st.integers(0, LATENESS),  # how far behind the watermark
                st.integers(-4000, 40_000),  # amount in quarters: sums stay exact
                st.integers(0, 1),  # flag
            ),
            max_size=40,
        )
    )
    watermark = BASE
    events = []
    for advance, delay, quarters, flag in steps:
        watermark += advance
        events.append(Ev(watermark - delay, quarters / 4, flag))
    return events


def request_times(events: Sequence[Ev]) -> st.SearchStrategy[list[int]]:
    last = max((e.ts for e in events), default=BASE)
    # Event times and tile boundaries, where off-by-one errors live.
    anchors = [a for e in events for a in (e.ts, e.ts // MIN * MIN, e.ts // HOUR * HOUR)]
    near = st.sampled_from([a + d for a in anchors for d in (-1, 0, 1)] or [BASE])
    return st.lists(
        st.one_of(st.integers(BASE - HOUR, last + 4 * HOUR), near), min_size=1, max_size=8
    )


# --- properties ----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data(), events=arrivals())
def test_backfill_equals_brute_force(data: st.DataObject, events: list[Ev]) -> None:
    max_seen: int | None = None
    for e in events:  # the generator honours the lateness the worker enforces
        assert not is_too_late(e.ts, max_seen, LATENESS)
        max_seen = e.ts if max_seen is None else max(max_seen, e.ts)

    times = data.draw(request_times(events))
    got = point_in_time_values(PLAN, [e.as_event() for e in events], times)
    assert got == [brute_all(events, t, online=False) for t in times]

    # The same read over tiles folded in a random order from the events with ts < t.
    shuffled = data.draw(st.permutations(events))
    for t in times:
        assert read_window(PLAN, fold_all([e for e in shuffled if e.ts < t]), t) == brute_all(
            events, t, online=False
        )


@settings(max_examples=100, deadline=None)
@given(data=st.data(), events=arrivals())
def test_online_read_equals_brute_force(data: st.DataObject, events: list[Ev]) -> None:
    tiles = fold_all(data.draw(st.permutations(events)))
    for t in data.draw(request_times(events)):
        assert read_window(PLAN, tiles, t) == brute_all(events, t, online=True)


@settings(max_examples=100, deadline=None)
@given(events=arrivals(), parts=st.lists(st.integers(0, 2), min_size=40, max_size=40))
def test_merge_is_associative_and_commutative(events: list[Ev], parts: list[int]) -> None:
    a, b, c = (
        fold_all([e for e, p in zip(events, parts, strict=False) if p == i]) for i in range(3)
    )
    whole = fold_all(events)
    assert merge_tiles(PLAN, merge_tiles(PLAN, a, b), c) == whole
    assert merge_tiles(PLAN, a, merge_tiles(PLAN, b, c)) == whole
    assert merge_tiles(PLAN, merge_tiles(PLAN, c, a), b) == whole
    assert merge_tiles(PLAN, b, a) == merge_tiles(PLAN, a, b)


@settings(max_examples=100, deadline=None)
@given(events=arrivals(), t_offset=st.integers(-HOUR, 8 * HOUR))
def test_hash_round_trip_and_script_updates_equal_fold(events: list[Ev], t_offset: int) -> None:
    tiles = fold_all(events)
    flat = tiles_to_hash(tiles)
    assert tiles_from_hash(PLAN, flat) == tiles
    as_bytes = {k.encode(): v.encode() for k, v in flat.items()}
    assert tiles_from_hash(PLAN, as_bytes) == tiles

    applied: dict[str, str] = {"offset:0": "41"}  # a store field, ignored by the parser
    for e in events:
        apply_updates(applied, updates_for_event(PLAN, e.as_event()))
    assert set(applied) - {"offset:0"} == set(flat)
    assert tiles_from_hash(PLAN, applied) == tiles

    t = BASE + t_offset
    assert read_hash(PLAN, applied, t) == read_window(PLAN, tiles, t)


@settings(max_examples=100, deadline=None)
@given(events=arrivals().filter(bool), t_offsets=st.lists(st.integers(0, 8 * HOUR), max_size=6))
def test_trimming_expired_tiles_never_changes_a_read(
    events: list[Ev], t_offsets: list[int]
) -> None:
    now = max(e.ts for e in events)
    tiles = fold_all(events)
    flat = tiles_to_hash(tiles)
    doomed = expired_fields(PLAN, flat, now)
    kept = {k: v for k, v in flat.items() if k not in doomed}
    trimmed = fold_all(events)
    drop_expired(PLAN, trimmed, now)
    assert tiles_from_hash(PLAN, kept) == {k: v for k, v in trimmed.items() if v}
    for t in [now - LATENESS, *(now - LATENESS + d for d in t_offsets)]:
        assert read_hash(PLAN, kept, t) == read_window(PLAN, tiles, t)


# --- examples ------------------------------------------------------------------


def test_tile_placement_and_window_start() -> None:
    assert tile_start(BASE, MIN) == BASE - BASE % MIN
    assert tile_start(120_000, MIN) == 120_000
    assert tile_start(179_999, MIN) == 120_000
    # floor(t - W, T): the sawtooth start snaps down to a tile boundary.
    assert window_start(10 * MIN + 30_000, 5 * MIN, MIN) == 5 * MIN
    assert window_start(10 * MIN, 5 * MIN, MIN) == 5 * MIN


def test_count_decays_to_zero_without_new_events() -> None:
    ts = 100 * HOUR + 90_000  # inside the 1m tile starting at 100h + 1m
    tiles = fold_all([Ev(ts, 10.0, 1)])
    out = read_window(PLAN, tiles, ts + 1)
    assert out["count_5m"] == 1.0 and out["since_30m"] == 0.001
    # The tile [100h+1m, 100h+2m) stays in the 5m window while floor(t - 5m) <= its start.
    last_in = 100 * HOUR + 7 * MIN - 1
    assert read_window(PLAN, tiles, last_in)["count_5m"] == 1.0
    gone = read_window(PLAN, tiles, last_in + 1)
    assert gone["count_5m"] == 0.0
    assert gone["max_5m"] == -3.0  # the default of an empty window
    assert gone["count_2h"] == 1.0
    later = read_window(PLAN, tiles, ts + 5 * HOUR)
    assert later["count_2h"] == 0.0 and later["since_2h"] == 7200.0
    assert later["mean_2h"] == -1.0 and later["last_3h"] == -4.0


def test_scored_event_is_not_in_its_own_window() -> None:
    ts = 100 * HOUR  # on a tile boundary: the tile starting at t is not read
    assert read_window(PLAN, fold_all([Ev(ts, 5.0, 0)]), ts) == brute_all([], ts, online=True)
    assert point_in_time_values(PLAN, [Ev(ts, 5.0, 0).as_event()], [ts, ts + 1]) == [
        brute_all([], ts, online=False),
        brute_all([Ev(ts, 5.0, 0)], ts + 1, online=False),
    ]


def test_time_since_last_is_capped_and_never_negative() -> None:
    ts = 100 * HOUR + 30_000
    tiles = fold_all([Ev(ts, 1.0, 0)])
    # Online the head tile may hold an event after t (clock skew): clamp to 0.
    assert read_window(PLAN, tiles, ts - 10_000)["since_30m"] == 0.0
    # Sawtooth: the window can reach W + T back, the value stays <= W.
    assert read_window(PLAN, tiles, ts + 30 * MIN + 20_000)["since_30m"] == 1800.0


def test_last_breaks_timestamp_ties_by_value_whatever_the_order() -> None:
    ts = 100 * HOUR
    one = fold_all([Ev(ts, 3.0, 0), Ev(ts, 7.0, 0)])
    two = fold_all([Ev(ts, 7.0, 0), Ev(ts, 3.0, 0)])
    assert one == two
    assert read_window(PLAN, one, ts + 1)["last_1h"] == 7.0
    kind = PLAN.by_name["last(amount)@1m"].kind
    assert merge_value(kind, LastValue(1, 9.0), LastValue(2, 1.0)) == LastValue(2, 1.0)
    assert merge_value(kind, LastValue(2, 1.0), LastValue(1, 9.0)) == LastValue(2, 1.0)


def test_where_filter_matches_bool_and_int_equally() -> None:
    tiles: Tiles = {}
    fold(PLAN, tiles, {"card_id": "c", "ts": 100 * HOUR, "amount": 1.0, "flag": True})
    fold(PLAN, tiles, {"card_id": "c", "ts": 100 * HOUR, "amount": 1.0, "flag": "1"})
    fold(PLAN, tiles, {"card_id": "c", "ts": 100 * HOUR, "amount": 1.0})
    out = read_window(PLAN, tiles, 100 * HOUR + 1)
    assert out["flagged_10m"] == 1.0 and out["count_5m"] == 3.0


def test_lateness() -> None:
    assert not is_too_late(1_000, None, LATENESS)
    assert not is_too_late(BASE - LATENESS, BASE, LATENESS)
    assert is_too_late(BASE - LATENESS - 1, BASE, LATENESS)
    assert not is_too_late(BASE + HOUR, BASE, LATENESS)


def test_expiry() -> None:
    now = 1000 * HOUR
    slot = PLAN.by_name["count@1m"]  # read by count_5m and mean_30m (count_2h uses 1h tiles)
    assert PLAN.horizon_ms["count@1m"] == 30 * MIN
    assert expiry_cutoff(PLAN, slot, now) == now - LATENESS - 30 * MIN
    fields = [
        f"{now - 41 * MIN}:count@1m",  # expired
        f"{now - 40 * MIN}:count@1m",  # still readable at t = now - lateness
        f"{now - 100 * HOUR}:last(amount)@1h:ts",  # expired, both halves go
        f"{now - 100 * HOUR}:last(amount)@1h",
        f"{now}:count(removed)@1m",  # slot no longer defined
        "offset:3",  # the store's own field
    ]
    assert expired_fields(PLAN, fields, now) == [fields[0], fields[2], fields[3], fields[4]]
    assert expired_fields(PLAN, [f.encode() for f in fields], now) == expired_fields(
        PLAN, fields, now
    )
    longest = max(PLAN.horizon_ms[s.name] + s.tile_ms for s in PLAN.slots)
    assert PLAN.retention_ms == longest + LATENESS


def test_update_list_shape() -> None:
    ts = 100 * HOUR + 61_000
    updates = updates_for_event(PLAN, Ev(ts, 2.5, 1).as_event())
    by_field = {u.field: u for u in updates}
    minute, hour = tile_start(ts, MIN), tile_start(ts, HOUR)
    assert by_field[f"{minute}:count@1m"].args() == ("incr", f"{minute}:count@1m", "1.0", "", "")
    last = by_field[f"{hour}:last(amount)@1h"]
    assert last.op is UpdateOp.LAST and last.ts_field == f"{hour}:last(amount)@1h:ts"
    assert last.args()[2:] == ("2.5", f"{hour}:last(amount)@1h:ts", str(ts))
    assert by_field[f"{hour}:max(ts)@1h"].op is UpdateOp.MAX
    assert by_field[f"{minute}:max(amount)@1m"].op is UpdateOp.MAX
    assert f"{minute}:count[flag=1]@1m" in by_field
    # One update per slot the event passes the filter of.
    assert len(updates) == len(PLAN.slots)
    assert len(updates_for_event(PLAN, Ev(ts, 2.5, 0).as_event())) == len(
        [s for s in PLAN.slots if not s.where]
    )


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"card_id": "c", "ts": 1, "flag": 0}, "amount"),
        ({"card_id": "c", "ts": 1, "amount": "12", "flag": 0}, "amount"),
        ({"card_id": "c", "ts": 1, "amount": float("nan"), "flag": 0}, "amount"),
        ({"card_id": "c", "amount": 1.0}, "ts"),
        ({"card_id": "c", "ts": "2024-01-01", "amount": 1.0}, "ts"),
        ({"card_id": "c", "ts": True, "amount": 1.0}, "ts"),
    ],
)
def test_invalid_events_name_the_field(event: Mapping[str, object], field: str) -> None:
    with pytest.raises(InvalidEventError, match=repr(field)):
        updates_for_event(PLAN, event)
    with pytest.raises(InvalidEventError, match=repr(field)):
        fold(PLAN, {}, event)


def test_event_key() -> None:
    assert event_key(PLAN, {"card_id": "c-1"}) == "c-1"
    assert event_key(PLAN, {"card_id": 42}) == "42"
    for bad in ({}, {"card_id": ""}, {"card_id": None}, {"card_id": True}):
        with pytest.raises(InvalidEventError, match="card_id"):
            event_key(PLAN, bad)


def test_slots_are_shared_between_windows() -> None:
    names = {s.name for s in PLAN.slots}
    assert "count@1m" in names and "count@1h" in names
    mean = next(o for o in PLAN.outputs if o.name == "mean_2h")
    assert [s.name for s in mean.slots] == ["sum(amount)@1h", "count@1h"]
    assert len(names) == len(PLAN.slots)


def test_backfill_with_many_queries_matches_brute_force() -> None:
    rng = random.Random(7)
    events = [
        Ev(BASE + rng.randrange(0, 48 * HOUR), rng.randrange(1, 400) / 4, rng.randrange(2))
        for _ in range(150)
    ]
    times = [BASE + rng.randrange(-HOUR, 52 * HOUR) for _ in range(100)]
    got = point_in_time_values(PLAN, [e.as_event() for e in events], times)
    assert got == [brute_all(events, t, online=False) for t in times]
