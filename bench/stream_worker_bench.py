"""Stream worker throughput vs the bare Redis floor, as JSON on stdout.

    python -m bench.stream_worker_bench [--events 50000] [--batch 5000] [--partitions 4]
        [--redis URL] [--bootstrap HOST:PORT]

Without ``--redis``/``--bootstrap`` it starts its own redis-server and Tansu broker
(devstack). The same event set (``features.yaml``'s two stream groups, one topic,
cards and merchants each pinned to one partition) is applied twice to an empty
Redis:

* ``bare``: the floor. Tile updates are computed up front (untimed); the timed
  loop only sends, per batch of ``--batch`` records and partition, one
  ``EVALSHA`` of the apply script per key in one pipeline (``TileStore.apply``).
* ``worker``: a :class:`StreamWorker` consuming the same records from Kafka —
  fetch, JSON decode, validation, tile updates, the same pipelined apply, and
  offset commits. Timed from its first consumed record to the last applied one
  (the consumer group join is excluded).

The target is ``ratio = worker / bare >= 0.5``. Both run on this process's one
core; pin with ``taskset -c N`` for steadier numbers. On a shared machine the
wall-clock rates move with other load; ``*_cpu_us_per_event`` (this process's CPU
time per event; the worker's from its start, group join included, which is
small) do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from devstack.services import kafka_broker, redis_server
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.keys import tile_key
from feature_streams.stream_job import BatchReport, StreamWorker, WorkerConfig
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.topics import ensure_topics
from feature_streams.windows import GroupPlan, event_key, event_time, updates_for_event

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000


@dataclass(frozen=True)
class Workload:
    """The event set: decoded events, their partitions and encoded values."""

    events: list[dict[str, object]]
    partitions: list[int]
    values: list[bytes]


def make_workload(n: int, partitions: int, cards: int, merchants: int, seed: int) -> Workload:
    rng = random.Random(seed)
    events: list[dict[str, object]] = []
    parts: list[int] = []
    for i in range(n):
        card = rng.randrange(cards)
        part = card % partitions
        merchant = rng.randrange(max(merchants // partitions, 1)) * partitions + part
        events.append(
            {
                "card_id": f"c{card}",
                "merchant_id": f"m{merchant}",
                "event_time_ms": T0 + i * 300 - rng.randrange(120_000),
                "amount": round(rng.uniform(1, 900), 2),
                "is_international": rng.choice((0, 0, 0, 1)),
            }
        )
        parts.append(part)
    return Workload(events, parts, [json.dumps(e).encode() for e in events])


def bare_batches(
    plans: Sequence[GroupPlan], work: Workload, topic: str, batch: int
) -> Iterator[list[KeyBatch]]:
    """Per ``batch`` records: one KeyBatch per (group, key, partition), offsets in order."""
    next_offset: dict[int, int] = {}
    for lo in range(0, len(work.events), batch):
        per_key: dict[tuple[str, str, int], list[EventUpdates]] = {}
        for ev, part in zip(
            work.events[lo : lo + batch], work.partitions[lo : lo + batch], strict=True
        ):
            offset = next_offset.get(part, 0)
            next_offset[part] = offset + 1
            for plan in plans:
                per_key.setdefault((plan.group.name, event_key(plan, ev), part), []).append(
                    EventUpdates(offset, event_time(plan, ev), updates_for_event(plan, ev))
                )
        by_name = {p.group.name: p for p in plans}
        yield [
            KeyBatch(
                tile_key(group, key),
                topic,
                part,
                by_name[group].retention_ms,
                by_name[group].group.allowed_lateness_ms,
                evs,
            )
            for (group, key, part), evs in per_key.items()
        ]


@dataclass(frozen=True)
class Timing:
    """Wall seconds of one run and this process's CPU seconds over the same span."""

    wall_s: float
    cpu_s: float


async def run_bare(
    redis_url: str, plans: Sequence[GroupPlan], work: Workload, batch: int
) -> Timing:
    batches = list(bare_batches(plans, work, "bench", batch))
    client = Redis.from_url(redis_url)
    try:
        await client.flushdb()
        store = TileStore(client)
        await store.load_script()
        started, cpu = time.perf_counter(), time.process_time()
        for key_batches in batches:
            await store.apply(key_batches)
        return Timing(time.perf_counter() - started, time.process_time() - cpu)
    finally:
        await client.aclose()


async def run_worker(
    bootstrap: str,
    redis_url: str,
    defs: FeatureDefinitions,
    plans: Sequence[GroupPlan],
    work: Workload,
    batch: int,
) -> Timing:
    client = Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for value, part in zip(work.values, work.partitions, strict=True):
            await producer.send(plans[0].group.topic, value, partition=part)
        await producer.flush()
    finally:
        await producer.stop()
    config = WorkerConfig(
        bootstrap_servers=bootstrap,
        redis_url=redis_url,
        group_id="bench-" + uuid.uuid4().hex[:8],
        max_batch_records=batch,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    n = len(work.events)
    group = plans[0].group.name
    first: list[float] = []
    handled = 0
    finished = asyncio.Event()

    def on_batch(report: BatchReport) -> None:
        nonlocal handled
        if not first:
            first.append(report.started)
        handled += report.applied.get(group, 0) + report.late.get(group, 0)
        if handled >= n:
            finished.set()

    cpu = time.process_time()
    async with StreamWorker(config, defs, on_batch=on_batch) as worker:
        task = asyncio.create_task(worker.run())
        try:
            await finished.wait()
            return Timing(time.perf_counter() - first[0], time.process_time() - cpu)
        finally:
            worker.request_stop()
            await task


async def bench(args: argparse.Namespace, redis_url: str, bootstrap: str) -> dict[str, object]:
    topic = "bench-" + uuid.uuid4().hex[:8]
    text = (REPO / "features.yaml").read_text().replace("topic: transactions", f"topic: {topic}")
    defs = parse_definitions(text)
    plans = [GroupPlan.build(g) for g in defs.stream_groups.values() if g.topic == topic]
    work = make_workload(args.events, args.partitions, args.cards, args.merchants, args.seed)
    await ensure_topics(bootstrap, {topic: args.partitions})
    bare = await run_bare(redis_url, plans, work, args.batch)
    worker = await run_worker(bootstrap, redis_url, defs, plans, work, args.batch)
    bare_s, worker_s = bare.wall_s, worker.wall_s
    n = len(work.events)
    return {
        "bench": "stream_worker",
        "events": n,
        "stream_groups": [p.group.name for p in plans],
        "batch_records": args.batch,
        "partitions": args.partitions,
        "cards": args.cards,
        "merchants": args.merchants,
        "bare_seconds": round(bare_s, 3),
        "bare_events_per_s": round(n / bare_s),
        "worker_seconds": round(worker_s, 3),
        "worker_events_per_s": round(n / worker_s),
        "ratio": round(bare_s / worker_s, 3),
        "bare_cpu_us_per_event": round(bare.cpu_s / n * 1e6, 1),
        "worker_cpu_us_per_event": round(worker.cpu_s / n * 1e6, 1),
        "target_ratio": 0.5,
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_worker_bench", description=__doc__)
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=5000, help="Records per getmany / bare batch")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--cards", type=int, default=2000)
    p.add_argument("--merchants", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis", default=None, help="Use this Redis (its DB is flushed!)")
    p.add_argument("--bootstrap", default=None, help="Use this Kafka broker")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        redis_url = args.redis or stack.enter_context(redis_server()).url
        bootstrap = args.bootstrap or stack.enter_context(kafka_broker()).bootstrap_servers
        result = asyncio.run(bench(args, redis_url, bootstrap))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
