"""MicroBatcher's pure logic, driven with a fake ``run_batch`` on a plain event loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.batcher import BatchPolicy, MicroBatcher, Outputs, RunJobs, split_rows
from server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    QueueFull,
    ScoringError,
    ShuttingDown,
)

pytestmark = pytest.mark.timeout(30)

WIDTH = 3
Rows = npt.NDArray[np.float32]


def make_rows(request: int, count: int) -> Rows:
    """``count`` rows that identify their request and position: value = request*100 + row."""
    base = np.arange(count, dtype=np.float32).reshape(count, 1) + request * 100
    rows = np.repeat(base, WIDTH, axis=1) + np.arange(WIDTH, dtype=np.float32) / 10
    return rows.astype(np.float32)


def expected_outputs(rows: Rows) -> dict[str, npt.NDArray[Any]]:
    return {
        "double": rows * 2,
        "total": rows.sum(axis=1),
        "first": rows[:, :1].astype(np.int64),
    }


@dataclass
class FakeRun:
    """A ``run_batch`` that records its batches and can be held, slowed or made to fail."""

    gate: asyncio.Event | None = None
    turns: int = 0
    sleep_s: float = 0.0
    fail_with: Exception | None = None
    batches: list[Rows] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, rows: Rows) -> Mapping[str, npt.NDArray[np.generic]]:
        self.batches.append(rows.copy())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(self.turns):
            await asyncio.sleep(0)
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return expected_outputs(rows)

    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@dataclass
class Recorder:
    """A ``BatchObserver`` that keeps what it is told."""

    dropped_reasons: list[str] = field(default_factory=list)
    ran: list[tuple[int, int]] = field(default_factory=list)

    def batch_ran(self, rows: int, requests: int, seconds: float) -> None:
        self.ran.append((rows, requests))

    def queue_waited(self, seconds: float) -> None:
        pass

    def dropped(self, reason: str) -> None:
        self.dropped_reasons.append(reason)

    def queue_depth(self, requests: int) -> None:
        pass


def assert_own_rows(result: Mapping[str, npt.NDArray[Any]], rows: Rows) -> None:
    expected = expected_outputs(rows)
    assert sorted(result) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(result[name], value, err_msg=name)


async def turns_until(condition: Any, limit: int = 50) -> int:
    """Yield to the loop until ``condition()``; return how many turns it took."""
    for turn in range(limit):
        if condition():
            return turn
        await asyncio.sleep(0)
    raise AssertionError(f"condition not met within {limit} loop turns")


def rows_runner(
    run_rows: Callable[[npt.NDArray[np.float32]], Awaitable[Mapping[str, npt.NDArray[np.generic]]]],
) -> RunJobs[npt.NDArray[np.float32], Outputs]:
    """A ``run_batch`` for jobs that are ready [k, F] row blocks: concatenate, run,
    split (what ``server.executor.VersionBatchRunner`` does, minus feature assembly)."""

    async def run(jobs: list[npt.NDArray[np.float32]]) -> list[Outputs | ScoringError]:
        inputs = jobs[0] if len(jobs) == 1 else np.concatenate(jobs, axis=0)
        outputs = await run_rows(inputs)
        return list(split_rows(outputs, [job.shape[0] for job in jobs]))

    return run


class RowBatcher:
    """A MicroBatcher whose jobs are row blocks (``rows_runner``), submitted by rows."""

    def __init__(self, batcher: MicroBatcher[np.ndarray, Outputs]) -> None:
        self.inner = batcher

    async def submit(self, rows: np.ndarray, *, deadline: float | None = None) -> Outputs:
        count = int(rows.shape[0]) if rows.ndim == 2 else 0
        return await self.inner.submit(rows, rows=count, deadline=deadline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def batcher_with(run: FakeRun, recorder: Recorder | None = None, **policy: Any) -> RowBatcher:
    batcher: MicroBatcher[np.ndarray, Outputs] = MicroBatcher(
        "m/1", rows_runner(run), BatchPolicy(**policy), recorder
    )
    batcher.start()
    return RowBatcher(batcher)


async def test_lone_submit_runs_without_waiting() -> None:
    run = FakeRun()
    batcher = batcher_with(run, max_queue_delay_s=5.0)  # a fill window never delays a lone call
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(batcher.submit(make_rows(1, 1)))
    turns = await turns_until(lambda: run.batches)
    # a handful of empty loop turns (microseconds) of gathering, never a timer
    assert turns <= 16, f"run_batch called only after {turns} loop turns"
    assert_own_rows(await task, make_rows(1, 1))
    assert loop.time() - started < 1.0
    await batcher.close()


async def test_same_turn_submits_form_one_batch() -> None:
    run = FakeRun()
    batcher = batcher_with(run, max_batch_size=16)
    sizes = [1, 2, 1, 3, 1]
    tasks = [asyncio.create_task(batcher.submit(make_rows(i, n))) for i, n in enumerate(sizes)]
    results = await asyncio.gather(*tasks)
    assert run.sizes() == [sum(sizes)]
    for i, (n, result) in enumerate(zip(sizes, results, strict=True)):
        assert_own_rows(result, make_rows(i, n))
    await batcher.close()


async def test_arrivals_on_the_next_loop_turns_join_the_gathering_batch() -> None:
    """grpc.aio hands calls to handlers a loop turn or so apart; they still batch together."""
    run = FakeRun()
    batcher = batcher_with(run, max_batch_size=16)

    async def caller(i: int) -> None:
        for _ in range(i):
            await asyncio.sleep(0)
        assert_own_rows(await batcher.submit(make_rows(i, 1)), make_rows(i, 1))

    await asyncio.gather(*(caller(i) for i in range(4)))
    assert run.sizes() == [4]
    await batcher.close()


async def test_arrivals_during_a_batch_form_the_next_batches() -> None:
    run = FakeRun(gate=asyncio.Event())
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=4)
    first = asyncio.create_task(batcher.submit(make_rows(0, 1)))
    await run.started.wait()
    sizes = [1, 1, 2, 3, 2, 1, 3]
    tasks = [asyncio.create_task(batcher.submit(make_rows(i + 1, n))) for i, n in enumerate(sizes)]
    await turns_until(lambda: batcher.depth == len(sizes))
    assert run.sizes() == [1]  # nothing else ran while the first batch held the runtime
    run.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(first, *tasks)
    # FIFO, whole requests only, up to 4 rows: [1] then [1,1,2] [3] [2,1] [3]
    assert run.sizes() == [1, 4, 3, 3, 3]
    assert [r for r, _ in recorder.ran] == run.sizes()
    assert [n for _, n in recorder.ran] == [1, 3, 1, 2, 1]
    assert_own_rows(results[0], make_rows(0, 1))
    for i, (n, result) in enumerate(zip(sizes, results[1:], strict=True)):
        assert_own_rows(result, make_rows(i + 1, n))
    await batcher.close()


async def _random_scenario(
    max_batch: int, sizes: list[int], delays: list[int], run_turns: int
) -> None:
    run = FakeRun(turns=run_turns)
    batcher = batcher_with(run, max_batch_size=max_batch)

    async def caller(i: int) -> None:
        for _ in range(delays[i]):
            await asyncio.sleep(0)
        rows = make_rows(i, sizes[i])
        assert_own_rows(await batcher.submit(rows), rows)

    await asyncio.gather(*(caller(i) for i in range(len(sizes))))
    await batcher.close()
    assert all(len(b) <= max_batch for b in run.batches)
    computed = np.concatenate(run.batches)
    submitted = np.concatenate([make_rows(i, n) for i, n in enumerate(sizes)])
    # every row computed exactly once
    np.testing.assert_array_equal(
        computed[np.lexsort(computed.T[::-1])], submitted[np.lexsort(submitted.T[::-1])]
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    max_batch=st.integers(min_value=1, max_value=8),
    run_turns=st.integers(min_value=0, max_value=3),
)
def test_each_caller_gets_exactly_its_rows(
    data: st.DataObject, max_batch: int, run_turns: int
) -> None:
    count = data.draw(st.integers(min_value=1, max_value=40), label="requests")
    sizes = data.draw(
        st.lists(st.integers(1, max_batch), min_size=count, max_size=count), label="sizes"
    )
    delays = data.draw(st.lists(st.integers(0, 6), min_size=count, max_size=count), label="delays")
    asyncio.run(_random_scenario(max_batch, sizes, delays, run_turns))


@pytest.mark.parametrize("seed", range(5))
async def test_each_caller_gets_exactly_its_rows_seeded(seed: int) -> None:
    rng = random.Random(seed)
    max_batch = rng.randint(1, 16)
    count = 200
    sizes = [rng.randint(1, max_batch) for _ in range(count)]
    delays = [rng.randint(0, 10) for _ in range(count)]
    await _random_scenario(max_batch, sizes, delays, rng.randint(0, 3))


async def test_queue_full_raises_at_once() -> None:
    run = FakeRun(gate=asyncio.Event())
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=1, max_queue_size=2)
    running = asyncio.create_task(batcher.submit(make_rows(0, 1)))
    await run.started.wait()
    queued = [asyncio.create_task(batcher.submit(make_rows(i, 1))) for i in (1, 2)]
    await turns_until(lambda: batcher.depth == 2)
    refused = batcher.submit(make_rows(3, 1))
    with pytest.raises(QueueFull, match="queue full"):
        refused.send(None)  # raises before ever suspending: no waiting for room
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    for i, task in enumerate([running, *queued]):
        assert_own_rows(await task, make_rows(i, 1))
    assert_own_rows(await batcher.submit(make_rows(4, 1)), make_rows(4, 1))  # room again
    await batcher.close()


async def test_queue_is_bounded_in_rows_as_well_as_requests() -> None:
    run = FakeRun(gate=asyncio.Event())
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=4, max_queue_size=100, max_queue_rows=6)
    running = asyncio.create_task(batcher.submit(make_rows(0, 1)))
    await run.started.wait()
    queued = [asyncio.create_task(batcher.submit(make_rows(i, 3))) for i in (1, 2)]
    await turns_until(lambda: batcher.depth == 2)  # 2 requests, 6 rows: rows are the bound
    refused = batcher.submit(make_rows(3, 1))
    with pytest.raises(QueueFull, match=r"6 rows waiting.*max_queue_rows 6"):
        refused.send(None)
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(0, 1))
    for i, task in zip((1, 2), queued, strict=True):
        assert_own_rows(await task, make_rows(i, 3))
    await batcher.close()


async def test_queue_is_bounded_by_expected_wait() -> None:
    """``max_queue_wait_s``: a job is refused at once when the batches ahead of it (the
    running one counted) x the measured batch time exceed the budget, long before
    ``max_queue_size``; before a batch after the first ran there is no estimate and no
    refusal."""
    budget = 0.175
    run = FakeRun(sleep_s=0.05)
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=1, max_queue_size=100, max_queue_wait_s=budget
    )
    assert batcher.expected_wait_s == 0.0
    assert_own_rows(await batcher.submit(make_rows(0, 1)), make_rows(0, 1))  # not counted
    assert_own_rows(await batcher.submit(make_rows(0, 1)), make_rows(0, 1))  # ~50 ms measured
    run.sleep_s, run.gate = 0.0, asyncio.Event()
    run.started.clear()
    running = asyncio.create_task(batcher.submit(make_rows(1, 1)))
    await run.started.wait()
    per_batch = batcher.expected_wait_s  # one batch ahead: the running one
    assert per_batch >= 0.05
    # the job finding k queued has k + 1 batches ahead: 3 fit when a batch is 50-58 ms
    fits = sum(1 for k in range(100) if (k + 1) * per_batch <= budget)
    queued = []
    for i in range(fits):
        queued.append(asyncio.create_task(batcher.submit(make_rows(2 + i, 1))))
        await turns_until(lambda n=i + 1: batcher.depth == n)
    assert batcher.expected_wait_s > budget
    refused = batcher.submit(make_rows(99, 1))
    with pytest.raises(QueueFull, match=r"expected wait \d+ ms exceeds max_queue_wait_ms 175"):
        refused.send(None)  # raises before ever suspending
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()
    assert_own_rows(await running, make_rows(1, 1))
    for i, task in enumerate(queued):
        assert_own_rows(await task, make_rows(2 + i, 1))
    assert_own_rows(await batcher.submit(make_rows(50, 1)), make_rows(50, 1))  # idle: admitted
    await batcher.close()


async def hold_a_batch(batcher: RowBatcher, run: FakeRun) -> asyncio.Task[Outputs]:
    """Submit one job and return once its batch runs, held until ``run.gate`` is set:
    ``expected_wait_s`` is then exactly the batch-time estimate (one batch ahead)."""
    run.gate = asyncio.Event()
    run.started.clear()
    running = asyncio.create_task(batcher.submit(make_rows(1, 1)))
    await run.started.wait()
    return running


async def test_a_cold_first_batch_does_not_set_the_wait_estimate() -> None:
    """The first batch after start (or reload: a new batcher) carries one-time costs:
    it is not counted, so a slow one refuses nothing after it (set as the average it
    refused every call for ~10 batches); the next batches set the estimate."""
    budget = 0.05
    run = FakeRun(sleep_s=0.2)  # the cold first batch: 4x the budget
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=1, max_queue_size=100, max_queue_wait_s=budget
    )
    assert_own_rows(await batcher.submit(make_rows(0, 1)), make_rows(0, 1))
    run.sleep_s = 0.0
    running = await hold_a_batch(batcher, run)
    assert batcher.expected_wait_s == 0.0  # no estimate yet
    queued = [asyncio.create_task(batcher.submit(make_rows(2 + i, 1))) for i in range(3)]
    await turns_until(lambda: batcher.depth == 3)  # admitted, none refused
    assert recorder.dropped_reasons == []
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(1, 1))
    for i, task in enumerate(queued):
        assert_own_rows(await task, make_rows(2 + i, 1))
    running = await hold_a_batch(batcher, run)
    assert 0.0 < batcher.expected_wait_s < budget  # measured on the warm batches
    run.gate.set()  # type: ignore[union-attr]
    await running
    await batcher.close()


async def test_deadline_sooner_than_the_expected_wait_is_refused_at_once() -> None:
    run = FakeRun(sleep_s=0.05)
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=1, max_queue_size=100)
    await batcher.submit(make_rows(0, 1))  # the first batch is not counted
    await batcher.submit(make_rows(0, 1))  # the batch time is measured: ~50 ms
    run.sleep_s, run.gate = 0.0, asyncio.Event()
    run.started.clear()
    running = asyncio.create_task(batcher.submit(make_rows(1, 1)))
    await run.started.wait()
    queued = asyncio.create_task(batcher.submit(make_rows(2, 1)))
    await turns_until(lambda: batcher.depth == 1)
    wait = batcher.expected_wait_s  # two batches ahead of the next caller
    loop = asyncio.get_running_loop()
    late = batcher.submit(make_rows(3, 1), deadline=loop.time() + wait / 2)
    with pytest.raises(DeadlineExceeded, match=r"deadline in \d+ ms, the queue ahead"):
        late.send(None)  # raises before ever suspending: it never waits to miss it
    assert recorder.dropped_reasons == ["deadline"]
    in_time = asyncio.create_task(batcher.submit(make_rows(4, 1), deadline=loop.time() + 60))
    await turns_until(lambda: batcher.depth == 2)  # a far deadline is queued as before
    run.gate.set()
    for i, task in ((1, running), (2, queued), (4, in_time)):
        assert_own_rows(await task, make_rows(i, 1))
    await batcher.close()


def test_queue_wait_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queue_wait_s"):
        BatchPolicy(max_queue_wait_s=0.0)


def test_queue_rows_below_a_batch_are_refused() -> None:
    with pytest.raises(ValueError, match="max_queue_rows"):
        BatchPolicy(max_batch_size=8, max_queue_rows=4)


async def test_bad_shapes_are_refused() -> None:
    batcher = batcher_with(FakeRun(), max_batch_size=4)
    for rows in (np.zeros((0, WIDTH), np.float32), np.zeros(WIDTH, np.float32)):
        with pytest.raises(InvalidInput, match="at least one row"):
            await batcher.submit(rows)
    with pytest.raises(InvalidInput, match="5 rows exceed max_batch_size 4"):
        await batcher.submit(make_rows(0, 5))
    await batcher.close()


async def test_deadline_passed_at_submit_never_runs() -> None:
    run = FakeRun()
    recorder = Recorder()
    batcher = batcher_with(run, recorder)
    deadline = asyncio.get_running_loop().time() - 0.001
    refused = batcher.submit(make_rows(0, 1), deadline=deadline)
    with pytest.raises(DeadlineExceeded):
        refused.send(None)
    later = make_rows(1, 1)  # positive signal: a later request was run and answered
    assert_own_rows(await batcher.submit(later), later)
    assert run.batches[:-1] == []  # the refused one never ran before it,
    np.testing.assert_array_equal(run.batches[-1], later)  # nor with it
    assert recorder.dropped_reasons == ["deadline"]
    await batcher.close()


async def test_deadline_passing_in_the_queue_is_dropped_not_run() -> None:
    run = FakeRun(gate=asyncio.Event())
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=8)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(batcher.submit(make_rows(0, 1)))
    await run.started.wait()
    expiring = asyncio.create_task(batcher.submit(make_rows(1, 1), deadline=loop.time() + 0.01))
    patient = asyncio.create_task(batcher.submit(make_rows(2, 2), deadline=loop.time() + 60))
    await turns_until(lambda: batcher.depth == 2)
    await asyncio.sleep(0.02)  # let the first deadline pass while it waits
    run.gate.set()  # type: ignore[union-attr]
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await expiring
    assert_own_rows(await patient, make_rows(2, 2))
    await first
    assert run.sizes() == [1, 2]
    np.testing.assert_array_equal(run.batches[1], make_rows(2, 2))
    assert recorder.dropped_reasons == ["deadline"]
    await batcher.close()


async def test_cancelled_caller_is_skipped() -> None:
    run = FakeRun(gate=asyncio.Event())
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=8)
    first = asyncio.create_task(batcher.submit(make_rows(0, 1)))
    await run.started.wait()
    tasks = [asyncio.create_task(batcher.submit(make_rows(i, 1))) for i in (1, 2, 3)]
    await turns_until(lambda: batcher.depth == 3)
    tasks[1].cancel()
    run.gate.set()  # type: ignore[union-attr]
    await first
    assert_own_rows(await tasks[0], make_rows(1, 1))
    assert_own_rows(await tasks[2], make_rows(3, 1))
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    np.testing.assert_array_equal(
        run.batches[1], np.concatenate([make_rows(1, 1), make_rows(3, 1)])
    )
    assert recorder.dropped_reasons == ["cancelled"]
    await batcher.close()


async def test_caller_cancelled_mid_batch_does_not_strand_the_others() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        run = FakeRun(gate=asyncio.Event())
        batcher = batcher_with(run, max_batch_size=8)
        tasks = [asyncio.create_task(batcher.submit(make_rows(i, 2))) for i in range(3)]
        await run.started.wait()
        assert run.sizes() == [6]
        tasks[0].cancel()
        await asyncio.sleep(0)
        run.gate.set()  # type: ignore[union-attr]
        done = await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), 5)
        assert_own_rows(done[0], make_rows(1, 2))
        assert_own_rows(done[1], make_rows(2, 2))
        assert tasks[0].cancelled()
        again = await asyncio.wait_for(batcher.submit(make_rows(9, 1)), 5)
        assert_own_rows(again, make_rows(9, 1))
        await batcher.close()
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_failing_batch_fails_its_callers_and_the_batcher_goes_on() -> None:
    run = FakeRun(fail_with=RuntimeError("boom"))
    batcher = batcher_with(run, max_batch_size=8)
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(batcher.submit(make_rows(i, 1)) for i in range(3)), return_exceptions=True
        ),
        5,
    )
    assert run.sizes() == [3]
    for outcome in outcomes:
        assert isinstance(outcome, InferenceFailed)
        assert "boom" in str(outcome)
    assert_own_rows(await batcher.submit(make_rows(5, 2)), make_rows(5, 2))

    run.fail_with = InvalidInput("rows", "model says no")  # a ScoringError passes through
    outcomes = await asyncio.gather(
        *(batcher.submit(make_rows(i, 1)) for i in range(2)), return_exceptions=True
    )
    assert all(isinstance(o, InvalidInput) and "model says no" in str(o) for o in outcomes)
    assert_own_rows(await batcher.submit(make_rows(6, 1)), make_rows(6, 1))
    await batcher.close()


async def test_close_drains_queued_work_then_refuses() -> None:
    run = FakeRun(gate=asyncio.Event())
    batcher = batcher_with(run, max_batch_size=1)
    tasks = [asyncio.create_task(batcher.submit(make_rows(i, 1))) for i in range(3)]
    await run.started.wait()
    await turns_until(lambda: batcher.depth == 2)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    refused = batcher.submit(make_rows(9, 1))
    with pytest.raises(ShuttingDown):
        refused.send(None)
    assert not closing.done()
    run.gate.set()  # type: ignore[union-attr]
    for i, task in enumerate(tasks):
        assert_own_rows(await task, make_rows(i, 1))
    await asyncio.wait_for(closing, 5)
    assert run.sizes() == [1, 1, 1]
    with pytest.raises(ShuttingDown):
        await batcher.submit(make_rows(10, 1))


async def test_close_of_an_idle_batcher_returns() -> None:
    batcher = batcher_with(FakeRun())
    await asyncio.wait_for(batcher.close(), 1)
    await asyncio.wait_for(batcher.close(), 1)  # idempotent


async def _warm_with_full_batches(batcher: RowBatcher, size: int, times: int) -> None:
    for _ in range(times):
        await asyncio.gather(*(batcher.submit(make_rows(i, 1)) for i in range(size)))


async def test_fill_window_only_after_multi_request_batches() -> None:
    delay = 0.2
    run = FakeRun()
    batcher = batcher_with(run, max_batch_size=4, max_queue_delay_s=delay)
    loop = asyncio.get_running_loop()

    async def lone() -> float:
        started = loop.time()
        assert_own_rows(await batcher.submit(make_rows(7, 1)), make_rows(7, 1))
        return loop.time() - started

    for _ in range(3):  # single-request traffic: never waits for the window
        assert await lone() < delay / 2
    await _warm_with_full_batches(batcher, 4, 2)
    waited = [await lone() for _ in range(8)]
    assert waited[0] >= delay * 0.8, waited  # busy recently: a lone request waits to fill
    assert waited[-1] < delay / 2, waited  # after lone batches the window switches off again
    await batcher.close()


async def test_fill_window_gathers_late_arrivals_and_ends_when_full() -> None:
    delay = 5.0
    run = FakeRun()
    batcher = batcher_with(run, max_batch_size=4, max_queue_delay_s=delay)
    loop = asyncio.get_running_loop()
    await _warm_with_full_batches(batcher, 4, 2)
    batches_before = len(run.batches)
    started = loop.time()
    # Gathering takes at most max_gather_turns loop turns: after more than that, the
    # flush loop has provably left it and sits in the fill window (or ran the batch).
    past_gathering = batcher.policy.max_gather_turns + 2
    first = asyncio.create_task(batcher.submit(make_rows(1, 1)))
    for _ in range(past_gathering):
        await asyncio.sleep(0)
    assert len(run.batches) == batches_before  # waiting for company
    late = asyncio.create_task(batcher.submit(make_rows(2, 2)))
    for _ in range(past_gathering):
        await asyncio.sleep(0)
    assert len(run.batches) == batches_before  # 3 of 4 rows: still waiting
    last = asyncio.create_task(batcher.submit(make_rows(3, 1)))
    results = await asyncio.wait_for(asyncio.gather(first, late, last), 2)
    assert loop.time() - started < delay / 2  # full batch: the window ended early
    assert run.sizes()[batches_before:] == [4]
    for (i, n), result in zip([(1, 1), (2, 2), (3, 1)], results, strict=True):
        assert_own_rows(result, make_rows(i, n))
    await batcher.close()


@dataclass
class FakeRunNow:
    """A ``run_now`` computing like ``FakeRun`` synchronously; ``decline`` makes it refuse."""

    decline: bool = False
    batches: list[Rows] = field(default_factory=list)

    def __call__(self, jobs: list[Rows]) -> list[Outputs | ScoringError] | None:
        if self.decline:
            return None
        inputs = jobs[0] if len(jobs) == 1 else np.concatenate(jobs, axis=0)
        self.batches.append(inputs.copy())
        return list(split_rows(expected_outputs(inputs), [job.shape[0] for job in jobs]))


def fast_batcher(
    run: FakeRun, now: FakeRunNow, recorder: Recorder | None = None, **policy: Any
) -> RowBatcher:
    policy.setdefault("lone_probe_interval_s", 3600.0)
    batcher: MicroBatcher[np.ndarray, Outputs] = MicroBatcher(
        "m/1", rows_runner(run), BatchPolicy(**policy), recorder, run_now=now
    )
    batcher.start()
    return RowBatcher(batcher)


def answer_without_suspending(call: Any) -> Any:
    """Drive a ``submit`` coroutine one step: it must finish without yielding to the loop."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value
    call.close()
    raise AssertionError("submit suspended: the idle fast path was not taken")


