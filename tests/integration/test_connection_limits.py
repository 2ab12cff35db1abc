"""Every ``server.connections`` bound reaches the gRPC server: streams per connection,
connection age (GOAWAY, then the client reconnects), idle timeout, ping policy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.settings import load_settings
from server.transport import server_options
from tests.conftest import TEST_FEATURES
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
Code = grpc.StatusCode
State = grpc.ChannelConnectivity
REQUEST = pb.ScoreRequest(model="lin", features={f: 0.5 for f in TEST_FEATURES})


def _channel(port: int, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    own = [("grpc.use_local_subchannel_pool", 1), *(options or [])]
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own)


async def _wait_leaves(channel: grpc.aio.Channel, state: State) -> State:
    """Wait until ``channel`` leaves ``state``; the state it moved to."""
    while (current := channel.get_state()) is state:
        await channel.wait_for_state_change(current)
    return current


def _watch(channel: grpc.aio.Channel) -> Any:
    """A Health.Watch call: a stream that stays open until cancelled."""
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())


def test_every_bound_becomes_a_server_channel_argument() -> None:
    settings = load_settings(
        None,
        {},
        [
            "server.connections.max_concurrent_streams=7",
            "server.connections.keepalive_time_s=30",
            "server.connections.keepalive_timeout_s=5",
            "server.connections.keepalive_min_ping_interval_s=2.5",
            "server.connections.keepalive_permit_without_calls=false",
            "server.connections.max_connection_idle_s=60",
            "server.connections.max_connection_age_s=12",
            "server.connections.max_connection_age_grace_s=3",
            "server.connections.pending_calls_soft_limit=16",
            "server.connections.pending_calls_hard_limit=64",
        ],
    )
    options = dict(server_options(settings.server))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2_500
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_connection_idle_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 12_000
    assert options["grpc.max_connection_age_grace_ms"] == 3_000
    assert options["grpc.server.max_pending_requests"] == 16
    assert options["grpc.server.max_pending_requests_hard_limit"] == 64
    never = load_settings(
        None,
        {},
        [
            "server.connections.max_connection_age_s=null",
            "server.connections.max_connection_idle_s=null",
        ],
    )
    unbounded = dict(server_options(never.server))
    assert "grpc.max_connection_age_ms" not in unbounded
    assert "grpc.max_connection_idle_ms" not in unbounded


async def test_calls_past_max_concurrent_streams_wait_for_a_free_stream(
    linear_repository: Path,
) -> None:
    overrides = ["server.connections.max_concurrent_streams=2"]
    async with (
        running_server(linear_repository, overrides) as srv,
        _channel(srv.app.port) as channel,
    ):
        watches = [_watch(channel) for _ in range(2)]
        for watch in watches:  # both streams open and answered: the connection is full
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.ScoringStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as queued:
            await stub.Score(REQUEST, timeout=1.0)  # never gets a stream while both stay
        assert queued.value.code() is Code.DEADLINE_EXCEEDED
        watches[0].cancel()  # one stream ends: the next call gets its slot
        reply = await stub.Score(REQUEST, timeout=30)
        assert reply.model == "lin"
        watches[1].cancel()


async def test_connection_gets_goaway_at_max_age_and_the_client_reconnects(
    linear_repository: Path,
) -> None:
    overrides = [
        "server.connections.max_connection_age_s=0.3",
        "server.connections.max_connection_age_grace_s=0.3",
    ]
    async with (
        running_server(linear_repository, overrides) as srv,
        _channel(srv.app.port) as channel,
    ):
        stub = pb_grpc.ScoringStub(channel)
        await stub.Score(REQUEST, timeout=30)
        assert channel.get_state() is State.READY
        assert await _wait_leaves(channel, State.READY) is State.IDLE  # GOAWAY
        await stub.Score(REQUEST, timeout=30)  # a new connection, transparently
        assert channel.get_state() is State.READY


async def test_idle_connection_is_closed(linear_repository: Path) -> None:
    overrides = [
        "server.connections.max_connection_idle_s=0.3",
        "server.connections.max_connection_age_s=null",
    ]
    async with (
        running_server(linear_repository, overrides) as srv,
        _channel(srv.app.port) as channel,
    ):
        await pb_grpc.ScoringStub(channel).Score(REQUEST, timeout=30)
        assert await _wait_leaves(channel, State.READY) is State.IDLE


async def test_a_client_pinging_too_often_is_disconnected(linear_repository: Path) -> None:
    overrides = [
        "server.connections.keepalive_min_ping_interval_s=60",
        "server.connections.max_connection_age_s=null",
        "server.connections.max_connection_idle_s=null",
    ]
    pushy = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with (
        running_server(linear_repository, overrides) as srv,
        _channel(srv.app.port, pushy) as channel,
    ):
        await pb_grpc.ScoringStub(channel).Score(REQUEST, timeout=30)
        # GOAWAY ENHANCE_YOUR_CALM "too_many_pings" after the allowed strikes.
        assert await _wait_leaves(channel, State.READY) is not State.READY
    await asyncio.sleep(0)
