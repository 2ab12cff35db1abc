"""Prometheus metrics of one server process, on a registry the app owns.

Label children are bound once per model version (``observer_for``) so the
request path does no label lookups for batch metrics; what is updated per request
or per batch uses the lock-free children of ``server.loop_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from feature_streams.tile_cache import CacheStats as TileCacheStats
from server.circuit_breaker import STATES, BreakerState
from server.features import Freshness
from server.loop_metrics import LoopCounter, LoopCounterFamily, LoopHistogram, LoopHistogramFamily

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """Every metric family of the server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Updated per request or per batch: lock-free children (server.loop_metrics).
        self.requests = LoopCounterFamily(
            "streamscore_requests",
            "Scoring requests by API, model, version, route and gRPC status code.",
            ["api", "model", "version", "route", "code"],
            registry=r,
        )
        self.latency = LoopHistogramFamily(
            "streamscore_request_latency_seconds",
            "Server-side end-to-end latency of a request, decode to response.",
            ["api", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = LoopHistogramFamily(
            "streamscore_queue_wait_seconds",
            "Time a request waited in its micro-batch queue.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = LoopHistogramFamily(
            "streamscore_batch_size_rows",
            "Rows per executed micro-batch.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = LoopHistogramFamily(
            "streamscore_batch_requests",
            "Requests per executed micro-batch.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference = LoopHistogramFamily(
            "streamscore_inference_seconds",
            "Time to run one micro-batch through ONNX Runtime.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "streamscore_queue_depth",
            "Requests waiting in a micro-batch queue.",
            ["model", "version"],
            registry=r,
        )
        self.dropped = Counter(
            "streamscore_dropped_requests",
            "Requests dropped before running, by reason (queue_full, deadline, cancelled).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "streamscore_in_flight_requests", "Requests being handled now.", ["api"], registry=r
        )
        self.feature_fetch = Histogram(
            "streamscore_feature_fetch_seconds",
            "Redis round trip fetching one micro-batch's features.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Per answer with store features (one freshness per stream group): lock-free too.
        self.freshness = LoopHistogramFamily(
            "streamscore_feature_freshness_seconds",
            "Age of the newest applied stream event behind an answer, by stream group.",
            ["group"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self._freshness_children: dict[str, LoopHistogram] = {}
        self.degraded = LoopCounterFamily(
            "streamscore_degraded_answers",
            "Answers given with default features because a dependency failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "streamscore_feature_store_breaker_state",
            "1 for the state the feature store's Redis circuit breaker is in, else 0.",
            ["state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "streamscore_feature_store_breaker_transitions",
            "Changes of the feature store's circuit breaker, by the state entered.",
            ["state"],
            registry=r,
        )
        for state in STATES:
            self.breaker_state.labels(state).set(1.0 if state == "closed" else 0.0)
        self.node_breaker_state = Gauge(
            "streamscore_redis_node_breaker_state",
            "1 for the state a Redis Cluster node's circuit breaker is in, else 0 "
            "(a node appears once its breaker first changes).",
            ["node", "state"],
            registry=r,
        )
        self.models_loaded = Gauge(
            "streamscore_model_versions_loaded", "Loaded model versions.", registry=r
        )
        self.model_load_failures = Counter(
            "streamscore_model_load_failures", "Model versions refused at load.", registry=r
        )

    def track_tile_cache(self, stats: Callable[[], TileCacheStats]) -> None:
        """Export the fetcher's tile cache counters, read from ``stats`` at each scrape."""
        self.registry.register(_TileCacheCollector(stats))

    def observe_feature_fetch(self, seconds: float, requests: int) -> None:
        """One micro-batch's Redis round trip."""
        self.feature_fetch.observe(seconds)

    def feature_store_breaker(self, state: BreakerState) -> None:
        """The feature store's breaker entered ``state``."""
        for name in STATES:
            self.breaker_state.labels(name).set(1.0 if name == state else 0.0)
        self.breaker_transitions.labels(state).inc()

    def redis_node_breaker(self, node: str, state: BreakerState) -> None:
        """The breaker of Redis Cluster node ``node`` (``host:port``) entered ``state``."""
        for name in STATES:
            self.node_breaker_state.labels(node, name).set(1.0 if name == state else 0.0)

    def observe_features(self, freshness: Sequence[Freshness], degraded: Sequence[str]) -> None:
        """Freshness and degradation of one answered request."""
        for item in freshness:
            child = self._freshness_children.get(item.group)
            if child is None:
                child = self._freshness_children[item.group] = self.freshness.labels(item.group)
            child.observe(item.age_ms / 1000.0)
        for reason in degraded:
            self.degraded.labels(reason).inc()

    def api(self, name: str) -> ApiMetrics:
        """Request metrics of one API (``score``, ``stream``, ``v2``) with cached children."""
        return ApiMetrics(name, self)

    def observer_for(self, model: str, version: str) -> BatchMetrics:
        """Batch observer with label children bound for one version."""
        depth = _Depth()
        self.queue_depth.labels(model, version).set_function(depth.read)
        return BatchMetrics(
            batch_rows=self.batch_size.labels(model, version),
            batch_requests=self.batch_requests.labels(model, version),
            inference=self.inference.labels(model, version),
            wait=self.queue_wait.labels(model, version),
            depth=depth,
            dropped_queue_full=self.dropped.labels(model, version, "queue_full"),
            dropped_deadline=self.dropped.labels(model, version, "deadline"),
            dropped_cancelled=self.dropped.labels(model, version, "cancelled"),
        )


class ApiMetrics:
    """Per-API request metrics; label children are created once and reused.

    ``model`` labels must come from served model names (callers map anything
    else to ``UNKNOWN_MODEL``) so a client cannot grow the label set.
    """

    def __init__(self, api: str, metrics: Metrics) -> None:
        self._api = api
        self._metrics = metrics
        #: Requests of this API being handled now: a plain int on the request path,
        #: read by the gauge only when scraped (no lock per request).
        self.in_flight = 0
        metrics.in_flight.labels(api).set_function(lambda: self.in_flight)
        self._latency: dict[str, LoopHistogram] = {}
        self._requests: dict[tuple[str, str, str, str], LoopCounter] = {}

    def observe_latency(self, model: str, seconds: float) -> None:
        """Record one request's server-side latency."""
        child = self._latency.get(model)
        if child is None:
            child = self._latency[model] = self._metrics.latency.labels(self._api, model)
        child.observe(seconds)

    def count(self, model: str, version: str, route: str, code: str) -> None:
        """Count one finished request."""
        key = (model, version, route, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(self._api, *key)
        child.inc()


UNKNOWN_MODEL = "_unknown"


class _Depth:
    """A queue's depth: a plain int set on the loop per queued request, read by its
    gauge only when scraped (``Gauge.set`` takes a mutex per update)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def read(self) -> float:
        return self.value


@dataclass(frozen=True, slots=True)
class BatchMetrics:
    """``server.batcher.BatchObserver`` backed by Prometheus children."""

    batch_rows: LoopHistogram
    batch_requests: LoopHistogram
    inference: LoopHistogram
    wait: LoopHistogram
    depth: _Depth
    dropped_queue_full: Counter
    dropped_deadline: Counter
    dropped_cancelled: Counter

    def batch_ran(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)

    def queue_waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def dropped(self, reason: str) -> None:
        if reason == "queue_full":
            self.dropped_queue_full.inc()
        elif reason == "deadline":
            self.dropped_deadline.inc()
        else:
            self.dropped_cancelled.inc()

    def queue_depth(self, requests: int) -> None:
        self.depth.value = requests


class _TileCacheCollector(Collector):
    """The tile cache's counters as metric families, read when scraped (no request-path
    work: the cache counts in plain ints, see :mod:`feature_streams.tile_cache`)."""

    def __init__(self, stats: Callable[[], TileCacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        prefix = "streamscore_feature_tile_cache"
        yield CounterMetricFamily(
            f"{prefix}_hits", "Kept tile hashes served: their version was unchanged.", s.hits
        )
        yield CounterMetricFamily(
            f"{prefix}_misses", "Tile hashes read whole: not kept, or changed since.", s.misses
        )
        yield CounterMetricFamily(
            f"{prefix}_evictions", "Kept tile hashes dropped for room (LRU).", s.evictions
        )
        yield GaugeMetricFamily(f"{prefix}_entries", "Tile hashes kept.", s.entries)
        yield GaugeMetricFamily(
            f"{prefix}_bytes", "Estimated bytes of the tile hashes kept.", s.bytes
        )