async def test_idle_fast_path_answers_a_lone_request_without_a_loop_turn() -> None:
    run, now, recorder = FakeRun(), FakeRunNow(), Recorder()
    batcher = fast_batcher(run, now, recorder)
    first = make_rows(0, 1)  # the first request probes: it gathers through the queue
    assert_own_rows(await batcher.submit(first), first)
    assert len(run.batches) == 1 and now.batches == []
    for i in range(1, 4):
        rows = make_rows(i, 2)
        assert_own_rows(answer_without_suspending(batcher.submit(rows)), rows)
    assert [len(b) for b in now.batches] == [2, 2, 2]
    assert len(run.batches) == 1
    assert recorder.ran == [(1, 1), (2, 1), (2, 1), (2, 1)]
    await batcher.close()


async def test_submit_now_gives_the_fast_path_result_itself_else_the_queued_future() -> None:
    run, now = FakeRun(gate=asyncio.Event()), FakeRunNow()
    batcher = fast_batcher(run, now)
    probe = batcher.inner.submit_now(make_rows(0, 1), rows=1)  # the probe queues
    assert isinstance(probe, asyncio.Future)
    await run.started.wait()  # its batch runs (held)
    queued = batcher.inner.submit_now(make_rows(1, 1), rows=1)  # busy: queued, a future
    assert isinstance(queued, asyncio.Future) and not queued.done()
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await probe, make_rows(0, 1))
    assert_own_rows(await queued, make_rows(1, 1))
    await turns_until(lambda: not batcher.inner._busy)
    lone = batcher.inner.submit_now(make_rows(2, 2), rows=2)  # idle: answered in the call
    assert not isinstance(lone, asyncio.Future)
    assert_own_rows(lone, make_rows(2, 2))
    assert [len(b) for b in now.batches] == [2] and run.sizes() == [1, 1]
    await batcher.close()


