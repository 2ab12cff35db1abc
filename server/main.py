"""Process model: N single-threaded server processes sharing one port, drained on SIGTERM.

One process is one core: each runs its own event loop (uvloop by default),
ONNX sessions, batchers and metrics endpoint (``metrics_port + index``). With
``processes > 1`` the parent forks the children before any gRPC object exists
(gRPC forbids forking after it starts) and they share the port through
SO_REUSEPORT. SO_REUSEPORT spreads *connections*, not requests: a caller with a
single channel lands on one process until ``server.connections.max_connection_age_s``
makes it reconnect. SIGHUP re-reads the TLS certificate files (the parent forwards it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

import uvloop

from feature_streams.redis_client import RedisModeMismatchError
from server.app import AppContext
from server.logs import configure_logging
from server.settings import Settings

logger = logging.getLogger(__name__)


async def serve_until_signalled(settings: Settings, process_index: int = 0) -> None:
    """Serve until SIGTERM or SIGINT, then drain (health NOT_SERVING, in-flight finish);
    SIGHUP re-reads the TLS certificates."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started: list[AppContext] = []

    def reload_tls() -> None:  # a SIGHUP while starting must not kill the process
        for app in started:
            app.reload_tls()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    try:
        async with AppContext(settings, process_index=process_index) as app:
            started.append(app)
            await stop.wait()
            logger.info("signal received, draining", extra={"process_index": process_index})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def run_process(settings: Settings, process_index: int = 0) -> int:
    """Run one server process to completion; returns its exit code."""
    runner: Callable[[], asyncio.Runner]
    if settings.server.uvloop:
        runner = lambda: asyncio.Runner(loop_factory=uvloop.new_event_loop)  # noqa: E731
    else:
        runner = asyncio.Runner
    with runner() as loop_runner:
        try:
            loop_runner.run(serve_until_signalled(settings, process_index))
        except RedisModeMismatchError as exc:
            logger.error("%s", exc)  # the one line naming the mismatch
            return exc.exit_code
    return 0


def serve(settings: Settings) -> int:
    """Entry point of ``streamscore serve``: one process, or a parent and N forked children."""
    configure_logging(settings.logging.level, settings.logging.json_format)
    count = settings.server.processes
    if count == 1:
        return run_process(settings)
    children: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = run_process(settings, index)
            finally:
                os._exit(code)
        children.append(pid)
    return _supervise(children)


def _supervise(children: list[int]) -> int:
    """Forward SIGTERM/SIGINT/SIGHUP to the children and wait for all of them."""

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    worst = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            logger.error("server process exited", extra={"pid": pid, "code": code})
        worst = max(worst, abs(code))
    return worst
