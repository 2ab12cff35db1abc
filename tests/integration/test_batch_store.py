"""Batch snapshots on a real Redis: load, flip, rollback, garbage, consistent reads."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from feature_streams.batch_load import BatchFileError, load_group_file, rollback_group
from feature_streams.batch_store import (
    SnapshotStateError,
    activate,
    collect_garbage,
    get_pointers,
    list_snapshots,
    write_snapshot,
)
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.keys import data_key
from feature_streams.read_plan import (
    BatchReadResult,
    GroupReadSpec,
    SnapshotGoneError,
    queue_reads,
)
from feature_streams.redis_client import RedisOptions, connect, detect_mode, scan_keys
from tests.conftest import free_port

pytestmark = pytest.mark.integration

FIELDS = ("limit", "count", "score")
DEFS: FeatureDefinitions = parse_definitions(
    """
version: 1
entities:
  customer_id: {key_type: str}
batch_groups:
  profile:
    entity: customer_id
    fields:
      limit: {dtype: float, default: 100.0}
      count: {dtype: int, default: 0}
      score: {dtype: float, default: 0.5}
"""
)
SPEC = GroupReadSpec.from_group(DEFS.batch_groups["profile"])


@pytest.fixture(params=["standalone", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """One Redis, then the local Redis Cluster (3 primaries): same assertions."""
    name = "redis_url" if request.param == "standalone" else "redis_cluster_url"
    return cast(str, request.getfixturevalue(name))


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[Redis]:
    redis = await connect(RedisOptions(store_url))
    try:
        yield cast(Redis, redis)
    finally:
        await redis.aclose()


def _file(tmp_path: Path, name: str, value: float, n: int = 20) -> Path:
    path = tmp_path / f"{name}.csv"
    rows = "".join(f"c{i},{value + i},{i},{value}\n" for i in range(n))
    path.write_text(f"customer_id,limit,count,score\n{rows}")
    return path


async def _read(client: Redis, snapshot_id: str | None, entities: list[str]) -> BatchReadResult:
    """The server's path: other commands around ours in one pipeline, then our slice."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall("st:other:x")  # stands in for the stream tile reads queued before ours
        plan = queue_reads(pipe, SPEC, snapshot_id, entities)
        pipe.hgetall("st:other:y")
        results = await pipe.execute()
    assert results[0] == {} and results[-1] == {}
    return plan.decode(results[1 : 1 + plan.n_commands])


async def _keys(client: Redis, snapshot_id: str) -> int:
    return len([k async for k in scan_keys(client, f"bf:profile:{snapshot_id}:*")])


