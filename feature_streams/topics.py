"""Make sure Kafka topics exist, via aiokafka's admin client.

Creating a topic that already exists is not an error (its partition count is
left as it is). Used by the stream worker for its dead-letter topics, and by
tests and the dev stack for the event topics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

__all__ = ["TopicError", "ensure_topics"]

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


class TopicError(RuntimeError):
    """The broker refused to create a topic; ``errors`` maps topic -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        text = "; ".join(f"{t}: {m}" for t, m in self.errors.items())
        super().__init__(f"cannot create topics: {text}")


async def ensure_topics(
    bootstrap_servers: str,
    partitions: Mapping[str, int],
    replication_factor: int = 1,
    request_timeout_ms: int = 10_000,
) -> list[str]:
    """Create each topic of ``partitions`` (name -> partition count) that is missing.

    Returns the names actually created; raises :class:`TopicError` for any other
    broker error.
    """
    if not partitions:
        return []
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=request_timeout_ms
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, count, replication_factor)
            for name, count in partitions.items()
            if name not in existing
        ]
        if not wanted:
            return []
        response = await admin.create_topics(wanted, timeout_ms=request_timeout_ms)
    finally:
        await admin.close()
    created: list[str] = []
    errors: dict[str, str] = {}
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            errors[name] = f"error {code}: {message}"
    if errors:
        raise TopicError(errors)
    if created:
        logger.info("created topics", extra={"topics": created})
    return created
