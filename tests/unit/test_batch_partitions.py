"""score-batch key partitions: the stable partition hash and the row-number merge."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from demo.synthetic import DEMO_FEATURES
from feature_streams.definitions import FeatureSource, parse_definitions, resolve_features
from feature_streams.event_filter import FilteredParquetEvents, Wanted
from server.batch_scoring.partitioned import ROW_COLUMN, merged, partition_of, side_features

REPO = Path(__file__).resolve().parents[2]


def test_partition_of_is_by_key_and_stable() -> None:
    card = parse_definitions((REPO / "features.yaml").read_text()).entities["card_id"]
    ids = pa.chunked_array([["a", "b", None, "a"], ["", "c", "b"]])
    parts = partition_of(ids, card, 7)
    assert parts.tolist()[2] == 0 and parts.tolist()[4] == 0  # no id: partition 0
    assert parts[0] == parts[3] and parts[1] == parts[6]
    # crc32, not Python's per-process salted hash: fixed values
    keys = ["card-0000001", "card-0000002", "card-0000003"]
    expected = [zlib.crc32(key.encode()) % 16 for key in keys]
    assert partition_of(pa.array(keys), card, 16).tolist() == expected


@pytest.mark.parametrize(("chunk", "batch"), [(7, 2), (5, 1), (100, 3), (1, 4)])
def test_merged_restores_row_order(tmp_path: Path, chunk: int, batch: int) -> None:
    rng = np.random.default_rng(1)
    total = 61
    owner = rng.integers(0, 4, total)
    paths = []
    for p in range(4):
        rows = np.flatnonzero(owner == p) + 1
        table = pa.table({"v": pa.array(rows * 10), ROW_COLUMN: pa.array(rows)})
        pq.write_table(table, path := tmp_path / f"{p}.parquet", row_group_size=3)
        paths.append(path)
    out = list(merged(paths, total, chunk, batch))
    assert [t.num_rows for t in out[:-1]] == [chunk] * (len(out) - 1)
    joined = pa.concat_tables(out)
    assert joined.column_names == ["v"]
    assert joined.column("v").to_pylist() == [10 * r for r in range(1, total + 1)]


def test_filtered_events_keep_exactly_the_wanted_keys_column_wise(tmp_path: Path) -> None:
    definitions = parse_definitions((REPO / "features.yaml").read_text())
    card = definitions.entities["card_id"]
    log = pa.table(
        {
            "card_id": ["c1", "c2", None, "c3", "c1", " c2"],
            "amount": [1.0, 2.0, 3.0, None, 5.0, 6.0],
        }
    )
    pq.write_table(log, path := tmp_path / "events.parquet")
    wanted = (Wanted("card_id", card, frozenset({"c1", "c2"})),)
    events = FilteredParquetEvents(path, wanted)
    batches = list(events.record_batches())
    got = pa.Table.from_batches(batches).to_pylist()
    # " c2" is the key "c2" by the entity's rule: the per-value path keeps it too
    assert [r["card_id"] for r in got] == ["c1", "c2", "c1", " c2"]
    assert list(events) == [{k: v for k, v in r.items() if v is not None} for r in got]
    plain = pa.table({"card_id": ["c1", "c9", "c2"], "amount": [1.0, 2.0, 3.0]})
    pq.write_table(plain, path)
    kept = pa.Table.from_batches(list(events.record_batches()))
    assert kept.column("card_id").to_pylist() == ["c1", "c2"]


def test_side_features_are_the_stream_features_of_other_entities() -> None:
    definitions = parse_definitions((REPO / "features.yaml").read_text())
    sides = side_features(definitions, DEMO_FEATURES, "card_id")
    assert list(sides) == ["merchant_id"]
    refs = {r.name: r for r in resolve_features(definitions, DEMO_FEATURES).refs}
    expected = [
        n
        for n in DEMO_FEATURES
        if refs[n].source is FeatureSource.STREAM and refs[n].entity == "merchant_id"
    ]
    assert expected and list(sides["merchant_id"]) == expected


def test_filtered_events_project_to_the_columns_asked_for(tmp_path: Path) -> None:
    """Filtered by a key column that is not asked for, cut to the columns asked for
    (those the file has, in its order)."""
    definitions = parse_definitions((REPO / "features.yaml").read_text())
    card = definitions.entities["card_id"]
    log = pa.table({"card_id": ["c1", "c2", "c1"], "amount": [1.0, 2.0, 3.0], "x": [7, 8, 9]})
    pq.write_table(log, path := tmp_path / "events.parquet")
    events = FilteredParquetEvents(path, (Wanted("card_id", card, frozenset({"c1"})),))
    kept = pa.Table.from_batches(list(events.record_batches(columns=["x", "amount", "nope"])))
    assert kept.column_names == ["amount", "x"]
    assert kept.to_pylist() == [{"amount": 1.0, "x": 7}, {"amount": 3.0, "x": 9}]
