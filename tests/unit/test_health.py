"""Health Watch streams see every change, including one made while an answer is sent."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from server.health import NOT_SERVING, SERVING, HealthService

REQUEST = health_pb2.HealthCheckRequest(service="")


async def test_a_change_while_the_last_answer_is_sent_is_not_lost() -> None:
    health = HealthService()
    await health.set("", SERVING)
    watch: Any = health.Watch(REQUEST, None)  # type: ignore[arg-type]
    assert (await anext(watch)).status == SERVING
    # the stream is suspended at its yield (the transport is sending SERVING)
    await health.set("", NOT_SERVING)
    assert (await asyncio.wait_for(anext(watch), 1)).status == NOT_SERVING
    await health.set("", SERVING)
    assert (await asyncio.wait_for(anext(watch), 1)).status == SERVING
    await watch.aclose()


async def test_draining_sends_not_serving_then_ends_the_stream() -> None:
    health = HealthService()
    await health.set("", SERVING)
    watch: Any = health.Watch(REQUEST, None)  # type: ignore[arg-type]
    assert (await anext(watch)).status == SERVING
    await health.enter_graceful_shutdown()  # while SERVING is still being sent
    assert (await asyncio.wait_for(anext(watch), 1)).status == NOT_SERVING
    assert [r async for r in watch] == []
