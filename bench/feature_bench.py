"""Feature-layer benchmarks: micro-batch feature fetch vs bare redis-py, fetched vs sent.

1. ``fetch``: ``FeatureStore.fill`` for a 64-request micro-batch (every request has a
   card, a customer and a merchant: 2 batch groups + 2 stream groups, windows
   evaluated) against a bare pipelined ``HGETALL`` of the same keys with redis-py,
   on the same Redis (a private ``redis-server`` started here). Both share the
   machine's 2 cores with Redis: Redis is pinned to core 0, this process (the Redis
   client, both sides) to core 1. After a warm-up, bare and ours alternate for
   ``--rounds`` rounds; the ratio is the median of the rounds. Target >= 0.7x.
   ``window_read``: the part of it that changed most, the windows of one fetched card
   hash read by parsing every field vs by the server's ``HashWindowReader``.
2. ``score``: Score throughput with features fetched from Redis vs the same
   features sent in the request (no fetch), same server settings, 64 callers;
   server pinned to core 0, load generator to core 1. ``--profile-out PATH`` then
   py-spies the server under the fetched load (``--py-spy``: the binary to use).
   ``--score-write-rate N`` applies N new events per second to the tile hashes during
   every scenario (a live stream, so the server's tile cache sees changed hashes);
   ``--score-warmup S`` loads each scenario for S seconds before measuring it.
3. ``--cluster-fetch``: ``FeatureStore.fill`` for the same 64-request micro-batches
   on a local Redis Cluster (3 primaries + 3 replicas) vs one Redis, both seeded with
   the same data and running at once. Every redis-server (both sides) is pinned to
   core 0, this process (the client) to core 1; the cluster's node timeout is raised
   to 5 s for the run, so seven servers on one busy core do not fail over (checked:
   the JSON says whether any node changed role). After a warm-up, single and cluster
   alternate for ``--rounds`` rounds; the ratio (cluster / single) is the median.
   Target >= 0.7x.
4. ``--cluster-score``: Score with features fetched at 64 callers, the server reading
   one Redis vs the cluster (same data). Server on core 0, load generator and every
   redis-server on core 1 (Redis is outside the server's core, as in production);
   ``features.fetch_timeout_s`` 1 s on both sides, so the comparison is throughput,
   not degraded answers. Single and cluster alternate for ``--rounds`` rounds of
   ``--duration`` s; the ratio is the median. Target >= 0.8x.
   ``--cluster-fetch`` and ``--cluster-score`` run only what they name (both: both).

    python -m bench.feature_bench --json-out bench/results/features.json
    python -m bench.feature_bench --cluster-fetch --cluster-score \
        --json-out bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis as sync_redis
from redis.asyncio import Redis

from bench.pinning import CLIENT_CPUS, SERVER_CPUS
from demo.synthetic import DEMO_FEATURES, REQUEST_FEATURES
from devstack.services import LocalRedisCluster, RedisServer, redis_cluster, redis_server
from feature_streams.batch_store import activate, write_snapshot
from feature_streams.definitions import FeatureDefinitions, load_definitions
from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.hash_reader import HashWindowReader
from feature_streams.keys import data_key, tile_key
from feature_streams.redis_client import AnyRedis, RedisOptions, connect
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, read_hash, updates_for_event
from server.feature_store import FeatureStore, StoreOptions
from server.features import FeatureLayout, Prepared
from server.manifest import ModelManifest, TensorSpec, TrainingInfo

DEFINITIONS = Path("features.yaml")
NOW_MS = int(time.time() * 1000)
FETCH_TIMEOUT_S = 5.0
"""The cluster comparison measures throughput, not the server's fetch timeout (50 ms
by default), which a loaded 2-core machine can exceed on either side."""


def _manifest() -> ModelManifest:
    return ModelManifest(
        name="fraud",
        version="1",
        features=DEMO_FEATURES,
        input=TensorSpec(name="features", dtype="float32"),
        outputs=(TensorSpec(name="probabilities", dtype="float32"),),
        score_output="probabilities",
        sha256="0" * 64,
        training=TrainingInfo(
            data_snapshot="-", code_commit="-", created_at=datetime(2026, 1, 1, tzinfo=UTC)
        ),
    )


async def seed(
    client: AnyRedis, defs: FeatureDefinitions, cards: int, events_per_card: int
) -> None:
    """Batch snapshots for every entity and a day of events per card (and merchant)."""
    rng = random.Random(1)
    for group, prefix in (("customer_profile", "customer_id"), ("card_profile", "card_id")):
        fields = list(defs.batch_groups[group].fields)
        rows = ((f"{prefix}-{i}", {f: rng.random() * 100 for f in fields}) for i in range(cards))
        info = await write_snapshot(client, group, rows)
        await activate(client, group, info.snapshot_id)
    plans = {name: GroupPlan.build(g) for name, g in defs.stream_groups.items()}
    store = TileStore(client)
    written: dict[str, set[str]] = {name: set() for name in plans}
    for card in range(cards):
        events: list[dict[str, Any]] = [
            {
                "card_id": f"card_id-{card}",
                "merchant_id": f"merchant_id-{card % 50}",
                "event_time_ms": NOW_MS - rng.randrange(86_400_000),
                "amount": rng.random() * 300,
                "is_international": rng.randrange(2),
            }
            for _ in range(events_per_card)
        ]
        batches = []
        for name, plan in plans.items():
            by_key: dict[str, list[EventUpdates]] = {}
            for offset, event in enumerate(events):
                key = tile_key(name, str(event[plan.group.key]))
                by_key.setdefault(key, []).append(
                    EventUpdates(
                        card * 10_000 + offset,
                        int(event["event_time_ms"]),
                        updates_for_event(plan, event),
                    )
                )
            batches += [
                KeyBatch(k, "bench", 0, plan.retention_ms, 10**12, u) for k, u in by_key.items()
            ]
            written[name].update(by_key)
        await store.apply(batches)
    for name, plan in plans.items():  # what the worker's periodic trim leaves in a hash
        await store.trim(plan, sorted(written[name]))


def _prepared(layout: FeatureLayout, card: int) -> Prepared:
    ids = {
        "card_id": f"card_id-{card}",
        "customer_id": f"customer_id-{card}",
        "merchant_id": f"merchant_id-{card % 50}",
    }
    request = {"amount": 50.0, "hour_of_day": 12.0}
    return layout.prepare(request, ids, NOW_MS)


async def bench_fetch(
    url: str, defs: FeatureDefinitions, cards: int, seconds: float, rounds_n: int = 3
) -> dict[str, Any]:
    """FeatureStore.fill vs bare pipelined HGETALL of the same keys, 64 requests a batch:
    after a warm-up, ``rounds_n`` alternating rounds of ``seconds`` each; the ratio is
    the median of the rounds' ratios (each round's pair ran back to back)."""
    client = Redis.from_url(url)
    cache = BatchSnapshotCache(client, defs.batch_groups)
    await cache.refresh()
    layout = FeatureLayout.from_manifest(_manifest(), defs)
    store = FeatureStore(client, cache)
    rng = random.Random(2)
    batches = [[rng.randrange(cards) for _ in range(64)] for _ in range(200)]
    snapshots = cache.snapshot_ids()

    def keys_of(batch: list[int]) -> list[str]:
        keys = []
        for card in batch:
            customer, card_snapshot = snapshots["customer_profile"], snapshots["card_profile"]
            keys.append(data_key("customer_profile", customer or "", f"customer_id-{card}"))
            keys.append(data_key("card_profile", card_snapshot or "", f"card_id-{card}"))
            keys.append(tile_key("card_activity", f"card_id-{card}"))
            keys.append(tile_key("merchant_activity", f"merchant_id-{card % 50}"))
        return keys

    async def bare(duration_s: float) -> float:
        done = 0
        started = time.perf_counter()
        deadline = started + duration_s
        while time.perf_counter() < deadline:
            for batch in batches:
                async with client.pipeline(transaction=False) as pipe:
                    for key in keys_of(batch):
                        pipe.hgetall(key)
                    await pipe.execute()
                done += len(batch)
        return done / (time.perf_counter() - started)

    async def ours(duration_s: float) -> float:
        return await _fill_rate(store, layout, batches, duration_s)

    await bare(min(seconds, 1.0))  # warm up: connections, Redis pages, code paths
    await ours(min(seconds, 1.0))
    rounds = []
    for _ in range(rounds_n):  # alternate, so drift on a shared machine hits both
        bare_rps, ours_rps = await bare(seconds), await ours(seconds)
        rounds.append({"bare_hgetall": bare_rps, "feature_store_fill": ours_rps})
    await client.aclose()
    ratios = sorted(r["feature_store_fill"] / r["bare_hgetall"] for r in rounds)
    return {
        "rounds": rounds,
        "ratios_fill_vs_bare": ratios,
        "ratio_fill_vs_bare": statistics.median(ratios),
    }


async def bench_window_read(url: str, defs: FeatureDefinitions, cards: int) -> dict[str, Any]:
    """Windows of one fetched card tile hash: ``windows.read_hash`` (parse every field)
    vs ``HashWindowReader.read`` (look up the fields each window reads), us per hash."""
    client = Redis.from_url(url)
    keys = [tile_key("card_activity", f"card_id-{i}") for i in range(min(cards, 500))]
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        hashes = await pipe.execute()
    await client.aclose()
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    reader = HashWindowReader(plan)

    def per_hash(read: Any) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for rep in range(10):
                for fields in hashes:
                    read(fields, NOW_MS + rep)
            best = min(best, (time.perf_counter() - started) / (10 * len(hashes)))
        return best * 1e6

    parse_us = per_hash(lambda fields, t: read_hash(plan, fields, t))
    lookup_us = per_hash(reader.read)
    return {
        "hashes": len(hashes),
        "mean_fields": sum(map(len, hashes)) / len(hashes),
        "parse_us_per_hash": parse_us,
        "reader_us_per_hash": lookup_us,
        "speedup": parse_us / lookup_us,
    }


async def _fill_rate(
    store: FeatureStore, layout: FeatureLayout, batches: list[list[int]], duration_s: float
) -> float:
    """Requests per second through ``store.fill``, 64-request batches, for ``duration_s``."""
    done = 0
    started = time.perf_counter()
    deadline = started + duration_s
    while time.perf_counter() < deadline:
        for batch in batches:
            prepared = [_prepared(layout, card) for card in batch]
            await store.fill(layout, prepared, "fail")
            done += len(batch)
    return done / (time.perf_counter() - started)


async def bench_cluster_fetch(
    single_url: str,
    cluster_url: str,
    defs: FeatureDefinitions,
    cards: int,
    seconds: float,
    rounds_n: int = 3,
) -> dict[str, Any]:
    """``FeatureStore.fill`` of the same 64-request micro-batches on the cluster vs on
    one Redis (same data): after a warm-up, ``rounds_n`` alternating rounds of
    ``seconds`` each; the ratio (cluster / single) is the median of the rounds'."""
    layout = FeatureLayout.from_manifest(_manifest(), defs)
    rng = random.Random(2)
    batches = [[rng.randrange(cards) for _ in range(64)] for _ in range(200)]
    stores: dict[str, FeatureStore] = {}
    clients: list[AnyRedis] = []
    for name, url, mode in (
        ("single", single_url, "standalone"),
        ("cluster", cluster_url, "cluster"),
    ):
        client = await connect(RedisOptions(url, mode))  # type: ignore[arg-type]
        clients.append(client)
        cache = BatchSnapshotCache(client, defs.batch_groups)
        await cache.refresh()
        stores[name] = FeatureStore(client, cache, StoreOptions(timeout_s=FETCH_TIMEOUT_S))
    try:
        for store in stores.values():  # warm up: connections, slot map, Redis pages
            await _fill_rate(store, layout, batches, min(seconds, 1.0))
        rounds = []
        for _ in range(rounds_n):  # alternate, so drift on a shared machine hits both
            single = await _fill_rate(stores["single"], layout, batches, seconds)
            cluster = await _fill_rate(stores["cluster"], layout, batches, seconds)
            rounds.append({"single_rps": single, "cluster_rps": cluster})
    finally:
        for client in clients:
            await client.aclose()
    ratios = sorted(r["cluster_rps"] / r["single_rps"] for r in rounds)
    return {
        "rounds": rounds,
        "ratios_cluster_vs_single": ratios,
        "ratio_cluster_vs_single": statistics.median(ratios),
        "batch_size": 64,
        "cluster": "3 primaries + 3 replicas, local",
    }


