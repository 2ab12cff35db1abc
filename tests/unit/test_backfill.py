"""Point-in-time backfill against a brute-force reading of the documented semantics.

The brute force below is written from the docstrings of ``feature_streams.windows``
(window = events with ``floor(t - W, T) <= ts < t``) and ``tile_store`` (an event is
dropped when ``ts < newest applied ts of its key - lateness``, in log order), not
from their code, so a drift in either the backfill or the shared window code fails.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from feature_streams.backfill import (
    BackfillError,
    backfill,
    backfill_index,
    backfill_table,
    read_manifest_features,
)
from feature_streams.backfill_cli import main_backfill
from feature_streams.batch_load import read_file_columns
from feature_streams.definitions import (
    AggKind,
    FeatureDefinitions,
    StreamGroup,
    feature_sources,
    parse_definitions,
)
from feature_streams.point_in_time import BatchSnapshots, SnapshotRows, point_in_time_table

REPO = Path(__file__).resolve().parents[2]
MIN = 60_000
HOUR = 60 * MIN
T0 = 1_700_000_000_000  # minute-aligned

DEFS = """
version: 1
entities:
  card_id: {key_type: str}
  merchant_id: {key_type: str}
  customer_id: {key_type: str}
batch_groups:
  profile:
    entity: customer_id
    fields:
      limit: {dtype: float, default: 100.0}
      risk: {dtype: float, default: 0.5}
stream_groups:
  card:
    topic: tx
    entity: card_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles:
      - {size: 1m, max_window: 1h}
      - {size: 1h, max_window: 1d}
    aggregations:
      - {name: n_5m, agg: count, window: 5m}
      - {name: n_1h, agg: count, window: 1h}
      - {name: sum_1h, agg: sum, field: amount, window: 1h}
      - {name: mean_1d, agg: mean, field: amount, window: 1d, default: -1.0}
      - {name: min_1h, agg: min, field: amount, window: 1h, default: -2.0}
      - {name: max_1d, agg: max, field: amount, window: 1d, default: -3.0}
      - {name: last_1h, agg: last, field: amount, window: 1h, default: -4.0}
      - {name: since_1d, agg: time_since_last, window: 1d, default: 86400.0}
      - {name: intl_1h, agg: count, window: 1h, where: {intl: 1}}
  merchant:
    topic: tx
    entity: merchant_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles:
      - {size: 1m, max_window: 1h}
    aggregations:
      - {name: m_n_1h, agg: count, window: 1h}
request_features:
  amount: {dtype: float, gt: 0, default: 7.0}
  hour: {dtype: int, ge: 0, le: 23, default: 12}
"""


@pytest.fixture
def defs() -> FeatureDefinitions:
    return parse_definitions(DEFS)


# --- brute force ------------------------------------------------------------------------


def kept_by_worker_rule(
    group: StreamGroup, events: Sequence[Mapping[str, Any]]
) -> dict[str, list[Mapping[str, Any]]]:
    """Per key, in log order: drop an event older than newest applied - lateness."""
    kept: dict[str, list[Mapping[str, Any]]] = {}
    newest: dict[str, int] = {}
    for ev in events:
        key, ts = str(ev[group.key]), int(ev[group.event_time_field])
        if key in newest and ts < newest[key] - group.allowed_lateness_ms:
            continue
        newest[key] = max(ts, newest.get(key, ts))
        kept.setdefault(key, []).append(ev)
    return kept


def brute_force(
    group: StreamGroup, events: Sequence[Mapping[str, Any]], t: int
) -> dict[str, float]:
    """Every aggregation of ``group`` at ``t`` over one key's kept events."""
    out: dict[str, float] = {}
    for agg in group.aggregations:
        tile = group.tile_for(agg)
        lo = (t - agg.window_ms) - (t - agg.window_ms) % tile
        inside = [
            e
            for e in events
            if lo <= e[group.event_time_field] < t
            and all(e.get(k) == v for k, v in agg.where.items())
        ]
        if not inside:
            out[agg.name] = agg.default_value
            continue
        amounts = [float(e[agg.field]) for e in inside] if agg.field else []
        times = [int(e[group.event_time_field]) for e in inside]
        if agg.agg is AggKind.COUNT:
            out[agg.name] = float(len(inside))
        elif agg.agg is AggKind.SUM:
            out[agg.name] = sum(amounts)
        elif agg.agg is AggKind.MEAN:
            out[agg.name] = sum(amounts) / len(amounts)
        elif agg.agg is AggKind.MIN:
            out[agg.name] = min(amounts)
        elif agg.agg is AggKind.MAX:
            out[agg.name] = max(amounts)
        elif agg.agg is AggKind.LAST:
            out[agg.name] = max(zip(times, amounts, strict=True))[1]
        else:
            out[agg.name] = min(max(t - max(times), 0), agg.window_ms) / 1000.0
    return out


