"""The Redis tile store against a real redis-server: apply-once, expiry, trimming."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis

from feature_streams.definitions import load_definitions
from feature_streams.keys import LAST_TS_FIELD, VERSION_FIELD, offset_field, tile_key
from feature_streams.redis_client import AnyRedis, RedisOptions, connect
from feature_streams.tile_store import (
    EventUpdates,
    KeyBatch,
    TileStore,
    read_hashes,
)
from feature_streams.windows import (
    GroupPlan,
    Tiles,
    event_time,
    expired_fields,
    fold,
    is_too_late,
    read_hash,
    read_window,
    tiles_to_hash,
    updates_for_event,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
MINUTE = 60_000


@pytest.fixture(scope="module")
def plan() -> GroupPlan:
    defs = load_definitions(REPO / "features.yaml")
    return GroupPlan.build(defs.stream_groups["card_activity"])


@pytest.fixture(params=["one-redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TileStore]:
    """The store on one Redis and on the local 3-primary cluster (the worker's apply,
    pipelined per node, must behave the same)."""
    if request.param == "one-redis":
        client: AnyRedis = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        client = await connect(RedisOptions(request.getfixturevalue("redis_cluster_url")))
    try:
        yield TileStore(client)
    finally:
        await client.aclose()


def make_events(seed: int, n: int, cards: int, spread_ms: int) -> list[dict[str, object]]:
    """Events in log order: event time mostly rising, jittered back by up to 5 min."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        ts = T0 + i * spread_ms // n - rng.randrange(0, 5 * MINUTE)
        out.append(
            {
                "card_id": f"c{rng.randrange(cards)}",
                "event_time_ms": max(ts, 0),
                "amount": round(rng.uniform(1, 500), 2),
                "is_international": rng.choice([0, 0, 1]),
            }
        )
    return out


def key_batches(
    plan: GroupPlan, events: Sequence[Mapping[str, object]], offsets: Sequence[int]
) -> list[KeyBatch]:
    """One batch per card, events in offset order, as the worker builds them."""
    per_key: dict[str, list[EventUpdates]] = {}
    for ev, off in zip(events, offsets, strict=True):
        per_key.setdefault(str(ev["card_id"]), []).append(
            EventUpdates(off, event_time(plan, ev), updates_for_event(plan, ev))
        )
    group = plan.group
    return [
        KeyBatch(
            tile_key(group.name, k), "tx", 0, plan.retention_ms, group.allowed_lateness_ms, evs
        )
        for k, evs in per_key.items()
    ]


def expected_tiles(plan: GroupPlan, events: Sequence[Mapping[str, object]]) -> dict[str, Tiles]:
    """Fold events per card with the per-key lateness rule, in log order."""
    tiles: dict[str, Tiles] = {}
    newest: dict[str, int] = {}
    for ev in events:
        key = str(ev["card_id"])
        ts = event_time(plan, ev)
        if is_too_late(ts, newest.get(key), plan.group.allowed_lateness_ms):
            continue
        newest[key] = max(ts, newest.get(key, ts))
        fold(plan, tiles.setdefault(key, {}), ev)
    return tiles


