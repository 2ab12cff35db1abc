"""A bounded Kafka sink for side records (shadow comparisons, traffic log) that never blocks.

``offer`` is synchronous and O(1): it appends the record to a bounded buffer, or
drops it and counts why. One background task (started by ``start`` or the first
offer) drains the buffer in rounds (each waits up to ``max_wait_ms`` to fill) into
record batches of a plain ``AIOKafkaProducer`` (acks=1; no idempotence or
transactions, which some brokers such as Tansu refuse). It shares the serving
event loop, so it yields every few records. Serving never waits on it:

* buffer full (a burst, or Kafka slow): the record is dropped, ``buffer_full``;
* Kafka unreachable or a send failed: what is buffered and everything offered for
  the next ``retry_interval_s`` is dropped, ``kafka_unavailable`` / ``send_failed``;
  then the sink tries again (a record is a side product: losing it beats holding
  memory or latency for it);
* after ``close`` starts: ``closed``.

A record's value may be bytes or a zero-argument callable returning bytes; the
callable runs on the sender task, so encoding (e.g. JSON) is not paid by the
request that offered it. ``close`` flushes what is buffered within a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from server.records.kafka_outage import KafkaOutage

__all__ = [
    "DROP_REASONS",
    "KafkaSink",
    "Payload",
    "RecordSink",
    "SinkConfig",
    "SinkMetrics",
]

logger = logging.getLogger(__name__)

#: A record value: bytes, or a callable producing them on the sender task.
Payload = bytes | Callable[[], bytes]
SinkState = Literal["connecting", "up", "down", "closed"]
DROP_REASONS = ("buffer_full", "kafka_unavailable", "send_failed", "encode_failed", "closed")


class RecordSink(Protocol):
    """Where side records go; ``offer`` must never block or raise."""

    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        """Queue one record; ``False`` when it was dropped (and counted)."""
        ...


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Connection and buffering of one sink."""

    bootstrap_servers: str
    client_id: str = "streamscore-records"
    #: Records held while waiting for Kafka; past it, offers are dropped.
    max_buffered: int = 10_000
    #: Records handed to the producer per round.
    max_batch: int = 500
    #: How long a round waits to fill (up to ``max_batch``) before it is sent: fewer,
    #: larger produce requests (side records are not latency-bound).
    max_wait_ms: int = 20
    #: The producer's own linger.
    linger_ms: int = 5
    #: aiokafka's per-request timeout (metadata, produce).
    request_timeout_ms: int = 5_000
    connect_timeout_s: float = 5.0
    #: After Kafka failed, how long offers are dropped before the sink tries again.
    retry_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_buffered < 1 or self.max_batch < 1:
            raise ValueError("max_buffered and max_batch must be >= 1")
        if self.max_wait_ms < 0 or self.linger_ms < 0:
            raise ValueError("max_wait_ms and linger_ms must be >= 0")
        if self.retry_interval_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("retry_interval_s and connect_timeout_s must be > 0")