# --- helpers ------------------------------------------------------------------------------


def random_events(seed: int, n: int, jitter_ms: int) -> list[dict[str, Any]]:
    """Rising event times over 6 h, each pulled back by up to ``jitter_ms``."""
    rng = random.Random(seed)
    return [
        {
            "card_id": f"c{rng.randrange(6)}",
            "merchant_id": f"m{rng.randrange(3)}",
            "ts": T0 + i * 6 * HOUR // n - rng.randrange(jitter_ms + 1),
            "amount": round(rng.uniform(1, 500), 2),
            "intl": rng.choice((0, 0, 1)),
        }
        for i in range(n)
    ]


def spine_rows(seed: int, n: int) -> pa.Table:
    rng = random.Random(seed)
    return pa.table(
        {
            "card_id": [f"c{rng.randrange(7)}" for _ in range(n)],  # c6 has no events
            "merchant_id": [f"m{rng.randrange(3)}" for _ in range(n)],
            "ts_ms": [T0 - HOUR + rng.randrange(32 * HOUR) for _ in range(n)],
            "label": [rng.randrange(2) for _ in range(n)],
        }
    )


def column(table: pa.Table, name: str) -> list[Any]:
    return list(table.column(name).to_pylist())


def assert_stream_matches(
    defs: FeatureDefinitions, events: Sequence[Mapping[str, Any]], table: pa.Table
) -> None:
    times = column(table, "ts_ms")
    for group in defs.stream_groups.values():
        kept = kept_by_worker_rule(group, events)
        ids = column(table, group.entity)
        for row, (key, t) in enumerate(zip(ids, times, strict=True)):
            want = brute_force(group, kept.get(key, []), t)
            for name, value in want.items():
                if name not in table.column_names:
                    continue
                got = table.column(name)[row].as_py()
                assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-9), (row, key, t, name)


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any] | bytes]) -> Path:
    with path.open("wb") as out:
        for record in records:
            raw = record if isinstance(record, bytes) else json.dumps(record).encode()
            out.write(raw + b"\n")
    return path


# --- tests ------------------------------------------------------------------------------


def test_stream_values_equal_brute_force_with_out_of_order_and_late_events(
    defs: FeatureDefinitions,
) -> None:
    events = random_events(1, 1500, jitter_ms=14 * MIN)  # some beyond the 10 min lateness
    spine = spine_rows(2, 400)
    table, report = backfill_table(defs, events, spine)
    assert_stream_matches(defs, events, table)
    assert report.events_read == 1500 and report.events_malformed == 0
    for name, group in defs.stream_groups.items():
        n_kept = sum(len(v) for v in kept_by_worker_rule(group, events).values())
        assert report.events_applied[name] == n_kept
        assert report.events_late[name] == len(events) - n_kept > 0
    assert max(column(table, "n_1h")) > 3  # the windows are not trivially empty


def test_late_events_are_dropped_per_key_against_the_newest_applied(
    defs: FeatureDefinitions,
) -> None:
    def ev(card: str, minute: int, amount: float) -> dict[str, Any]:
        return {
            "card_id": card,
            "merchant_id": "m",
            "ts": T0 + minute * MIN,
            "amount": amount,
            "intl": 0,
        }

    events = [
        ev("a", 100, 1.0),
        ev("a", 89, 2.0),  # 11 min behind a's newest: too late, dropped
        ev("b", 85, 4.0),  # another key: its own newest, kept
        ev("a", 90, 8.0),  # exactly the lateness behind: kept
        ev("a", 80, 16.0),  # still compared with 100, not with the dropped 89: dropped
    ]
    spine = pa.table({"card_id": ["a", "b"], "ts_ms": [T0 + 101 * MIN] * 2})
    table, report = backfill_table(defs, events, spine, features=["sum_1h", "n_1h"])
    assert column(table, "sum_1h") == [9.0, 4.0]
    assert column(table, "n_1h") == [2.0, 1.0]
    assert report.events_late == {"card": 2}
    # In order, nothing is late: the same events then count fully.
    ordered = sorted(events, key=lambda e: int(e["ts"]))
    table, report = backfill_table(defs, ordered, spine, features=["sum_1h"])
    assert column(table, "sum_1h") == [27.0, 4.0] and report.events_late == {"card": 0}


