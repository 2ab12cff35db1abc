"""The stream worker against a real Tansu broker and redis-server.

Every test uses its own topic and consumer group. Keys are produced to explicit
partitions so that each card and merchant lives on one partition (as with a
topic keyed by entity): then per-key log order, and so the lateness decisions,
are fixed, and the expected tiles can be folded directly from the event list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from devstack.services import KafkaBroker, free_port, redis_server
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.events import DeadLetter, dead_letter_topic
from feature_streams.keys import LAST_TS_FIELD, offset_field, tile_key
from feature_streams.redis_client import AnyRedis, RedisOptions, connect, detect_mode
from feature_streams.stream_job import BatchReport, StreamWorker, WorkerConfig
from feature_streams.tile_store import read_hashes
from feature_streams.topics import ensure_topics
from feature_streams.windows import (
    GroupPlan,
    Tiles,
    event_time,
    field_name,
    fold,
    is_too_late,
    point_in_time_values,
    read_hash,
    tile_start,
    tiles_to_hash,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
MINUTE = 60_000
DAY = 86_400_000
GROUPS = ("card_activity", "merchant_activity")
ENTITY = {"card_activity": "card_id", "merchant_activity": "merchant_id"}


# --- helpers -------------------------------------------------------------------------


@dataclass
class Produced:
    """Events as produced: per record its partition, offset and decoded event."""

    topic: str
    partitions: int
    events: list[dict[str, object]]
    partition_of: list[int]
    offsets: list[int]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def definitions_for(topic: str) -> tuple[FeatureDefinitions, str]:
    text = (REPO / "features.yaml").read_text().replace("topic: transactions", f"topic: {topic}")
    return parse_definitions(text), text


def make_events(
    seed: int, n: int, cards: int, merchants: int, partitions: int, spread_ms: int, jitter_ms: int
) -> tuple[list[dict[str, object]], list[int]]:
    """Events in log order and their partitions; card i and merchant j live on partition
    i % P and j % P. Event time rises over ``spread_ms``, jittered back by up to
    ``jitter_ms`` (beyond the 10 min lateness, some events are too late)."""
    rng = random.Random(seed)
    events: list[dict[str, object]] = []
    parts: list[int] = []
    for i in range(n):
        card = rng.randrange(cards)
        part = card % partitions
        merchant = rng.randrange(merchants // partitions) * partitions + part
        events.append(
            {
                "card_id": f"c{card}",
                "merchant_id": f"m{merchant}",
                "event_time_ms": T0 + i * spread_ms // n - rng.randrange(jitter_ms + 1),
                "amount": round(rng.uniform(1, 900), 2),
                "is_international": rng.choice((0, 0, 0, 1)),
            }
        )
        parts.append(part)
    return events, parts


async def produce_raw(
    bootstrap: str, topic: str, records: Sequence[tuple[int, bytes]]
) -> list[int]:
    """Send ``(partition, value)`` records; returns their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, partition=p) for p, value in records]
        return [(await f).offset for f in futures]
    finally:
        await producer.stop()


async def produce(
    kafka: KafkaBroker,
    topic: str,
    partitions: int,
    events: list[dict[str, object]],
    parts: list[int],
) -> Produced:
    records = [(p, json.dumps(e).encode()) for e, p in zip(events, parts, strict=True)]
    offsets = await produce_raw(kafka.bootstrap_servers, topic, records)
    return Produced(topic, partitions, events, parts, offsets)


def kept_events(
    plan: GroupPlan, events: Sequence[Mapping[str, object]]
) -> dict[str, list[Mapping[str, object]]]:
    """Per key, the events the worker keeps: per-key lateness, in log order."""
    entity = ENTITY[plan.group.name]
    kept: dict[str, list[Mapping[str, object]]] = {}
    newest: dict[str, int] = {}
    for ev in events:
        key = str(ev[entity])
        ts = event_time(plan, ev)
        if is_too_late(ts, newest.get(key), plan.group.allowed_lateness_ms):
            continue
        newest[key] = max(ts, newest.get(key, ts))
        kept.setdefault(key, []).append(ev)
    return kept


