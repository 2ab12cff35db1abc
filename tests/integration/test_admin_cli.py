"""``streamscore models list|load|unload|route|promote|rollback|audit`` against a real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server.cli import main
from tests.conftest import TEST_FEATURES
from tests.support.admin import TOKEN, AdminServer, admin_server, routing_of
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def _cli(admin: AdminServer, *argv: str, token: str = TOKEN) -> int:
    target = f"127.0.0.1:{admin.srv.app.admin_port}"
    command = [*argv[:2], "--target", target, "--set", f"server.admin_token={token}", *argv[2:]]
    return await asyncio.to_thread(main, command)


async def test_cli_drives_the_admin_api(
    linear_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with admin_server(linear_repository) as admin:
        assert await _cli(admin, "models", "list") == 0
        listing = capsys.readouterr().out
        assert "lin  champion 2  canary -" in listing
        write_linear_model(linear_repository, "lin", "3", TEST_FEATURES, seed=3)
        assert await _cli(admin, "models", "load", "lin", "3", "--reason", "ship") == 0
        route = ["models", "route", "lin", "--canary", "3", "--share", "12.5", "--shadow", "1"]
        assert await _cli(admin, *route, "--reason", "canary") == 0
        assert routing_of(await admin.model()) == ("2", "3", 1250, ("1",))
        # only what the flags name changes: the canary and its salt stay
        salt = (await admin.model()).state.routing.canary.salt
        assert await _cli(admin, "models", "route", "lin", "--no-shadows", "--reason", "r") == 0
        model = await admin.model()
        assert routing_of(model) == ("2", "3", 1250, ())
        assert model.state.routing.canary.salt == salt
        assert await _cli(admin, "models", "promote", "lin", "--reason", "good") == 0
        assert await _cli(admin, "models", "rollback", "lin", "--reason", "bad") == 0
        assert await _cli(admin, "models", "unload", "lin", "3", "--reason", "gone") == 0
        capsys.readouterr()
        assert await _cli(admin, "models", "audit", "lin", "--json") == 0
        audit = json.loads(capsys.readouterr().out)
        assert await _cli(admin, "models", "unload", "lin", "2", "--reason", "x") == 1
        refused = capsys.readouterr().err
        assert await _cli(admin, "models", "list", token="wrong") == 1
        unauthenticated = capsys.readouterr().err
    actions = [(e["action"], e["actor"], e["reason"]) for e in audit["entries"]]
    assert actions[:6] == [
        ("unload", "admin", "gone"),
        ("rollback", "admin", "bad"),
        ("promote", "admin", "good"),
        ("set_routing", "admin", "r"),
        ("set_routing", "admin", "canary"),
        ("load", "admin", "ship"),
    ]
    assert "FAILED_PRECONDITION" in refused and "champion" in refused
    assert "UNAUTHENTICATED" in unauthenticated