async def test_idle_fast_path_still_refuses_a_passed_deadline() -> None:
    run, now, recorder = FakeRun(), FakeRunNow(), Recorder()
    batcher = fast_batcher(run, now, recorder)
    await batcher.submit(make_rows(0, 1))  # the probe
    deadline = asyncio.get_running_loop().time() - 0.001
    with pytest.raises(DeadlineExceeded):
        batcher.submit(make_rows(1, 1), deadline=deadline).send(None)
    assert now.batches == [] and recorder.dropped_reasons == ["deadline"]
    await batcher.close()


async def test_fast_path_is_not_taken_while_a_batch_runs_and_the_queue_bound_holds() -> None:
    run, now, recorder = FakeRun(gate=asyncio.Event()), FakeRunNow(), Recorder()
    batcher = fast_batcher(run, now, recorder, max_batch_size=1, max_queue_size=1)
    running = asyncio.create_task(batcher.submit(make_rows(0, 1)))  # probe, held
    await run.started.wait()
    queued = asyncio.create_task(batcher.submit(make_rows(1, 1)))  # busy: queues, no fast path
    await turns_until(lambda: batcher.depth == 1)
    with pytest.raises(QueueFull):
        batcher.submit(make_rows(2, 1)).send(None)
    assert now.batches == []
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(0, 1))
    assert_own_rows(await queued, make_rows(1, 1))
    assert recorder.dropped_reasons == ["queue_full"]
    await batcher.close()