@contextlib.contextmanager
def _pinned_apart(redis_pid: int) -> Iterator[None]:
    """Redis on the server core, this process (the Redis client) on the client core."""
    ours = os.sched_getaffinity(0)
    theirs = os.sched_getaffinity(redis_pid)
    os.sched_setaffinity(redis_pid, SERVER_CPUS)
    os.sched_setaffinity(0, CLIENT_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, ours)
        os.sched_setaffinity(redis_pid, theirs)


@contextlib.contextmanager
def _pinned(pids: Iterable[int], cpus: Iterable[int]) -> Iterator[None]:
    """Every thread of every process in ``pids`` on ``cpus`` (restored on exit)."""
    saved: dict[int, set[int]] = {}
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            tid = int(task)
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, set(cpus))
    try:
        yield
    finally:
        for tid, previous in saved.items():
            with contextlib.suppress(OSError):  # a thread that ended
                os.sched_setaffinity(tid, previous)


def _redis_pids(single: RedisServer, cluster: LocalRedisCluster) -> list[int]:
    return [single.process.pid, *(node.process.pid for node in cluster.nodes)]


def _roles(cluster: LocalRedisCluster, node_timeout_ms: int | None = None) -> list[str]:
    """Every node's role (``master``/``slave``); optionally sets its node timeout first."""
    roles = []
    for node in cluster.nodes:
        client = sync_redis.Redis(host=node.host, port=node.port)
        try:
            if node_timeout_ms is not None:
                client.config_set("cluster-node-timeout", node_timeout_ms)
            roles.append(str(client.info("replication")["role"]))
        finally:
            client.close()
    return roles


