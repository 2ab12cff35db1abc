"""A Kafka sink for records that must not be lost (decision records, traffic log at 100%).

Same ``offer`` contract as :class:`~server.records.kafka_sink.KafkaSink` (synchronous,
never blocks on Kafka, never raises), different promise: a record offered is sent
(at least once) unless the spill budget is exhausted.

* Kafka ``acks=all``. Partitions (``partition_by``): ``key``, each record in the
  partition of its key's hash (Kafka's default partitioner), so one key's records
  share a partition and keep their order, at the cost of one record batch per
  partition a round touches; ``round``, every record of a round (per topic) in the
  partition of the round's first key, so a round is one record batch (its build,
  CRC and produce-request entry are per batch in aiokafka's Python: bench/RESULTS.md),
  for records whose key carries no ordering need (one record per key, as a decision
  record per request id). Either way consumers drop duplicates by key: a resend
  after a lost ack repeats records (no idempotent producer: some brokers, Tansu
  among them, refuse it). A failed round stays at the head of the FIFO, so its resend
  starts with the same record and, by ``round``, goes to the same partition (unless
  the partition count changed or the resend is cut shorter by a byte limit).
* One FIFO per sink: the spill file (oldest) then memory (newest). A round is a
  prefix of it (spilled records, then memory ones once the whole spill is in it), at
  most one record batch per partition, and the next round starts only after every
  batch of this one was acknowledged; so records reach each partition in offer
  order, spilled ones before newer in-memory ones.
* Memory is bounded in bytes (``max_buffered_bytes``; a lazy record counts as
  ``lazy_size_estimate`` until encoded). An offer past it moves the oldest records
  to the spill first (encoding them then if needed); when Kafka fails, the sender
  moves everything in memory to the spill and retries after ``retry_interval_s``.
* Only when the spill budget (``spill_max_bytes``) is exhausted are offers dropped
  (``spill_full``); ``health`` says so while it lasts.
* A record larger than ``max_request_size`` is passed to ``shrink`` (caller-provided)
  and counted ``truncated`` when the result fits, or dropped alone as ``too_large``.
* ``close`` sends what it can within its timeout; the rest goes to the spill, which
  the next sink on the same directory sends first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from server.records.kafka_outage import KafkaOutage
from server.records.kafka_sink import Payload, SinkMetrics, _stop_producer
from server.records.partitioner import partition_for
from server.records.produce import new_batch, produce
from server.records.spill import SpillFile, SpillRecord

__all__ = [
    "DURABLE_DROP_REASONS",
    "DurableSink",
    "DurableSinkConfig",
    "PartitionBy",
    "Shrink",
    "SinkHealth",
]

logger = logging.getLogger(__name__)

#: ``shrink(value, limit)``: a smaller form of a record value, ideally at most ``limit`` bytes.
Shrink = Callable[[bytes, int], bytes]
DurableState = Literal["connecting", "up", "down", "closed"]
#: How a record's partition is chosen (see the module docstring).
PartitionBy = Literal["key", "round"]
DURABLE_DROP_REASONS = ("spill_full", "too_large", "encode_failed", "closed")
#: Bytes of a record batch around its records (header; the request adds a little more).
_BATCH_OVERHEAD = 128
_SLICE = 16


@dataclass(frozen=True, slots=True)
class DurableSinkConfig:
    """Connection, memory and spill bounds of one durable sink."""

    bootstrap_servers: str
    spill_dir: Path
    #: The ``sink`` label of its gauges.
    name: str = "durable"
    client_id: str = "streamscore-records-durable"
    max_buffered_bytes: int = 8 << 20
    spill_max_bytes: int = 256 << 20
    spill_segment_bytes: int = 4 << 20
    #: Largest produce request (and so record) the broker takes.
    max_request_size: int = 1 << 20
    #: Records per round, and bytes per partition batch.
    max_batch: int = 500
    max_batch_bytes: int = 512 << 10
    #: How long a round waits to fill (up to ``max_batch``). The sink alone spends less
    #: CPU per record with longer waits, but in the server a 100 ms round's burst of
    #: work on the serving loop cost more than it saved (bench/RESULTS.md, decision
    #: record: 100 ms gave CPU 1.38x / p99 3.6x of off, 20 ms 1.13x / 1.31x).
    max_wait_ms: int = 20
    #: ``key``: the partition of each record's key (per-key order, a batch per partition
    #: touched); ``round``: a round's records in one partition (one batch per round).
    partition_by: PartitionBy = "key"
    #: A round not acknowledged within this is a failure (Kafka slow counts as down).
    request_timeout_ms: int = 5_000
    connect_timeout_s: float = 5.0
    #: After a failure, how long until the next try (records are kept meanwhile).
    retry_interval_s: float = 1.0
    #: Memory counted for a record whose value is not encoded yet.
    lazy_size_estimate: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "max_buffered_bytes",
            "spill_max_bytes",
            "spill_segment_bytes",
            "max_request_size",
            "max_batch",
            "max_batch_bytes",
            "lazy_size_estimate",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retry_interval_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("retry_interval_s and connect_timeout_s must be > 0")
        if self.partition_by not in ("key", "round"):
            raise ValueError(f"partition_by must be 'key' or 'round', not {self.partition_by!r}")


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """What a durable sink can tell the app's health and operators."""

    state: DurableState
    buffered_bytes: int
    spilled_records: int
    spill_bytes: int
    #: Offers are being dropped because the spill budget is exhausted.
    dropping: bool

    @property
    def ok(self) -> bool:
        """Kafka up and nothing dropped for lack of spill room."""
        return self.state == "up" and not self.dropping