def tile_fields(raw: Mapping[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items() if not k.startswith(b"_")}


def assert_same_numbers(got: Mapping[str, float], want: Mapping[str, str | float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert math.isclose(got[name], float(value), rel_tol=1e-12, abs_tol=1e-9), name


async def all_hashes(
    store: TileStore, plan: GroupPlan, keys: Sequence[str]
) -> list[dict[bytes, bytes]]:
    return await read_hashes(store.client, [tile_key(plan.group.name, k) for k in keys])


async def test_apply_matches_fold_and_replay_changes_nothing(
    store: TileStore, plan: GroupPlan
) -> None:
    events = make_events(seed=1, n=600, cards=7, spread_ms=3 * 3_600_000)
    offsets = list(range(600))
    first = await store.apply(key_batches(plan, events[:400], offsets[:400]))
    assert (first.applied, first.duplicate, first.late) == (400, 0, 0)

    # A replay from an earlier commit, cut into different batches: only 400.. are new.
    second = await store.apply(key_batches(plan, events[250:], offsets[250:]))
    assert (second.applied, second.duplicate) == (200, 150)

    keys = sorted({str(e["card_id"]) for e in events})
    before = await all_hashes(store, plan, keys)
    third = await store.apply(key_batches(plan, events, offsets))
    assert (third.applied, third.duplicate, third.late) == (0, 600, 0)
    assert await all_hashes(store, plan, keys) == before  # byte for byte

    want = expected_tiles(plan, events)
    for key, raw in zip(keys, before, strict=True):
        assert_same_numbers(tile_fields(raw), tiles_to_hash(want[key]))
        last_offset = max(o for e, o in zip(events, offsets, strict=True) if e["card_id"] == key)
        assert int(raw[offset_field("tx", 0).encode()]) == last_offset
        newest = max(event_time(plan, e) for e in events if e["card_id"] == key)
        assert int(raw[LAST_TS_FIELD.encode()]) == newest


async def test_offsets_are_guarded_per_partition(store: TileStore, plan: GroupPlan) -> None:
    ev = {"card_id": "c1", "event_time_ms": T0, "amount": 5.0, "is_international": 0}
    ups = updates_for_event(plan, ev)
    group = plan.group

    def batch(partition: int, offset: int) -> KeyBatch:
        return KeyBatch(
            tile_key(group.name, "c1"),
            "tx",
            partition,
            plan.retention_ms,
            group.allowed_lateness_ms,
            [EventUpdates(offset, T0, ups)],
        )

    result = await store.apply([batch(0, 10), batch(1, 10), batch(0, 10), batch(1, 3)])
    assert result.per_batch == [(1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 1, 0)]
    [raw] = await all_hashes(store, plan, ["c1"])
    assert read_hash(plan, raw, T0 + 1)["card_txn_count_5m"] == 2.0


async def test_pexpire_is_set_to_retention(store: TileStore, plan: GroupPlan) -> None:
    events = make_events(seed=2, n=20, cards=1, spread_ms=MINUTE)
    await store.apply(key_batches(plan, events, range(20)))
    ttl = await store.client.pttl(tile_key(plan.group.name, "c0"))
    assert 0 < ttl <= plan.retention_ms
    assert ttl > plan.retention_ms - 60_000


async def test_lateness_boundary_matches_is_too_late(store: TileStore, plan: GroupPlan) -> None:
    """The script's rule is windows.is_too_late exactly: an event ``lateness`` behind
    the newest is accepted, one millisecond more is dropped."""
    lateness = plan.group.allowed_lateness_ms
    newest = T0 + 60 * MINUTE
    times = [newest, newest - lateness, newest - lateness - 1]
    assert [is_too_late(t, newest, lateness) for t in times] == [False, False, True]
    events = [
        {"card_id": "c0", "event_time_ms": t, "amount": 1.0, "is_international": 0} for t in times
    ]
    result = await store.apply(key_batches(plan, events, range(3)))
    assert (result.applied, result.duplicate, result.late) == (2, 0, 1)


async def test_too_late_events_are_dropped_and_counted(store: TileStore, plan: GroupPlan) -> None:
    lateness = plan.group.allowed_lateness_ms
    times = [T0, T0 + lateness + 5 * MINUTE, T0 + MINUTE, T0 + 6 * MINUTE, T0 + 7 * MINUTE]
    # T0 + 1m is 14 min behind the newest: too late. T0 + 6m / T0 + 7m are within 10 min.
    events = [
        {"card_id": "c0", "event_time_ms": t, "amount": float(i + 1), "is_international": 0}
        for i, t in enumerate(times)
    ]
    result = await store.apply(key_batches(plan, events, range(5)))
    assert (result.applied, result.duplicate, result.late) == (4, 0, 1)
    [raw] = await all_hashes(store, plan, ["c0"])
    want = expected_tiles(plan, events)["c0"]
    assert_same_numbers(tile_fields(raw), tiles_to_hash(want))
    at = T0 + lateness + 6 * MINUTE
    values = read_hash(plan, raw, at)
    assert values["card_txn_count_1h"] == 4.0  # the late T0 + 1m event is not counted
    assert values["card_last_amount"] == 2.0  # the newest event, though others came later
    # A replay of the late event is a duplicate now, not a second late drop.
    again = await store.apply(key_batches(plan, events, range(5)))
    assert (again.applied, again.duplicate, again.late) == (0, 5, 0)


async def test_trim_removes_only_expired_fields_and_never_changes_a_read(
    store: TileStore, plan: GroupPlan
) -> None:
    day = 86_400_000
    events = make_events(seed=3, n=3000, cards=3, spread_ms=10 * day)
    await store.apply(key_batches(plan, events, range(len(events))))
    keys = ["c0", "c1", "c2"]
    before = await all_hashes(store, plan, keys)
    lateness = plan.group.allowed_lateness_ms
    probes: list[list[dict[str, float]]] = []
    doomed: list[set[str]] = []
    for raw in before:
        now = int(raw[LAST_TS_FIELD.encode()])
        times = [now - lateness, now - 1, now, now + 30 * MINUTE, now + 2 * day]
        probes.append([read_hash(plan, raw, t) for t in times])
        doomed.append(set(expired_fields(plan, raw, now)))
        assert doomed[-1]  # ten days of history: old tiles exist

    deleted = await store.trim(plan, [tile_key(plan.group.name, k) for k in keys])
    assert deleted == sum(len(d) for d in doomed)
    after = await all_hashes(store, plan, keys)
    for raw_before, raw_after, gone, reads in zip(before, after, doomed, probes, strict=True):
        kept = {k.decode() for k in raw_before} - gone
        assert {k.decode() for k in raw_after} == kept
        assert LAST_TS_FIELD in kept and offset_field("tx", 0) in kept
        now = int(raw_after[LAST_TS_FIELD.encode()])
        times = [now - lateness, now - 1, now, now + 30 * MINUTE, now + 2 * day]
        for t, read in zip(times, reads, strict=True):
            # Equal up to float summation order (Redis reorders a hash on HDEL).
            assert read_hash(plan, raw_after, t) == pytest.approx(read, rel=1e-12, abs=0)
    assert await store.trim(plan, [tile_key(plan.group.name, k) for k in keys]) == 0


async def test_a_key_that_is_not_a_hash_does_not_stop_the_others_trim(
    store: TileStore, plan: GroupPlan
) -> None:
    day = 86_400_000
    events = make_events(seed=5, n=500, cards=1, spread_ms=10 * day)
    await store.apply(key_batches(plan, events, range(len(events))))
    [raw] = await all_hashes(store, plan, ["c0"])
    doomed = expired_fields(plan, raw, int(raw[LAST_TS_FIELD.encode()]))
    assert doomed
    poisoned = tile_key(plan.group.name, "not-a-hash")
    await store.client.set(poisoned, "a string")
    keys = [poisoned, tile_key(plan.group.name, "c0"), poisoned]
    assert await store.trim(plan, keys) == len(doomed)
    assert await store.client.get(poisoned) == b"a string"


async def test_script_reloads_after_script_flush(store: TileStore, plan: GroupPlan) -> None:
    events = make_events(seed=4, n=10, cards=2, spread_ms=MINUTE)
    await store.client.script_flush()
    result = await store.apply(key_batches(plan, events, range(10)))
    assert result.applied == 10


async def test_read_hashes_feeds_read_hash(store: TileStore, plan: GroupPlan) -> None:
    events = make_events(seed=5, n=200, cards=2, spread_ms=2 * 3_600_000)
    await store.apply(key_batches(plan, events, range(200)))
    raws = await store.read([tile_key(plan.group.name, k) for k in ("c0", "missing", "c1")])
    assert raws[1] == {}
    want = expected_tiles(plan, events)
    t = T0 + 2 * 3_600_000
    for raw, key in ((raws[0], "c0"), (raws[2], "c1")):
        got = read_hash(plan, raw, t)
        ref = read_window(plan, want[key], t)
        assert got.keys() == ref.keys()
        for name in ref:
            assert math.isclose(got[name], ref[name], rel_tol=1e-12), name


async def test_a_key_holding_a_non_hash_is_rejected_not_fatal(
    store: TileStore, plan: GroupPlan
) -> None:
    events = make_events(seed=6, n=40, cards=3, spread_ms=MINUTE)
    batches = key_batches(plan, events, range(40))
    poisoned = batches[1].key
    await store.client.set(poisoned, "not a hash")
    result = await store.apply(batches)
    assert [i for i, _ in result.rejected] == [1]
    assert "WRONGTYPE" in result.rejected[0][1]
    assert result.per_batch[1] == (0, 0, 0)
    assert result.applied == 40 - len(batches[1].events)
    assert await store.client.get(poisoned) == b"not a hash"


async def _version(store: TileStore, key: str) -> int | None:
    raw = await store.client.hget(key, VERSION_FIELD)
    return None if raw is None else int(raw)


async def test_every_tile_change_raises_the_version_and_nothing_else_does(
    store: TileStore, plan: GroupPlan
) -> None:
    """The server reuses a hash while its version is unchanged (tile_cache): each write
    that changes a tile or ``_last_ts`` must raise it, in the same atomic call."""
    key = tile_key(plan.group.name, "c0")
    events = make_events(seed=11, n=40, cards=1, spread_ms=10 * 86_400_000)
    assert await _version(store, key) is None
    await store.apply(key_batches(plan, events[:20], range(20)))
    first = await _version(store, key)
    assert first is not None and first > T0 * 1000  # from Redis TIME, in microseconds
    await store.apply(key_batches(plan, events[:20], range(20)))  # all duplicates
    assert await _version(store, key) == first
    last_ts = int(cast(bytes, await store.client.hget(key, LAST_TS_FIELD)))
    lateness = plan.group.allowed_lateness_ms
    late = [{**events[0], "event_time_ms": last_ts - lateness - 1}]
    result = await store.apply(key_batches(plan, late, [100]))
    assert result.late == 1 and await _version(store, key) == first  # offset only
    await store.apply(key_batches(plan, events[20:], range(200, 220)))
    second = await _version(store, key)
    assert second is not None and second > first
    assert await store.trim(plan, [key]) > 0
    third = await _version(store, key)
    assert third is not None and third > second
    assert await store.trim(plan, [key]) == 0  # nothing deleted: unchanged
    assert await _version(store, key) == third


async def test_a_hash_created_again_starts_above_every_version_it_had(
    store: TileStore, plan: GroupPlan
) -> None:
    """After its expiry (or a DEL) the same key is a new hash: a reader holding the old
    one must never see the old version again, however many writes the old one had."""
    key = tile_key(plan.group.name, "c0")
    events = make_events(seed=12, n=30, cards=1, spread_ms=MINUTE)
    for n, event in enumerate(events):  # one write per event: the counter climbs
        await store.apply(key_batches(plan, [event], [n]))
    old = await _version(store, key)
    assert old is not None
    await store.client.delete(key)
    await store.apply(key_batches(plan, events[:1], [0]))
    new = await _version(store, key)
    assert new is not None and new > old


async def test_a_version_that_is_no_number_restarts_at_redis_time(
    store: TileStore, plan: GroupPlan
) -> None:
    key = tile_key(plan.group.name, "c0")
    events = make_events(seed=13, n=2, cards=1, spread_ms=MINUTE)
    await store.apply(key_batches(plan, events[:1], [0]))
    await store.client.hset(key, VERSION_FIELD, "garbage")
    result = await store.apply(key_batches(plan, events[1:], [1]))
    assert result.applied == 1 and result.failed == []
    version = await _version(store, key)
    assert version is not None and version > T0 * 1000