@contextlib.contextmanager
def _single_and_cluster(
    args: argparse.Namespace, defs: FeatureDefinitions
) -> Iterator[tuple[RedisServer, LocalRedisCluster, list[str]]]:
    """One Redis and a local 3 + 3 cluster, seeded alike; the cluster's node timeout
    raised to 5 s (pinned onto one busy core, 1 s heartbeats get missed). Yields the
    nodes' roles at the start (compare with :func:`_roles` after the run)."""
    with redis_server() as single, redis_cluster(3) as cluster:
        roles = _roles(cluster, node_timeout_ms=5000)

        async def seed_both() -> None:
            for url, mode in ((single.url, "standalone"), (cluster.url, "cluster")):
                client = await connect(RedisOptions(url, mode))  # type: ignore[arg-type]
                try:
                    await seed(client, defs, args.cards, args.events_per_card)
                finally:
                    await client.aclose()

        asyncio.run(seed_both())
        yield single, cluster, roles


def run_cluster_fetch(
    args: argparse.Namespace,
    defs: FeatureDefinitions,
    single: RedisServer,
    cluster: LocalRedisCluster,
) -> dict[str, Any]:
    """:func:`bench_cluster_fetch` with every redis-server on the server core and this
    process (the client of both) on the client core."""
    with _pinned(_redis_pids(single, cluster), SERVER_CPUS), _pinned([os.getpid()], CLIENT_CPUS):
        fetch = asyncio.run(
            bench_cluster_fetch(
                single.url, cluster.url, defs, args.cards, args.seconds, args.rounds
            )
        )
    return {**fetch, "redis_cpus": list(SERVER_CPUS), "client_cpus": list(CLIENT_CPUS)}


