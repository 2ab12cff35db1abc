"""Graceful shutdown of the real ``streamscore serve`` process on SIGTERM.

The server runs as a subprocess (``python -m server.cli serve``) with a slow model
executed on its worker thread and ``max_batch_size=1``, so concurrent calls are
genuinely in flight, one batch-time apart, when the signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.conftest import TEST_FEATURES, free_port
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 10.0
IN_FLIGHT = 20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerProcess:
    """A ``streamscore serve`` subprocess and a channel to it."""

    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    channel: grpc.aio.Channel
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _write_config(tmp_path: Path, repository: Path, metrics_port: int) -> Path:
    config = {
        "server": {"metrics_port": metrics_port, "grace_period_s": GRACE_S},
        "models": {
            "repository": str(repository),
            "per_model": {
                "slow": {"execution": "thread", "max_batch_size": 1, "max_queue_size": 64}
            },
        },
        "logging": {"json": True},
    }
    path = tmp_path / "streamscore.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _wait_serving(server: ServerProcess, limit_s: float = 20.0) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while True:
        assert server.process.returncode is None, (
            f"server exited with {server.process.returncode}:\n{server.log_text()}"
        )
        assert loop.time() < give_up, f"server never became SERVING:\n{server.log_text()}"
        with contextlib.suppress(grpc.aio.AioRpcError):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            if response.status == SERVING:
                return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serve_subprocess(
    tmp_path: Path, overrides: Sequence[str]
) -> AsyncIterator[ServerProcess]:
    """Start ``streamscore serve`` on free ports with a slow model; kill it if still running."""
    repository = tmp_path / "models"
    write_linear_model(repository, "slow", "1", TEST_FEATURES, slow_layers=60, slow_width=1024)
    port, metrics_port = free_port(), free_port()
    config = _write_config(tmp_path, repository, metrics_port)
    log = tmp_path / "server.log"
    sets = [item for override in overrides for item in ("--set", override)]
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--config",
            str(config),
            "--set",
            f"server.port={port}",
            *sets,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    server = ServerProcess(process, port, metrics_port, channel, log)
    try:
        await _wait_serving(server)
        yield server
    finally:
        await channel.close(None)
        if process.returncode is None:
            process.kill()
            await process.wait()


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples carrying ``labels`` (whatever their other labels)."""
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


async def _wait_all_received(server: ServerProcess, count: int, limit_s: float = 10.0) -> None:
    """Poll /metrics until all ``count`` Score calls reached the server and some still run."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while True:
        samples = await asyncio.to_thread(_scrape, server.metrics_port)
        running = _total(samples, "streamscore_in_flight_requests", api="score")
        finished = _total(samples, "streamscore_requests_total", api="score", code="OK")
        if running + finished == count:
            assert running > 0, "every call finished before the signal could be sent"
            return
        assert loop.time() < give_up, f"{running} in flight + {finished} done != {count}"
        await asyncio.sleep(0.01)


def _request(i: int) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model="slow", request_id=f"r-{i}", features={f: float(i) / 10 for f in TEST_FEATURES}
    )


async def _score(stub: pb_grpc.ScoringAsyncStub, i: int) -> pb.ScoreResponse:
    return await stub.Score(_request(i), timeout=30)


async def _refused(target: str, channel: grpc.aio.Channel | None = None) -> grpc.StatusCode:
    own = channel is None
    channel = channel or grpc.aio.insecure_channel(target)
    try:
        await pb_grpc.ScoringStub(channel).Score(_request(999), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        if own:
            await channel.close(None)
    return grpc.StatusCode.OK


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    async with serve_subprocess(tmp_path, []) as server:
        stub = pb_grpc.ScoringStub(server.channel)
        health = health_pb2_grpc.HealthStub(server.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="streamscore.v1.Scoring"))
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

        calls = [asyncio.create_task(_score(stub, i)) for i in range(IN_FLIGHT)]
        await _wait_all_received(server, IN_FLIGHT)
        signalled = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)

        try:
            flipped = await asyncio.wait_for(watch.read(), 5)
            assert flipped.status == NOT_SERVING
        finally:
            watch.cancel()

        # the drain has begun: new calls are refused, on the same or on a new connection
        assert await _refused(server.target, server.channel) == grpc.StatusCode.UNAVAILABLE
        assert await _refused(server.target) == grpc.StatusCode.UNAVAILABLE

        answers = await asyncio.gather(*calls, return_exceptions=True)
        failures = [a for a in answers if isinstance(a, BaseException)]
        assert not failures, failures
        assert sorted(a.request_id for a in answers if isinstance(a, pb.ScoreResponse)) == sorted(
            f"r-{i}" for i in range(IN_FLIGHT)
        )
        code = await asyncio.wait_for(server.process.wait(), GRACE_S + 5)
        elapsed = time.monotonic() - signalled
    assert code == 0, server.log_text()
    assert elapsed < GRACE_S, f"took {elapsed:.1f}s to exit: the drain waited for the grace period"


async def test_serve_starts_and_stops_with_default_info_logging(tmp_path: Path) -> None:
    async with serve_subprocess(tmp_path, ["logging.level=INFO"]) as server:
        os.kill(server.process.pid, signal.SIGTERM)
        code = await asyncio.wait_for(server.process.wait(), GRACE_S + 5)
    assert code == 0, server.log_text()
