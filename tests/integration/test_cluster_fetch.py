"""Score with features from a real local Redis Cluster: values equal the standalone
store's, a stopped primary degrades only the keys it holds, and a primary killed under
Score traffic and a running stream worker is replaced by its replica with Score
answering throughout and the aggregates exact."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import grpc
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ClusterDownError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack.services import KafkaBroker, LocalRedisCluster, RedisServer
from devstack.services import redis_cluster as start_redis_cluster
from feature_streams.batch_store import activate, write_snapshot
from feature_streams.definitions import load_definitions
from feature_streams.keys import active_key, data_key, registry_key, tile_key
from feature_streams.redis_client import RedisOptions, connect
from feature_streams.stream_job import StreamWorker
from feature_streams.tile_store import read_hashes
from feature_streams.topics import ensure_topics
from feature_streams.windows import GroupPlan
from protos.streamscore.v1 import scoring_pb2 as pb
from tests.integration.test_feature_serving import (
    DEFINITIONS,
    _apply,
    _echo,
    _events,
    _overrides,
    _request,
)
from tests.integration.test_stream_worker import (
    GROUPS,
    MINUTE,
    Produced,
    assert_tiles_match,
    definitions_for,
    fast_config,
    final_offsets,
    fully_applied,
    make_events,
    produce,
    running,
    unique,
    wait_until,
)
from tests.support.model_factory import write_linear_model
from tests.support.server import running_server

pytestmark = pytest.mark.integration

CARDS = [f"card-{i}" for i in range(12)]
NODE_DOWN = "redis_node_unavailable"
# These tests check which keys degrade: a healthy node must not time out on a loaded
# machine (the 0.2 s default socket timeout can), only the stopped or killed one.
SOCKET_TIMEOUT = "redis.socket_timeout_s=5.0"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    from demo.synthetic import DEMO_FEATURES

    version_dir, _, _ = write_linear_model(
        tmp_path / "models", "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3
    )
    return version_dir.parent.parent


@pytest.fixture
def private_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of its own: these tests stop and kill primaries. With
    ``cluster-require-full-coverage no`` (docs/redis-cluster.md) the other primaries
    keep serving their slots while one primary's are down."""
    with start_redis_cluster() as cluster:
        for node in cluster.nodes:
            client = SyncRedis(host=node.host, port=node.port)
            try:
                client.config_set("cluster-require-full-coverage", "no")
            finally:
                client.close()
        yield cluster


async def _seed(client: Redis | RedisCluster) -> dict[str, str]:
    """The same stream tiles and batch snapshots for every card, on one store; returns
    each batch group's active snapshot id."""
    definitions = load_definitions(DEFINITIONS)
    plans = {name: GroupPlan.build(g) for name, g in definitions.stream_groups.items()}
    events = [e for i, card in enumerate(CARDS) for e in _events(card, f"merch-{i % 5}")]
    await _apply(client, plans, events)  # type: ignore[arg-type]
    customer_fields = definitions.batch_groups["customer_profile"].fields
    rows = {
        "customer_profile": [
            (f"cust-{i}", {f: float(i * 100 + j) for j, f in enumerate(customer_fields)})
            for i in range(len(CARDS))
        ],
        "card_profile": [
            (card, {"card_age_days": 10.0 * i, "preapproved_limit": 100.0 + i})
            for i, card in enumerate(CARDS)
        ],
    }
    snapshots = {}
    for group, group_rows in rows.items():
        info = await write_snapshot(client, group, group_rows)
        await activate(client, group, info.snapshot_id)
        snapshots[group] = info.snapshot_id
    return snapshots


def _full_request(i: int) -> pb.ScoreRequest:
    return _request(card_id=CARDS[i], customer_id=f"cust-{i}", merchant_id=f"merch-{i % 5}")


async def _score_all(url: str, repository: Path) -> list[pb.ScoreResponse]:
    async with running_server(repository, _overrides(url)) as srv:
        return list(
            await asyncio.gather(*(srv.scoring.Score(_full_request(i)) for i in range(len(CARDS))))
        )


