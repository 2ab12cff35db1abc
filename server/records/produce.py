"""Prebuilt record batches sent as one Kafka produce request per leader, acks=all.

The durable sink already batches (its rounds), retries (spill, reconnect) and orders
(the next round only after every batch of this one was acknowledged), so aiokafka's
producer pipeline on top of it was pure cost on the serving loop: each round went
through the accumulator, the producer's linger timer, the sender routine's wakeups,
tasks and ``asyncio.wait`` and a future per batch (bench/RESULTS.md: a round of 10
records in one batch cost ~4x the CPU of the same batch sent as a request directly).
Here a round's batches are grouped by partition leader and sent with the producer's
client, and the answer is checked partition by partition: any error, a missing
partition, an unknown leader or a timeout fails the whole round (the sink then spills
and retries it; consumers drop repeats by key). An error that says the metadata is
stale asks the client to refresh it.

Only aiokafka's public pieces: ``DefaultRecordBatchBuilder``, ``ProduceRequest``,
``AIOKafkaClient.send`` and its cluster metadata.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiokafka.errors as kafka_errors
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

__all__ = ["new_batch", "produce"]

logger = logging.getLogger(__name__)

#: acks=all.
_ALL = -1


def new_batch(max_bytes: int) -> DefaultRecordBatchBuilder:
    """An empty record batch (v2, uncompressed, no producer id: as aiokafka's producer
    builds it without idempotence) of at most ``max_bytes`` (its first record always fits)."""
    return DefaultRecordBatchBuilder(2, 0, 0, -1, -1, 0, max_bytes)


async def produce(
    client: Any, batches: Mapping[tuple[str, int], bytes], *, timeout_ms: int
) -> bool:
    """Send ``batches`` (built record batches by (topic, partition)), one request per
    partition leader, acks=all; ``True`` when every partition acknowledged without error
    within ``timeout_ms`` (the broker's timeout; the wait allows a second more)."""
    by_node: dict[int, dict[str, list[tuple[int, bytes]]]] = defaultdict(lambda: defaultdict(list))
    for (topic, partition), data in batches.items():
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        if leader is None or leader < 0:
            client.force_metadata_update()
            logger.debug("produce: no leader known", extra={"topic": topic, "partition": partition})
            return False
        by_node[leader][topic].append((partition, data))
    if not by_node:
        return True
    requests = [
        client.send(node, ProduceRequest(None, _ALL, timeout_ms, list(topics.items())))
        for node, topics in by_node.items()
    ]
    try:
        async with asyncio.timeout(timeout_ms / 1000 + 1.0):
            responses = await asyncio.gather(*requests)
    except Exception as error:  # connection lost, timeout, node not ready
        if getattr(error, "invalid_metadata", False):
            client.force_metadata_update()
        logger.debug("produce: request failed", extra={"error": repr(error)})
        return False
    acked: set[tuple[str, int]] = set()
    for response in responses:
        for topic, partitions in response.topics:
            for info in partitions:
                partition, code = info[0], info[1]
                if code != 0:
                    refusal = kafka_errors.for_code(code)
                    if getattr(refusal, "invalid_metadata", False):
                        client.force_metadata_update()
                    logger.debug(
                        "produce: partition refused the batch",
                        extra={"topic": topic, "partition": partition, "error": refusal.__name__},
                    )
                    return False
                acked.add((topic, partition))
    return acked.issuperset(batches)
