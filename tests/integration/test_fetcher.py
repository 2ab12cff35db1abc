"""The online fetcher's own contract, against a real Redis: one round trip per
micro-batch, values per column (batch snapshot + stream windows), what was defaulted,
freshness, the snapshot ids read, and errors left to the caller's policy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from feature_streams.batch_cache import BatchValueCache
from feature_streams.batch_store import activate, collect_garbage, write_snapshot
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.fetcher import (
    KEY_ERROR,
    SNAPSHOT_GONE,
    VALUE_INVALID,
    BatchSnapshotCache,
    FeatureFetcher,
)
from feature_streams.keys import data_key, tile_key
from feature_streams.read_plan import FetchPlan, FetchRow
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, point_in_time_values, updates_for_event
from tests.conftest import free_port

pytestmark = pytest.mark.integration

DEFS: FeatureDefinitions = parse_definitions(
    """
version: 1
entities:
  card_id: {key_type: str}
  customer_id: {key_type: str}
batch_groups:
  profile:
    entity: customer_id
    fields:
      limit: {dtype: float, default: 100.0}
      score: {dtype: float, default: 0.5}
stream_groups:
  activity:
    topic: tx
    entity: card_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles:
      - {size: 1m, max_window: 1h}
    aggregations:
      - {name: count_5m, agg: count, window: 5m}
      - {name: sum_1h, agg: sum, field: amount, window: 1h}
"""
)
NAMES = ("amount", "limit", "score", "count_5m", "sum_1h")
T0 = 1_700_000_000_000
EVENTS: list[dict[str, Any]] = [
    {"card_id": "k1", "ts": T0 - m * 60_000 - 7, "amount": 10.0 * m} for m in (1, 2, 4, 30)
]
PLAN = FetchPlan.build(DEFS, NAMES, ["profile"], ["activity"])


class CountingRedis(Redis):
    """Counts the command buffers written to Redis: one per round trip, whether the
    replies are read by a redis-py pipeline or by the fetcher's own reply loop."""

    _sends: list[int]

    @classmethod
    def counting(cls, url: str) -> CountingRedis:
        sends = [0]

        class CountingConnection(Connection):
            async def send_packed_command(
                self, command: bytes | str | Iterable[bytes], check_health: bool = True
            ) -> None:
                sends[0] += 1
                await super().send_packed_command(command, check_health)

        redis = cast(CountingRedis, cls.from_url(url, connection_class=CountingConnection))
        redis._sends = sends
        return redis

    @property
    def executed(self) -> int:
        return self._sends[0]

    @executed.setter
    def executed(self, value: int) -> None:
        self._sends[0] = value


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[CountingRedis]:
    redis = CountingRedis.counting(redis_url)
    plan = GroupPlan.build(DEFS.stream_groups["activity"])
    updates = [
        EventUpdates(n, int(e["ts"]), updates_for_event(plan, e)) for n, e in enumerate(EVENTS)
    ]
    key = tile_key("activity", "k1")
    await TileStore(redis).apply([KeyBatch(key, "tx", 0, plan.retention_ms, 10**12, updates)])
    rows = [("c1", {"limit": 900.0, "score": 0.9}), ("c2", {"limit": 700.0})]
    info = await write_snapshot(redis, "profile", rows)
    await activate(redis, "profile", info.snapshot_id)
    redis.executed = 0
    try:
        yield redis
    finally:
        await redis.aclose()


def _row(t_ms: int = T0, sent: Mapping[str, float] | None = None, **ids: str) -> FetchRow:
    values = np.full((1, len(NAMES)), -1.0, np.float32)
    mask = np.zeros(len(NAMES), bool)
    for name, value in (sent or {}).items():
        values[0, NAMES.index(name)] = value
        mask[NAMES.index(name)] = True
    store_sent = any(n != "amount" for n in sent or {})
    return FetchRow(values, mask, ids, t_ms, store_sent)