async def test_cluster_serves_the_same_features_as_one_redis(
    redis_url: str, redis_cluster_url: str, repository: Path
) -> None:
    single = Redis.from_url(redis_url)
    cluster = await connect(RedisOptions(redis_cluster_url, "cluster"))
    assert isinstance(cluster, RedisCluster)
    try:
        await _seed(single)
        await _seed(cluster)
        holders = {cluster.get_node_from_key(tile_key("card_activity", c)).name for c in CARDS}  # type: ignore[union-attr]
        assert len(holders) == 3  # the cards really spread over the three primaries
    finally:
        await single.aclose()
        await cluster.aclose()
    on_single = await _score_all(redis_url, repository)
    on_cluster = await _score_all(redis_cluster_url, repository)
    for i, (one, many) in enumerate(zip(on_single, on_cluster, strict=True)):
        assert not one.degraded and not many.degraded, i
        assert list(many.defaulted_features) == list(one.defaulted_features) == [], i
        assert _echo(many) == _echo(one), i
        assert _echo(many)["card_txn_count_5m"] == 4
        assert _echo(many)["card_age_days"] == 10.0 * i
        assert many.score == one.score


def _node_of(cluster: LocalRedisCluster, name: str) -> RedisServer:
    port = int(name.rsplit(":", 1)[1])
    return next(node for node in cluster.nodes if node.port == port)


def _forbid_failover(cluster: LocalRedisCluster) -> None:
    """No replica of ``cluster`` takes over a failed primary (``cluster-replica-no-failover``)."""
    for node in cluster.nodes:
        client = SyncRedis(host=node.host, port=node.port)
        try:
            if client.info("replication").get("role") == "slave":
                client.config_set("cluster-replica-no-failover", "yes")
        finally:
            client.close()


async def _holders(url: str, keys: Sequence[str]) -> Mapping[str, str]:
    client = await connect(RedisOptions(url, "cluster"))
    assert isinstance(client, RedisCluster)
    try:
        return {key: client.get_node_from_key(key).name for key in keys}  # type: ignore[union-attr]
    finally:
        await client.aclose()


async def test_a_stopped_primary_degrades_only_the_keys_it_holds(
    private_cluster: LocalRedisCluster, repository: Path
) -> None:
    url = private_cluster.url
    client = await connect(RedisOptions(url, "cluster"))
    try:
        snapshot = (await _seed(client))["card_profile"]
    finally:
        await client.aclose()
    # Requests by card only: each reads its tile hash and its card_profile row (plus
    # the group's registry entry and pointer, kept off the stopped node).
    reads = {
        c: [tile_key("card_activity", c), data_key("card_profile", snapshot, c)] for c in CARDS
    }
    shared = [registry_key("card_profile"), active_key("card_profile")]
    holders = await _holders(url, [k for keys in reads.values() for k in keys] + shared)
    candidates = {holders[k] for keys in reads.values() for k in keys}
    candidates -= {holders[k] for k in shared}
    victim = sorted(candidates)[0]
    on_victim = {c for c, keys in reads.items() if any(holders[k] == victim for k in keys)}
    tile_on_victim = {c for c in CARDS if holders[tile_key("card_activity", c)] == victim}
    assert on_victim and set(CARDS) - on_victim
    # one failure opens a node's breaker: its state shows in the per-node gauge; no
    # batch-row cache: the rows read by `before` would be served from memory during
    # the stop, and this test is about what a stopped node does to the reads.
    overrides = _overrides(
        url,
        "features.fetch_timeout_s=2.0",
        SOCKET_TIMEOUT,
        "features.breaker_failures=1",
        "features.batch_cache_entries=0",
    )
    # The stopped primary must stay the slots' holder while the calls run: with the 1 s
    # cluster-node-timeout its replica would take over on a loaded machine (where the
    # calls outlast a second), and later batches would read the promoted replica.
    _forbid_failover(private_cluster)
    async with running_server(repository, overrides) as srv:
        before = await asyncio.gather(*(srv.scoring.Score(_request(card_id=c)) for c in CARDS))
        assert not any(r.degraded for r in before)
        stopped = _node_of(private_cluster, victim)
        stopped.process.send_signal(signal.SIGSTOP)
        try:
            during = await asyncio.gather(*(srv.scoring.Score(_request(card_id=c)) for c in CARDS))
        finally:
            stopped.process.send_signal(signal.SIGCONT)
        registry = srv.app.metrics.registry
        gauge = "streamscore_redis_node_breaker_state"
        assert registry.get_sample_value(gauge, {"node": victim, "state": "open"}) == 1.0
        others = candidates - {victim}
        assert all(
            registry.get_sample_value(gauge, {"node": n, "state": "open"}) in (None, 0.0)
            for n in others
        )
    for i, (card, response) in enumerate(zip(CARDS, during, strict=True)):
        echoed = _echo(response)
        if card in on_victim:
            assert list(response.degraded_reasons) == [NODE_DOWN], card
        else:
            assert not response.degraded, card
            assert echoed["card_age_days"] == 10.0 * i
        if card in tile_on_victim:
            assert "card_txn_count_5m" in response.defaulted_features, card
        else:
            assert echoed["card_txn_count_5m"] == 4, card


