"""``streamscore score-batch`` (local engine): the backfill's features, the served artifact.

Scores must equal the served model on the backfill's point-in-time features (the
backfill itself is proven equal to the server in test_training_serving_consistency,
which also checks score-batch against recorded Score answers); chunked and
multi-process runs equal one chunk; a Parquet event log (scanned per chunk for the
chunk's keys) equals the JSON-lines one (replayed whole); ``--as-of`` puts every row
at one time; bad spines and unknown models exit 2 leaving no output file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from demo.synthetic import DEMO_FEATURES, make_population
from feature_streams.backfill import backfill
from feature_streams.definitions import parse_definitions
from server.batch_scoring import local
from server.batch_scoring.chunk import score_chunk
from server.batch_scoring.cli import main_score_batch
from server.batch_scoring.features import PointInTimeFeatures
from server.batch_scoring.output import COMPARISON_KEY, LINEAGE_KEY, read_metadata
from server.batch_scoring.partitioned import partition_of
from server.batch_scoring.spine import SpineError
from tests.integration.test_training_serving_consistency import (
    T0,
    make_spine,
    older_tables,
    profile_tables,
    recorded_stream,
)
from tests.support.model_factory import linear_scores, write_linear_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("score_batch")
    text = (REPO / "features.yaml").read_text()
    (tmp / "features.yaml").write_text(text)
    definitions = parse_definitions(text)
    population = make_population(np.random.default_rng(5), n_customers=40, n_merchants=15)
    records = recorded_stream(population, seed=6)
    (tmp / "events.jsonl").write_bytes(b"\n".join(records) + b"\n")
    dicts = []
    for raw in records:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event_time_ms"), int):
            dicts.append(event)
    pq.write_table(pa.Table.from_pylist(dicts), tmp / "events.parquet")
    (tmp / "events-clean.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dicts))
    spine = make_spine(population, records, seed=8)
    pq.write_table(spine, tmp / "spine.parquet")
    switch = min(spine.column("ts_ms").to_pylist())
    current = profile_tables(population, np.random.default_rng(9))
    schedule: dict[str, list[tuple[int, Path]]] = {}
    batch_args: list[str] = []
    for valid_from, tables in ((T0 - 86_400_000, older_tables(current)), (switch, current)):
        for group, table in tables.items():
            pq.write_table(table, path := tmp / f"{group}-{valid_from}.parquet")
            schedule.setdefault(group, []).append((valid_from, path))
            batch_args += ["--batch", f"{group}={valid_from}:{path}"]
    models = tmp / "models"
    _, w1, b1 = write_linear_model(
        models, "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3
    )
    _, w2, b2 = write_linear_model(
        models, "fraud", "2", list(DEMO_FEATURES), seed=4, weight_scale=1e-3
    )
    backfill(
        definitions,
        tmp / "events.jsonl",
        tmp / "spine.parquet",
        tmp / "training.parquet",
        batch_snapshots=schedule,
        features=list(DEMO_FEATURES),
    )
    training = pq.read_table(tmp / "training.parquet")
    matrix = np.array([training.column(n).to_pylist() for n in DEMO_FEATURES], np.float32).T
    return {
        "tmp": tmp,
        "spine": spine,
        "batch_args": batch_args,
        "matrix": matrix,
        "expected": {"1": linear_scores(matrix, w1, b1), "2": linear_scores(matrix, w2, b2)},
        "models": models,
    }


def run(case: dict[str, Any], out: Path, *extra: str, events: str = "events.jsonl") -> int:
    tmp: Path = case["tmp"]
    return main_score_batch(
        [
            "--model",
            "fraud",
            "--input",
            str(tmp / "spine.parquet"),
            "--output",
            str(out),
            "--events",
            str(tmp / events),
            *case["batch_args"],
            "--definitions",
            str(tmp / "features.yaml"),
            "--set",
            f"models.repository={case['models']}",
            "--no-progress",
            *(extra or ("--workers", "1")),
        ]
    )


def test_scores_are_the_model_on_point_in_time_features(case: dict[str, Any]) -> None:
    out = case["tmp"] / "v1.parquet"
    assert run(case, out, "--version", "1", "--workers", "1", "--with-features") == 0
    table = pq.read_table(out)
    assert table.num_rows == case["spine"].num_rows
    assert table.column("score").to_pylist() == pytest.approx(case["expected"]["1"], abs=1e-6)
    got = np.array([table.column(f"feature.{n}").to_pylist() for n in DEMO_FEATURES]).T
    np.testing.assert_array_equal(got.astype(np.float32), case["matrix"])
    assert table.column("decision").to_pylist() == [
        s >= 0.5 for s in table.column("score").to_pylist()
    ]
    assert table.column("card_id").to_pylist() == case["spine"].column("card_id").to_pylist()
    lineage = read_metadata(out, LINEAGE_KEY)
    assert lineage["model"]["version"] == "1"
    assert set(table.column("model_sha256").to_pylist()) == {lineage["model"]["sha256"]}
    assert not list(out.parent.glob(f".{out.name}*"))  # temporary file renamed away


def test_default_version_is_the_highest(case: dict[str, Any]) -> None:
    out = case["tmp"] / "default.parquet"
    assert run(case, out) == 0
    table = pq.read_table(out)
    assert set(table.column("model_version").to_pylist()) == {"2"}
    assert table.column("score").to_pylist() == pytest.approx(case["expected"]["2"], abs=1e-6)


def test_chunked_multiprocess_parquet_events_equal_one_chunk(case: dict[str, Any]) -> None:
    one = case["tmp"] / "one.parquet"
    assert run(case, one, "--workers", "1", events="events-clean.jsonl") == 0
    many = case["tmp"] / "many.parquet"
    args = ("--workers", "2", "--chunk-rows", "50")
    assert run(case, many, *args, events="events.parquet") == 0
    a, b = pq.read_table(one), pq.read_table(many)
    assert a.num_rows > 50 * 3
    assert a.drop_columns([]).equals(b)


def test_as_of_scores_every_row_at_one_time(case: dict[str, Any]) -> None:
    spine: pa.Table = case["spine"]
    t = max(spine.column("ts_ms").to_pylist())
    out = case["tmp"] / "asof.parquet"
    assert run(case, out, "--version", "1", "--workers", "1", "--as-of", str(t)) == 0
    same = spine.set_column(spine.column_names.index("ts_ms"), "ts_ms", pa.array([t] * len(spine)))
    pq.write_table(same, case["tmp"] / "spine-at-t.parquet")
    out2 = case["tmp"] / "asof-ref.parquet"
    args = ["--input", str(case["tmp"] / "spine-at-t.parquet")]
    assert run(case, out2, "--version", "1", "--workers", "1", *args) == 0
    a, b = pq.read_table(out), pq.read_table(out2)
    assert set(a.column("ts_ms").to_pylist()) == {t}
    assert a.column("score").equals(b.column("score"))
    iso = "2023-11-14T22:13:20+00:00"  # 1_700_000_000_000 ms
    out3 = case["tmp"] / "asof-iso.parquet"
    assert run(case, out3, "--workers", "1", "--as-of", iso) == 0
    assert set(pq.read_table(out3).column("ts_ms").to_pylist()) == {1_700_000_000_000}


def test_compare_version_side_by_side(case: dict[str, Any]) -> None:
    out = case["tmp"] / "cmp.parquet"
    args = ("--version", "1", "--compare-version", "2", "--segment-by", "channel")
    assert run(case, out, *args, "--workers", "1") == 0
    table = pq.read_table(out)
    s1, s2 = case["expected"]["1"], case["expected"]["2"]
    assert table.column("score").to_pylist() == pytest.approx(s1, abs=1e-6)
    assert table.column("compare_score").to_pylist() == pytest.approx(s2, abs=1e-6)
    summary = read_metadata(out, COMPARISON_KEY)
    d1 = np.array(table.column("decision").to_pylist())
    d2 = np.array(table.column("compare_decision").to_pylist())
    assert summary["agreement"] == pytest.approx(float((d1 == d2).mean()))
    assert summary["segments"]["(all)"]["decision_rate_change"] == pytest.approx(
        float(d2.mean() - d1.mean())
    )
    channels = {str(c) for c in table.column("channel").to_pylist()}
    assert set(summary["segments"]) == {"(all)", *channels}


def test_reasons_without_explainer_says_so(
    case: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    out = case["tmp"] / "reasons.parquet"
    assert run(case, out, "--reasons", "--workers", "1") == 0
    assert "reasons" not in pq.read_table(out).column_names
    assert "fraud/2 has no explainer" in caplog.text


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("drop_card", "column 'card_id' missing"),
        ("bad_time", "spine column 'ts_ms', row 5: 'soon'"),
        ("null_time", "spine column 'ts_ms', row 3: ''"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_spine_exits_2_and_writes_nothing(
    case: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    change: str,
    needle: str,
    workers: str,
) -> None:
    spine: pa.Table = case["spine"]
    rows = spine.to_pylist()
    if change == "drop_card":
        bad = spine.drop_columns(["card_id"])
    else:
        for row in rows:
            row["ts_ms"] = str(row["ts_ms"])
        rows[4 if change == "bad_time" else 2]["ts_ms"] = "soon" if change == "bad_time" else None
        bad = pa.Table.from_pylist(rows)
    path = case["tmp"] / f"bad-{change}.csv"
    pacsv.write_csv(bad, path)
    out = case["tmp"] / f"bad-{change}-{workers}.parquet"
    assert run(case, out, "--input", str(path), "--workers", workers, "--chunk-rows", "2") == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len([line for line in err.splitlines() if "score-batch:" in line]) == 1
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))
    assert not list(out.parent.glob(".score-batch-*"))  # the workers' scratch removed


def test_workers_share_one_index_built_before_they_fork(
    case: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point-in-time index is built once, in the parent: the forked workers inherit
    it instead of each reading and indexing the whole log again."""
    builds = case["tmp"] / "index-builds.txt"
    builds.unlink(missing_ok=True)
    original = PointInTimeFeatures.build_index

    def recorded(self: PointInTimeFeatures) -> Any:
        with builds.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self)

    monkeypatch.setattr(PointInTimeFeatures, "build_index", recorded)
    out = case["tmp"] / "shared-index.parquet"
    args = ("--workers", "2", "--chunk-rows", "50", "--with-features", "--version", "1")
    assert run(case, out, *args, events="events.parquet") == 0
    assert builds.read_text().split() == [str(os.getpid())]
    one = case["tmp"] / "shared-index-one.parquet"
    assert run(case, one, "--workers", "1", "--with-features", "--version", "1") == 0
    assert pq.read_table(one).equals(pq.read_table(out))


