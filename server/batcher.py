"""Per-version micro-batcher: bounded queue, deadline-aware, no idle wait.

Policy (continuous batching, gathered without timers):

* One flush task per batcher runs at most one batch at a time. When it finds the
  queue non-empty it first *gathers*: it yields to the event loop
  (``asyncio.sleep(0)``) while new requests keep arriving, and stops after
  ``gather_patience`` turns with no arrival. grpc.aio hands calls to handlers one
  after another, a few loop turns apart, so under load this collects the calls
  already inside the server; at idle it costs a lone request a few empty loop
  turns (microseconds). No sub-millisecond timer is relied on (asyncio does not
  honour them). A batch of size 1 skips gathering entirely.
* While a batch runs (on a worker thread, or inline for tiny models), arrivals
  queue up and the next batch takes them all, up to ``max_batch_size`` rows.
* ``max_queue_delay_s`` > 0 adds a Triton-style fill window, but only while
  recent batches held more than one request, so a lone caller never waits for it.
* Idle fast path: when the batcher is idle (nothing queued, no batch running),
  recent batches held one request each (a lone caller), and ``run_now`` can compute
  the job synchronously (inline model, no I/O), ``submit`` runs the job itself at
  once: no future, no flush-task hand-off, no gathering turns. It cannot be
  interrupted, so deadline and queue checks made on entry still hold. Every
  ``lone_probe_interval_s`` one request takes the gathering path instead, so
  arriving concurrency is noticed and batching resumes.
* Over ``max_queue_size`` pending requests or ``max_queue_rows`` pending rows,
  ``submit`` raises ``QueueFull`` at once; so it does when ``max_queue_wait_s`` is set
  and the wait the queue already implies exceeds it (the rest of the running batch plus
  the full batches ahead of the one the job joins, at a high quantile of recent batch
  times: ``server.queue_wait``; the first, cold, batch after a (re)load not counted).
  That bounds an accepted job's latency by the budget plus its own batch, whatever a
  batch costs, and refuses the excess before it waits.
* A request whose deadline comes before the queue ahead of it is expected to clear
  (median batch time) fails with ``DeadlineExceeded`` at once instead of waiting to
  miss it. Before a
  batch runs, requests whose caller cancelled are skipped, and requests whose
  deadline has passed fail with ``DeadlineExceeded``; neither is computed.
* Each caller gets exactly the rows of its own request back: outputs are split by
  row offsets of the concatenated batch. A result is set only on a future that is
  still pending, so a caller that went away never strands the rest of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    QueueFull,
    ScoringError,
    ShuttingDown,
)
from server.queue_wait import BatchTimes, expected_wait

logger = logging.getLogger(__name__)

Outputs = dict[str, npt.NDArray[np.generic]]

J = TypeVar("J")
R = TypeVar("R")
#: Runs one batch of jobs; returns, per job and in order, its result or the error it gets.
RunJobs = Callable[[list[J]], Awaitable[Sequence[R | ScoringError]]]
#: Runs a batch synchronously when it can (``None`` when it would have to wait).
RunNow = Callable[[list[J]], Sequence[R | ScoringError] | None]
#: Average requests per batch under which traffic counts as a lone caller.
_LONE_CALLER = 1.1


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Limits of one batcher."""

    max_batch_size: int = 64
    max_queue_size: int = 1024
    #: Rows waiting (a job of N rows counts N); ``None``: only requests are counted.
    max_queue_rows: int | None = None
    max_queue_delay_s: float = 0.0
    #: Estimated queue wait past which a new job is refused; ``None``: not checked.
    max_queue_wait_s: float | None = None
    #: Loop turns without a new arrival after which gathering stops.
    gather_patience: int = 6
    #: Most loop turns one gathering may take.
    max_gather_turns: int = 64
    #: While the idle fast path is on, one request per interval gathers instead.
    lone_probe_interval_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        if self.max_queue_rows is not None and self.max_queue_rows < self.max_batch_size:
            raise ValueError("max_queue_rows must be >= max_batch_size")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        if self.max_queue_wait_s is not None and self.max_queue_wait_s <= 0:
            raise ValueError("max_queue_wait_s must be > 0")
        if self.gather_patience < 1 or self.max_gather_turns < 0:
            raise ValueError("gather_patience must be >= 1 and max_gather_turns >= 0")
        if self.lone_probe_interval_s < 0:
            raise ValueError("lone_probe_interval_s must be >= 0")


