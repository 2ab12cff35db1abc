"""Running a per-partition Arrow function on Spark, for every ``--engine spark``.

The table's rows are numbered, distributed by the hash of an entity column (a
partition holds whole entities, so its share of the event log is small) and each
partition's rows go, as one Arrow table, through ``fn`` (``mapInArrow``: no pandas
round trip, so column types are the ones the local engine sees). The results come
back to the driver in the input's row order. ``fn`` is the very function the local
engine runs (scoring a chunk, the point-in-time backfill): nothing is re-implemented.

PySpark is the optional extra ``spark`` (``pip install 'streamscore[spark]'``, 4.0 or
later: Arrow in and out of DataFrames) and needs Java 17; ``master`` is any Spark
master URL (``local[*]``, ``spark://…``, ``yarn``, ``k8s://…``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import FeatureDefinitions
from feature_streams.definitions import resolve_features as _resolve

__all__ = ["ROW_COLUMN", "SparkUnavailable", "map_by_entity", "partition_entity", "spark_session"]

ROW_COLUMN: Final = "__streamscore_row"


class SparkUnavailable(RuntimeError):
    """PySpark (the ``spark`` extra) is missing or too old."""


def spark_session(master: str, app: str = "streamscore") -> Any:
    """The Spark session on ``master`` (an active one is reused), UTC, no UI."""
    try:
        import pyspark  # type: ignore[import-not-found, unused-ignore]
        from pyspark.sql import SparkSession  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise SparkUnavailable(
            "--engine spark needs the 'spark' extra: pip install 'streamscore[spark]'"
        ) from exc
    if int(str(pyspark.__version__).split(".")[0]) < 4:
        raise SparkUnavailable(f"--engine spark needs pyspark >= 4.0, found {pyspark.__version__}")
    builder = (
        SparkSession.builder.master(master)
        .appName(app)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
    )
    if master.startswith("local"):
        # local Python workers run this interpreter (this venv), not whatever python3 is
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


def partition_entity(definitions: FeatureDefinitions, features: Sequence[str]) -> str | None:
    """The entity to partition by: the first stream group's (it decides the log share),
    else the first batch group's; ``None`` when the features need no entity."""
    resolution = _resolve(definitions, features)
    for group in resolution.stream_groups:
        return definitions.stream_groups[group].entity
    for group in resolution.batch_groups:
        return definitions.batch_groups[group].entity
    return None


def map_by_entity(
    spark: Any,
    table: pa.Table,
    key: str | None,
    fn: Callable[[pa.Table], pa.Table],
    out_schema: pa.Schema,
) -> pa.Table:
    """``fn`` over the partitions of ``table`` (by ``key``), results in input row order.

    ``fn`` takes a partition's rows and returns one output row per input row, in the
    same order, castable to ``out_schema``.
    """
    from pyspark.sql.pandas.types import (  # type: ignore[import-not-found, unused-ignore]
        from_arrow_schema,
    )

    if table.num_rows == 0:
        return out_schema.empty_table()
    numbered = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    frame = spark.createDataFrame(numbered)
    if key is not None and key in table.column_names:
        frame = frame.repartition(spark.sparkContext.defaultParallelism, key)
    with_row = out_schema.append(pa.field(ROW_COLUMN, pa.int64()))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        received = [b for b in batches if b.num_rows]
        if not received:
            return
        part = pa.Table.from_batches(received)
        out = fn(part.drop_columns([ROW_COLUMN]))
        out = out.append_column(ROW_COLUMN, part.column(ROW_COLUMN))
        yield from out.select(with_row.names).cast(with_row).to_batches()

    result = frame.mapInArrow(run, from_arrow_schema(with_row)).toArrow()
    return result.sort_by(ROW_COLUMN).drop_columns([ROW_COLUMN]).cast(out_schema)