async def test_load_then_read_returns_values_defaults_and_missing(
    client: Redis, store_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "p.csv"
    path.write_text("customer_id,limit,count,score\nc1,10.5,3,0.9\nc2,,4,\n")
    report = await load_group_file(store_url, DEFS, "profile", path, progress=False)
    assert (report.rows, report.previous_snapshot_id, report.deleted_snapshots) == (2, None, ())
    assert report.null_cells == {"limit": 1, "count": 0, "score": 1}

    cache = BatchSnapshotCache(client, ["profile"])
    assert cache.snapshot_id("profile") is None
    await cache.refresh()
    assert cache.snapshot_id("profile") == report.snapshot_id

    result = await _read(client, cache.snapshot_id("profile"), ["c1", "c2", "ghost", "c1"])
    assert result.snapshot_id == report.snapshot_id
    assert result.values == {
        "c1": {"limit": 10.5, "count": 3.0, "score": 0.9},
        "c2": {"limit": 100.0, "count": 4.0, "score": 0.5},
        "ghost": {"limit": 100.0, "count": 0.0, "score": 0.5},
    }
    assert result.missing_entities == {"ghost"}
    assert result.missing_fields == {"c2": ("limit", "score")}

    only = GroupReadSpec.from_group(DEFS.batch_groups["profile"], ["score"])
    async with client.pipeline(transaction=False) as pipe:
        plan = queue_reads(pipe, only, report.snapshot_id, ["c1"])
        assert plan.decode(await pipe.execute()).values == {"c1": {"score": 0.9}}
    [info] = await list_snapshots(client, "profile")
    assert (info.state, info.rows, info.source) == ("active", 2, str(path))


async def test_never_loaded_group_reads_defaults_without_commands(client: Redis) -> None:
    cache = BatchSnapshotCache(client, ["profile"])
    await cache.refresh()
    async with client.pipeline(transaction=False) as pipe:
        plan = queue_reads(pipe, SPEC, cache.snapshot_id("profile"), ["a", "b"])
        assert plan.n_commands == 0
        assert await pipe.execute() == []
    result = plan.decode([])
    assert result.snapshot_id is None
    assert result.missing_entities == {"a", "b"}
    assert result.values["a"] == {"limit": 100.0, "count": 0.0, "score": 0.5}


async def test_loads_flip_keep_previous_roll_back_and_delete_the_oldest(
    client: Redis, store_url: str, tmp_path: Path
) -> None:
    first = await load_group_file(
        store_url, DEFS, "profile", _file(tmp_path, "a", 1.0), grace_s=0, progress=False
    )
    second = await load_group_file(
        store_url, DEFS, "profile", _file(tmp_path, "b", 2.0), grace_s=0, progress=False
    )
    assert second.previous_snapshot_id == first.snapshot_id
    assert await get_pointers(client, "profile") == (second.snapshot_id, first.snapshot_id)
    assert (await _read(client, second.snapshot_id, ["c0"])).values["c0"]["score"] == 2.0
    assert (await _read(client, first.snapshot_id, ["c0"])).values["c0"]["score"] == 1.0

    back = await rollback_group(store_url, "profile")
    assert (back.active, back.previous) == (first.snapshot_id, second.snapshot_id)
    cache = BatchSnapshotCache(client, ["profile"])
    await cache.refresh()
    restored = await _read(client, cache.snapshot_id("profile"), ["c0", "c5"])
    assert restored.values["c5"] == {"limit": 6.0, "count": 5.0, "score": 1.0}
    forward = await rollback_group(store_url, "profile")  # a second rollback undoes the first
    assert (forward.active, forward.previous) == (second.snapshot_id, first.snapshot_id)

    third = await load_group_file(
        store_url, DEFS, "profile", _file(tmp_path, "c", 3.0), grace_s=0, progress=False
    )
    assert third.previous_snapshot_id == second.snapshot_id
    assert third.deleted_snapshots == (first.snapshot_id,)
    assert await _keys(client, first.snapshot_id) == 0
    assert await _keys(client, second.snapshot_id) == 20
    states = {i.snapshot_id: i.state for i in await list_snapshots(client, "profile")}
    assert states == {second.snapshot_id: "previous", third.snapshot_id: "active"}
    # No key has a TTL: snapshots live until replaced.
    assert await client.ttl(data_key("profile", third.snapshot_id, "c0")) == -1
    assert await client.ttl("bf:{profile}:active") == -1


async def test_deletion_waits_for_the_grace_period(
    client: Redis, store_url: str, tmp_path: Path
) -> None:
    loads = [
        await load_group_file(
            store_url, DEFS, "profile", _file(tmp_path, n, v, n=3), grace_s=3600, progress=False
        )
        for n, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))
    ]
    oldest = loads[0].snapshot_id
    assert (loads[2].deleted_snapshots, loads[2].deferred_snapshots) == ((), (oldest,))
    assert await _keys(client, oldest) == 3  # a reader holding its pointer still reads it
    assert await collect_garbage(client, "profile", grace_s=3600) == ((), (oldest,))
    assert await collect_garbage(client, "profile", grace_s=0) == ((oldest,), ())
    assert await _keys(client, oldest) == 0


