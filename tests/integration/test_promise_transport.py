"""``server.connections.http2_transport: promise``: `streamscore serve` restarts itself in
place with gRPC core's ph2_server experiment, and a call refused past the pending-call
limit then answers RESOURCE_EXHAUSTED (chttp2's refusal is CANCELLED:
tests/integration/test_overload.py)."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.services import wait_for_port
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.conftest import TEST_FEATURES, free_port
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _serve(repository: Path, port: int, *overrides: str) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "server.cli", "serve"]
    for item in (
        f"server.port={port}",
        "server.metrics_port=0",
        f"models.repository={repository}",
        "traffic_log.sample_rate=0",
        "features.definitions_path=null",  # the test model's features are all sent
        "models.defaults.execution=inline",  # a batch blocks the loop: calls pend in core
        "models.defaults.max_batch_size=1",
        *overrides,
    ):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, 60.0, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def _serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the server never reported SERVING")


async def _flood(port: int, calls: int) -> collections.Counter[str]:
    await _serving(port)
    request = pb.ScoreRequest(model="slow", features={f: 0.5 for f in TEST_FEATURES})
    outcomes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        stub = pb_grpc.ScoringStub(channel)

        async def one() -> None:
            try:
                await stub.Score(request, timeout=60)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[f"{error.code().name}: {error.details()}"] += 1

        await asyncio.gather(*(one() for _ in range(calls)))
    return outcomes


async def test_promise_transport_refuses_past_the_pending_limit_with_resource_exhausted(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "slow", "1", TEST_FEATURES, slow_layers=300)
    port = free_port()
    with _serve(
        repository,
        port,
        "server.connections.http2_transport=promise",
        "server.connections.pending_calls_soft_limit=0",
        "server.connections.pending_calls_hard_limit=2",
    ) as process:
        # restarted in place: the same process now runs with the experiment enabled
        assert "ph2_server" in _environ_of(process.pid).get("GRPC_EXPERIMENTS", "").split(",")
        outcomes = await _flood(port, 60)
    refused = outcomes.pop("RESOURCE_EXHAUSTED: Too many pending requests for this server", 0)
    assert refused >= 1, outcomes
    assert set(outcomes) <= {"OK"}, outcomes  # nothing CANCELLED or otherwise failed
    assert outcomes["OK"] >= 1


async def test_the_default_transport_is_not_restarted(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "slow", "1", TEST_FEATURES)
    port = free_port()
    with _serve(repository, port) as process:
        assert "GRPC_EXPERIMENTS" not in _environ_of(process.pid)
        assert await _flood(port, 4) == {"OK": 4}
