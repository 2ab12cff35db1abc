"""Overload figures: offered load at 2x measured capacity, then stalled ScoreStreams.

Against a ``streamscore serve`` subprocess (server pinned to core 0, this client to
core 1) serving a linear model made slow on purpose (``slow_layers``, run on the
worker thread) so the server, not the client, is the bottleneck:

1. capacity: closed loop, ``--callers`` callers, OK answers per second, on a server
   without a queue-wait budget; a full batch's time is ``max_batch_size / capacity``;
2. with ``--budget-batches K`` a second server is started with ``max_queue_wait_ms`` =
   K x that batch time (the rule: the budget is set from the model's measured batch
   time, never tuned per run), and each further pair measures capacity again on a fresh
   server without the budget first; otherwise the same server goes on (re-measuring
   capacity before each pair with ``--recapacity-s``);
3. open loop at 0.8x capacity: p99 of the answers (from the intended send time);
4. open loop at 2x capacity for ``--overload-s``: p99 of the accepted answers (ratio to
   step 3), RESOURCE_EXHAUSTED answers and their p99 (refused at once?), the server's
   RSS sampled every second (flat?); steps 3-4 are repeated ``--repeats`` times on the
   same server, each pair giving its own ratio;
5. ``--streams`` ScoreStreams that each send more than ``stream_max_in_flight`` requests
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
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, taskset_available, taskset_prefix
from bench.resilience.fuzz import free_port, rss_kb, serve
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
    #: The server's own means over the phase (``server_means``).
    server: dict[str, float] = field(default_factory=dict)
    #: OK answers as (intended send time, latency) in s: where in the phase the tail is.
    ok_times: list[tuple[float, float]] = field(default_factory=list)

    def add(self, code: str, latency: float, sent: float | None = None) -> None:
        self.latencies.setdefault(code, []).append(latency)
        if code == "OK" and sent is not None:
            self.ok_times.append((sent, latency))

    def ok_p99_by_slice(self, slices: int = 6) -> list[float]:
        """p99 (ms) of OK answers in each of ``slices`` equal parts of the phase."""
        if not self.ok_times:
            return []
        first = min(t for t, _ in self.ok_times)
        width = self.seconds / slices
        parts: list[list[float]] = [[] for _ in range(slices)]
        for sent, latency in self.ok_times:
            parts[min(slices - 1, int((sent - first) / width))].append(latency)
        return [float(np.percentile(v, 99) * 1e3) if v else float("nan") for v in parts]

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
            "ok_p99_ms_by_slice": self.ok_p99_by_slice(),
            "server": self.server,
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
        phase.add(code, time.perf_counter() - started, started)

    def channel(self, i: int) -> grpc.aio.Channel:
        return self._channels[i % len(self._channels)]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


#: Server histograms read around each phase (sums and counts: their means).
_SERVER_SERIES = {
    "streamscore_queue_wait_seconds": "queue_wait_ms",
    "streamscore_inference_seconds": "inference_ms",
    "streamscore_batch_size_rows": "batch_rows",
}


def _scrape(metrics_port: int) -> dict[str, float]:
    """Sums and counts of the server's batcher histograms, and queue waits past 100 ms
    and 250 ms (bucket counts)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _SERVER_SERIES:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != MODEL:
                continue
            if sample.name.endswith(("_sum", "_count")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name.endswith("_bucket") and family.name.startswith(
                "streamscore_queue_wait"
            ):
                le = sample.labels["le"]
                if le in ("0.1", "0.25", "+Inf"):
                    values[f"wait_le_{le}"] = sample.value
    return values


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server measured between two scrapes: mean queue wait and batch time
    (ms), mean rows per batch, share of queue waits over 100 / 250 ms."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out: dict[str, float] = {}
    for family, name in _SERVER_SERIES.items():
        count = delta.get(f"{family}_count", 0.0)
        mean = delta.get(f"{family}_sum", 0.0) / count if count else float("nan")
        out[name] = mean * 1e3 if name.endswith("_ms") else mean
    waits = delta.get("wait_le_+Inf", 0.0)
    if waits:
        out["wait_over_100ms_share"] = 1 - delta.get("wait_le_0.1", 0.0) / waits
        out["wait_over_250ms_share"] = 1 - delta.get("wait_le_0.25", 0.0) / waits
    return out


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
    client: Client,
    name: str,
    rate: float,
    seconds: float,
    pid: int,
    deadline_s: float = 10.0,
    metrics_port: int | None = None,
) -> Phase:
    """Calls sent on a fixed schedule of ``rate``/s for ``seconds``, whatever the answers;
    latency counts from each call's intended send time."""
    phase = Phase(name, seconds)
    before = await asyncio.to_thread(_scrape, metrics_port) if metrics_port else {}
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
    if metrics_port:
        phase.server = server_means(before, await asyncio.to_thread(_scrape, metrics_port))
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


