"""Every process busy: with ``server.processes: 2`` and ONE client channel, a short
``max_connection_age`` makes the client reconnect, SO_REUSEPORT spreads the new
connections, and each process answers a fair share (counted on its own metrics port)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from bench.process_spread import age_settings, scrape_requests, spread_server
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.conftest import TEST_FEATURES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
REQUEST = pb.ScoreRequest(model="lin", features={f: 0.5 for f in TEST_FEATURES})
RECONNECTS = 120  # connection lifetimes observed: each lands on a random process
MIN_CALLS = 3000


async def _count_reconnects(channel: grpc.aio.Channel, seen: list[int]) -> None:
    state = channel.get_state()
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state()
        if state is grpc.ChannelConnectivity.READY:
            seen[0] += 1


async def _drive(target: str) -> int:
    """Closed loop, 32 callers on one channel, until enough calls and reconnects."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        seen = [0]
        watcher = asyncio.create_task(_count_reconnects(channel, seen))
        answered = [0]

        async def caller() -> None:
            while answered[0] < MIN_CALLS or seen[0] < RECONNECTS:
                await stub.Score(REQUEST, timeout=30, wait_for_ready=True)
                answered[0] += 1

        await asyncio.gather(*(caller() for _ in range(32)))
        watcher.cancel()
        return answered[0]


def test_one_channel_keeps_both_processes_busy(linear_repository: Path) -> None:
    settings = age_settings(0.05)  # grace 10 s: a slow call is never cut
    with spread_server(linear_repository, 2, settings=settings) as (_, port, metrics):
        answered = asyncio.run(_drive(f"127.0.0.1:{port}"))
        counts = [scrape_requests(metrics + index) for index in range(2)]
    assert sum(counts) == answered
    # Fair would be 50/50; 60 or more connection lifetimes make < 30% very unlikely.
    assert min(counts) >= 0.3 * sum(counts), counts
