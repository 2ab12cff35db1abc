"""Batch file validation: bad files are refused naming column and row; demo files load."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from demo.batch_files import write_demo_batch_files
from demo.synthetic import make_population
from feature_streams.batch_load import (
    BatchFileError,
    ProgressReporter,
    iter_file_rows,
    read_file_columns,
    validate_file,
)
from feature_streams.definitions import FeatureDefinitions, load_definitions, parse_definitions

FEATURES_YAML = Path(__file__).resolve().parents[2] / "features.yaml"

DEFS_TEXT = """
version: 1
entities:
  customer_id: {key_type: str}
  account_id: {key_type: int}
batch_groups:
  profile:
    entity: customer_id
    fields:
      limit: {dtype: float, default: 100.0}
      count: {dtype: int, default: 0}
      vip: {dtype: bool, default: false}
  account:
    entity: account_id
    fields:
      balance: {dtype: float, default: 0.0}
"""


@pytest.fixture
def defs() -> FeatureDefinitions:
    return parse_definitions(DEFS_TEXT)


def _csv(tmp_path: Path, text: str, name: str = "profile.csv") -> Path:
    path = tmp_path / name
    path.write_text(text.lstrip())
    return path


def _problems(excinfo: pytest.ExceptionInfo[BatchFileError]) -> str:
    return "\n".join(excinfo.value.problems)


def test_valid_csv_parses_per_dtype_and_counts_empty_cells(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    path = _csv(
        tmp_path,
        """
