"""Admin API against a real server: credentials, the change lifecycle, bad input, audit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from demo.synthetic import DEMO_FEATURES
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.manifest import MODEL_FILE
from tests.conftest import TEST_FEATURES
from tests.support.admin import CREDENTIALS, TOKEN, AdminServer, admin_server, score_request
from tests.support.model_factory import write_linear_model
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ADMIN = "streamscore.v1.Admin"
FEATURES_FILE = Path(__file__).resolve().parents[2] / "features.yaml"
Code = grpc.StatusCode


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """``lin`` versions 1 and 2; tests add version 3 after start."""
    repo = tmp_path / "models"
    for version in ("1", "2"):
        write_linear_model(repo, "lin", version, TEST_FEATURES, seed=int(version))
    return repo


def _calls(stub: apb_grpc.AdminAsyncStub) -> dict[str, Callable[..., Awaitable[Any]]]:
    """One well-formed call per Admin method, taking the call's keyword arguments."""
    requests: dict[str, tuple[Callable[..., Awaitable[Any]], Any]] = {
        "ListModels": (stub.ListModels, apb.ListModelsRequest()),
        "LoadVersion": (stub.LoadVersion, apb.LoadVersionRequest(endpoint="lin", version="1")),
        "UnloadVersion": (
            stub.UnloadVersion,
            apb.UnloadVersionRequest(endpoint="lin", version="1"),
        ),
        "SetRouting": (
            stub.SetRouting,
            apb.SetRoutingRequest(endpoint="lin", routing=apb.Routing(champion="1")),
        ),
        "Promote": (stub.Promote, apb.PromoteRequest(endpoint="lin")),
        "Rollback": (stub.Rollback, apb.RollbackRequest(endpoint="lin")),
        "ListAudit": (stub.ListAudit, apb.ListAuditRequest()),
        "Approve": (stub.Approve, apb.ApproveRequest(endpoint="lin", version="1")),
        "Revoke": (stub.Revoke, apb.RevokeRequest(endpoint="lin", version="1")),
    }
    assert set(requests) == set(apb.DESCRIPTOR.services_by_name["Admin"].methods_by_name), (
        "a new Admin method needs a credentials test"
    )
    return {
        name: (lambda m=method, r=request, **kw: m(r, timeout=10, **kw))
        for name, (method, request) in requests.items()
    }


