"""What drift monitoring adds to a lone caller's answer, in process (no gRPC, no client).

One event loop runs a real micro-batcher, batch runner and ONNX model of a version
(idle fast path on, as in the server) and, with ``--mode on``, the drift monitor of
the server (its flush/evaluate task included, against a private Redis on core 1).
A lone caller submits one row, measures the wall time until ``submit`` returns (its
answer), then leaves ``--gap-us`` for the network and client (the loop idles meanwhile,
like a server between one caller's requests). Modes alternate ``--repeats`` times;
per mode it prints the answer-time percentiles, how many answers took over
``--slow-us`` (the requests some drift work -- a fold, a flush, an evaluation -- landed
on) and the loop thread's CPU time per request (``time.thread_time``: drift's own task
and its Redis calls included; other processes on the core do not count in it).
Pin it like the server::

    taskset -c 0 .venv/bin/python -m bench.drift_answer_path --version-dir /tmp/models/fraud/2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from bench.pinning import CLIENT_CPUS
from devstack.services import redis_server
from server.batcher import BatchPolicy, MicroBatcher
from server.drift.metrics import DriftMetrics
from server.drift.monitor import DriftMonitor
from server.executor import Job, JobResult, VersionBatchRunner
from server.features import FeatureLayout
from server.manifest import ModelManifest
from server.runtime import RuntimeOptions, load_version
from server.settings import DriftSettings


async def run_mode(
    mode: str, version_dir: Path, redis_url: str, requests: int, gap_s: float
) -> tuple[list[int], int]:
    """Answer times (ns) of ``requests`` lone requests with drift ``mode`` ("on"/"off"),
    and the loop thread's CPU time (ns) over them (drift's task and Redis calls included)."""
    manifest = ModelManifest.read(version_dir)
    model = load_version(version_dir, RuntimeOptions())
    client = Redis.from_url(redis_url)
    monitor = DriftMonitor(
        DriftSettings(), client, DriftMetrics(CollectorRegistry()), clock=time.time
    )
    drift = monitor.attach(version_dir, manifest, manifest.features) if mode == "on" else None
    if mode == "on" and drift is None:
        raise SystemExit(f"no usable reference profile in {version_dir}")
    runner = VersionBatchRunner(
        model,
        FeatureLayout.from_manifest(manifest),
        None,
        "degrade",
        on_batch=drift.observe if drift is not None else None,
    )
    batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
        "bench", runner.run, BatchPolicy(), run_now=runner.run_now
    )
    rows = np.random.default_rng(1).normal(size=(4096, len(manifest.features))).astype(np.float32)
    jobs = [Job(rows=rows[i : i + 1]) for i in range(rows.shape[0])]
    times: list[int] = []
    if drift is not None:
        await monitor.start()
    cpu_started = time.thread_time_ns()
    try:
        for i in range(requests):
            started = time.perf_counter_ns()
            await batcher.submit(jobs[i % len(jobs)])
            times.append(time.perf_counter_ns() - started)
            await asyncio.sleep(gap_s)
        cpu_ns = time.thread_time_ns() - cpu_started
    finally:
        if drift is not None:
            await monitor.stop()
        await batcher.close()
        model.close()
        await client.aclose()
    return times, cpu_ns


def summary(times: list[int], cpu_ns: int, slow_us: float) -> dict[str, Any]:
    us = np.asarray(times, np.float64) / 1000
    return {
        "requests": int(us.size),
        "cpu_us_per_request": round(cpu_ns / 1000 / us.size, 2),
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "p99.9_us": round(float(np.percentile(us, 99.9)), 1),
        "max_us": round(float(us.max()), 1),
        "slow": int((us > slow_us).sum()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_answer_path", description=__doc__)
    parser.add_argument("--version-dir", type=Path, default=Path("models/fraud/2"))
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--gap-us", type=float, default=300.0)
    parser.add_argument("--slow-us", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with redis_server() as redis:
        os.sched_setaffinity(redis.process.pid, set(CLIENT_CPUS))
        for repeat in range(args.repeats):
            for mode in ("off", "on"):
                times, cpu_ns = asyncio.run(
                    run_mode(mode, args.version_dir, redis.url, args.requests, args.gap_us / 1e6)
                )
                row = summary(times, cpu_ns, args.slow_us)
                results[mode].append(row)
                print(f"drift {mode} #{repeat + 1}: {json.dumps(row)}", flush=True)
    for mode, rows in results.items():
        medians = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "requests"}
        print(f"drift {mode}, median of {len(rows)}: {json.dumps(medians)}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json_out.write_text(json.dumps({"args": given, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