customer_id,limit,count,vip
c1, 1500.5 ,3,true
c2,,4.0,0
c3,-2,,FALSE
""",
    )
    summary = validate_file(defs, "profile", path)
    assert summary.rows == 3
    assert summary.columns == ("limit", "count", "vip")
    assert summary.defaulted_columns == ()
    assert summary.null_cells == {"limit": 1, "count": 1, "vip": 0}
    assert list(iter_file_rows(defs, "profile", path)) == [
        ("c1", {"limit": 1500.5, "count": 3.0, "vip": 1.0}),
        ("c2", {"count": 4.0, "vip": 0.0}),
        ("c3", {"limit": -2.0, "vip": 0.0}),
    ]


def test_unknown_columns_are_refused_by_name(defs: FeatureDefinitions, tmp_path: Path) -> None:
    path = _csv(tmp_path, "customer_id,limit,count,vip,colour,size\nc1,1,2,1,red,3\n")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", path)
    assert "unknown columns for batch group 'profile': 'colour', 'size'" in _problems(excinfo)


def test_missing_columns_are_refused_unless_allowed(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    path = _csv(tmp_path, "customer_id,limit\nc1,1\n")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", path)
    assert "missing columns: 'count', 'vip'" in _problems(excinfo)

    summary = validate_file(defs, "profile", path, allow_missing_columns=True)
    assert summary.defaulted_columns == ("count", "vip")
    assert list(iter_file_rows(defs, "profile", path, allow_missing_columns=True)) == [
        ("c1", {"limit": 1.0})
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("limit,count,vip", "no entity column 'customer_id'"),
        ("customer_id,limit,limit,count,vip", "duplicated columns: 'limit'"),
    ],
)
def test_bad_headers_are_refused(
    defs: FeatureDefinitions, tmp_path: Path, header: str, expected: str
) -> None:
    path = _csv(tmp_path, f"{header}\n")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", path)
    assert expected in _problems(excinfo)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("c1,abc,1,1", "column 'limit', row 2 (line 3): 'abc' is not a number"),
        ("c1,nan,1,1", "column 'limit', row 2 (line 3): 'nan' is not a finite number"),
        ("c1,inf,1,1", "column 'limit', row 2 (line 3): 'inf' is not a finite number"),
        ("c1,1,2.5,1", "column 'count', row 2 (line 3): '2.5' is not an integer"),
        ("c1,1,1,yes", "column 'vip', row 2 (line 3): 'yes' is not a bool"),
        (",1,1,1", "column 'customer_id', row 2 (line 3): empty entity id"),
        (
            "c0,1,1,1",
            "column 'customer_id', row 2 (line 3): duplicate entity 'c0' (first at row 1)",
        ),
        ("c1,1,1", "row 2 (line 3): 3 cells, the header has 4"),
    ],
)
def test_bad_values_name_column_and_row(
    defs: FeatureDefinitions, tmp_path: Path, row: str, expected: str
) -> None:
    path = _csv(tmp_path, f"customer_id,limit,count,vip\nc0,1,1,1\n{row}\n")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", path)
    assert expected in _problems(excinfo)
    if "duplicate" not in expected:  # the write pass re-checks values, not uniqueness
        with pytest.raises(BatchFileError) as excinfo:
            list(iter_file_rows(defs, "profile", path))
        assert expected in _problems(excinfo)


def test_problems_are_capped_but_counted(defs: FeatureDefinitions, tmp_path: Path) -> None:
    rows = "".join(f"c{i},bad,1,1\n" for i in range(50))
    path = _csv(tmp_path, f"customer_id,limit,count,vip\n{rows}")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", path, max_problems=5)
    assert len(excinfo.value.problems) == 5
    assert excinfo.value.total == 50
    assert "and 45 more" in str(excinfo.value)


def test_empty_files_unknown_groups_and_types_are_refused(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    cases = [
        ("profile", _csv(tmp_path, "", "empty.csv"), "empty file: no header row"),
        ("profile", _csv(tmp_path, "customer_id,limit,count,vip\n", "h.csv"), "no data rows"),
        ("nope", _csv(tmp_path, "customer_id\n", "n.csv"), "unknown batch group 'nope'"),
        ("profile", _csv(tmp_path, "x", "data.json"), "unknown file type '.json'"),
        ("profile", tmp_path / "absent.csv", "cannot read"),
        ("profile", _csv(tmp_path, "not parquet", "bad.parquet"), "cannot read"),
    ]
    for group, path, expected in cases:
        with pytest.raises(BatchFileError) as excinfo:
            validate_file(defs, group, path)
        assert expected in _problems(excinfo), path


def test_entity_ids_become_keys_by_the_entitys_rule(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    spelled = _csv(tmp_path, "account_id,balance\n042,1\n -7 ,2\n+5.0,3\n0,4\n", "a.csv")
    assert [e for e, _ in iter_file_rows(defs, "account", spelled)] == ["42", "-7", "5", "0"]
    text = _csv(tmp_path, "customer_id,limit,count,vip\n c-1 ,1,1,true\n", "c.csv")
    assert [e for e, _ in iter_file_rows(defs, "profile", text)] == ["c-1"]
    same = _csv(tmp_path, "account_id,balance\n42,1\n042,2\n", "s.csv")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "account", same)
    assert "column 'account_id', row 2 (line 3): duplicate entity '42' (first at row 1)" in (
        _problems(excinfo)
    )
    bad = _csv(tmp_path, "account_id,balance\n4.2e1,1\n", "b.csv")
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "account", bad)
    assert "column 'account_id', row 1 (line 2): '4.2e1' is not an integer id" in (
        _problems(excinfo)
    )


def test_parquet_values_nulls_and_types(defs: FeatureDefinitions, tmp_path: Path) -> None:
    path = tmp_path / "profile.parquet"
    table = pa.table(
        {
            "customer_id": ["c1", "c2"],
            "limit": pa.array([1.5, None], type=pa.float64()),
            "count": pa.array([3, 4], type=pa.int32()),
            "vip": pa.array([True, False]),
        }
    )
    pq.write_table(table, path)
    summary = validate_file(defs, "profile", path)
    assert (summary.file_format, summary.rows, summary.null_cells["limit"]) == ("parquet", 2, 1)
    assert list(iter_file_rows(defs, "profile", path)) == [
        ("c1", {"limit": 1.5, "count": 3.0, "vip": 1.0}),
        ("c2", {"count": 4.0, "vip": 0.0}),
    ]

    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(1, "limit", pa.array([1.0, float("nan")])), bad)
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", bad)
    assert "column 'limit', row 2: nan is not a finite number" in _problems(excinfo)

    wrong_type = tmp_path / "ts.parquet"
    stamps = pa.array([0, 1], type=pa.timestamp("ms"))
    pq.write_table(table.set_column(1, "limit", stamps), wrong_type)
    with pytest.raises(BatchFileError) as excinfo:
        validate_file(defs, "profile", wrong_type)
    assert "column 'limit': Parquet type timestamp[ms] is not a number" in _problems(excinfo)


def test_demo_files_match_the_definitions_and_the_population(tmp_path: Path) -> None:
    defs = load_definitions(FEATURES_YAML)
    files = write_demo_batch_files(tmp_path / "a", seed=3, n_customers=40, n_merchants=5)
    again = write_demo_batch_files(tmp_path / "b", seed=3, n_customers=40, n_merchants=5)
    population = make_population(np.random.default_rng(3), n_customers=40, n_merchants=5)
    assert files.n_cards == len(population.card_ids) > 40

    customers = dict(iter_file_rows(defs, "customer_profile", files.paths["customer_profile"]))
    cards = dict(iter_file_rows(defs, "card_profile", files.paths["card_profile"]))
    assert validate_file(defs, "customer_profile", files.paths["customer_profile"]).rows == 40
    assert customers == {c: population.customer_features(c) for c in population.customer_ids}
    assert cards == {c: population.card_features(c) for c in population.card_ids}
    for group, path in files.paths.items():
        assert pq.read_table(path).equals(pq.read_table(again.paths[group]))

    csv_files = write_demo_batch_files(
        tmp_path / "c", seed=3, n_customers=40, n_merchants=5, file_format="csv"
    )
    csv_cards = dict(iter_file_rows(defs, "card_profile", csv_files.paths["card_profile"]))
    assert csv_cards == cards


def test_progress_draws_a_bar_on_a_tty_and_logs_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    bar = ProgressReporter("load", 200, stream, tty=True)
    bar(100)
    bar(200)
    bar.close()
    text = stream.getvalue()
    assert "\rload [###############---------------]  50.0% 100/200 rows" in text
    assert "100.0% 200/200 rows" in text and text.endswith("\n")

    quiet = io.StringIO()
    with caplog.at_level(logging.INFO, logger="feature_streams.batch_load"):
        lines = ProgressReporter("load", 200, quiet, tty=False, log_every_s=3600)
        lines(100)
        lines(150)  # within the interval: not logged
        lines(200)  # the end is always logged
        lines.close()
    assert quiet.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages] == ["load: 100/200 rows", "load: 200/200 rows"]


def _by_rows(
    defs: FeatureDefinitions, group: str, path: Path, **kwargs: bool
) -> dict[str, dict[str, float]]:
    return dict(iter_file_rows(defs, group, path, **kwargs))


def _by_columns(
    defs: FeatureDefinitions, group: str, path: Path, **kwargs: bool
) -> dict[str, dict[str, float]] | None:
    read = read_file_columns(defs, group, path, **kwargs)
    if read is None:
        return None
    return {
        key: {f: float(read.values[f][i]) for f in read.values if read.present[f][i]}
        for i, key in enumerate(read.keys)
    }


def test_column_wise_read_equals_the_row_rules(defs: FeatureDefinitions, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 500
    limit = rng.random(n) * 1e4
    profile = pa.table(
        {
            "customer_id": [f"c-{i}" for i in range(n)],
            "limit": pa.array([None if i % 7 == 0 else v for i, v in enumerate(limit)]),
            "count": pa.array([None if i % 5 == 0 else i for i in range(n)], pa.int64()),
            "vip": pa.array([None if i % 3 == 0 else i % 2 == 0 for i in range(n)]),
        }
    )
    pq.write_table(profile, path := tmp_path / "profile.parquet")
    by_columns = _by_columns(defs, "profile", path)
    assert by_columns is not None and by_columns == _by_rows(defs, "profile", path)
    assert list(by_columns) == [f"c-{i}" for i in range(n)]  # file order
    pq.write_table(profile.drop_columns(["vip"]), path)
    assert _by_columns(defs, "profile", path, allow_missing_columns=True) == _by_rows(
        defs, "profile", path, allow_missing_columns=True
    )
    account = pa.table({"account_id": pa.array([7, -3, 0], pa.int64()), "balance": [1.5, 0, 2]})
    pq.write_table(account, path := tmp_path / "account.parquet")
    assert _by_columns(defs, "account", path) == _by_rows(defs, "account", path)
    assert _by_columns(defs, "account", path) == {
        "7": {"balance": 1.5},
        "-3": {"balance": 0.0},
        "0": {"balance": 2.0},
    }


@pytest.mark.parametrize(
    "columns",
    [
        {"customer_id": [" c-1", "c-2"], "limit": [1.0, 2.0]},  # not a key yet
        {"customer_id": ["c-1", "c-1"], "limit": [1.0, 2.0]},  # repeated id
        {"customer_id": ["c-1", None], "limit": [1.0, 2.0]},  # empty id
        {"customer_id": ["c-1", "c-2"], "limit": [1.0, float("nan")]},  # not finite
        {"customer_id": ["c-1", "c-2"], "limit": ["1.0", "2"]},  # text cells
        {"customer_id": ["c-1", "c-2"], "limit": [True, False]},  # bools are not numbers
        {"customer_id": ["c-1", "c-2"], "count": [1.0, 2.5]},  # not an integer
        {"customer_id": ["c-1", "c-2"], "vip": [1, 2]},  # not a bool
        {"customer_id": ["c-1", "c-2"], "count": [1, 2**60]},  # not exact as a float
        {"customer_id": ["c-1", "c-2"], "count": [1, 2**53 + 1]},  # rounds to 2**53 as a float
        {"customer_id": ["c-1", "c-2"], "count": [1, -(2**53) - 1]},
        {"customer_id": [1, 2], "limit": [1.0, 2.0]},  # int ids of a str entity
    ],
)
def test_column_wise_read_leaves_what_it_cannot_prove_to_the_row_rules(
    defs: FeatureDefinitions, tmp_path: Path, columns: dict[str, list[object]]
) -> None:
    pq.write_table(pa.table(columns), path := tmp_path / "profile.parquet")
    assert read_file_columns(defs, "profile", path, allow_missing_columns=True) is None


def test_column_wise_read_is_parquet_only_and_refuses_bad_headers(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    path = _csv(tmp_path, "customer_id,limit,count,vip\nc-1,1,2,true\n")
    assert read_file_columns(defs, "profile", path) is None
    pq.write_table(pa.table({"customer_id": ["c-1"], "bogus": [1.0]}), p := tmp_path / "x.parquet")
    with pytest.raises(BatchFileError, match="bogus"):
        read_file_columns(defs, "profile", p)
