"""Readers of what the server writes, used only by tests (the server never reads these)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from server.rollout.policy import WindowStats
from server.rollout.stats import stats_from_hash, stats_key


def records_of(message: bytes) -> list[dict[str, Any]]:
    """The shadow comparison records of one Kafka message (JSON lines)."""
    return [json.loads(line) for line in message.splitlines() if line]


async def read_stats(
    redis: Redis, endpoint: str, rollout_id: str, steps: Iterable[int], version: str
) -> list[WindowStats]:
    """The summed rollout counters of ``version`` in each of ``steps``, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for step in steps:
            pipe.hgetall(stats_key(endpoint, rollout_id, step, version))
        replies = await pipe.execute()
    return [stats_from_hash(reply) for reply in replies]
