"""DurableSink against a real Tansu broker: outages under a steady load lose nothing and
keep per-key order; a sink closed without a broker leaves its records to the next one.

Tansu keeps topics in memory, so a killed broker forgets what it had acknowledged:
the kill test reads the first broker's topic before killing it and checks that the
records offered while it was down and after it came back all reach the new one. The
freeze test (SIGSTOP: Kafka slow and then gone from the client's view) keeps the
broker's data and checks every record of the whole run end to end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from devstack.services import KafkaBroker, free_port, kafka_broker
from server.clients.replay import read_topic_values
from server.records.durable_sink import DurableSink, DurableSinkConfig
from server.records.kafka_sink import SinkMetrics

pytestmark = pytest.mark.integration

KEYS = 7


def config(bootstrap: str, spill_dir: Path, **overrides: object) -> DurableSinkConfig:
    options: dict[str, object] = {
        "request_timeout_ms": 1500,
        "connect_timeout_s": 2.0,
        "retry_interval_s": 0.3,
        "max_buffered_bytes": 4096,  # small: the outage must spill
    }
    options.update(overrides)
    return DurableSinkConfig(bootstrap_servers=bootstrap, spill_dir=spill_dir, **options)  # type: ignore[arg-type]


class Load:
    """A steady offer load: record ``seq`` has key ``k{seq % KEYS}`` (``u{seq}`` with
    ``unique_keys``, as decision records keyed by request id)."""

    def __init__(self, sink: DurableSink, topic: str, *, unique_keys: bool = False) -> None:
        self.sink, self.topic, self.offered = sink, topic, 0
        self.unique_keys = unique_keys

    def offer_one(self) -> None:
        seq = self.offered
        key = f"u{seq}" if self.unique_keys else f"k{seq % KEYS}"
        value = json.dumps({"key": key, "seq": seq, "pad": "p" * 100}).encode()
        assert self.sink.offer(self.topic, value, key=key.encode())
        self.offered += 1

    async def until(self, done: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.offer_one()
                await asyncio.sleep(0.003)  # pacing of the load, not synchronisation
        assert done(), what


async def records(bootstrap: str, topic: str) -> list[tuple[str, int]]:
    values = await read_topic_values(bootstrap, topic)
    return [(r["key"], r["seq"]) for r in map(json.loads, values)]


def assert_in_order_per_key(found: list[tuple[str, int]]) -> None:
    """Each key's records in offer order (after dropping repeats, as consumers do)."""
    for k in range(KEYS):
        seqs = [seq for key, seq in found if key == f"k{k}"]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == sorted(first_seen), f"k{k} out of order"


async def test_frozen_broker_under_load_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    # a broker of its own: this test freezes it
    with kafka_broker(port=free_port(), log_file=tmp_path / "broker.log") as broker:
        registry = CollectorRegistry()
        sink = DurableSink(
            config(broker.bootstrap_servers, tmp_path / "spill"), SinkMetrics(registry)
        )
        sink.start()
        load = Load(sink, topic)
        await load.until(lambda: sink.sent[topic] >= 100, "sending")
        broker.process.send_signal(signal.SIGSTOP)
        try:
            await load.until(lambda: sink.state == "down", "noticed the outage")
            spilled = sink.spilled[topic]
            await load.until(lambda: sink.spilled[topic] >= spilled + 200, "spilling while down")
            assert sink.buffered_bytes <= 4096 and sink.health().spilled_records > 0
        finally:
            broker.process.send_signal(signal.SIGCONT)
        await load.until(lambda: sink.spill.pending == 0, "spill drained")
        await load.until(lambda: sink.sent[topic] >= load.offered - 50, "caught up")
        assert await sink.flush(timeout_s=30.0)
        await sink.close()
        assert sink.dropped == {}
        found = await records(broker.bootstrap_servers, topic)
    assert {seq for _, seq in found} == set(range(load.offered))  # every record offered
    for key, seq in found:
        assert key == f"k{seq % KEYS}"
    assert_in_order_per_key(found)
    assert registry.get_sample_value(
        "streamscore_record_sink_sent_total", {"topic": topic}
    ) == float(sink.sent[topic])
    assert list((tmp_path / "spill").glob("*.spill")) == []  # trimmed once acknowledged


