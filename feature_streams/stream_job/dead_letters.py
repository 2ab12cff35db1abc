"""Publishing dead letters to ``<topic>.dlq`` (at least once), counted and logged."""

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
    """Sends malformed records with their reason; a failed send is counted and logged,
    never raised (the record's offset is still committed)."""

    def __init__(self, producer: AIOKafkaProducer, metrics: WorkerMetrics) -> None:
        self._producer = producer
        self._metrics = metrics

    async def publish(self, dead: Sequence[DeadLetter]) -> None:
        """Send every letter concurrently and wait for all of them."""
        sends = []
        for letter in dead:
            self._metrics.malformed.labels(letter.topic).inc()
            logger.warning(
                "malformed event %s:%d@%d sent to the dead-letter topic: %s",
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
        await asyncio.gather(*sends)

    async def _send(self, letter: DeadLetter) -> None:
        try:
            await self._producer.send_and_wait(
                dead_letter_topic(letter.topic),
                value=letter.value,
                key=letter.key,
                headers=letter.headers(),
            )
        except KafkaError as exc:
            self._metrics.dead_letter_failures.labels(letter.topic).inc()
            logger.error(
                "dead letter of %s:%d@%d lost: %r",
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