def test_out_of_order_within_lateness_gives_the_sorted_result(defs: FeatureDefinitions) -> None:
    events = random_events(3, 800, jitter_ms=9 * MIN)  # never late
    spine = spine_rows(4, 150)
    shuffled, _ = backfill_table(defs, events, spine)
    in_order = sorted(events, key=lambda e: int(e["ts"]))
    ordered, _ = backfill_table(defs, in_order, spine)
    assert shuffled.equals(ordered)


def test_times_exclude_the_event_being_scored(defs: FeatureDefinitions) -> None:
    events = [{"card_id": "a", "merchant_id": "m", "ts": T0 + 30_000, "amount": 5.0, "intl": 1}]
    spine = pa.table({"card_id": ["a", "a", "a"], "ts_ms": [T0 + 30_000, T0 + 30_001, T0]})
    table, _ = backfill_table(defs, events, spine, features=["n_5m", "since_1d", "intl_1h"])
    assert column(table, "n_5m") == [0.0, 1.0, 0.0]
    assert column(table, "since_1d") == [86400.0, 0.001, 86400.0]
    assert column(table, "intl_1h") == [0.0, 1.0, 0.0]


def test_malformed_records_feed_no_group_of_their_topic(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    good = {"card_id": "a", "merchant_id": "m", "ts": T0, "amount": 5.0, "intl": 0}
    records: list[Mapping[str, Any] | bytes] = [
        good,
        b"{not json",
        {**good, "merchant_id": None},  # bad for the merchant group: the card group skips it too
        {**good, "amount": "12"},  # not a number
        {**good, "ts": -5},
        b"[1, 2]",
        {"card_id": "a", "merchant_id": "m", "ts": T0 + 1, "amount": 1.0},  # no intl: bad filter
    ]
    path = write_jsonl(tmp_path / "events.jsonl", records)
    spine = pa.table({"card_id": ["a"], "merchant_id": ["m"], "ts_ms": [T0 + MIN]})
    table, report = backfill_table(defs, path, spine, features=["n_5m", "m_n_1h"])
    assert (column(table, "n_5m"), column(table, "m_n_1h")) == ([1.0], [1.0])
    assert report.events_read == 7 and report.events_malformed == 6
    # Only the card group asked for: records bad for the merchant group still feed nothing.
    table, _ = backfill_table(defs, path, spine, features=["n_5m"])
    assert column(table, "n_5m") == [1.0]


def test_parquet_and_json_lines_events_give_the_same_output(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    events = random_events(5, 600, jitter_ms=12 * MIN)
    jsonl = write_jsonl(tmp_path / "events.jsonl", events)
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(events), parquet)
    spine = spine_rows(6, 100)
    from_json, _ = backfill_table(defs, jsonl, spine)
    from_parquet, _ = backfill_table(defs, parquet, spine)
    from_dicts, _ = backfill_table(defs, iter(events), spine)
    assert from_json.equals(from_parquet) and from_json.equals(from_dicts)
    assert_stream_matches(defs, events, from_json)


def test_batch_snapshot_switches_at_valid_from_and_missing_entities_get_defaults(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    old = tmp_path / "old.csv"
    old.write_text("customer_id,limit,risk\nu1,1000,0.1\nu2,2000,0.2\n")
    new = tmp_path / "new.parquet"
    pq.write_table(
        pa.table({"customer_id": ["u1", "u3"], "limit": [1500.0, None], "risk": [0.15, 0.9]}),
        new,
    )
    switch = T0 + HOUR
    spine = pa.table(
        {
            "customer_id": ["u1", "u1", "u1", "u2", "u2", "u3", None, "u1"],
            "ts_ms": [switch - 1, switch, switch + 1, switch - 1, switch, switch, switch, T0 - 1],
        }
    )
    schedule = {"profile": [(switch, new), (T0, old)]}  # any order
    table, report = backfill_table(defs, [], spine, batch_snapshots=schedule)
    assert column(table, "limit") == [1000.0, 1500.0, 1500.0, 2000.0, 100.0, 100.0, 100.0, 100.0]
    assert column(table, "risk") == [0.1, 0.15, 0.15, 0.2, 0.5, 0.9, 0.5, 0.5]
    # u2 after the switch (no row), no id, before any snapshot; u3's empty cell is not a miss
    assert report.defaulted_rows["profile"] == 3
    # No schedule at all: defaults everywhere.
    table, report = backfill_table(defs, [], spine, features=["limit"])
    assert set(column(table, "limit")) == {100.0} and report.defaulted_rows["profile"] == 8


def test_parquet_snapshots_read_column_wise_equal_their_rows(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    rows: SnapshotRows = [
        (f"u{i}", {"limit": float(i), **({"risk": i / 100} if i % 3 else {})}) for i in range(50)
    ]
    pq.write_table(
        pa.table(
            {
                "customer_id": [key for key, _ in rows],
                "limit": [float(i) for i in range(50)],
                "risk": [i / 100 if i % 3 else None for i in range(50)],
            }
        ),
        path := tmp_path / "profile.parquet",
    )
    assert read_file_columns(defs, "profile", path) is not None  # the column-wise path
    spine = pa.table({"customer_id": [f"u{i}" for i in range(0, 60, 3)], "ts_ms": [T0 + 1] * 20})
    features = ["limit", "risk"]
    memory: BatchSnapshots = {"profile": [(T0, rows)]}
    from_rows, _ = point_in_time_table(defs, [], spine, batch_snapshots=memory, features=features)
    files = {"profile": [(T0, path)]}
    # backfill_table keeps the spine's keys only; backfill_index keeps every row
    from_file, _ = backfill_table(defs, [], spine, batch_snapshots=files, features=features)
    indexed, _ = backfill_index(defs, [], batch_snapshots=files, features=features).table(spine)
    assert from_file.equals(from_rows) and indexed.equals(from_rows)
    assert column(from_rows, "limit")[:3] == [0.0, 3.0, 6.0] and column(from_rows, "risk")[1] == 0.5


def test_missing_entity_ids_and_columns_get_defaults(defs: FeatureDefinitions) -> None:
    events = [{"card_id": "a", "merchant_id": "m", "ts": T0, "amount": 5.0, "intl": 0}]
    spine = pa.table({"card_id": ["a", None, "zz"], "ts_ms": [T0 + 1] * 3})  # no merchant_id
    table, report = backfill_table(defs, events, spine)
    refs = feature_sources(defs)
    assert column(table, "n_5m") == [1.0, 0.0, 0.0]
    for name in ("mean_1d", "min_1h", "max_1d", "last_1h", "since_1d", "m_n_1h", "limit"):
        assert column(table, name)[1:] == [refs[name].default] * 2, name
    assert column(table, "m_n_1h")[0] == 0.0
    assert report.defaulted_rows["card"] == 1 and report.defaulted_rows["merchant"] == 3


def test_request_features_come_from_the_spine_else_defaults(defs: FeatureDefinitions) -> None:
    spine = pa.table({"ts_ms": [T0, T0], "amount": [3.5, None], "extra": ["x", "y"]})
    table, report = backfill_table(defs, [], spine, features=["hour", "amount"])
    assert table.column_names == ["ts_ms", "extra", "hour", "amount"]
    assert column(table, "amount") == [3.5, 7.0] and column(table, "hour") == [12.0, 12.0]
    assert report.invalid_request_values == {}
    bad = pa.table({"ts_ms": [T0], "amount": [-1.0]})
    _, report = backfill_table(defs, [], bad, features=["amount"])
    assert report.invalid_request_values == {"amount": 1}


def test_output_parquet_has_spine_then_features_in_order(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    spine = spine_rows(7, 20).append_column("amount", pa.array([1.0] * 20))
    out = tmp_path / "deep" / "out.parquet"
    report = backfill(defs, random_events(8, 100, 0), spine, out)
    written = pq.read_table(out)
    names = list(feature_sources(defs))
    assert written.column_names == ["card_id", "merchant_id", "ts_ms", "label", *names]
    assert list(report.columns) == written.column_names and list(report.features) == names
    assert all(written.schema.field(n).type == pa.float64() for n in names)
    assert column(written, "label") == column(spine, "label")
    assert report.out == str(out) and report.rows == 20
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "spine", "message"),
    [
        ({"features": ["n_5m", "nope"]}, {"ts_ms": [T0]}, "nope"),
        ({}, {"ts_ms": [T0], "n_1h": [1.0]}, "n_1h"),
        ({}, {"time": [T0]}, "ts_ms"),
        ({}, {"ts_ms": [1.5]}, "ts_ms"),
        ({"batch_snapshots": {"nogroup": []}}, {"ts_ms": [T0]}, "nogroup"),
    ],
    ids=["undefined-feature", "clashing-column", "no-timestamp", "bad-timestamp", "bad-group"],
)
def test_bad_input_is_refused_naming_it(
    defs: FeatureDefinitions, kwargs: dict[str, Any], spine: dict[str, list[Any]], message: str
) -> None:
    with pytest.raises(BackfillError, match=message):
        backfill_table(defs, [], pa.table(spine), **kwargs)


def test_cli_reads_files_batch_schedule_and_manifest(tmp_path: Path) -> None:
    (definitions := tmp_path / "features.yaml").write_text(DEFS)
    events = random_events(9, 300, 12 * MIN)
    write_jsonl(tmp_path / "events.jsonl", events)
    (tmp_path / "spine.csv").write_text(
        "card_id,merchant_id,customer_id,ts_ms,hour\n"
        f"c1,m1,u1,{T0 + 3 * HOUR},5\n"
        f"c2,m2,u9,{T0 + 5 * HOUR},\n"
        f"007,m1,u1,{T0 + 9 * HOUR},23\n"
    )
    (tmp_path / "p1.csv").write_text("customer_id,limit,risk\nu1,10,0.3\n")
    (tmp_path / "p2.csv").write_text("customer_id,limit,risk\nu1,20,0.4\n")
    manifest = tmp_path / "model" / "1"
    manifest.mkdir(parents=True)
    wanted = ["limit", "n_1h", "hour", "m_n_1h"]
    (manifest / "manifest.json").write_text(json.dumps({"features": wanted}))
    assert read_manifest_features(manifest) == tuple(wanted)
    argv = [
        "--events", str(tmp_path / "events.jsonl"),
        "--spine", str(tmp_path / "spine.csv"),
        "--out", str(tmp_path / "out.parquet"),
        "--definitions", str(definitions),
        "--batch", f"profile={T0}:{tmp_path / 'p1.csv'}",
        "--batch", f"profile={T0 + 4 * HOUR}:{tmp_path / 'p2.csv'}",
        "--features-from-manifest", str(manifest),
        "--log-level", "WARNING",
    ]  # fmt: skip
    assert main_backfill(argv) == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["card_id", "merchant_id", "customer_id", "ts_ms", *wanted]
    assert column(out, "card_id") == ["c1", "c2", "007"]  # ids stay text
    assert column(out, "limit") == [10.0, 100.0, 20.0]
    assert column(out, "hour") == [5.0, 12.0, 23.0]
    assert_stream_matches(parse_definitions(DEFS), events, out)

    (tmp_path / "out.parquet").unlink()
    assert main_backfill(["--", *argv]) == 0  # `streamscore features backfill -- ...`
    assert pq.read_table(tmp_path / "out.parquet").equals(out)

    bad = [*argv[:8], "--batch", "profile=soon:x.csv"]
    assert main_backfill(bad) == 2
    missing = [*argv[:2], "--spine", str(tmp_path / "nope.csv"), *argv[4:8]]
    assert main_backfill(missing) == 2


def test_the_point_in_time_logic_runs_on_memory_and_reads_no_files(
    defs: FeatureDefinitions,
) -> None:
    events = [
        {"card_id": "c1", "merchant_id": "m1", "ts": T0 + i * MIN, "amount": 2.0, "intl": 0}
        for i in range(3)
    ]
    spine = pa.table({"card_id": ["c1"], "customer_id": [" u1"], "ts_ms": [T0 + 10 * MIN]})
    older: SnapshotRows = [("u1", {"limit": 5.0})]
    newer: SnapshotRows = [("u1 ", {})]  # the same customer, spelled otherwise
    snapshots: BatchSnapshots = {"profile": [(T0, older), (T0 + MIN, newer)]}
    table, report = point_in_time_table(
        defs, events, spine, batch_snapshots=snapshots, features=["n_1h", "limit", "risk"]
    )
    assert table.column("n_1h").to_pylist() == [3.0]
    assert table.column("limit").to_pylist() == [100.0]  # the newer snapshot's empty cell
    assert report.defaulted_rows == {"profile": 0, "card": 0}
    probe = "import json, sys, feature_streams.point_in_time; print(json.dumps(list(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    io = {"pyarrow.parquet", "pyarrow.csv", "feature_streams.batch_load", "redis", "aiokafka"}
    assert io & set(json.loads(out.stdout)) == set()
