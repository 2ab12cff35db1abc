"""DurableSink without a broker: spills instead of dropping, bounded memory and spill,
oversize records shrunk or dropped alone, close leaves everything in the spill."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from devstack.services import free_port
from server.records.durable_sink import DurableSink, DurableSinkConfig
from server.records.kafka_sink import SinkMetrics
from server.records.shrink import shrink_json
from server.records.spill import SpillFile

TOPIC = "decisions"


def unreachable(tmp_path: Path, **overrides: object) -> DurableSinkConfig:
    options: dict[str, object] = {"retry_interval_s": 30.0, "connect_timeout_s": 1.0}
    options.update(overrides)
    return DurableSinkConfig(
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        spill_dir=tmp_path / "spill",
        **options,  # type: ignore[arg-type]
    )


def spilled_values(directory: Path) -> list[bytes]:
    spill = SpillFile(directory, 1 << 30, 1 << 30)
    try:
        return [r.value for r in spill.peek(1 << 20, 1 << 30)]
    finally:
        spill.close()


async def test_memory_overflow_spills_in_order_and_close_keeps_everything(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sink = DurableSink(unreachable(tmp_path, max_buffered_bytes=1000), SinkMetrics(registry))
    values = [f"record-{i:05d}".encode() * 4 for i in range(500)]  # 48 bytes each
    assert all(sink.offer(TOPIC, v, key=v[:12]) for v in values)
    assert sink.buffered_bytes <= 1000  # bounded in bytes: the rest went to the spill
    assert sink.spilled[TOPIC] >= 450
    await sink.close(timeout_s=2.0)
    assert sink.dropped == {}
    assert spilled_values(tmp_path / "spill") == values  # memory appended after the spill
    assert registry.get_sample_value(
        "streamscore_record_sink_spilled_total", {"topic": TOPIC}
    ) == float(sink.spilled[TOPIC])
    assert not sink.offer(TOPIC, b"late") and sink.dropped["closed"] == 1


async def test_lazy_records_are_encoded_when_spilled(tmp_path: Path) -> None:
    sink = DurableSink(unreachable(tmp_path, max_buffered_bytes=4096, lazy_size_estimate=512))
    for i in range(30):
        assert sink.offer(TOPIC, lambda i=i: f"lazy-{i}".encode())  # type: ignore[misc]
    assert sink.buffered_bytes <= 4096
    await sink.close(timeout_s=1.0)
    assert spilled_values(tmp_path / "spill") == [f"lazy-{i}".encode() for i in range(30)]


async def test_spill_budget_exhausted_drops_counted_and_health_says_so(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    config = unreachable(
        tmp_path, max_buffered_bytes=2000, spill_max_bytes=10_000, spill_segment_bytes=4000
    )
    sink = DurableSink(config, SinkMetrics(registry))
    results = [sink.offer(TOPIC, b"x" * 100) for _ in range(1000)]
    accepted = results.count(True)
    assert 80 < accepted < 130  # about (10,000 + 2,000) / 100
    assert sink.dropped["spill_full"] == 1000 - accepted
    assert registry.get_sample_value(
        "streamscore_record_sink_dropped_total", {"topic": TOPIC, "reason": "spill_full"}
    ) == float(1000 - accepted)
    health = sink.health()
    assert health.dropping and not health.ok
    assert health.spill_bytes <= 10_000 and health.buffered_bytes <= 2000
    assert registry.get_sample_value(
        "streamscore_record_sink_spill_bytes", {"sink": "durable"}
    ) == float(health.spill_bytes)
    await sink.close(timeout_s=1.0)
    # what was accepted is on disk, except what did not fit at close (counted)
    kept = len(spilled_values(tmp_path / "spill"))
    assert kept + sink.dropped["spill_full"] == 1000


async def test_oversize_record_is_shrunk_or_dropped_alone(tmp_path: Path) -> None:
    config = unreachable(tmp_path, max_request_size=2000, max_buffered_bytes=100)
    sink = DurableSink(config, shrink=shrink_json)
    big = json.dumps({"request_id": "r1", "score": 0.5, "note": "n" * 10_000}).encode()
    hopeless = json.dumps({"values": list(range(2000))}).encode()  # no string to cut
    sink.offer(TOPIC, b"before", key=b"a")
    sink.offer(TOPIC, big, key=b"r1")
    sink.offer(TOPIC, hopeless, key=b"r2")
    sink.offer(TOPIC, b"after", key=b"b")
    await sink.close(timeout_s=1.0)
    assert sink.truncated[TOPIC] == 1 and sink.dropped == {"too_large": 1}
    before, cut, after = spilled_values(tmp_path / "spill")
    assert (before, after) == (b"before", b"after")
    record = json.loads(cut)
    assert record["score"] == 0.5 and record["request_id"] == "r1"
    assert record["note"].endswith("chars]") and record["truncated"]["max_string_chars"] > 0
    assert len(cut) <= 2000


def test_shrink_keeps_numbers_and_marks_strings() -> None:
    doc = {"features": {"amount": 12.5, "merchant": "m" * 300}, "ids": ["x" * 300]}
    out = json.loads(shrink_json(json.dumps(doc).encode(), 200))
    assert out["features"]["amount"] == 12.5
    assert out["features"]["merchant"].startswith("m") and "chars]" in out["features"]["merchant"]
    assert len(json.dumps(out, separators=(",", ":"))) <= 200


async def test_round_partitioning_puts_a_round_in_one_partition_per_topic(
    tmp_path: Path,
) -> None:
    from aiokafka.record.default_records import DefaultRecordBatch

    from server.records.partitioner import partition_for

    parts = [0, 1, 2, 3]
    keys = [f"req-{i}".encode() for i in range(12)]
    records: list[tuple[str, bytes | None, bytes]] = [
        (TOPIC if i % 3 else "other", k, b"v%d" % i) for i, k in enumerate(keys)
    ]
    by_key = DurableSink(unreachable(tmp_path / "k"))
    by_round = DurableSink(unreachable(tmp_path / "r", partition_by="round"))
    try:
        for sink in (by_key, by_round):
            sink._partitions = {TOPIC: parts, "other": parts}
        count, batches = by_round._build(records)
        assert count == len(records)
        # one batch per topic: the partition of the topic's first key in the round
        topic_part = (TOPIC, partition_for(keys[1], parts))
        other_part = ("other", partition_for(keys[0], parts))
        assert set(batches) == {topic_part, other_part}
        batch = DefaultRecordBatch(batches[topic_part])
        assert [(r.offset, r.key, r.value) for r in batch] == [
            (n, k, v) for n, (_, k, v) in enumerate(r for r in records if r[0] == TOPIC)
        ]
        count, batches = by_key._build(records)
        assert count == len(records)
        assert set(batches) == {
            (TOPIC if i % 3 else "other", partition_for(k, parts)) for i, k in enumerate(keys)
        }
        assert len(batches) > 2  # the default spreads a round over the keys' partitions
    finally:
        await by_key.close(timeout_s=0.1)
        await by_round.close(timeout_s=0.1)


async def test_a_round_stops_at_a_full_batch(tmp_path: Path) -> None:
    sink = DurableSink(unreachable(tmp_path, partition_by="round", max_batch_bytes=1000))
    try:
        sink._partitions = {TOPIC: [0, 1]}
        count, batches = sink._build([(TOPIC, b"k%d" % i, b"x" * 300) for i in range(5)])
        assert count == 3 and len(batches) == 1  # the 4th would pass 1,000 bytes: next round
    finally:
        await sink.close(timeout_s=0.1)


def test_partition_by_is_checked(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="partition_by"):
        unreachable(tmp_path, partition_by="random")
