"""Durable sink CPU per record vs its round wait (``max_wait_ms``), real Tansu broker.

The sink alone (no server): keyed 4 kB records offered at a fixed rate on this process
(pinned to core 0, the broker to core 1), CPU time of the process per record, each
``--waits`` value run twice, alternated. What it isolates: the sender's per-round cost
(a record batch per partition, acks=all), paid on the serving loop in the server.

    flock /work/wt/bench.lock .venv/bin/python -m bench.sink_round_bench --waits 20 100

``--records decision`` offers real decision records instead (``TrafficLog`` of a
30-feature request decoded from a ``ScoreRequest``, encoded lazily on the sender,
sink metrics on): the whole record path after the answer, as in the server.
``--partition-by round`` runs the sink as the server's decision record does (a send
round in one partition); ``--partitions N`` creates the topic with N partitions first
(the broker's default otherwise: Tansu's is 4).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, cpu_list
from devstack.services import kafka_broker
from feature_streams.read_plan import FetchRow
from feature_streams.topics import ensure_topics
from protos.streamscore.v1 import scoring_pb2 as pb
from server.codec import decode_score_request
from server.lineage import Lineage
from server.records.durable_sink import DurableSink, DurableSinkConfig, PartitionBy
from server.records.kafka_sink import SinkMetrics
from server.records.traffic_log import TrafficLog
from server.router import Route
from server.scoring_types import ScoreResult

TOPIC = "streamscore.decisions"


_NAMES = tuple(f"feature_{i:02d}" for i in range(30))
_LINEAGE = Lineage("ab" * 32, "snap-7", "deadbeef", "2026-01-01T00:00:00+00:00", "lgbm", True)


def _offers(sink: DurableSink, kind: str, keys: list[str]) -> list[Callable[[], object]]:
    """One offer per key, built before the timed part: 4 kB bytes, or a decision record
    through a ``TrafficLog`` (what the server's request path does after the answer)."""
    if kind == "bytes":
        value = b"x" * 4000
        return [functools.partial(sink.offer, TOPIC, value, key.encode()) for key in keys]
    log = TrafficLog(sink, TOPIC, 1.0, registry=CollectorRegistry(), sample_salt=b"bench")
    rng = np.random.default_rng(7)
    offers: list[Callable[[], object]] = []
    for key in keys:
        row = rng.normal(size=(1, len(_NAMES))).astype(np.float32)
        message = pb.ScoreRequest(model="fraud", request_id=key, entity_ids={"card_id": "c-1"})
        for name, value in zip(_NAMES, row[0].tolist(), strict=True):
            message.features[name] = value
        offers.append(
            functools.partial(
                log.offer,
                decode_score_request(message),
                ScoreResult(key, 0.3, "fraud", "2", Route.CHAMPION, artifact_sha256="ab" * 32),
                names=_NAMES,
                row=row,
                t_ms=1_000,
                threshold=0.5,
                timings={"pipeline_us": 200},
                fetched=FetchRow(row, np.ones(len(_NAMES), np.bool_), {}, 1_000),
                lineage=lambda: _LINEAGE,
            )
        )
    return offers


async def cpu_per_record(
    bootstrap: str,
    wait_ms: int,
    rate: float,
    seconds: float,
    kind: str = "bytes",
    burst: int = 1,
    partition_by: PartitionBy = "key",
) -> float:
    """CPU microseconds of this process per record offered and acknowledged (offered
    ``burst`` at a time: fewer of this loop's own wakeups in the figure)."""
    with tempfile.TemporaryDirectory() as spill:
        registry = CollectorRegistry()
        config = DurableSinkConfig(
            bootstrap, Path(spill), max_wait_ms=wait_ms, partition_by=partition_by
        )
        sink = DurableSink(config, SinkMetrics(registry) if kind == "decision" else None)
        sink.start()
        for offer in _offers(sink, kind, [f"warm-{wait_ms}-{i}" for i in range(50)]):
            offer()  # connect and learn the partitions first
        await sink.flush(20)
        count = int(rate * seconds)
        offers = _offers(sink, kind, [f"r-{wait_ms}-{i}-{uuid.uuid4()}" for i in range(count)])
        cpu_before, start = time.process_time(), time.perf_counter()
        for i, offer in enumerate(offers):
            offer()
            if (i + 1) % burst:
                continue
            delay = start + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await sink.flush(30)
        cpu = time.process_time() - cpu_before
        await sink.close(2)
    return cpu / count * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink_round_bench", description=__doc__)
    parser.add_argument("--waits", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--rate", type=float, default=500.0, help="records/s")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--records", choices=("bytes", "decision"), default="bytes")
    parser.add_argument("--runs", type=int, default=2, help="runs per wait (alternated)")
    parser.add_argument("--burst", type=int, default=1, help="records offered per wakeup")
    parser.add_argument(
        "--partition-by", choices=("key", "round"), default="key", help="the sink's partition_by"
    )
    parser.add_argument("--partitions", type=int, default=0, help="create the topic first")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, set(SERVER_CPUS))
    with tempfile.TemporaryDirectory() as tmp, kafka_broker(log_file=Path(tmp) / "b.log") as b:
        pin = ["taskset", "-a", "-p", "-c", cpu_list(CLIENT_CPUS), str(b.process.pid)]
        subprocess.run(pin, check=True, capture_output=True)
        if args.partitions:
            asyncio.run(ensure_topics(b.bootstrap_servers, {TOPIC: args.partitions}))
        for _ in range(args.runs):
            for wait in args.waits:
                us = asyncio.run(
                    cpu_per_record(
                        b.bootstrap_servers,
                        wait,
                        args.rate,
                        args.seconds,
                        args.records,
                        args.burst,
                        args.partition_by,
                    )
                )
                print(f"max_wait_ms={wait}: {us:.1f} us CPU/record", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
