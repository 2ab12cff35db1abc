"""Tile hashes kept by version in the fetcher, against a real Redis: a kept hash is
served only while Redis holds the same version (read in the micro-batch's round trip;
a changed hash is read whole in a second one), and every read equals one without the
cache across writes, late events, trims, deletions and re-creations."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from feature_streams.definitions import load_definitions
from feature_streams.fetcher import KEY_ERROR, BatchSnapshotCache, FeatureFetcher
from feature_streams.keys import LAST_TS_FIELD, VERSION_FIELD, offset_field, tile_key
from feature_streams.read_plan import FetchPlan, FetchRow
from feature_streams.redis_client import RedisOptions, connect
from feature_streams.tile_cache import TileHashCache
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, event_time, updates_for_event

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEFS = load_definitions(REPO / "features.yaml")
GROUP = "card_activity"
STREAM = GroupPlan.build(DEFS.stream_groups[GROUP])
NAMES = tuple(output.name for output in STREAM.outputs)
PLAN = FetchPlan.build(DEFS, NAMES, [], [GROUP])
T0 = 1_700_000_000_000
MINUTE = 60_000
CARDS = ("c0", "c1", "c2")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def _fetchers(client: Redis, cache: TileHashCache) -> tuple[FeatureFetcher, FeatureFetcher]:
    snapshots = BatchSnapshotCache(client, [])
    return (
        FeatureFetcher(client, snapshots, tile_cache=cache),
        FeatureFetcher(client, snapshots),
    )


def _rows(times: Sequence[int], cards: Sequence[str]) -> list[FetchRow]:
    return [
        FetchRow(
            np.full((1, len(NAMES)), -1.0, np.float32),
            np.zeros(len(NAMES), bool),
            {"card_id": card},
            t_ms,
            False,
        )
        for t_ms, card in zip(times, cards, strict=True)
    ]


def _outcome(rows: Sequence[FetchRow]) -> list[tuple[Any, ...]]:
    return [
        (r.row[0].tolist(), r.defaulted, r.degraded, [(f.entity, f.age_ms) for f in r.freshness])
        for r in rows
    ]


async def _both(
    cached: FeatureFetcher, plain: FeatureFetcher, times: Sequence[int], cards: Sequence[str]
) -> list[tuple[Any, ...]]:
    """The cached fetcher's outcome, asserted equal to the plain one's."""
    got, want = _rows(times, cards), _rows(times, cards)
    await cached.fetch(PLAN, got)
    await plain.fetch(PLAN, want)
    assert _outcome(got) == _outcome(want)
    return _outcome(got)


class _Sends:
    """Counts the round trips (one packed write each) of a client built by :meth:`client`."""

    def __init__(self) -> None:
        self.n = 0

    def client(self, url: str) -> Redis:
        sends = self

        class Counted(Connection):
            async def send_packed_command(
                self, command: bytes | str | Iterable[bytes], check_health: bool = True
            ) -> None:
                sends.n += 1
                await super().send_packed_command(command, check_health)

        return Redis.from_url(url, connection_class=Counted)


def _batch(card: str, events: Sequence[tuple[int, int, float]]) -> KeyBatch:
    """``events``: (offset, ts, amount) of one card, in offset order."""
    updates = [
        EventUpdates(
            offset,
            ts,
            updates_for_event(
                STREAM,
                {"card_id": card, "event_time_ms": ts, "amount": amount, "is_international": 1},
            ),
        )
        for offset, ts, amount in events
    ]
    for update, (_, ts, _) in zip(updates, events, strict=True):
        assert event_time(STREAM, {"event_time_ms": ts}) == update.ts_ms
    group = STREAM.group
    return KeyBatch(
        tile_key(GROUP, card), "tx", 0, STREAM.retention_ms, group.allowed_lateness_ms, updates
    )


async def test_an_unchanged_hash_is_checked_not_read_and_a_change_is_seen_at_once(
    client: Redis, redis_url: str
) -> None:
    store = TileStore(client)
    await store.apply([_batch("c0", [(0, T0 - 5 * MINUTE, 10.0), (1, T0 - MINUTE, 20.0)])])
    sends = _Sends()
    counted = sends.client(redis_url)
    cache = TileHashCache()
    cached = FeatureFetcher(counted, BatchSnapshotCache(counted, []), tile_cache=cache)
    _, plain = await _fetchers(client, cache)
    try:
        first = await _both(cached, plain, [T0, T0 + 1], ["c0", "c0"])
        assert (cache.stats().hits, cache.stats().misses, cache.stats().entries) == (0, 1, 1)
        before = await client.info("commandstats")
        sends.n = 0
        assert await _both(cached, plain, [T0, T0 + 1], ["c0", "c0"]) == first
        assert (cache.stats().hits, cache.stats().misses) == (1, 1)
        after = await client.info("commandstats")
        hmgets = before.get("cmdstat_hmget", {}).get("calls", 0)
        assert after["cmdstat_hmget"]["calls"] == hmgets + 1  # version and offsets only
        assert after["cmdstat_hgetall"]["calls"] == before["cmdstat_hgetall"]["calls"] + 1
        assert sends.n == 1  # (that HGETALL was the plain fetcher's) one round trip

        await store.apply([_batch("c0", [(2, T0 - 30_000, 5.0)])])  # a tile changes
        sends.n = 0
        changed = await _both(cached, plain, [T0], ["c0"])
        assert changed[0][0] != first[0][0]  # new values served, not the kept ones
        assert (cache.stats().hits, cache.stats().misses) == (1, 2)
        assert sends.n == 2  # the version, then the changed hash
    finally:
        await counted.aclose()


@pytest.mark.parametrize("seed", [0, 3, 7])  # each reads a trimmed tile under a kept version
async def test_random_writes_trims_and_deletes_never_serve_a_stale_hash(
    client: Redis, seed: int
) -> None:
    rng = random.Random(seed)
    store = TileStore(client)
    cache = TileHashCache()
    cached, plain = await _fetchers(client, cache)
    offsets = dict.fromkeys(CARDS, 0)
    newest = dict.fromkeys(CARDS, T0)
    lateness = STREAM.group.allowed_lateness_ms
    ops: list[str] = []
    for _ in range(60):
        op = rng.choice(["write", "write", "late", "fetch", "fetch", "trim", "delete"])
        ops.append(op)
        card = rng.choice(CARDS)
        if op in ("write", "late"):
            back = lateness + rng.randrange(1, 3 * lateness) if op == "late" else 0
            events = []
            for _ in range(rng.randrange(1, 4)):
                offsets[card] += 1
                ts = newest[card] + rng.randrange(-lateness // 2, 40 * MINUTE) - back
                newest[card] = max(newest[card], ts)
                events.append((offsets[card], ts, round(rng.uniform(1, 500), 2)))
            await store.apply([_batch(card, events)])
        elif op == "trim":
            await store.trim(STREAM, [tile_key(GROUP, c) for c in CARDS])
        elif op == "delete":
            await client.delete(tile_key(GROUP, card))
        # reads before a card's newest event too: there, a trim changes what is read
        cards = [*CARDS, *CARDS, "nobody"]
        times = [newest.get(c, T0) + rng.randrange(-3 * 60 * MINUTE, 86_400_000) for c in cards]
        await _both(cached, plain, times, cards)
    stats = cache.stats()
    assert stats.hits > 20 and stats.misses > 20, (stats, ops)


async def test_a_kept_key_replaced_by_a_non_hash_degrades_only_its_rows(client: Redis) -> None:
    store = TileStore(client)
    await store.apply([_batch(c, [(0, T0 - MINUTE, 10.0)]) for c in ("c0", "c1")])
    cache = TileHashCache()
    cached, _ = await _fetchers(client, cache)
    await cached.fetch(PLAN, _rows([T0, T0], ["c0", "c1"]))
    assert cache.stats().entries == 2
    await client.delete(tile_key(GROUP, "c0"))
    await client.set(tile_key(GROUP, "c0"), "a string")
    rows = _rows([T0, T0], ["c0", "c1"])
    await cached.fetch(PLAN, rows)
    assert rows[0].degraded == [KEY_ERROR] and rows[1].degraded == []
    assert cache.get(tile_key(GROUP, "c0")) is None


async def test_a_hash_without_a_version_is_read_whole_every_time(client: Redis) -> None:
    key = tile_key(GROUP, "c0")
    await TileStore(client).apply([_batch("c0", [(0, T0 - MINUTE, 10.0)])])
    await client.hdel(key, VERSION_FIELD)  # as a hash written before versions existed
    cache = TileHashCache()
    cached, plain = await _fetchers(client, cache)
    first = await _both(cached, plain, [T0], ["c0"])
    await client.hset(key, f"{(T0 - MINUTE) // MINUTE * MINUTE}:n", "5")  # no version raise
    await client.hset(key, LAST_TS_FIELD, str(T0 - 1))
    assert await _both(cached, plain, [T0], ["c0"]) != first
    assert (cache.stats().hits, cache.stats().entries) == (0, 0)


async def test_on_a_cluster_the_fetcher_keeps_no_tile_hashes(redis_cluster_url: str) -> None:
    client = await connect(RedisOptions(redis_cluster_url))
    try:
        fetcher = FeatureFetcher(client, BatchSnapshotCache(client, []), tile_cache=TileHashCache())
        assert fetcher.tile_cache is None
    finally:
        await client.aclose()


async def test_a_change_by_an_older_worker_without_the_version_raise_is_seen(
    client: Redis,
) -> None:
    """During a rollout a stream worker of the previous release applies events without
    raising ``_v``; it always moves its partition's offset field, which the check reads
    too, so the kept hash is read again rather than served stale."""
    key = tile_key(GROUP, "c0")
    store = TileStore(client)
    await store.apply([_batch("c0", [(0, T0 - 5 * MINUTE, 10.0), (1, T0 - MINUTE, 20.0)])])
    cache = TileHashCache()
    cached, plain = await _fetchers(client, cache)
    first = await _both(cached, plain, [T0], ["c0"])
    assert await _both(cached, plain, [T0], ["c0"]) == first
    assert cache.stats().hits == 1
    version = await client.hget(key, VERSION_FIELD)
    # what the previous release's apply script writes for one more event: the tile,
    # the offset and _last_ts, and no version
    await client.hset(
        key,
        mapping={
            f"{(T0 - 30_000) // MINUTE * MINUTE}:n": "7",
            offset_field("tx", 0): "2",
            LAST_TS_FIELD: str(T0 - 30_000),
        },
    )
    assert await client.hget(key, VERSION_FIELD) == version
    changed = await _both(cached, plain, [T0], ["c0"])
    assert changed != first
    assert cache.stats().hits == 1  # not served from the kept hash
