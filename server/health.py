"""gRPC health checking (``grpc.health.v1``) that lets the server drain.

Like grpc's reference servicer, with one difference that matters at shutdown:
``enter_graceful_shutdown`` sends NOT_SERVING to every open ``Watch`` stream and
then *ends* those streams, so an idle watcher (Kubernetes, client-side health
checking) never holds ``server.stop(grace)`` for the whole grace period.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Per-service serving status with Check and Watch."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {}
        self._changed = asyncio.Condition()
        self._draining = False

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        last: Status | None = None

        def current() -> Status:
            return self._status.get(service, SERVICE_UNKNOWN)

        while True:
            status = current()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._draining and current() == last:
                return  # the last answer was NOT_SERVING; end the stream cleanly
            async with self._changed:
                # re-read: a change made while the last answer was being sent counts
                await self._changed.wait_for(functools.partial(self._moved, service, last))

    def _moved(self, service: str, last: Status | None) -> bool:
        """Whether a Watch that last sent ``last`` has something new to send or end."""
        return self._status.get(service, SERVICE_UNKNOWN) != last or self._draining

    async def set(self, service: str, status: Status) -> None:
        """Set a service's status (ignored once draining)."""
        if self._draining:
            return
        await self._publish(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING for good; open Watch streams get it and end."""
        if self._draining:
            return
        self._draining = True
        for service in list(self._status):
            await self._publish(service, NOT_SERVING)
        async with self._changed:
            self._changed.notify_all()

    async def _publish(self, service: str, status: Status) -> None:
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()