async def test_concurrent_arrivals_leave_the_fast_path_and_batch_again() -> None:
    run, now = FakeRun(), FakeRunNow()
    batcher = fast_batcher(run, now, max_batch_size=16, lone_probe_interval_s=0.05)
    await batcher.submit(make_rows(0, 1))  # the probe: the next one is due in 50 ms
    answer_without_suspending(batcher.submit(make_rows(1, 1)))  # lone: fast path
    await asyncio.sleep(0.06)  # (at least) the probe interval has passed
    tasks = [asyncio.create_task(batcher.submit(make_rows(i, 1))) for i in range(2, 7)]
    for i, task in zip(range(2, 7), tasks, strict=True):
        assert_own_rows(await task, make_rows(i, 1))
    assert run.sizes()[-1] == 5  # the probe gathered: the concurrent callers formed one batch
    tasks = [asyncio.create_task(batcher.submit(make_rows(i, 1))) for i in range(7, 10)]
    await asyncio.gather(*tasks)
    assert run.sizes()[-1] == 3  # after a multi-request batch, no fast path: they gather
    fast_before = len(now.batches)
    for i in range(10, 30):  # lone again: once the average falls, the fast path resumes
        call = batcher.submit(make_rows(i, 1))
        try:
            call.send(None)
        except StopIteration:
            break
        call.close()  # it queued: the flush task runs it as a batch of one; try the next
        await turns_until(lambda: batcher.depth == 0)
        await turns_until(lambda: not batcher.inner._busy)
    assert len(now.batches) == fast_before + 1
    await batcher.close()


