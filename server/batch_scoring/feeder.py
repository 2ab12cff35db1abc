"""The spine read ahead in a forked process, chunk by chunk, into Arrow IPC files.

The local engine builds the point-in-time index in its own process before it forks the
workers; that build leaves the second core mostly idle. :class:`SpineFeeder` forks a
reader first: it reads and checks the spine's chunks (:mod:`.spine`) meanwhile and
writes each one as an IPC file for the workers, so the parent only hands file names
on. The reader stays at most ``budget_bytes`` of files ahead of what the parent has
taken (always at least one chunk): scratch space, not memory, and bounded.

An error the reader meets (a bad spine row: :class:`~.spine.SpineError`) is raised
by the iteration in the parent, in its place among the chunks.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Semaphore
from pathlib import Path
from types import TracebackType
from typing import Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.batch_scoring.ipc_files import write_ipc

__all__ = ["DEFAULT_BUDGET_BYTES", "SpineFeeder"]

DEFAULT_BUDGET_BYTES: Final = 256 << 20
"""Chunk files read ahead of the parent, at most (the bench's 1M-row spine: ~130 MB)."""


class SpineFeeder:
    """``(first row, IPC file)`` per chunk, read by a forked process (a context manager)."""

    def __init__(
        self,
        chunks: Iterator[tuple[int, pa.Table]],
        directory: Path,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._taken = context.Semaphore(0)
        self._process = context.Process(
            target=_feed,
            args=(chunks, directory, send, self._taken, budget_bytes),
            name="score-batch-spine",
            daemon=True,
        )
        self._send = send

    def __enter__(self) -> SpineFeeder:
        self._process.start()
        self._send.close()  # the reader's end: EOF here when the reader is gone
        return self

    def __iter__(self) -> Iterator[tuple[int, Path]]:
        while True:
            try:
                message = self._receive.recv()
            except EOFError:
                raise RuntimeError(
                    f"the spine reader process ended without a reason "
                    f"(exit code {self._process.exitcode})"
                ) from None
            kind = message[0]
            if kind == "end":
                return
            if kind == "error":
                raise message[1]
            self._taken.release()
            yield message[1], Path(message[2])

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._process.is_alive():
            self._process.terminate()  # stopped early: by an error, or the reader is ahead
        self._process.join()
        self._receive.close()


def _feed(
    chunks: Iterator[tuple[int, pa.Table]],
    directory: Path,
    send: Connection,
    taken: Semaphore,
    budget_bytes: int,
) -> None:
    """The reader process: every chunk to a file, its name to the parent, in order."""
    parent = os.getppid()
    ahead: collections.deque[int] = collections.deque()  # sizes not yet taken, in order
    try:
        while True:
            while ahead and taken.acquire(block=False):
                ahead.popleft()
            while ahead and sum(ahead) >= budget_bytes:
                while not taken.acquire(timeout=1.0):
                    if os.getppid() != parent:
                        return  # the parent is gone (killed): nobody will take more
                ahead.popleft()
            item = next(chunks, None)
            if item is None:
                break
            first, chunk = item
            path = directory / f"in-{first}.arrow"
            ahead.append(write_ipc(chunk, path))
            send.send(("chunk", first, str(path)))
        send.send(("end",))
    except BaseException as exc:  # handed to the parent, raised there
        _send_error(send, exc)
    finally:
        send.close()


def _send_error(send: Connection, exc: BaseException) -> None:
    try:
        send.send(("error", exc))
    except OSError:
        return  # the parent has stopped listening: it is ending anyway
    except Exception:  # not picklable: its type and text
        send.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