@pytest.mark.parametrize("partition_by", ["key", "round"])
async def test_killed_broker_then_restarted_gets_every_record_in_order(
    tmp_path: Path, partition_by: str
) -> None:
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    port = free_port()
    sink = DurableSink(config(f"127.0.0.1:{port}", tmp_path / "spill", partition_by=partition_by))
    sink.start()
    load = Load(sink, topic, unique_keys=partition_by == "round")  # round: one record per key
    with kafka_broker(port=port, log_file=tmp_path / "a.log") as first:
        await load.until(lambda: sink.sent[topic] >= 100, "sending")
        assert await sink.flush(timeout_s=30.0)
        before = await records(first.bootstrap_servers, topic)
        first.process.kill()  # SIGKILL: its (in-memory) topic is gone with it
        first.process.wait()
        boundary = load.offered
        await load.until(lambda: sink.state == "down", "noticed the outage")
        await load.until(lambda: sink.spill.pending >= 200, "spilling while down")
    with kafka_broker(port=port, log_file=tmp_path / "b.log") as second:
        await load.until(lambda: sink.spill.pending == 0, "spill drained")
        await load.until(lambda: sink.sent[topic] >= load.offered - 50, "caught up")
        assert await sink.flush(timeout_s=30.0)
        await sink.close()
        after = await records(second.bootstrap_servers, topic)
    assert sink.dropped == {}
    assert {seq for _, seq in before} == set(range(boundary))
    assert {seq for _, seq in after} == set(range(boundary, load.offered))
    assert_in_order_per_key(before + after)


