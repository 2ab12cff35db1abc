"""Chaos: SIGKILL one of two server processes under load. The parent restarts it (counted
in every process's metrics), the other keeps answering, and callers see no error beyond
the calls sent to the killed process before it was gone (all UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest

from bench.process_spread import age_settings, scrape_requests, spread_server
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.conftest import TEST_FEATURES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
REQUEST = pb.ScoreRequest(model="lin", features=dict.fromkeys(TEST_FEATURES, 0.5))
CALLERS = 16
SERVED_AFTER = 200  # calls each process answers after the restart before we stop


def _children(parent: int) -> list[int]:
    text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    return [int(pid) for pid in text.split()]


def _scrape(port: int, name: str) -> dict[str, float]:
    """``{process_index: value}`` of one supervisor counter, from one process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            index = line.split('process_index="', 1)[1].split('"', 1)[0]
            found[index] = float(line.rsplit(" ", 1)[1])
    return found


def _try_requests(port: int) -> int | None:
    try:
        return scrape_requests(port)
    except OSError:
        return None


async def _until(check: object, limit_s: float = 120.0) -> None:
    async with asyncio.timeout(limit_s):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110 (polling a process)
            await asyncio.sleep(0.05)


async def _chaos(
    parent: int, port: int, metrics: int
) -> tuple[Counter[str], list[int], list[float], float]:
    stop = asyncio.Event()
    outcomes: Counter[str] = Counter()
    failed = [0] * CALLERS
    failed_started: list[float] = []  # when each failed call was sent (monotonic)
    gone_at = float("inf")  # when the killed process had been reaped: no socket of it left
    # Own subchannel pool per channel: one connection each (else they share one).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CALLERS)
    ]

    async def caller(index: int, channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.ScoringStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                await stub.Score(REQUEST, timeout=30, wait_for_ready=True)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1
                failed[index] += 1
                failed_started.append(started)

    callers = [asyncio.create_task(caller(i, c)) for i, c in enumerate(channels)]
    try:
        # Both processes answer before the kill.
        await _until(lambda: all((_try_requests(metrics + i) or 0) >= 50 for i in range(2)))
        before = _children(parent)
        assert len(before) == 2, before
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        ok_at_kill = outcomes["OK"]

        # polled every millisecond: a late notice would excuse calls sent after the reap
        async with asyncio.timeout(30.0):
            while victim in _children(parent):  # noqa: ASYNC110 (polling a process)
                await asyncio.sleep(0.001)
        gone_at = time.monotonic()

        def restarted() -> bool:
            live = [p for p in _children(parent) if p != victim]
            return len(live) == 2

        await _until(restarted)
        # Which slot crashed: every live process reports the parent's counters.
        counts: dict[str, float] = {}

        def counted() -> bool:
            nonlocal counts
            for i in range(2):
                try:
                    counts = _scrape(metrics + i, "streamscore_server_process_restarts_total")
                except OSError:
                    continue
                if sum(counts.values()) >= 1:
                    return True
            return False

        await _until(counted)
        slot = next(int(i) for i, v in counts.items() if v >= 1)
        crashes = _scrape(metrics + (1 - slot), "streamscore_server_process_crashes_total")
        assert crashes == {str(slot): 1.0, str(1 - slot): 0.0}, crashes
        assert counts == {str(slot): 1.0, str(1 - slot): 0.0}, counts
        # The restarted process answers (its own fresh counter), the other kept answering.
        survivor_base = scrape_requests(metrics + 1 - slot)
        await _until(lambda: (_try_requests(metrics + slot) or 0) >= SERVED_AFTER)
        await _until(lambda: scrape_requests(metrics + 1 - slot) >= survivor_base + SERVED_AFTER)
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
    outcomes["OK_AFTER_KILL"] = outcomes["OK"] - ok_at_kill
    return outcomes, failed, failed_started, gone_at


def test_killed_server_process_is_restarted_and_callers_barely_notice(
    linear_repository: Path,
) -> None:
    # Short connection lifetimes re-spread the callers over both processes after the restart.
    settings = (*age_settings(0.5, grace_s=10.0), "server.restarts.backoff_initial_s=0.2")
    with spread_server(linear_repository, 2, settings=settings) as (server, port, metrics):
        outcomes, failed, failed_started, gone_at = asyncio.run(_chaos(server.pid, port, metrics))
        assert server.poll() is None  # the parent is still supervising
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0  # SIGTERM still drains every child cleanly
    errors = {code: n for code, n in outcomes.items() if not code.startswith("OK")}
    print("outcomes", dict(outcomes), "failures per caller", failed)
    # Only calls sent to the killed process may fail, each UNAVAILABLE: the call each
    # caller had outstanding, and at most a retry that reconnected before the kernel had
    # closed the dying process's listening socket (SO_REUSEPORT can hand it a new
    # connection until then). No call sent after the process was reaped may fail.
    assert set(errors) <= {"UNAVAILABLE"}, outcomes
    assert [t for t in failed_started if t > gone_at] == [], (gone_at, failed_started, failed)
    assert max(failed) <= 2, failed  # the outstanding call, and at most one such retry
    assert outcomes["OK_AFTER_KILL"] >= 2 * SERVED_AFTER, outcomes
