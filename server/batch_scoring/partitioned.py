"""The local engine by key partition: memory bounded by one partition, not the whole log.

``--key-partitions K`` (K > 1) splits the spine, in one streamed pass, into K
temporary Parquet files by a stable hash (CRC-32) of the partition entity's key
(the first stream group's entity: it decides the log share). Each worker then
scores one partition at a time: it reads only the event records carrying that
partition's keys and only their snapshot rows (the backfill's per-spine filter,
as the Spark engine), builds that index, scores the partition's rows and writes a
part file with each row's spine row number. The parts are merged back, streamed
by row number, into the spine's order, so the output equals the unpartitioned run.

Any assignment of rows to partitions gives the same values: a row's point-in-time
value depends only on the complete log of its own keys, and every partition reads
the complete log of the keys it holds. The hash only decides how evenly memory is
spread.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import Entity
from feature_streams.event_filter import entity_key
from server.batch_scoring.chunk import ChunkJob, score_chunk
from server.batch_scoring.features import PointInTimeFeatures
from server.batch_scoring.local import Progress

__all__ = ["MAX_PARTITIONS", "ROW_COLUMN", "merged", "partition_of", "run_partitioned"]

I64 = npt.NDArray[np.int64]
ROW_COLUMN: Final = "__streamscore_row"
MAX_PARTITIONS: Final = 4096


def partition_of(column: pa.ChunkedArray | pa.Array, entity: Entity, k: int) -> I64:
    """Per row, ``crc32(key) % k`` of its id's key (a missing or malformed id: 0)."""
    unique = pc.unique(column)
    parts = np.zeros(len(unique), np.int64)
    for i, value in enumerate(unique.to_pylist()):
        key = entity_key(entity, value)
        if key is not None:
            parts[i] = zlib.crc32(key.encode()) % k
    at = pc.index_in(column, value_set=unique).to_numpy(zero_copy_only=False)
    out: I64 = parts[np.nan_to_num(at, nan=0).astype(np.int64)]
    return out


def _split(
    chunks: Iterator[tuple[int, pa.Table]], entity: Entity, k: int, into: Path
) -> tuple[list[Path], pa.Table]:
    """Write each partition's rows (with their row numbers) to its own file.

    Returns the part files that got rows and an empty table of the spine's schema.
    """
    writers: dict[int, pq.ParquetWriter] = {}
    empty: pa.Table | None = None
    try:
        for first, chunk in chunks:
            rows = pa.array(np.arange(first, first + chunk.num_rows, dtype=np.int64))
            numbered = chunk.append_column(ROW_COLUMN, rows)
            if empty is None:
                empty = chunk.slice(0, 0)
            parts = partition_of(chunk.column(entity.name), entity, k)
            for p in np.unique(parts):
                rows_of = numbered.filter(pa.array(parts == p))
                if int(p) not in writers:
                    writers[int(p)] = pq.ParquetWriter(into / f"spine-{p}.parquet", rows_of.schema)
                writers[int(p)].write_table(rows_of)
    finally:
        for writer in writers.values():
            writer.close()
    assert empty is not None  # the spine reader yields at least one chunk
    return [into / f"spine-{p}.parquet" for p in sorted(writers)], empty


def _part_batch(rows_per_chunk: int, parts: int) -> int:
    """Rows read from each part per step: the merge holds about two output chunks."""
    return max(1024, rows_per_chunk // parts)


def _score_part(job: ChunkJob, spine: Path, out: Path, batch: int) -> int:
    """One partition: its keys' log and snapshot rows read, its rows scored, written."""
    table = pq.read_table(spine)
    rows = table.column(ROW_COLUMN)
    scored = score_chunk(job, table.drop_columns([ROW_COLUMN])).append_column(ROW_COLUMN, rows)
    pq.write_table(scored, out, row_group_size=batch)
    return int(scored.num_rows)


def merged(
    parts: Sequence[Path], total: int, rows_per_chunk: int, batch: int
) -> Iterator[pa.Table]:
    """The parts' rows (each part sorted by row number, together rows 1..``total``) in
    row-number order, ``rows_per_chunk`` at a time, reading ``batch`` rows per step."""
    readers = [pq.ParquetFile(p).iter_batches(batch_size=batch) for p in parts]
    schema = pq.ParquetFile(parts[0]).schema_arrow
    buffers: list[pa.Table] = [schema.empty_table() for _ in parts]
    for low in range(1, total + 1, rows_per_chunk):
        high = low + rows_per_chunk
        taken: list[pa.Table] = []
        for i, reader in enumerate(readers):
            buffer = buffers[i]
            while buffer.num_rows == 0 or buffer.column(ROW_COLUMN)[-1].as_py() < high:
                step = next(reader, None)
                if step is None:
                    break
                buffer = pa.concat_tables([buffer, pa.Table.from_batches([step])])
            numbers = buffer.column(ROW_COLUMN).to_numpy()
            cut = int(np.searchsorted(numbers, high))
            taken.append(buffer.slice(0, cut))
            buffers[i] = buffer.slice(cut)
        window = pa.concat_tables(taken)
        order = pc.sort_indices(window, sort_keys=[(ROW_COLUMN, "ascending")])
        yield window.take(order).drop_columns([ROW_COLUMN]).combine_chunks()


def run_partitioned(
    job: ChunkJob,
    chunks: Iterator[tuple[int, pa.Table]],
    sink: Callable[[pa.Table], None],
    entity: Entity,
    partitions: int,
    workers: int,
    scratch: Path,
    rows_per_chunk: int,
    progress: Progress | None = None,
) -> int:
    """Score the spine partition by partition; outputs to ``sink`` in spine order."""
    if not isinstance(job.features, PointInTimeFeatures):
        raise TypeError("key partitions need point-in-time features")
    job = dataclasses.replace(job, features=dataclasses.replace(job.features, whole_log=False))
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".score-batch-", dir=scratch) as name:
        into = Path(name)
        spines, empty = _split(chunks, entity, partitions, into)
        if not spines:
            out = score_chunk(job, empty)
            sink(out)
            return 0
        outs = [into / f"scored-{i}.parquet" for i in range(len(spines))]
        batch = _part_batch(rows_per_chunk, len(spines))
        total = 0
        if workers <= 1:
            for spine, out_path in zip(spines, outs, strict=True):
                total += _count(_score_part(job, spine, out_path, batch), progress)
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(spines)), mp_context=context) as pool:
                futures = [
                    pool.submit(_score_part, job, s, o, batch)
                    for s, o in zip(spines, outs, strict=True)
                ]
                for future in futures:
                    total += _count(future.result(), progress)
        for table in merged(outs, total, rows_per_chunk, batch):
            sink(table)
        return total


def _count(rows: int, progress: Progress | None) -> int:
    if progress is not None:
        progress.add(rows)
    return rows
