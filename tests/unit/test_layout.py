"""The test layout rule holds: unit tests start no service, integration tests are marked."""

from __future__ import annotations

import ast
from pathlib import Path, PurePath

import pytest

from tests.support.layout import (
    SERVICE_CALLS,
    SERVICE_MODULES,
    SERVICE_STARTERS,
    layout_problem,
)

UNIT_DIR = Path(__file__).resolve().parent


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _services_started(source: str) -> list[str]:
    """What in ``source`` starts a server, Redis, the broker or a child service."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.module in SERVICE_MODULES:
                found.append(f"import from {node.module}")
            found += [f"import {a.name}" for a in node.names if a.name in SERVICE_STARTERS]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in SERVICE_MODULES]
        elif isinstance(node, ast.Call) and _dotted(node.func) in SERVICE_CALLS:
            found.append(f"call {_dotted(node.func)}()")
        elif isinstance(node, ast.Attribute) and _dotted(node) == "pytest.mark.integration":
            found.append("pytest.mark.integration")
    return found


def test_unit_modules_start_no_service() -> None:
    offending = {
        path.name: started
        for path in sorted(UNIT_DIR.rglob("*.py"))
        if (started := _services_started(path.read_text()))
    }
    assert offending == {}, "move these to tests/integration and mark them integration"


def test_the_scan_sees_each_way_of_starting_a_service() -> None:
    source = """
import pytest
from devstack.services import redis_server
from tests.support.server import running_server
import grpc, subprocess
pytestmark = pytest.mark.integration
server = grpc.aio.server()
child = subprocess.Popen(["redis-server"])
"""
    assert _services_started(source) == [
        "import redis_server",
        "import from tests.support.server",
        "import running_server",
        "pytest.mark.integration",
        "call grpc.aio.server()",
        "call subprocess.Popen()",
    ]
    assert _services_started("import subprocess\nsubprocess.run(['true'])\n") == []


@pytest.mark.parametrize(
    ("where", "fixtures", "marked", "complaint"),
    [
        ("unit/test_a.py", ["tmp_path"], False, None),
        ("integration/test_a.py", ["redis_url", "redis_process"], True, None),
        ("integration/test_a.py", ["kafka"], False, "without the marker"),
        ("integration/test_a.py", ["tmp_path"], False, "without the marker"),
        ("unit/test_a.py", ["redis_url", "redis_process"], False, "redis_process, redis_url"),
        ("unit/test_a.py", ["kafka"], True, "must not start services"),
        ("unit/test_a.py", [], True, "lives in tests/unit"),
        ("test_a.py", ["redis_process"], False, "without the integration marker"),
        ("test_a.py", ["redis_process"], True, None),
    ],
)
def test_layout_rule(where: str, fixtures: list[str], marked: bool, complaint: str | None) -> None:
    problem = layout_problem(PurePath(where), fixtures, marked)
    if complaint is None:
        assert problem is None
    else:
        assert problem is not None and complaint in problem


def test_collection_stops_on_a_misplaced_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook in tests/conftest.py applies the rule to every collected test."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # a bare pytest is enough
    pytester.makeini("[pytest]\nmarkers = integration: real services\n")
    pytester.makeconftest(
        """
import pytest
from tests.conftest import pytest_collection_modifyitems  # the hook under test

@pytest.fixture
def redis_url() -> str:
    return "redis://stand-in"
"""
    )
    unit = pytester.mkdir("tests") / "unit"
    integration = pytester.path / "tests" / "integration"
    unit.mkdir()
    integration.mkdir()
    (unit / "test_pure.py").write_text("def test_pure():\n    pass\n")
    (unit / "test_redis.py").write_text("def test_redis(redis_url):\n    pass\n")
    (integration / "test_unmarked.py").write_text("def test_unmarked():\n    pass\n")

    broken = pytester.runpytest("-m", "not integration")
    assert broken.ret == pytest.ExitCode.USAGE_ERROR
    broken.stderr.fnmatch_lines(
        [
            "*test layout rule broken:*",
            "*tests/integration/test_unmarked.py::test_unmarked: *without the marker*",
            "*tests/unit/test_redis.py::test_redis: tests/unit must not start services*",
        ]
    )

    moved = integration / "test_redis.py"
    moved.write_text(
        "import pytest\npytestmark = pytest.mark.integration\n\n"
        + (unit / "test_redis.py").read_text()
    )
    (unit / "test_redis.py").unlink()
    (integration / "test_unmarked.py").write_text(
        "import pytest\npytestmark = pytest.mark.integration\n\ndef test_unmarked():\n    pass\n"
    )
    fixed = pytester.runpytest("-m", "not integration")
    fixed.assert_outcomes(passed=1, deselected=2)
