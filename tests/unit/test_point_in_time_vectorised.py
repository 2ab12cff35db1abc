"""The vectorised point-in-time values equal the reference fold, bit for bit.

The reference is the worker's lateness rule applied record by record
(:func:`feature_streams.windows.is_too_late`, in log order per key) followed by
:func:`feature_streams.windows.point_in_time_values` (fold events ``< t`` into tiles,
read the window): the code path the backfill used before it was vectorised. Random
logs have out-of-order and late events, times on tile and window edges, repeated
times, ties in ``last``, ``where`` filters, keys without events and spine rows
without ids; the vectorised engine must give exactly the same float64 for every
feature and row, from records and from a Parquet (columnar) log alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_streams.backfill import ParquetEvents
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.point_in_time import point_in_time_table
from feature_streams.point_in_time_events import (
    GroupEvents,
    LogReader,
    exclusive_running_max,
    plan_fields,
)
from feature_streams.point_in_time_windows import (
    _key_time_order,
    _Packed,
    _row_order,
    _RowEvents,
)
from feature_streams.windows import GroupPlan, event_key, event_time, is_too_late
from feature_streams.windows import point_in_time_values as reference_values

MIN = 60_000
HOUR = 60 * MIN
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (24 * HOUR)  # a day boundary

DEFS = """
version: 1
entities:
  card_id: {key_type: str}
  merchant_id: {key_type: int}
stream_groups:
  card:
    topic: tx
    entity: card_id
    event_time_field: ts
    allowed_lateness: 3m
    tiles:
      - {size: 1m, max_window: 1h}
      - {size: 1h, max_window: 1d}
    aggregations:
      - {name: n_5m, agg: count, window: 5m}
      - {name: sum_5m, agg: sum, field: amount, window: 5m}
      - {name: sum_1d, agg: sum, field: amount, window: 1d}
      - {name: mean_1h, agg: mean, field: amount, window: 1h, default: -1.0}
      - {name: min_1h, agg: min, field: amount, window: 1h, default: -2.0}
      - {name: max_1d, agg: max, field: amount, window: 1d, default: -3.0}
      - {name: last_1h, agg: last, field: amount, window: 1h, default: -4.0}
      - {name: last_1d, agg: last, field: amount, window: 1d, default: -4.0}
      - {name: since_1h, agg: time_since_last, window: 1h, default: 3600.0}
      - {name: intl_sum_1h, agg: sum, field: amount, window: 1h, where: {intl: 1}}
      - {name: intl_n_1d, agg: count, window: 1d, where: {intl: 1}}
  merchant:
    topic: tx
    entity: merchant_id
    event_time_field: ts
    allowed_lateness: 1ms
    tiles:
      - {size: 1m, max_window: 1h}
    aggregations:
      - {name: m_n_1h, agg: count, window: 1h}
      - {name: m_sum_1h, agg: sum, field: amount, window: 1h}
"""

# Times cluster on tile edges (multiples of a minute/hour, +-1 ms) so window edges bite.
_offsets = st.one_of(
    st.integers(0, 4 * HOUR),
    st.integers(0, 4 * 60).map(lambda m: m * MIN),
    st.integers(0, 4 * 60).map(lambda m: m * MIN - 1),
    st.integers(0, 4).map(lambda h: h * HOUR + 1),
)
_amounts = st.one_of(
    st.integers(-500, 500).map(lambda c: c / 100),  # cents: sums round
    # not below 1e-9 in magnitude: a 1e-136 beside 0.1 + 0.2 puts the exact sum within
    # 2**-100 of a rounding tie, the documented limit of the compensated sum
    # (feature_streams/point_in_time_windows.py), where the last bit may differ
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).filter(
        lambda x: x == 0 or abs(x) >= 1e-9
    ),
    st.sampled_from([0.1, 0.2, 0.3, 1e16, -1e16, 3.0]),  # cancellation, ties
)
_event = st.fixed_dictionaries(
    {
        "card_id": st.sampled_from(["a", "b", " a", "c"]),
        "merchant_id": st.sampled_from([1, 2, "03"]),
        "ts": _offsets,
        "amount": _amounts,
        "intl": st.sampled_from([0, 1, 1.0, True]),
    }
)


def _in_log_order(drawn: list[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Rising times, each pulled back by its jitter (up to 5 min: some beyond lateness)."""
    ordered = sorted(drawn, key=lambda d: int(d[0]["ts"]))
    return [{**e, "ts": T0 + max(int(e["ts"]) - jitter, 0)} for e, jitter in ordered]