def _values(row: FetchRow) -> dict[str, float]:
    return dict(zip(NAMES, row.row[0].tolist(), strict=True))


async def _fetcher(
    client: CountingRedis, batch_cache: BatchValueCache | None = None
) -> FeatureFetcher:
    cache = BatchSnapshotCache(client, ["profile"])
    await cache.refresh()
    client.executed = 0
    return FeatureFetcher(client, cache, batch_cache=batch_cache)


def _outcome(row: FetchRow) -> tuple[dict[str, float], list[str], list[str], dict[str, Any]]:
    return _values(row), row.defaulted, row.degraded, dict(row.snapshots)


async def test_one_round_trip_fills_values_defaults_freshness_and_snapshot_ids(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client)
    rows = [
        _row(card_id="k1", customer_id="c1"),
        _row(T0 - 3 * 60_000, card_id="k1", customer_id="c2"),  # older time, missing field
        _row(card_id="nobody", customer_id="c-none"),  # no tiles, no snapshot row
        _row(customer_id="c1"),  # no card id at all
    ]
    result = await fetcher.fetch(PLAN, rows)

    assert client.executed == 1
    active = fetcher.snapshots.snapshot_id("profile")
    assert result.snapshots == {"profile": active} and result.gone == ()
    assert result.round_trip_s is not None and result.round_trip_s >= 0
    plan = GroupPlan.build(DEFS.stream_groups["activity"])
    at_t0, at_t3 = point_in_time_values(plan, EVENTS, [T0, T0 - 3 * 60_000])
    got = [_values(r) for r in rows]
    assert got[0] == {"amount": -1.0, "limit": 900.0, "score": pytest.approx(0.9), **at_t0}
    assert got[1] == {"amount": -1.0, "limit": 700.0, "score": 0.5, **at_t3}
    assert got[2] == {"amount": -1.0, "limit": 100.0, "score": 0.5, "count_5m": 0, "sum_1h": 0}
    assert got[3]["limit"] == 900.0 and got[3]["count_5m"] == -1.0  # left for the caller
    assert [r.defaulted for r in rows] == [
        [],
        ["score"],
        ["limit", "score"],
        ["count_5m", "sum_1h"],
    ]
    newest = max(int(e["ts"]) for e in EVENTS)
    assert rows[0].freshness[0].age_ms == T0 - newest
    assert [(f.group, f.entity) for f in rows[0].freshness] == [("activity", "k1")]
    assert rows[2].freshness == []  # never seen: no last event
    assert all(r.snapshots == {"profile": active} for r in rows)
    assert PLAN.sources(rows[1]) == {
        "limit": f"snapshot:profile/{active}",
        "score": "default",
        "count_5m": "stream:activity",
        "sum_1h": "stream:activity",
    }


async def test_sent_store_columns_are_kept_and_fully_sent_groups_not_read(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client)
    row = _row(sent={"limit": 1.0, "score": 2.0, "count_5m": 3.0}, card_id="k1", customer_id="c1")
    result = await fetcher.fetch(PLAN, [row])
    assert result.snapshots == {}  # the profile group was all sent: not queued
    values = _values(row)
    assert (values["limit"], values["score"], values["count_5m"]) == (1.0, 2.0, 3.0)
    assert (
        values["sum_1h"]
        == point_in_time_values(GroupPlan.build(DEFS.stream_groups["activity"]), EVENTS, [T0])[0][
            "sum_1h"
        ]
    )
    assert PLAN.sources(row)["limit"] == "request"


async def test_nothing_to_read_makes_no_round_trip(client: CountingRedis) -> None:
    fetcher = await _fetcher(client)
    row = _row(sent={"limit": 1.0, "score": 2.0, "count_5m": 3.0, "sum_1h": 4.0})
    result = await fetcher.fetch(PLAN, [row])
    assert client.executed == 0 and result.round_trip_s is None
    assert await fetcher.fetch(PLAN, []) == result


