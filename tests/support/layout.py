"""The test layout rule: what starts a service is marked ``integration`` and lives in
``tests/integration``; ``tests/unit`` needs no server, Redis or broker.

``tests/conftest.py`` applies :func:`layout_problem` to every collected test, and
``tests/unit/test_layout.py`` checks the unit modules' source for services started
without a fixture, so ``pytest -m "not integration"`` keeps running without any.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath

#: Shared fixtures that start (or depend on) a real service. Fixtures that use them
#: are caught too: pytest lists a test's whole fixture closure.
SERVICE_FIXTURES = frozenset({"redis_process", "redis_url", "kafka"})

#: Names that start a service when imported into a test module.
SERVICE_STARTERS = frozenset(
    {
        "redis_server",
        "kafka_broker",
        "RedisServer",
        "KafkaBroker",
        "running_server",
        "admin_server",
        "RunningServer",
        "AdminServer",
    }
)

#: Modules whose import means a test runs a server.
SERVICE_MODULES = frozenset({"tests.support.server", "tests.support.admin"})

#: Dotted calls that start a server or a long-running child process.
SERVICE_CALLS = frozenset(
    {
        "grpc.server",
        "grpc.aio.server",
        "asyncio.create_subprocess_exec",
        "asyncio.create_subprocess_shell",
        "subprocess.Popen",
    }
)

INTEGRATION = "integration"
UNIT = "unit"


def layout_problem(
    relative: PurePath, fixtures: Iterable[str], marked_integration: bool
) -> str | None:
    """Why a test at ``relative`` (to ``tests/``) breaks the rule, or None when it keeps it."""
    services = sorted(SERVICE_FIXTURES.intersection(fixtures))
    area = relative.parts[0] if len(relative.parts) > 1 else ""
    if area == UNIT and services:
        return (
            f"tests/unit must not start services, but it uses fixture(s) {', '.join(services)}:"
            " move the module to tests/integration (git mv) and mark it integration"
        )
    if area == UNIT and marked_integration:
        return "is marked integration but lives in tests/unit: move it to tests/integration"
    if area == INTEGRATION and not marked_integration:
        return (
            "lives in tests/integration without the marker:"
            " add pytestmark = pytest.mark.integration"
        )
    if services and not marked_integration:
        return f"uses fixture(s) {', '.join(services)} without the integration marker"
    return None