def _server_settings(args: argparse.Namespace) -> list[str]:
    return [
        f"models.per_model.{MODEL}.execution=thread",
        f"models.per_model.{MODEL}.max_batch_size={args.max_batch_size}",
        f"models.per_model.{MODEL}.max_queue_size={args.max_queue_size}",
        "traffic_log.sample_rate=0",
        "server.connections.max_connection_age_s=null",
        f"server.limits.stream_max_in_flight={args.stream_in_flight}",
        f"server.limits.stream_buffer_bytes={args.stream_buffer_bytes}",
        *args.set,
    ]


def _pair(rate: float, light: Phase, heavy: Phase) -> dict[str, Any]:
    """One 0.8x / 2x pair's figures."""
    return {
        "capacity_rps": rate,
        "light": light.summary(),
        "overload": heavy.summary(),
        "accepted_p99_ratio": heavy.p("OK", 99) / light.p("OK", 99),
        "overload_ok_rps": heavy.rate(),
        "overload_rejected_share": heavy.count(EXHAUSTED)
        / max(1, sum(len(v) for v in heavy.latencies.values())),
    }


async def _pairs(
    client: Client, pid: int, rate: float, args: argparse.Namespace, metrics_port: int
) -> list[dict[str, Any]]:
    """``--repeats`` pairs; each measures capacity again first (``--recapacity-s``): the
    other sessions on this machine move it by 2-3x within minutes, and a "2x" taken from
    a capacity measured in a busy minute is no overload in a quiet one."""
    pairs = []
    for repeat in range(args.repeats):
        if args.recapacity_s and not args.capacity_rps:
            # callers: two full batches, so a queue-wait budget refuses (and spins) few
            callers = 2 * args.max_batch_size if args.budget_batches else args.callers
            again = await closed_loop(client, "capacity", callers, args.recapacity_s)
            rate = again.rate()
            log.info("pair %d capacity %.0f/s", repeat, rate)
        light = await open_loop(
            client, "0.8x", 0.8 * rate, args.light_s, pid, metrics_port=metrics_port
        )
        log.info("pair %d 0.8x: %s", repeat, light.summary()["counts"])
        await asyncio.sleep(2.0)
        heavy = await open_loop(
            client, "2x", 2.0 * rate, args.overload_s, pid, metrics_port=metrics_port
        )
        log.info("pair %d 2x: %s", repeat, heavy.summary()["counts"])
        pairs.append(_pair(rate, light, heavy))
        await asyncio.sleep(2.0)
    return pairs


async def _capacity(
    repository: Path, work: Path, extra: list[str], prefix: list[str], args: argparse.Namespace
) -> float:
    """Closed-loop capacity (OK/s) of a fresh server with ``extra`` settings."""
    with serve(repository, work / "server-capacity.log", extra, prefix) as (_, target):
        client = Client(target)
        try:
            await closed_loop(client, "warmup", args.callers, 2.0)
            return (await closed_loop(client, "capacity", args.callers, args.capacity_s)).rate()
        finally:
            await client.close()