def run_cluster_score(
    args: argparse.Namespace, single: RedisServer, cluster: LocalRedisCluster
) -> dict[str, Any]:
    """Score with features fetched, 64 callers: the server on one Redis vs on the
    cluster, alternating for ``args.rounds`` rounds; every redis-server on the client
    core (the server under test keeps its core)."""
    from bench.serving_bench import Scenario, run_scenario

    loadgen = (
        *("--entities", "card_id,customer_id,merchant_id"),
        *("--entity-cardinality", str(args.cards)),
        *("--request-features", ",".join(REQUEST_FEATURES)),
    )

    def scenario(name: str, url: str, mode: str) -> Scenario:
        settings = (
            "features.definitions_path=features.yaml",
            f"redis.url={url}",
            f"redis.mode={mode}",
            "features.fetch_timeout_s=1.0",  # throughput, not degraded answers
            "traffic_log.sample_rate=0",  # no decision records on either side
        )
        return Scenario(name, "streamscore", settings, loadgen_args=loadgen)

    sides = {
        "single": scenario("score features fetched c64, one Redis", single.url, "standalone"),
        "cluster": scenario("score features fetched c64, cluster", cluster.url, "cluster"),
    }
    rounds = []
    with _pinned(_redis_pids(single, cluster), CLIENT_CPUS):
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
            one: dict[str, Any] = {}
            for side, sc in sides.items():
                m = run_scenario(sc, args.repository, "fraud", args.duration, 1.0)
                one[side] = {
                    "throughput_rps": m.throughput_rps,
                    "latency_us": m.latency_us,
                    "server_cpu_us_per_request": m.server_cpu_us_per_request,
                    "errors": m.errors,
                    **m.extra,
                }
            one["ratio"] = one["cluster"]["throughput_rps"] / one["single"]["throughput_rps"]
            rounds.append(one)
    ratios = sorted(r["ratio"] for r in rounds)
    return {
        "rounds": rounds,
        "ratios_cluster_vs_single": ratios,
        "ratio_cluster_vs_single": statistics.median(ratios),
        "callers": 64,
        "server_cpus": list(SERVER_CPUS),
        "redis_and_client_cpus": list(CLIENT_CPUS),
    }


