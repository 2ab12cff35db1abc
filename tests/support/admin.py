"""Admin API helpers for tests: the token, credentials and a running server with both."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from protos.streamscore.v1 import scoring_pb2 as pb
from tests.conftest import TEST_FEATURES
from tests.support.server import RunningServer, running_server

TOKEN = "s3cret-admin-token"
CREDENTIALS = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class AdminServer:
    """A running server and an authenticated admin client on the same channel."""

    srv: RunningServer
    stub: apb_grpc.AdminAsyncStub

    async def model(self, endpoint: str = "lin") -> apb.Model:
        response = await self.stub.ListModels(
            apb.ListModelsRequest(endpoint=endpoint), metadata=CREDENTIALS, timeout=10
        )
        (model,) = response.models
        return model

    async def route(
        self,
        endpoint: str = "lin",
        *,
        champion: str = "",
        canary: str = "",
        share_bp: int = 0,
        shadows: Sequence[str] = (),
        reason: str = "test",
    ) -> apb.ChangeResponse:
        routing = apb.Routing(champion=champion, shadows=shadows)
        if canary:
            routing.canary.CopyFrom(apb.Canary(version=canary, share_bp=share_bp))
        return await self.stub.SetRouting(
            apb.SetRoutingRequest(endpoint=endpoint, routing=routing, reason=reason),
            metadata=CREDENTIALS,
            timeout=10,
        )

    async def audit(self, endpoint: str = "", limit: int = 100) -> list[apb.AuditEntry]:
        response = await self.stub.ListAudit(
            apb.ListAuditRequest(endpoint=endpoint, limit=limit), metadata=CREDENTIALS, timeout=10
        )
        return list(response.entries)


@contextlib.asynccontextmanager
async def admin_server(
    repository: Path, overrides: Sequence[str] = ()
) -> AsyncIterator[AdminServer]:
    """A test server with ``TOKEN`` configured."""
    async with running_server(repository, [f"server.admin_token={TOKEN}", *overrides]) as srv:
        yield AdminServer(srv, apb_grpc.AdminStub(srv.channel))


def score_request(card: str | None = None, model: str = "lin", **kwargs: object) -> pb.ScoreRequest:
    """A valid request for the linear test models, keyed by ``card`` when given."""
    values = np.linspace(-1, 1, len(TEST_FEATURES))
    return pb.ScoreRequest(
        model=model,
        features={name: float(v) for name, v in zip(TEST_FEATURES, values, strict=True)},
        entity_ids={"card_id": card} if card else {},
        **kwargs,  # type: ignore[arg-type]
    )


def routing_of(model: apb.Model) -> tuple[str, str, int, tuple[str, ...]]:
    """(champion, canary version, canary share, shadows) of a listed model."""
    routing = model.state.routing
    return (
        routing.champion,
        routing.canary.version,
        routing.canary.share_bp,
        tuple(routing.shadows),
    )
