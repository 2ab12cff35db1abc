"""``streamscore`` installed from only what the Dockerfile copies (no bench/, devstack/,
demo/): ``serve --help`` and ``replay --help`` work, ``dev`` and ``models demo`` answer
one clear line with exit status 2 and are absent from ``--help``.

No Docker daemon: the builder stage's COPY sources are copied to a temporary directory
and pip-installed (not editable) into a throwaway venv whose only extra path is the
dependencies' site-packages (a ``.pth`` line, whose own ``.pth`` files, such as the dev
tree's editable finder, are therefore never run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEV_TREE = ("bench", "devstack", "demo")


def builder_copy_sources() -> list[str]:
    """The sources of the builder stage's COPY instructions (the first stage)."""
    sources: list[str] = []
    stages = 0
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.upper().startswith("FROM "):
            stages += 1
        elif stages == 1 and line.upper().startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return [source.rstrip("/") for source in sources]


@dataclass(frozen=True)
class Installed:
    python: Path
    streamscore: Path
    site_packages: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.streamscore), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=self.env,
            cwd=self.cwd,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("image")
    src = base / "src"
    src.mkdir()
    sources = builder_copy_sources()
    assert {"pyproject.toml", "server", "feature_streams", "protos"} <= set(sources)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, src / source, ignore=ignore)
        else:
            shutil.copy2(path, src / source)

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "STREAMSCORE_"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    deps = Path(grpc.__file__).resolve().parents[1]  # the dependencies' site-packages
    (Path(purelib) / "_deps.pth").write_text(f"{deps}\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    install = subprocess.run(
        [*pip, "--no-index", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=base,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield Installed(python, venv / "bin" / "streamscore", Path(purelib), env, base)


def test_only_the_image_packages_are_importable(installed: Installed) -> None:
    probe = (
        "import importlib.util, json, server, feature_streams, protos\n"
        "print(json.dumps({'files': [m.__file__ for m in (server, feature_streams, protos)],"
        f" 'dev': [n for n in {DEV_TREE!r} if importlib.util.find_spec(n)]}}))"
    )
    result = subprocess.run(
        [str(installed.python), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=installed.env,
        cwd=installed.cwd,
    )
    found = json.loads(result.stdout)
    assert found["dev"] == []  # no editable finder of the dev tree, no bench/devstack/demo
    for file in found["files"]:
        assert Path(file).resolve().is_relative_to(installed.site_packages.resolve()), file


def test_serve_help(installed: Installed) -> None:
    result = installed.run("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_replay_help(installed: Installed) -> None:
    result = installed.run("replay", "--help")
    assert result.returncode == 0, result.stderr
    assert "--target" in result.stdout


def test_help_lists_no_development_commands(installed: Installed) -> None:
    top = installed.run("--help")
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
    assert "replay" in top.stdout
    assert "dev" not in top.stdout.split("}")[0]  # the {serve,replay,...} choices
    models = installed.run("models", "--help")
    assert models.returncode == 0, models.stderr
    assert "list" in models.stdout
    assert "demo" not in models.stdout


@pytest.mark.parametrize("command", [("dev",), ("models", "demo", "--force")])
def test_development_commands_answer_one_line(
    installed: Installed, command: tuple[str, ...]
) -> None:
    result = installed.run(*command)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "part of the development tree, not this installation" in lines[0]
    assert "streamscore " + " ".join(c for c in command if not c.startswith("-")) in lines[0]
