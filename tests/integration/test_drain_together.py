"""Scoring and admin servers drain together: one grace period for both, not two in a row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc

from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
GRACE_S = 2.0


async def _silent(stop: asyncio.Event) -> AsyncIterator[Any]:
    """A request stream that sends nothing until told: the call stays in flight."""
    await stop.wait()
    return
    yield  # pragma: no cover


async def test_scoring_and_admin_servers_stop_within_one_grace(linear_repository: Path) -> None:
    overrides = ["server.admin_port=0", f"server.grace_period_s={GRACE_S}"]
    async with running_server(linear_repository, overrides) as srv:
        app = srv.app
        assert app.admin_port not in (0, app.port)
        stop = asyncio.Event()
        admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}")
        try:
            # One call in flight on each server; neither ends before the grace runs out.
            stream = pb_grpc.ScoringStub(srv.channel).ScoreStream(_silent(stop))
            reflect = reflection_pb2_grpc.ServerReflectionStub(admin_channel)
            info = reflect.ServerReflectionInfo(_silent(stop))
            await stream.wait_for_connection()
            await info.wait_for_connection()
            started = time.monotonic()
            await app.close()
            elapsed = time.monotonic() - started
            assert await stream.code() is not grpc.StatusCode.OK
            assert await info.code() is not grpc.StatusCode.OK
        finally:
            stop.set()
            await admin_channel.close(None)
    # Sequential stops take two grace periods; together they take one.
    assert elapsed < 1.5 * GRACE_S, elapsed
    assert elapsed >= 0.9 * GRACE_S, elapsed  # the calls really were given their grace
