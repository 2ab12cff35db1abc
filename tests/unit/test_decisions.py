"""The decision record's pure parts: the record built off the request path (sources,
lineage, reasons), ``decisions`` durations, keyed partition and printout, and replay
reading both record schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner

from feature_streams.read_plan import FetchRow
from server.clients.decisions import Found, format_record, keyed_partition, parse_since
from server.clients.replay import parse_record, save_records
from server.explain.reasons import FeatureValue, Reason
from server.lineage import Lineage
from server.records.traffic_log import (
    DECISION_SCHEMA,
    TRAFFIC_SCHEMA,
    TrafficLog,
    feature_sources,
)
from server.router import Route
from server.scoring_types import ScoreInput, ScoreResult


class _Sink:
    def __init__(self) -> None:
        self.offers: list[tuple[str, object, bytes | None]] = []

    def offer(self, topic: str, value: object, key: bytes | None = None) -> bool:
        self.offers.append((topic, value, key))
        return True


LINEAGE = Lineage("abc123", "snap-7", "deadbeef", "2026-01-01T00:00:00+00:00", "lgbm", True)


def _record() -> dict[str, object]:
    sink = _Sink()
    log = TrafficLog(sink, "streamscore.decisions", 1.0, sample_salt=b"s", process_index=3)
    names = ("amount", "hour", "credit_limit")
    row = np.array([[120.0, 0.0, 5000.0]], np.float32)
    fetched = FetchRow(row, np.array([True, False, False]), {}, 1_000, defaulted=["hour"])
    reason = Reason("AMT", "High amount", 0.8, (FeatureValue("amount", 120.0, 0.8),))
    request = ScoreInput("fraud", "r-1", {"amount": 120.0}, {"card_id": "c1"})
    result = ScoreResult(
        "r-1",
        0.9,
        "fraud",
        "2",
        Route.CHAMPION,
        defaulted_features=("hour",),
        artifact_sha256="abc123",
        threshold=0.5,
        decision=True,
        reasons=(reason,),
        reasons_base_value=-2.0,
    )
    assert log.offer(
        request,
        result,
        names=names,
        row=row,
        t_ms=1_000,
        threshold=0.5,
        timings={"pipeline_us": 321},
        fetched=fetched,
        plan=None,
        lineage=lambda: LINEAGE,
    )
    ((topic, encode, key),) = sink.offers
    assert topic == "streamscore.decisions" and key == b"r-1" and callable(encode)
    record: dict[str, object] = json.loads(encode())
    return record


def test_record_carries_sources_lineage_decision_reasons_and_process() -> None:
    record = _record()
    assert record["schema"] == DECISION_SCHEMA and record["request_id"] == "r-1"
    assert record["feature_sources"] == {
        "amount": "request",
        "hour": "default",
        "credit_limit": "default",
    }
    assert record["artifact_sha256"] == "abc123" and record["decision"] is True
    assert record["lineage"]["data_snapshot"] == "snap-7"  # type: ignore[index]
    assert record["lineage"]["code_commit"] == "deadbeef"  # type: ignore[index]
    assert record["reasons"] == [
        {
            "code": "AMT",
            "text": "High amount",
            "contribution": 0.8,
            "features": [{"name": "amount", "value": 120.0, "contribution": 0.8}],
        }
    ]
    assert record["process"]["index"] == 3 and record["latency_us"] == 321  # type: ignore[index]
    parsed = parse_record(json.dumps(record))
    assert parsed.reason_codes == ("AMT",) and parsed.version == "2"


def test_replay_save_keeps_the_recorded_reasons(tmp_path: Path) -> None:
    record = _record()
    saved = tmp_path / "saved.jsonl"
    save_records([parse_record(json.dumps(record))], saved)
    (line,) = saved.read_text().splitlines()
    again = json.loads(line)
    assert again["reasons"] == record["reasons"]
    assert again["reasons_base_value"] == record["reasons_base_value"] == -2.0
    assert parse_record(line).reason_codes == ("AMT",)
    # a record without reasons is saved without
    record["reasons"] = None
    save_records([parse_record(json.dumps(record))], saved)
    assert json.loads(saved.read_text())["reasons"] is None


def test_sources_without_a_fetch_row_are_all_request() -> None:
    assert feature_sources(("a", "b"), None, None) == {"a": "request", "b": "request"}


def test_replay_still_reads_traffic_records_without_reasons() -> None:
    record = _record()
    record["schema"] = TRAFFIC_SCHEMA
    del record["reasons"]
    assert parse_record(json.dumps(record)).reason_codes is None
    with pytest.raises(ValueError, match="decision"):
        parse_record('{"schema": "other"}')


def test_since_durations() -> None:
    assert parse_since("90s") == 90 and parse_since("30m") == 1800
    assert parse_since("2h") == 7200 and parse_since("7d") == 7 * 86400
    with pytest.raises(ValueError, match="2h"):
        parse_since("yesterday")


def test_keyed_partition_is_the_producers_default() -> None:
    for i in range(200):
        key = f"req-{i}".encode()
        for count in (1, 3, 8):
            expected = DefaultPartitioner()(key, list(range(count)), list(range(count)))
            assert keyed_partition(key, count) == expected


def test_printout_names_sources_reasons_and_lineage() -> None:
    record = _record()
    text = format_record(Found(record, b"", 2, 17))
    assert "r-1" in text and "partition 2, offset 17" in text
    assert "credit_limit" in text and "default" in text and "request" in text
    assert "1. AMT +0.8  High amount" in text and "amount=120" in text
    assert "data snapshot snap-7" in text and "code commit deadbeef" in text
    assert "FLAGGED" in text and "pid" in text
    when = datetime.fromtimestamp(float(record["ts"]), UTC).isoformat(timespec="milliseconds")  # type: ignore[arg-type]
    assert when in text