def run_cluster(args: argparse.Namespace, defs: FeatureDefinitions) -> dict[str, Any]:
    """``--cluster-fetch`` and/or ``--cluster-score`` on one pair of seeded stores."""
    out: dict[str, Any] = {}
    with _single_and_cluster(args, defs) as (single, cluster, roles):
        if args.cluster_fetch:
            out["cluster_fetch"] = run_cluster_fetch(args, defs, single, cluster)
        if args.cluster_score:
            out["cluster_score"] = run_cluster_score(args, single, cluster)
        out["cluster_roles_unchanged"] = _roles(cluster) == roles  # no failover mid-run
    return {
        **out,
        "cards": args.cards,
        "events_per_card": args.events_per_card,
        "seconds_per_round": args.seconds,
        "score_duration_s": args.duration,
        "load_average_after": os.getloadavg(),
    }


class LiveWrites:
    """New events applied to the tile hashes while a block runs, as a stream worker
    would: ``events_per_s`` events "now" (every 20 ms a share), each on a random card
    and its merchant, by a thread pinned to the client core with its own loop."""

    def __init__(self, url: str, defs: FeatureDefinitions, cards: int, events_per_s: float):
        self._url = url
        self._plans = {name: GroupPlan.build(g) for name, g in defs.stream_groups.items()}
        self._cards = cards
        self._rate = events_per_s
        # above every offset of the seed and of any earlier writer on the same hashes (a
        # scenario's writer restarting at one base had every event refused as a duplicate)
        self._offset = 10**9 + time.time_ns() // 1000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0
        """Events written (each updates a card hash and a merchant hash)."""
        self.applied = 0
        """Hash updates applied (about two per event)."""
        self.seconds = 0.0

    def __enter__(self) -> LiveWrites:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="live-writes", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        os.sched_setaffinity(0, CLIENT_CPUS)
        asyncio.run(self._write())

    async def _write(self) -> None:
        client = Redis.from_url(self._url)
        store = TileStore(client)
        rng = random.Random(2)
        started = time.monotonic()
        owed = 0.0
        try:
            while not self._stop.is_set():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                owed += (now - started - self.seconds) * self._rate
                self.seconds = now - started
                n, owed = int(owed), owed - int(owed)
                if n:
                    result = await store.apply(self._batches(rng, n))
                    self.events += n
                    self.applied += result.applied
        finally:
            await client.aclose()

    def _batches(self, rng: random.Random, n: int) -> list[KeyBatch]:
        by_key: dict[tuple[str, str], list[EventUpdates]] = {}
        now_ms = int(time.time() * 1000)
        for _ in range(n):
            card = rng.randrange(self._cards)
            event = {
                "card_id": f"card_id-{card}",
                "merchant_id": f"merchant_id-{card % 50}",
                "event_time_ms": now_ms,
                "amount": rng.random() * 300,
                "is_international": rng.randrange(2),
            }
            self._offset += 1
            for name, plan in self._plans.items():
                key = tile_key(name, str(event[plan.group.key]))
                updates = EventUpdates(self._offset, now_ms, updates_for_event(plan, event))
                by_key.setdefault((name, key), []).append(updates)
        return [
            KeyBatch(key, "bench", 0, self._plans[name].retention_ms, 10**12, events)
            for (name, key), events in by_key.items()
        ]