async def test_a_snapshot_deleted_under_the_reader_serves_defaults_flagged(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client)
    stale = fetcher.snapshots.snapshot_id("profile")
    newer = await write_snapshot(client, "profile", [("c1", {"limit": 1.0, "score": 1.0})])
    await activate(client, "profile", newer.snapshot_id)
    again = await write_snapshot(client, "profile", [("c1", {"limit": 2.0, "score": 2.0})])
    await activate(client, "profile", again.snapshot_id)  # stale is now retired
    deleted, _ = await collect_garbage(client, "profile", grace_s=0)
    assert deleted == (stale,)

    row = _row(card_id="k1", customer_id="c1")
    result = await fetcher.fetch(PLAN, [row])
    assert result.gone == ("profile",) and result.snapshots == {"profile": stale}
    assert row.degraded == [SNAPSHOT_GONE] and row.defaulted == ["limit", "score"]
    assert (_values(row)["limit"], _values(row)["score"]) == (-1.0, -1.0)  # not written
    for _ in range(200):  # the fetcher refreshes its pointers in the background
        if fetcher.snapshots.snapshot_id("profile") == again.snapshot_id:
            break
        await fetcher.fetch(PLAN, [_row(customer_id="c1")])
    assert fetcher.snapshots.snapshot_id("profile") == again.snapshot_id


async def test_redis_errors_are_raised_for_the_callers_policy() -> None:
    down = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    cache = BatchSnapshotCache(down, ["profile"])
    row = _row(card_id="k1", customer_id="c1")
    with pytest.raises((RedisConnectionError, OSError)):
        await FeatureFetcher(down, cache).fetch(PLAN, [row])
    assert row.degraded == [] and _values(row)["limit"] == -1.0
    await down.aclose()


async def test_a_key_holding_no_hash_degrades_only_the_rows_reading_it(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client)
    await client.set(tile_key("activity", "bad-card"), "not a hash")  # WRONGTYPE on HGETALL
    active = fetcher.snapshots.snapshot_id("profile")
    assert active is not None
    await client.delete(data_key("profile", active, "c2"))
    await client.set(data_key("profile", active, "c2"), "not a hash")  # WRONGTYPE on HMGET
    rows = [
        _row(card_id="bad-card", customer_id="c1"),
        _row(card_id="k1", customer_id="c2"),
        _row(card_id="k1", customer_id="c1"),
    ]
    client.executed = 0  # not the SET / DEL above
    await fetcher.fetch(PLAN, rows)  # nothing raised: one key's problem is not the store's
    assert client.executed == 1
    got = [_values(r) for r in rows]
    plan = GroupPlan.build(DEFS.stream_groups["activity"])
    at_t0 = point_in_time_values(plan, EVENTS, [T0])[0]
    assert rows[0].degraded == [KEY_ERROR] and rows[0].defaulted == ["count_5m", "sum_1h"]
    assert got[0]["limit"] == 900.0 and got[0]["count_5m"] == -1.0  # its batch group: fine
    assert rows[1].degraded == [KEY_ERROR] and rows[1].defaulted == ["limit", "score"]
    assert got[1]["count_5m"] == at_t0["count_5m"]  # its stream group: fine
    assert rows[2].degraded == [] and rows[2].defaulted == []
    assert got[2] == {"amount": -1.0, "limit": 900.0, "score": pytest.approx(0.9), **at_t0}


async def test_a_value_that_is_no_number_degrades_only_the_rows_reading_it(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client)
    start = (T0 - 60_000) // 60_000 * 60_000
    await client.hset(tile_key("activity", "k2"), f"{start}:count@1m", "garbage")
    active = fetcher.snapshots.snapshot_id("profile")
    assert active is not None
    await client.hset(data_key("profile", active, "c2"), "limit", "twelve")
    rows = [
        _row(card_id="k2", customer_id="c1"),
        _row(card_id="k1", customer_id="c2"),
        _row(card_id="k1", customer_id="c1"),
    ]
    await fetcher.fetch(PLAN, rows)
    assert rows[0].degraded == [VALUE_INVALID] and rows[0].defaulted == ["count_5m", "sum_1h"]
    assert rows[1].degraded == [VALUE_INVALID] and "limit" in rows[1].defaulted
    assert _values(rows[1])["limit"] == 100.0  # the defined default
    assert rows[2].degraded == []


