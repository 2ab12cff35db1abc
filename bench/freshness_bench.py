"""Freshness: event produced to Kafka -> visible in Score, at a steady background rate.

Starts its own ``redis-server`` and Tansu broker, the stream worker (``/metrics``
on a free port) and the server (feature store on, the demo ``fraud`` model) as
subprocesses, the server on core 0; a prober on core 1 then:

1. **readiness**: produces one event and waits until ``Score`` sees it, so the
   worker has joined its consumer group and is consuming before any load starts
   (the group join takes seconds on Tansu; load produced meanwhile is a backlog
   the probes would measure instead of freshness);
2. produces background card transactions at ``--rate`` events/s, paced every 2 ms
   on a producer with ``--background-linger-ms`` (20) of batching, and waits
   ``--warmup`` s;
3. for ``--duration`` s starts a probe every ``--probe-interval-ms`` (on a
   schedule, not after the previous one finished; probes may overlap). A probe
   sends one event (``event_time_ms = now``) for one of ``--probe-cards`` cards
   (rotating, so every partition is probed) on its own unbatched producer
   (``linger_ms=0``: no client batching in the latency), then waits until the
   card's hash in Redis holds that event time (one poller pipelines ``HGET
   _last_ts`` for every card in flight every ``--poll-ms``), then calls ``Score``
   (``event_time`` = the event's time) until its ``card_activity`` freshness is
   <= 0 ms, i.e. the server's answer includes the event (at once, unless the
   server serves stale tiles). ``--poll-via score`` polls ``Score`` only.

The latency is produce call -> first ``Score`` reply that includes the event, an
upper bound by at most one poll interval plus one ``Score`` round trip
(``in_redis_us`` and ``score_rtt_us`` are reported too). A probe not seen after
``--probe-timeout-s`` counts as a miss, recorded at the timeout, so misses only
make percentiles worse. The default schedule gives 50 probes/s (750 in 15 s), so
p99 is not just the maximum.

Why not poll ``Score`` every 2 ms per probe: that is ~500 calls/s per probe in
flight, whose server CPU competes with the worker on 2 cores (and lets one slow
probe snowball). Why a batched background producer: Tansu's in-memory storage
slows down with the number of record batches it holds; unbatched at 5,000
events/s (~2,000 batches/s) a bare consumer's produce -> fetch p50 climbs from
~9 ms to ~30 ms within 30 s, so the result would mostly measure the broker's
growing log, not the worker (with 20 ms batching it drifts ~3 ms in 30 s).

The JSON also carries, from the worker's ``/metrics`` scraped every 250 ms during
the measurement, its consumer lag (if it grows, the worker is not keeping up and
the latencies are backlog, not freshness), batches/s, mean batch size, mean apply
time and commits/s; and each process's CPU share (cores used) over the window,
with ``others`` = the rest of the machine: other jobs on a shared box (rerun
unless it is ~0).

    python -m bench.freshness_bench --rate 5000 --duration 15 \
        --json-out bench/results/freshness.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, taskset_prefix
from devstack.services import free_port, kafka_broker, redis_server, wait_for_port
from feature_streams.keys import LAST_TS_FIELD, tile_key
from feature_streams.topics import ensure_topics
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.clients.histogram import LatencyHistogram

TOPIC = "transactions"
GROUP = "card_activity"
PROBE_PREFIX = "probe-card-"
LAG_METRIC = "streamscore_stream_consumer_lag"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _child(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _event(card: str, merchant: str, amount: float, now_ms: int) -> bytes:
    return json.dumps(
        {
            "card_id": card,
            "merchant_id": merchant,
            "customer_id": "cust-0",
            "event_time_ms": now_ms,
            "amount": amount,
            "is_international": 0,
        }
    ).encode()


# --- the prober (runs in its own process, on the client core) ----------------------


async def _background(producer: AIOKafkaProducer, rate: float, stop: asyncio.Event) -> int:
    """Produce ``rate`` events/s, paced every 2 ms, until ``stop``; returns the count."""
    rng = random.Random(5)
    sent = 0
    started = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate) - sent
        now_ms = int(time.time() * 1000)
        for _ in range(max(due, 0)):
            card = f"card-{rng.randrange(20_000)}"
            value = _event(card, f"merch-{rng.randrange(500)}", rng.random() * 200, now_ms)
            await producer.send(TOPIC, value=value, key=card.encode())
            sent += 1
        await asyncio.sleep(0.002)
    return sent


class _Prober:
    """Produces probe events; finds each one visible, then confirms it with ``Score``.

    With ``redis``, :meth:`poll_redis` ``HGET`` s the ``_last_ts`` of every card with
    a probe in flight (one pipelined round trip per ``poll_s``); once a probe's event
    time is there, ``Score`` is called until its freshness says the same (at once,
    unless the server serves stale tiles). Without it every probe polls ``Score``.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        stub: pb_grpc.ScoringAsyncStub,
        redis: Redis | None,
        poll_s: float,
        timeout_s: float,
    ) -> None:
        self.producer = producer
        self.stub = stub
        self.redis = redis
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.latency = LatencyHistogram()
        self.in_redis = LatencyHistogram()
        self.score_rtt = LatencyHistogram()
        self.missed = 0
        self.score_calls = 0
        self._waiting: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

    async def poll_redis(self, stop: asyncio.Event) -> None:
        """Resolve waiting probes whose event time reached their card's ``_last_ts``."""
        assert self.redis is not None
        while not stop.is_set():
            if self._waiting:
                cards = list(self._waiting)
                pipe = self.redis.pipeline(transaction=False)
                for card in cards:
                    pipe.hget(tile_key(GROUP, card), LAST_TS_FIELD)
                for card, raw in zip(cards, await pipe.execute(), strict=True):
                    if raw is None:
                        continue
                    last = int(float(raw))
                    still = []
                    for ts, future in self._waiting.pop(card, []):
                        if ts <= last:
                            if not future.done():
                                future.set_result(None)
                        else:
                            still.append((ts, future))
                    if still:
                        self._waiting.setdefault(card, []).extend(still)
            await asyncio.sleep(self.poll_s)

    async def _until_in_redis(self, card: str, ts: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(card, []).append((ts, future))
        try:
            await future
        finally:
            future.cancel()

    async def probe(self, card: str, record: bool = True) -> float | None:
        """Seconds from produce to visible in ``Score``; ``None`` after the timeout."""
        ts = int(time.time() * 1000)
        sent_at = time.perf_counter()
        await self.producer.send(
            TOPIC, value=_event(card, "merch-probe", 1.0, ts), key=card.encode()
        )
        deadline = sent_at + self.timeout_s
        seen: float | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                if self.redis is not None:
                    await self._until_in_redis(card, ts)
                    if record:
                        self.in_redis.record_ns(int((time.perf_counter() - sent_at) * 1e9))
                seen = await self._until_scored(card, ts, sent_at, deadline, record)
        if record:
            if seen is None:
                self.missed += 1
            self.latency.record_ns(int((seen if seen is not None else self.timeout_s) * 1e9))
        return seen

    async def _until_scored(
        self, card: str, ts: int, sent_at: float, deadline: float, record: bool
    ) -> float | None:
        stamp = Timestamp(seconds=ts // 1000, nanos=(ts % 1000) * 1_000_000)
        request = pb.ScoreRequest(
            model="fraud", entity_ids={"card_id": card}, features={"amount": 1.0}, event_time=stamp
        )
        while time.perf_counter() < deadline:
            asked = time.perf_counter()
            reply = await self.stub.Score(request, timeout=1.0)
            now = time.perf_counter()
            if record:
                self.score_calls += 1
                self.score_rtt.record_ns(int((now - asked) * 1e9))
            ages = [f.age_ms for f in reply.freshness if f.group == GROUP]
            if ages and ages[0] <= 0:
                return now - sent_at
            await asyncio.sleep(self.poll_s)
        return None


_COUNTERS = {
    "streamscore_stream_batch_records_count": "batches",
    "streamscore_stream_batch_records_sum": "records",
    "streamscore_stream_apply_seconds_sum": "apply_s",
    "streamscore_stream_commits_total": "commits",
}


def _scrape(url: str) -> tuple[int, dict[str, float]] | None:
    """The worker's consumer lag (summed over partitions) and the counters of
    ``_COUNTERS``; ``None`` if ``/metrics`` is unreadable."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    lag = 0
    counters = dict.fromkeys(_COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LAG_METRIC:
                lag += int(sample.value)
            elif sample.name in _COUNTERS:
                counters[_COUNTERS[sample.name]] += sample.value
    return lag, counters


class _WorkerStats:
    """Lag samples and counter deltas of the worker over the measured window."""

    def __init__(self) -> None:
        self.lags: list[int] = []
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self.seconds = 0.0

    async def sample(self, url: str, stop: asyncio.Event) -> None:
        """Scrape every 250 ms until ``stop``."""
        started = time.monotonic()
        while not stop.is_set():
            scraped = await asyncio.to_thread(_scrape, url)
            if scraped is not None:
                lag, counters = scraped
                self.lags.append(lag)
                if self.first is None:
                    self.first, started = counters, time.monotonic()
                self.last, self.seconds = counters, time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    def summary(self) -> dict[str, Any]:
        """Lag percentiles, batches/s, mean batch size and apply time, commits/s."""
        out: dict[str, Any] = {"lag_events": _lag_summary(self.lags)}
        if self.first is None or self.last is None or self.seconds <= 0:
            return out
        delta = {k: self.last[k] - self.first[k] for k in self.last}
        batches = delta["batches"] or 1.0
        out |= {
            "batches_per_s": round(delta["batches"] / self.seconds, 1),
            "mean_batch_records": round(delta["records"] / batches, 1),
            "mean_apply_ms": round(delta["apply_s"] / batches * 1000, 2),
            "commits_per_s": round(delta["commits"] / self.seconds, 1),
        }
        return out


def _lag_summary(samples: Sequence[int]) -> dict[str, float | int]:
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)
    return {
        "samples": len(samples),
        "mean": round(sum(samples) / len(samples), 1),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
        "last": samples[-1],
    }


async def measure(args: argparse.Namespace, bootstrap: str, target: str) -> dict[str, Any]:
    """Readiness probe, background load, warm-up, then scheduled probes; the summary."""
    # Probes unbatched (their latency holds no client batching); background batched
    # like any producer at thousands of events/s, see the module docstring.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    loader = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=args.background_linger_ms, acks=1
    )
    await producer.start()
    await loader.start()
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.ScoringStub(channel)
    redis = Redis.from_url(args.redis) if args.redis else None
    prober = _Prober(producer, stub, redis, args.poll_ms / 1000, args.probe_timeout_s)
    stop = asyncio.Event()
    sampling_done = asyncio.Event()
    poller = asyncio.create_task(prober.poll_redis(sampling_done)) if redis is not None else None
    stats = _WorkerStats()
    background: asyncio.Task[int] | None = None
    load_started = time.monotonic()
    try:
        ready_by = time.monotonic() + args.ready_timeout_s
        while await prober.probe(PROBE_PREFIX + "ready", record=False) is None:
            if time.monotonic() > ready_by:
                raise RuntimeError("the worker never made a probe visible: is it consuming?")
        load_started = time.monotonic()
        background = asyncio.create_task(_background(loader, args.rate, stop))
        await asyncio.sleep(args.warmup)
        stats_task = (
            asyncio.create_task(stats.sample(args.worker_metrics, sampling_done))
            if args.worker_metrics
            else None
        )
        window_start = time.monotonic()
        interval = args.probe_interval_ms / 1000
        probes: list[asyncio.Task[float | None]] = []
        n = 0
        while (due := window_start + n * interval) < window_start + args.duration:
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            card = f"{PROBE_PREFIX}{n % args.probe_cards}"
            probes.append(asyncio.create_task(prober.probe(card)))
            n += 1
        await asyncio.gather(*probes)
        window_end = time.monotonic()
        sampling_done.set()
        if stats_task is not None:
            await stats_task
    finally:
        stop.set()
        sampling_done.set()
        sent = await background if background is not None else 0
        load_s = time.monotonic() - load_started
        if poller is not None:
            await poller
        if redis is not None:
            await redis.aclose()
        await producer.stop()
        await loader.stop()
        await channel.close(None)
    return {
        "background_events": sent,
        "background_rate_achieved": round(sent / load_s, 1) if load_s else 0.0,
        "probes": prober.latency.count,
        "probes_missed": prober.missed,
        "latency_us": prober.latency.summary().to_json(),
        "in_redis_us": prober.in_redis.summary().to_json(),
        "score_calls": prober.score_calls,
        "score_rtt_us": prober.score_rtt.summary().to_json(),
        "worker": stats.summary(),
        "window": [window_start, window_end],
    }


# --- the orchestrator --------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (threads included), from ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, not idle or iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


class _CpuSampler:
    """Samples the CPU time of named processes (and of the machine) every 100 ms."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._samples: list[tuple[float, dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, pid: int) -> None:
        self._pids[name] = pid

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            sample = {n: _cpu_seconds(p) for n, p in list(self._pids.items())}
            sample["machine"] = _machine_busy_seconds()
            self._samples.append((now, sample))
            self._stop.wait(0.1)

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self, start: float, end: float) -> dict[str, float]:
        """Cores used by each process between ``start`` and ``end`` (monotonic), and by
        ``others``: the machine minus these processes (other people's jobs)."""
        inside = [s for s in self._samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        out: dict[str, float] = {}
        for name, value in last.items():
            before = first.get(name)
            if value is not None and before is not None:
                out[name] = round((value - before) / (t1 - t0), 3)
        if "machine" in out:
            out["others"] = round(out.pop("machine") - sum(out.values()), 3)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness_bench", description=__doc__)
    parser.add_argument("--rate", type=float, default=5000.0, help="background events/s")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before measuring (s)")
    parser.add_argument("--probe-interval-ms", type=float, default=20.0)
    parser.add_argument("--probe-cards", type=int, default=16)
    parser.add_argument("--probe-timeout-s", type=float, default=5.0)
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument(
        "--background-linger-ms", type=int, default=20, help="linger of the background producer"
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--logs", type=Path, default=Path("var/bench"))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--pin-worker", action="store_true", help="pin the worker to the server's core too"
    )
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra worker argument (repeatable)"
    )
    parser.add_argument(
        "--measure", nargs=2, metavar=("BOOTSTRAP", "TARGET"), help="internal: the prober"
    )
    parser.add_argument(
        "--poll-via",
        choices=("redis", "score"),
        default="redis",
        help="find probes in Redis, then confirm with one Score (default), or poll Score only",
    )
    parser.add_argument("--worker-metrics", default=None, help="internal: worker /metrics URL")
    parser.add_argument("--redis", default=None, help="internal: Redis URL of the tiles")
    args = parser.parse_args(argv)
    if args.measure:
        bootstrap, target = args.measure
        print(json.dumps(asyncio.run(measure(args, bootstrap, target))))
        return 0
    args.logs.mkdir(parents=True, exist_ok=True)
    grpc_port, metrics_port = free_port(), free_port()
    with redis_server() as redis, kafka_broker(log_file=args.logs / "tansu.log") as kafka:
        asyncio.run(ensure_topics(kafka.bootstrap_servers, {TOPIC: 4}))
        pin = taskset_prefix(SERVER_CPUS)
        worker = [
            *(pin if args.pin_worker else []), sys.executable, "-m", "server.cli", "stream",
            "--set", f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
            "--set", f"redis.url={redis.url}", "--set", "features.definitions_path=features.yaml",
            "--set", "logging.level=WARNING", "--session-timeout-ms", "6000",
            "--metrics-port", str(metrics_port), *args.worker_arg,
        ]  # fmt: skip
        server = [
            *pin, sys.executable, "-m", "server.cli", "serve",
            "--set", f"server.port={grpc_port}", "--set", "server.metrics_port=0",
            "--set", f"models.repository={args.repository}",
            "--set", "features.definitions_path=features.yaml",
            "--set", f"redis.url={redis.url}", "--set", "logging.level=WARNING",
        ]  # fmt: skip
        with (
            _child(worker, args.logs / "worker.log") as wrk,
            _child(server, args.logs / "server.log") as srv,
        ):
            wait_for_port("127.0.0.1", grpc_port, 60.0, srv)
            wait_for_port("127.0.0.1", metrics_port, 60.0, wrk)
            prober = [
                *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.freshness_bench",
                "--measure", kafka.bootstrap_servers, f"127.0.0.1:{grpc_port}",
                "--worker-metrics", f"http://127.0.0.1:{metrics_port}/metrics",
                *(["--redis", redis.url] if args.poll_via == "redis" else []),
                "--rate", str(args.rate), "--duration", str(args.duration),
                "--warmup", str(args.warmup), "--probe-interval-ms", str(args.probe_interval_ms),
                "--probe-cards", str(args.probe_cards),
                "--probe-timeout-s", str(args.probe_timeout_s),
                "--ready-timeout-s", str(args.ready_timeout_s), "--poll-ms", str(args.poll_ms),
                "--background-linger-ms", str(args.background_linger_ms),
            ]  # fmt: skip
            pids = {
                "worker": wrk.pid,
                "server": srv.pid,
                "broker": kafka.process.pid,
                "redis": redis.process.pid,
            }
            with _CpuSampler(pids) as sampler:
                process = subprocess.Popen(prober, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                sampler.add("prober", process.pid)
                out, err = process.communicate()
            if process.returncode != 0:
                sys.stderr.write(err.decode()[-3000:])
                return 1
            result = json.loads(out)
    start, end = result.pop("window")
    result["cpu_cores_used"] = sampler.shares(start, end) | {"machine_cores": os.cpu_count() or 0}
    config = vars(args) | {"repository": str(args.repository), "logs": str(args.logs)}
    for internal in ("json_out", "measure", "worker_metrics", "redis"):
        config.pop(internal, None)
    result["config"] = config
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
