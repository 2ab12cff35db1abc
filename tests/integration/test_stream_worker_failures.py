"""The stream worker's failure paths against a real Tansu broker and redis-server:
hot keys chunked, the apply script refusing bad input before any write, bounded
retries then the dead-letter topic, no commit past an unsent dead letter, and a
frozen Redis (SIGSTOP) timed out, drained on stop and resumed exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from redis.asyncio import Redis

from devstack.services import KafkaBroker, redis_server
from feature_streams.events import DeadLetter, dead_letter_topic
from feature_streams.keys import offset_field, tile_key
from feature_streams.stream_job import StreamWorker
from feature_streams.tile_store import read_hashes
from feature_streams.topics import ensure_topics
from feature_streams.windows import GroupPlan, read_hash
from tests.integration.test_stream_worker import (
    GROUPS,
    MINUTE,
    T0,
    Progress,
    assert_tiles_match,
    committed,
    definitions_for,
    fast_config,
    fully_applied,
    make_events,
    produce,
    produce_raw,
    redis_client,
    running,
    sample,
    unique,
    wait_until,
)

pytestmark = pytest.mark.integration

__all__ = ["redis_client"]  # the fixture, shared with test_stream_worker


async def _letters(bootstrap: str, topic: str, n: int) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        tp = TopicPartition(dead_letter_topic(topic), 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(15):
            while len(letters) < n:
                for msgs in (await consumer.getmany(timeout_ms=200)).values():
                    letters += [DeadLetter.from_record(m.value, m.key, m.headers) for m in msgs]
    finally:
        await consumer.stop()
    return letters


def _card_event(card: str, i: int) -> dict[str, object]:
    return {
        "card_id": card,
        "merchant_id": "m0",
        "event_time_ms": T0 + i,
        "amount": 1.0,
        "is_international": 0,
    }


async def test_a_hot_keys_events_are_applied_in_bounded_chunks_exactly(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    topic = unique("hot")
    defs, _ = definitions_for(topic)
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    events: list[dict[str, object]] = [_card_event("hot", i) for i in range(5000)]
    produced = await produce(kafka, topic, 1, events, [0] * len(events))
    config = fast_config(kafka, redis_url, max_events_per_call=500, max_batch_records=5000)
    async with running(StreamWorker(config, defs)) as worker:
        await wait_until(lambda: fully_applied(redis_client, produced), 60, "every event")
        calls = worker.registry.get_sample_value("streamscore_stream_apply_seconds_count")
    assert calls is not None and calls >= 5000 / 500  # one round per chunk of the hot key
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    await assert_tiles_match(redis_client, produced, plans)


async def test_a_key_the_script_refuses_goes_to_the_dlq_untouched_and_the_rest_applies(
    kafka: KafkaBroker, redis_url: str, redis_client: Redis
) -> None:
    """A tile field holding no number: the script refuses the key's batch before any
    write (no offset mark either), its records go to the dead-letter topic with the
    error, every other key applies and the partition is committed past them."""
    topic = unique("refused")
    defs, _ = definitions_for(topic)
    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    bad_key = tile_key("card_activity", "bad")
    tile = T0 // MINUTE * MINUTE
    slot = next(s.name for s in plan.slots if s.name.startswith("count"))
    await redis_client.hset(bad_key, f"{tile}:{slot}", "garbage")
    before = await redis_client.hgetall(bad_key)
    records = [
        (0, json.dumps(_card_event(card, i)).encode())
        for i, card in enumerate(["good", "bad", "good", "bad", "good"])
    ]
    await produce_raw(kafka.bootstrap_servers, topic, records)
    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",))
    async with running(StreamWorker(config, defs, on_batch=progress)) as worker:
        await progress.wait_for(lambda: progress.total("records") == 5, 30, "every record")
        assert sample(worker, "failed_key_batches", group="card_activity") == 1
        assert sample(worker, "applied_events", group="card_activity") == 3
    assert await redis_client.hgetall(bad_key) == before  # no partial write, no offset mark
    [good] = await read_hashes(redis_client, [tile_key("card_activity", "good")])
    assert read_hash(plan, good, T0 + MINUTE)["card_txn_count_5m"] == 3.0
    assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [5]
    letters = await _letters(kafka.bootstrap_servers, topic, 2)
    assert sorted(d.offset for d in letters) == [1, 3]
    assert all("tile apply failed: INVALID" in d.error for d in letters)


async def test_no_commit_past_a_dead_letter_until_it_is_sent(
    kafka: KafkaBroker, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = unique("unsent")
    defs, _ = definitions_for(topic)
    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    records = [(0, json.dumps(_card_event("c", 0)).encode()), (0, b"not json"), (0, b"{}")]
    await produce_raw(kafka.bootstrap_servers, topic, records)
    progress = Progress()
    config = fast_config(kafka, redis_url, stream_groups=("card_activity",))
    worker = StreamWorker(config, defs, on_batch=progress)
    allow = asyncio.Event()
    async with worker:
        producer = worker._producer
        assert producer is not None
        real_send = producer.send_and_wait

        async def send_and_wait(*args: Any, **kwargs: Any) -> Any:
            if not allow.is_set():
                raise KafkaConnectionError("broker unreachable (injected)")
            return await real_send(*args, **kwargs)

        monkeypatch.setattr(producer, "send_and_wait", send_and_wait)
        task = asyncio.create_task(worker.run())
        try:

            async def failing() -> bool:
                return sample(worker, "dead_letter_failures", topic=topic) >= 4

            await wait_until(failing, 30, "dead-letter sends to fail (and be retried)")
            assert progress.reports == []
            assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [None]
            allow.set()
            await progress.wait_for(lambda: progress.total("records") == 3, 30, "the batch")
            assert await committed(kafka.bootstrap_servers, config.group_id, topic, 1) == [3]
        finally:
            worker.request_stop()
            await task
    letters = await _letters(kafka.bootstrap_servers, topic, 2)
    assert sorted(d.offset for d in letters) == [1, 2]


async def test_redis_frozen_under_load_times_out_drains_and_resumes_exactly_once(
    kafka: KafkaBroker,
) -> None:
    topic = unique("frozen")
    defs, _ = definitions_for(topic)
    await ensure_topics(kafka.bootstrap_servers, {topic: 2})
    events, parts = make_events(7, 6000, 60, 8, 2, 2 * 3_600_000, 12 * MINUTE)
    plans = {g: GroupPlan.build(defs.stream_groups[g]) for g in GROUPS}
    with redis_server() as redis:
        client = Redis.from_url(redis.url)
        config = fast_config(
            kafka, redis.url, redis_timeout_s=0.5, redis_retry_max_s=0.2, max_batch_records=500
        )
        first = StreamWorker(config, defs)
        try:
            async with first:
                task = asyncio.create_task(first.run())
                produced = await produce(kafka, topic, 2, events, parts)

                async def started() -> bool:
                    return sample(first, "applied_events", group="card_activity") > 0

                await wait_until(started, 60, "the worker to apply")
                os.kill(redis.process.pid, signal.SIGSTOP)  # frozen mid-stream
                try:

                    async def timed_out() -> bool:
                        return sample(first, "redis_errors") > 0

                    await wait_until(timed_out, 30, "a Redis call to time out")
                    first.request_stop()  # SIGTERM while Redis is still frozen
                    async with asyncio.timeout(30):
                        await task  # drained: returns without Redis
                finally:
                    os.kill(redis.process.pid, signal.SIGCONT)
            assert not await fully_applied(client, produced)
            second = StreamWorker(config, defs)
            async with running(second):
                await wait_until(lambda: fully_applied(client, produced), 90, "the rest")
            await assert_tiles_match(client, produced, plans)
            heads = [
                await client.hget(tile_key("card_activity", "c0"), offset_field(topic, p))
                for p in range(2)
            ]
            assert any(h is not None for h in heads)
        finally:
            await client.aclose()
