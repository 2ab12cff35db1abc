"""Replay recorded traffic against a real server: from a file and from Kafka, both paces,
frozen and live features, pinned and routed, and the ``streamscore replay`` entry point."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from devstack.services import KafkaBroker
from protos.streamscore.v1 import scoring_pb2 as pb
from server.clients.replay import (
    ReplayConfig,
    ReplayError,
    main_replay,
    parse_record,
    record_from_exchange,
    run_replay,
)
from server.records.kafka_sink import KafkaSink, SinkConfig
from tests.conftest import TEST_FEATURES
from tests.support.server import TEST_OVERRIDE_TOKEN, RunningServer, running_server

pytestmark = pytest.mark.integration

N = 200
SPACING_S = 0.004  # recorded inter-arrival: N records span 0.8 s


async def record_traffic(srv: RunningServer, path: Path) -> list[str]:
    """Score N requests through the router (champion = v2) and record them as JSON lines."""
    rng = np.random.default_rng(3)
    base = time.time()
    lines = []
    for i in range(N):
        request = pb.ScoreRequest(
            model="lin",
            request_id=f"rec-{i}",
            entity_ids={"card_id": f"c{i % 17}"},
            features=dict(zip(TEST_FEATURES, rng.normal(size=8).tolist(), strict=True)),
            echo_features=True,
        )
        request.event_time.FromMilliseconds(1_700_000_000_000 + i)  # a recorded time
        response = await srv.scoring.Score(request, metadata=srv.overrides)
        record = record_from_exchange(request, response, threshold=0.5, ts=base + i * SPACING_S)
        lines.append(json.dumps(record))
    await asyncio.to_thread(path.write_text, "\n".join(lines) + "\n")
    return lines


def config(srv: RunningServer, **fields: object) -> ReplayConfig:
    """A replay holding the overrides permission (recorded features and times)."""
    fields.setdefault("override_token", TEST_OVERRIDE_TOKEN)
    return ReplayConfig(target=srv.target, **fields)  # type: ignore[arg-type]


async def test_replay_same_version_frozen_agrees_fully_and_other_version_does_not(
    linear_repository: Path, tmp_path: Path
) -> None:
    path = tmp_path / "traffic.jsonl"
    async with running_server(linear_repository) as srv:
        await record_traffic(srv, path)
        assert parse_record(path.read_text().splitlines()[0]).version == "2"
        same = await run_replay(config(srv, file=path, version="2", pace=None, concurrency=16))
        other = await run_replay(config(srv, file=path, version="1", pace=None, concurrency=16))
        refused = await run_replay(config(srv, file=path, pace=None, override_token=None))
    assert same.records == same.ok == N and same.errors == {}
    assert same.agreement_rate == 1.0 and same.identical == N
    assert same.score_diff["max_abs"] == 0.0
    assert same.answered_by == {"2": N}
    assert same.latency.count == N and same.latency.p99_us > 0
    assert same.throughput_rps > 0
    assert other.ok == N and other.answered_by == {"1": N}
    assert other.agreement_rate is not None and other.agreement_rate < 1.0
    assert other.identical < N and other.score_diff["max_abs"] > 0.0
    assert other.score_diff["p99_abs"] >= other.score_diff["p50_abs"] > 0.0
    text = other.format_text()
    assert "agreement" in text and "version 1 pinned" in text
    document = other.to_json()
    assert document["agreement_rate"] == other.agreement_rate
    assert document["config"]["override_token"] is True  # that one was sent, never its value
    assert TEST_OVERRIDE_TOKEN not in json.dumps(document)
    # without the permission, recorded times (and store features) are refused
    assert refused.ok == 0 and refused.errors == {"INVALID_ARGUMENT": N}
    assert document["latency_us"]["count"] == N


async def test_replay_from_kafka_at_recorded_pace_with_live_features(
    kafka: KafkaBroker, linear_repository: Path, tmp_path: Path
) -> None:
    topic = f"traffic-{uuid.uuid4().hex[:8]}"
    async with running_server(linear_repository) as srv:
        lines = await record_traffic(srv, tmp_path / "traffic.jsonl")
        sink = KafkaSink(SinkConfig(bootstrap_servers=kafka.bootstrap_servers, linger_ms=2))
        sink.start()
        lines.insert(5, '{"not": "a traffic record"}')
        for line in lines:
            assert sink.offer(topic, line.encode())
        await sink.close()
        report = await run_replay(
            config(
                srv,
                topic=topic,
                bootstrap_servers=kafka.bootstrap_servers,
                pace=2.0,
                features="live",
            )
        )
    assert report.records == N and report.skipped_records == 1
    assert report.ok == N and report.agreement_rate == 1.0  # routed to the recorded champion
    assert report.answered_by == {"2": N}
    recorded_span = (N - 1) * SPACING_S
    assert report.duration_s >= 0.9 * recorded_span / 2.0  # paced, not as fast as possible


async def test_replay_command_line(linear_repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    out = tmp_path / "report.json"
    token_file = tmp_path / "override-token"
    token_file.write_text(TEST_OVERRIDE_TOKEN + "\n")
    async with running_server(linear_repository) as srv:
        await record_traffic(srv, path)
        args = ["--file", str(path), "--target", srv.target, "--pace", "max"]
        args += ["--override-token-file", str(token_file)]
        same = await asyncio.to_thread(
            main_replay, [*args, "--version", "2", "--json-out", str(out), "--fail-under", "1"]
        )
        document = json.loads(out.read_text())
        other = await asyncio.to_thread(
            main_replay, [*args, "--version", "1", "--json-out", str(out), "--fail-under", "1"]
        )
        missing = await asyncio.to_thread(
            main_replay, ["--file", str(tmp_path / "none.jsonl"), "--target", srv.target]
        )
        save = ["--save", str(tmp_path / "saved.jsonl")]
        missing_saved = await asyncio.to_thread(
            main_replay, ["--file", str(tmp_path / "none.jsonl"), "--target", srv.target, *save]
        )
    assert same == 0 and document["agreement_rate"] == 1.0 and document["ok"] == N
    assert document["schema"] == "streamscore.replay/1"
    assert other == 3  # agreement below --fail-under
    assert missing == 1
    assert missing_saved == 1  # a clear error with --save too, not a traceback
    with pytest.raises(SystemExit):
        main_replay(["--file", "a", "--topic", "b"])


async def test_nothing_to_replay_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("garbage\n")
    with pytest.raises(ReplayError, match="no records"):
        await run_replay(ReplayConfig(file=path))
    with pytest.raises(ValueError, match="exactly one"):
        ReplayConfig()


async def test_replay_of_a_run_recorded_by_the_traffic_log_agrees_fully(
    kafka: KafkaBroker, linear_repository: Path
) -> None:
    topic = f"traffic-{uuid.uuid4().hex[:8]}"
    overrides = [
        "traffic_log.sample_rate=1.0",
        f"traffic_log.topic={topic}",
        f"kafka.bootstrap_servers={kafka.bootstrap_servers}",
    ]
    rng = np.random.default_rng(11)
    async with running_server(linear_repository, overrides) as srv:
        for i in range(N):
            values = rng.normal(size=8).tolist()
            await srv.scoring.Score(
                pb.ScoreRequest(
                    model="lin",
                    request_id=f"run-{i}",
                    entity_ids={"card_id": f"c{i}"},
                    features=dict(zip(TEST_FEATURES, values, strict=True)),
                )
            )
    # leaving the server flushed the traffic log; replay against a fresh server
    async with running_server(linear_repository) as srv:
        report = await run_replay(
            config(
                srv,
                topic=topic,
                bootstrap_servers=kafka.bootstrap_servers,
                version="2",
                pace=None,
            )
        )
    assert report.records == report.ok == N and report.errors == {}
    assert report.agreement_rate == 1.0 and report.identical == N
