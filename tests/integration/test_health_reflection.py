"""grpc.health.v1 status through the server's life, and server reflection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.inference import grpc_service_pb2 as v2
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SCORING = "streamscore.v1.Scoring"
INFERENCE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"


async def _status(channel: grpc.aio.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def test_serving_once_models_are_loaded(linear_repository: Path) -> None:
    async with running_server(linear_repository) as srv:
        for service in ("", SCORING, INFERENCE):
            assert await _status(srv.channel, service) == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _status(srv.channel, "no.such.Service")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await srv.inference.ServerReady(v2.ServerReadyRequest())).ready is True


async def test_empty_repository_is_not_serving(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    async with running_server(empty) as srv:
        assert srv.app.ready is False
        for service in ("", SCORING, INFERENCE):
            assert await _status(srv.channel, service) == NOT_SERVING, service
        assert (await srv.inference.ServerLive(v2.ServerLiveRequest())).live is True
        assert (await srv.inference.ServerReady(v2.ServerReadyRequest())).ready is False
        ready = await srv.inference.ModelReady(v2.ModelReadyRequest(name="lin"))
        assert ready.ready is False


@pytest.mark.parametrize("service", ["", SCORING])
async def test_not_serving_as_soon_as_close_begins(linear_repository: Path, service: str) -> None:
    async with running_server(linear_repository) as srv:
        stub = health_pb2_grpc.HealthStub(srv.channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == SERVING
        closing = asyncio.create_task(srv.app.close())
        try:
            second = await asyncio.wait_for(watch.read(), 5)
            assert second.status == NOT_SERVING
            assert srv.app.ready is False
        finally:
            watch.cancel()  # an open Watch is an in-flight call: it would hold the drain
            await asyncio.wait_for(closing, 10)


async def test_open_health_watch_does_not_hold_the_drain(linear_repository: Path) -> None:
    grace = 2.0
    async with running_server(linear_repository, [f"server.grace_period_s={grace}"]) as srv:
        stub = health_pb2_grpc.HealthStub(srv.channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
        loop = asyncio.get_running_loop()
        started = loop.time()
        await srv.app.close()
        elapsed = loop.time() - started
        watch.cancel()
    assert elapsed < grace / 2, f"close() took {elapsed:.1f}s with nothing but a Watch open"


async def _reflect(
    channel: grpc.aio.Channel, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter(requests), timeout=5)
    return [response async for response in call]


def _files(response: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for blob in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        files[proto.name] = proto
    return files


async def test_reflection_lists_and_resolves_services(linear_repository: Path) -> None:
    async with running_server(linear_repository) as srv:
        listed, scoring, inference = await _reflect(
            srv.channel,
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SCORING),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE),
            ],
        )
    names = {s.name for s in listed.list_services_response.service}
    assert {SCORING, INFERENCE, HEALTH} <= names

    for response, package, service, methods in (
        (scoring, "streamscore.v1", "Scoring", {"Score", "ScoreStream"}),
        (inference, "inference", "GRPCInferenceService", {"ModelInfer", "ModelConfig"}),
    ):
        assert not response.HasField("error_response"), response.error_response
        files = _files(response)
        owner = [
            f
            for f in files.values()
            if f.package == package and any(s.name == service for s in f.service)
        ]
        assert len(owner) == 1, sorted(files)
        (proto,) = [s for s in owner[0].service if s.name == service]
        assert methods <= {m.name for m in proto.method}
        # every import of the file is served with it, so a client can build the descriptors
        assert set(owner[0].dependency) <= set(files), (owner[0].dependency, sorted(files))