def expected_tiles(plan: GroupPlan, events: Sequence[Mapping[str, object]]) -> dict[str, Tiles]:
    """Per key: the direct fold of the kept events."""
    out: dict[str, Tiles] = {}
    for key, evs in kept_events(plan, events).items():
        tiles = out[key] = {}
        for ev in evs:
            fold(plan, tiles, ev)
    return out


def final_offsets(produced: Produced, group: str) -> dict[str, tuple[int, int]]:
    """Key -> (partition, offset of its last event)."""
    out: dict[str, tuple[int, int]] = {}
    for ev, p, off in zip(produced.events, produced.partition_of, produced.offsets, strict=True):
        out[str(ev[ENTITY[group]])] = (p, off)
    return out


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def fully_applied(client: AnyRedis, produced: Produced) -> bool:
    """Every key's hash holds the offset of its last event."""
    for group in GROUPS:
        finals = final_offsets(produced, group)
        keys = sorted(finals)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(tile_key(group, key), offset_field(produced.topic, finals[key][0]))
        got = await pipe.execute()
        if any(g is None or int(g) != finals[k][1] for k, g in zip(keys, got, strict=True)):
            return False
    return True


async def applied_records(client: AnyRedis, produced: Produced) -> int:
    """Records applied so far, from the card hashes' offset fields."""
    finals = final_offsets(produced, "card_activity")
    keys = sorted(finals)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(tile_key("card_activity", key), offset_field(produced.topic, finals[key][0]))
    got = await pipe.execute()
    head = [-1] * produced.partitions
    for key, value in zip(keys, got, strict=True):
        if value is not None:
            part = finals[key][0]
            head[part] = max(head[part], int(value))
    return sum(h + 1 for h in head)


def assert_close_maps(
    got: Mapping[str, float], want: Mapping[str, float | str], where: str
) -> None:
    assert set(got) == set(want), where
    for name, value in want.items():
        assert math.isclose(got[name], float(value), rel_tol=1e-9, abs_tol=1e-9), (where, name)


async def assert_tiles_match(
    client: AnyRedis, produced: Produced, plans: Mapping[str, GroupPlan]
) -> None:
    """Every hash equals the direct fold; reads equal point_in_time_values."""
    for group, plan in plans.items():
        kept = kept_events(plan, produced.events)
        want = expected_tiles(plan, produced.events)
        keys = sorted(want)
        raws = await read_hashes(client, [tile_key(group, k) for k in keys])
        for key, raw in zip(keys, raws, strict=True):
            fields = {k.decode(): float(v) for k, v in raw.items() if not k.startswith(b"_")}
            assert_close_maps(fields, tiles_to_hash(want[key]), f"{group}:{key}")
        # Reads after the stream against the backfill reference, for a few keys.
        for key, raw in list(zip(keys, raws, strict=True))[:4]:
            newest = int(raw[LAST_TS_FIELD.encode()])
            times = [newest + 1, newest + 7 * MINUTE, newest + 90 * MINUTE]
            refs = point_in_time_values(plan, kept[key], times)
            for t, ref in zip(times, refs, strict=True):
                assert_close_maps(read_hash(plan, raw, t), ref, f"{group}:{key}@{t}")


def sample(worker: StreamWorker, name: str, **labels: str) -> float:
    return worker.registry.get_sample_value(f"streamscore_stream_{name}_total", labels) or 0.0


class Progress:
    """``on_batch`` callback collecting reports; tests await conditions on totals."""

    def __init__(self) -> None:
        self.reports: list[BatchReport] = []
        self._changed = asyncio.Event()

    def __call__(self, report: BatchReport) -> None:
        self.reports.append(report)
        self._changed.set()

    def total(self, what: str, group: str | None = None) -> int:
        if group is None:
            return sum(int(getattr(r, what)) for r in self.reports)
        return sum(getattr(r, what).get(group, 0) for r in self.reports)

    async def wait_for(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not check():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}") from None