async def test_declined_fast_path_goes_through_the_queue() -> None:
    run, now = FakeRun(), FakeRunNow(decline=True)
    batcher = fast_batcher(run, now)
    for i in range(3):
        assert_own_rows(await batcher.submit(make_rows(i, 1)), make_rows(i, 1))
    assert run.sizes() == [1, 1, 1]
    await batcher.close()


async def _held_batch(run: FakeRun, batcher: RowBatcher, request: int) -> asyncio.Task[Outputs]:
    """A batch that runs until ``run.gate`` is set (nothing else queued)."""
    run.sleep_s, run.gate = 0.0, asyncio.Event()
    run.started.clear()
    running = asyncio.create_task(batcher.submit(make_rows(request, 1)))
    await run.started.wait()
    return running


async def test_wait_budget_counts_rows_so_the_next_batch_fills() -> None:
    """With a batch running and a budget of ~1.5 batch times, the jobs that fit into the
    next batch wait only for the running one and are admitted (a full next batch: the
    runtime never idles at overload); the first that would start a batch after it is
    refused. Counting the running batch whole plus a partial batch as one more refused
    every job behind the running batch (a next batch of one)."""
    run = FakeRun(sleep_s=0.15)
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=4, max_queue_size=100, max_queue_wait_s=0.25
    )
    await batcher.submit(make_rows(0, 1))  # the cold first batch: not counted
    await batcher.submit(make_rows(0, 1))  # one batch measured: 150 ms (+ scheduling)
    running = await _held_batch(run, batcher, 1)
    queued = [asyncio.create_task(batcher.submit(make_rows(2 + i, 1))) for i in range(4)]
    await turns_until(lambda: batcher.depth == 4)
    assert recorder.dropped_reasons == []
    refused = batcher.submit(make_rows(9, 1))
    with pytest.raises(QueueFull, match="max_queue_wait_ms 250"):
        refused.send(None)
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(1, 1))
    for i, task in enumerate(queued):
        assert_own_rows(await task, make_rows(2 + i, 1))
    assert recorder.ran[-1] == (4, 4)  # the four admitted ran as one full batch
    await batcher.close()


