"""Closed-loop and open-loop request drivers, and what they record.

Times are ``time.perf_counter_ns()``. Only requests *started* (closed loop) or
*scheduled* (open loop) inside ``[measure_from, end)`` are recorded; requests are
never started at or after ``end``; in-flight requests then get ``drain_s`` to finish
before they are cancelled and counted as unfinished.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bench.callers import Caller
from bench.payloads import PoolItem
from server.clients.histogram import LatencyHistogram

_clock = time.perf_counter_ns
_YIELD_EVERY = 32


class Recorder:
    """Counters and histograms of one run (measurement window only)."""

    def __init__(self, open_loop: bool) -> None:
        self.latency = LatencyHistogram()
        self.service_latency = LatencyHistogram() if open_loop else self.latency
        self.send_lag: LatencyHistogram | None = LatencyHistogram() if open_loop else None
        self.sent = 0
        self.ok = 0
        self.window_ok = 0
        self.errors: Counter[str] = Counter()
        self.late = 0
        self.skipped = 0
        self.in_flight = 0


@dataclass(frozen=True)
class Window:
    """Measurement window on the ``perf_counter_ns`` clock."""

    start: int
    measure_from: int
    end: int
    drain_s: float

    @classmethod
    def starting_now(cls, warmup_s: float, duration_s: float, drain_s: float) -> Window:
        """A window whose warmup starts now."""
        start = _clock()
        measure_from = start + int(warmup_s * 1e9)
        return cls(start, measure_from, measure_from + int(duration_s * 1e9), drain_s)


async def _drain(tasks: set[asyncio.Task[None]], drain_s: float) -> None:
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _closed_worker(
    caller: Caller, items: Iterator[PoolItem], rec: Recorder, window: Window
) -> None:
    while True:
        started = _clock()
        if started >= window.end:
            return
        measured = started >= window.measure_from
        if measured:
            rec.sent += 1
            rec.in_flight += 1
        status = await caller.call(next(items))
        done = _clock()
        if status is None and window.measure_from <= done < window.end:
            rec.window_ok += 1
        if not measured:
            continue
        rec.in_flight -= 1
        if status is None:
            rec.ok += 1
            rec.latency.record_ns(done - started)
        else:
            rec.errors[status] += 1


async def closed_loop(
    callers: Sequence[Caller], items: Iterator[PoolItem], rec: Recorder, window: Window
) -> None:
    """One worker per entry of ``callers`` (repeat a caller to share it): each sends its
    next request as soon as the previous one is answered, until ``window.end``."""
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(_closed_worker(c, items, rec, window)) for c in callers}
    await _drain(tasks, max(0.0, (window.end - _clock()) / 1e9) + window.drain_s)


async def open_loop(
    callers: Sequence[Caller],
    items: Iterator[PoolItem],
    rec: Recorder,
    window: Window,
    *,
    rate: float,
    max_outstanding: int,
    late_threshold_ms: float,
) -> None:
    """Requests on a fixed schedule (``rate``/s from ``window.start``), round-robin over
    ``callers``. Latency counts from each request's intended send time; when
    ``max_outstanding`` requests are in flight the schedule waits, and what is still
    unsent at ``window.end`` is counted as skipped."""
    assert rec.send_lag is not None
    send_lag = rec.send_lag
    loop = asyncio.get_running_loop()
    interval_ns = 1e9 / rate
    late_ns = int(late_threshold_ms * 1e6)
    slot_free = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    outstanding = 0

    async def one(caller: Caller, item: PoolItem, intended: int, measured: bool) -> None:
        nonlocal outstanding
        sent_at = _clock()
        try:
            status = await caller.call(item)
        finally:
            outstanding -= 1
            slot_free.set()
        done = _clock()
        if status is None and window.measure_from <= done < window.end:
            rec.window_ok += 1
        if not measured:
            return
        rec.in_flight -= 1
        lag = sent_at - intended
        send_lag.record_ns(lag)
        if lag > late_ns:
            rec.late += 1
        if status is None:
            rec.ok += 1
            rec.latency.record_ns(done - intended)
            rec.service_latency.record_ns(done - sent_at)
        else:
            rec.errors[status] += 1

    def intended_at(index: int) -> int:
        return window.start + int(index * interval_ns)

    index = 0
    while (intended := intended_at(index)) < window.end:
        now = _clock()
        if intended > now:
            await asyncio.sleep((intended - now) / 1e9)
        elif index % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # behind schedule: still let responses be processed
        while outstanding >= max_outstanding and _clock() < window.end:
            slot_free.clear()
            remaining = (window.end - _clock()) / 1e9
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    await slot_free.wait()
            except TimeoutError:
                break
        if outstanding >= max_outstanding:
            break  # still full at the end of the window: the rest is skipped
        measured = intended >= window.measure_from
        if measured:
            rec.sent += 1
            rec.in_flight += 1
        outstanding += 1
        caller = callers[index % len(callers)]
        task = loop.create_task(one(caller, next(items), intended, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    total = math.ceil((window.end - window.start) / interval_ns) + 1
    rec.skipped += sum(
        1 for i in range(index, total) if window.measure_from <= intended_at(i) < window.end
    )
    await _drain(tasks, window.drain_s)