async def test_rollback_without_previous_is_refused(
    client: Redis, store_url: str, tmp_path: Path
) -> None:
    with pytest.raises(SnapshotStateError, match="no previous snapshot"):
        await rollback_group(store_url, "profile")
    await load_group_file(store_url, DEFS, "profile", _file(tmp_path, "a", 1.0), progress=False)
    with pytest.raises(SnapshotStateError, match="no previous snapshot"):
        await rollback_group(store_url, "profile")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("customer_id,limit,count,score,extra\nc1,1,1,1,1\n", "unknown columns"),
        ("customer_id,limit,count,score\nc1,1,1,1\nc2,x,1,1\n", "column 'limit', row 2"),
        ("customer_id,limit,count,score\nc1,1,1.5,1\n", "column 'count', row 1"),
    ],
)
async def test_bad_file_is_refused_before_anything_is_written(
    client: Redis, store_url: str, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BatchFileError, match=expected):
        await load_group_file(store_url, DEFS, "profile", path, progress=False)
    assert await client.dbsize() == 0


async def test_bad_file_leaves_the_active_snapshot_untouched(
    client: Redis, store_url: str, tmp_path: Path
) -> None:
    good = await load_group_file(
        store_url, DEFS, "profile", _file(tmp_path, "a", 1.0), progress=False
    )
    before = sorted(await client.keys("*"))
    bad = tmp_path / "bad.csv"
    bad.write_text("customer_id,limit,count,score\nc1,1,1,oops\n")
    with pytest.raises(BatchFileError, match="column 'score', row 1"):
        await load_group_file(store_url, DEFS, "profile", bad, progress=False)
    assert sorted(await client.keys("*")) == before
    assert await get_pointers(client, "profile") == (good.snapshot_id, None)


async def test_interrupted_write_is_never_active_and_is_collected(client: Redis) -> None:
    def rows() -> Iterator[tuple[str, Mapping[str, float]]]:
        for i in range(25):
            yield f"c{i}", {"limit": 1.0}
        raise RuntimeError("pipeline died")

    with pytest.raises(RuntimeError):
        await write_snapshot(client, "profile", rows(), chunk_size=10, snapshot_id="broken")
    assert await _keys(client, "broken") == 20  # two chunks landed
    with pytest.raises(SnapshotStateError, match="broken is loading"):
        await activate(client, "profile", "broken")
    assert await collect_garbage(client, "profile", abandoned_after_s=3600) == ((), ())
    assert await collect_garbage(client, "profile", abandoned_after_s=0) == (("broken",), ())
    assert await _keys(client, "broken") == 0
    assert await client.dbsize() == 0


async def test_reading_a_deleted_snapshot_raises_instead_of_serving_defaults(
    client: Redis,
) -> None:
    for sid in ("s1", "s2", "s3"):
        await write_snapshot(client, "profile", [("c1", {"limit": 1.0})], snapshot_id=sid)
        await activate(client, "profile", sid)
    assert await collect_garbage(client, "profile", grace_s=0) == (("s1",), ())
    with pytest.raises(SnapshotGoneError, match="'s1'"):
        await _read(client, "s1", ["c1"])  # a reader that kept s1's pointer far too long
    assert (await _read(client, "s2", ["c1"])).values["c1"]["limit"] == 1.0


async def test_cache_refreshes_in_the_background(client: Redis) -> None:
    for sid in ("s1", "s2"):
        await write_snapshot(client, "profile", [("c1", {"limit": 1.0})], snapshot_id=sid)
    await activate(client, "profile", "s1")
    changes: list[Mapping[str, str | None]] = []
    changed = asyncio.Event()

    def on_change(ids: Mapping[str, str | None]) -> None:
        changes.append(ids)
        changed.set()

    cache = BatchSnapshotCache(client, ["profile"], refresh_interval_s=0.01, on_change=on_change)
    async with cache:
        assert cache.snapshot_id("profile") == "s1"  # start() refreshes once
        changed.clear()
        await activate(client, "profile", "s2")
        async with asyncio.timeout(5):
            await changed.wait()  # no one but the background task refreshes
        assert cache.snapshot_id("profile") == "s2"
    assert [dict(c) for c in changes] == [{"profile": "s1"}, {"profile": "s2"}]


