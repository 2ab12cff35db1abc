"""Process model: N single-threaded server processes sharing one port, drained on SIGTERM.

One process is one core: each runs its own event loop (uvloop by default),
ONNX sessions, batchers and metrics endpoint (``metrics_port + index``). With
``processes > 1`` the parent forks the children before any gRPC object exists
(gRPC forbids forking after it starts) and they share the port through
SO_REUSEPORT. SO_REUSEPORT spreads *connections*, not requests: a caller with a
single channel lands on one process until ``server.connections.max_connection_age_s``
makes it reconnect. SIGHUP re-reads the TLS certificate files (the parent forwards it).
The parent restarts a crashed child with back-off (``server.supervisor``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import uvloop

from feature_streams.redis_client import RedisModeMismatchError
from server.allocator import fix_mmap_threshold, trim_periodically
from server.app import AppContext
from server.logs import configure_logging
from server.settings import Settings
from server.supervisor import RestartCounters, RestartPolicy, Supervisor

logger = logging.getLogger(__name__)


async def serve_until_signalled(
    settings: Settings, process_index: int = 0, restarts: RestartCounters | None = None
) -> None:
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
        context = AppContext(settings, process_index=process_index)
        if restarts is not None:
            context.metrics.registry.register(restarts)
        async with context as app:
            started.append(app)
            interval = settings.server.memory_trim_interval_s
            trimmer = asyncio.create_task(trim_periodically(interval)) if interval else None
            await stop.wait()
            if trimmer is not None:
                trimmer.cancel()
            logger.info("signal received, draining", extra={"process_index": process_index})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def run_process(
    settings: Settings, process_index: int = 0, restarts: RestartCounters | None = None
) -> int:
    """Run one server process to completion; returns its exit code. ``restarts``: the
    supervisor's counters, reported on this process's metrics endpoint."""
    fix_mmap_threshold()  # large buffers unmapped on free (server.allocator)
    runner: Callable[[], asyncio.Runner]
    if settings.server.uvloop:
        runner = lambda: asyncio.Runner(loop_factory=uvloop.new_event_loop)  # noqa: E731
    else:
        runner = asyncio.Runner
    with runner() as loop_runner:
        try:
            loop_runner.run(serve_until_signalled(settings, process_index, restarts))
        except RedisModeMismatchError as exc:
            logger.error("%s", exc)  # the one line naming the mismatch
            return exc.exit_code
    return 0


def serve(settings: Settings) -> int:
    """Entry point of ``streamscore serve``: one process, or a supervising parent and N
    forked children (a crashed child is restarted, see ``server.supervisor``)."""
    configure_logging(settings.logging.level, settings.logging.json_format)
    count = settings.server.processes
    if count == 1:
        return run_process(settings)
    restarts = settings.server.restarts
    counters = RestartCounters(count)
    policy = RestartPolicy(
        restarts.backoff_initial_s, restarts.backoff_max_s, restarts.stable_after_s
    )
    return Supervisor(
        count, lambda index: run_process(settings, index, counters), policy, counters
    ).run()