async def test_wait_budget_counts_what_the_running_batch_has_left() -> None:
    """The running batch counts for its remaining time: a job refused at its start
    (the running batch plus one queued ahead exceed the budget) is admitted once the
    running batch has run a batch time (only the queued one is ahead then)."""
    run = FakeRun(sleep_s=0.1)
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=1, max_queue_size=100, max_queue_wait_s=0.19
    )
    await batcher.submit(make_rows(0, 1))  # the cold first batch: not counted
    await batcher.submit(make_rows(0, 1))  # one batch measured: 100 ms (+ scheduling)
    running = await _held_batch(run, batcher, 1)
    batch_s = batcher.expected_wait_s  # the whole running batch is ahead
    assert 0.1 <= batch_s < 0.19
    queued = asyncio.create_task(batcher.submit(make_rows(2, 1)))
    await turns_until(lambda: batcher.depth == 1)
    early = batcher.submit(make_rows(3, 1))
    with pytest.raises(QueueFull, match=r"expected wait \d+ ms exceeds max_queue_wait_ms 190"):
        early.send(None)  # ~2 batch times ahead: the running one and the queued one
    await asyncio.sleep(batch_s + 0.01)  # the running batch has had its batch time
    assert batcher.expected_wait_s == pytest.approx(batch_s, abs=1e-3)  # the queued one left
    late = asyncio.create_task(batcher.submit(make_rows(4, 1)))
    await turns_until(lambda: batcher.depth == 2)
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    for i, task in ((1, running), (2, queued), (4, late)):
        assert_own_rows(await task, make_rows(i, 1))
    await batcher.close()


