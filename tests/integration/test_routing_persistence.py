"""Routing state persistence: it survives a restart, concurrent admins lose no
update, a lost or unreachable store is recovered, and two ``streamscore serve``
processes sharing Redis apply a change within one second."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.services import redis_server
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from tests.conftest import TEST_FEATURES, free_port
from tests.support.admin import (
    CREDENTIALS,
    TOKEN,
    AdminServer,
    admin_server,
    routing_of,
    score_request,
)
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO_ROOT = Path(__file__).resolve().parents[2]
APPLY_LIMIT_S = 1.0


def _store_overrides(store: str, request: pytest.FixtureRequest) -> list[str]:
    if store == "redis":
        return ["routing.store=redis", f"redis.url={request.getfixturevalue('redis_url')}"]
    return ["routing.store=file"]


@pytest.mark.parametrize("store", ["file", "redis"])
async def test_routing_survives_a_restart(
    linear_repository: Path,
    request: pytest.FixtureRequest,
    store: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The configured champion only seeds the first start; afterwards the store wins.
    overrides = [*_store_overrides(store, request), "models.per_model.lin.champion=2"]
    async with admin_server(linear_repository, overrides) as admin:
        await admin.route(canary="1", share_bp=2500, reason="try 1")
        await admin.stub.Promote(apb.PromoteRequest(endpoint="lin"), metadata=CREDENTIALS)
        await admin.route(canary="2", share_bp=700, shadows=[], reason="and back")
        before = await admin.model()
        salt = before.state.routing.canary.salt
        audit_before = await admin.audit()
    async with admin_server(linear_repository, overrides) as admin:
        after = await admin.model()
        audit_after = await admin.audit()
        table = admin.srv.app.registry.routing.endpoints["lin"]
        answer = await admin.srv.scoring.Score(score_request("c-1"))
    assert after.state == before.state
    assert routing_of(after) == ("1", "2", 700, ())
    assert table.champion == "1"
    assert table.canary is not None and (table.canary.version, table.canary.salt) == ("2", salt)
    assert answer.model_version in {"1", "2"}
    assert audit_after == audit_before  # nothing re-bootstrapped
    (warning,) = [
        r
        for r in caplog.records
        if r.getMessage() == "persisted routing overrides the configured champion"
    ]
    assert (getattr(warning, "configured", None), getattr(warning, "champion", None)) == ("2", "1")


async def test_concurrent_admins_on_two_servers_lose_no_update(
    linear_repository: Path, redis_url: str
) -> None:
    overrides = ["routing.store=redis", f"redis.url={redis_url}"]
    async with (
        admin_server(linear_repository, overrides) as first,
        admin_server(linear_repository, overrides) as second,
    ):
        start = (await first.model()).state.revision
        shares = list(range(100, 2100, 100))
        await asyncio.gather(
            *(
                (first if i % 2 else second).route(canary="1", share_bp=share, reason=f"s{share}")
                for i, share in enumerate(shares)
            )
        )
        final = await first.model()
        applied = [e for e in await first.audit() if e.action == "set_routing"]
        await asyncio.wait_for(_applied(second, final.state.revision), APPLY_LIMIT_S)
    assert final.state.revision == start + len(shares)
    assert sorted(e.reason for e in applied) == sorted(f"s{s}" for s in shares)
    assert sorted(e.revision for e in applied) == list(range(start + 1, final.state.revision + 1))
    # each change saw the state the previous one wrote: before == the previous after
    ordered = sorted(applied, key=lambda e: e.revision)
    for earlier, later in itertools.pairwise(ordered):
        assert later.before == earlier.after


async def _applied(admin: AdminServer, revision: int) -> None:
    controller = admin.srv.app.routing
    assert controller is not None
    await controller.wait_applied(revision)


async def test_lost_store_is_restored_from_the_serving_state(
    linear_repository: Path, redis_url: str
) -> None:
    overrides = ["routing.store=redis", f"redis.url={redis_url}"]
    async with admin_server(linear_repository, overrides) as admin:
        await admin.route(champion="1", reason="pick 1")
        client = redis.Redis.from_url(redis_url)
        try:
            client.flushall()
        finally:
            client.close()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + APPLY_LIMIT_S
        while not (entries := await admin.audit()):  # the store is polled, not pushed
            assert loop.time() < give_up, "the emptied store was not restored"
            await asyncio.sleep(0.02)
        (entry,) = entries
        restored = await admin.model()
        answer = await admin.srv.scoring.Score(score_request("c-1"))
    assert routing_of(restored)[0] == "1"
    assert (entry.action, entry.endpoint, entry.after.routing.champion) == ("restore", "lin", "1")
    assert answer.model_version == "1"


async def test_unreachable_store_serves_defaults_then_syncs(linear_repository: Path) -> None:
    port = free_port()
    overrides = ["routing.store=redis", f"redis.url=redis://127.0.0.1:{port}/0"]
    async with admin_server(linear_repository, overrides) as admin:
        controller = admin.srv.app.routing
        assert controller is not None and not controller.synced
        assert (await admin.srv.scoring.Score(score_request("c"))).model_version == "2"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.route(champion="1")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "routing store (redis) unavailable" in (caught.value.details() or "")
        with redis_server(port):
            await asyncio.wait_for(_applied(admin, 1), 5)  # bootstrapped into the store
            assert controller.synced
            await admin.route(champion="1", reason="store is back")
            assert (await admin.srv.scoring.Score(score_request("c"))).model_version == "1"
            actions = [e.action for e in await admin.audit()]
    assert actions == ["set_routing", "bootstrap"]


# ------------------------------------------------------------- two real processes


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    port: int
    channel: grpc.aio.Channel
    log: Path

    @property
    def admin(self) -> apb_grpc.AdminAsyncStub:
        return apb_grpc.AdminStub(self.channel)

    @property
    def scoring(self) -> pb_grpc.ScoringAsyncStub:
        return pb_grpc.ScoringStub(self.channel)


async def _wait_serving(server: ServeProcess, limit_s: float = 30.0) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while True:
        assert server.process.returncode is None, server.log.read_text()[-3000:]
        assert loop.time() < give_up, f"not serving:\n{server.log.read_text()[-3000:]}"
        with contextlib.suppress(grpc.aio.AioRpcError):
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, name: str, overrides: Sequence[str]) -> AsyncIterator[ServeProcess]:
    """``python -m server.cli serve`` on a free port; killed on exit if still running."""
    port = free_port()
    sets = [item for value in overrides for item in ("--set", value)]
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--set",
            f"server.port={port}",
            "--set",
            "server.metrics_port=0",
            *sets,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    server = ServeProcess(process, port, channel, log)
    try:
        await _wait_serving(server)
        yield server
    finally:
        await channel.close(None)
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _seen_within(server: ServeProcess, version: str, started: float) -> float:
    """Seconds from ``started`` until ``server`` answers a card with ``version``."""
    loop = asyncio.get_running_loop()
    while True:
        response = await server.scoring.Score(score_request("card-7"), timeout=5)
        elapsed = loop.time() - started
        if response.model_version == version or elapsed > 5:
            return elapsed
        await asyncio.sleep(0.01)


async def test_two_server_processes_apply_a_change_within_a_second(
    tmp_path: Path, redis_url: str
) -> None:
    repository = tmp_path / "models"
    for version in ("1", "2"):
        write_linear_model(repository, "lin", version, TEST_FEATURES, seed=int(version))
    overrides = [
        f"models.repository={repository}",
        "features.definitions_path=null",
        f"redis.url={redis_url}",
        "routing.store=redis",
        f"server.admin_token={TOKEN}",
        "logging.json=false",
    ]
    async with serve(tmp_path, "a", overrides) as a, serve(tmp_path, "b", overrides) as b:
        loop = asyncio.get_running_loop()
        assert (await b.scoring.Score(score_request("card-7"))).model_version == "2"
        started = loop.time()
        await a.admin.SetRouting(
            apb.SetRoutingRequest(endpoint="lin", routing=apb.Routing(champion="1"), reason="x"),
            metadata=CREDENTIALS,
        )
        assert (await a.scoring.Score(score_request("card-7"))).model_version == "1"
        to_champion = await _seen_within(b, "1", started)

        write_linear_model(repository, "lin", "3", TEST_FEATURES, seed=3)
        started = loop.time()
        await b.admin.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="3"), metadata=CREDENTIALS
        )
        await a.admin.SetRouting(
            apb.SetRoutingRequest(
                endpoint="lin",
                routing=apb.Routing(canary=apb.Canary(version="3", share_bp=10_000)),
            ),
            metadata=CREDENTIALS,
        )
        to_canary = await _seen_within(b, "3", started)
        listed_a = await a.admin.ListModels(apb.ListModelsRequest(), metadata=CREDENTIALS)
        listed_b = await b.admin.ListModels(apb.ListModelsRequest(), metadata=CREDENTIALS)
    assert to_champion < APPLY_LIMIT_S, to_champion
    assert to_canary < APPLY_LIMIT_S + 0.5, to_canary  # includes loading v3 in both processes
    assert listed_a.revision == listed_b.revision == listed_b.applied_revision
    assert listed_a.models == listed_b.models
