"""What a refusal costs a grpc.aio server, against an answered call (one core each side).

A bare grpc.aio server (pinned to core 0) with one unary method, four ways, each
measured by a closed loop of 64 callers on core 1 (calls/s, all answered one way):

* ``ok``: the handler answers 2 bytes at once (the floor of an *answered* call);
* ``abort``: the handler refuses at entry (``context.abort(RESOURCE_EXHAUSTED)``);
* ``interceptor``: a server interceptor refuses before the method handler is looked up
  (the earliest point Python code can run for a call);
* ``core``: the event loop is kept blocked and ``grpc.server.max_pending_requests_hard_limit``
  is 1, so gRPC core refuses every call itself (CANCELLED) without any Python.

Each also reports the server's CPU time per call (utime + stime of all its threads over
the loop / calls): the cost that matters when the client, not the server, limits the
rate (``core``).

If a refusal costs at least half an answered call, a process whose event loop is the
bottleneck cannot shed 2x its capacity in Python: at 2x, answering x and refusing the
rest costs ``x/C + (2C - x) * r`` core-seconds per second, which exceeds 1 for every
x > 0 once ``r >= 1/(2C)``.

    python -m bench.resilience.refusal_cost --json-out bench/results/refusal_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, taskset_available, taskset_prefix

METHOD = "/t.T/M"
KINDS = ("ok", "abort", "interceptor", "core")
REPO_ROOT = Path(__file__).resolve().parents[2]

Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


async def _ok(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b"ok"


async def _abort(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    raise AssertionError("abort returned")


class _Refuse(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call before its method handler is looked up."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        return grpc.unary_unary_rpc_method_handler(_abort)


async def _serve(kind: str) -> None:
    handler: Handler = _abort if kind == "abort" else _ok
    generic = grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
    )
    options = []
    if kind == "core":
        options = [
            ("grpc.server.max_pending_requests", 0),
            ("grpc.server.max_pending_requests_hard_limit", 1),
        ]
    server = grpc.aio.server(
        interceptors=[_Refuse()] if kind == "interceptor" else None, options=options
    )
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    if kind == "core":
        await asyncio.sleep(0.5)  # the client has connected (channel ready) by then
        time.sleep(3600)  # noqa: ASYNC251 (the point: no Python runs; core refuses)
    await server.wait_for_termination()


async def _load(port: int, seconds: float, callers: int = 64) -> tuple[float, Counter[str]]:
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(4)
    ]
    methods = [
        c.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for c in channels
    ]
    codes: Counter[str] = Counter()
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                await methods[i % len(methods)](b"x" * 60, timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    for channel in channels:
        await channel.close(None)
    return sum(codes.values()) / seconds, codes


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(kind: str, seconds: float) -> tuple[float, dict[str, int], float]:
    """Calls/s, codes, and the server's CPU time per call (µs) of one closed loop."""
    prefix = taskset_prefix(SERVER_CPUS) if taskset_available() else []
    argv = [*prefix, sys.executable, "-m", "bench.resilience.refusal_cost", "--serve", kind]
    process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        if kind == "core":  # connect before the server blocks its loop
            asyncio.run(_load(port, 0.2, callers=1))
            time.sleep(0.5)
        else:
            asyncio.run(_load(port, 1.0))  # warm-up
        cpu_before = _cpu_seconds(process.pid)
        rate, codes = asyncio.run(_load(port, seconds))
        cpu = _cpu_seconds(process.pid) - cpu_before
    finally:
        process.kill()
        process.wait()
    return rate, dict(codes), 1e6 * cpu / max(1.0, rate * seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    if taskset_available():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(CLIENT_CPUS))
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            rate, codes, cpu_us = _measure(kind, args.seconds)
            runs[kind].append(
                {"calls_per_s": round(rate), "server_cpu_us_per_call": cpu_us, "codes": codes}
            )
            sys.stdout.write(
                f"{kind:12s} {rate:8.0f} calls/s, server CPU {cpu_us:6.1f} us/call {codes}\n"
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