_events = st.lists(
    st.tuples(_event, st.one_of(st.just(0), st.integers(0, 5 * MIN))), max_size=150
).map(_in_log_order)
_spine = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", None]),
        st.sampled_from([1, 2, 3, None]),
        st.one_of(_offsets, _offsets.map(lambda o: o + 1)),
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def defs() -> FeatureDefinitions:
    return parse_definitions(DEFS)


def reference_table(
    defs: FeatureDefinitions, events: Sequence[Mapping[str, Any]], spine: pa.Table
) -> dict[str, list[float]]:
    """Every stream feature per spine row, by the record-by-record reference."""
    out: dict[str, list[float]] = {}
    times = spine.column("ts_ms").to_pylist()
    for name in defs.stream_groups:
        plan = GroupPlan.of(defs, name)
        kept: dict[str, list[Mapping[str, Any]]] = {}
        newest: dict[str, int] = {}
        for ev in events:
            key, ts = event_key(plan, ev), event_time(plan, ev)
            if is_too_late(ts, newest.get(key), plan.group.allowed_lateness_ms):
                continue
            newest[key] = max(ts, newest.get(key, ts))
            kept.setdefault(key, []).append(ev)
        entity = defs.entities[plan.group.entity]
        ids = spine.column(plan.group.entity).to_pylist()
        rows = [
            reference_values(plan, kept.get(entity.key(i), []), [t])[0] if i is not None else None
            for i, t in zip(ids, times, strict=True)
        ]
        for output in plan.outputs:
            out[output.name] = [output.default if r is None else r[output.name] for r in rows]
    return out


def spine_table(rows: Sequence[tuple[str | None, int | None, int]]) -> pa.Table:
    return pa.table(
        {
            "card_id": [r[0] for r in rows],
            "merchant_id": pa.array([r[1] for r in rows], pa.int64()),
            "ts_ms": [T0 + r[2] for r in rows],
        }
    )


def assert_bit_equal(got: pa.Table, want: Mapping[str, list[float]]) -> None:
    for name, values in want.items():
        a = np.array(got.column(name).to_pylist(), np.float64)
        b = np.array(values, np.float64)
        assert a.tobytes() == b.tobytes() or np.array_equal(a, b), (name, a, b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=_events, rows=_spine)
def test_vectorised_equals_the_reference_fold(
    defs: FeatureDefinitions, events: list[dict[str, Any]], rows: list[Any]
) -> None:
    spine = spine_table(rows)
    got, report = point_in_time_table(defs, events, spine)
    assert_bit_equal(got, reference_table(defs, events, spine))
    assert report.events_read == len(events)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(events=_events, rows=_spine)
def test_a_parquet_log_gives_the_records_values(
    defs: FeatureDefinitions, tmp_path: Path, events: list[dict[str, Any]], rows: list[Any]
) -> None:
    spine = spine_table(rows)
    columns = {
        "card_id": pa.array([e["card_id"] for e in events], pa.string()),
        "merchant_id": pa.array([str(e["merchant_id"]) for e in events], pa.string()),
        "ts": pa.array([e["ts"] for e in events], pa.int64()),
        "amount": pa.array([e["amount"] for e in events], pa.float64()),
        "intl": pa.array([int(e["intl"]) for e in events], pa.int64()),
    }
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table(columns), path)
    as_records = [{k: columns[k][i].as_py() for k in columns} for i in range(len(events))]
    from_columns, report = point_in_time_table(defs, ParquetEvents(path), spine)
    from_records, _ = point_in_time_table(defs, as_records, spine)
    assert from_columns.equals(from_records)
    assert report.events_read == len(events)


