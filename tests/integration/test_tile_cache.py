"""The fetcher's tile cache against a real Redis: reads with merges reused while a
hash is unchanged equal reads without the cache as tiles seal, late events land within
the lateness, too-late ones are dropped, the worker trims, and the hash is deleted and
re-created; an unchanged hash is not merged again."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from feature_streams import hash_reader
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.fetcher import BatchSnapshotCache, FeatureFetcher
from feature_streams.keys import tile_key
from feature_streams.read_plan import FetchPlan, FetchRow
from feature_streams.tile_cache import TileCache
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, updates_for_event

pytestmark = pytest.mark.integration

DEFS: FeatureDefinitions = parse_definitions(
    """
version: 1
entities:
  card_id: {key_type: str}
stream_groups:
  activity:
    topic: tx
    entity: card_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles:
      - {size: 1m, max_window: 1h}
      - {size: 1h, max_window: 24h}
    aggregations:
      - {name: count_5m, agg: count, window: 5m}
      - {name: sum_1h, agg: sum, field: amount, window: 1h}
      - {name: max_24h, agg: max, field: amount, window: 24h, default: -1.0}
      - {name: mean_24h, agg: mean, field: amount, window: 24h, default: -1.0}
      - {name: last_24h, agg: last, field: amount, window: 24h, default: -1.0}
      - {name: since_24h, agg: time_since_last, window: 24h, default: 86400.0}
      - {name: intl_24h, agg: count, window: 24h, where: {intl: 1}}
