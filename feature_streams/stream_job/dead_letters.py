"""Publishing dead letters to ``<topic>.dlq`` (at least once), counted and logged.

A letter that could not be sent is returned to the caller, which must not commit
its record's offset until it is sent (the worker retries it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from feature_streams.events import DeadLetter, dead_letter_topic
from feature_streams.stream_job.metrics import WorkerMetrics

__all__ = ["DeadLetterPublisher"]

logger = logging.getLogger(__name__)


class DeadLetterPublisher:
    """Sends rejected records with their reason; a failed send is counted, logged and
    returned, never raised."""

    def __init__(self, producer: AIOKafkaProducer, metrics: WorkerMetrics) -> None:
        self._producer = producer
        self._metrics = metrics

    async def publish(self, dead: Sequence[DeadLetter], *, again: bool = False) -> list[DeadLetter]:
        """Send every letter concurrently, wait for all; returns those not sent.
        ``again``: a retry of letters already counted and logged."""
        if again:
            sent = await asyncio.gather(*(self._send(letter) for letter in dead))
            return [letter for letter, ok in zip(dead, sent, strict=True) if not ok]
        sends = []
        for letter in dead:
            self._metrics.malformed.labels(letter.topic).inc()
            logger.warning(
                "event %s:%d@%d goes to the dead-letter topic: %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.error,
                extra={
                    "topic": letter.topic,
                    "partition": letter.partition,
                    "offset": letter.offset,
                    "field": letter.field,
                    "error": letter.error,
                },
            )
            sends.append(self._send(letter))
        sent = await asyncio.gather(*sends)
        return [letter for letter, ok in zip(dead, sent, strict=True) if not ok]

    async def _send(self, letter: DeadLetter) -> bool:
        try:
            await self._producer.send_and_wait(
                dead_letter_topic(letter.topic),
                value=letter.value,
                key=letter.key,
                headers=letter.headers(),
            )
        except KafkaError as exc:
            self._metrics.dead_letter_failures.labels(letter.topic).inc()
            logger.warning(
                "dead letter of %s:%d@%d not sent (retried; offset held): %r",
                letter.topic,
                letter.partition,
                letter.offset,
                exc,
                extra={
                    "topic": letter.topic,
                    "partition": letter.partition,
                    "offset": letter.offset,
                },
            )
            return False
        return True
