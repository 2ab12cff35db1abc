"""``streamscore stream``: the stream worker's one command line.

Addresses and shared knobs come from the settings (``--config``/``--set``/env):
``kafka.bootstrap_servers``, ``kafka.group_id``, ``kafka.fetch_max_wait_ms``,
``redis.url``, ``features.definitions_path`` and ``logging.*``. The flags below tune
the worker itself (:class:`feature_streams.stream_job.WorkerConfig`).

SIGTERM/SIGINT stop consuming, apply and commit what was read, and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from feature_streams.definitions import FeatureDefinitions
from feature_streams.redis_client import RedisModeMismatchError
from feature_streams.stream_job import WorkerConfig, serve
from server.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["add_stream_arguments", "run_stream", "worker_config"]


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's own flags, added to the ``stream`` subcommand."""
    defaults = WorkerConfig(bootstrap_servers="", redis_url="")
    add = parser.add_argument
    add("--metrics-port", type=int, default=None, help="serve /metrics here (0: any free port)")
    add("--metrics-host", default=defaults.metrics_host, help="address of /metrics")
    add("--stream-group", action="append", default=[], help="only this stream group; repeatable")
    add("--commit-interval-s", type=float, default=defaults.commit_interval_s)
    add("--max-batch-records", type=int, default=defaults.max_batch_records)
    add("--session-timeout-ms", type=int, default=defaults.session_timeout_ms)
    add("--heartbeat-interval-ms", type=int, default=defaults.heartbeat_interval_ms)
    add("--trim-interval-s", type=float, default=defaults.trim_interval_s)
    add(
        "--redis-timeout-s",
        type=float,
        default=defaults.redis_timeout_s,
        help="socket connect and read timeout of every Redis call (> 0)",
    )
    add(
        "--max-events-per-call",
        type=int,
        default=defaults.max_events_per_call,
        help="events of one key per apply-script call; a hot key's backlog is chunked (>= 1)",
    )
    add(
        "--script-retries",
        type=int,
        default=defaults.script_retries,
        help="attempts of a key batch whose script call failed before its records go to "
        "the dead-letter topic with the error (>= 1)",
    )
    add(
        "--max-event-ahead-ms",
        type=int,
        default=defaults.max_event_ahead_ms,
        help="dead-letter events this far ahead of the wall clock (negative: no check)",
    )


def worker_config(settings: Settings, args: argparse.Namespace) -> WorkerConfig:
    """The worker's config from settings and the ``stream`` flags (``ValueError`` names
    a bad value)."""
    return WorkerConfig(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        redis_url=settings.redis.url,
        redis_mode=settings.redis.mode,
        group_id=settings.kafka.group_id,
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        stream_groups=tuple(args.stream_group),
        commit_interval_s=args.commit_interval_s,
        max_batch_records=args.max_batch_records,
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        trim_interval_s=args.trim_interval_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_event_ahead_ms=args.max_event_ahead_ms if args.max_event_ahead_ms >= 0 else None,
        redis_timeout_s=args.redis_timeout_s,
        max_events_per_call=args.max_events_per_call,
        script_retries=args.script_retries,
    )


def run_stream(config: WorkerConfig, definitions: FeatureDefinitions) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the exit status."""
    try:
        asyncio.run(serve(config, definitions))
    except RedisModeMismatchError as exc:
        logger.error("%s", exc)  # the one line naming the mismatch
        return exc.exit_code
    return 0
