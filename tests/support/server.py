"""Run a real streamscore server in-process on a free port, and always stop it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.app import AppContext
from server.settings import Settings, load_settings

#: The ``server.overrides`` token every test server accepts (``RunningServer.overrides``).
TEST_OVERRIDE_TOKEN = "test-override-token"


def settings_for_test(repository: Path, *overrides: str) -> Settings:
    """Settings for a test server: free ports, the given repository, plain logs,
    ``TEST_OVERRIDE_TOKEN`` holding ``features.allow_overrides``, and no decision
    records (the product default records every decision to Kafka, which most tests do
    not run: tests of the records set ``traffic_log.sample_rate`` themselves)."""
    return load_settings(
        None,
        {},
        [
            "server.port=0",
            "server.metrics_port=0",
            "server.grace_period_s=5",
            f"models.repository={repository}",
            f"server.overrides.tokens.tests={TEST_OVERRIDE_TOKEN}",
            "traffic_log.sample_rate=0",
            *overrides,
        ],
    )


@dataclass
class RunningServer:
    """A started AppContext with client stubs on one channel."""

    app: AppContext
    channel: grpc.aio.Channel
    scoring: pb_grpc.ScoringAsyncStub
    inference: v2_grpc.GRPCInferenceServiceAsyncStub

    #: Call metadata holding the overrides permission (store features, recorded times).
    overrides: tuple[tuple[str, str], ...] = (
        ("x-streamscore-override-token", TEST_OVERRIDE_TOKEN),
    )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"


@contextlib.asynccontextmanager
async def running_server(
    repository: Path, overrides: Sequence[str] = (), clock: Callable[[], float] = time.time
) -> AsyncIterator[RunningServer]:
    """Start a server on a free port; stop it (and close the channel) on exit."""
    settings = settings_for_test(repository, *overrides)
    async with AppContext(settings, clock=clock) as app:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        try:
            yield RunningServer(
                app,
                channel,
                pb_grpc.ScoringStub(channel),
                v2_grpc.GRPCInferenceServiceStub(channel),
            )
        finally:
            await channel.close(None)