async def test_cache_survives_an_unreachable_redis(caplog: pytest.LogCaptureFixture) -> None:
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        cache = BatchSnapshotCache(down, ["profile"], refresh_interval_s=3600)
        async with cache:  # start() logs the failure instead of raising
            assert cache.snapshot_id("profile") is None
            assert cache.refreshed_at is None
    finally:
        await down.aclose()
    assert "batch snapshot refresh failed" in caplog.text


async def test_decoded_responses_read_the_same(store_url: str, client: Redis) -> None:
    await write_snapshot(client, "profile", [("c1", {"limit": 7.0})], snapshot_id="s1")
    await activate(client, "profile", "s1")
    text_client = cast(Redis, await connect(RedisOptions(store_url, decode_responses=True)))
    try:
        cache = BatchSnapshotCache(text_client, ["profile"])
        assert (await cache.refresh())["profile"] == "s1"
        result = await _read(text_client, "s1", ["c1"])
        assert result.values["c1"] == {"limit": 7.0, "count": 0.0, "score": 0.5}
        assert result.missing_fields == {"c1": ("count", "score")}
    finally:
        await text_client.aclose()


async def test_snapshot_flip_under_1000_concurrent_reads_never_mixes(store_url: str) -> None:
    """Snapshot A holds 1.0 in every field of every entity, B 2.0. 1,000 readers keep
    reading 5 random entities through the server's read path (cached pointer, one
    pipeline, decode); A is flipped to B after 1,000 reads, with ~1,000 reads in flight,
    and each reader stops once its cache gave it B. No read may mix A and B."""
    n_readers = 1_000
    entities = [f"c{i}" for i in range(200)]
    if await detect_mode(store_url) == "cluster":  # per node, never blocks: room for all
        client = cast(Redis, await connect(RedisOptions(store_url, max_connections=2048)))
    else:
        # readers queue for one of 64 connections as long as the run takes (a 1,000-deep
        # queue on a loaded 2-core machine waits longer than any fixed per-call bound)
        pool = BlockingConnectionPool.from_url(store_url, max_connections=64, timeout=None)
        client = Redis.from_pool(pool)
    expected = {"A": 1.0, "B": 2.0}
    counts = {"A": 0, "B": 0, "A_after_flip": 0}
    bad: list[str] = []
    flipped = asyncio.Event()
    flip_now = asyncio.Event()

    async def reader(n: int, cache: BatchSnapshotCache) -> None:
        rng = random.Random(n)
        sid: str | None = None
        while sid != "B":
            sid = cache.snapshot_id("profile")  # one id for the whole micro-batch
            result = await _read(client, sid, rng.sample(entities, 5))
            values = {v for row in result.values.values() for v in row.values()}
            if result.missing_entities or values != {expected[str(sid)]}:
                bad.append(f"{sid}: {sorted(values)} missing={sorted(result.missing_entities)}")
            counts[str(sid)] += 1
            counts["A_after_flip"] += flipped.is_set() and sid == "A"
            if counts["A"] >= n_readers:
                flip_now.set()

    # The run is under a timeout, so a stuck connection fails here with its stack instead
    # of at pytest-timeout's limit (300 s). It is CPU-bound (~2,000 pipelines decoded by
    # one loop): 60 s was too short on a loaded 2-core machine; this bound is for a hang.
    try:
        async with asyncio.timeout(200):
            for sid, value in expected.items():
                rows = [(e, dict.fromkeys(FIELDS, value)) for e in entities]
                await write_snapshot(client, "profile", rows, snapshot_id=sid)
            await activate(client, "profile", "A")
            cache = BatchSnapshotCache(client, ["profile"], refresh_interval_s=0.01)
            async with cache, asyncio.TaskGroup() as tasks:
                for n in range(n_readers):
                    tasks.create_task(reader(n, cache))
                await flip_now.wait()
                result = await activate(client, "profile", "B")
                flipped.set()
                assert (result.active, result.previous) == ("B", "A")
    finally:
        async with asyncio.timeout(10):
            await client.aclose()

    assert bad == []
    assert counts["A"] >= n_readers and counts["B"] == n_readers
    # Readers holding the just-replaced pointer finished reading A after the flip.
    assert counts["A_after_flip"] > 0