class BatchObserver(Protocol):
    """What a batcher reports; the metrics module implements it."""

    def batch_ran(self, rows: int, requests: int, seconds: float) -> None: ...
    def queue_waited(self, seconds: float) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def queue_depth(self, requests: int) -> None: ...


class _NullObserver:
    def batch_ran(self, rows: int, requests: int, seconds: float) -> None:
        pass

    def queue_waited(self, seconds: float) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def queue_depth(self, requests: int) -> None:
        pass


@dataclass(slots=True)
class _Pending(Generic[J, R]):
    job: J
    rows: int
    future: asyncio.Future[R]
    deadline: float | None
    enqueued_at: float


class MicroBatcher(Generic[J, R]):
    """Gathers concurrent jobs for one model version into batches.

    A job is whatever ``run_batch`` understands (rows to score, or a request whose
    features are fetched for the whole batch at once); the batcher only needs
    each job's row count to respect ``max_batch_size``.
    """

    def __init__(
        self,
        name: str,
        run_batch: RunJobs[J, R],
        policy: BatchPolicy,
        observer: BatchObserver | None = None,
        run_now: RunNow[J, R] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._run_batch = run_batch
        self._run_now = run_now
        #: True from the moment the flush task starts gathering until its batch ran.
        self._busy = False
        #: ``loop.time()`` at which the batch in progress started running (None: none).
        self._running_since: float | None = None
        #: Rows of the batch in progress.
        self._running_rows = 0
        #: ``loop.time()`` from which the next fast-path candidate gathers instead.
        self._next_probe = 0.0
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: deque[_Pending[J, R]] = deque()
        self._rows_queued = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The loop the batcher serves on, bound at first use: asking asyncio for the
        #: running loop per request costs a getpid() system call each time (CPython 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        #: Moving average of requests per batch: the fill window opens only above 1.5.
        self._recent_requests_per_batch = 1.0
        #: Run times of recent batches: what the queue ahead of a new job will take.
        self._batch_times = BatchTimes(policy.max_batch_size, skip_first=True)

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch running now)."""
        return len(self._queue)

    @property
    def lone(self) -> bool:
        """Nothing queued, no batch running, and recent batches held one request each:
        a lone caller (the signal for work that may run on the loop at once)."""
        return not self._queue and not self._busy and self._recent_requests_per_batch < _LONE_CALLER

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called (new jobs are refused)."""
        return self._closing

    @property
    def expected_wait_s(self) -> float:
        """The wait the budget bounds for a one-row job queued now (high batch times)."""
        return self._wait(1, asyncio.get_running_loop().time(), high=True)

    def _wait(self, rows: int, now: float, *, high: bool) -> float:
        """Expected wait of a job of ``rows`` rows: high (the budget's) or typical."""
        times = self._batch_times
        full = times.full
        running = None
        if (since := self._running_since) is not None:
            batch = times.of(self._running_rows)
            running = (batch.high if high else batch.typical, now - since)
        return expected_wait(
            self._rows_queued,
            rows,
            self.policy.max_batch_size,
            full.high if high else full.typical,
            running,
        )

    def start(self) -> None:
        """Start the flush task on the running loop."""
        if self._task is None:
            self._task = self._running_loop().create_task(
                self._flush_loop(), name=f"batcher:{self.name}"
            )

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this batcher serves on (bound on first use)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def submit(self, job: J, *, rows: int = 1, deadline: float | None = None) -> R:
        """Queue ``job`` (``rows`` input rows) and wait for its result.

        ``deadline`` is an absolute ``loop.time()``; past it the request is dropped
        with ``DeadlineExceeded`` instead of being computed.
        """
        outcome = self.submit_now(job, rows=rows, deadline=deadline)
        if isinstance(outcome, asyncio.Future):
            return await outcome
        return outcome

    def submit_now(
        self, job: J, *, rows: int = 1, deadline: float | None = None
    ) -> R | asyncio.Future[R]:
        """``submit`` without a coroutine: the result itself when the idle fast path ran
        the job at once, else the queued job's future (await it; cancelling drops it)."""
        loop = self._running_loop()
        now = self._admit(rows, deadline, loop)
        if (
            self._run_now is not None
            and not self._queue
            and not self._busy
            and self._recent_requests_per_batch < _LONE_CALLER
        ):
            if now < self._next_probe:
                done = self._run_direct(job, rows, loop)
                if done is not None:
                    return done[0]
            self._next_probe = now + self.policy.lone_probe_interval_s
        return self._push(job, rows, deadline, now, loop)

    def enqueue(self, job: J, *, rows: int = 1, deadline: float | None = None) -> asyncio.Future[R]:
        """Queue ``job`` like ``submit`` (same checks, always batched) and return the
        future of its result at once; cancelling the future drops the job."""
        loop = self._running_loop()
        now = self._admit(rows, deadline, loop)
        return self._push(job, rows, deadline, now, loop)

    def _admit(self, rows: int, deadline: float | None, loop: asyncio.AbstractEventLoop) -> float:
        """Refuse a job that cannot be queued now; the current ``loop.time()`` otherwise."""
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down")
        if rows < 1:
            raise InvalidInput("rows", f"expected at least one row, got {rows}")
        if rows > self.policy.max_batch_size:
            raise InvalidInput(
                "rows", f"{rows} rows exceed max_batch_size {self.policy.max_batch_size}"
            )
        if len(self._queue) >= self.policy.max_queue_size:
            self._observer.dropped("queue_full")
            raise QueueFull(
                f"model {self.name}: queue full ({self.policy.max_queue_size} requests waiting)"
            )
        max_rows = self.policy.max_queue_rows
        if max_rows is not None and self._rows_queued + rows > max_rows:
            self._observer.dropped("queue_full")
            raise QueueFull(
                f"model {self.name}: queue full ({self._rows_queued} rows waiting, "
                f"{rows} more would exceed max_queue_rows {max_rows})"
            )
        now = loop.time()
        max_wait = self.policy.max_queue_wait_s
        if max_wait is not None and (wait := self._wait(rows, now, high=True)) > max_wait:
            self._observer.dropped("queue_full")
            raise QueueFull(
                f"model {self.name}: queue full (expected wait {wait * 1000:.0f} ms exceeds "
                f"max_queue_wait_ms {max_wait * 1000:g})"
            )
        if deadline is not None:
            if now >= deadline:
                self._observer.dropped("deadline")
                raise DeadlineExceeded(f"model {self.name}: deadline passed before queueing")
            if (wait := self._wait(rows, now, high=False)) > deadline - now:
                self._observer.dropped("deadline")
                raise DeadlineExceeded(
                    f"model {self.name}: deadline in {(deadline - now) * 1000:.0f} ms, "
                    f"the queue ahead is expected to take {wait * 1000:.0f} ms"
                )
        if self._task is None:
            self.start()
        return now

    def _push(
        self,
        job: J,
        rows: int,
        deadline: float | None,
        now: float,
        loop: asyncio.AbstractEventLoop,
    ) -> asyncio.Future[R]:
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append(_Pending(job, rows, future, deadline, now))
        self._rows_queued += rows
        self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        return future

    def _run_direct(self, job: J, rows: int, loop: asyncio.AbstractEventLoop) -> tuple[R] | None:
        """The idle fast path: run ``job`` now, synchronously, as a batch of one
        (``None`` when ``run_now`` declines it: it goes through the queue)."""
        assert self._run_now is not None
        started = loop.time()
        try:
            results = self._run_now([job])
        except ScoringError:
            raise
        except Exception as error:
            logger.exception("batch failed", extra={"model": self.name, "requests": 1})
            raise InferenceFailed(f"model {self.name}: inference failed: {error}") from error
        if results is None:
            return None
        if len(results) != 1:
            raise InferenceFailed(f"model {self.name}: {len(results)} results for 1 request")
        observer = self._observer
        observer.queue_waited(0.0)
        seconds = loop.time() - started
        observer.batch_ran(rows, 1, seconds)
        self._batch_times.add(seconds, rows)
        self._recent_requests_per_batch = 0.8 * self._recent_requests_per_batch + 0.2
        result = results[0]
        if isinstance(result, ScoringError):
            raise result
        return (result,)

    async def close(self) -> None:
        """Refuse new work, let queued requests run, then stop the flush task."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _flush_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._busy = True
            try:
                await self._gather()
                batch = self._take_batch()
                if batch:
                    await self._run(batch)
            finally:
                self._busy = False

    async def _gather(self) -> None:
        """Let requests that are runnable now join, without any timer.

        grpc.aio accepts calls one after another, a few loop turns apart, so the
        gatherer keeps yielding while arrivals keep coming and stops after
        ``gather_patience`` turns without one (or when the batch is full).
        """
        policy = self.policy
        idle_turns = 0
        for _ in range(policy.max_gather_turns):
            if self._rows_queued >= policy.max_batch_size:
                return
            before = len(self._queue)
            await asyncio.sleep(0)
            if len(self._queue) == before:
                idle_turns += 1
                if idle_turns >= policy.gather_patience:
                    break
            else:
                idle_turns = 0
        delay = self.policy.max_queue_delay_s
        if delay > 0 and self._recent_requests_per_batch > 1.5 and not self._closing:
            loop = asyncio.get_running_loop()
            until = loop.time() + delay
            while self._rows_queued < self.policy.max_batch_size:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _pop(self) -> _Pending[J, R]:
        pending = self._queue.popleft()
        self._rows_queued -= pending.rows
        return pending

    def _take_batch(self) -> list[_Pending[J, R]]:
        """Pop whole requests up to max_batch_size rows, dropping dead ones."""
        now = self._running_loop().time()
        batch: list[_Pending[J, R]] = []
        rows = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # caller went away: its deadline, or a cancel
                self._pop()
                expired = pending.deadline is not None and now >= pending.deadline
                self._observer.dropped("deadline" if expired else "cancelled")
                continue
            if pending.deadline is not None and now >= pending.deadline:
                self._pop()
                pending.future.set_exception(
                    DeadlineExceeded(f"model {self.name}: deadline passed while queued")
                )
                self._observer.dropped("deadline")
                continue
            size = pending.rows
            if batch and rows + size > self.policy.max_batch_size:
                break
            self._pop()
            batch.append(pending)
            rows += size
        self._observer.queue_depth(len(self._queue))
        return batch

    async def _run(self, batch: list[_Pending[J, R]]) -> None:
        loop = self._running_loop()
        started = self._running_since = loop.time()
        self._running_rows = sum(p.rows for p in batch)
        for pending in batch:
            self._observer.queue_waited(started - pending.enqueued_at)
        try:
            results = await self._run_batch([p.job for p in batch])
            if len(results) != len(batch):
                raise InferenceFailed(
                    f"model {self.name}: {len(results)} results for {len(batch)} requests"
                )
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ShuttingDown(f"model {self.name} stopped"))
            raise
        except ScoringError as error:
            self._fail(batch, error)
            return
        except Exception as error:  # the runtime failed: answer every caller, keep serving
            logger.exception("batch failed", extra={"model": self.name, "requests": len(batch)})
            self._fail(batch, InferenceFailed(f"model {self.name}: inference failed: {error}"))
            return
        finally:
            self._running_since = None
        rows = self._running_rows
        seconds = loop.time() - started
        self._observer.batch_ran(rows, len(batch), seconds)
        self._batch_times.add(seconds, rows)
        self._recent_requests_per_batch = 0.8 * self._recent_requests_per_batch + 0.2 * len(batch)
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, ScoringError):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _fail(self, batch: list[_Pending[J, R]], error: ScoringError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)


def split_rows(
    outputs: Mapping[str, npt.NDArray[np.generic]], sizes: Sequence[int]
) -> list[Outputs]:
    """Split batch outputs (first dim = sum of ``sizes``) into one slice per job."""
    check_rows_out(outputs, sum(sizes))
    parts: list[Outputs] = []
    offset = 0
    for size in sizes:
        parts.append({name: value[offset : offset + size] for name, value in outputs.items()})
        offset += size
    return parts


def check_rows_out(outputs: Mapping[str, npt.NDArray[np.generic]], total: int) -> None:
    """Every output has one row per input row (``total``), else ``InferenceFailed``."""
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise InferenceFailed(
                f"output {name!r} has shape {value.shape}, not one row per input row ({total})"
            )
