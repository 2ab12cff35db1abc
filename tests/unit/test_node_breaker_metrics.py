"""A Redis Cluster node's breaker changes reach ``streamscore_redis_node_breaker_state``:
the feature store forwards its per-node breakers' transitions to the metrics."""

from __future__ import annotations

from redis.asyncio import RedisCluster

from feature_streams.fetcher import BatchSnapshotCache
from server.circuit_breaker import BreakerOptions
from server.feature_store import FeatureStore, StoreOptions
from server.metrics import Metrics


def _state(metrics: Metrics, node: str) -> dict[str, float]:
    registry = metrics.registry
    return {
        state: registry.get_sample_value(
            "streamscore_redis_node_breaker_state", {"node": node, "state": state}
        )
        or 0.0
        for state in ("closed", "open", "half_open")
    }


def test_metrics_set_one_state_per_node() -> None:
    metrics = Metrics()
    metrics.redis_node_breaker("10.0.0.1:7000", "open")
    metrics.redis_node_breaker("10.0.0.2:7000", "closed")
    assert _state(metrics, "10.0.0.1:7000") == {"closed": 0.0, "open": 1.0, "half_open": 0.0}
    assert _state(metrics, "10.0.0.2:7000") == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    metrics.redis_node_breaker("10.0.0.1:7000", "closed")
    assert _state(metrics, "10.0.0.1:7000") == {"closed": 1.0, "open": 0.0, "half_open": 0.0}


def test_feature_store_reports_only_the_failing_nodes_breaker() -> None:
    metrics = Metrics()
    client = RedisCluster(host="127.0.0.1", port=1)  # never connected: nothing is read
    store = FeatureStore(
        client,
        BatchSnapshotCache(client, []),
        StoreOptions(breaker=BreakerOptions(failure_threshold=2, failure_window_s=60.0)),
        on_node_breaker=metrics.redis_node_breaker,
    )
    breakers = store.node_breakers
    breakers.success("a:1")
    for _ in range(2):
        breakers.failure("b:2")
    assert _state(metrics, "b:2")["open"] == 1.0
    assert _state(metrics, "a:1") == {"closed": 0.0, "open": 0.0, "half_open": 0.0}  # no change