BATCH_ONLY = FetchPlan.build(DEFS, NAMES, ["profile"], [])


def _batch_rows() -> list[FetchRow]:
    return [
        _row(customer_id="c1"),
        _row(customer_id="c2"),  # a field absent: its default, listed
        _row(customer_id="c-none"),  # no row in the snapshot: all defaults
        _row(sent={"limit": 5.0}, customer_id="c1"),  # a sent store column is kept
        _row(customer_id="c1"),
    ]


async def test_cached_batch_rows_are_not_read_again_and_equal_a_read(
    client: CountingRedis,
) -> None:
    uncached = await _fetcher(client)
    expected = [_outcome(r) for r in await _filled(uncached)]
    fetcher = await _fetcher(client, BatchValueCache())

    first = await _filled(fetcher)
    assert client.executed == 1
    second = _batch_rows()
    result = await fetcher.fetch(BATCH_ONLY, second)
    assert client.executed == 1  # every row was cached: no round trip
    assert result.round_trip_s is None and result.snapshots == expected[0][3]
    assert [_outcome(r) for r in first] == expected
    assert [_outcome(r) for r in second] == expected
    assert fetcher.batch_cache is not None
    assert fetcher.batch_cache.stats().entries == 3  # c1, c2 and the absent c-none

    # with stream groups the round trip reads only the tiles and the uncached entity
    rows = [_row(card_id="k1", customer_id="c1"), _row(card_id="k1", customer_id="c9")]
    await fetcher.fetch(PLAN, rows)
    assert client.executed == 2 and fetcher.batch_cache.stats().entries == 4
    assert _values(rows[0])["limit"] == 900.0 and rows[1].defaulted == ["limit", "score"]


async def _filled(fetcher: FeatureFetcher) -> list[FetchRow]:
    rows = _batch_rows()
    await fetcher.fetch(BATCH_ONLY, rows)
    return rows


async def test_after_a_snapshot_flip_the_next_read_sees_only_the_new_snapshot(
    client: CountingRedis,
) -> None:
    fetcher = await _fetcher(client, BatchValueCache())
    old = fetcher.snapshots.snapshot_id("profile")
    warm = [_row(customer_id="c1"), _row(customer_id="c2")]
    await fetcher.fetch(BATCH_ONLY, warm)
    assert [_values(r)["limit"] for r in warm] == [900.0, 700.0]

    new_rows = [("c1", {"limit": 1.0, "score": 0.1}), ("c3", {"limit": 3.0, "score": 0.3})]
    info = await write_snapshot(client, "profile", new_rows)
    await activate(client, "profile", info.snapshot_id)
    await fetcher.snapshots.refresh()  # what the background refresh does within 0.5 s

    rows = [_row(customer_id="c1"), _row(customer_id="c2"), _row(customer_id="c3")]
    result = await fetcher.fetch(BATCH_ONLY, rows)
    assert result.snapshots == {"profile": info.snapshot_id} != {"profile": old}
    got = [(_values(r)["limit"], _values(r)["score"]) for r in rows]
    assert got == [(1.0, pytest.approx(0.1)), (100.0, 0.5), (3.0, pytest.approx(0.3))]
    assert rows[1].defaulted == ["limit", "score"]  # c2 is not in the new snapshot
    assert all(r.snapshots == {"profile": info.snapshot_id} for r in rows)

    again = [_row(customer_id="c1"), _row(customer_id="c2")]
    executed = client.executed
    await fetcher.fetch(BATCH_ONLY, again)  # the new snapshot's rows, now cached
    assert client.executed == executed
    assert [_values(r)["limit"] for r in again] == [1.0, 100.0]