def fast_config(kafka: KafkaBroker, redis_url: str, **extra: Any) -> WorkerConfig:
    """Small session timeout: a group join takes ~1 s on Tansu instead of ~5 s."""
    settings: dict[str, Any] = {
        "group_id": unique("g"),
        "session_timeout_ms": 1000,
        "heartbeat_interval_ms": 250,
        **extra,
    }
    return WorkerConfig(bootstrap_servers=kafka.bootstrap_servers, redis_url=redis_url, **settings)


@contextlib.asynccontextmanager
async def running(worker: StreamWorker) -> AsyncIterator[StreamWorker]:
    async with worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.request_stop()
            await task


async def committed(bootstrap: str, group_id: str, topic: str, partitions: int) -> list[int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id)
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
    finally:
        await consumer.stop()


# --- subprocess workers ----------------------------------------------------------------


class WorkerProcess:
    """``streamscore stream`` (``python -m server.cli stream``) as a child process."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "stream", *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)

    def alive(self) -> bool:
        return self.proc.poll() is None


def worker_args(
    kafka: KafkaBroker, redis_url: str, definitions: Path, group_id: str, **extra: object
) -> list[str]:
    args = [
        "--set", f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
        "--set", f"redis.url={redis_url}",
        "--set", f"features.definitions_path={definitions}",
        "--set", f"kafka.group_id={group_id}",
        "--set", "logging.level=WARNING",
        "--session-timeout-ms", "1000",
        "--heartbeat-interval-ms", "250",
        "--max-batch-records", "1000",
    ]  # fmt: skip
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    try:
        text = await asyncio.to_thread(get)
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- tests -----------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test started; any still alive at the end are killed."""
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        if proc.alive():
            proc.kill()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["standalone", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """One Redis, then the local Redis Cluster (3 primaries + 3 replicas): the worker
    detects the mode (``redis.mode: auto``); the same assertions hold on both."""
    name = "redis_url" if request.param == "standalone" else "redis_cluster_url"
    return cast(str, request.getfixturevalue(name))


@pytest.fixture
async def store_client(store_url: str) -> AsyncIterator[AnyRedis]:
    """A client of the mode ``store_url`` has (``RedisCluster`` on the cluster)."""
    client = await connect(RedisOptions(store_url))
    try:
        yield client
    finally:
        await client.aclose()


def metric(
    m: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, group: str
) -> float:
    return m.get((f"streamscore_stream_{name}_total", (("group", group),)), 0.0)


async def test_sigkill_between_apply_and_commit_replays_harmlessly(
    kafka: KafkaBroker,
    store_url: str,
    store_client: AnyRedis,
    tmp_path: Path,
    processes: list[WorkerProcess],
) -> None:
    topic, group_id = unique("eo"), unique("g")
    defs, text = definitions_for(topic)
    (definitions := tmp_path / "features.yaml").write_text(text)
    await ensure_topics(kafka.bootstrap_servers, {topic: 4})
    events, parts = make_events(11, 2000, 40, 8, 4, 3 * 3_600_000, 12 * MINUTE)
    produced = await produce(kafka, topic, 4, events, parts)
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    port = free_port()
    args = worker_args(
        kafka, store_url, definitions, group_id, commit_interval_s=3600, metrics_port=port
    )
    log = tmp_path / "worker.log"

    processes.append(first := WorkerProcess(args, log))
    await wait_until(lambda: fully_applied(store_client, produced), 60, "the first worker")
    first.kill()  # every tile written, no offset committed yet
    assert await committed(kafka.bootstrap_servers, group_id, topic, 4) == [None] * 4
    keys = [tile_key(g, k) for g in GROUPS for k in sorted(final_offsets(produced, g))]
    before = await read_hashes(store_client, keys)

    processes.append(second := WorkerProcess(args, log))

    async def replayed() -> bool:
        m = await scrape(port)
        return all(metric(m, "duplicate_events", g) == len(events) for g in GROUPS)

    await wait_until(replayed, 60, "the restarted worker to re-read every event")
    m = await scrape(port)
    assert [metric(m, "applied_events", g) for g in GROUPS] == [0.0, 0.0]
    assert await second.terminate() == 0  # SIGTERM: flush the commit, exit 0
    ends = [
        max(o for o, p in zip(produced.offsets, parts, strict=True) if p == q) for q in range(4)
    ]
    assert await committed(kafka.bootstrap_servers, group_id, topic, 4) == [e + 1 for e in ends]
    assert await read_hashes(store_client, keys) == before  # byte for byte
    await assert_tiles_match(store_client, produced, plans)


async def test_random_sigkills_apply_exactly_once(
    kafka: KafkaBroker,
    store_url: str,
    store_client: AnyRedis,
    tmp_path: Path,
    processes: list[WorkerProcess],
) -> None:
    """50,000 events on one Redis (12,000 on the cluster, whose per-node pipelines end
    with ``WAIT``: same kills and checks, a third of the time), 3-5 SIGKILLs at random
    points and commit intervals: every tile equals the direct fold."""
    topic, group_id = unique("kill"), unique("g")
    defs, text = definitions_for(topic)
    (definitions := tmp_path / "features.yaml").write_text(text)
    await ensure_topics(kafka.bootstrap_servers, {topic: 4})
    n = 12_000 if await detect_mode(store_url) == "cluster" else 50_000
    events, parts = make_events(23, n, 400, 40, 4, 6 * 3_600_000, 12 * MINUTE)
    produced = await produce(kafka, topic, 4, events, parts)
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    rng = random.Random(5)
    kills = rng.randint(3, 5)
    marks = sorted(rng.uniform(0.05, 0.9) * n for _ in range(kills))
    log = tmp_path / "worker.log"
    progress: list[int] = []
    for mark in marks:
        interval = rng.choice((0, 0.2, 1.0, 3600))
        args = worker_args(kafka, store_url, definitions, group_id, commit_interval_s=interval)
        processes.append(proc := WorkerProcess(args, log))

        async def past_mark(mark: float = mark) -> bool:
            return await applied_records(store_client, produced) >= mark

        await wait_until(past_mark, 60, f"progress past {mark:.0f} records")
        proc.kill()
        progress.append(await applied_records(store_client, produced))
    assert progress[-1] < n, "the worker finished before the last kill; kill earlier"

    args = worker_args(kafka, store_url, definitions, group_id, commit_interval_s=0.5)
    processes.append(last := WorkerProcess(args, log))
    await wait_until(lambda: fully_applied(store_client, produced), 90, "the final worker")
    assert await last.terminate() == 0
    await assert_tiles_match(store_client, produced, plans)
    late = sum(
        len(events) - sum(len(v) for v in kept_events(plans[g], events).values()) for g in GROUPS
    )
    assert late > 0, "the data set should exercise the lateness rule"


async def test_out_of_order_events_placed_by_event_time_and_too_late_dropped(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    topic = unique("late")
    defs, _ = definitions_for(topic)
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    minutes = [0, 20, 12, 5, 25, 16, 14]  # c0, in log order; lateness is 10 min
    events: list[dict[str, object]] = [
        {"card_id": "c0", "event_time_ms": T0 + m * MINUTE, "amount": float(i + 1)}
        for i, m in enumerate(minutes)
    ]
    # c1's first event is an hour older than c0's: lateness is per key, so it is kept.
    events.append({"card_id": "c1", "event_time_ms": T0 - 60 * MINUTE, "amount": 9.0})
    # c2: ten days apart, so trimming has expired tiles to remove.
    events.append({"card_id": "c2", "event_time_ms": T0 - 10 * DAY, "amount": 1.0})
    events.append({"card_id": "c2", "event_time_ms": T0, "amount": 2.0})
    for ev in events:
        ev["is_international"] = 0
    produced = await produce(kafka, topic, 1, events, [0] * len(events))

    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",))
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:
        await progress.wait_for(lambda: progress.total("records") == len(events), 30, "every event")
        assert sample(worker, "late_events", group="card_activity") == 2  # minutes 5 and 14
        assert sample(worker, "applied_events", group="card_activity") == len(events) - 2
        assert sample(worker, "events", topic=topic) == len(events)
        [c2_before] = await read_hashes(redis_client, [tile_key("card_activity", "c2")])
        await worker.trim_now()
        assert sample(worker, "trimmed_fields", group="card_activity") > 0

    keys = [tile_key("card_activity", k) for k in ("c0", "c1")]
    [c0, c1] = await read_hashes(redis_client, keys)
    count_field = field_name("count@1m", tile_start(T0 + 12 * MINUTE, MINUTE))
    assert float(c0[count_field.encode()]) == 1.0  # 8 min late, in its own event-time tile
    for m in (5, 14):
        late_tile = field_name("count@1m", tile_start(T0 + m * MINUTE, MINUTE))
        assert late_tile.encode() not in c0
    assert read_hash(plan, c0, T0 + 26 * MINUTE)["card_txn_count_1h"] == 5.0
    assert read_hash(plan, c1, T0)["card_txn_count_24h"] == 1.0
    [c2] = await read_hashes(redis_client, [tile_key("card_activity", "c2")])
    old = [k for k in c2_before if k[:1].isdigit() and int(k.split(b":")[0]) < T0 - 9 * DAY]
    assert old and not any(k in c2 for k in old)  # the ten-day-old tiles are gone
    assert len(c2) == len(c2_before) - len(old)
    for t in (T0 + 1, T0 + 2 * 3_600_000):
        assert read_hash(plan, c2, t) == read_hash(plan, c2_before, t)
    want = expected_tiles(plan, produced.events)
    for key, raw in (("c0", c0), ("c1", c1)):
        fields = {k.decode(): float(v) for k, v in raw.items() if not k.startswith(b"_")}
        assert_close_maps(fields, tiles_to_hash(want[key]), key)


async def test_malformed_events_go_to_the_dead_letter_topic(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    topic = unique("dlq")
    defs, _ = definitions_for(topic)
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    await ensure_topics(kafka.bootstrap_servers, {topic: 2})

    def encode(**fields: object) -> bytes:
        return json.dumps({"event_time_ms": T0, "is_international": 0, **fields}).encode()

    def good(card: str, minute: int) -> bytes:
        return encode(card_id=card, event_time_ms=T0 + minute * MINUTE, amount=10.0)

    bad_json, no_key, text_amount = (
        b"{not json",
        encode(amount=1.0),
        encode(card_id="c1", amount="1,5"),
    )
    bad_field = {bad_json: None, no_key: "card_id", text_amount: "amount"}
    records = [
        (0, good("c0", 0)),
        (0, bad_json),
        (0, good("c0", 1)),
        (0, no_key),
        (0, good("c0", 2)),
        (1, good("c1", 0)),
        (1, text_amount),
        (1, good("c1", 1)),
    ]
    offsets = await produce_raw(kafka.bootstrap_servers, topic, records)
    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",))
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:
        await progress.wait_for(
            lambda: progress.total("records") == len(records), 30, "every record"
        )
        assert sample(worker, "malformed_events", topic=topic) == 3
        assert sample(worker, "applied_events", group="card_activity") == 5

    [c0, c1] = await read_hashes(redis_client, [tile_key("card_activity", k) for k in ("c0", "c1")])
    assert read_hash(plan, c0, T0 + 3 * MINUTE)["card_txn_count_5m"] == 3.0
    assert read_hash(plan, c1, T0 + 3 * MINUTE)["card_txn_count_5m"] == 2.0
    # Committed past the bad records: they never block their partition.
    assert await committed(kafka.bootstrap_servers, config.group_id, topic, 2) == [5, 3]

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        tp = TopicPartition(dead_letter_topic(topic), 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(15):
            while len(letters) < 3:
                for msgs in (await consumer.getmany(timeout_ms=200)).values():
                    letters += [DeadLetter.from_record(m.value, m.key, m.headers) for m in msgs]
    finally:
        await consumer.stop()
    got = sorted((d.partition, d.offset, d.value, d.field) for d in letters)
    want = sorted(
        (p, off, value, bad_field[value])
        for (p, value), off in zip(records, offsets, strict=True)
        if value in bad_field
    )
    assert got == want  # original bytes, where they came from, the offending field
    assert all(d.topic == topic and d.error for d in letters)


async def test_two_workers_split_partitions_and_totals_stay_exact(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    topic = unique("pair")
    defs, _ = definitions_for(topic)
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    await ensure_topics(kafka.bootstrap_servers, {topic: 4})
    events, parts = make_events(31, 6000, 60, 8, 4, 3 * 3_600_000, 12 * MINUTE)
    # No interval commit during the test: only the revoke flush commits A's work.
    config = fast_config(kafka, redis_url, max_batch_records=200, commit_interval_s=600)
    all_tps = {TopicPartition(topic, p) for p in range(4)}
    progress = Progress()

    def handled(group: str) -> int:
        return progress.total("applied", group) + progress.total("late", group)

    async with running(StreamWorker(config, defs, on_batch=progress)) as a:
        first = await produce(kafka, topic, 4, events[:3000], parts[:3000])
        await progress.wait_for(lambda: handled("card_activity") == 3000, 30, "worker A")
        assert a.assignment() == all_tps
        async with running(StreamWorker(config, defs, on_batch=progress)) as b:
            # The second half arrives while B joins and the group rebalances.
            second = await produce(kafka, topic, 4, events[3000:], parts[3000:])
            async with asyncio.timeout(30):
                await b.wait_for_assignment()
                await a.wait_for_assignment()
            assert a.assignment() and b.assignment()
            assert a.assignment().isdisjoint(b.assignment())
            assert a.assignment() | b.assignment() == all_tps
            await progress.wait_for(
                lambda: all(handled(g) == len(events) for g in GROUPS), 30, "both workers"
            )
            for g in GROUPS:
                kept = sum(len(v) for v in kept_events(plans[g], events).values())
                assert progress.total("applied", g) == kept
                by_metrics = sample(a, "applied_events", group=g) + sample(
                    b, "applied_events", group=g
                )
                assert by_metrics == kept
            # A applied and committed its in-flight batch before giving partitions up,
            # so B re-read nothing.
            for w in (a, b):
                assert sample(w, "duplicate_events", group="card_activity") == 0
                assert sample(w, "commit_failures") == 0
    produced = Produced(topic, 4, events, parts, [*first.offsets, *second.offsets])
    assert await fully_applied(redis_client, produced)
    await assert_tiles_match(redis_client, produced, plans)


async def test_redis_outage_is_retried_and_nothing_commits_until_applied(
    kafka: KafkaBroker,
) -> None:
    topic = unique("outage")
    defs, _ = definitions_for(topic)
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    events: list[dict[str, object]] = [
        {"card_id": "c0", "event_time_ms": T0 + i * 1000, "amount": 1.0, "is_international": 0}
        for i in range(10)
    ]
    await produce(kafka, topic, 1, events, [0] * len(events))
    port = free_port()  # nothing listens here yet
    progress = Progress()
    config = fast_config(
        kafka,
        f"redis://127.0.0.1:{port}/0",
        stream_groups=("card_activity",),
        redis_retry_max_s=0.2,
    )
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:

        async def failing() -> bool:
            return (
                worker.registry.get_sample_value("streamscore_stream_redis_errors_total") or 0
            ) > 0

        await wait_until(failing, 30, "a failed apply")
        assert progress.reports == []
        assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [None]
        with redis_server(port) as server:
            await progress.wait_for(lambda: progress.total("records") == 10, 30, "the retry")
            client = Redis.from_url(server.url)
            try:
                [raw] = await read_hashes(client, [tile_key("card_activity", "c0")])
            finally:
                await client.aclose()
            assert read_hash(plan, raw, T0 + 10_000)["card_txn_count_5m"] == 10.0
            assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [10]


async def test_poison_records_go_to_the_dead_letter_topic_and_never_stop_the_partition(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    """Records that broke decoding or tile math itself (deep nesting, numbers beyond a
    float) and a far-future event time, which would raise the key's lateness mark and
    drop its real events as late, are dead letters; the events around them apply."""
    topic = unique("poison")
    defs, _ = definitions_for(topic)
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    now = int(time.time() * 1000) // MINUTE * MINUTE

    def event(minute: int, **fields: object) -> bytes:
        base = {"card_id": "c0", "event_time_ms": now + minute * MINUTE, "is_international": 0}
        return json.dumps({**base, "amount": 10.0, **fields}).encode()

    poison = {
        b"[" * 50_000 + b"]" * 50_000: None,
        event(0, event_time_ms=10**400): "event_time_ms",
        event(0, amount=10**400): "amount",
        event(0, amount=True): "amount",
        event(0, event_time_ms=now * 1000): "event_time_ms",  # microseconds by mistake
        event(0, event_time_ms=now + 30 * 86_400_000): "event_time_ms",  # a month ahead
    }
    records = [(0, event(-3)), *((0, value) for value in poison), (0, event(-2)), (0, event(-1))]
    await produce_raw(kafka.bootstrap_servers, topic, records)
    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",))
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:
        await progress.wait_for(
            lambda: progress.total("records") == len(records), 30, "every record"
        )
        assert sample(worker, "malformed_events", topic=topic) == len(poison)
        assert sample(worker, "applied_events", group="card_activity") == 3
        assert sample(worker, "late_events", group="card_activity") == 0
    [c0] = await read_hashes(redis_client, [tile_key("card_activity", "c0")])
    assert read_hash(plan, c0, now + MINUTE)["card_txn_count_5m"] == 3.0
    assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [len(records)]

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        tp = TopicPartition(dead_letter_topic(topic), 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(15):
            while len(letters) < len(poison):
                for msgs in (await consumer.getmany(timeout_ms=200)).values():
                    letters += [DeadLetter.from_record(m.value, m.key, m.headers) for m in msgs]
    finally:
        await consumer.stop()
    assert sorted(((d.value, d.field) for d in letters), key=str) == sorted(poison.items(), key=str)


async def test_expired_tiles_are_trimmed_periodically(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    """Without ``trim_now``: the run loop trims keys written since the last round
    every ``trim_interval_s``."""
    topic = unique("trim")
    defs, _ = definitions_for(topic)
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    events: list[dict[str, object]] = [
        {"card_id": "c2", "event_time_ms": T0 - 10 * DAY, "amount": 1.0, "is_international": 0},
        {"card_id": "c2", "event_time_ms": T0, "amount": 2.0, "is_international": 0},
    ]
    await produce(kafka, topic, 1, events, [0] * len(events))
    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",), trim_interval_s=0.2)
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:
        await progress.wait_for(lambda: progress.total("records") == len(events), 30, "events")
        for _ in range(200):  # trims run between batches: poll, up to 10 s
            if sample(worker, "trimmed_fields", group="card_activity") > 0:
                break
            await asyncio.sleep(0.05)
        assert sample(worker, "trimmed_fields", group="card_activity") > 0
    [c2] = await read_hashes(redis_client, [tile_key("card_activity", "c2")])
    assert not [k for k in c2 if k[:1].isdigit() and int(k.split(b":")[0]) < T0 - 9 * DAY]
