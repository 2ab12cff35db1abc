"""The local engine: chunks scored by ``workers`` processes, written in spine order.

At most ``2 * workers`` chunks are in flight, so memory is bounded by the chunk size,
not the spine. Each process loads the model once (sha256 checked) and keeps it.
A progress line (rows, rows/s, ETA when the row count is known) goes to stderr.

Where ``fork`` exists (Linux), the point-in-time index is built once, in this process,
before the workers are forked: they inherit it copy-on-write instead of each reading
and indexing the whole log again. A forked reader reads and checks the spine during
that build (:mod:`.feeder`). Chunks go to the workers and their output rows come
back as Arrow IPC files in a scratch directory (written once, memory-mapped when
read): nothing big is pickled. Elsewhere the workers are spawned and each builds its
own index (the chunks are pickled).
"""

from __future__ import annotations

import collections
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TextIO

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.batch_scoring.chunk import ChunkJob, score_chunk
from server.batch_scoring.features import PointInTimeFeatures
from server.batch_scoring.feeder import SpineFeeder
from server.batch_scoring.ipc_files import read_ipc, write_ipc

__all__ = ["Progress", "run_local"]


class Progress:
    """``rows  rows/s  ETA`` on one stderr line, at most every ``interval_s``."""

    def __init__(
        self, total: int | None, stream: TextIO | None = None, interval_s: float = 1.0
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr  # the current one
        self.interval_s = interval_s
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def line(self) -> str:
        """The current progress text."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"score-batch: {self.done:,} rows  {rate:,.0f} rows/s"
        if self.total:
            left = max(self.total - self.done, 0)
            eta = left / rate if rate > 0 else float("inf")
            text += f"  {100 * self.done / self.total:.1f}%  ETA {_duration(eta)}"
        return text

    def add(self, rows: int) -> None:
        """Count rows done; redraw when due."""
        self.done += rows
        now = time.monotonic()
        if now - self._shown >= self.interval_s:
            self._shown = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def finish(self) -> None:
        """The final line."""
        self.stream.write("\r" + self.line() + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def run_local(
    job: ChunkJob,
    chunks: Iterator[tuple[int, pa.Table]],
    sink: Callable[[pa.Table], None],
    workers: int,
    progress: Progress | None = None,
    scratch: Path | None = None,
) -> int:
    """Score every chunk, hand outputs to ``sink`` in input order; returns rows scored.

    ``scratch``: where the forked workers' chunk files go (default: the system's
    temporary directory); removed at the end, also on failure."""
    rows = 0
    if workers <= 1:
        for first, chunk in chunks:
            out = score_chunk(job, chunk, first)
            sink(out)
            rows += out.num_rows
            if progress is not None:
                progress.add(out.num_rows)
        return rows
    if "fork" in multiprocessing.get_all_start_methods():
        return _run_forked(job, chunks, sink, workers, progress, scratch)
    # spawn: a clean interpreter per worker (no forked Redis/ORT/thread state)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending: collections.deque[Future[pa.Table]] = collections.deque()
        try:
            for first, chunk in chunks:
                pending.append(pool.submit(score_chunk, job, chunk, first))
                while len(pending) >= 2 * workers:
                    rows += _drain(pending.popleft(), sink, progress)
            while pending:
                rows += _drain(pending.popleft(), sink, progress)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return rows


def _run_forked(
    job: ChunkJob,
    chunks: Iterator[tuple[int, pa.Table]],
    sink: Callable[[pa.Table], None],
    workers: int,
    progress: Progress | None,
    scratch: Path | None,
) -> int:
    """Workers forked after the index is built; chunks in and out as IPC files. The
    spine is read by a forked reader meanwhile (:class:`.feeder.SpineFeeder`)."""
    rows = 0
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=".score-batch-", dir=scratch) as tmp,
        SpineFeeder(chunks, Path(tmp)) as feeder,
    ):
        if isinstance(job.features, PointInTimeFeatures):
            job.features.prepare()  # the workers inherit it: no index build per worker
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            pending: collections.deque[tuple[Future[int], Path]] = collections.deque()
            try:
                for first, source in feeder:
                    target = Path(tmp, f"out-{first}.arrow")
                    task = pool.submit(score_chunk_file, job, source, first, target)
                    pending.append((task, target))
                    while len(pending) >= 2 * workers:
                        rows += _drain_file(*pending.popleft(), sink, progress)
                while pending:
                    rows += _drain_file(*pending.popleft(), sink, progress)
            except BaseException:
                for future, _ in pending:
                    future.cancel()
                raise
    return rows


def score_chunk_file(job: ChunkJob, source: Path, first_row: int, target: Path) -> int:
    """A forked worker's task: the chunk in ``source`` scored into ``target``; rows."""
    chunk = read_ipc(source)
    out = score_chunk(job, chunk, first_row)
    write_ipc(out, target)
    source.unlink()
    return int(out.num_rows)


def _drain_file(
    future: Future[int],
    target: Path,
    sink: Callable[[pa.Table], None],
    progress: Progress | None,
) -> int:
    rows = future.result()
    sink(read_ipc(target))
    target.unlink()
    if progress is not None:
        progress.add(rows)
    return rows


def _drain(
    future: Future[pa.Table], sink: Callable[[pa.Table], None], progress: Progress | None
) -> int:
    out = future.result()
    sink(out)
    if progress is not None:
        progress.add(out.num_rows)
    return int(out.num_rows)
