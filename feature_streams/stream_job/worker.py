"""The stream worker: Kafka events -> time tiles in Redis, applied once.

One :class:`StreamWorker` joins a consumer group on the topics of its stream
groups and loops::

    getmany(timeout_ms, max_records)             per-partition record lists
    -> decode + validate (records.py, events.py)  malformed -> <topic>.dlq (dead_letters.py)
    -> per (group, entity key, partition) lists of TileUpdates (windows.py)
    -> TileStore.apply: one EVALSHA per list, one pipeline   (skips offsets already applied,
                                                               drops + counts too-late events)
    -> commit offset + 1 per partition           (offsets.py; every batch or commit_interval_s)

A crash anywhere before the commit makes the next owner re-read from the last
commit; the apply script skips what Redis already holds, so the effect on the
tiles is exactly once. Lateness is tracked per entity key inside the script (see
:mod:`feature_streams.tile_store`). Dead letters are at least once: a replay may
publish a record's dead letter again.

Rebalances: ``on_partitions_revoked`` waits for the in-flight batch (it takes the
same lock as the loop), then commits what was applied. aiokafka does not call it
on ``stop()``, so :meth:`StreamWorker.close` flushes the same way. Expired tiles
are trimmed every ``trim_interval_s`` on the keys written since the last trim
(trim.py).

Failures. Every Redis call has a socket/connect timeout (``redis_timeout_s``): a
frozen or black-holed Redis fails the call instead of hanging the loop, so SIGTERM
still drains. Store-wide errors (connection, timeout, ``OOM``, ``LOADING``...) are
retried with backoff for as long as it takes (re-applying is harmless); an error of
one key batch's script call is retried ``script_retries`` times (``INVALID`` input,
found by the script before any write, not at all), then that batch's records go to
the dead-letter topic with the error and the rest of the batch goes on: one bad key
never stalls every partition. Nothing is committed until the batch is applied and
every one of its dead letters is sent (an unsent letter is retried; stopping
meanwhile leaves the batch uncommitted, to be re-read).

Run it: ``streamscore stream`` (:func:`feature_streams.stream_job.serve.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from wsgiref.simple_server import WSGIServer

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import RedisError

from feature_streams.definitions import FeatureDefinitions
from feature_streams.events import DeadLetter, MalformedEventError, dead_letter_topic
from feature_streams.redis_client import AnyRedis, RedisOptions, client_for, connect
from feature_streams.stream_job.config import WorkerConfig
from feature_streams.stream_job.dead_letters import DeadLetterPublisher
from feature_streams.stream_job.metrics import WorkerMetrics
from feature_streams.stream_job.offsets import OffsetTracker
from feature_streams.stream_job.records import sort_records
from feature_streams.stream_job.trim import Trimmer
from feature_streams.tile_store import ApplyResult, KeyBatch, TileStore
from feature_streams.topics import ensure_topics
from feature_streams.windows import GroupPlan

__all__ = ["BatchReport", "StreamWorker"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one consumed batch did, passed to ``on_batch`` after it was applied
    (and committed, unless ``commit_interval_s`` defers the commit). Counts are
    per stream group; ``next_offsets`` is the position reached per partition."""

    records: int
    malformed: int
    applied: Mapping[str, int]
    duplicate: Mapping[str, int]
    late: Mapping[str, int]
    next_offsets: Mapping[TopicPartition, int]
    started: float
    """``time.perf_counter()`` when the batch came back from ``getmany``."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: StreamWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._on_revoked(frozenset(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker._on_assigned(frozenset(assigned))


class StreamWorker:
    """Consumes event topics into Redis tiles. Use ``async with``, then :meth:`run`.

    ``on_batch`` (optional, synchronous) sees a :class:`BatchReport` per batch.
    Owns its consumer, its dead-letter producer, its Redis client (from
    ``config.redis_url``) and its metrics registry (and HTTP server, if enabled).
    """

    def __init__(
        self,
        config: WorkerConfig,
        definitions: FeatureDefinitions,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        names = config.stream_groups or tuple(definitions.stream_groups)
        unknown = [n for n in names if n not in definitions.stream_groups]
        if unknown:
            raise ValueError(f"unknown stream groups: {', '.join(unknown)}")
        if not names:
            raise ValueError("the definitions declare no stream group")
        self.config = config
        self.plans: dict[str, GroupPlan] = {n: GroupPlan.of(definitions, n) for n in names}
        by_topic: dict[str, list[GroupPlan]] = {}
        for plan in self.plans.values():
            by_topic.setdefault(plan.group.topic, []).append(plan)
        self._plans_by_topic = {t: tuple(p) for t, p in by_topic.items()}
        self.metrics = WorkerMetrics()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._offsets = OffsetTracker(self.metrics, config.commit_interval_s)
        self._trimmer = Trimmer(
            self.plans, self.metrics, config.trim_interval_s, config.trim_batch_keys
        )
        self._newest: dict[str, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._dead_letters: DeadLetterPublisher | None = None
        self._redis: AnyRedis | None = None
        self._store: TileStore | None = None
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.metrics_port: int | None = None
        self._on_batch = on_batch
        self._has_partitions = asyncio.Event()

    @property
    def topics(self) -> tuple[str, ...]:
        """Event topics consumed."""
        return tuple(self._plans_by_topic)

    @property
    def registry(self) -> CollectorRegistry:
        """The worker's Prometheus registry."""
        return self.metrics.registry

    def assignment(self) -> frozenset[TopicPartition]:
        """Partitions currently assigned to this worker."""
        if self._consumer is None:
            return frozenset()
        return frozenset(self._consumer.assignment())

    async def wait_for_assignment(self) -> frozenset[TopicPartition]:
        """Wait until the group has given this worker partitions; returns them."""
        while True:
            await self._has_partitions.wait()
            assigned = self.assignment()
            if assigned:
                return assigned
            self._has_partitions.clear()

    def request_stop(self) -> None:
        """Make :meth:`run` return after the current batch (signal-handler safe)."""
        self._stop.set()

    async def __aenter__(self) -> StreamWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect everything and join the consumer group (assignment follows)."""
        cfg = self.config
        try:
            # event topics must exist; their dead-letter topics are made here (1 partition)
            await ensure_topics(
                cfg.bootstrap_servers, {dead_letter_topic(t): 1 for t in self.topics}
            )
            self._redis = await self._connect_redis()
            self._store = TileStore(self._redis)
            self._producer = AIOKafkaProducer(
                bootstrap_servers=cfg.bootstrap_servers,
                client_id=cfg.client_id + "-dlq",
                acks="all",
            )
            await self._producer.start()
            self._dead_letters = DeadLetterPublisher(self._producer, self.metrics)
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=cfg.bootstrap_servers,
                group_id=cfg.group_id,
                client_id=cfg.client_id,
                enable_auto_commit=False,
                auto_offset_reset=cfg.auto_offset_reset,
                fetch_max_wait_ms=cfg.fetch_max_wait_ms,
                session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            )
            await self._consumer.start()
            self._consumer.subscribe(topics=list(self.topics), listener=_Listener(self))
            if cfg.metrics_port is not None:
                self._http = start_http_server(
                    cfg.metrics_port, addr=cfg.metrics_host, registry=self.registry
                )
                self.metrics_port = self._http[0].server_port
        except BaseException:
            await self.close()
            raise
        logger.info(
            "stream worker started",
            extra={
                "topics": list(self.topics),
                "groups": list(self.plans),
                "group_id": cfg.group_id,
                "metrics_port": self.metrics_port,
            },
        )

    async def close(self) -> None:
        """Commit what was applied, leave the group, release everything. Idempotent."""
        consumer, producer, redis_client = self._consumer, self._producer, self._redis
        if consumer is not None:
            async with self._lock:
                await self._offsets.commit(consumer, force=True)
                self._consumer = None
            await consumer.stop()
        if producer is not None:
            self._producer = self._dead_letters = None
            await producer.stop()
        if redis_client is not None:
            self._redis = self._store = None
            await redis_client.aclose()
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    async def _connect_redis(self) -> AnyRedis:
        """The worker's Redis client, its mode checked when Redis answers at start.

        Redis down at start is not fatal: the worker builds a lazily connecting client of
        the configured mode (standalone when ``auto``) and its apply loop retries until
        Redis is back, as it does for an outage later on. A mode mismatch still raises.
        """
        cfg = self.config
        options = RedisOptions(cfg.redis_url, cfg.redis_mode, socket_timeout_s=cfg.redis_timeout_s)
        try:
            return await connect(options, probe_timeout_s=cfg.redis_timeout_s)
        except (RedisError, OSError) as error:
            mode: Literal["standalone", "cluster"] = (
                "cluster" if cfg.redis_mode == "cluster" else "standalone"
            )
            logger.warning(
                "redis unreachable at start; its mode is not checked, applies retry",
                extra={"error": repr(error), "mode": mode},
            )
            return client_for(options, mode)

    async def run(self) -> None:
        """Consume until :meth:`request_stop`; every applied batch ends committed
        (at once, or by the next interval commit / :meth:`close`)."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("StreamWorker.run() before start()")
        backoff = 0.1
        while not self._stop.is_set():
            try:
                records = await consumer.getmany(
                    timeout_ms=self.config.poll_timeout_ms,
                    max_records=self.config.max_batch_records,
                )
            except KafkaError as exc:
                self.metrics.kafka_errors.inc()
                logger.warning("getmany failed: %s", exc)
                await self._pause(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            async with self._lock:
                report = await self._process(records) if records else None
                self._offsets.update_lag(consumer)
                await self._offsets.commit(consumer, force=False)
                await self._maybe_trim()
            if report is not None and self._on_batch is not None:
                self._on_batch(report)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # --- one batch ---------------------------------------------------------------

    async def _process(
        self, records: Mapping[TopicPartition, Sequence[ConsumerRecord]]
    ) -> BatchReport | None:
        started = time.perf_counter()
        consumer = self._consumer
        assert consumer is not None
        ready = sort_records(
            self.plans,
            self._plans_by_topic,
            records,
            consumer.assignment(),
            int(time.time() * 1000),
            self.config.max_event_ahead_ms,
            self.config.max_events_per_call,
        )
        if not ready.consumed:
            return None
        for topic, n in ready.per_topic.items():
            self.metrics.events.labels(topic).inc(n)
        self.metrics.batch_records.observe(ready.records)
        if ready.dead and not await self._send_dead(ready.dead):
            return None  # stopping with a dead letter unsent: leave the offsets
        batches, groups = ready.batches, ready.groups
        self._trimmer.touched(groups, (b.key for b in batches))
        result = await self._apply(batches, groups, ready.rounds)
        if result is None:
            return None  # stopping while Redis is down: leave these offsets uncommitted
        for index, error in result.rejected:
            self.metrics.rejected_keys.labels(groups[index]).inc()
            self._trimmer.untouch(groups[index], batches[index].key)  # nothing to trim
            logger.error(
                "key %s is not a tile hash; skipped its updates: %s",
                batches[index].key,
                error,
                extra={"key": batches[index].key, "error": error},
            )
        if result.failed:
            letters = self._failed_letters(records, batches, groups, result.failed)
            if not await self._send_dead(letters):
                return None
        counts = self._count(result, batches, groups)
        self._offsets.applied(ready.consumed)
        return BatchReport(
            records=ready.records,
            malformed=len(ready.dead),
            applied={g: c[0] for g, c in counts.items()},
            duplicate={g: c[1] for g, c in counts.items()},
            late={g: c[2] for g, c in counts.items()},
            next_offsets=ready.consumed,
            started=started,
        )

    def _count(
        self, result: ApplyResult, batches: Sequence[KeyBatch], groups: Sequence[str]
    ) -> dict[str, list[int]]:
        sums: dict[str, list[int]] = {g: [0, 0, 0] for g in self.plans}
        newest: dict[str, int] = {}
        for batch, group, (applied, dup, late) in zip(
            batches, groups, result.per_batch, strict=True
        ):
            acc = sums[group]
            acc[0] += applied
            acc[1] += dup
            acc[2] += late
            if applied:
                newest[group] = max(newest.get(group, 0), max(e.ts_ms for e in batch.events))
        m = self.metrics
        for group, (applied, dup, late) in sums.items():
            m.applied.labels(group).inc(applied)
            m.duplicates.labels(group).inc(dup)
            m.late.labels(group).inc(late)
        for group, ts in newest.items():
            if ts > self._newest.get(group, -1):
                self._newest[group] = ts
                m.newest_event.labels(group).set(ts / 1000.0)
        return sums

    async def _apply(
        self, batches: Sequence[KeyBatch], groups: Sequence[str], rounds: Sequence[list[int]]
    ) -> ApplyResult | None:
        """Apply ``batches`` round by round (a key's chunks in order); ``None`` when
        stopping before everything was applied or given up."""
        total = ApplyResult(per_batch=[(0, 0, 0)] * len(batches))
        for indexes in rounds:
            if not await self._apply_round(batches, groups, indexes, total):
                return None
        return total

    async def _apply_round(
        self,
        batches: Sequence[KeyBatch],
        groups: Sequence[str],
        indexes: list[int],
        total: ApplyResult,
    ) -> bool:
        store = self._store
        assert store is not None
        cfg = self.config
        delay, attempt, todo = 0.05, 0, indexes
        while todo:
            started = time.perf_counter()
            try:
                result = await store.apply([batches[i] for i in todo])
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.inc()
                logger.warning("tile apply failed, retrying: %r", exc)
                if self._stop.is_set():
                    return False
                await self._pause(delay)
                delay = min(delay * 2, cfg.redis_retry_max_s)
                continue
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            total.applied += result.applied
            total.duplicate += result.duplicate
            total.late += result.late
            for j, counts in enumerate(result.per_batch):
                total.per_batch[todo[j]] = counts
            total.rejected.extend((todo[j], error) for j, error in result.rejected)
            attempt += 1
            retry = []
            for j, error in result.failed:
                i = todo[j]
                self.metrics.script_errors.labels(groups[i]).inc()
                if attempt >= cfg.script_retries or error.startswith("INVALID"):
                    total.failed.append((i, error))
                else:
                    retry.append(i)
            todo = retry
            if todo:
                logger.warning(
                    "tile script failed for %d key batches, retrying: %s",
                    len(todo),
                    result.failed[0][1],
                )
                if self._stop.is_set():
                    return False
                await self._pause(delay)
                delay = min(delay * 2, cfg.redis_retry_max_s)
        return True

    def _failed_letters(
        self,
        records: Mapping[TopicPartition, Sequence[ConsumerRecord]],
        batches: Sequence[KeyBatch],
        groups: Sequence[str],
        failed: Sequence[tuple[int, str]],
    ) -> list[DeadLetter]:
        """One dead letter per record with an event in a given-up key batch."""
        by_offset = {(tp, m.offset): m for tp, msgs in records.items() for m in msgs}
        letters: dict[tuple[TopicPartition, int], DeadLetter] = {}
        for index, error in failed:
            batch, group = batches[index], groups[index]
            self.metrics.failed_batches.labels(group).inc()
            self._trimmer.untouch(group, batch.key)
            logger.error(
                "gave up applying %d events to %s; their records go to the dead-letter topic: %s",
                len(batch.events),
                batch.key,
                error,
                extra={"key": batch.key, "error": error},
            )
            tp = TopicPartition(batch.topic, batch.partition)
            reason = MalformedEventError(f"tile apply failed: {error}"[:300], None, group)
            for event in batch.events:
                msg = by_offset.get((tp, event.offset))
                if msg is not None and (tp, event.offset) not in letters:
                    letters[tp, event.offset] = DeadLetter.of(
                        tp.topic, tp.partition, msg.offset, msg.value, msg.key, reason
                    )
        return list(letters.values())

    async def _send_dead(self, letters: Sequence[DeadLetter]) -> bool:
        """Send ``letters`` until all are sent; ``False`` when stopping first."""
        publisher = self._dead_letters
        assert publisher is not None
        unsent = await publisher.publish(letters)
        delay = 0.1
        while unsent:
            if self._stop.is_set():
                return False
            await self._pause(delay)
            delay = min(delay * 2, 5.0)
            unsent = await publisher.publish(unsent, again=True)
        return True

    # --- trimming, rebalances --------------------------------------------------

    async def _maybe_trim(self, force: bool = False) -> None:
        store = self._store
        assert store is not None
        await self._trimmer.maybe_trim(store, force)

    async def trim_now(self) -> None:
        """Trim expired tiles of every key written since the last trim, now."""
        async with self._lock:
            await self._maybe_trim(force=True)

    async def _on_revoked(self, revoked: frozenset[TopicPartition]) -> None:
        self._has_partitions.clear()
        async with self._lock:  # waits for the in-flight batch
            await self._offsets.commit(self._consumer, force=True)
            self._offsets.forget(revoked)
        if revoked:
            names = _names(revoked)
            logger.info("partitions revoked: %s", names, extra={"partitions": names})

    async def _on_assigned(self, assigned: frozenset[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None and assigned:
            # Positions (from the committed offsets) for the lag gauge; never block long.
            tps = sorted(assigned)
            with contextlib.suppress(KafkaError, TimeoutError):
                async with asyncio.timeout(2.0):
                    positions = await asyncio.gather(*(consumer.position(tp) for tp in tps))
                    self._offsets.positions(dict(zip(tps, positions, strict=True)))
            self._has_partitions.set()
        names = _names(assigned)
        logger.info("partitions assigned: %s", names, extra={"partitions": names})


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in tps)