async def partitioned(bootstrap: str, topic: str) -> list[tuple[int, str, int]]:
    """(partition, key, seq) of every message of ``topic``, each partition in offset order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, str, int]] = []
        async with asyncio.timeout(30):
            for tp in tps:
                while True:
                    for message in (await consumer.getmany(tp, timeout_ms=300)).get(tp, []):
                        assert message.value is not None
                        record = json.loads(message.value)
                        out.append((tp.partition, record["key"], record["seq"]))
                    highwater = consumer.highwater(tp)
                    if highwater is not None and await consumer.position(tp) >= highwater:
                        break
        return out
    finally:
        await consumer.stop()


async def test_round_partitioning_frozen_broker_loses_nothing_and_keeps_order_per_partition(
    tmp_path: Path,
) -> None:
    """``partition_by=round`` (decision records: one record per key): a burst offered at
    once lands in one partition; a broker frozen under load loses nothing, each partition
    holds its records in offer order, and a record sent twice (a lost ack) is repeated in
    the partition of its first copy."""
    topic = f"durable-round-{uuid.uuid4().hex[:8]}"
    with kafka_broker(port=free_port(), log_file=tmp_path / "broker.log") as broker:
        sink = DurableSink(
            config(broker.bootstrap_servers, tmp_path / "spill", partition_by="round")
        )
        sink.start()
        load = Load(sink, topic, unique_keys=True)
        await load.until(lambda: sink.sent[topic] >= 50, "sending")
        assert await sink.flush(timeout_s=30.0)
        bursts = []
        for _ in range(5):  # offered together, sent as one round
            first = load.offered
            for _ in range(20):
                load.offer_one()
            bursts.append(range(first, load.offered))
            assert await sink.flush(timeout_s=30.0)
        broker.process.send_signal(signal.SIGSTOP)
        try:
            await load.until(lambda: sink.state == "down", "noticed the outage")
            spilled = sink.spilled[topic]
            await load.until(lambda: sink.spilled[topic] >= spilled + 200, "spilling while down")
        finally:
            broker.process.send_signal(signal.SIGCONT)
        await load.until(lambda: sink.spill.pending == 0, "spill drained")
        assert await sink.flush(timeout_s=30.0)
        await sink.close()
        assert sink.dropped == {}
        found = await partitioned(broker.bootstrap_servers, topic)
    assert {seq for _, _, seq in found} == set(range(load.offered))  # every record offered
    partition_of: dict[int, int] = {}
    for partition, key, seq in found:
        assert key == f"u{seq}"
        assert partition_of.setdefault(seq, partition) == partition  # repeats: same partition
    for burst in bursts:
        assert len({partition_of[seq] for seq in burst}) == 1
    assert len(set(partition_of.values())) > 1  # rounds spread over the partitions
    for partition in set(partition_of.values()):
        seqs = list(dict.fromkeys(seq for p, _, seq in found if p == partition))
        assert seqs == sorted(seqs), f"partition {partition} out of order"


async def test_close_without_broker_spills_and_the_next_sink_sends(tmp_path: Path) -> None:
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    port = free_port()
    spill_dir = tmp_path / "spill"
    first = DurableSink(config(f"127.0.0.1:{port}", spill_dir, max_buffered_bytes=1 << 20))
    load = Load(first, topic)
    for _ in range(300):
        load.offer_one()
    await first.close(timeout_s=1.0)  # no broker: everything to the spill
    assert first.dropped == {} and first.sent == {}
    assert list(spill_dir.glob("*.spill"))
    with kafka_broker(port=port, log_file=tmp_path / "broker.log") as broker:
        second = DurableSink(config(broker.bootstrap_servers, spill_dir))
        assert second.spill.pending == 300  # read at start
        second.start()
        assert await second.flush(timeout_s=30.0)
        await second.close()
        found = await records(broker.bootstrap_servers, topic)
    assert [seq for _, seq in found if _ == "k0"] == list(range(0, 300, KEYS))
    assert {seq for _, seq in found} == set(range(300)) and len(found) == 300
    assert_in_order_per_key(found)
    assert list(spill_dir.glob("*.spill")) == []


async def test_oversize_record_is_truncated_and_the_rest_flow(
    tmp_path: Path, kafka: KafkaBroker
) -> None:
    from server.records.shrink import shrink_json

    topic = f"durable-{uuid.uuid4().hex[:8]}"
    sink = DurableSink(
        config(kafka.bootstrap_servers, tmp_path / "spill", max_request_size=4096),
        shrink=shrink_json,
    )
    sink.start()
    sink.offer(topic, json.dumps({"key": "k0", "seq": 0}).encode(), key=b"k0")
    sink.offer(topic, json.dumps({"key": "k1", "seq": 1, "s": "x" * 20_000}).encode(), key=b"k1")
    sink.offer(topic, json.dumps({"key": "k2", "seq": 2, "n": list(range(5000))}).encode())
    sink.offer(topic, json.dumps({"key": "k3", "seq": 3}).encode(), key=b"k3")
    assert await sink.flush(timeout_s=30.0)
    await sink.close()
    assert sink.truncated[topic] == 1 and sink.dropped == {"too_large": 1}
    values = [json.loads(v) for v in await read_topic_values(kafka.bootstrap_servers, topic)]
    assert sorted(v["seq"] for v in values) == [0, 1, 3]
    (cut,) = [v for v in values if v["seq"] == 1]
    assert cut["s"].endswith("chars]") and cut["truncated"]


async def test_wired_durable_traffic_log_keyed_by_request_id(
    tmp_path: Path, kafka: KafkaBroker, linear_repository: Path
) -> None:
    from protos.streamscore.v1 import scoring_pb2 as pb
    from server.clients.replay import read_topic
    from tests.conftest import TEST_FEATURES
    from tests.support.server import running_server

    topic = f"traffic-durable-{uuid.uuid4().hex[:8]}"
    overrides = [
        "traffic_log.sample_rate=1.0",
        "traffic_log.delivery=durable",
        f"records.durable.spill_dir={tmp_path / 'spill'}",
        f"traffic_log.topic={topic}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
    ]
    ids = [f"w{i}" for i in range(30)]
    async with running_server(linear_repository, overrides) as srv:
        assert srv.app.durable_sink is not None
        for request_id in ids:
            request = pb.ScoreRequest(
                model="lin", request_id=request_id, features={f: 0.5 for f in TEST_FEATURES}
            )
            await srv.scoring.Score(request)
        assert await srv.app.durable_sink.flush(timeout_s=30.0)
        assert srv.app.durable_sink.health().ok
    records, skipped = await read_topic(kafka.bootstrap_servers, topic)
    assert skipped == 0 and sorted(r.request_id for r in records) == sorted(ids)
    assert (tmp_path / "spill" / "p0").is_dir()
