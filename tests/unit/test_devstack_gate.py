"""The dev stack's gated demo plan (``devstack.governance``): which versions, the
server's settings and environment, the printed commands. Pure file work, no server."""

from __future__ import annotations

import shlex
from pathlib import Path

from devstack.governance import GatedDemo, next_commands, plan_gated_demo
from server.manifest import MODEL_FILE
from server.routing.approval import REPORT_FILE
from server.settings import load_settings


def _version(repository: Path, version: str, report: bool = True) -> None:
    directory = repository / "fraud" / version
    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(b"onnx")
    if report:
        (directory / REPORT_FILE).write_text("{}")


def test_the_newest_version_is_the_candidate_and_the_one_before_the_champion(
    tmp_path: Path,
) -> None:
    for version in ("2", "10", "9"):
        _version(tmp_path, version)
    plan = plan_gated_demo(tmp_path, "fraud", tmp_path / "admin")
    assert isinstance(plan, GatedDemo)
    assert (plan.champion, plan.candidate) == ("9", "10")


def test_no_gate_without_two_versions_with_reports(tmp_path: Path) -> None:
    _version(tmp_path, "1")
    assert "needs two" in str(plan_gated_demo(tmp_path, "fraud", tmp_path / "admin"))
    _version(tmp_path, "2", report=False)
    reason = plan_gated_demo(tmp_path, "fraud", tmp_path / "admin")
    assert isinstance(reason, str) and f"fraud/2 has no {REPORT_FILE}" in reason
    assert "needs two" in str(plan_gated_demo(tmp_path, "other", tmp_path / "admin"))


def test_tokens_settings_and_commands(tmp_path: Path) -> None:
    for version in ("1", "2"):
        _version(tmp_path, version)
    plan = plan_gated_demo(tmp_path, "fraud", tmp_path / "admin")
    assert isinstance(plan, GatedDemo)
    tokens = plan.write_tokens()
    assert set(tokens) == {"release", "risk"} and len(set(tokens.values())) == 2
    for name, token in tokens.items():
        path = plan.token_file(name)
        assert path.read_text() == token and path.stat().st_mode & 0o777 == 0o600
    settings = load_settings(None, plan.server_env(tokens), plan.server_overrides())
    assert settings.governance.required("fraud") is True
    assert settings.server.admin_credentials() == tokens
    roles = settings.server.admin_roles()
    assert set(roles["release"]) == {"deployer", "approver"} and roles["risk"] == ("approver",)
    assert all(token not in " ".join(plan.server_overrides()) for token in tokens.values())

    approve, route = next_commands(plan, "127.0.0.1:50051")
    risk = f"STREAMSCORE_SERVER__ADMIN_TOKEN=$(cat {plan.token_file('risk')}) "
    release = f"STREAMSCORE_SERVER__ADMIN_TOKEN=$(cat {plan.token_file('release')}) "
    assert approve.startswith(risk) and route.startswith(release)
    approve_argv = shlex.split(approve.removeprefix(risk))
    route_argv = shlex.split(route.removeprefix(release))
    assert approve_argv[1:5] == ["models", "approve", "fraud", "2"]
    assert route_argv[1:6] == ["models", "route", "fraud", "--canary", "2"]
    for argv in (approve_argv, route_argv):
        assert argv[argv.index("--target") + 1] == "127.0.0.1:50051"
        assert argv[argv.index("--reason") + 1]
