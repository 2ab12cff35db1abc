"""Freshness: event produced to Kafka -> visible in Score, at a steady background rate.

Starts its own ``redis-server`` and Tansu broker, the stream worker and the server
(feature store on, the demo ``fraud`` model) as subprocesses on core 0, and from
core 1 produces background card transactions at ``--rate`` events/s while a prober,
every ``--probe-interval-ms``, produces one event for a dedicated probe card with
``event_time_ms = now`` and polls ``Score`` (``event_time`` = that event's time)
until the response's freshness for the probe card's ``card_activity`` group is 0 ms,
i.e. the event is in the tiles the server reads. The latency reported is produce
call -> first Score that sees it (a poll every ``--poll-ms``, so it is an upper
bound within one poll interval).

    python -m bench.freshness_bench --rate 5000 --duration 20 \
        --json-out bench/results/freshness.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from bench.histogram import LatencyHistogram
from bench.pinning import CLIENT_CPUS, SERVER_CPUS, taskset_prefix
from devstack.services import free_port, kafka_broker, redis_server, wait_for_port
from feature_streams.topics import ensure_topics
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc

TOPIC = "transactions"
PROBE_CARD = "probe-card"


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


async def _background(producer: AIOKafkaProducer, rate: float, stop: asyncio.Event) -> int:
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


async def _probe_once(
    producer: AIOKafkaProducer, stub: pb_grpc.ScoringAsyncStub, poll_s: float, timeout_s: float
) -> float | None:
    ts = int(time.time() * 1000)
    sent_at = time.perf_counter()
    await producer.send(
        TOPIC, value=_event(PROBE_CARD, "merch-probe", 1.0, ts), key=PROBE_CARD.encode()
    )
    stamp = Timestamp(seconds=ts // 1000, nanos=(ts % 1000) * 1_000_000)
    request = pb.ScoreRequest(
        model="fraud",
        entity_ids={"card_id": PROBE_CARD},
        features={"amount": 1.0},
        event_time=stamp,
    )
    while time.perf_counter() - sent_at < timeout_s:
        reply = await stub.Score(request, timeout=1.0)
        ages = [f.age_ms for f in reply.freshness if f.group == "card_activity"]
        if ages and ages[0] <= 0:
            return time.perf_counter() - sent_at
        await asyncio.sleep(poll_s)
    return None


async def measure(
    bootstrap: str, target: str, rate: float, duration_s: float, probe_ms: float, poll_ms: float
) -> dict[str, Any]:
    """Background load plus periodic probes; returns the latency summary."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks=1)
    await producer.start()
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.ScoringStub(channel)
    stop = asyncio.Event()
    background = asyncio.create_task(_background(producer, rate, stop))
    histogram = LatencyHistogram()
    missed = 0
    try:
        await asyncio.sleep(3.0)  # the worker catches up with the start of the load
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            latency = await _probe_once(producer, stub, poll_ms / 1000, 5.0)
            if latency is None:
                missed += 1
            else:
                histogram.record_ns(int(latency * 1e9))
            await asyncio.sleep(probe_ms / 1000)
    finally:
        stop.set()
        sent = await background
        await producer.stop()
        await channel.close(None)
    return {
        "background_events": sent,
        "background_rate_achieved": sent / (duration_s + 3.0),
        "probes_missed": missed,
        "latency_us": histogram.summary().to_json(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness_bench", description=__doc__)
    parser.add_argument("--rate", type=float, default=5000.0, help="background events/s")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--probe-interval-ms", type=float, default=50.0)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--logs", type=Path, default=Path("var/bench"))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--pin-worker", action="store_true", help="pin the worker to the server's core too"
    )
    parser.add_argument(
        "--measure", nargs=2, metavar=("BOOTSTRAP", "TARGET"), help="internal: the prober"
    )
    args = parser.parse_args(argv)
    if args.measure:
        bootstrap, target = args.measure
        measured = asyncio.run(
            measure(
                bootstrap, target, args.rate, args.duration, args.probe_interval_ms, args.poll_ms
            )
        )
        print(json.dumps(measured))
        return 0
    args.logs.mkdir(parents=True, exist_ok=True)
    grpc_port = free_port()
    with redis_server() as redis, kafka_broker(log_file=args.logs / "tansu.log") as kafka:
        asyncio.run(ensure_topics(kafka.bootstrap_servers, {TOPIC: 4}))
        pin = taskset_prefix(SERVER_CPUS)
        worker = [
            *(pin if args.pin_worker else []), sys.executable, "-m", "feature_streams.worker",
            "--bootstrap", kafka.bootstrap_servers, "--redis", redis.url,
            "--definitions", "features.yaml", "--session-timeout-ms", "6000",
            "--log-level", "WARNING",
        ]  # fmt: skip
        server = [
            *pin, sys.executable, "-m", "server.cli", "serve",
            "--set", f"server.port={grpc_port}", "--set", "server.metrics_port=0",
            "--set", f"models.repository={args.repository}",
            "--set", "features.definitions_path=features.yaml",
            "--set", f"redis.url={redis.url}", "--set", "logging.level=WARNING",
        ]  # fmt: skip
        with (
            _child(worker, args.logs / "worker.log"),
            _child(server, args.logs / "server.log") as srv,
        ):
            wait_for_port("127.0.0.1", grpc_port, 60.0, srv)
            prober = [
                *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.freshness_bench",
                "--measure", kafka.bootstrap_servers, f"127.0.0.1:{grpc_port}",
                "--rate", str(args.rate), "--duration", str(args.duration),
                "--probe-interval-ms", str(args.probe_interval_ms), "--poll-ms", str(args.poll_ms),
            ]  # fmt: skip
            done = subprocess.run(prober, capture_output=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr.decode()[-3000:])
                return 1
            result = json.loads(done.stdout)
    result["config"] = vars(args) | {"repository": str(args.repository), "logs": str(args.logs)}
    result["config"].pop("json_out", None)
    result["config"].pop("measure", None)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