def bench_score(
    url: str,
    repository: Path,
    cards: int,
    duration_s: float,
    rounds_n: int = 1,
    write_rate: float = 0.0,
    defs: FeatureDefinitions | None = None,
    warmup_s: float = 1.0,
) -> dict[str, Any]:
    """Score throughput with features fetched from Redis vs all sent in the request:
    ``rounds_n`` alternating rounds (sent, fetched); the ratio is the median of the
    rounds' ratios. ``write_rate`` > 0: that many new events per second are applied to
    the tile hashes during every scenario (:class:`LiveWrites`), both sides.
    ``warmup_s``: load before the measured ``duration_s`` of each scenario (the server
    starts with empty in-process caches in every scenario)."""
    from bench.serving_bench import Scenario, run_scenario

    features = ("features.definitions_path=features.yaml", f"redis.url={url}")
    entities = ("--entities", "card_id,customer_id,merchant_id")
    cardinality = ("--entity-cardinality", str(cards))
    request_only = ("--request-features", ",".join(REQUEST_FEATURES))
    scenarios = [
        Scenario("score features sent c64", "streamscore",
                 (*features, "server.overrides.allow_all=true"),  # store features sent
                 loadgen_args=(*entities, *cardinality)),
        Scenario("score features fetched c64", "streamscore", features,
                 loadgen_args=(*entities, *cardinality, *request_only)),
    ]  # fmt: skip
    rounds: list[dict[str, Any]] = []
    for _ in range(rounds_n):  # alternate, so drift on a shared machine hits both
        out: dict[str, Any] = {}
        for scenario in scenarios:
            writes: dict[str, float] = {}
            if write_rate > 0:
                assert defs is not None
                with LiveWrites(url, defs, cards, write_rate) as live:
                    m = run_scenario(scenario, repository, "fraud", duration_s, warmup_s)
                writes = {
                    "events": live.events,
                    "events_per_s": live.events / live.seconds,
                    "hash_updates_applied": live.applied,
                }
            else:
                m = run_scenario(scenario, repository, "fraud", duration_s, warmup_s)
            out[scenario.name] = {
                "throughput_rps": m.throughput_rps,
                "latency_us": m.latency_us,
                "server_cpu_us_per_request": m.server_cpu_us_per_request,
                "errors": m.errors,
                **({"live_writes": writes} if writes else {}),
            }
        sent = out["score features sent c64"]["throughput_rps"]
        out["ratio_fetched_vs_sent"] = out["score features fetched c64"]["throughput_rps"] / sent
        rounds.append(out)
    if rounds_n == 1:
        return rounds[0]  # the shape earlier results were recorded in
    ratios = sorted(r["ratio_fetched_vs_sent"] for r in rounds)
    return {
        "rounds": rounds,
        "ratios_fetched_vs_sent": ratios,
        "ratio_fetched_vs_sent": statistics.median(ratios),
    }


