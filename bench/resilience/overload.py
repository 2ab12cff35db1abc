"""Overload figures: offered load at 2x measured capacity, then stalled ScoreStreams.

Against a ``streamscore serve`` subprocess (server pinned to core 0, this client to
core 1) serving a linear model made slow on purpose (``slow_layers``, run on the
worker thread) so the server, not the client, is the bottleneck:

1. capacity: closed loop, ``--callers`` callers, OK answers per second;
2. open loop at 0.8x capacity: p99 of the answers (from the intended send time);
3. open loop at 2x capacity for ``--overload-s``: p99 of the accepted answers (ratio to
   step 2), RESOURCE_EXHAUSTED answers and their p99 (refused at once?), the server's
   RSS sampled every second (flat?);
4. ``--streams`` ScoreStreams that each send more than ``stream_max_in_flight`` requests
   (set to ``--stream-in-flight``, 32: the server scores every item it reads, so the
   product default 256 x 1,000 streams would be ~10 min of this model's work) and never
   read: the server's RSS growth against the configured bound (streams x
   ``stream_buffer_bytes``), and the p99 of other callers (own connections) while the
   streams are held vs just before.

    python -m bench.resilience.overload --json-out bench/results/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, taskset_available, taskset_prefix
from bench.resilience.fuzz import rss_kb, serve
from protos.streamscore.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

MODEL = "slow"
FEATURES = tuple(f"f{i}" for i in range(8))
SCORE = "/streamscore.v1.Scoring/Score"
SCORE_STREAM = "/streamscore.v1.Scoring/ScoreStream"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.name


@dataclass
class Phase:
    """Answers of one phase: latencies (s) by status name, and RSS samples (KiB)."""

    name: str
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    rss_kb: list[int] = field(default_factory=list)
    #: Open loop: how late each call started against its intended send time (s).
    send_lag: list[float] = field(default_factory=list)
    #: Failed calls by code and message (digits as N): who refused, and why.
    details: Counter[str] = field(default_factory=Counter)

    def add(self, code: str, latency: float) -> None:
        self.latencies.setdefault(code, []).append(latency)

    def note(self, code: str, detail: str) -> None:
        self.details[f"{code}: {re.sub(r'[0-9.]+', 'N', detail)}"] += 1

    def count(self, code: str) -> int:
        return len(self.latencies.get(code, ()))

    def rate(self, code: str = "OK") -> float:
        return self.count(code) / self.seconds

    def p(self, code: str, q: float) -> float:
        """Percentile ``q`` (0-100) of ``code`` latencies in ms (nan when none)."""
        values = self.latencies.get(code)
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "counts": {code: len(v) for code, v in self.latencies.items()},
            "p50_ms": {code: self.p(code, 50) for code in self.latencies},
            "p99_ms": {code: self.p(code, 99) for code in self.latencies},
            "rss_kb": self.rss_kb,
            "send_lag_ms": _lag_summary(self.send_lag),
            "details": dict(self.details.most_common()),
        }


def _lag_summary(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {}
    values = np.asarray(lags) * 1e3
    return {q: float(np.percentile(values, n)) for q, n in (("p50", 50), ("p99", 99))} | {
        "max": float(values.max())
    }


def request_bytes(i: int) -> bytes:
    values = np.linspace(-1, 1, len(FEATURES)) * ((i % 7) + 1)
    message = pb.ScoreRequest(
        model=MODEL,
        request_id=f"r{i}",
        features={n: float(v) for n, v in zip(FEATURES, values, strict=True)},
    )
    return message.SerializeToString()


class Client:
    """Raw-bytes Score calls over a few channels (one TCP connection each)."""

    def __init__(self, target: str, channels: int = 4) -> None:
        self._channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self._score = [
            c.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
            for c in self._channels
        ]
        self._payloads = [request_bytes(i) for i in range(256)]
        self._next = 0

    async def score(
        self, phase: Phase, started: float, deadline_s: float, open_loop: bool = False
    ) -> None:
        """One call; its latency from ``started`` (the intended send time). In an open
        loop the call's send lag (its start minus ``started``) is recorded too."""
        if open_loop:
            phase.send_lag.append(time.perf_counter() - started)
        self._next += 1
        method = self._score[self._next % len(self._score)]
        try:
            await method(self._payloads[self._next % len(self._payloads)], timeout=deadline_s)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            phase.note(code, error.details() or "")
        phase.add(code, time.perf_counter() - started)

    def channel(self, i: int) -> grpc.aio.Channel:
        return self._channels[i % len(self._channels)]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


async def _sample_rss(pid: int, phase: Phase, every_s: float = 1.0) -> None:
    while True:
        phase.rss_kb.append(rss_kb(pid))
        await asyncio.sleep(every_s)


async def closed_loop(client: Client, name: str, callers: int, seconds: float) -> Phase:
    """``callers`` callers each calling back to back for ``seconds``."""
    phase = Phase(name, seconds)
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            await client.score(phase, time.perf_counter(), 10.0)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return phase