def test_malformed_parquet_cells_feed_no_group_as_records_would(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "card_id": ["a", "a", None, "a", "a", "a", "a", "  ", "a"],
            "merchant_id": ["1", "1", "1", "x", "1", "1", "1", "1", "1"],
            "ts": pa.array([T0, T0 + 1, T0 + 2, T0 + 3, None, T0 + 5, T0 + 6, T0 + 7, -1]),
            "amount": [1.0, None, 1.0, 1.0, 1.0, float("nan"), 2.0, 1.0, 1.0],
            "intl": pa.array([1, 1, 1, 1, 1, 1, None, 1, 1]),
        }
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    spine = spine_table([("a", 1, 10 * MIN)])
    records = [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
    from_columns, report = point_in_time_table(defs, ParquetEvents(path), spine)
    from_records, by_record = point_in_time_table(defs, records, spine)
    assert from_columns.equals(from_records)
    assert report.events_malformed == by_record.events_malformed == 8
    assert from_columns.column("n_5m").to_pylist() == [0.0]  # 10 min later: outside 5m
    assert from_columns.column("sum_1d").to_pylist() == [1.0]


@given(
    codes=st.lists(st.integers(0, 4), max_size=60),
    data=st.data(),
)
def test_exclusive_running_max_is_the_max_of_earlier_events_of_the_key(
    codes: list[int], data: st.DataObject
) -> None:
    # times far apart (up to 2**62) cannot be packed with the key: the ranked path
    wide = data.draw(st.booleans())
    times = st.integers(0, 1 << 62) if wide else st.integers(0, 50)
    ts = data.draw(st.lists(times, min_size=len(codes), max_size=len(codes)))
    has, newest = exclusive_running_max(np.array(codes, np.int64), np.array(ts, np.int64))
    for i, code in enumerate(codes):
        earlier = [t for c, t in zip(codes[:i], ts[:i], strict=True) if c == code]
        assert bool(has[i]) == bool(earlier)
        if earlier:
            assert int(newest[i]) == max(earlier)


@given(
    st.lists(st.tuples(st.integers(-1, 6), st.integers(0, 3 * HOUR)), max_size=60),
    st.booleans(),
)
def test_row_order_is_the_lexsort_of_code_then_time(
    rows: list[tuple[int, int]], far_apart: bool
) -> None:
    """The packed stable sort gives lexsort's order, ties kept in row order; times too
    far apart to pack fall back to lexsort itself."""
    code = np.array([c for c, _ in rows], np.int64)
    times = np.array([t for _, t in rows], np.int64) + T0
    if far_apart and len(times):
        times[0] = 1 << 61  # (code + 2) * span overflows: the lexsort path
    assert np.array_equal(_row_order(code, times), np.lexsort((times, code)))


@given(
    st.lists(st.lists(st.one_of(st.none(), st.sampled_from("abcdefgh")), max_size=12), max_size=4)
)
def test_codes_for_a_batch_are_code_of_key_by_key(batches: list[list[str | None]]) -> None:
    """Batch by batch (keys seen before, repeated, absent): the same codes, and the same
    key <-> code tables, as one ``code_of`` call per key in order."""
    plan = GroupPlan.of(parse_definitions(DEFS), "card")
    batched, one_by_one = GroupEvents(plan), GroupEvents(plan)
    for keys in batches:
        got = batched.codes_for(keys)
        want = [one_by_one.code_of(k) if k is not None else -1 for k in keys]
        assert got.dtype == np.int64
        assert got.tolist() == want
    assert batched.codes == one_by_one.codes
    assert batched.keys == one_by_one.keys


@given(
    st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8),
    st.lists(st.one_of(st.none(), st.sampled_from("abcdefghij")), max_size=12),
)
def test_codes_for_a_distinct_first_batch_are_code_of_key_by_key(
    first: list[str], then: list[str | None]
) -> None:
    """A log's first batch is its dictionary (distinct keys): coded in order, and the
    batches after it see the same tables as one ``code_of`` call per key."""
    plan = GroupPlan.of(parse_definitions(DEFS), "card")
    batched, one_by_one = GroupEvents(plan), GroupEvents(plan)
    for keys in (list[str | None](first), then):
        want = [one_by_one.code_of(k) if k is not None else -1 for k in keys]
        assert batched.codes_for(keys).tolist() == want
    assert batched.codes == one_by_one.codes
    assert batched.keys == one_by_one.keys


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), max_size=60),
    st.booleans(),
)
def test_key_time_order_is_the_lexsort_of_key_time_and_log_order(
    events: list[tuple[int, int]], in_time_order: bool
) -> None:
    """With every key's events in time order (the shortcut) or not (the lexsort)."""
    if in_time_order:
        events = sorted(events, key=lambda e: e[1])
    code = np.array([c for c, _ in events], np.int64)
    ts = np.array([t for _, t in events], np.int64)
    by_key = np.argsort(code, kind="stable")
    want = np.lexsort((np.arange(len(ts)), ts, code))
    assert np.array_equal(_key_time_order(code, ts, by_key), want)


