"""Every ``server.connections`` bound reaches the gRPC server: streams per connection,
connection age (GOAWAY, then the client reconnects), idle timeout, ping policy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.settings import SettingsError, load_settings
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


async def _finished(call: Any) -> None:
    """Let this loop (the server's) run until a synchronous client's future is done."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    call.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
    await done.wait()


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
            "server.connections.max_pending_calls=5",
            "server.connections.max_pending_calls_hard=9",
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
    assert options["grpc.server.max_pending_requests"] == 5
    assert options["grpc.server.max_pending_requests_hard_limit"] == 9
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


def test_pending_call_bounds_must_be_ordered() -> None:
    with pytest.raises(SettingsError, match="max_pending_calls_hard must be >= max_pending_calls"):
        load_settings(
            None,
            {},
            [
                "server.connections.max_pending_calls=10",
                "server.connections.max_pending_calls_hard=5",
            ],
        )


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "grpc-defaults"])
async def test_calls_the_busy_loop_has_not_taken_are_refused_in_core(
    linear_repository: Path, bounded: bool
) -> None:
    """With the event loop blocked, no handler takes a call; past the pending bound gRPC
    core refuses the rest (CANCELLED) at once, with no Python run. Unbounded (gRPC's
    1000 / 3000), every call waits for the loop and then succeeds."""
    overrides = (
        ["server.connections.max_pending_calls=2", "server.connections.max_pending_calls_hard=4"]
        if bounded
        else []
    )
    async with running_server(linear_repository, overrides) as srv:
        await srv.scoring.Score(REQUEST, timeout=30)  # warm: model loaded, port serving
        # a synchronous client: its own threads send and receive while this loop is blocked
        with grpc.insecure_channel(f"127.0.0.1:{srv.app.port}") as channel:
            score = pb_grpc.ScoringStub(channel).Score
            first = score.future(REQUEST, timeout=30)  # connected before the flood
            await _finished(first)
            assert first.code() is Code.OK
            calls = [score.future(REQUEST, timeout=30) for _ in range(40)]
            # block the server's loop (this loop) on purpose: no handler takes a call
            time.sleep(2.0)  # noqa: ASYNC251
            refused_while_blocked = [c for c in calls if c.done()]
            if bounded:
                assert len(refused_while_blocked) >= 30
                assert {c.code() for c in refused_while_blocked} == {Code.CANCELLED}
            else:
                assert refused_while_blocked == []
            outcomes = []
            for call in calls:
                await _finished(call)  # the loop runs again: taken calls are answered
                outcomes.append(call.code())
            assert outcomes.count(Code.OK) == 40 - len(refused_while_blocked)


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