async def test_wait_budget_uses_a_high_quantile_of_batch_time() -> None:
    """Two slow batches in ten set the batch time the budget uses: with a batch just
    started, the wait is ~150 ms (their mean, ~50 ms, or the median, ~10 ms, would admit
    a queue that the slow batches then overrun)."""
    run = FakeRun(sleep_s=0.01)
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=1, max_queue_size=100, max_queue_wait_s=0.1
    )
    for i in range(10):
        run.sleep_s = 0.15 if i in (3, 7) else 0.01
        await batcher.submit(make_rows(i, 1))
    running = await _held_batch(run, batcher, 10)
    refused = batcher.submit(make_rows(11, 1))  # the running batch may take 150 ms
    with pytest.raises(QueueFull, match="max_queue_wait_ms 100"):
        refused.send(None)
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(10, 1))
    await batcher.close()


async def test_deadline_check_expects_the_median_batch_time() -> None:
    """The deadline refusal is for calls that will surely miss: it expects the median
    batch time, so two slow batches in ten do not refuse a deadline the typical batch
    meets."""
    run = FakeRun(sleep_s=0.01)
    recorder = Recorder()
    batcher = batcher_with(run, recorder, max_batch_size=1, max_queue_size=100)
    for i in range(10):
        run.sleep_s = 0.15 if i in (3, 7) else 0.01
        await batcher.submit(make_rows(i, 1))
    running = await _held_batch(run, batcher, 10)
    loop = asyncio.get_running_loop()
    in_time = asyncio.create_task(batcher.submit(make_rows(12, 1), deadline=loop.time() + 0.1))
    await turns_until(lambda: batcher.depth == 1)
    assert recorder.dropped_reasons == []
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(10, 1))
    assert_own_rows(await in_time, make_rows(12, 1))
    await batcher.close()