def test_a_columnar_log_is_read_for_the_plans_fields_only(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    """Fields no rule reads are not asked for (nor decoded); the values are unchanged."""
    plans = [GroupPlan.of(defs, "card"), GroupPlan.of(defs, "merchant")]
    assert plan_fields(plans) == ["card_id", "ts", "amount", "intl", "merchant_id"]
    table = pa.table(
        {
            "card_id": ["a", "a"],
            "merchant_id": ["1", "1"],
            "ts": [T0, T0 + MIN],
            "amount": [1.0, 2.0],
            "intl": [1, 0],
            "note": [{"x": 1}, None],  # a nested column no rule reads
        }
    )
    pq.write_table(table, path := tmp_path / "events.parquet")
    asked: list[list[str] | None] = []

    class Spy(ParquetEvents):
        def record_batches(self, columns: Sequence[str] | None = None) -> Any:
            asked.append(None if columns is None else list(columns))
            return super().record_batches(columns)

    selected = {p.group.name: GroupEvents(p) for p in plans}
    reader = LogReader({"tx": plans}, selected)
    reader.read_topic("tx", Spy(path))
    assert asked == [plan_fields(plans)]
    assert reader.read == 2 and reader.malformed == 0
    spine = spine_table([("a", 1, 2 * MIN)])
    projected, _ = point_in_time_table(defs, ParquetEvents(path), spine)
    whole, _ = point_in_time_table(defs, table.drop_columns(["note"]).to_pylist(), spine)
    assert projected.equals(whole)


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 40)), min_size=1, max_size=60),
    st.lists(st.tuples(st.integers(-1, 8), st.integers(-5, 50)), max_size=60),
)
def test_a_chunks_excerpt_searches_as_the_whole_log(
    events: list[tuple[int, int]], rows: list[tuple[int, int]]
) -> None:
    """Rows sorted by key (some without a key, some keys without events, times outside
    the events' span): the excerpt's positions are the whole search's."""
    events = sorted(events)
    code = np.array([c for c, _ in events], np.int64)
    ts = np.array([t for _, t in events], np.int64) + T0
    packed = _Packed.of(code, ts, ncodes=9)
    assert packed is not None
    rows = sorted(rows)
    row_code = np.array([c for c, _ in rows], np.int64)
    at = np.array([t for _, t in rows], np.int64) + T0
    assert packed.fits(row_code)
    want = packed.positions(row_code, at)
    got = _RowEvents.of(packed, row_code).positions(at)
    assert want is not None
    assert got.tolist() == want.tolist()
