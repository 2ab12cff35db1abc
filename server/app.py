"""AppContext: the one object that owns a server process's resources.

Entering builds, in order: metrics, the Redis client (when features or the routing
state use Redis), the feature store, the model registry and pipeline, the routing
sync (reads or bootstraps the persisted routing state, loads its versions off the
loop, then watches it) and the routing changes over it, the gRPC server with its
servicers (the admin API on it, or on its own server when ``server.admin_port`` is
set), health and reflection, and the metrics HTTP endpoint (listeners plaintext or
TLS with certificates re-read on change or SIGHUP, see ``server.tls``); health turns
SERVING once models are loaded. Leaving tears down in reverse: health NOT_SERVING, the
scoring and admin servers stopped together (new calls refused, in-flight calls on either
get the one ``grace_period_s``), routing watch stopped,
batchers drained, models released, Redis closed, metrics endpoint closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from feature_streams.definitions import FeatureDefinitions, load_definitions
from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.redis_client import (
    AnyRedis,
    RedisModeMismatchError,
    RedisOptions,
    client_for,
    connect,
    is_cluster,
    uncovered_reason,
)
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.admin.api import SERVICE_NAME as ADMIN_SERVICE_NAME
from server.admin.api import AdminService
from server.admin.auth import Authenticator, CertificateAuthenticator, TokenAuthenticator
from server.batcher import BatchPolicy
from server.drift.metrics import DriftMetrics
from server.drift.monitor import DriftMonitor
from server.explain.service import ReasonPolicy
from server.feature_store import FeatureStore, redis_options, store_options
from server.grpc_api import InferenceService, ScoringService
from server.health import NOT_SERVING, SERVING, HealthService, Status
from server.metrics import Metrics
from server.overrides import OverridePermission
from server.pipeline import ScoringPipeline
from server.records.durable_sink import DurableSink, DurableSinkConfig
from server.records.kafka_sink import KafkaSink, SinkConfig, SinkMetrics
from server.records.shadow import ShadowMetrics, ShadowOptions, ShadowRunner, live_backlog
from server.records.shrink import shrink_json
from server.records.traffic_log import TrafficLog
from server.registry import ModelRegistry, ServingOptions
from server.request_decoding import add_servicer
from server.rollout.controller import RolloutController, RolloutMetrics
from server.rollout.policy import RolloutState
from server.rollout.routing import RoutingRolloutActions, rollout_states, sync_windows
from server.rollout.stats import StatsRecorder
from server.routing.changes import RoutingChanges
from server.routing.evidence import ApprovalGate
from server.routing.state import AuditEntry, RoutingState
from server.routing.store import FileRoutingStore, RedisRoutingStore, RoutingStore
from server.routing.sync import RoutingSync
from server.runtime import RuntimeOptions
from server.settings import Settings
from server.tls import ReloadingCertificates
from server.transport import (
    PROMISE_TRANSPORT_EXPERIMENT,
    TLSReloadMetrics,
    bind,
    experiments_to_enable,
    server_options,
)

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Scoring"].full_name,
    v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


class AppContext:
    """Owns the registry, batchers, gRPC server, health and metrics of one process."""

    def __init__(
        self,
        settings: Settings,
        *,
        process_index: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.process_index = process_index
        self.clock = clock
        self.metrics = Metrics()
        self.definitions: FeatureDefinitions | None = None
        self.redis: AnyRedis | None = None
        self._fetch_redis: AnyRedis | None = None
        """Cluster mode: the feature fetch's own client (see :meth:`_fetch_client`)."""
        self.redis_uncovered: str | None = None
        """Why the Redis Cluster cannot serve every slot (health NOT_SERVING meanwhile)."""
        self._coverage_task: asyncio.Task[None] | None = None
        self.snapshots: BatchSnapshotCache | None = None
        self.feature_store: FeatureStore | None = None
        self.registry = ModelRegistry(self.metrics.observer_for)
        limits = settings.server.limits
        self.pipeline = ScoringPipeline(
            self.registry, clock, limits.event_time_skew_s, limits.max_name_length
        )
        self.routing: RoutingSync | None = None
        self.routing_changes: RoutingChanges | None = None
        self.rollout_stats: StatsRecorder | None = None
        self.record_sink: KafkaSink | None = None
        self.durable_sink: DurableSink | None = None
        self.shadows: ShadowRunner | None = None
        self.rollouts: RolloutController | None = None
        self.drift: DriftMonitor | None = None
        self.health = HealthService()
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._metrics_http: tuple[WSGIServer, threading.Thread] | None = None
        self._certificates: list[ReloadingCertificates] = []
        self._ready = False
        #: Started with no version loaded: health turns SERVING once routing loads one.
        self._awaiting_models = False
        self._health_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True while models are loaded and the server is not draining."""
        return self._ready

    def serving_options(self, model: str) -> ServingOptions:
        """Registry options of ``model`` from the settings."""
        serving = self.settings.serving_for(model)
        return ServingOptions(
            policy=BatchPolicy(
                max_batch_size=serving.max_batch_size,
                max_queue_size=serving.max_queue_size,
                max_queue_rows=serving.max_queue_rows,
                max_queue_delay_s=serving.max_queue_delay_ms / 1000.0,
                max_queue_wait_s=serving.max_queue_wait_s,
            ),
            runtime=RuntimeOptions(
                execution=serving.execution,
                intra_op_threads=serving.intra_op_threads,
                inter_op_threads=serving.inter_op_threads,
                worker_nice=serving.worker_nice,
            ),
            versions=serving.versions,
            champion=serving.champion,
            failure_policy=serving.feature_failure_policy or self.settings.redis.failure_policy,
            reasons=ReasonPolicy(
                serving.reasons.when,
                serving.reasons.top_n,
                serving.reasons.max_queue_size,
                inline_max_s=serving.reasons.inline_max_ms / 1000.0,
            ),
        )

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start_feature_store(self) -> None:
        """Definitions, Redis pool, snapshot cache and store, when a definitions file is set."""
        settings = self.settings
        path = settings.features.definitions_path
        if path is None:
            logger.info("no feature definitions: every model feature comes with the request")
            return
        self.definitions = await asyncio.to_thread(load_definitions, path)
        self.snapshots = BatchSnapshotCache(
            self._redis_client(),
            self.definitions.batch_groups,
            refresh_interval_s=settings.features.snapshot_refresh_s,
        )
        await self.snapshots.start()
        self.feature_store = FeatureStore(
            await self._fetch_client(),
            self.snapshots,
            store_options(settings.features),
            clock=self.clock,
            on_fetch=self.metrics.observe_feature_fetch,
            on_breaker=self.metrics.feature_store_breaker,
            on_node_breaker=self.metrics.redis_node_breaker,
        )
        tiles = self.feature_store.fetcher.tile_cache
        if tiles is not None:
            self.metrics.track_tile_cache(tiles.stats)
        self.registry.use_features(self.definitions, self.feature_store)

    def _start_side_records(self) -> None:
        """Shadow runner, traffic log and their Kafka sink (it connects on first use)."""
        s = self.settings
        sink_metrics = SinkMetrics(self.metrics.registry)
        self.record_sink = KafkaSink(
            SinkConfig(
                bootstrap_servers=s.kafka.bootstrap_servers,
                client_id=f"streamscore-records-{self.process_index}",
                max_buffered=s.records.max_buffered,
                retry_interval_s=s.records.retry_interval_s,
            ),
            sink_metrics,
        )
        self.shadows = ShadowRunner(
            self.registry.get,
            ShadowMetrics(self.metrics.registry),
            sink=self.record_sink,
            options=ShadowOptions(
                max_batch_size=s.shadow.max_batch_size,
                max_queue_size=s.shadow.max_queue_size,
                records_topic=s.shadow.records_topic,
            ),
            is_busy=live_backlog(self.registry.all_versions, s.shadow.busy_queue_depth),
            clock=self.clock,
        )
        self.pipeline.shadows = self.shadows
        self.registry.on_retire(self.shadows.release)  # unloaded versions drop their lanes
        if s.traffic_log.sample_rate > 0:
            durable = s.records.durable
            if s.traffic_log.delivery == "durable" and durable.spill_dir is not None:
                self.durable_sink = DurableSink(
                    DurableSinkConfig(
                        bootstrap_servers=s.kafka.bootstrap_servers,
                        spill_dir=durable.spill_dir / f"p{self.process_index}",
                        name="traffic",
                        client_id=f"streamscore-durable-{self.process_index}",
                        max_buffered_bytes=durable.max_buffered_bytes,
                        spill_max_bytes=durable.spill_max_bytes,
                        spill_segment_bytes=durable.spill_segment_bytes,
                        max_request_size=durable.max_request_size,
                        retry_interval_s=durable.retry_interval_s,
                        partition_by=durable.partition_by,
                    ),
                    sink_metrics,
                    shrink=shrink_json,
                )
                self.durable_sink.start()  # sends what a previous run spilled
            salt = s.traffic_log.sample_salt
            self.pipeline.traffic = TrafficLog(
                self.durable_sink or self.record_sink,
                s.traffic_log.topic,
                s.traffic_log.sample_rate,
                registry=self.metrics.registry,
                clock=self.clock,
                sample_salt=salt.get_secret_value().encode() if salt is not None else None,
                process_index=self.process_index,
            )

    def _start_drift(self, store: RoutingStore) -> None:
        """Drift monitoring of every version loaded from now on (needs Redis to merge)."""
        drift = self.settings.drift
        if not drift.enabled:
            logger.info("drift monitoring disabled (drift.enabled=false)")
            return
        if self.redis is None:
            logger.info("drift monitoring off: no Redis to merge counts across processes")
            return
        clock = self.clock

        async def audit(model: str, reason: str, detail: Mapping[str, Any]) -> None:
            entry = AuditEntry(
                time=clock(),
                actor="drift-monitor",
                peer="",
                endpoint=model,
                action="drift",
                reason=reason,
                outcome="applied",
                detail=detail,
            )
            await store.append_audit(entry)

        self.drift = DriftMonitor(
            drift,
            self.redis,
            DriftMetrics(self.metrics.registry),
            sink=self.record_sink,
            audit=audit,
            clock=clock,
        )
        self.registry.use_drift(self.drift)

    def _routing_applied(self, state: RoutingState) -> None:
        if self.rollout_stats is not None:
            sync_windows(self.rollout_stats, state)
        if self._awaiting_models and self.registry.all_versions():
            # e.g. a model requiring approval, served once a version is approved and loaded
            self._awaiting_models = False
            self._ready = True
            logger.info("a model version is loaded: health SERVING")
            if self.redis_uncovered is None:
                self._health_task = asyncio.get_running_loop().create_task(
                    self._set_health(SERVING), name="health-serving"
                )

    def _redis_options(self) -> RedisOptions:
        return redis_options(self.settings.redis, self.settings.features)

    async def _connect_redis(self) -> None:
        """Build the process's one Redis client (standalone or cluster, checked against
        ``redis.mode``) when anything uses Redis; a mismatch raises (exit 2). An
        unreachable Redis at start falls back to the configured mode (the store
        degrades until it answers)."""
        settings = self.settings
        if settings.features.definitions_path is None and settings.routing_store() != "redis":
            return
        try:
            self.redis = await connect(self._redis_options(), probe_timeout_s=2.0)
        except RedisModeMismatchError:
            raise
        except (RedisError, OSError) as exc:
            logger.warning("redis not reachable at start (%s); mode %s", exc, settings.redis.mode)
            cluster = settings.redis.mode == "cluster"
            self.redis = client_for(self._redis_options(), "cluster" if cluster else "standalone")
        if is_cluster(self.redis):
            self._coverage_task = asyncio.create_task(
                self._watch_coverage(), name="redis-cluster-coverage"
            )

    async def _fetch_client(self) -> AnyRedis:
        """The client the per-micro-batch fetch reads with: the shared one on a standalone
        Redis; on a cluster a client of its own, because redis-py's ``ClusterPipeline``
        (routing, snapshot pointers) closes every connection of its client when one node
        fails, which would cut the fetch's reads on the healthy nodes."""
        shared = self._redis_client()
        if not is_cluster(shared):
            return shared
        client = self._fetch_redis = client_for(self._redis_options(), "cluster")
        try:
            await client.initialize()
        except (RedisError, OSError) as exc:  # the fetch re-reads the slot map when it fails
            logger.warning("redis cluster slot map not read at start: %s", exc)
        return client

    def _redis_client(self) -> AnyRedis:
        """The process's one Redis client (features and routing state share it)."""
        if self.redis is None:
            self.redis = client_for(self._redis_options(), "standalone")
        return self.redis

    async def _watch_coverage(self, interval_s: float = 1.0) -> None:
        """Health NOT_SERVING, with the reason logged, while cluster slots are uncovered."""
        assert self.redis is not None
        while True:
            try:
                reason = await uncovered_reason(self.redis)
            except Exception as exc:  # never let the watch die
                reason = f"redis cluster: coverage check failed: {exc}"
            if reason != self.redis_uncovered:
                self.redis_uncovered = reason
                if reason is not None:
                    logger.error("health NOT_SERVING: %s", reason)
                    await self._set_health(NOT_SERVING)
                else:
                    logger.info("redis cluster slots covered again")
                    if self._ready:
                        await self._set_health(SERVING)
            await asyncio.sleep(interval_s)

    def _routing_store(self) -> RoutingStore:
        settings = self.settings
        routing = settings.routing
        if settings.routing_store() == "redis":
            return RedisRoutingStore(
                self._redis_client(), routing.redis_key, routing.audit_key, routing.audit_max_len
            )
        return FileRoutingStore(
            routing.state_file(settings.models.repository), audit_max_bytes=routing.audit_max_bytes
        )

    def _grpc_server(self) -> grpc.aio.Server:
        connections = self.settings.server.connections
        if experiments_to_enable(connections, os.environ):
            logger.warning(
                "http2_transport 'promise' asked, but GRPC_EXPERIMENTS did not enable %s "
                "before gRPC was imported: serving on chttp2 (pending-call refusals "
                "answer CANCELLED); `streamscore serve` sets it itself",
                PROMISE_TRANSPORT_EXPERIMENT,
            )
        return grpc.aio.server(options=server_options(self.settings.server))

    def reload_tls(self) -> None:
        """Re-read every listener's certificate files on its next handshake (SIGHUP)."""
        for certificates in self._certificates:
            certificates.request_reload()

    async def _start(self) -> None:
        settings = self.settings
        await self._connect_redis()
        await self._start_feature_store()
        self._start_side_records()
        if settings.routing_store() == "redis":
            redis = self._redis_client()
            rollout_metrics = RolloutMetrics(self.metrics.registry)
            self.rollout_stats = StatsRecorder(redis, on_flush_failure=rollout_metrics.flush_failed)
            self.pipeline.stats = self.rollout_stats
        store = self._routing_store()
        self._start_drift(store)
        gate = ApprovalGate(settings.models.repository, settings.governance.required)
        self.routing = RoutingSync(
            self.registry,
            store,
            settings.models.repository,
            self.serving_options,
            canary_entity=settings.routing.canary_entity,
            poll_interval_s=settings.routing.poll_interval_s,
            metrics=self.metrics,
            clock=self.clock,
            on_applied=self._routing_applied,
            gate=gate,
        )
        await self.routing.start()
        if self.drift is not None:
            await self.drift.start()
        self.routing_changes = RoutingChanges(
            self.routing, store, self.registry, settings.models.repository, self.clock, gate
        )
        if self.rollout_stats is not None:
            routing = self.routing
            await self.rollout_stats.start()

            async def active_rollouts() -> list[RolloutState]:
                return rollout_states(routing.state)

            self.rollouts = RolloutController(
                self._redis_client(),
                RoutingRolloutActions(self.routing_changes, self.clock),
                active_rollouts,
                metrics=rollout_metrics,
                clock=self.clock,
            )
            await self.rollouts.start()
        server = self._grpc_server()
        self._server = server
        tls = settings.server.admin_tls
        authenticator: Authenticator = (
            TokenAuthenticator(settings.server.admin_credentials(), settings.server.admin_roles())
            if tls is None
            else CertificateAuthenticator(
                tls.allowed_subjects, tls.subject_roles, tls.default_roles
            )
        )
        admin = AdminService(
            self.routing_changes,
            authenticator,
            drift=self.drift.view if self.drift is not None else None,
        )
        admin_server = server
        if settings.server.admin_port is not None:
            admin_server = self._admin_server = self._grpc_server()
        add_servicer(apb_grpc.add_AdminServicer_to_server, admin, admin_server)
        granted = settings.server.overrides
        overrides = OverridePermission(
            {name: token.get_secret_value() for name, token in granted.tokens.items()},
            granted.subjects,
            allow_all=granted.allow_all,
        )
        add_servicer(
            pb_grpc.add_ScoringServicer_to_server,
            ScoringService(
                self.pipeline, self.registry, self.metrics, settings.server.limits, overrides
            ),
            server,
        )
        add_servicer(
            v2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceService(
                self.pipeline,
                self.registry,
                self.metrics,
                is_ready=lambda: self._ready,
                limits=settings.server.limits,
                overrides=overrides,
            ),
            server,
        )
        add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        admin_names = (ADMIN_SERVICE_NAME,) if admin_server is server else ()
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, *admin_names, health_name, reflection.SERVICE_NAME), server
        )
        tls_metrics = TLSReloadMetrics(self.metrics.registry)
        address = f"{settings.server.host}:{settings.server.port}"
        self.port, certificates = bind(
            server, address, settings.server.tls, listener="grpc", metrics=tls_metrics
        )
        if certificates is not None:
            self._certificates.append(certificates)
        if self.port == 0:
            raise OSError(f"could not bind gRPC port {address}")
        if admin_server is not server:
            reflection.enable_server_reflection(
                (ADMIN_SERVICE_NAME, reflection.SERVICE_NAME), admin_server
            )
            admin_address = f"{settings.server.host}:{settings.server.admin_port}"
            self.admin_port, certificates = bind(
                admin_server, admin_address, tls, listener="admin", metrics=tls_metrics
            )
            if certificates is not None:
                self._certificates.append(certificates)
            if self.admin_port == 0:
                raise OSError(f"could not bind admin port {admin_address}")
            await admin_server.start()
        else:
            self.admin_port = self.port
        await server.start()
        if settings.server.metrics_port:
            port = settings.server.metrics_port + self.process_index
            http_server, thread = start_http_server(
                port, addr=settings.server.host, registry=self.metrics.registry
            )
            self._metrics_http = (http_server, thread)
            self.metrics_port = http_server.server_port
        # Everything loaded so far lives as long as the process: keep it out of the
        # collector's generations so collections on the request path stay short.
        gc.collect()
        gc.freeze()
        if self.registry.all_versions():
            self._ready = True
            if self.redis_uncovered is None:
                await self._set_health(SERVING)
        else:
            logger.error("no model version loaded; health stays NOT_SERVING until one is loaded")
            self._awaiting_models = True
            await self._set_health(NOT_SERVING)
        logger.info(
            "serving",
            extra={
                "address": f"{settings.server.host}:{self.port}",
                "metrics_port": self.metrics_port,
                "models": {n: self.registry.versions(n) for n in self.registry.names()},
                "refused": list(self.routing.load_failures.values()),
                "admin_port": self.admin_port,
                "tls": settings.server.tls is not None,
                "routing_revision": self.routing.state.revision,
                "process_index": self.process_index,
            },
        )

    async def _set_health(self, status: Status) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def close(self) -> None:
        """Drain and release everything, in reverse order of creation. Idempotent."""
        self._ready = False
        self._awaiting_models = False
        health, self._health_task = self._health_task, None
        if health is not None:
            await health  # a SERVING set in flight lands before NOT_SERVING
        coverage, self._coverage_task = self._coverage_task, None
        if coverage is not None:
            coverage.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await coverage
        # Scoring and admin servers drain together: one grace period, not two in a row.
        # They stop accepting calls before health says NOT_SERVING, so a client that
        # saw NOT_SERVING is never served a new call by this process.
        servers = [s for s in (self._server, self._admin_server) if s is not None]
        self._server = self._admin_server = None
        grace = self.settings.server.grace_period_s
        stopping = [asyncio.ensure_future(server.stop(grace)) for server in servers]
        if stopping:
            await asyncio.sleep(0)  # each stop() refuses new calls on its first step
        await self.health.enter_graceful_shutdown()
        if stopping:
            await asyncio.gather(*stopping)
        if self.rollouts is not None:
            await self.rollouts.stop()
            self.rollouts = None
        if self.rollout_stats is not None:
            await self.rollout_stats.stop()  # a last flush of this process's counts
            self.rollout_stats = None
        if self.drift is not None:
            await self.drift.stop()  # a last flush of this process's counts
        if self.routing is not None:
            await self.routing.close()
        if self.shadows is not None:  # before the registry: shadows run its models
            await self.shadows.close(timeout_s=2.0)
        await self.registry.close()
        await self.pipeline.settle()  # records of v2 rows waiting on their reasons
        if self.record_sink is not None:
            await self.record_sink.close(timeout_s=2.0)
        if self.durable_sink is not None:  # what Kafka does not take in time is spilled
            await self.durable_sink.close(timeout_s=2.0)
        if self.snapshots is not None:
            await self.snapshots.stop()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.feature_store is not None:
            await self.feature_store.aclose()
        if self._fetch_redis is not None:
            await self._fetch_redis.aclose()
            self._fetch_redis = None
        if self._metrics_http is not None:
            http_server, thread = self._metrics_http
            self._metrics_http = None
            await asyncio.to_thread(_stop_http, http_server, thread)
        logger.info("stopped", extra={"process_index": self.process_index})


def _stop_http(http_server: WSGIServer, thread: threading.Thread) -> None:
    http_server.shutdown()
    http_server.server_close()
    thread.join(timeout=5)
