"""The dev stack's gated rollout: the demo model requires approval, from a second person.

``streamscore dev`` serves its score model with ``governance.require_approval`` on and
two admin identities, each with a random token in a file under ``<data_dir>/admin/``
(mode 0600; the server gets them through its environment, never its argv):

* ``release`` (roles ``deployer`` and ``approver``): loads versions and routes
  traffic, and could approve, but not a version it loaded (maker-checker);
* ``risk`` (role ``approver``): approves versions.

Once the server answers, the stack calls the Admin API as they would: ``risk``
approves the older demo version (it has a validation report) and ``release`` loads it
(it becomes champion) and the newest one, which then waits, loaded but answering
nothing, until someone other than ``release`` (its loader) approves it. The banner
prints the two commands that do that and start its canary (:func:`next_commands`).
A repository without two versions that each have a validation report is served
ungated (:func:`plan_gated_demo` says why).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.manifest import MODEL_FILE
from server.router import version_sort_key
from server.routing.approval import REPORT_FILE

__all__ = [
    "APPROVER",
    "DEPLOYER",
    "GatedDemo",
    "SetUp",
    "next_commands",
    "plan_gated_demo",
    "set_up_gated_demo",
]

DEPLOYER = "release"
"""Loads and routes; also an approver, but the candidate's loader, so not of it."""
APPROVER = "risk"
"""Approves (role ``approver``): the second person."""
ROLES: Mapping[str, tuple[str, ...]] = {
    DEPLOYER: ("deployer", "approver"),
    APPROVER: ("approver",),
}
CANARY_PERCENT = 10


@dataclass(frozen=True)
class GatedDemo:
    """The gated model, its approved champion and the candidate awaiting approval."""

    model: str
    champion: str
    candidate: str
    token_dir: Path

    def token_file(self, name: str) -> Path:
        return self.token_dir / f"{name}.token"

    def write_tokens(self) -> dict[str, str]:
        """Fresh random tokens (one per identity), written to their files (0600)."""
        self.token_dir.mkdir(parents=True, exist_ok=True)
        tokens = {}
        for name in ROLES:
            token = secrets.token_urlsafe(24)
            path = self.token_file(name)
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token)
            tokens[name] = token
        return tokens

    def server_env(self, tokens: Mapping[str, str]) -> dict[str, str]:
        """The server child's environment entries holding the tokens."""
        return {
            f"STREAMSCORE_SERVER__ADMIN_TOKENS__{name.upper()}__TOKEN": token
            for name, token in tokens.items()
        }

    def server_overrides(self) -> list[str]:
        """``--set`` items: approval required for the model, each identity's role."""
        items = [f"governance.require_approval.{self.model}=true"]
        items += [
            f"server.admin_tokens.{name}.roles={json.dumps(list(roles))}"
            for name, roles in ROLES.items()
        ]
        return items


def plan_gated_demo(repository: Path, model: str, token_dir: Path) -> GatedDemo | str:
    """The gated demo for ``model`` in ``repository``, or why it cannot be shown."""
    try:
        versions = sorted(
            (d.name for d in (repository / model).iterdir() if (d / MODEL_FILE).is_file()),
            key=version_sort_key,
        )
    except OSError:
        versions = []
    if len(versions) < 2:
        return f"{model} has {len(versions)} version(s) in {repository}; the gate needs two"
    champion, candidate = versions[-2], versions[-1]
    for version in (champion, candidate):
        if not (repository / model / version / REPORT_FILE).is_file():
            return (
                f"{model}/{version} has no {REPORT_FILE} "
                f"(streamscore models validate {model} {version} --holdout ...)"
            )
    return GatedDemo(model, champion, candidate, token_dir.resolve())


@dataclass(frozen=True)
class SetUp:
    """What the set-up left: the candidate's reason for not being served."""

    candidate_error: str


async def set_up_gated_demo(target: str, demo: GatedDemo, tokens: Mapping[str, str]) -> SetUp:
    """As ``risk``, approve the champion; as ``release``, load it and the candidate."""

    def by(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {tokens[name]}"),)

    async with grpc.aio.insecure_channel(target) as channel:
        admin = apb_grpc.AdminStub(channel)
        await admin.Approve(
            apb.ApproveRequest(
                endpoint=demo.model,
                version=demo.champion,
                reason="dev stack: the demo champion, its validation report reviewed",
            ),
            metadata=by(APPROVER),
            timeout=30,
        )
        for version, why in (
            (demo.champion, "dev stack: the approved champion"),
            (demo.candidate, "dev stack: the candidate, awaiting approval"),
        ):
            await admin.LoadVersion(
                apb.LoadVersionRequest(endpoint=demo.model, version=version, reason=why),
                metadata=by(DEPLOYER),
                timeout=60,
            )
        listed = await admin.ListModels(
            apb.ListModelsRequest(endpoint=demo.model), metadata=by(DEPLOYER), timeout=30
        )
    (model,) = listed.models
    (candidate,) = [v for v in model.versions if v.version == demo.candidate]
    return SetUp(candidate.error)


def next_commands(demo: GatedDemo, target: str) -> list[str]:
    """The two commands: approve the candidate as ``risk``, start its canary as ``release``."""

    def as_(name: str) -> str:
        return f"STREAMSCORE_SERVER__ADMIN_TOKEN=$(cat {shlex.quote(str(demo.token_file(name)))})"

    share = CANARY_PERCENT
    streamscore = _streamscore()
    return [
        f"{as_(APPROVER)} {streamscore} models approve {demo.model} {demo.candidate} "
        f"--target {target} --reason 'validation report reviewed'",
        f"{as_(DEPLOYER)} {streamscore} models route {demo.model} --canary {demo.candidate} "
        f"--share {share} --target {target} --reason 'canary {share}%'",
    ]


def _streamscore() -> str:
    """The ``streamscore`` command beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "streamscore"
    return shlex.quote(str(beside)) if beside.is_file() else "streamscore"