class SinkMetrics:
    """Prometheus families of every sink of a process (create once per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._sent = PromCounter(
            "streamscore_record_sink_sent",
            "Side records (shadow, traffic log) acknowledged by Kafka, by topic.",
            ["topic"],
            registry=registry,
        )
        self._dropped = PromCounter(
            "streamscore_record_sink_dropped",
            "Side records dropped, by topic and reason (best effort: buffer_full, "
            "kafka_unavailable, send_failed, encode_failed, closed; durable: spill_full, "
            "too_large, encode_failed, closed).",
            ["topic", "reason"],
            registry=registry,
        )
        self.buffered = Gauge(
            "streamscore_record_sink_buffered",
            "Side records waiting to be sent.",
            registry=registry,
        )
        self._spilled = PromCounter(
            "streamscore_record_sink_spilled",
            "Records a durable sink wrote to its local spill file (Kafka slow or down), by topic.",
            ["topic"],
            registry=registry,
        )
        self._truncated = PromCounter(
            "streamscore_record_sink_truncated",
            "Records too large for the broker that were cut down and sent, by topic.",
            ["topic"],
            registry=registry,
        )
        #: Bytes a durable sink holds in memory, by sink.
        self.buffered_bytes = Gauge(
            "streamscore_record_sink_buffered_bytes",
            "Bytes of records a durable sink holds in memory (lazy records at an estimate).",
            ["sink"],
            registry=registry,
        )
        #: Bytes of a durable sink's spill files, by sink.
        self.spill_bytes = Gauge(
            "streamscore_record_sink_spill_bytes",
            "Bytes of a durable sink's spill files (records waiting for Kafka on disk).",
            ["sink"],
            registry=registry,
        )
        #: Failed attempts to reach Kafka, by sink (one log line per outage).
        self.kafka_failures = PromCounter(
            "streamscore_record_sink_kafka_failures",
            "Attempts of a record sink to connect to or send to Kafka that failed, by sink.",
            ["sink"],
            registry=registry,
        )
        #: aiokafka connection-error lines not logged during an outage, by sink.
        self.kafka_log_suppressed = PromCounter(
            "streamscore_record_sink_kafka_log_suppressed",
            "aiokafka connection-error log lines suppressed during a Kafka outage, by sink.",
            ["sink"],
            registry=registry,
        )
        self._sent_children: dict[str, PromCounter] = {}
        self._dropped_children: dict[tuple[str, str], PromCounter] = {}

    def sent(self, topic: str, count: int) -> None:
        """``count`` records of ``topic`` were acknowledged."""
        child = self._sent_children.get(topic)
        if child is None:
            child = self._sent_children[topic] = self._sent.labels(topic)
        child.inc(count)

    def spilled(self, topic: str, count: int) -> None:
        """``count`` records of ``topic`` were written to a spill file."""
        self._spilled.labels(topic).inc(count)

    def truncated(self, topic: str, count: int) -> None:
        """``count`` records of ``topic`` were cut down to fit the broker."""
        self._truncated.labels(topic).inc(count)

    def dropped(self, topic: str, reason: str, count: int) -> None:
        """``count`` records of ``topic`` were dropped for ``reason``."""
        key = (topic, reason)
        child = self._dropped_children.get(key)
        if child is None:
            child = self._dropped_children[key] = self._dropped.labels(topic, reason)
        child.inc(count)


_Record = tuple[str, bytes | None, Payload]
#: Records encoded or appended between two yields to the event loop (the sink shares
#: the loop with serving: long uninterrupted stretches would delay answers).
_SLICE = 16


class KafkaSink:
    """Bounded, non-blocking record sink backed by one Kafka producer (one per process)."""

    def __init__(self, config: SinkConfig, metrics: SinkMetrics | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._buffer: deque[_Record] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._state: SinkState = "connecting"
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._round = 0
        #: Records acknowledged, by topic.
        self.sent: Counter[str] = Counter()
        #: Records dropped, by reason.
        self.dropped: Counter[str] = Counter()
        #: Kafka outages: one log line each, aiokafka's connection errors held back.
        self.outage = KafkaOutage(
            "kafka record sink",
            logger,
            failures=None if metrics is None else metrics.kafka_failures,
            suppressed=None if metrics is None else metrics.kafka_log_suppressed,
        )

    @property
    def state(self) -> SinkState:
        """``connecting``, ``up``, ``down`` (dropping until the next try) or ``closed``."""
        return self._state

    @property
    def buffered(self) -> int:
        """Records waiting to be sent."""
        return len(self._buffer)

    def start(self) -> None:
        """Start the sender task on the running loop; connecting happens in the background."""
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="kafka-sink:sender"
            )
            self.outage.install()

    def _start_lazily(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: start() will be called
            self.start()

    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        """Queue one record without blocking; ``False`` when it was dropped (and counted).

        The first offer starts the sender (and so the connection) if ``start`` was not
        called: a server whose records are never used never connects to Kafka.
        """
        state = self._state
        if state == "up" or state == "connecting":
            if self._task is None:
                self._start_lazily()
            if len(self._buffer) < self.config.max_buffered:
                buffer = self._buffer
                buffer.append((topic, key, value))
                self._idle.clear()
                if len(buffer) == 1 or len(buffer) >= self.config.max_batch:
                    self._wakeup.set()  # an idle sender, or a full round
                return True
            self._drop(topic, "buffer_full", 1)
            return False
        self._drop(topic, "kafka_unavailable" if state == "down" else "closed", 1)
        return False

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything offered so far was sent or dropped; ``False`` on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records, send what is buffered within ``timeout_s``, then disconnect.

        What could not be sent in time is dropped as ``closed``. Idempotent.
        """
        if self._state == "closed":
            return
        self._closing = True
        self._wakeup.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        task, self._task = self._task, None
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=timeout_s)
            if pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._state = "closed"
        self._drop_buffer("closed")
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_producer(producer, max(0.5, until - loop.time()))
        self.outage.uninstall()

    def _drop(self, topic: str, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if self._metrics is not None:
            self._metrics.dropped(topic, reason, count)

    def _drop_buffer(self, reason: str) -> None:
        by_topic: Counter[str] = Counter(topic for topic, _, _ in self._buffer)
        self._buffer.clear()
        for topic, count in by_topic.items():
            self._drop(topic, reason, count)
        self._set_idle()

    def _set_idle(self) -> None:
        if not self._buffer:
            self._idle.set()
        if self._metrics is not None:
            self._metrics.buffered.set(len(self._buffer))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._producer is None:
                if self._closing and not self._buffer:
                    return
                self._producer = await self._connect()
                if self._producer is None:
                    if await self._pause():
                        return
                    continue
            if not self._buffer:
                self._set_idle()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill_round()
            batch = [
                self._buffer.popleft() for _ in range(min(len(self._buffer), self.config.max_batch))
            ]
            started = loop.time()
            ok = await self._send(self._producer, batch)
            self._set_idle()
            if not ok:
                self.outage.failed(
                    f"send failed after {loop.time() - started:.3f} s",
                    f"dropping records, retrying every {self.config.retry_interval_s:g} s",
                )
                if await self._pause():
                    return

    async def _fill_round(self) -> None:
        """Wait up to ``max_wait_ms`` for a full round (offers wake this only when full)."""
        wait_s = self.config.max_wait_ms / 1000
        if wait_s <= 0 or self._closing or len(self._buffer) >= self.config.max_batch:
            return
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._wakeup.wait()

    async def _pause(self) -> bool:
        """Drop everything for ``retry_interval_s`` (or until closing); ``True`` if closing."""
        self._state = "down"
        self._drop_buffer("kafka_unavailable")
        if not self._closing:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.retry_interval_s):
                    while not self._closing:
                        await self._wakeup.wait()
                        self._wakeup.clear()
        if self._closing:
            return True
        self._state = "up" if self._producer is not None else "connecting"
        return False

    async def _connect(self) -> AIOKafkaProducer | None:
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=cfg.client_id,
            acks=1,
            enable_idempotence=False,
            linger_ms=cfg.linger_ms,
            request_timeout_ms=cfg.request_timeout_ms,
        )
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await producer.start()
        except asyncio.CancelledError:
            await _stop_producer(producer, 1.0)
            raise
        except Exception as error:  # aiokafka, OSError, timeout: all mean "not now"
            self.outage.failed(
                f"cannot connect to {cfg.bootstrap_servers}: {error!r}",
                f"dropping records, retrying every {cfg.retry_interval_s:g} s",
            )
            await _stop_producer(producer, 1.0)
            return None
        self._state = "up"
        if self.outage.down:
            self.outage.connected()
        else:
            logger.info(
                "kafka record sink connected", extra={"bootstrap_servers": cfg.bootstrap_servers}
            )
        return producer

    async def _send(self, producer: AIOKafkaProducer, batch: list[_Record]) -> bool:
        """Hand ``batch`` to the producer and wait for the acks; count what happened.

        Records of one topic go to one partition per round (rotating between rounds,
        like Kafka's sticky partitioner for keyless records) in pre-built record
        batches: a third of the cost of ``send`` per record. Keys are kept on the
        records but do not choose the partition (no per-key order is promised).
        """
        by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
        for index, (topic, key, payload) in enumerate(batch):
            if index % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)  # encoding is CPU work on the serving loop: slice it
            try:
                value = payload if isinstance(payload, bytes) else payload()
            except Exception:
                logger.exception("kafka record sink: encoding a record failed")
                self._drop(topic, "encode_failed", 1)
                continue
            by_topic.setdefault(topic, []).append((key, value))
        self._round += 1
        futures: list[tuple[str, int, asyncio.Future[object]]] = []
        failed: Counter[str] = Counter()
        for topic, records in by_topic.items():
            handed = 0
            try:
                partitions = sorted(await producer.partitions_for(topic))
                partition = partitions[self._round % len(partitions)]
                builder = producer.create_batch()
                count = 0
                for index, (key, value) in enumerate(records):
                    if index % _SLICE == _SLICE - 1:
                        await asyncio.sleep(0)
                    if builder.append(key=key, value=value, timestamp=None) is None:
                        if count:
                            future = await producer.send_batch(builder, topic, partition=partition)
                            futures.append((topic, count, future))
                            handed += count
                            builder, count = producer.create_batch(), 0
                        if builder.append(key=key, value=value, timestamp=None) is None:
                            failed[topic] += 1  # larger than a whole batch
                            handed += 1
                            continue
                    count += 1
                if count:
                    future = await producer.send_batch(builder, topic, partition=partition)
                    futures.append((topic, count, future))
                    handed += count
            except Exception as error:  # metadata timeout, broker gone
                logger.debug("kafka record sink: send refused", extra={"error": repr(error)})
                failed[topic] += len(records) - handed
        if futures:
            timeout_s = self.config.request_timeout_ms / 1000 + 1.0
            done, _ = await asyncio.wait([f for _, _, f in futures], timeout=timeout_s)
            acked: Counter[str] = Counter()
            for topic, count, future in futures:
                if future in done and future.exception() is None:
                    acked[topic] += count
                else:
                    failed[topic] += count
            for topic, count in acked.items():
                self.sent[topic] += count
                if self._metrics is not None:
                    self._metrics.sent(topic, count)
        for topic, count in failed.items():
            self._drop(topic, "send_failed", count)
        return not failed


async def _stop_producer(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop (flush) a producer; give up after ``timeout_s`` without raising."""
    try:
        async with asyncio.timeout(timeout_s):
            await producer.stop()
    except Exception as error:
        logger.warning("kafka record sink: producer stop failed", extra={"error": repr(error)})