def profile_score(
    url: str, repository: Path, cards: int, out: Path, py_spy: str, seconds: float = 15.0
) -> dict[str, Any]:
    """py-spy (GIL samples, 100 Hz, ``--format raw``) of the pinned server for ``seconds``
    while 64 callers send Score with features fetched; the sampler runs on the client
    core. Read it with ``python -m bench.profile_top OUT --no-lines``."""
    import subprocess

    from bench.pinning import taskset_prefix
    from bench.serving_bench import Scenario, _server
    from devstack.services import free_port

    scenario = Scenario(
        "score features fetched c64 (profiled)",
        "streamscore",
        ("features.definitions_path=features.yaml", f"redis.url={url}"),
    )
    port = free_port()
    manifest = sorted((repository / "fraud").iterdir())[-1]
    with _server(scenario, repository, port) as server:
        loadgen = [
            *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.loadgen",
            "--target", f"127.0.0.1:{port}", "--api", "score", "--model", "fraud",
            "--manifest", str(manifest), "--connections", "4", "--concurrency", "64",
            "--duration", str(seconds + 6.0), "--warmup", "2",
            "--entities", "card_id,customer_id,merchant_id",
            "--entity-cardinality", str(cards),
            "--request-features", ",".join(REQUEST_FEATURES),
        ]  # fmt: skip
        load = subprocess.Popen(loadgen, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(5.0)  # client start-up, warm-up
        record = [
            *taskset_prefix(CLIENT_CPUS), py_spy, "record", "--pid", str(server.pid),
            "--duration", str(int(seconds)), "--rate", "100", "--gil",
            "--format", "raw", "-o", str(out),
        ]  # fmt: skip
        subprocess.run(record, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stdout, _ = load.communicate()
    result = json.loads(stdout)
    return {"profile": str(out), "throughput_rps": result["throughput_rps"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feature_bench", description=__doc__)
    parser.add_argument("--cards", type=int, default=5000)
    parser.add_argument("--events-per-card", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0, help="fetch: seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="fetch: alternating rounds")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--duration", type=float, default=6.0, help="Score scenarios, seconds")
    parser.add_argument("--score-rounds", type=int, default=1, help="score: alternating rounds")
    parser.add_argument(
        "--parts",
        default="fetch,window_read,score",
        help="comma-separated parts to run (fetch, window_read, score); default all",
    )
    parser.add_argument(
        "--score-write-rate",
        type=float,
        default=0.0,
        help="score: new events per second applied to the tile hashes during every "
        "scenario (a live stream; default 0: static data)",
    )
    parser.add_argument(
        "--score-warmup",
        type=float,
        default=1.0,
        help="score: seconds of load before each scenario's measured duration (default 1; "
        "longer warms the server's caches, which start empty in every scenario)",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--profile-out",
        type=Path,
        default=None,
        help="score part: after the rounds, py-spy the server (features fetched) into this file",
    )
    parser.add_argument("--py-spy", default="py-spy", help="py-spy binary for --profile-out")
    parser.add_argument(
        "--cluster-fetch",
        action="store_true",
        help="the fetch on a local 3-primary Redis Cluster vs one Redis (only the cluster parts)",
    )
    parser.add_argument(
        "--cluster-score",
        action="store_true",
        help="Score at 64 callers on the cluster vs one Redis (only the cluster parts)",
    )
    args = parser.parse_args(argv)
    defs = load_definitions(DEFINITIONS)
    if args.cluster_fetch or args.cluster_score:
        _write(run_cluster(args, defs), args.json_out)
        return 0
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"fetch", "window_read", "score"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    with redis_server() as redis:

        async def run() -> dict[str, Any]:
            client = Redis.from_url(redis.url)
            await seed(client, defs, args.cards, args.events_per_card)
            await client.aclose()
            out: dict[str, Any] = {}
            if "fetch" in parts:
                out["fetch"] = await bench_fetch(
                    redis.url, defs, args.cards, args.seconds, args.rounds
                )
            if "window_read" in parts:
                out["window_read"] = await bench_window_read(redis.url, defs, args.cards)
            return out

        with _pinned_apart(redis.process.pid):
            result = asyncio.run(run())
        if "score" in parts:
            result["score"] = bench_score(
                redis.url,
                args.repository,
                args.cards,
                args.duration,
                args.score_rounds,
                args.score_write_rate,
                defs,
                args.score_warmup,
            )
            if args.profile_out is not None:
                result["score_profile"] = profile_score(
                    redis.url, args.repository, args.cards, args.profile_out, args.py_spy
                )
        result |= {"cards": args.cards, "events_per_card": args.events_per_card}
    _write(result, args.json_out)
    return 0


def _write(result: dict[str, Any], json_out: Path | None) -> None:
    print(json.dumps(result, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