"""
)
NAMES = ("count_5m", "sum_1h", "max_24h", "mean_24h", "last_24h", "since_24h", "intl_24h")
GROUP = GroupPlan.build(DEFS.stream_groups["activity"])
PLAN = FetchPlan.build(DEFS, NAMES, [], ["activity"])
T0 = 1_700_000_000_000
MIN = 60_000
KEYS = ("k1", "k2")


class Writer:
    """Applies events as the worker does (offsets per key, the group's lateness)."""

    def __init__(self, client: Redis) -> None:
        self.store = TileStore(client)
        self.offsets = dict.fromkeys(KEYS, 0)

    async def apply(self, card: str, *events: tuple[int, float, int]) -> None:
        updates = []
        for ts, amount, intl in events:
            event = {"card_id": card, "ts": ts, "amount": amount, "intl": intl}
            self.offsets[card] += 1
            updates.append(EventUpdates(self.offsets[card], ts, updates_for_event(GROUP, event)))
        batch = KeyBatch(
            tile_key("activity", card),
            "tx",
            0,
            GROUP.retention_ms,
            GROUP.group.allowed_lateness_ms,
            updates,
        )
        await self.store.apply([batch])

    async def trim(self) -> None:
        await self.store.trim(GROUP, [tile_key("activity", k) for k in KEYS])


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def _fetchers(client: Redis) -> tuple[FeatureFetcher, FeatureFetcher, TileCache]:
    snapshots = BatchSnapshotCache(client, [])
    tiles = TileCache()
    plain = FeatureFetcher(client, snapshots)
    return plain, FeatureFetcher(client, snapshots, tile_cache=tiles), tiles


def _rows(times: list[int]) -> list[FetchRow]:
    return [
        FetchRow(
            np.full((1, len(NAMES)), -1.0, np.float32),
            np.zeros(len(NAMES), bool),
            {"card_id": card},
            t_ms,
            False,
        )
        for t_ms in times
        for card in (*KEYS, "nobody")
    ]


def _outcome(rows: list[FetchRow]) -> list[tuple[Any, ...]]:
    return [(r.row.tolist(), r.defaulted, r.degraded, r.freshness) for r in rows]


async def _same(plain: FeatureFetcher, cached: FeatureFetcher, times: list[int]) -> None:
    """One uncached and one cached fetch of the same rows give the same outcome."""
    expected, got = _rows(times), _rows(times)
    await plain.fetch(PLAN, expected)
    await cached.fetch(PLAN, got)
    assert _outcome(got) == _outcome(expected)


async def test_cached_reads_equal_uncached_as_tiles_seal_and_late_events_land(
    client: Redis,
) -> None:
    plain, cached, tiles = await _fetchers(client)
    writer = Writer(client)
    await writer.apply("k1", (T0 - 30 * MIN, 5.0, 0), (T0 - 3 * MIN, 7.0, 1), (T0, 9.0, 0))
    await writer.apply("k2", (T0 - 2 * 3_600_000, 11.0, 1))
    times = [T0 + 1, T0 + 5 * MIN + 3, T0 + 61 * MIN]
    await _same(plain, cached, times)  # first read: kept with its merges
    assert tiles.stats().entries == 2 and tiles.stats().hits == 0
    await _same(plain, cached, times)  # nothing new: the merges are reused
    assert tiles.stats().hits == 2

    await writer.apply("k1", (T0 - 9 * MIN, 100.0, 1))  # late, within the lateness
    await writer.apply("k1", (T0 - 11 * MIN, 1000.0, 1))  # too late: dropped
    await _same(plain, cached, times)
    await writer.apply("k1", (T0 + 20 * MIN, 3.0, 0))  # seals the tiles before T0 + 10m
    await writer.apply("k1", (T0 + 11 * MIN, 4.0, 1))  # within lateness of the new last
    await _same(plain, cached, [*times, T0 + 21 * MIN, T0 + 25 * MIN])
    await writer.apply("k2", (T0 + 3 * 3_600_000, 2.0, 0))  # k2's old tiles all seal
    await _same(plain, cached, [*times, T0 + 3 * 3_600_000 + 1])
    assert tiles.stats().hits == 5  # the unchanged hash beside each changed one


async def test_cached_reads_equal_uncached_after_trim_deletion_and_recreation(
    client: Redis,
) -> None:
    plain, cached, tiles = await _fetchers(client)
    writer = Writer(client)
    await writer.apply("k1", (T0 - 50 * MIN, 5.0, 0), (T0 - 23 * 3_600_000, 6.0, 1), (T0, 1.0, 0))
    await writer.apply("k2", (T0, 1.0, 0))
    times = [T0 + 1, T0 + 2 * 3_600_000]
    await _same(plain, cached, times)
    # two days on: the old tiles expire; trimmed by the worker, and by the cache
    await writer.apply("k1", (T0 + 48 * 3_600_000, 2.0, 0))
    later = [T0 + 48 * 3_600_000 + 5, T0 + 49 * 3_600_000]
    await _same(plain, cached, later)
    await writer.trim()
    await _same(plain, cached, [*later, T0 + 1])  # at T0 only what trim kept is read
    await client.delete(tile_key("activity", "k1"))  # expired whole
    await _same(plain, cached, later)
    assert tiles.stats().entries == 1  # k1's entry dropped, k2's kept
    await writer.apply("k1", (T0 + 47 * 3_600_000, 8.0, 1))  # re-created, lower last
    await _same(plain, cached, [*later, T0 + 1])


async def test_cached_reads_equal_uncached_on_random_events(client: Redis) -> None:
    plain, cached, tiles = await _fetchers(client)
    writer = Writer(client)
    rng = random.Random(7)
    now = T0
    for _ in range(40):
        now += rng.randrange(0, 20 * MIN)
        for card in KEYS:
            events = [
                (now - rng.randrange(0, 15 * MIN), round(rng.random() * 100, 2), rng.randrange(2))
                for _ in range(rng.randrange(0, 4))
            ]
            if events:
                await writer.apply(card, *events)
        if rng.random() < 0.2:
            await writer.trim()
        await _same(plain, cached, [now + rng.randrange(-90 * MIN, 5 * MIN) for _ in range(3)])
    assert tiles.stats().hits > 10 and tiles.stats().misses > 40


async def test_an_unchanged_hash_is_not_merged_again(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, cached, _ = await _fetchers(client)
    writer = Writer(client)
    for card in KEYS:  # dense enough for the reader's lookup path (the merge memo's)
        await writer.apply(card, *((T0 - m * 5 * MIN, float(m), m % 2) for m in range(287, -1, -1)))
    merges: list[object] = []
    real = hash_reader._merge

    def counted(*args: Any) -> Any:
        merges.append(args)
        return real(*args)

    monkeypatch.setattr(hash_reader, "_merge", counted)
    await cached.fetch(PLAN, _rows([T0 + 1, T0 + 2 * MIN]))
    assert len(merges) == 4  # two hashes, two layouts each
    await cached.fetch(PLAN, _rows([T0 + 3, T0 + 2 * MIN + 1]))
    assert len(merges) == 4  # same hashes, same layouts: nothing merged
    await writer.apply("k2", (T0 - 1, 1.0, 0))
    await cached.fetch(PLAN, _rows([T0 + 3, T0 + 2 * MIN + 1]))
    assert len(merges) == 6  # k2 changed: merged again
    await _same(plain, cached, [T0 + 3, T0 + 2 * MIN + 1])


async def test_bounded_in_bytes() -> None:
    tiles = TileCache(max_entries=10, max_bytes=2_000)
    fields = {f"{n}:count@1m".encode(): b"1" for n in range(5)}
    for key in ("a", "b", "c"):
        assert tiles.memo(key, fields) is not None
    stats = tiles.stats()
    assert stats.bytes <= 2_000 and stats.entries < 3 and stats.evictions >= 1
    assert tiles.memo("x", {}) is None and TileCache(0).memo("a", fields) is None
