"""Approval gate against a real server: maker-checker, sha256 binding, roles, audit.

The store is the file store and real Redis (parametrized) for the lifecycle test.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.admin.auth import RPC_ROLES as ROLE_TABLE
from server.admin.cli import format_models
from server.manifest import MODEL_FILE
from server.routing.approval import REPORT_FILE
from tests.conftest import TEST_FEATURES
from tests.support.admin import CREDENTIALS, AdminServer, admin_server, score_request
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]

#: name -> (token, roles)
PRINCIPALS = {
    "alice": ("alice-token", ["deployer", "approver"]),
    "bob": ("bob-token", ["approver"]),
    "dora": ("dora-token", ["deployer"]),
    "vic": ("vic-token", ["viewer"]),
}


def _as(name: str) -> Metadata:
    return (("authorization", f"Bearer {PRINCIPALS[name][0]}"),)


def _overrides(*extra: str) -> list[str]:
    out = ["governance.require_approval.lin=true", *extra]
    for name, (token, roles) in PRINCIPALS.items():
        out.append(f"server.admin_tokens.{name}.token={token}")
        out.append(f"server.admin_tokens.{name}.roles={json.dumps(roles)}")
    return out


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    for version in ("1", "2"):
        write_linear_model(repo, "lin", version, TEST_FEATURES, seed=int(version))
    return repo


def _report(repository: Path, version: str, text: str = '{"auc": 0.9}') -> None:
    (repository / "lin" / version / REPORT_FILE).write_text(text)


async def _code(call: Awaitable[Any]) -> tuple[Code, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


@pytest.fixture(params=["file", "redis"])
def store_overrides(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "file":
        return []
    return ["routing.store=redis", f"redis.url={request.getfixturevalue('redis_url')}"]


async def test_maker_checker_and_sha256_bound_approval(
    repository: Path, store_overrides: list[str]
) -> None:
    async with admin_server(repository, _overrides(*store_overrides)) as admin:
        stub = admin.stub

        def approve(version: str, who: str) -> Awaitable[Any]:
            return stub.Approve(
                apb.ApproveRequest(endpoint="lin", version=version, reason="validated"),
                metadata=_as(who),
                timeout=10,
            )

        def load(version: str, who: str) -> Awaitable[Any]:
            return stub.LoadVersion(
                apb.LoadVersionRequest(endpoint="lin", version=version, reason="ship"),
                metadata=_as(who),
                timeout=10,
            )

        def canary(version: str, share_bp: int) -> Awaitable[Any]:
            routing = apb.Routing(champion="1")
            routing.canary.CopyFrom(apb.Canary(version=version, share_bp=share_bp))
            return stub.SetRouting(
                apb.SetRoutingRequest(endpoint="lin", routing=routing, reason="canary"),
                metadata=_as("alice"),
                timeout=10,
            )

        # Bootstrap: no approved version, so the model is not served.
        model = await admin.model()
        assert not model.HasField("state")
        assert "no validation report" in model.versions[0].approval.problem
        code, _ = await _code(admin.srv.scoring.Score(score_request("c"), timeout=10))
        assert code == Code.NOT_FOUND

        # Unknown version: NOT_FOUND; no report: FAILED_PRECONDITION.
        assert (await _code(approve("9", "bob")))[0] == Code.NOT_FOUND
        code, details = await _code(approve("1", "bob"))
        assert code == Code.FAILED_PRECONDITION and REPORT_FILE in details
        code, details = await _code(load("1", "alice"))
        assert code == Code.FAILED_PRECONDITION and "champion '1'" in details

        _report(repository, "1")
        code, details = await _code(load("1", "alice"))
        assert code == Code.FAILED_PRECONDITION and "no approval" in details
        await approve("1", "bob")
        await load("1", "alice")
        assert (await admin.srv.scoring.Score(score_request("c"), timeout=10)).model_version == "1"

        # Version 2: loaded by alice, so alice cannot approve it.
        await load("2", "alice")
        code, details = await _code(approve("2", "alice"))
        assert code == Code.PERMISSION_DENIED
        assert "approver must differ from submitter" in details
        # Shadow needs no approval; canary share > 0 does.
        await admin.route(champion="1", shadows=["2"])
        code, details = await _code(canary("2", 1000))
        assert code == Code.FAILED_PRECONDITION and "canary '2'" in details
        assert "no validation report" in details
        await canary("2", 0)  # a canary at 0 % answers nothing: allowed
        _report(repository, "2")
        code, details = await _code(canary("2", 1000))
        assert code == Code.FAILED_PRECONDITION and "no approval" in details
        await approve("2", "bob")
        await canary("2", 1000)

        # Changing the artifact voids the approval: listing says so, promote is refused.
        with (repository / "lin" / "2" / MODEL_FILE).open("ab") as artifact:
            artifact.write(b"\0")
        (v2,) = [v for v in (await admin.model()).versions if v.version == "2"]
        assert "artifact changed" in v2.approval.problem
        assert v2.approval.approved_by == "bob"
        code, details = await _code(
            stub.Promote(apb.PromoteRequest(endpoint="lin", reason="go"), metadata=_as("alice"))
        )
        assert code == Code.FAILED_PRECONDITION and "artifact changed" in details
        assert (await admin.model()).state.routing.champion == "1"

        # Changing the report voids it too.
        _report(repository, "1", '{"auc": 0.5}')
        (v1,) = [v for v in (await admin.model()).versions if v.version == "1"]
        assert "validation report changed" in v1.approval.problem

        # Revocation.
        await stub.Revoke(
            apb.RevokeRequest(endpoint="lin", version="2", reason="withdrawn"),
            metadata=_as("bob"),
            timeout=10,
        )
        (v2,) = [v for v in (await admin.model()).versions if v.version == "2"]
        assert v2.approval.approved_by == "" and "no approval" in v2.approval.problem

        audit = await admin.audit("lin")
    entries = [(e.action, e.actor, e.outcome) for e in reversed(audit)]
    assert ("approve", "bob", "applied") in entries
    assert ("approve", "alice", "refused") in entries
    assert ("revoke", "bob", "applied") in entries
    assert ("promote", "alice", "refused") in entries
    assert ("set_routing", "alice", "refused") in entries
    (first,) = [
        e
        for e in audit
        if e.action == "approve" and json.loads(e.detail_json or "{}").get("version") == "1"
    ]
    detail = json.loads(first.detail_json)
    assert len(detail["artifact_sha256"]) == 64 and len(detail["report_sha256"]) == 64


def _calls(stub: apb_grpc.AdminAsyncStub) -> dict[str, Callable[[Metadata], Awaitable[Any]]]:
    requests: dict[str, tuple[Callable[..., Awaitable[Any]], Any]] = {
        "ListModels": (stub.ListModels, apb.ListModelsRequest()),
        "ListAudit": (stub.ListAudit, apb.ListAuditRequest()),
        "LoadVersion": (stub.LoadVersion, apb.LoadVersionRequest(endpoint="lin", version="1")),
        "UnloadVersion": (stub.UnloadVersion, apb.UnloadVersionRequest(endpoint="lin")),
        "SetRouting": (stub.SetRouting, apb.SetRoutingRequest(endpoint="lin")),
        "Promote": (stub.Promote, apb.PromoteRequest(endpoint="lin")),
        "Rollback": (stub.Rollback, apb.RollbackRequest(endpoint="lin")),
        "Approve": (stub.Approve, apb.ApproveRequest(endpoint="lin", version="1")),
        "Revoke": (stub.Revoke, apb.RevokeRequest(endpoint="lin", version="1")),
    }
    assert set(requests) == set(apb.DESCRIPTOR.services_by_name["Admin"].methods_by_name)

    def bind(method: Callable[..., Awaitable[Any]], request: Any) -> Callable[..., Awaitable[Any]]:
        return lambda metadata: method(request, timeout=10, metadata=metadata)

    return {name: bind(method, request) for name, (method, request) in requests.items()}


async def test_every_admin_rpc_checks_its_role(repository: Path) -> None:
    async with admin_server(repository, _overrides()) as admin:
        calls = _calls(admin.stub)
        assert set(calls) == set(ROLE_TABLE)
        for method, call in calls.items():
            needed = ROLE_TABLE[method]
            for who, (_, roles) in PRINCIPALS.items():
                allowed = needed in roles or needed == "viewer"
                code, details = await _code(call(_as(who)))
                if allowed:
                    assert code != Code.PERMISSION_DENIED, (method, who, details)
                else:
                    assert code == Code.PERMISSION_DENIED, (method, who, code)
                    assert f"needs role {needed!r}" in details, details
            # the single admin_token keeps every right (role admin)
            code, details = await _code(call(CREDENTIALS))
            assert code != Code.PERMISSION_DENIED, (method, details)
        audit = await admin.audit(limit=1000)
    refused = {(e.action, e.actor) for e in audit if "PERMISSION_DENIED" in e.error}
    assert ("Approve", "dora") in refused and ("SetRouting", "bob") in refused
    assert ("ListModels", "vic") not in refused


async def test_guarded_controller_rolls_back_a_canary_that_lost_its_approval(
    repository: Path,
) -> None:
    from server.rollout.routing import RoutingRolloutActions

    for version in ("1", "2"):
        _report(repository, version)
    policy = {
        "steps": [{"share_bp": s, "hold_s": 600} for s in (2000, 5000)],
        "min_requests": 40,
        "min_champion_requests": 40,
        "max_error_rate_ratio": 2.0,
        "max_p99_latency_ratio": 1000.0,
        "max_psi": 0.25,
        "evaluation_interval_s": 0.3,
    }
    async with admin_server(repository, _overrides()) as admin:
        for version in ("1", "2"):
            await admin.stub.Approve(
                apb.ApproveRequest(endpoint="lin", version=version, reason="ok"),
                metadata=_as("bob"),
            )
        await admin.stub.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="1", reason="r"), metadata=_as("dora")
        )
        await admin.stub.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="2", reason="r"), metadata=_as("dora")
        )
        routing = apb.Routing(champion="1", rollout_json=json.dumps(policy))
        routing.canary.CopyFrom(apb.Canary(version="2", share_bp=2000))
        await admin.stub.SetRouting(
            apb.SetRoutingRequest(endpoint="lin", routing=routing, reason="start"),
            metadata=_as("dora"),
        )
        rollout_id = json.loads((await admin.model()).state.routing.rollout_json)["id"]
        await admin.stub.Revoke(
            apb.RevokeRequest(endpoint="lin", version="2", reason="finding"), metadata=_as("bob")
        )
        changes = admin.srv.app.routing_changes
        assert changes is not None
        actions = RoutingRolloutActions(changes, lambda: 1.0)
        await actions.promote("lin", "all steps passed", {}, rollout_id=rollout_id)
        model = await admin.model()
        audit = await admin.audit("lin")
    assert model.state.routing.champion == "1"
    assert not model.state.routing.HasField("canary")
    outcomes = [(e.action, e.outcome) for e in audit[:2]]
    assert outcomes == [("rollout_rollback", "applied"), ("rollout_promote", "refused")]
    assert "canary not approved" in audit[0].reason
    assert "no approval" in audit[1].error


def _gated_logs(caplog: pytest.LogCaptureFixture, version: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"lin/{version} is not served: not approved: ")
    ]


async def _health(admin: AdminServer) -> int:
    reply = await health_pb2_grpc.HealthStub(admin.srv.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return int(reply.status)


async def test_a_gated_version_says_why_it_is_not_served(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A configured champion (or any version) held back by the gate: ListModels and
    ``models list`` say "not approved: <what is missing>", the log says it once per
    process, and health turns SERVING once an approved version is loaded."""
    caplog.set_level(logging.INFO, logger="server")
    for version in ("1", "2"):
        _report(repository, version)
    overrides = _overrides("models.per_model.lin.champion=2")
    async with admin_server(repository, overrides) as admin:
        model = await admin.model()
        errors = {v.version: v.error for v in model.versions}
        assert all(e.startswith("not approved: no approval") for e in errors.values()), errors
        listing = format_models(apb.ListModelsResponse(models=[model]))
        assert "lin  (not served: no approved version)" in listing, listing
        assert re.search(r"^  2 +available +not approved: no approval", listing, re.M), listing
        assert await _health(admin) == health_pb2.HealthCheckResponse.NOT_SERVING

        await admin.stub.Approve(
            apb.ApproveRequest(endpoint="lin", version="1", reason="ok"), metadata=_as("bob")
        )
        await admin.stub.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="1", reason="r"), metadata=_as("dora")
        )
        await admin.stub.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="2", reason="r"), metadata=_as("dora")
        )
        await admin.route(champion="1", canary="2", share_bp=0)  # a canary at 0: allowed
        model = await admin.model()
        errors = {v.version: v.error for v in model.versions}
        assert errors["1"] == "", errors
        assert errors["2"].startswith("not approved: no approval"), errors
        listing = format_models(apb.ListModelsResponse(models=[model]))
        assert "approved by bob" in listing and "not approved: no approval" in listing, listing
        assert await _health(admin) == health_pb2.HealthCheckResponse.SERVING
        for _ in range(3):  # listing again (and the routing polls) log nothing more
            await admin.model()
    assert len(_gated_logs(caplog, "2")) == 1, caplog.text
    assert len(_gated_logs(caplog, "1")) == 1, caplog.text
    (first,) = _gated_logs(caplog, "2")
    assert first.named_by == "configured champion"  # type: ignore[attr-defined]

    # Restarted with the routing persisted (champion 1): the configured champion 2 is
    # still unapproved, which is why it does not answer; said once, and why.
    caplog.clear()
    async with admin_server(repository, overrides) as admin:
        assert (await admin.srv.scoring.Score(score_request("c"), timeout=10)).model_version == "1"
        (v2,) = [v for v in (await admin.model()).versions if v.version == "2"]
        assert v2.error.startswith("not approved: no approval"), v2
        await admin.stub.Approve(
            apb.ApproveRequest(endpoint="lin", version="2", reason="ok"), metadata=_as("bob")
        )
        (v2,) = [v for v in (await admin.model()).versions if v.version == "2"]
        assert v2.error == "" and v2.approval.approved_by == "bob"
    (again,) = _gated_logs(caplog, "2")
    assert again.named_by == "configured champion"  # type: ignore[attr-defined]
    assert "persisted routing overrides" not in caplog.text
