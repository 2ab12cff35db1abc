"""The local engine by key partition: memory bounded by one partition, not the whole log.

``--key-partitions K`` (K > 1) splits the spine, in one streamed pass, into K
temporary Parquet files by a stable hash (CRC-32) of the partition entity's key
(the first stream group's entity: it decides the log share). Stream features keyed
by another entity (e.g. the merchant's) get their own pass, partitioned by that
entity's key, written per main partition and joined back by row number: otherwise
every main partition would need every such key's history. Each worker then scores
one partition at a time: it reads only the event records carrying that partition's
keys (a Parquet log; a JSON-lines log is replayed whole) and only their snapshot
rows (the backfill's per-spine filter, as the Spark engine), builds that index,
scores the partition's rows and writes a part file with each row's spine row
number. The parts are merged back, streamed by row number, into the spine's order,
so the output equals the unpartitioned run."""

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

from feature_streams.definitions import Entity, FeatureDefinitions, FeatureSource
from feature_streams.definitions import resolve_features as _resolve
from feature_streams.event_filter import entity_key
from server.batch_scoring.chunk import ChunkJob, score_chunk
from server.batch_scoring.features import PointInTimeFeatures
from server.batch_scoring.local import Progress
from server.batch_scoring.spine import TIME_COLUMN

__all__ = ["MAX_PARTITIONS", "ROW_COLUMN", "merged", "partition_of", "run_partitioned"]

I64 = npt.NDArray[np.int64]
ROW_COLUMN: Final = "__streamscore_row"
_MAIN_PART: Final = "__streamscore_part"
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


class _Writers:
    """One Parquet writer per part file, opened on first rows."""

    def __init__(self) -> None:
        self.open: dict[Path, pq.ParquetWriter] = {}

    def write(self, path: Path, table: pa.Table) -> None:
        if path not in self.open:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.open[path] = pq.ParquetWriter(path, table.schema)
        self.open[path].write_table(table)

    def close(self) -> None:
        for writer in self.open.values():
            writer.close()


def _split(
    chunks: Iterator[tuple[int, pa.Table]],
    main: Entity,
    sides: Sequence[Entity],
    k: int,
    into: Path,
) -> pa.Table:
    """Write each main partition's rows (with row numbers) to ``spine-C.parquet``, and per
    side entity its (row, id, time, main partition) to ``side-ENTITY-P.parquet``.

    Returns an empty table of the spine's schema.
    """
    writers = _Writers()
    empty: pa.Table | None = None
    try:
        for first, chunk in chunks:
            rows = pa.array(np.arange(first, first + chunk.num_rows, dtype=np.int64))
            numbered = chunk.append_column(ROW_COLUMN, rows)
            if empty is None:
                empty = chunk.slice(0, 0)
            parts = partition_of(chunk.column(main.name), main, k)
            for c in np.unique(parts):
                writers.write(into / f"spine-{c}.parquet", numbered.filter(pa.array(parts == c)))
            for side in sides:
                narrow = numbered.select([ROW_COLUMN, side.name, TIME_COLUMN])
                narrow = narrow.append_column(_MAIN_PART, pa.array(parts))
                of_side = partition_of(chunk.column(side.name), side, k)
                for p in np.unique(of_side):
                    rows_of = narrow.filter(pa.array(of_side == p))
                    writers.write(into / f"side-{side.name}-{p}.parquet", rows_of)
    finally:
        writers.close()
    assert empty is not None  # the spine reader yields at least one chunk
    return empty


def _side_part(features: PointInTimeFeatures, side: Path, into: Path) -> None:
    """One side partition: its features computed from its keys' log only, then written
    per main partition (``side-for-C/<file>``), sorted by row number."""
    table = pq.read_table(side)
    extra = [ROW_COLUMN, _MAIN_PART]
    values = features.table(table.drop_columns(extra))
    out = pa.table(
        {ROW_COLUMN: table.column(ROW_COLUMN), _MAIN_PART: table.column(_MAIN_PART)}
        | {name: values.column(name) for name in features.features}
    )
    parts = out.column(_MAIN_PART).to_numpy()
    for c in np.unique(parts):
        rows_of = out.filter(pa.array(parts == c)).drop_columns([_MAIN_PART])
        (into / f"side-for-{c}").mkdir(exist_ok=True)
        pq.write_table(rows_of, into / f"side-for-{c}" / side.name)