async def _replicated_primary(
    cluster: LocalRedisCluster, url: str, key: str, keys: Sequence[str]
) -> str | None:
    """The primary now holding ``key`` if its replica holds the very same hashes of
    ``keys`` it does (the data a failover will promote), else None.

    The holder is looked up afresh: with the 1 s cluster-node-timeout a loaded machine
    can see a spurious failover, so the primary at the test's start may be a replica
    by now. Compared by content, not by replication offset: a replica reported its
    primary's offset while holding another shard's data (a full sync that loaded the
    wrong RDB file, fixed in devstack), and the failover then lost every hash on it."""
    holders = await _holders(url, keys)
    primary = holders[key]
    mine = [k for k in keys if holders[k] == primary]
    node = _node_of(cluster, primary)
    client = Redis(host=node.host, port=node.port)
    try:
        info = await client.info("replication")
        if info.get("role") != "master":
            return None
        replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
        want = await read_hashes(client, mine)
    finally:
        await client.aclose()
    if not replicas:
        return None
    for replica in replicas:
        # one connection, no pipeline (that takes another from the pool): READONLY holds
        # per connection, and lets a replica answer reads of its primary's slots
        reader = Redis(
            host=str(replica["ip"]), port=int(replica["port"]), single_connection_client=True
        )
        try:
            await reader.readonly()
            if [dict(await reader.hgetall(k)) for k in mine] != want:
                return None
        finally:
            await reader.aclose()
    return primary


