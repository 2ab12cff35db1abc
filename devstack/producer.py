"""Synthetic card-transaction producer for the embedded stack (``streamscore dev``).

Publishes JSON transaction events to the events topic, keyed by ``card_id``, at a
fixed rate. The entities come from the demo population
(``make_population(default_rng(seed), n_customers=..., n_merchants=...)``), the
same one :func:`demo.batch_files.write_demo_batch_files` writes for the
batch groups, so every id it sends has batch features in Redis. A transaction
drawn with the ``burst`` fraud pattern is followed by a few small card-testing
charges on the same card (they take the next slots of the schedule, so the total
rate stays as configured).

Pacing: event ``i`` is due at ``start + i / rate``; the loop wakes at most every
``tick_s`` and hands every due event to the producer at once (aiokafka batches them
per partition, ``linger_ms``). When it falls more than a second behind it skips
ahead rather than flooding (counted). The producer is plain (no idempotence, no
transactions: the embedded broker refuses those).

Optionally (``score_target``) it also calls ``Score`` for a share of the
transactions with only entity ids and request fields, the way an authorisation
system would, so the server has some traffic to show.

Run it: ``python -m devstack.producer --bootstrap HOST:PORT [--topic T] [--rate R]
[--duration S] [--seed N] [--customers N] [--merchants N] [--score-target HOST:PORT
--score-rate R]``. SIGTERM/SIGINT stop it; what was handed to the client is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc
import numpy as np
from aiokafka import AIOKafkaProducer

from demo.batch_files import (
    DEFAULT_DEMO_CUSTOMERS,
    DEFAULT_DEMO_MERCHANTS,
    DEFAULT_DEMO_SEED,
)
from demo.synthetic import (
    DemoPopulation,
    SyntheticTransaction,
    make_population,
    sample_transactions,
)
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc

__all__ = [
    "ProducerConfig",
    "ProducerStats",
    "TransactionEvent",
    "TransactionSource",
    "demo_population",
    "main",
    "run_producer",
]

logger = logging.getLogger(__name__)

_STREAM_SALT = 0x5EED
"""Mixed into the seed of the transaction draws (the population uses the plain seed)."""
_DRAW_CHUNK = 256
"""Transactions drawn per call of ``sample_transactions`` (each call scans every card)."""
_INT_FIELDS = ("mcc", "channel", "is_international", "card_present")
_EVENT_FIELDS = ("amount", *_INT_FIELDS, "distance_from_home_km")
_SCORE_FIELDS = (
    "amount",
    "mcc",
    "channel",
    "hour_of_day",
    "day_of_week",
    "is_international",
    "card_present",
    "distance_from_home_km",
)


def demo_population(
    seed: int = DEFAULT_DEMO_SEED,
    n_customers: int = DEFAULT_DEMO_CUSTOMERS,
    n_merchants: int = DEFAULT_DEMO_MERCHANTS,
) -> DemoPopulation:
    """The demo population, drawn exactly as the batch files are."""
    return make_population(
        np.random.default_rng(seed), n_customers=n_customers, n_merchants=n_merchants
    )


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    """One transaction as published (ids, request fields) plus its pattern."""

    transaction_id: str
    card_id: str
    customer_id: str
    merchant_id: str
    pattern: str
    request: dict[str, float]
    """Request-time fields (``demo.synthetic.REQUEST_FEATURES``)."""

    def payload(self, event_time_ms: int) -> dict[str, object]:
        """The JSON object sent to Kafka; ``event_time_ms`` is the event time."""
        body: dict[str, object] = {
            "transaction_id": self.transaction_id,
            "card_id": self.card_id,
            "customer_id": self.customer_id,
            "merchant_id": self.merchant_id,
            "event_time_ms": event_time_ms,
        }
        for name in _EVENT_FIELDS:
            value = self.request[name]
            body[name] = int(value) if name in _INT_FIELDS else value
        return body

    def score_request(self, model: str) -> pb.ScoreRequest:
        """A Score call carrying only entity ids and request fields."""
        return pb.ScoreRequest(
            model=model,
            request_id=self.transaction_id,
            entity_ids={
                "card_id": self.card_id,
                "customer_id": self.customer_id,
                "merchant_id": self.merchant_id,
            },
            features={name: self.request[name] for name in _SCORE_FIELDS},
        )


class TransactionSource:
    """Deterministic sequence of transaction events drawn from ``population``.

    The same ``(population, seed)`` gives the same sequence, so a test can tell
    which cards the producer sent first.
    """

    def __init__(
        self,
        population: DemoPopulation,
        seed: int = DEFAULT_DEMO_SEED,
        *,
        burst_size: tuple[int, int] = (3, 8),
    ) -> None:
        low, high = burst_size
        if not 1 <= low <= high:
            raise ValueError(f"burst_size must satisfy 1 <= low <= high, got {burst_size}")
        self._population = population
        self._rng = np.random.default_rng((seed, _STREAM_SALT))
        self._burst_size = burst_size
        self._pending: deque[TransactionEvent] = deque()
        self._drawn: deque[SyntheticTransaction] = deque()
        self._count = 0

    def _next_id(self) -> str:
        self._count += 1
        return f"tx-{self._count:010d}"

    def next_event(self) -> TransactionEvent:
        """The next event: a queued burst charge, else a freshly drawn transaction."""
        if self._pending:
            return self._pending.popleft()
        if not self._drawn:  # a draw costs O(cards) however many it returns
            self._drawn.extend(sample_transactions(self._rng, self._population, _DRAW_CHUNK))
        tx = self._drawn.popleft()
        event = TransactionEvent(
            transaction_id=self._next_id(),
            card_id=tx.card_id,
            customer_id=tx.customer_id,
            merchant_id=tx.merchant_id,
            pattern=tx.pattern,
            request=dict(tx.request),
        )
        if tx.pattern == "burst":
            extra = int(self._rng.integers(self._burst_size[0], self._burst_size[1] + 1)) - 1
            for amount in np.round(self._rng.uniform(0.5, 5.0, extra), 2).tolist():
                request = event.request | {"amount": float(amount)}
                self._pending.append(
                    replace(event, transaction_id=self._next_id(), request=request)
                )
        return event


@dataclass(frozen=True)
class ProducerConfig:
    """What to send, where and how fast."""

    bootstrap_servers: str
    topic: str = "transactions"
    rate: float = 200.0
    """Events per second."""
    duration_s: float = 0.0
    """Stop after this long; 0 = until stopped."""
    seed: int = DEFAULT_DEMO_SEED
    n_customers: int = DEFAULT_DEMO_CUSTOMERS
    n_merchants: int = DEFAULT_DEMO_MERCHANTS
    tick_s: float = 0.01
    """Longest sleep between sends (at high rates, ~rate * tick_s events per wake-up)."""
    linger_ms: int = 5
    client_id: str = "streamscore-devstack-producer"
    stats_interval_s: float = 10.0
    score_target: str | None = None
    """``host:port`` of a streamscore server to also call ``Score`` on."""
    score_rate: float = 0.0
    """Score calls per second (at most ``rate``; 0 = none)."""
    score_model: str = "fraud"
    score_timeout_s: float = 0.1
    max_score_in_flight: int = 32
    stop_timeout_s: float = 5.0
    """Longest wait for undelivered events when stopping."""

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.tick_s <= 0:
            raise ValueError("rate and tick_s must be > 0")
        if self.duration_s < 0 or self.score_rate < 0:
            raise ValueError("duration_s and score_rate must be >= 0")
        if self.score_rate > 0 and not self.score_target:
            raise ValueError("score_rate needs score_target")


@dataclass
class ProducerStats:
    """Counters of one run (mutated only by the producer's own loop and callbacks)."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    skipped_behind: int = 0
    scored: int = 0
    score_errors: int = 0
    score_skipped: int = 0


class _Scorer:
    """Fire-and-forget Score calls with a bound on calls in flight."""

    def __init__(self, config: ProducerConfig, stats: ProducerStats) -> None:
        assert config.score_target is not None
        self._config = config
        self._stats = stats
        self._channel = grpc.aio.insecure_channel(config.score_target)
        self._stub = pb_grpc.ScoringStub(self._channel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = False
        self._ready_task = asyncio.create_task(self._wait_ready())

    async def _wait_ready(self) -> None:
        await self._channel.channel_ready()
        self._ready = True

    def submit(self, event: TransactionEvent) -> None:
        if not self._ready or len(self._tasks) >= self._config.max_score_in_flight:
            self._stats.score_skipped += 1
            return
        task = asyncio.create_task(self._score(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(self, event: TransactionEvent) -> None:
        try:
            await self._stub.Score(
                event.score_request(self._config.score_model),
                timeout=self._config.score_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            self._stats.score_errors += 1
            if self._stats.score_errors <= 3:
                logger.warning("score call failed: %s %s", error.code().name, error.details())
        else:
            self._stats.scored += 1

    async def close(self) -> None:
        self._ready_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ready_task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._config.score_timeout_s * 2)
        await self._channel.close(None)


def _delivery_callback(stats: ProducerStats) -> Callable[[asyncio.Future[object]], None]:
    def done(future: asyncio.Future[object]) -> None:
        if future.cancelled() or future.exception() is not None:
            stats.failed += 1
            if stats.failed <= 3:
                logger.warning(
                    "event not delivered: %r", None if future.cancelled() else future.exception()
                )
        else:
            stats.delivered += 1

    return done


async def _pump(
    config: ProducerConfig,
    producer: AIOKafkaProducer,
    source: TransactionSource,
    scorer: _Scorer | None,
    stats: ProducerStats,
    stop: asyncio.Event,
) -> None:
    """The paced send loop (see the module docstring)."""
    on_delivery = _delivery_callback(stats)
    score_share = min(config.score_rate / config.rate, 1.0)
    score_credit = 0.0
    loop = asyncio.get_running_loop()
    start = last_stats = loop.time()
    scheduled = 0
    while not stop.is_set():
        now = loop.time()
        if config.duration_s and now - start >= config.duration_s:
            return
        due = int((now - start) * config.rate) - scheduled
        behind = due - max(int(config.rate), 1)
        if behind > 0:  # more than a second late: skip ahead instead of flooding
            stats.skipped_behind += behind
            scheduled += behind
            due -= behind
        event_time_ms = int(time.time() * 1000)
        for _ in range(due):
            event = source.next_event()
            value = json.dumps(event.payload(event_time_ms), separators=(",", ":")).encode()
            future = await producer.send(config.topic, value, key=event.card_id.encode())
            future.add_done_callback(on_delivery)
            stats.queued += 1
            if scorer is not None:
                score_credit += score_share
                if score_credit >= 1.0:
                    score_credit -= 1.0
                    scorer.submit(event)
        scheduled += due
        if now - last_stats >= config.stats_interval_s:
            last_stats = now
            logger.info("producer progress: %s", stats)
        next_due = start + (scheduled + 1) / config.rate
        await asyncio.sleep(min(max(next_due - loop.time(), 0.0), config.tick_s))


async def run_producer(
    config: ProducerConfig,
    stop: asyncio.Event,
    *,
    population: DemoPopulation | None = None,
) -> ProducerStats:
    """Send events until ``stop`` is set or ``config.duration_s`` passed; returns the counts.

    Stopping is prompt even when the broker is gone: a send blocked for more than a
    second after ``stop`` is cancelled, and the final flush waits ``stop_timeout_s``.
    """
    population = population or demo_population(config.seed, config.n_customers, config.n_merchants)
    source = TransactionSource(population, config.seed)
    stats = ProducerStats()
    producer = AIOKafkaProducer(
        bootstrap_servers=config.bootstrap_servers,
        client_id=config.client_id,
        enable_idempotence=False,
        linger_ms=config.linger_ms,
    )
    await producer.start()
    scorer = _Scorer(config, stats) if config.score_rate > 0 else None
    logger.info(
        "producing to %r at %g events/s (scoring %g/s)",
        config.topic,
        config.rate,
        config.score_rate,
    )
    pump = asyncio.create_task(_pump(config, producer, source, scorer, stats, stop))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({pump, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():
            await asyncio.wait({pump}, timeout=config.tick_s + 1.0)
        if not pump.done():
            logger.warning("a send is blocked (broker unreachable?): abandoning it")
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        else:
            pump.result()  # raises what the loop raised
    finally:
        stopped.cancel()
        pump.cancel()
        if scorer is not None:
            await scorer.close()
        try:  # flushes what was handed over; bounded in case the broker is gone
            await asyncio.wait_for(producer.stop(), config.stop_timeout_s)
        except TimeoutError:
            logger.warning("broker unreachable: undelivered events dropped")
    logger.info("producer stopped: %s", stats)
    return stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m devstack.producer",
        description="Send synthetic card transactions (demo population) to a Kafka topic.",
    )
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port")
    p.add_argument("--topic", default="transactions")
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until signalled")
    p.add_argument("--seed", type=int, default=DEFAULT_DEMO_SEED)
    p.add_argument("--customers", type=int, default=DEFAULT_DEMO_CUSTOMERS)
    p.add_argument("--merchants", type=int, default=DEFAULT_DEMO_MERCHANTS)
    p.add_argument("--score-target", default=None, help="also call Score on this host:port")
    p.add_argument("--score-rate", type=float, default=0.0, help="Score calls per second")
    p.add_argument("--score-model", default="fraud")
    p.add_argument("--log-level", default="INFO")
    return p


async def _serve(config: ProducerConfig) -> ProducerStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        return await run_producer(config, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ProducerConfig(
            bootstrap_servers=args.bootstrap,
            topic=args.topic,
            rate=args.rate,
            duration_s=args.duration,
            seed=args.seed,
            n_customers=args.customers,
            n_merchants=args.merchants,
            score_target=args.score_target,
            score_rate=args.score_rate,
            score_model=args.score_model,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    stats = asyncio.run(_serve(config))
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
