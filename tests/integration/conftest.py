"""Integration-test diagnostics: what every asyncio task awaits when a test hangs.

pytest-timeout prints thread stacks, which for an asyncio test show only the loop
idling in ``select``. A few seconds before the timeout this fixture logs, from inside
the test's loop, the stack of every pending task, so a hang names the await it is
stuck on.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator

import pytest

#: Dump this many seconds before pytest-timeout fails the test.
_DUMP_AHEAD_S = 10.0


def _timeout_of(request: pytest.FixtureRequest) -> float | None:
    marker = request.node.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = request.config.getini("timeout")
    return float(value) if value else None


def _dump_tasks(name: str) -> None:
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    out.write(f"\n=== {name}: {len(tasks)} pending asyncio task(s) before timeout ===\n")
    for task in tasks:
        out.write(f"--- {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=12, file=out)
    sys.stderr.write(out.getvalue())


@pytest.fixture(autouse=True)
async def _dump_tasks_before_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    timeout = _timeout_of(request)
    if not timeout or timeout <= _DUMP_AHEAD_S * 2:
        yield
        return
    loop = asyncio.get_running_loop()
    handle = loop.call_later(timeout - _DUMP_AHEAD_S, _dump_tasks, request.node.nodeid)
    try:
        yield
    finally:
        handle.cancel()
