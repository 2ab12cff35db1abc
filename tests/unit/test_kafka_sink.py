"""KafkaSink: bounded, never blocks, drops and counts (full buffer, unreachable broker, closed)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from devstack.services import free_port
from server.records.kafka_sink import KafkaSink, SinkConfig, SinkMetrics

TOPIC = "records"


def unreachable(**overrides: object) -> SinkConfig:
    """A sink pointed at a port nothing listens on."""
    options: dict[str, object] = {"retry_interval_s": 30.0, "connect_timeout_s": 2.0}
    options.update(overrides)
    return SinkConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", **options)  # type: ignore[arg-type]


def dropped_metric(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value(
        "streamscore_record_sink_dropped_total", {"topic": TOPIC, "reason": reason}
    )
    return value or 0.0


async def test_full_buffer_drops_and_counts_without_blocking() -> None:
    registry = CollectorRegistry()
    sink = KafkaSink(unreachable(max_buffered=10), SinkMetrics(registry))
    encoded: list[int] = []

    def lazy(i: int) -> bytes:
        encoded.append(i)
        return b"x"

    started = time.perf_counter()
    accepted = [sink.offer(TOPIC, lambda i=i: lazy(i)) for i in range(1000)]  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    assert accepted.count(True) == 10 and accepted[:10] == [True] * 10
    assert sink.dropped["buffer_full"] == 990
    assert dropped_metric(registry, "buffer_full") == 990
    assert sink.buffered == 10
    assert elapsed < 0.5  # 1000 offers: synchronous, no I/O
    await sink.close(timeout_s=1.0)
    assert sink.dropped["kafka_unavailable"] == 10  # the first offer started a connect
    assert encoded == []  # dropped records are never encoded
    assert not sink.offer(TOPIC, b"late")
    assert sink.dropped["closed"] == 1


async def test_unreachable_broker_drops_and_counts_and_close_is_prompt() -> None:
    registry = CollectorRegistry()
    sink = KafkaSink(unreachable(), SinkMetrics(registry))
    for _ in range(5):
        assert sink.offer(TOPIC, b"early")  # buffered while the first connect is tried
    sink.start()
    assert await sink.flush(timeout_s=5.0)  # the failed connect drops the buffer
    assert sink.state == "down"
    assert sink.dropped["kafka_unavailable"] == 5
    started = time.perf_counter()
    results = [sink.offer(TOPIC, b"while down") for _ in range(500)]
    assert time.perf_counter() - started < 0.5
    assert not any(results)
    assert sink.dropped["kafka_unavailable"] == 505
    assert dropped_metric(registry, "kafka_unavailable") == 505
    assert sink.sent == {}
    started = time.perf_counter()
    await sink.close(timeout_s=2.0)
    assert time.perf_counter() - started < 2.0  # the retry wait does not hold close
    assert str(sink.state) == "closed"  # (str: mypy narrowed state above)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_buffered"):
        SinkConfig(bootstrap_servers="x:1", max_buffered=0)
    with pytest.raises(ValueError, match="retry_interval_s"):
        SinkConfig(bootstrap_servers="x:1", retry_interval_s=0)