def _part_batch(rows_per_chunk: int, parts: int) -> int:
    """Rows read from each part per step: the merge holds about two output chunks."""
    return max(1024, rows_per_chunk // parts)


def _score_part(job: ChunkJob, spine: Path, out: Path, batch: int) -> int:
    """One main partition: the side features computed for its rows joined by row number,
    the rest from its keys' log and snapshot rows; its rows scored and written."""
    table = pq.read_table(spine)
    rows = table.column(ROW_COLUMN)
    sides = spine.with_name(f"side-for-{spine.stem.removeprefix('spine-')}")
    if sides.is_dir():
        joined = pa.concat_tables([pq.read_table(f) for f in sorted(sides.iterdir())])
        joined = joined.take(pc.sort_indices(joined, sort_keys=[(ROW_COLUMN, "ascending")]))
        if not joined.column(ROW_COLUMN).equals(rows):
            raise RuntimeError(f"{spine}: side features do not cover its rows")
        for name in joined.column_names:
            if name != ROW_COLUMN:
                table = table.append_column(name, joined.column(name))
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


def side_features(
    definitions: FeatureDefinitions, features: Sequence[str], main: str
) -> dict[str, tuple[str, ...]]:
    """Stream features keyed by an entity other than ``main``, by entity: computed in
    their own pass partitioned by that entity (else every main partition would need
    every such key's history)."""
    out: dict[str, list[str]] = {}
    for ref in _resolve(definitions, features).refs:
        if ref.source is FeatureSource.STREAM and ref.entity is not None and ref.entity != main:
            out.setdefault(ref.entity, []).append(ref.name)
    return {entity: tuple(names) for entity, names in out.items()}


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
    pit = job.features
    if not isinstance(pit, PointInTimeFeatures):
        raise TypeError("key partitions need point-in-time features")
    definitions = pit.definitions
    sides = side_features(definitions, pit.features, entity.name)
    aside = {name for names in sides.values() for name in names}
    own = tuple(f for f in pit.features if f not in aside)
    job = dataclasses.replace(job, features=dataclasses.replace(pit, whole_log=False, features=own))
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".score-batch-", dir=scratch) as name:
        into = Path(name)
        side_entities = [definitions.entities[e] for e in sides]
        empty = _split(chunks, entity, side_entities, partitions, into)
        spines = sorted(into.glob("spine-*.parquet"), key=_number)
        if not spines:
            whole = dataclasses.replace(pit, whole_log=False)
            sink(score_chunk(dataclasses.replace(job, features=whole), empty))
            return 0
        side_jobs = [
            (dataclasses.replace(pit, whole_log=False, features=sides[e]), path)
            for e in sides
            for path in sorted(into.glob(f"side-{e}-*.parquet"), key=_number)
        ]
        outs = [into / f"scored-{i}.parquet" for i in range(len(spines))]
        batch = _part_batch(rows_per_chunk, len(spines))
        total = 0
        if workers <= 1:
            for features, path in side_jobs:
                _side_part(features, path, into)
            for spine, out_path in zip(spines, outs, strict=True):
                total += _count(_score_part(job, spine, out_path, batch), progress)
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for done in [pool.submit(_side_part, f, p, into) for f, p in side_jobs]:
                    done.result()
                futures = [
                    pool.submit(_score_part, job, s, o, batch)
                    for s, o in zip(spines, outs, strict=True)
                ]
                for future in futures:
                    total += _count(future.result(), progress)
        for table in merged(outs, total, rows_per_chunk, batch):
            sink(table)
        return total


def _number(path: Path) -> int:
    """The partition number ending a part file's stem."""
    return int(path.stem.rsplit("-", 1)[1])


def _count(rows: int, progress: Progress | None) -> int:
    if progress is not None:
        progress.add(rows)
    return rows