async def test_batches_ahead_are_timed_by_recent_full_batches() -> None:
    """A model whose time grows with rows runs small, fast batches at light load; when
    load jumps, the full batches ahead of a new job are timed by the full batches seen
    before (here 100 ms), not by the small ones (10 ms) that fill the recent window."""
    run = FakeRun(sleep_s=0.1)
    recorder = Recorder()
    batcher = batcher_with(
        run, recorder, max_batch_size=4, max_queue_size=100, max_queue_wait_s=0.05
    )
    await batcher.submit(make_rows(0, 4))  # the cold first batch: not counted
    await batcher.submit(make_rows(0, 4))  # one full batch: ~100 ms
    run.sleep_s = 0.01
    for i in range(1, 11):  # ten small ones: ~10 ms
        await batcher.submit(make_rows(i, 1))
    running = await _held_batch(run, batcher, 11)  # a small batch runs
    queued = asyncio.create_task(batcher.submit(make_rows(12, 4)))  # the next, full
    await turns_until(lambda: batcher.depth == 1)
    late = batcher.submit(make_rows(13, 1))  # behind a full batch: ~100 ms, not ~10
    with pytest.raises(QueueFull, match="max_queue_wait_ms 50"):
        late.send(None)
    assert recorder.dropped_reasons == ["queue_full"]
    run.gate.set()  # type: ignore[union-attr]
    assert_own_rows(await running, make_rows(11, 1))
    assert_own_rows(await queued, make_rows(12, 4))
    await batcher.close()


async def test_lone_means_idle_after_batches_of_one_request() -> None:
    gate = asyncio.Event()
    run = FakeRun(gate=gate)
    batcher = batcher_with(run)
    assert batcher.lone  # nothing seen yet: counts as a lone caller
    first = asyncio.ensure_future(batcher.submit(make_rows(0, 1)))
    await turns_until(run.started.is_set)
    assert not batcher.lone  # a batch is running
    queued = [asyncio.ensure_future(batcher.submit(make_rows(i, 1))) for i in range(1, 9)]
    await asyncio.sleep(0)
    assert not batcher.lone
    gate.set()
    await asyncio.gather(first, *queued)
    assert not batcher.lone  # idle, but the last batch held 8 requests: not a lone caller
    for i in range(12):
        await batcher.submit(make_rows(i, 1))
    assert batcher.lone  # batches of one again
    assert not batcher.closing
    await batcher.close()
    assert batcher.closing
