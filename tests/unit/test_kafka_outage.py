"""One log line per Kafka outage: both record sinks retrying a closed port log it once
(aiokafka's per-attempt errors held back, counted), a reminder after ``remind_every_s``,
and the reconnection once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from devstack.services import free_port
from server.records.durable_sink import DurableSink, DurableSinkConfig
from server.records.kafka_outage import AIOKAFKA_LOGGER, KafkaOutage
from server.records.kafka_sink import KafkaSink, SinkConfig, SinkMetrics

SINKS = ("kafka record sink", "durable sink durable")


def _sample(registry: CollectorRegistry, name: str, sink: str) -> float:
    return registry.get_sample_value(f"streamscore_record_sink_{name}_total", {"sink": sink}) or 0


async def test_sinks_retrying_a_closed_port_log_the_outage_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    metrics = SinkMetrics(registry)
    closed_port = f"127.0.0.1:{free_port()}"  # nothing listens there
    best_effort = KafkaSink(
        SinkConfig(closed_port, retry_interval_s=0.05, connect_timeout_s=1.0), metrics
    )
    durable = DurableSink(
        DurableSinkConfig(closed_port, tmp_path / "spill", retry_interval_s=0.05), metrics
    )
    caplog.set_level(logging.DEBUG)
    best_effort.start()
    durable.start()
    try:
        for _ in range(200):  # until each sink has failed many times
            best_effort.offer("t", b"x")
            durable.offer("t", b"x")
            await asyncio.sleep(0.02)
            failures = [_sample(registry, "kafka_failures", sink) for sink in SINKS]
            if min(failures) >= 5:
                break
    finally:
        await best_effort.close(timeout_s=1.0)
        await durable.close(timeout_s=1.0)
    # an aiokafka line is not any one sink's: the first filter holding it back counts it
    suppressed = best_effort.outage.suppressed_lines + durable.outage.suppressed_lines
    assert suppressed >= 8
    aiokafka_errors = [
        r for r in caplog.records if r.name == AIOKAFKA_LOGGER and r.levelno >= logging.ERROR
    ]
    ours = [
        r
        for r in caplog.records
        if r.name.startswith("server.records") and r.levelno >= logging.WARNING
    ]
    # one outage each: its first attempt's aiokafka lines, one warning per sink
    assert len(aiokafka_errors) <= 2, [r.getMessage() for r in aiokafka_errors]
    assert len(ours) == 2 and all("Kafka unreachable" in r.getMessage() for r in ours)
    assert best_effort.outage.outages == durable.outage.outages == 1
    for sink in SINKS:
        assert _sample(registry, "kafka_failures", sink) >= 5
    assert sum(_sample(registry, "kafka_log_suppressed", sink) for sink in SINKS) == suppressed
    # closed sinks leave aiokafka's logger as they found it
    assert not logging.getLogger(AIOKAFKA_LOGGER).filters


def test_reminder_and_reconnection_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    outage = KafkaOutage(
        "sink", logging.getLogger("tests.outage"), remind_every_s=60.0, clock=lambda: now[0]
    )
    client = logging.getLogger(AIOKAFKA_LOGGER)
    caplog.set_level(logging.INFO)
    outage.install()
    try:
        client.error('Unable connect to "%s": %s', "h:1", "refused")  # before: shown
        outage.failed("refused", "dropping records")
        for second in range(1, 121):
            now[0] = float(second)
            client.error('Unable connect to "%s": %s', "h:1", "refused")
            outage.failed("refused", "dropping records")
        client.error("Some other aiokafka error")  # not a connection error: always shown
        outage.connected()
        client.error('Unable connect to "%s": %s', "h:1", "refused")  # outage over: shown
    finally:
        outage.uninstall()
    lines = [r.getMessage() for r in caplog.records]
    connects = [m for m in lines if m.startswith("Unable connect")]
    # the first, one reminder at 60 s, one at 120 s, the one after the outage
    assert len(connects) == 4, lines
    assert "Kafka unreachable for 60 s; 59 similar not logged" in connects[1]
    assert sum("Kafka unreachable (refused)" in m for m in lines) == 1
    again = [m for m in lines if "reachable again" in m]
    assert len(again) == 1 and "after 120.0 s (121 failed attempts" in again[0], lines
    assert "Some other aiokafka error" in lines
    assert outage.outages == 1 and not outage.down