async def run(args: argparse.Namespace, repository: Path, work: Path) -> dict[str, Any]:
    """All phases (one or two servers); the figures as a JSON-able dict."""
    metrics_port = free_port()
    extra = [*_server_settings(args), f"server.metrics_port={metrics_port}"]
    prefix = taskset_prefix(SERVER_CPUS) if taskset_available() else []
    budget_ms: float | None = None
    pairs: list[dict[str, Any]] = []
    streams: dict[str, Any] = {}
    with serve(repository, work / "server.log", extra, prefix) as (pid, target):
        client = Client(target)
        try:
            await closed_loop(client, "warmup", args.callers, 3.0)
            capacity = await closed_loop(client, "capacity", args.callers, args.capacity_s)
            # A budget that refuses part of a closed loop understates capacity: take it
            # from a run without the budget when given.
            rate = args.capacity_rps or capacity.rate()
            batch_ms = 1e3 * args.max_batch_size / rate
            log.info("capacity %.0f/s (p99 %s ms), batch %.1f ms", rate, pct(capacity), batch_ms)
            if args.budget_batches is None:
                pairs = await _pairs(client, pid, rate, args, metrics_port)
                streams = (
                    await _streams_phase(client, target, pid, rate, args) if args.streams else {}
                )
        finally:
            await client.close()
    if args.budget_batches is not None:
        budget_ms = round(args.budget_batches * batch_ms, 1)
        for repeat in range(args.repeats):
            if repeat and not args.capacity_rps:
                # capacity again, on a server without the budget (one with it refuses
                # part of a closed loop: K = 1 measured 116 req/s against 219 without)
                rate = await _capacity(repository, work, extra, prefix, args)
                budget_ms = round(args.budget_batches * 1e3 * args.max_batch_size / rate, 1)
            with_budget = [*extra, f"models.per_model.{MODEL}.max_queue_wait_ms={budget_ms}"]
            log.info("pair %d: capacity %.0f/s, budget %.1f ms", repeat, rate, budget_ms)
            log_path = work / f"server-budget-{repeat}.log"
            with serve(repository, log_path, with_budget, prefix) as (pid, target):
                client = Client(target)
                try:
                    await closed_loop(client, "warmup", 2 * args.max_batch_size, 3.0)
                    one = dict(args.__dict__, repeats=1, recapacity_s=0.0)
                    pair = (
                        await _pairs(client, pid, rate, argparse.Namespace(**one), metrics_port)
                    )[0]
                    pairs.append(pair | {"budget_ms": budget_ms})
                    if repeat == args.repeats - 1 and args.streams:
                        streams = await _streams_phase(client, target, pid, rate, args)
                finally:
                    await client.close()
        budget_ms = pairs[0]["budget_ms"]
    ratios = [p["accepted_p99_ratio"] for p in pairs]
    return {
        "capacity_rps": rate,
        "capacity": capacity.summary(),
        "batch_ms": batch_ms,
        "budget_ms": budget_ms,
        # the first pair at top level, as before repeats existed
        **pairs[0],
        "pairs": pairs,
        "accepted_p99_ratios": ratios,
        "streams": streams,
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_size": args.max_queue_size,
            "slow_layers": args.slow_layers,
            "set": args.set,
            "capacity_given": args.capacity_rps is not None,
            "budget_batches": args.budget_batches,
        },
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    """The RESULTS.md lines of one run."""
    pairs = figures["pairs"]
    budget = figures.get("budget_ms")
    lines = [
        "```sh",
        command,
        "```",
        "",
        f"capacity {figures['capacity_rps']:.0f} req/s "
        f"({'given' if figures['settings'].get('capacity_given') else 'closed loop'}); "
        f"max_queue_size {figures['settings']['max_queue_size']}, "
        f"max_batch_size {figures['settings']['max_batch_size']}"
        + "".join(f", {s}" for s in figures["settings"]["set"])
        + f"; full batch {figures['batch_ms']:.1f} ms (max_batch_size / capacity)"
        + (
            ""
            if budget is None
            else f"; max_queue_wait_ms {budget:g} = {figures['settings']['budget_batches']:g}"
            " x batch"
        ),
        "",
        "| pair | phase | OK/s | OK p99 ms | RESOURCE_EXHAUSTED | its p50 / p99 ms | other codes "
        "| send lag p50 / p99 / max ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for i, pair in enumerate(pairs, 1):
        label = f"{i} ({pair['capacity_rps']:.0f}/s"
        label += f", {pair['budget_ms']:g} ms)" if "budget_ms" in pair else ")"
        lines += [
            _row(label, "0.8x", pair["light"]),
            _row("", "2x", pair["overload"]),
        ]
    ratios = ", ".join(f"{p['accepted_p99_ratio']:.2f}" for p in pairs)
    rss = [kb for p in pairs for kb in p["overload"]["rss_kb"]]
    lines += [
        "",
        f"accepted p99 at 2x / p99 at 0.8x per pair: **{ratios}** (target <= 3); RSS during "
        f"2x: {min(rss) / _MIB:.1f} .. {max(rss) / _MIB:.1f} MiB ({len(rss)} samples).",
    ]
    for i, pair in enumerate(pairs, 1):
        for name in ("light", "overload"):
            if server := pair[name].get("server"):
                lines += ["", f"pair {i} {name}, server means: " + _server_text(server)]
            if pair[name]["details"]:
                lines += ["", f"pair {i} {name} failures by message: {pair[name]['details']}"]
    if figures["streams"]:
        lines += ["", _streams_line(figures["streams"])]
    return "\n".join(lines)


_MIB = 1024


def _row(pair: str, name: str, p: dict[str, Any]) -> str:
    other = ", ".join(f"{c} {n}" for c, n in p["counts"].items() if c not in ("OK", EXHAUSTED))
    lag = p["send_lag_ms"]
    return (
        f"| {pair} | {name} | {p['counts'].get('OK', 0) / p['seconds']:.0f} | "
        f"{p['p99_ms'].get('OK', float('nan')):.1f} | {p['counts'].get(EXHAUSTED, 0):,} | "
        f"{p['p50_ms'].get(EXHAUSTED, float('nan')):.1f} / "
        f"{p['p99_ms'].get(EXHAUSTED, float('nan')):.1f} | {other or '-'} | "
        f"{lag['p50']:.1f} / {lag['p99']:.1f} / {lag['max']:.1f} |"
    )


def _server_text(server: dict[str, float]) -> str:
    return (
        f"queue wait {server['queue_wait_ms']:.1f} ms, batch {server['inference_ms']:.1f} ms, "
        f"{server['batch_rows']:.2f} rows/batch, queue waits > 100 / 250 ms: "
        f"{server.get('wait_over_100ms_share', 0.0):.1%} / "
        f"{server.get('wait_over_250ms_share', 0.0):.1%}"
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
    add(
        "--budget-batches",
        type=float,
        help="second server with max_queue_wait_ms = this x the measured full-batch time",
    )
    add("--repeats", type=int, default=1, help="0.8x / 2x pairs on the same server")
    add(
        "--recapacity-s",
        type=float,
        default=0.0,
        help="without --budget-batches: measure capacity again (closed loop) before each "
        "pair, for this long",
    )
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting")
    add("--json-out", type=Path)
    add("--server-logs", type=Path, help="keep the server logs in this directory")
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
        try:
            figures = asyncio.run(run(args, repository, work))
        finally:
            if args.server_logs:  # e.g. GRPC_TRACE output of the server(s)
                args.server_logs.mkdir(parents=True, exist_ok=True)
                for log_file in work.glob("server*.log"):
                    shutil.copy(log_file, args.server_logs / log_file.name)
    command = "python -m bench.resilience.overload " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    sys.stdout.write(markdown(figures, command) + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