async def test_failover_under_score_traffic_and_a_running_worker(
    private_cluster: LocalRedisCluster, kafka: KafkaBroker, repository: Path
) -> None:
    """SIGKILL the primary holding card c0's tile while Score callers and the stream
    worker run: the replica takes over, Score answers every call (degraded only for
    cards on the killed primary's slots, while it lasts), the worker applies what is
    produced after the kill, and every tile equals the brute-force fold."""
    # Every client's seed is the node that will be killed (c0's primary, unless a
    # spurious failover moves it first): nothing may depend on the seed staying up.
    c0_key = tile_key("card_activity", "c0")
    seed = (await _holders(private_cluster.url, [c0_key]))[c0_key]
    url = f"redis://{seed}/0"
    topic = unique("failover")
    defs, _ = definitions_for(topic)
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    await ensure_topics(kafka.bootstrap_servers, {topic: 2})
    n, cards = 3000, 30
    events, parts = make_events(41, n, cards, 8, 2, 3_600_000, 12 * MINUTE)
    half = n // 2
    first = await produce(kafka, topic, 2, events[:half], parts[:half])
    client = await connect(RedisOptions(url, "cluster"))
    assert isinstance(client, RedisCluster)
    card_ids = [f"c{i}" for i in range(cards)]
    keys = {c: tile_key("card_activity", c) for c in card_ids}
    written = [tile_key(g, k) for g in GROUPS for k in final_offsets(first, g)]
    # the worker test's helpers are typed for Redis; they use only pipeline/HGET/HGETALL,
    # which the cluster client offers alike
    reads = cast(Redis, client)
    # No periodic trim: the check below compares whole hashes with the untrimmed fold,
    # and a run past the 60 s default (a slow failover) trimmed expired 1m tiles.
    config = fast_config(
        kafka, url, redis_retry_max_s=0.2, redis_timeout_s=1.0, trim_interval_s=3600.0
    )
    answers: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []
    overrides = _overrides(
        url, "features.fetch_timeout_s=5.0", "features.retry_interval_s=0.2", SOCKET_TIMEOUT
    )
    try:
        async with (
            running(StreamWorker(config, defs)),
            running_server(repository, overrides) as srv,
        ):
            await wait_until(lambda: fully_applied(reads, first), 60, "the first half")
            stop = asyncio.Event()

            async def caller(offset: int) -> None:
                i = offset
                while not stop.is_set():
                    card = card_ids[i % cards]
                    i += 1
                    try:
                        answer = await srv.scoring.Score(_request(None, card_id=card))
                    except grpc.aio.AioRpcError as error:
                        errors.append(error)
                        continue
                    answers.append((card, list(answer.degraded_reasons)))

            callers = [asyncio.create_task(caller(k * 7)) for k in range(4)]
            victim = ""

            async def replicated() -> bool:
                nonlocal victim
                victim = await _replicated_primary(private_cluster, url, keys["c0"], written) or ""
                return bool(victim)

            await wait_until(replicated, 30, "c0's primary replicated")
            holders = await _holders(url, list(keys.values()))
            on_victim = {c for c, k in keys.items() if holders[k] == victim}
            assert on_victim != set(card_ids)
            answered_before = len(answers)
            _node_of(private_cluster, victim).process.send_signal(signal.SIGKILL)
            rest = Produced(topic, 2, events[half:], parts[half:], [])
            rest.offsets = (await produce(kafka, topic, 2, rest.events, rest.partition_of)).offsets
            everything = Produced(
                topic, 2, events, parts, first.offsets + rest.offsets
            )  # the worker resumes: the second half lands on the promoted replica

            async def recovered() -> bool:
                if len(answers) < answered_before + 50:
                    return False
                recent = answers[-20:]
                return any(c in on_victim for c, _ in recent) and not any(r for _, r in recent)

            async def second_half_applied() -> bool:
                # the test's own client meets the failover too: until the replica is
                # promoted its re-discovery can still name the dead primary
                try:
                    return await fully_applied(reads, everything)
                except (RedisConnectionError, RedisTimeoutError, ClusterDownError):
                    return False

            await wait_until(second_half_applied, 90, "the second half")
            await wait_until(recovered, 60, "Score served from the promoted replica")
            stop.set()
            await asyncio.gather(*callers)
        assert errors == []
        degraded = [(c, r) for c, r in answers if r]
        assert degraded, "no Score call ran while the primary was down"
        assert all(r == [NODE_DOWN] for _, r in degraded)
        assert {c for c, _ in degraded} <= on_victim
        await assert_tiles_match(reads, everything, plans)
        owner = client.get_node_from_key(keys["c0"])
        assert owner is not None and owner.name != victim
    finally:
        await client.aclose()


async def test_a_key_error_on_the_cluster_degrades_only_its_row(
    redis_cluster_url: str, repository: Path
) -> None:
    """WRONGTYPE is the key's problem, not its node's: that row is ``store_key_error``,
    the other keys on the same node are served and the node's breaker stays closed."""
    client = await connect(RedisOptions(redis_cluster_url, "cluster"))
    assert isinstance(client, RedisCluster)
    try:
        await _seed(client)
        await client.delete(tile_key("card_activity", "card-3"))
        await client.set(tile_key("card_activity", "card-3"), "not a hash")
    finally:
        await client.aclose()
    async with running_server(repository, _overrides(redis_cluster_url, SOCKET_TIMEOUT)) as srv:
        answers = await asyncio.gather(*(srv.scoring.Score(_request(card_id=c)) for c in CARDS))
        store = srv.app.feature_store
        assert store is not None
        assert set(store.node_breakers.states().values()) == {"closed"}
    for card, answer in zip(CARDS, answers, strict=True):
        if card == "card-3":
            assert list(answer.degraded_reasons) == ["store_key_error"]
        else:
            assert not answer.degraded, card
            assert _echo(answer)["card_txn_count_5m"] == 4, card
