"""``--engine spark`` (PySpark local[2]) equals the local engine, row for row.

``score-batch --engine spark`` runs :func:`score_chunk` per entity partition and must
write the local engine's file (same scores in float32, same features, same order);
``features backfill --engine spark`` runs the backfill's point-in-time code per
partition and must write the local backfill's table. (Online == batch for the Spark
engine: tests/integration/test_training_serving_consistency.py, when PySpark is
installed.) Skipped without the optional extra ``spark``, which ``make test`` installs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from demo.synthetic import DEMO_FEATURES
from feature_streams.backfill_cli import main_backfill
from tests.integration.test_score_batch import case, run  # noqa: F401  (module fixture)

pytest.importorskip(
    "pyspark", reason="the optional 'spark' extra is not installed (make test installs it)"
)

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local[2] session for the module (the engines reuse the active session)."""
    from feature_streams.spark_engine import spark_session

    session = spark_session("local[2]", "streamscore-tests")
    yield session
    session.stop()


def test_score_batch_spark_equals_local(case: dict[str, Any], spark: Any) -> None:  # noqa: F811
    local = case["tmp"] / "local-engine.parquet"
    args = ("--version", "1", "--with-features", "--compare-version", "2")
    assert run(case, local, *args, "--workers", "1", events="events.parquet") == 0
    on_spark = case["tmp"] / "spark-engine.parquet"
    extra = ("--engine", "spark", "--spark-master", "local[2]", "--chunk-rows", "150")
    assert run(case, on_spark, *args, *extra, events="events.parquet") == 0
    a, b = pq.read_table(local), pq.read_table(on_spark)
    assert a.num_rows == case["spine"].num_rows > 150  # two chunks, two partitions each
    assert a.equals(b)
    assert len(set(b.column("score").to_pylist())) > a.num_rows // 2


def test_backfill_spark_equals_local(case: dict[str, Any], spark: Any) -> None:  # noqa: F811
    tmp: Path = case["tmp"]

    def backfill(out: Path, *extra: str) -> int:
        return main_backfill(
            [
                *("--events", str(tmp / "events.parquet")),
                *("--spine", str(tmp / "spine.parquet")),
                *("--out", str(out), "--definitions", str(tmp / "features.yaml")),
                *("--features", ",".join(DEMO_FEATURES)),
                *case["batch_args"],
                *extra,
            ]
        )

    assert backfill(tmp / "bf-local.parquet") == 0
    spark_args = ("--engine", "spark", "--spark-master", "local[2]")
    assert backfill(tmp / "bf-spark.parquet", *spark_args) == 0
    a, b = pq.read_table(tmp / "bf-local.parquet"), pq.read_table(tmp / "bf-spark.parquet")
    assert a.num_rows == case["spine"].num_rows
    assert a.equals(b)
    assert sum(v > 0 for v in b.column("merchant_txn_count_1h").to_pylist()) >= 50
