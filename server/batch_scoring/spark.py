"""The Spark engine: the very same :func:`score_chunk` per partition, in ``mapInPandas``.

The spine is read by Spark, repartitioned by the hash of the first key entity (so a
partition holds whole entities and its share of the event log is small) and every
partition's Arrow batches go through :func:`server.batch_scoring.chunk.score_chunk`,
the function the local engine's workers run: no window math is re-implemented. Each
executor reads the event log and batch files by path (shared storage on a cluster),
keeping only the records of its partition's keys (see :mod:`.features`). Output rows
come back to the driver in partition order and are written by the same
:class:`~server.batch_scoring.output.OutputFile`.

PySpark is the optional extra ``spark`` (``pip install 'streamscore[spark]'``) and
needs Java 17; ``master`` is any Spark master URL (``local[*]`` by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.batch_scoring.chunk import ChunkJob, score_chunk
from server.batch_scoring.local import Progress
from server.batch_scoring.spine import SpineReader

__all__ = ["SparkUnavailable", "run_spark", "spark_session"]


class SparkUnavailable(RuntimeError):
    """PySpark (the ``spark`` extra) or Java is missing."""


def spark_session(master: str) -> Any:
    """A Spark session on ``master`` with Arrow transfers on."""
    try:
        from pyspark.sql import SparkSession  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise SparkUnavailable("--engine spark needs the 'spark' extra (pyspark)") from exc
    return (
        SparkSession.builder.master(master)
        .appName("streamscore-score-batch")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )


def _schema_of(table: pa.Table) -> Any:
    from pyspark.sql.pandas.types import (  # type: ignore[import-not-found, unused-ignore]
        from_arrow_schema,
    )

    return from_arrow_schema(table.schema)


def run_spark(
    job: ChunkJob,
    reader: SpineReader,
    sink: Callable[[pa.Table], None],
    master: str,
    progress: Progress | None = None,
) -> int:
    """Score the spine on Spark; outputs handed to ``sink``; returns rows scored.

    The spine chunks are checked on the driver (same errors as the local engine), in
    spine order, and numbered so the output keeps that order.
    """
    spark = spark_session(master)
    rows = 0
    partitions = max(1, spark.sparkContext.defaultParallelism)
    key = reader.entities[0].name if reader.entities else None
    for _, chunk in reader.chunks():
        numbered = chunk.append_column("__row", pa.array(range(chunk.num_rows), pa.int64()))
        # output schema: score one row locally (empty chunks have no value types to infer)
        probe = score_chunk(job, numbered.slice(0, min(1, chunk.num_rows)))
        out_schema = probe.schema.append(pa.field("__row", pa.int64()))
        frame = spark.createDataFrame(numbered.to_pandas())
        if key is not None:
            frame = frame.repartition(partitions, key)

        def score(batches: Iterator[Any], job: ChunkJob = job) -> Iterator[Any]:
            for batch in batches:
                table = pa.Table.from_pandas(batch, preserve_index=False)
                out = score_chunk(job, table.drop_columns(["__row"]))
                yield out.append_column("__row", table.column("__row")).to_pandas()

        scored = frame.mapInPandas(score, schema=_schema_of(out_schema.empty_table()))
        result = pa.Table.from_pandas(scored.toPandas(), preserve_index=False)
        result = result.sort_by("__row").drop_columns(["__row"]).cast(probe.schema)
        sink(result)
        rows += result.num_rows
        if progress is not None:
            progress.add(result.num_rows)
    return rows
