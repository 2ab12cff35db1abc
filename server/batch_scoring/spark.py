"""The Spark engine: the very same :func:`score_chunk` per entity partition.

Each spine chunk is checked on the driver (the local engine's errors), distributed by
the hash of an entity column and every partition goes through
:func:`server.batch_scoring.chunk.score_chunk`, the function the local engine's
workers run (:func:`feature_streams.spark_engine.map_by_entity`): no window math is
re-implemented. Each executor reads the event log and batch files by path (shared
storage on a cluster), keeping only the records of its partition's keys (see
:mod:`.features`). Output rows come back in spine order and are written by the same
:class:`~server.batch_scoring.output.OutputFile`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from feature_streams.spark_engine import SparkUnavailable, map_by_entity, spark_session
from server.batch_scoring.chunk import ChunkJob, score_chunk
from server.batch_scoring.local import Progress
from server.batch_scoring.spine import SpineReader

__all__ = ["SparkUnavailable", "run_spark"]


def run_spark(
    job: ChunkJob,
    reader: SpineReader,
    sink: Callable[[pa.Table], None],
    master: str,
    key: str | None,
    progress: Progress | None = None,
) -> int:
    """Score the spine on Spark, partitioned by ``key``; outputs to ``sink``; rows scored."""
    spark = spark_session(master, "streamscore-score-batch")
    rows = 0
    score = functools.partial(score_chunk, job)
    for _, chunk in reader.chunks():
        # the output schema: one row scored here (an empty chunk has no value types)
        schema = score_chunk(job, chunk.slice(0, min(1, chunk.num_rows))).schema
        result = map_by_entity(spark, chunk, key, score, schema)
        sink(result)
        rows += result.num_rows
        if progress is not None:
            progress.add(result.num_rows)
    return rows
