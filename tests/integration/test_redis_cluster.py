"""The feature store's Redis on a real local Redis Cluster (3 primaries, 3 replicas):
the client factory, mode mismatch, slot coverage, and routing compare-and-set.

The single-node feature suites run on the cluster too, parametrised over it:
tests/integration/test_batch_store.py (snapshot flip under 1,000 readers, load, rollback,
GC), test_stream_worker.py (exactly-once after SIGKILL, random SIGKILLs) and
test_training_serving_consistency.py (online == backfill, score-batch online); failover
and per-node degradation: test_cluster_fetch.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster

from devstack.services import LocalRedisCluster
from feature_streams.redis_client import (
    RedisModeMismatchError,
    RedisOptions,
    connect,
    scan_keys,
    uncovered_reason,
)
from server.routing.state import AuditEntry, RoutingState, initial_state
from server.routing.store import RedisRoutingStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_auto_mode_builds_a_cluster_client_and_scans_every_primary(
    redis_cluster_url: str,
) -> None:
    client = await connect(RedisOptions(redis_cluster_url))
    try:
        assert isinstance(client, RedisCluster)
        keys = [f"bf:g:s:{i}" for i in range(300)]
        for key in keys:
            await client.set(key, 1)
        holders = {client.get_node_from_key(k).name for k in keys}  # type: ignore[union-attr]
        assert len(holders) == 3  # the keys really spread over the three primaries
        found = {k.decode() if isinstance(k, bytes) else k async for k in scan_keys(client, "bf:*")}
        assert found == set(keys)
        assert await uncovered_reason(client) is None
    finally:
        await client.aclose()


async def test_mode_mismatch_names_both_sides(redis_cluster_url: str, redis_url: str) -> None:
    with pytest.raises(RedisModeMismatchError, match=r"'standalone' but .* is a cluster Redis"):
        await connect(RedisOptions(redis_cluster_url, "standalone"))
    with pytest.raises(RedisModeMismatchError, match=r"'cluster' but .* is a standalone Redis"):
        await connect(RedisOptions(redis_url, "cluster"))


def test_server_started_in_cluster_mode_on_a_standalone_redis_exits_2(
    redis_url: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--set",
            f"redis.url={redis_url}",
            "--set",
            "redis.mode=cluster",
            "--set",
            f"features.definitions_path={ROOT / 'features.yaml'}",
            "--set",
            f"models.repository={tmp_path}",
            "--set",
            "server.port=0",
            "--set",
            "server.metrics_port=0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "redis.mode" in line]
    assert len(lines) == 1 and "is a standalone Redis" in lines[0]


async def test_uncovered_slot_is_reported_until_covered_again(
    redis_cluster: LocalRedisCluster, redis_cluster_url: str
) -> None:
    client = await connect(RedisOptions(redis_cluster_url))
    assert isinstance(client, RedisCluster)
    owner = client.get_node_from_key("{routing}")
    slot = client.keyslot("{routing}")
    try:
        await client.execute_command("CLUSTER DELSLOTS", slot, target_nodes=owner)
        reason = await uncovered_reason(client)
        assert reason is not None and "slots ok" in reason
        await client.execute_command("CLUSTER ADDSLOTS", slot, target_nodes=owner)
        async with asyncio.timeout(20):  # a positive signal: every node reports ok again
            for _ in iter(int, 1):
                if await uncovered_reason(client) is None:
                    break
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def test_every_cluster_node_has_its_own_rdb_file(redis_cluster: LocalRedisCluster) -> None:
    """A replica's full sync renames the RDB it received to <dir>/<dbfilename> and loads
    that path: nodes sharing one (the default dump.rdb in one workdir) let replicas
    syncing at once load each other's shard, which a failover then promoted."""
    paths = []
    for node in redis_cluster.nodes:
        client = Redis(host=node.host, port=node.port, decode_responses=True)
        try:
            config = await client.config_get("dir")
            config.update(await client.config_get("dbfilename"))
        finally:
            await client.aclose()
        paths.append(Path(str(config["dir"])) / str(config["dbfilename"]))
    assert len(set(paths)) == len(redis_cluster.nodes), paths


async def test_routing_compare_and_set_by_two_admins_on_the_cluster(
    redis_cluster_url: str,
) -> None:
    """The state hash and its audit stream share the {routing} tag, so the one-script
    compare-and-set runs on the cluster; of two admins at one revision, one wins."""
    admins = [await connect(RedisOptions(redis_cluster_url, "cluster")) for _ in range(2)]
    try:
        stores = [
            RedisRoutingStore(a, "streamscore:{routing}", "streamscore:{routing}:audit")
            for a in admins
        ]
        base = RoutingState().with_endpoint("fraud", initial_state(["1"], "1"))
        assert await stores[0].commit(0, base, [])
        changes = [base.with_endpoint("fraud", initial_state(["1", v], v)) for v in ("2", "3")]
        entries = [
            AuditEntry(1.0, f"admin{i}", "p", "fraud", "promote", "", "applied", revision=2)
            for i in range(2)
        ]
        won = await asyncio.gather(
            *(s.commit(1, c, [e]) for s, c, e in zip(stores, changes, entries, strict=True))
        )
        assert sorted(won) == [False, True]
        winner = won.index(True)
        assert await stores[1].read() == changes[winner]
        audit = await stores[0].audit("fraud", 10)
        assert [e.actor for e in audit] == [f"admin{winner}"]
        with pytest.raises(ValueError, match="different Redis Cluster slots"):
            RedisRoutingStore(admins[0], "streamscore:routing", "streamscore:audit")
    finally:
        for a in admins:
            await a.aclose()