async def open_loop(
    client: Client, name: str, rate: float, seconds: float, pid: int, deadline_s: float = 10.0
) -> Phase:
    """Calls sent on a fixed schedule of ``rate``/s for ``seconds``, whatever the answers;
    latency counts from each call's intended send time."""
    phase = Phase(name, seconds)
    sampler = asyncio.create_task(_sample_rss(pid, phase))
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    total = int(rate * seconds)
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            task = asyncio.create_task(client.score(phase, start + sent / rate, deadline_s, True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    if tasks:
        await asyncio.wait(tasks)
    sampler.cancel()
    phase.rss_kb.append(rss_kb(pid))
    return phase


async def stalled_streams(
    client: Client, streams: int, per_stream: int
) -> tuple[list[grpc.aio.StreamStreamCall[bytes, bytes]], int]:
    """Open ``streams`` ScoreStreams that send ``per_stream`` requests each and never
    read; returns the calls (cancel them to end) and the requests the server took."""
    calls: list[grpc.aio.StreamStreamCall[bytes, bytes]] = []
    written = 0

    async def fill(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> int:
        done = 0
        payload = request_bytes(done)
        for _ in range(per_stream):
            try:
                await asyncio.wait_for(call.write(payload), timeout=2.0)
            except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break  # the server stopped reading (flow control): the stream is stalled
            done += 1
        return done

    for i in range(streams):
        method = client.channel(i).stream_stream(
            SCORE_STREAM, request_serializer=None, response_deserializer=None
        )
        calls.append(method(None, timeout=600))
    results = await asyncio.gather(*(fill(c) for c in calls))
    written = sum(results)
    return calls, written


async def _streams_phase(
    client: Client, target: str, pid: int, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Stalled ScoreStreams: the server's RSS with them held, and other callers."""
    await asyncio.sleep(2.0)
    # Other callers have their own connections (a client that stalls streams on
    # its connection exhausts that connection's HTTP/2 window: its own loss).
    others = Client(target, channels=2)
    others_before = await closed_loop(others, "others before", 8, args.others_s)
    rss_before_streams = rss_kb(pid)
    calls, taken = await stalled_streams(client, args.streams, args.per_stream)
    # The server scores up to stream_in_flight items per stream, then holds the
    # answers: wait until that work is done before measuring the other callers.
    await asyncio.sleep(1.5 * args.streams * args.stream_in_flight / rate + 2.0)
    rss_streams = rss_kb(pid)
    others_during = await closed_loop(others, "others during", 8, args.others_s)
    rss_streams = max(rss_streams, rss_kb(pid))
    for call in calls:
        call.cancel()
    await others.close()
    await asyncio.sleep(2.0)
    rss_released = rss_kb(pid)
    return {
        "streams": args.streams,
        "stream_requests_taken": taken,
        "rss_before_streams_kb": rss_before_streams,
        "rss_with_streams_kb": rss_streams,
        "rss_after_streams_kb": rss_released,
        "stream_bound_bytes": args.streams * args.stream_buffer_bytes,
        "others_before": others_before.summary(),
        "others_during": others_during.summary(),
        "others_p99_ratio": others_during.p("OK", 99) / others_before.p("OK", 99),
        "others_errors": {c: n for c, n in others_during.summary()["counts"].items() if c != "OK"},
        "others_rps_ratio": others_during.rate() / others_before.rate(),
    }


def pct(phase: Phase, code: str = "OK") -> str:
    return f"{phase.p(code, 99):.1f}"


async def run(args: argparse.Namespace, repository: Path, work: Path) -> dict[str, Any]:
    """All phases against one server; the figures as a JSON-able dict."""
    extra = [
        f"models.per_model.{MODEL}.execution=thread",
        f"models.per_model.{MODEL}.max_batch_size={args.max_batch_size}",
        f"models.per_model.{MODEL}.max_queue_size={args.max_queue_size}",
        "traffic_log.sample_rate=0",
        "server.connections.max_connection_age_s=null",
        f"server.limits.stream_max_in_flight={args.stream_in_flight}",
        f"server.limits.stream_buffer_bytes={args.stream_buffer_bytes}",
        *args.set,
    ]
    prefix = taskset_prefix(SERVER_CPUS) if taskset_available() else []
    with serve(repository, work / "server.log", extra, prefix) as (pid, target):
        client = Client(target)
        try:
            await closed_loop(client, "warmup", args.callers, 3.0)
            capacity = await closed_loop(client, "capacity", args.callers, args.capacity_s)
            # A budget that refuses part of a closed loop understates capacity: take it
            # from a run without the budget when given.
            rate = args.capacity_rps or capacity.rate()
            log.info("capacity %.0f/s (p99 %s ms)", rate, pct(capacity))
            light = await open_loop(client, "0.8x", 0.8 * rate, args.light_s, pid)
            log.info("0.8x: %s", light.summary()["counts"])
            await asyncio.sleep(2.0)
            heavy = await open_loop(client, "2x", 2.0 * rate, args.overload_s, pid)
            log.info("2x: %s", heavy.summary()["counts"])
            streams = await _streams_phase(client, target, pid, rate, args) if args.streams else {}
        finally:
            await client.close()
    return {
        "capacity_rps": rate,
        "capacity": capacity.summary(),
        "light": light.summary(),
        "overload": heavy.summary(),
        "accepted_p99_ratio": heavy.p("OK", 99) / light.p("OK", 99),
        "overload_ok_rps": heavy.rate(),
        "overload_rejected_share": heavy.count(EXHAUSTED)
        / max(1, sum(len(v) for v in heavy.latencies.values())),
        "streams": streams,
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_size": args.max_queue_size,
            "slow_layers": args.slow_layers,
            "set": args.set,
            "capacity_given": args.capacity_rps is not None,
        },
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    """The RESULTS.md lines of one run."""
    light, heavy = figures["light"], figures["overload"]
    rss = heavy["rss_kb"]
    lines = [
        "```sh",
        command,
        "```",
        "",
        f"capacity {figures['capacity_rps']:.0f} req/s "
        f"({'given' if figures['settings'].get('capacity_given') else 'closed loop'}); "
        f"max_queue_size {figures['settings']['max_queue_size']}, "
        f"max_batch_size {figures['settings']['max_batch_size']}"
        + "".join(f", {s}" for s in figures["settings"]["set"]),
        "",
        "| phase | OK/s | OK p99 ms | RESOURCE_EXHAUSTED | its p50 / p99 ms | other codes "
        "| send lag p50 / p99 / max ms |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        *(_row(name, p) for name, p in (("0.8x", light), ("2x", heavy))),
        "",
        f"accepted p99 at 2x / p99 at 0.8x: **{figures['accepted_p99_ratio']:.2f}** "
        f"(target <= 3); RSS during 2x: {min(rss) / _MIB:.1f} .. {max(rss) / _MIB:.1f} MiB "
        f"({len(rss)} samples).",
    ]
    for name, p in (("0.8x", light), ("2x", heavy)):
        if p["details"]:
            lines += ["", f"{name} failures by message: {p['details']}"]
    if figures["streams"]:
        lines += ["", _streams_line(figures["streams"])]
    return "\n".join(lines)


_MIB = 1024


def _row(name: str, p: dict[str, Any]) -> str:
    other = ", ".join(f"{c} {n}" for c, n in p["counts"].items() if c not in ("OK", EXHAUSTED))
    lag = p["send_lag_ms"]
    return (
        f"| {name} | {p['counts'].get('OK', 0) / p['seconds']:.0f} | "
        f"{p['p99_ms'].get('OK', float('nan')):.1f} | {p['counts'].get(EXHAUSTED, 0):,} | "
        f"{p['p50_ms'].get(EXHAUSTED, float('nan')):.1f} / "
        f"{p['p99_ms'].get(EXHAUSTED, float('nan')):.1f} | {other or '-'} | "
        f"{lag['p50']:.1f} / {lag['p99']:.1f} / {lag['max']:.1f} |"
    )


def _streams_line(f: dict[str, Any]) -> str:
    return (
        f"{f['streams']:,} stalled ScoreStreams ({f['stream_requests_taken']:,} "
        f"requests sent, none read): RSS {f['rss_before_streams_kb'] / _MIB:.1f} -> "
        f"{f['rss_with_streams_kb'] / _MIB:.1f} MiB "
        f"(+{(f['rss_with_streams_kb'] - f['rss_before_streams_kb']) / _MIB:.1f}"
        f" MiB; configured bound {f['stream_bound_bytes'] / 2**20:,.0f} MiB), "
        f"{f['rss_after_streams_kb'] / _MIB:.1f} MiB after they are cancelled; other "
        f"callers (8, closed loop) p99 during / before: {f['others_p99_ratio']:.2f}, "
        f"req/s during / before: {f['others_rps_ratio']:.2f}, errors during: "
        f"{f['others_errors'] or 'none'}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--callers", type=int, default=32, help="closed-loop callers measuring capacity")
    add("--capacity-s", type=float, default=10.0)
    add("--light-s", type=float, default=20.0)
    add("--overload-s", type=float, default=60.0)
    add("--others-s", type=float, default=8.0)
    add("--streams", type=int, default=1000, help="stalled ScoreStreams (0: skip that phase)")
    add("--per-stream", type=int, default=100, help="requests each stalled stream sends")
    add("--max-batch-size", type=int, default=8)
    add("--max-queue-size", type=int, default=1024)
    add("--slow-layers", type=int, default=40)
    add("--stream-buffer-bytes", type=int, default=1 << 20, help="server.limits setting")
    add("--stream-in-flight", type=int, default=32, help="server.limits.stream_max_in_flight")
    add("--capacity-rps", type=float, help="use this capacity instead of the measured one")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting")
    add("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if taskset_available():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(CLIENT_CPUS))
    from tests.support.model_factory import write_linear_model  # dev-only helper

    with tempfile.TemporaryDirectory(prefix="overload-") as scratch:
        work = Path(scratch)
        repository = work / "models"
        write_linear_model(
            repository, MODEL, "1", list(FEATURES), seed=1, slow_layers=args.slow_layers
        )
        figures = asyncio.run(run(args, repository, work))
    command = "python -m bench.resilience.overload " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    sys.stdout.write(markdown(figures, command) + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
