"""The fetcher's tile cache against a real Redis: a cached read (sealed tiles kept,
only open tiles read by the script) equals an uncached ``HGETALL`` read as tiles seal,
late events land within the lateness, too-late ones are dropped, the worker trims,
the hash is deleted and re-created, and Redis forgets its scripts."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any, cast

import numpy as np
import pytest
from redis.asyncio import Redis

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
    await _same(plain, cached, times)  # first read: whole hashes
    assert tiles.stats().full_reads == 2 and tiles.stats().hits == 0
    await _same(plain, cached, times)  # nothing new: the views and merges are reused
    assert tiles.stats().hits == 2 and tiles.stats().unchanged == 2

    await writer.apply("k1", (T0 - 9 * MIN, 100.0, 1))  # late, within the lateness
    await writer.apply("k1", (T0 - 11 * MIN, 1000.0, 1))  # too late: dropped
    await _same(plain, cached, times)
    await writer.apply("k1", (T0 + 20 * MIN, 3.0, 0))  # seals the tiles before T0 + 10m
    await writer.apply("k1", (T0 + 11 * MIN, 4.0, 1))  # within lateness of the new last
    # (reads at or after the newest event minus the lateness: before that an uncached
    # read still sees tiles the worker's trim deletes and the cache already dropped)
    await _same(plain, cached, [T0 + 10 * MIN, T0 + 21 * MIN, T0 + 25 * MIN, T0 + 61 * MIN])
    await writer.apply("k2", (T0 + 3 * 3_600_000, 2.0, 0))  # k2's old tiles all seal
    await _same(plain, cached, [T0 + 3 * 3_600_000 - 10 * MIN, T0 + 3 * 3_600_000 + 1])
    stats = tiles.stats()
    assert stats.full_reads == 2  # every later read was of the open tiles only
    assert stats.hits == 8 and stats.unchanged == 5  # an unchanged hash beside a changed one


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
    full_before = tiles.stats().full_reads
    await client.delete(tile_key("activity", "k1"))  # expired whole
    await _same(plain, cached, later)
    assert tiles.stats().entries == 1  # k1's entry dropped, k2's kept
    await writer.apply("k1", (T0 + 47 * 3_600_000, 8.0, 1))  # re-created, lower last
    await _same(plain, cached, later)
    assert tiles.stats().full_reads == full_before + 1  # re-created: read whole again


async def test_redis_forgetting_the_script_costs_one_whole_read(client: Redis) -> None:
    plain, cached, tiles = await _fetchers(client)
    writer = Writer(client)
    await writer.apply("k1", (T0 - 30 * MIN, 5.0, 0), (T0, 9.0, 1))
    await writer.apply("k2", (T0, 9.0, 1))
    await _same(plain, cached, [T0 + 1])
    await _same(plain, cached, [T0 + 2])
    assert tiles.stats().hits == 2
    await client.script_flush()
    await _same(plain, cached, [T0 + 3])  # NOSCRIPT: loaded again, read whole
    assert tiles.stats().hits == 2 and tiles.stats().entries == 2
    await _same(plain, cached, [T0 + 4])
    assert tiles.stats().hits == 4


async def test_script_returns_only_tiles_open_at_the_cached_last_event(client: Redis) -> None:
    writer = Writer(client)
    await writer.apply("k1", (T0 - 30 * MIN, 5.0, 0), (T0 - 5 * 3_600_000, 6.0, 0), (T0, 9.0, 1))
    script = TileCache().script(GROUP)
    await client.script_load(script.source)
    key = tile_key("activity", "k1")
    reply = await client.evalsha(script.sha, 1, key, str(T0))
    assert reply[0] == str(T0).encode() and reply[1] == 0
    everything = cast(dict[bytes, bytes], await client.hgetall(key))
    lateness = GROUP.group.allowed_lateness_ms
    expected: dict[bytes, bytes] = {}
    for name, value in everything.items():
        start, _, suffix = name.partition(b":")
        if suffix in GROUP.field_suffixes:
            tile_ms = GROUP.field_suffixes[suffix][0].tile_ms
            if int(start) >= (T0 - lateness) - (T0 - lateness) % tile_ms:
                expected[name] = value
    it = iter(reply[2:])
    assert dict(zip(it, it, strict=True)) == expected
    assert 0 < len(expected) < len(everything) - 2  # not the 1m tile of T0 - 30m, nor T0 - 5h's
    stale = await client.evalsha(script.sha, 1, key, str(T0 + 1))  # the hash's last is lower
    assert stale[1] == 1 and len(stale) - 2 == 2 * len(everything)


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
        await _same(plain, cached, [now + rng.randrange(0, 5 * MIN) for _ in range(3)])
    assert tiles.stats().hits > 40


async def test_a_read_whose_entry_was_evicted_meanwhile_still_uses_its_base(
    client: Redis,
) -> None:
    """With room for one hash, k1's whole read evicts k2 before k2's script reply is
    taken: the reply is still merged with the sealed tiles it was asked against."""
    snapshots = BatchSnapshotCache(client, [])
    tiles = TileCache(max_entries=1)
    plain, cached = (
        FeatureFetcher(client, snapshots),
        FeatureFetcher(client, snapshots, tile_cache=tiles),
    )
    writer = Writer(client)
    await writer.apply("k1", (T0 - 3 * 3_600_000, 5.0, 0), (T0, 9.0, 1))
    await writer.apply("k2", (T0 - 3 * 3_600_000, 6.0, 1), (T0, 2.0, 0))
    for step in range(3):
        await _same(plain, cached, [T0 + step])
    assert tiles.stats().hits >= 2 and tiles.stats().evictions >= 2
