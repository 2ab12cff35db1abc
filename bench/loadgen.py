"""gRPC load generator for streamscore (and the floor server): closed or open loop.

Examples (server on core 0, client on core 1, see ``bench.pinning``)::

    taskset -c 1 python -m bench.loadgen --target 127.0.0.1:50051 --api score \\
        --concurrency 16 --duration 30 --warmup 5 --manifest models/fraud/1
    taskset -c 1 python -m bench.loadgen --api stream --concurrency 4 --stream-window 8
    taskset -c 1 python -m bench.loadgen --api v2 --v2-rows 32 --v2-raw --connections 2
    taskset -c 1 python -m bench.loadgen --api score --concurrency 64 --tls-ca ca.pem
    taskset -c 1 python -m bench.loadgen --api score --rate 2000 --max-outstanding 512 \\
        --deadline-ms 50 --json-out result.json

A human summary goes to stderr; the JSON document (see ``bench.config``) to stdout or
``--json-out``. The run always ends by itself after warmup + duration (+ drain timeout).
In-process use: ``result = await run_load(LoadConfig(...))``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.callers import MODEL_INFER_METHOD, SCORE_METHOD, Caller, StreamCaller, UnaryCaller
from bench.config import APIS, LoadConfig, LoadResult
from bench.drivers import Recorder, Window, closed_loop, open_loop
from bench.payloads import PayloadSpec, PoolItem, infer_pool, score_pool
from server.clients.channels import add_tls_arguments, aio_channel
from server.clients.histogram import LatencySummary

logger = logging.getLogger(__name__)

_UNLIMITED = -1
#: Cap on pre-generated v2 tensor values (float32): 32 MiB.
_MAX_V2_POOL_VALUES = 1 << 23


def channel_options(index: int) -> list[tuple[str, Any]]:
    """Options of the ``index``-th client channel: its own TCP connection (a local
    subchannel pool plus a distinct arg; by default gRPC shares one connection among
    identical channels) and no message size limits."""
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.streamscore_bench_channel", index),
        ("grpc.max_send_message_length", _UNLIMITED),
        ("grpc.max_receive_message_length", _UNLIMITED),
    ]


def payload_spec(config: LoadConfig) -> PayloadSpec:
    """The features to send: from ``config.manifest`` or the demo set."""
    if config.manifest is None:
        return PayloadSpec.demo()
    return PayloadSpec.from_manifest(Path(config.manifest))


def build_pool(config: LoadConfig, spec: PayloadSpec) -> list[PoolItem]:
    """Pre-generate and serialise ``config.pool_size`` requests for ``config.api``."""
    if config.api == "v2":
        values_per_request = config.v2_rows * len(spec.features)
        size = min(config.pool_size, max(16, _MAX_V2_POOL_VALUES // values_per_request))
        if size < config.pool_size:
            logger.info("v2 request pool capped at %d requests to bound memory", size)
        return infer_pool(
            spec,
            model=config.model,
            model_version=config.model_version,
            size=size,
            seed=config.seed,
            rows=config.v2_rows,
            raw=config.v2_raw,
        )
    return score_pool(
        spec,
        model=config.model,
        model_version=config.model_version,
        size=config.pool_size,
        seed=config.seed,
        request_features=config.request_features,
        entities=config.entities,
        entity_cardinality=config.entity_cardinality,
    )


async def _wait_ready(channels: Sequence[grpc.aio.Channel], config: LoadConfig) -> None:
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
    except TimeoutError:
        raise ConnectionError(
            f"could not connect to {config.target} within {config.connect_timeout_s}s"
        ) from None


def _callers(
    config: LoadConfig, channels: Sequence[grpc.aio.Channel]
) -> tuple[list[Caller], list[Caller]]:
    """(distinct callers to close, one entry per concurrent worker or open-loop target)."""
    deadline_s = None if config.deadline_ms is None else config.deadline_ms / 1000
    if config.api == "stream":
        count = config.concurrency if config.mode == "closed" else len(channels)
        streams: list[Caller] = [
            StreamCaller(channels[i % len(channels)], deadline_s) for i in range(count)
        ]
        if config.mode == "open":
            return streams, streams
        return streams, [s for s in streams for _ in range(config.stream_window)]
    method = SCORE_METHOD if config.api == "score" else MODEL_INFER_METHOD
    unary: list[Caller] = [UnaryCaller(channel, method, deadline_s) for channel in channels]
    if config.mode == "open":
        return unary, unary
    return unary, [unary[i % len(unary)] for i in range(config.concurrency)]


def _environment() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "event_loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        "cpu_affinity": affinity,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "platform": platform.platform(),
        "pid": os.getpid(),
    }


async def run_load(config: LoadConfig) -> LoadResult:
    """Run one load test as configured and return what was measured.

    Raises ``ConnectionError`` if the target is not reachable within
    ``config.connect_timeout_s``. RPC failures during the run are counted, not raised.
    """
    spec = payload_spec(config)
    items = itertools.cycle(build_pool(config, spec))
    channels = [
        aio_channel(config.target, config.client_tls(), channel_options(i))
        for i in range(config.connections)
    ]
    rec = Recorder(open_loop=config.mode == "open")
    try:
        await _wait_ready(channels, config)
        owned, workers = _callers(config, channels)
        window = Window.starting_now(config.warmup_s, config.duration_s, config.drain_timeout_s)
        started_at = datetime.now(UTC) + timedelta(seconds=config.warmup_s)
        try:
            if config.rate is None:
                await closed_loop(workers, items, rec, window)
            else:
                await open_loop(
                    workers,
                    items,
                    rec,
                    window,
                    rate=config.rate,
                    max_outstanding=config.max_outstanding,
                    late_threshold_ms=config.late_threshold_ms,
                )
        finally:
            await asyncio.gather(*(caller.aclose() for caller in owned))
        environment = _environment()
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
    return LoadResult(
        config=config,
        payload=spec,
        started_at=started_at.isoformat(timespec="milliseconds"),
        duration_s=config.duration_s,
        sent=rec.sent,
        ok=rec.ok,
        window_ok=rec.window_ok,
        errors=dict(rec.errors),
        late=rec.late,
        skipped=rec.skipped,
        unfinished=rec.in_flight,
        latency=rec.latency.summary(),
        service_latency=rec.service_latency.summary(),
        send_lag=None if rec.send_lag is None else rec.send_lag.summary(),
        latency_hdr=rec.latency.encode(),
        environment=environment,
    )


def _fmt_latency(label: str, summary: LatencySummary) -> str:
    return (
        f"{label:<16} p50={summary.p50_us} p90={summary.p90_us} p99={summary.p99_us} "
        f"p99.9={summary.p999_us} max={summary.max_us} mean={summary.mean_us:.0f} "
        f"(n={summary.count})"
    )


def format_summary(result: LoadResult) -> str:
    """Multi-line human summary of a result (latencies in microseconds)."""
    cfg = result.config
    shape = f"rate={cfg.rate:g}/s" if cfg.rate is not None else f"concurrency={cfg.concurrency}"
    lines = [
        f"{cfg.api} {cfg.mode} loop -> {cfg.target} model={cfg.model}"
        f"{':' + cfg.model_version if cfg.model_version else ''} {shape} "
        f"connections={cfg.connections} duration={cfg.duration_s:g}s warmup={cfg.warmup_s:g}s",
        f"sent={result.sent} ok={result.ok} window_ok={result.window_ok} "
        f"errors={dict(result.errors) or 0} "
        f"late={result.late} skipped={result.skipped} unfinished={result.unfinished}",
        f"throughput       {result.throughput_rps:.1f} ok/s"
        + (f" ({result.rows_per_s:.1f} rows/s)" if cfg.api == "v2" else ""),
        _fmt_latency("latency us", result.latency),
    ]
    if result.send_lag is not None:
        lines.append(_fmt_latency("service us", result.service_latency))
        lines.append(_fmt_latency("send lag us", result.send_lag))
    if result.skipped:
        lines.append(
            f"WARNING: {result.skipped} scheduled requests were never sent "
            "(max outstanding full): the target cannot sustain this rate"
        )
    return "\n".join(lines)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m bench.loadgen``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="gRPC load generator (closed loop by default; --rate for open loop).",
    )
    d = LoadConfig()
    p.add_argument("--target", default=d.target, help="host:port (default %(default)s)")
    p.add_argument("--api", choices=APIS, default=d.api)
    p.add_argument("--model", default=d.model)
    p.add_argument("--model-version", default=d.model_version)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="closed-loop callers")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    p.add_argument("--max-outstanding", type=int, default=d.max_outstanding)
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds measured")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="seconds not measured")
    p.add_argument("--connections", type=int, default=d.connections, help="gRPC channels")
    p.add_argument("--stream-window", type=int, default=d.stream_window)
    p.add_argument("--v2-rows", type=int, default=d.v2_rows)
    p.add_argument("--v2-raw", action="store_true", help="send raw_input_contents")
    p.add_argument("--deadline-ms", type=float, default=None)
    p.add_argument("--manifest", default=None, help="manifest.json or its version directory")
    p.add_argument("--request-features", type=_csv, default=None, help="comma list to send")
    p.add_argument("--entities", type=_csv, default=d.entities, help="comma list")
    p.add_argument("--entity-cardinality", type=int, default=d.entity_cardinality)
    p.add_argument("--pool-size", type=int, default=d.pool_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s)
    p.add_argument("--late-threshold-ms", type=float, default=d.late_threshold_ms)
    p.add_argument("--json-out", type=Path, default=None, help="write JSON here, not stdout")
    add_tls_arguments(p)
    p.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="rerun the config of a result JSON (the other load options are ignored)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Map parsed CLI arguments onto a ``LoadConfig`` (raises ``ValueError`` if invalid)."""
    return LoadConfig(
        target=args.target,
        api=args.api,
        model=args.model,
        model_version=args.model_version,
        concurrency=args.concurrency,
        rate=args.rate,
        max_outstanding=args.max_outstanding,
        duration_s=args.duration,
        warmup_s=args.warmup,
        connections=args.connections,
        stream_window=args.stream_window,
        v2_rows=args.v2_rows,
        v2_raw=args.v2_raw,
        deadline_ms=args.deadline_ms,
        manifest=args.manifest,
        request_features=args.request_features,
        entities=args.entities,
        entity_cardinality=args.entity_cardinality,
        pool_size=args.pool_size,
        seed=args.seed,
        drain_timeout_s=args.drain_timeout,
        connect_timeout_s=args.connect_timeout,
        late_threshold_ms=args.late_threshold_ms,
        tls_ca=None if args.tls_ca is None else str(args.tls_ca),
        tls_cert=None if args.tls_cert is None else str(args.tls_cert),
        tls_key=None if args.tls_key is None else str(args.tls_key),
        tls_server_name=args.tls_server_name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 1 if nothing succeeded, 2 on bad arguments."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.replay is not None:
            config = LoadConfig.from_json(json.loads(args.replay.read_text())["config"])
        else:
            config = config_from_args(args)
    except (ValueError, TypeError, KeyError, OSError) as error:
        parser.error(str(error))
    try:
        result = uvloop.run(run_load(config))
    except ConnectionError as error:
        logger.error("%s", error)
        return 1
    logger.info("%s", format_summary(result))
    document = json.dumps(result.to_json(), indent=2)
    if args.json_out is None:
        sys.stdout.write(document + "\n")
    else:
        args.json_out.write_text(document + "\n")
    return 0 if result.ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