class _Entry:
    """A record in memory: its payload until encoded, then its value."""

    __slots__ = ("key", "payload", "size", "topic", "value")

    def __init__(self, topic: str, key: bytes | None, payload: Payload, size: int) -> None:
        self.topic = topic
        self.key = key
        self.payload: Payload | None = payload
        self.value: bytes | None = None  # set once encoded and checked against the limit
        self.size = size

    @property
    def dead(self) -> bool:
        """Dropped while encoding (counted); skipped by sends and spills."""
        return self.payload is None and self.value is None


class DurableSink:
    """Kafka sink with a byte-bounded memory buffer and a local spill (one per process)."""

    def __init__(
        self,
        config: DurableSinkConfig,
        metrics: SinkMetrics | None = None,
        *,
        shrink: Shrink | None = None,
    ) -> None:
        """Open the spill directory (recovering what a previous run left); start sends later."""
        self.config = config
        self._metrics = metrics
        self._shrink = shrink
        self._spill = SpillFile(
            config.spill_dir, config.spill_max_bytes, config.spill_segment_bytes
        )
        self._memory: deque[_Entry] = deque()
        self._memory_bytes = 0
        self._inflight_memory = 0  # memory head entries in the current round
        self._inflight_spilled = 0  # of the round, moved to the spill head while in flight
        self._dirty = False  # spill written since the last fsync
        self._dropping = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._state: DurableState = "connecting"
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._syncing: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, list[int]] = {}
        self._round = 0
        #: Records acknowledged, by topic.
        self.sent: Counter[str] = Counter()
        #: Records dropped, by reason.
        self.dropped: Counter[str] = Counter()
        #: Records written to the spill, by topic.
        self.spilled: Counter[str] = Counter()
        #: Records cut down by ``shrink``, by topic.
        self.truncated: Counter[str] = Counter()
        #: Kafka outages: one log line each, aiokafka's connection errors held back.
        self.outage = KafkaOutage(
            f"durable sink {config.name}",
            logger,
            failures=None if metrics is None else metrics.kafka_failures,
            suppressed=None if metrics is None else metrics.kafka_log_suppressed,
        )
        #: This sink's gauge children (buffered, spill bytes), bound once: set every round.
        self._gauges = (
            None
            if metrics is None
            else (
                metrics.buffered_bytes.labels(config.name),
                metrics.spill_bytes.labels(config.name),
            )
        )
        self._update_idle()

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> DurableState:
        """``connecting``, ``up``, ``down`` (retrying; records kept) or ``closed``."""
        return self._state

    @property
    def buffered_bytes(self) -> int:
        """Bytes of records held in memory."""
        return self._memory_bytes

    @property
    def spill(self) -> SpillFile:
        """The spill file (read-only use: ``pending``, ``bytes``)."""
        return self._spill

    def health(self) -> SinkHealth:
        """State, memory and spill use, and whether offers are being dropped."""
        return SinkHealth(
            self._state, self._memory_bytes, self._spill.pending, self._spill.bytes, self._dropping
        )

    def start(self) -> None:
        """Start the sender on the running loop (it first sends what the spill holds)."""
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"durable-sink:{self.config.name}"
            )
            self.outage.install()

    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        """Queue one record without waiting for Kafka; ``False`` when dropped (and counted)."""
        if self._closing:
            self._drop(topic, "closed", 1)
            return False
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: start() comes later
                self.start()
        size = len(value) if isinstance(value, bytes) else self.config.lazy_size_estimate
        if self._memory_bytes + size > self.config.max_buffered_bytes and not self._overflow(size):
            self._dropping = True
            self._drop(topic, "spill_full", 1)
            return False
        memory = self._memory
        memory.append(_Entry(topic, key, value, size))
        self._memory_bytes += size
        self._idle.clear()
        if len(memory) == 1 or len(memory) >= self.config.max_batch:
            self._wakeup.set()
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Wait until memory and spill are empty (all acknowledged); ``False`` on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records; send within ``timeout_s``, spill the rest (fsynced). Idempotent."""
        if self._state == "closed":
            return
        self._closing = True
        self._wakeup.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        task, self._task = self._task, None
        if task is not None:
            # keep a little of the grace for spilling what is left
            _, pending = await asyncio.wait({task}, timeout=max(0.0, timeout_s * 0.8))
            if pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._state = "closed"
        self._inflight_memory = self._inflight_spilled = 0
        left = len(self._memory)
        self._spill_memory(len(self._memory))
        if self._syncing is not None:
            with contextlib.suppress(Exception):
                await self._syncing
        await asyncio.to_thread(self._spill.close)
        if left or self._spill.pending:
            logger.info(
                "durable sink closed: %d records left in the spill for the next start",
                self._spill.pending,
                extra={"spill_dir": str(self.config.spill_dir)},
            )
        self._update_gauges()
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_producer(producer, max(0.5, until - loop.time()))
        self.outage.uninstall()

    # ---------------------------------------------------------------- counting
    def _drop(self, topic: str, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if self._metrics is not None:
            self._metrics.dropped(topic, reason, count)

    def _update_idle(self) -> None:
        if not self._memory and not self._spill.pending:
            self._idle.set()
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self._gauges is not None:
            buffered, spill = self._gauges
            buffered.set(self._memory_bytes)
            spill.set(self._spill.bytes)

    # ---------------------------------------------------------- encode, spill
    def _materialize(self, entry: _Entry) -> bool:
        """Encode ``entry`` and fit it to the broker's limit; ``False`` if dropped (counted)."""
        if entry.value is not None:
            return True
        payload = entry.payload
        if payload is None:
            return False
        try:
            value = payload if isinstance(payload, bytes) else payload()
        except Exception:
            logger.exception("durable sink: encoding a record failed")
            value = None
            self._drop(entry.topic, "encode_failed", 1)
        if value is not None:
            value = self._fit(entry.topic, entry.key, value)
        entry.payload = None
        entry.value = value
        size = 0 if value is None else len(value)
        self._memory_bytes += size - entry.size
        entry.size = size
        return value is not None

    def _fit(self, topic: str, key: bytes | None, value: bytes) -> bytes | None:
        limit = self.config.max_request_size - _BATCH_OVERHEAD
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, []) <= limit:
            return value
        if self._shrink is not None:
            room = limit - (DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"", []))
            try:
                smaller = self._shrink(value, room)
            except Exception:
                logger.exception("durable sink: shrinking a record failed")
                smaller = None
            if (
                smaller is not None
                and DefaultRecordBatchBuilder.estimate_size_in_bytes(key, smaller, []) <= limit
            ):
                self.truncated[topic] += 1
                if self._metrics is not None:
                    self._metrics.truncated(topic, 1)
                return smaller
        logger.warning(
            "durable sink: record of %d bytes is too large for the broker; dropped",
            len(value),
            extra={"topic": topic, "limit": limit},
        )
        self._drop(topic, "too_large", 1)
        return None

    def _overflow(self, needed: int) -> bool:
        """Move the oldest memory records to the spill until ``needed`` fits; ``False`` if full."""
        limit = self.config.max_buffered_bytes
        memory = self._memory
        while memory and self._memory_bytes + needed > limit:
            if not self._spill_head():
                return False
        self._update_gauges()
        return self._memory_bytes + needed <= limit or not memory

    def _spill_head(self) -> bool:
        """Move the oldest memory record to the spill; ``False`` when the spill is full."""
        entry = self._memory[0]
        alive = self._materialize(entry)
        if alive:
            assert entry.value is not None
            if not self._spill.append((SpillRecord(entry.topic, entry.key, entry.value),)):
                return False
            self._dirty = True
            self._dropping = False
            self.spilled[entry.topic] += 1
            if self._metrics is not None:
                self._metrics.spilled(entry.topic, 1)
        self._memory.popleft()
        self._memory_bytes -= entry.size
        if self._inflight_memory:
            self._inflight_memory -= 1
            if alive:
                self._inflight_spilled += 1
        return True

    def _spill_memory(self, count: int) -> int:
        """Move up to ``count`` oldest memory records to the spill; drop them if it is full."""
        moved = 0
        while self._memory and moved < count:
            if not self._spill_head():
                entry = self._memory.popleft()
                self._memory_bytes -= entry.size
                self._dropping = True
                self._drop(entry.topic, "spill_full", 1)
            moved += 1
        self._update_gauges()
        return moved

    async def _sync(self) -> None:
        """Fsync what was spilled, off the loop (one at a time)."""
        if not self._dirty:
            return
        self._dirty = False
        files, close = self._spill.sync_begin()
        self._syncing = asyncio.ensure_future(asyncio.to_thread(SpillFile.sync_files, files, close))
        await self._syncing
        self._syncing = None

    # ------------------------------------------------------------------ sender
    async def _run(self) -> None:
        while True:
            await self._sync()
            if self._producer is None:
                self._producer = await self._connect()
                if self._producer is None:
                    if await self._pause():
                        return
                    continue
            if self._spill.pending or self._memory:
                if not self._spill.pending:
                    await self._fill_round()
                ok = await self._send_round(self._producer)
            else:
                self._update_idle()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._update_idle()
            if not ok and await self._pause():
                return

    async def _fill_round(self) -> None:
        wait_s = self.config.max_wait_ms / 1000
        if wait_s <= 0 or self._closing or len(self._memory) >= self.config.max_batch:
            return
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._wakeup.wait()

    async def _encode_head(self) -> None:
        """Encode the next round's records in slices (the loop serves requests meanwhile)."""
        head = [e for _, e in zip(range(self.config.max_batch), self._memory, strict=False)]
        for index, entry in enumerate(head):
            if index % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
            self._materialize(entry)

    async def _pause(self) -> bool:
        """Kafka failed: spill memory, wait ``retry_interval_s``; ``True`` if closing."""
        self.outage.failed(
            "cannot connect or send",
            f"spilling to {self.config.spill_dir}, retrying every "
            f"{self.config.retry_interval_s:g} s",
        )
        self._state = "down"
        producer, self._producer = self._producer, None
        if producer is not None:  # a fresh producer next time: no stale retries of old batches
            await _stop_producer(producer, 1.0)
        # asked again next time: the metadata request (re)creates a topic a restarted
        # broker lost, and sees a partition count that changed meanwhile
        self._partitions.clear()
        await self._spill_all()
        await self._sync()
        if not self._closing:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.retry_interval_s):
                    while not self._closing:
                        await self._wakeup.wait()
                        self._wakeup.clear()
        return self._closing

    async def _spill_all(self) -> None:
        while self._memory:
            self._spill_memory(_SLICE)
            await asyncio.sleep(0)

    async def _connect(self) -> AIOKafkaProducer | None:
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=cfg.request_timeout_ms,
            max_request_size=cfg.max_request_size,
            max_batch_size=cfg.max_batch_bytes,
        )
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await producer.start()
        except asyncio.CancelledError:
            await _stop_producer(producer, 1.0)
            raise
        except Exception as error:  # aiokafka, OSError, timeout: all mean "not now"
            logger.debug("durable sink: cannot connect", extra={"error": repr(error)})
            await _stop_producer(producer, 1.0)
            return None
        self._state = "up"
        if self.outage.down:
            self.outage.connected()
        else:
            logger.info(
                "durable sink connected", extra={"bootstrap_servers": cfg.bootstrap_servers}
            )
        return producer

    async def _known_partitions(self, producer: AIOKafkaProducer, topics: set[str]) -> None:
        for topic in topics:
            if topic not in self._partitions:
                self._partitions[topic] = sorted(await producer.partitions_for(topic))

    def _build(
        self, records: list[tuple[str, bytes | None, bytes]]
    ) -> tuple[int, dict[tuple[str, int], bytes]]:
        """Record batches for the longest prefix of ``records`` that fits one batch per
        partition: (prefix length, built batches by (topic, partition)). Synchronous."""
        self._round += 1
        builders: dict[tuple[str, int], DefaultRecordBatchBuilder] = {}
        counts: dict[tuple[str, int], int] = {}
        by_round = self.config.partition_by == "round"
        chosen: dict[str, int] = {}  # by_round: the round's partition per topic
        count = len(records)
        for index, (topic, key, value) in enumerate(records):
            partitions = self._partitions.get(topic)
            if not partitions:
                count = index
                break
            partition = chosen.get(topic, -1) if by_round else -1
            if partition < 0:
                if key is None:
                    partition = partitions[self._round % len(partitions)]
                else:
                    partition = partition_for(key, partitions)
                if by_round:
                    chosen[topic] = partition
            where = (topic, partition)
            builder = builders.get(where)
            if builder is None:
                builder = builders[where] = new_batch(self.config.max_batch_bytes)
                counts[where] = 0
            if builder.append(counts[where], None, key, value, []) is None:
                count = index  # this partition's batch is full: the next round
                break
            counts[where] += 1
        return count, {where: bytes(b.build()) for where, b in builders.items() if counts[where]}

    async def _ship(
        self, producer: AIOKafkaProducer, batches: dict[tuple[str, int], bytes]
    ) -> bool:
        """Send the batches and wait for every ack; ``True`` when all were acknowledged."""
        return await produce(producer.client, batches, timeout_ms=self.config.request_timeout_ms)

    def _acked(self, records: list[tuple[str, bytes | None, bytes]]) -> None:
        by_topic = Counter(topic for topic, _, _ in records)
        for topic, count in by_topic.items():
            self.sent[topic] += count
            if self._metrics is not None:
                self._metrics.sent(topic, count)

    async def _send_round(self, producer: AIOKafkaProducer) -> bool:
        """One round: the FIFO's prefix (spilled records first, then memory) to Kafka."""
        cfg = self.config
        await self._encode_head()
        topics = {r.topic for r in self._spill.peek(cfg.max_batch, cfg.max_batch_bytes)}
        topics.update(e.topic for _, e in zip(range(cfg.max_batch), self._memory, strict=False))
        try:
            await self._known_partitions(producer, topics)
        except Exception:
            return False
        # synchronous from here to the in-flight mark: offers cannot interleave
        spilled = self._spill.peek(cfg.max_batch, cfg.max_batch_bytes)
        records = [(r.topic, r.key, r.value) for r in spilled]
        entries: list[_Entry] = []
        if len(spilled) == self._spill.pending:  # the whole spill: memory comes next
            for entry in self._memory:
                if len(records) >= cfg.max_batch or (entry.value is None and not entry.dead):
                    break  # not encoded yet: the next round
                entries.append(entry)
                if entry.value is not None:
                    records.append((entry.topic, entry.key, entry.value))
        count, batches = self._build(records)
        from_spill = min(count, len(spilled))
        live_wanted = count - from_spill
        live = 0
        for index, entry in enumerate(entries):  # cut after the last live record sent
            if not entry.dead:
                if live == live_wanted:
                    entries = entries[:index]
                    break
                live += 1
        self._inflight_memory, self._inflight_spilled = len(entries), 0
        ok = await self._ship(producer, batches)
        inflight, moved = self._inflight_memory, self._inflight_spilled
        self._inflight_memory = self._inflight_spilled = 0
        if not ok:
            return False
        for _ in range(inflight):  # those not moved to the spill meanwhile
            entry = self._memory.popleft()
            self._memory_bytes -= entry.size
        # moved ones sit right after the round's spilled ones
        self._spill.consume(from_spill + moved)
        self._acked(records[:count])
        return True