async def _code(call: Awaitable[Any]) -> tuple[Code, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


async def test_every_admin_call_needs_valid_credentials(repository: Path) -> None:
    async with admin_server(repository) as admin:
        before = await admin.model()
        for name, call in _calls(admin.stub).items():
            for metadata in (
                None,
                (("authorization", "Bearer wrong"),),
                (("authorization", f"Basic {TOKEN}"),),
                (("authorization", f"Bearer {TOKEN}x"),),
            ):
                code, details = await _code(call(metadata=metadata))
                assert code == Code.UNAUTHENTICATED, (name, metadata, code)
                assert TOKEN not in details
        after = await admin.model()
        assert after == before
        assert [e.action for e in await admin.audit()] == ["bootstrap"]
        # with the right token every call is at least accepted past authentication
        for name, call in _calls(admin.stub).items():
            code, _ = await _code(call(metadata=CREDENTIALS))
            assert code != Code.UNAUTHENTICATED, name


async def test_named_tokens_are_the_audit_actor(repository: Path) -> None:
    async with admin_server(repository, ["server.admin_tokens.ci-bot=bot-token"]) as admin:
        await admin.stub.SetRouting(
            apb.SetRoutingRequest(endpoint="lin", routing=apb.Routing(champion="1"), reason="r"),
            metadata=(("authorization", "Bearer bot-token"),),
        )
        await admin.route(champion="2")
        actors = [(e.action, e.actor) for e in await admin.audit()]
    assert actors == [
        ("set_routing", "admin"),
        ("set_routing", "ci-bot"),
        ("bootstrap", "bootstrap"),
    ]


async def test_no_token_configured_closes_the_admin_api(repository: Path) -> None:
    async with running_server(repository) as srv:
        stub = apb_grpc.AdminStub(srv.channel)
        for call in _calls(stub).values():
            code, details = await _code(call(metadata=CREDENTIALS))
            assert code == Code.UNAUTHENTICATED
            assert "no server.admin_token" in details


async def _listed_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return {s.name for s in response.list_services_response.service}


async def test_admin_on_the_scoring_port_is_listed_by_reflection(repository: Path) -> None:
    async with admin_server(repository) as admin:
        assert ADMIN in await _listed_services(admin.srv.channel)
        assert admin.srv.app.admin_port == admin.srv.app.port


async def test_separate_admin_port_keeps_admin_off_the_data_plane(repository: Path) -> None:
    async with admin_server(repository, ["server.admin_port=0"]) as admin:
        app = admin.srv.app
        assert app.admin_port not in (0, app.port)
        assert ADMIN not in await _listed_services(admin.srv.channel)
        code, _ = await _code(admin.stub.ListModels(apb.ListModelsRequest(), metadata=CREDENTIALS))
        assert code == Code.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
            assert ADMIN in await _listed_services(channel)
            admin_stub = apb_grpc.AdminStub(channel)
            listed = await admin_stub.ListModels(apb.ListModelsRequest(), metadata=CREDENTIALS)
            assert [m.endpoint for m in listed.models] == ["lin"]
            code, _ = await _code(admin_stub.ListModels(apb.ListModelsRequest()))
            assert code == Code.UNAUTHENTICATED
            code, _ = await _code(pb_grpc.ScoringStub(channel).Score(score_request()))
            assert code == Code.UNIMPLEMENTED
        assert (await admin.srv.scoring.Score(score_request())).model_version == "2"


async def _score(admin: AdminServer, card: str | None = None, version: str = "") -> tuple[str, int]:
    response = await admin.srv.scoring.Score(score_request(card, model_version=version), timeout=5)
    return response.model_version, response.route


@pytest.mark.parametrize("store", ["file", "redis"])
async def test_load_route_promote_rollback_unload_and_audit(
    repository: Path, request: pytest.FixtureRequest, store: str
) -> None:
    overrides = [f"routing.store={store}"]
    if store == "redis":
        overrides.append(f"redis.url={request.getfixturevalue('redis_url')}")
    async with admin_server(repository, overrides) as admin:
        listed = await admin.model()
        assert [(v.version, v.status, list(v.roles)) for v in listed.versions] == [
            ("1", apb.VERSION_STATUS_LOADED, []),
            ("2", apb.VERSION_STATUS_LOADED, ["champion"]),
        ]
        write_linear_model(repository, "lin", "3", TEST_FEATURES, seed=3)  # a new version ships
        available = await admin.model()
        assert available.versions[2].status == apb.VERSION_STATUS_AVAILABLE

        loaded = await admin.stub.LoadVersion(
            apb.LoadVersionRequest(endpoint="lin", version="3", reason="ship v3"),
            metadata=CREDENTIALS,
        )
        assert list(loaded.model.state.loaded) == ["1", "2", "3"]
        assert loaded.model.versions[2].status == apb.VERSION_STATUS_LOADED
        assert await _score(admin, "c-1") == ("2", pb.ROUTE_CHAMPION)  # loaded, not routed
        assert await _score(admin, version="3") == ("3", pb.ROUTE_PINNED)

        routed = await admin.route(canary="3", share_bp=10_000, shadows=["1"], reason="canary")
        assert routed.model.state.routing.canary.salt  # a salt was drawn for the rollout
        assert await _score(admin, "c-1") == ("3", pb.ROUTE_CANARY)
        assert await _score(admin) == ("2", pb.ROUTE_CHAMPION)  # no card id: champion
        table = admin.srv.app.registry.routing.endpoints["lin"]
        assert table.shadows == ("1",)

        promoted = await admin.stub.Promote(
            apb.PromoteRequest(endpoint="lin", reason="looks good"), metadata=CREDENTIALS
        )
        state = promoted.model.state
        assert (state.routing.champion, state.previous_champion) == ("3", "2")
        assert not state.routing.HasField("canary")
        assert await _score(admin, "c-1") == ("3", pb.ROUTE_CHAMPION)

        rolled = await admin.stub.Rollback(
            apb.RollbackRequest(endpoint="lin", reason="alerts"), metadata=CREDENTIALS
        )
        assert rolled.model.state.routing.champion == "2"
        assert await _score(admin, "c-1") == ("2", pb.ROUTE_CHAMPION)

        await admin.route(shadows=[], reason="stop shadowing")
        unloaded = await admin.stub.UnloadVersion(
            apb.UnloadVersionRequest(endpoint="lin", version="3", reason="retire"),
            metadata=CREDENTIALS,
        )
        assert list(unloaded.model.state.loaded) == ["1", "2"]
        assert not admin.srv.app.registry.has("lin", "3")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _score(admin, version="3")
        assert caught.value.code() == Code.NOT_FOUND

        entries = await admin.audit("lin")
        revision = (await admin.model()).state.revision
    assert [(e.action, e.outcome, e.reason) for e in entries] == [
        ("unload", "applied", "retire"),
        ("set_routing", "applied", "stop shadowing"),
        ("rollback", "applied", "alerts"),
        ("promote", "applied", "looks good"),
        ("set_routing", "applied", "canary"),
        ("load", "applied", "ship v3"),
        ("bootstrap", "applied", "first start with this endpoint in the repository"),
    ]
    assert [e.revision for e in entries] == list(range(revision, revision - 7, -1))
    promote_entry = entries[3]
    assert promote_entry.actor == "admin" and promote_entry.peer
    assert promote_entry.before.routing.canary.version == "3"
    assert promote_entry.after.routing.champion == "3"
    assert promote_entry.after.previous_champion == "2"
    assert promote_entry.time.seconds > 0
    assert not entries[-1].HasField("before")


async def _refused(admin: AdminServer, call: Awaitable[Any]) -> tuple[Code, str]:
    code, details = await _code(call)
    assert code != Code.OK
    return code, details


async def test_bad_input_is_refused_naming_the_problem_and_changes_nothing(
    repository: Path,
) -> None:
    async with admin_server(repository) as admin:
        s, m = admin.stub, CREDENTIALS
        await admin.route(canary="1", share_bp=100)
        before = await admin.model()

        def routing(**kwargs: Any) -> apb.SetRoutingRequest:
            return apb.SetRoutingRequest(endpoint="lin", routing=apb.Routing(**kwargs))

        cases: list[tuple[Awaitable[Any], Code, str]] = [
            (s.LoadVersion(apb.LoadVersionRequest(endpoint="nope", version="1"), metadata=m),
             Code.NOT_FOUND, "'1' of 'nope'"),
            (s.LoadVersion(apb.LoadVersionRequest(endpoint="lin", version="9"), metadata=m),
             Code.NOT_FOUND, "'9'"),
            (s.LoadVersion(apb.LoadVersionRequest(endpoint="lin", version="../lin"), metadata=m),
             Code.INVALID_ARGUMENT, "version"),
            (s.UnloadVersion(apb.UnloadVersionRequest(endpoint="lin", version="2"), metadata=m),
             Code.FAILED_PRECONDITION, "champion"),
            (s.UnloadVersion(apb.UnloadVersionRequest(endpoint="lin", version="1"), metadata=m),
             Code.FAILED_PRECONDITION, "canary"),
            (s.UnloadVersion(apb.UnloadVersionRequest(endpoint="lin", version="7"), metadata=m),
             Code.NOT_FOUND, "'7'"),
            (s.UnloadVersion(apb.UnloadVersionRequest(endpoint="nope", version="1"), metadata=m),
             Code.NOT_FOUND, "'nope'"),
            (s.SetRouting(apb.SetRoutingRequest(endpoint="nope"), metadata=m),
             Code.NOT_FOUND, "'nope'"),
            (s.SetRouting(routing(canary=apb.Canary(version="1", share_bp=10_001)), metadata=m),
             Code.INVALID_ARGUMENT, "canary.share_bp: 10001 is outside 0..10000"),
            (s.SetRouting(routing(canary=apb.Canary(version="1", share_bp=-5)), metadata=m),
             Code.INVALID_ARGUMENT, "canary.share_bp"),
            (s.SetRouting(routing(canary=apb.Canary(version="8", share_bp=5)), metadata=m),
             Code.NOT_FOUND, "canary.version"),
            (s.SetRouting(routing(shadows=["2"]), metadata=m),
             Code.INVALID_ARGUMENT, "shadows[0]: '2' is also the champion"),
            (s.SetRouting(routing(champion="5"), metadata=m), Code.NOT_FOUND, "champion"),
            (s.SetRouting(routing(rollout_json="[1]"), metadata=m),
             Code.INVALID_ARGUMENT, "rollout_json"),
            (s.Rollback(apb.RollbackRequest(endpoint="lin"), metadata=m),
             Code.FAILED_PRECONDITION, "no previous champion"),
            (s.Promote(apb.PromoteRequest(endpoint="nope"), metadata=m), Code.NOT_FOUND, "'nope'"),
            (s.Promote(apb.PromoteRequest(endpoint="lin", expected_revision=1), metadata=m),
             Code.ABORTED, "changed since revision 1"),
            (s.ListModels(apb.ListModelsRequest(endpoint="nope"), metadata=m),
             Code.NOT_FOUND, "'nope'"),
        ]  # fmt: skip
        for call, code, needle in cases:
            got, details = await _refused(admin, call)
            assert (got, needle in details) == (code, True), (code, needle, got, details)
        await admin.route(canary="")  # no canary left: promoting is refused
        code, details = await _refused(
            admin, s.Promote(apb.PromoteRequest(endpoint="lin"), metadata=m)
        )
        assert (code, "no canary to promote" in details) == (Code.FAILED_PRECONDITION, True)
        after = await admin.model()
        refusals = [e for e in await admin.audit() if e.outcome == "refused"]
    assert after.state.routing.champion == before.state.routing.champion == "2"
    assert after.state.revision == before.state.revision + 1  # only the canary removal
    assert len(refusals) == len(cases)  # every refusal is audit-logged, with its error
    assert all(e.error and e.actor == "admin" for e in refusals)


async def test_version_that_fails_to_load_is_refused_and_audited(repository: Path) -> None:
    async with admin_server(repository) as admin:
        version_dir, _, _ = write_linear_model(repository, "lin", "3", TEST_FEATURES, seed=3)
        data = bytearray((version_dir / MODEL_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (version_dir / MODEL_FILE).write_bytes(bytes(data))
        before = await admin.model()
        code, details = await _code(
            admin.stub.LoadVersion(
                apb.LoadVersionRequest(endpoint="lin", version="3", reason="try"),
                metadata=CREDENTIALS,
            )
        )
        assert code == Code.FAILED_PRECONDITION
        assert "sha256 mismatch" in details
        after = await admin.model()
        assert after.state == before.state
        assert not admin.srv.app.registry.has("lin", "3")
        failed = after.versions[2]
        assert (failed.version, failed.status) == ("3", apb.VERSION_STATUS_FAILED)
        assert "sha256 mismatch" in failed.error
        (entry, *_) = await admin.audit()
        assert (await _score(admin, "c")) == ("2", pb.ROUTE_CHAMPION)
    assert (entry.action, entry.outcome, entry.reason) == ("load", "refused", "try")
    assert "sha256 mismatch" in entry.error and not entry.HasField("after")


async def test_version_with_undefined_features_is_refused(tmp_path: Path, redis_url: str) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "fraud", "1", list(DEMO_FEATURES), seed=3)
    overrides = [f"features.definitions_path={FEATURES_FILE}", f"redis.url={redis_url}"]
    async with admin_server(repository, overrides) as admin:
        write_linear_model(repository, "fraud", "2", [*DEMO_FEATURES, "no_such_feature"], seed=4)
        code, details = await _code(
            admin.stub.LoadVersion(
                apb.LoadVersionRequest(endpoint="fraud", version="2"), metadata=CREDENTIALS
            )
        )
        assert code == Code.FAILED_PRECONDITION
        assert "not defined: no_such_feature" in details
        model = await admin.model("fraud")
        (entry, *_) = await admin.audit()
    assert list(model.state.loaded) == ["1"]
    assert (entry.outcome, "no_such_feature" in entry.error) == ("refused", True)


async def test_unloading_drains_in_flight_requests_first(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "lin", "1", TEST_FEATURES, seed=1)
    write_linear_model(repository, "lin", "2", TEST_FEATURES, slow_layers=40, slow_width=512)
    overrides = [
        "models.per_model.lin.champion=1",
        "models.per_model.lin.execution=thread",
        "models.per_model.lin.max_batch_size=1",
    ]
    async with admin_server(repository, overrides) as admin:
        loaded = admin.srv.app.registry.get("lin", "2")
        batcher = loaded.batcher
        # The first batch waits at a gate, so the queue depth does not depend on how
        # fast the model is on this machine.
        gate = asyncio.Event()
        run = loaded.model.run

        async def gated(rows: Any) -> Any:
            await gate.wait()
            return await run(rows)

        loaded.model.run = gated  # type: ignore[method-assign]
        calls = [asyncio.create_task(_score(admin, version="2")) for _ in range(8)]
        # several requests queued behind the running one (the batcher has no event for it)
        async with asyncio.timeout(10):
            while batcher.depth < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.001)

        async def unload_version() -> Any:
            return await admin.stub.UnloadVersion(
                apb.UnloadVersionRequest(endpoint="lin", version="2", reason="drain"),
                metadata=CREDENTIALS,
            )

        unload = asyncio.create_task(unload_version())
        # Positive signal: the unload reached the drain (lin/2 left the registry, its
        # batcher is closing), and a later call on the same channel was answered since,
        # so an unload that did not wait for the drain would have been answered too.
        async with asyncio.timeout(10):
            while admin.srv.app.registry.has("lin", "2"):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        await admin.model()
        assert not unload.done()  # it waits for the queued requests
        gate.set()
        await unload
        assert batcher.depth == 0
        answers = await asyncio.gather(*calls)
        code, _ = await _code(_score(admin, version="2"))
    assert answers == [("2", pb.ROUTE_PINNED)] * 8
    assert code == Code.NOT_FOUND


async def test_rollout_policy_is_validated_and_starts_a_rollout(repository: Path) -> None:
    policy = {"steps": [{"share_bp": 100, "hold_s": 60}, {"share_bp": 1000, "hold_s": 60}]}

    def request(rollout: object, share_bp: int = 100) -> apb.SetRoutingRequest:
        return apb.SetRoutingRequest(
            endpoint="lin",
            routing=apb.Routing(
                canary=apb.Canary(version="1", share_bp=share_bp), rollout_json=json.dumps(rollout)
            ),
        )

    async with admin_server(repository) as admin:
        for bad, share, field in (
            ({"steps_bp": [100, 1000]}, 100, "rollout_json"),
            ({"steps": [{"share_bp": 0, "hold_s": 1}]}, 100, "rollout_json"),
            (policy, 500, "canary.share_bp"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.stub.SetRouting(request(bad, share), metadata=CREDENTIALS)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (caught.value.details() or "")
        response = await admin.stub.SetRouting(request(policy), metadata=CREDENTIALS)
        stored = admin.srv.app.routing
        assert stored is not None
        rollout = stored.state.endpoints["lin"].rollout
        assert rollout is not None and rollout["id"] and rollout["step_started_at"] > 0
        assert [s["share_bp"] for s in rollout["policy"]["steps"]] == [100, 1000]
    assert json.loads(response.model.state.routing.rollout_json)["id"] == rollout["id"]


async def test_a_hand_change_to_an_active_rollouts_canary_is_refused_or_ends_it(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the rollout controller moves a guarded canary's share: resending the active
    document with another share is INVALID_ARGUMENT and changes nothing (it used to be
    stored, then break every process's rollout bookkeeping); dropping the document
    ends the rollout; the CLI drops it when its flags change the canary."""
    from server.cli import main

    policy = {"steps": [{"share_bp": 2000, "hold_s": 600}, {"share_bp": 5000, "hold_s": 600}]}
    async with admin_server(repository) as admin:
        routing = apb.Routing(rollout_json=json.dumps(policy))
        routing.canary.CopyFrom(apb.Canary(version="1", share_bp=2000))
        await admin.stub.SetRouting(
            apb.SetRoutingRequest(endpoint="lin", routing=routing, reason="start"),
            metadata=CREDENTIALS,
        )
        before = await admin.model()
        document = before.state.routing.rollout_json
        edited = apb.Routing(rollout_json=document)
        edited.canary.CopyFrom(apb.Canary(version="1", share_bp=3000))
        code, details = await _code(
            admin.stub.SetRouting(
                apb.SetRoutingRequest(endpoint="lin", routing=edited, reason="by hand"),
                metadata=CREDENTIALS,
            )
        )
        assert code == Code.INVALID_ARGUMENT and "rollout_json" in details
        after = await admin.model()
        assert after.state.revision == before.state.revision
        assert after.state.routing.canary.share_bp == 2000
        # the same document with the canary unchanged keeps the rollout (e.g. a resend)
        same = apb.Routing(rollout_json=document)
        same.canary.CopyFrom(apb.Canary(version="1", share_bp=2000))
        kept = await admin.stub.SetRouting(
            apb.SetRoutingRequest(endpoint="lin", routing=same, reason="resend"),
            metadata=CREDENTIALS,
        )
        assert kept.model.state.routing.rollout_json == document

        target = f"127.0.0.1:{admin.srv.app.admin_port}"
        argv = ["models", "route", "lin", "--share", "30", "--reason", "by hand"]
        command = [*argv[:2], "--target", target, "--set", f"server.admin_token={TOKEN}", *argv[2:]]
        assert await asyncio.to_thread(main, command) == 0, capsys.readouterr().err
        ended = await admin.model()
        assert ended.state.routing.canary.share_bp == 3000
        assert ended.state.routing.rollout_json == ""
        assert admin.srv.app.routing is not None
        assert admin.srv.app.routing.state.endpoints["lin"].rollout is None