def test_a_worker_failure_exits_2_and_leaves_nothing(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error raised in a forked worker reaches the command (exit 2, its message) and
    the partial output and the chunk files are removed."""

    def failing(job: Any, chunk: pa.Table, first_row: int = 1) -> pa.Table:
        if first_row > 100:
            raise SpineError(f"spine column 'card_id', row {first_row}: refused by the test")
        return score_chunk(job, chunk, first_row)

    monkeypatch.setattr(local, "score_chunk", failing)
    out = case["tmp"] / "worker-fails.parquet"
    assert run(case, out, "--workers", "2", "--chunk-rows", "50") == 2
    assert "row 101: refused by the test" in capsys.readouterr().err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))
    assert not list(out.parent.glob(".score-batch-*"))


def test_progress_line_counts_every_row_with_workers(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = case["tmp"] / "progress.parquet"
    tmp: Path = case["tmp"]
    argv = [
        *("--model", "fraud", "--input", str(tmp / "spine.parquet"), "--output", str(out)),
        *("--events", str(tmp / "events.parquet"), *case["batch_args"]),
        *("--definitions", str(tmp / "features.yaml")),
        *("--set", f"models.repository={case['models']}"),
        *("--workers", "2", "--chunk-rows", "50"),
    ]
    assert main_score_batch(argv) == 0
    last = capsys.readouterr().err.split("\r")[-1]
    assert f"score-batch: {case['spine'].num_rows:,} rows" in last
    assert "100.0%" in last


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--model", "nope"), "unknown model 'nope'"),
        (("--version", "9"), "unknown version '9' of model 'fraud'"),
        (("--compare-version", "7"), "unknown version '7'"),
    ],
)
def test_unknown_model_or_version_exits_2(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    out = case["tmp"] / "unknown.parquet"
    assert run(case, out, *args, "--workers", "1") == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_online_features_with_redis_unreachable_exit_1(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A dependency down is exit 1 with its message (the Redis client's error is caught
    although the command imports redis only for ``--features online``)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = case["tmp"] / "online-down.parquet"
    args = ("--features", "online", "--set", f"redis.url=redis://127.0.0.1:{port}/0")
    assert run(case, out, *args, "--version", "1", "--workers", "1") == 1
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "score-batch:" in line]) == 1, err
    assert str(port) in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("workers", "events"), [("1", "events.parquet"), ("2", "events.parquet"), ("1", "events.jsonl")]
)
def test_key_partitions_equal_the_unpartitioned_run(
    case: dict[str, Any], workers: str, events: str
) -> None:
    spine: pa.Table = case["spine"]
    card = parse_definitions((case["tmp"] / "features.yaml").read_text()).entities["card_id"]
    assert len(set(partition_of(spine.column("card_id"), card, 4).tolist())) == 4
    one = case["tmp"] / "whole-log.parquet"
    assert run(case, one, "--workers", "1", "--with-features", "--version", "1") == 0
    parted = case["tmp"] / f"parted-{workers}-{events}.parquet"
    args = ("--workers", workers, "--chunk-rows", "50", "--with-features", "--version", "1")
    assert run(case, parted, *args, "--key-partitions", "4", events=events) == 0
    a, b = pq.read_table(one), pq.read_table(parted)
    assert a.num_rows > 50 * 3
    assert a.equals(b)
    assert not list(parted.parent.glob(".score-batch-*"))  # scratch removed


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--key-partitions", "0"), "--key-partitions: must be an integer from 1 to 4096"),
        (("--key-partitions", "x"), "--key-partitions: must be an integer from 1 to 4096"),
        (("--key-partitions", "5000"), "--key-partitions: must be an integer from 1 to 4096"),
        (("--key-partitions", "2", "--features", "online"), "--key-partitions: needs --engine"),
        (("--key-partitions", "2", "--engine", "spark"), "--key-partitions: needs --engine"),
    ],
)
def test_bad_key_partitions_exit_2_naming_the_option(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], needle: str
) -> None:
    out = case["tmp"] / "bad-partitions.parquet"
    with pytest.raises(SystemExit) as exited:
        run(case, out, "--workers", "1", *extra)
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_local_engine_does_not_import_pandas(case: dict[str, Any]) -> None:
    """pyarrow would import pandas (~0.4 s of CPU before the workers fork) on its first
    conversion; the local engine has no pandas objects. Nor does it import the Redis,
    gRPC or Kafka clients (~0.15 s: other commands' and ``--features online``'s). The
    console script's own process (a fresh interpreter); in-process calls leave pyarrow
    as it is."""
    out = case["tmp"] / "no-pandas.parquet"
    argv = [
        "--model",
        "fraud",
        "--input",
        str(case["tmp"] / "spine.parquet"),
        "--output",
        str(out),
        "--events",
        str(case["tmp"] / "events.parquet"),
        *case["batch_args"],
        "--definitions",
        str(case["tmp"] / "features.yaml"),
        "--set",
        f"models.repository={case['models']}",
        "--no-progress",
        "--workers",
        "2",
        "--chunk-rows",
        "50",
        "--with-features",
        "--version",
        "1",
    ]
    code = (
        "import sys\n"
        "from server.cli import main\n"
        f"status = main({['score-batch', *argv]!r})\n"
        "print(status, 'pandas' in sys.modules)\n"
        "print(*sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'grpc', 'aiokafka'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.splitlines() == ["0 False", ""]
    reference = case["tmp"] / "with-pandas.parquet"
    assert run(case, reference, "--workers", "1", "--with-features", "--version", "1") == 0
    assert pq.read_table(out).equals(pq.read_table(reference))
