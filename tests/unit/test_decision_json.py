"""The decision record's encoder: orjson output equal to ``json.dumps`` of the
documented record (bytes equal for ASCII text), non-finite numbers kept as the
``json`` extension, a version's shared parts built once and rebuilt on reload."""

from __future__ import annotations

import json
import math
import os
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from feature_streams.read_plan import FetchRow, Freshness
from server.explain.reasons import FeatureValue, Reason
from server.lineage import Lineage
from server.records.decision_json import VersionParts, encode_record, finite
from server.records.traffic_log import TrafficLog, feature_sources, traffic_record
from server.router import Route
from server.scoring_types import ScoreInput, ScoreResult

LINEAGE = Lineage("abc123", "snap-7", "deadbeef", "2026-01-01T00:00:00+00:00", "lgbm", True)
NAMES = tuple(f"f{i}" for i in range(12))


class _Sink:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def offer(self, topic: str, value: object, key: bytes | None = None) -> bool:
        self.values.append(value)
        return True


def _reference(
    row: list[float],
    request_features: dict[str, Any],
    *,
    score: float = 0.25,
    entity_ids: dict[str, str] | None = None,
    reasons: tuple[Reason, ...] | None = None,
    sources: dict[str, str] | None = None,
    lineage: Lineage | None = LINEAGE,
) -> dict[str, Any]:
    return traffic_record(
        ts=1_796_000_000.123456,
        model="fraud",
        model_version=None,
        request_id="r-1",
        entity_ids=entity_ids or {"card_id": "c-1"},
        request_features=request_features,
        event_time_ms=None,
        t_ms=1_000,
        features=dict(zip(NAMES, row, strict=True)),
        score=score,
        version="2",
        route="champion",
        threshold=0.5,
        timings={"pipeline_us": 321},
        feature_sources=sources or dict.fromkeys(NAMES, "request"),
        freshness=[{"group": "card_activity", "entity": "c-1", "age_ms": 12}],
        artifact_sha256="abc123",
        lineage=lineage,
        reasons=reasons,
        reasons_base_value=-1.5,
        defaulted_features=("f3",),
        degraded_reasons=("snapshot_missing",),
        process={"pid": 7, "index": 0},
    )


def _encode(record: dict[str, Any], lineage: Lineage | None = LINEAGE) -> bytes:
    """``record`` encoded as the traffic log does: shared parts as fragments."""
    parts = VersionParts.build(NAMES, lineage)
    out = dict(record)
    out["lineage"] = parts.lineage
    if set(record["feature_sources"].values()) == {"request"}:
        out["feature_sources"] = parts.all_request_sources
    return encode_record(out, parts)


def _random_row(rng: np.random.Generator) -> list[float]:
    scale = 10.0 ** rng.integers(-8, 9, size=len(NAMES))
    values: list[float] = (rng.normal(size=len(NAMES)) * scale).astype(np.float32).tolist()
    return values


def test_bytes_equal_json_dumps_for_many_random_records() -> None:
    rng = np.random.default_rng(11)
    reasons = (Reason("AMT", "High amount", 0.8, (FeatureValue("f0", 120.5, 0.8),)),)
    for i in range(300):
        row = _random_row(rng)
        sent = {n: float(v) for n, v in zip(NAMES[:5], rng.normal(size=5) * 1e3, strict=True)}
        reference = _reference(
            row,
            sent,
            score=float(rng.random()),
            reasons=reasons if i % 3 == 0 else None,
            sources=None if i % 2 else {n: f"stream:g{i}" for n in NAMES},
            lineage=None if i % 5 == 0 else LINEAGE,
        )
        lineage = None if i % 5 == 0 else LINEAGE
        encoded = _encode(reference, lineage)
        expected = json.dumps(reference, separators=(",", ":"))
        # the same digits as repr; exponent spelling may differ (1e-05 vs 1e-5)
        assert json.loads(encoded) == json.loads(expected)
        if "e-0" not in expected and "e+" not in expected:
            assert encoded == expected.encode()


@pytest.mark.parametrize(
    ("where", "value", "spelled"),
    [
        ("row", math.nan, "NaN"),
        ("row", math.inf, "Infinity"),
        ("request", -math.inf, "-Infinity"),
        ("score", math.nan, "NaN"),
        ("reason", math.nan, "NaN"),
    ],
)
def test_non_finite_values_keep_the_json_extension(where: str, value: float, spelled: str) -> None:
    row = [float(i) for i in range(len(NAMES))]
    sent: dict[str, Any] = {"f0": 0.0}
    score = 0.25
    reasons = None
    if where == "row":
        row[4] = value
    elif where == "request":
        sent["f0"] = value
    elif where == "score":
        score = value
    else:
        reasons = (Reason("AMT", "High amount", value, (FeatureValue("f0", 1.0, value),)),)
    reference = _reference(row, sent, score=score, reasons=reasons)
    encoded = _encode(reference)
    # the json extension, read back as such (orjson alone would have written null)
    assert spelled.encode() in encoded
    assert encoded == json.dumps(reference, separators=(",", ":")).encode()


def test_non_ascii_text_reads_back_equal() -> None:
    reference = _reference([1.0] * len(NAMES), {"f0": 1.0}, entity_ids={"card_id": "kärtchen-ü✓"})
    encoded = _encode(reference)
    assert json.loads(encoded) == json.loads(json.dumps(reference))


def test_int_feature_values_are_written_as_json_does() -> None:
    reference = _reference([1.0] * len(NAMES), {"f0": 3, "f1": True})
    encoded = _encode(reference)
    assert encoded == json.dumps(reference, separators=(",", ":")).encode()


def test_finite() -> None:
    assert finite([1.0, -2.0, 1e300]) and finite([])
    assert not finite([1.0, math.nan]) and not finite([math.inf, -math.inf])
    assert not finite([1.0, "x"])  # type: ignore[list-item]


def _offer(log: TrafficLog, names: tuple[str, ...], lineage: Any, sent: bool = True) -> None:
    row = np.arange(len(names), dtype=np.float32).reshape(1, -1)
    fetched = FetchRow(row, np.array([sent] * len(names)), {}, 1_000)
    log.offer(
        ScoreInput("fraud", "r-1", {}),
        ScoreResult("r-1", 0.9, "fraud", "2", Route.CHAMPION, artifact_sha256="abc123"),
        names=names,
        row=row,
        t_ms=1_000,
        threshold=0.5,
        timings={"pipeline_us": 1},
        fetched=fetched,
        lineage=lineage,
    )


def test_traffic_log_builds_a_versions_parts_once_and_again_on_reload() -> None:
    sink = _Sink()
    log = TrafficLog(sink, "t", 1.0, sample_salt=b"s")
    calls: list[str] = []

    def lineage_of(snapshot: str) -> Any:
        def lineage() -> Lineage:
            calls.append(snapshot)
            return Lineage("abc123", snapshot, "c", "2026-01-01T00:00:00+00:00", "lgbm", False)

        return lineage

    names = tuple(["a", "b"])
    for _ in range(3):
        _offer(log, names, lineage_of("snap-1"))
    reloaded = tuple(["a", "b"])  # a reload of the version: a new layout
    _offer(log, reloaded, lineage_of("snap-2"), sent=False)
    records = [json.loads(encode()) for encode in sink.values]
    assert [r["lineage"]["data_snapshot"] for r in records] == ["snap-1"] * 3 + ["snap-2"]
    assert records[0]["feature_sources"] == {"a": "request", "b": "request"}
    assert records[3]["feature_sources"] == {"a": "default", "b": "default"}
    assert calls == ["snap-1", "snap-2"]  # once per version load, not per record


def test_traffic_log_bytes_equal_the_documented_record() -> None:
    """What the traffic log writes is ``traffic_record`` of the same inputs, encoded:
    request mappings of any kind (a protobuf map, the default empty proxy), freshness,
    reasons, sources from a fetch row, tuples as lists."""
    rng = np.random.default_rng(5)
    reason = Reason("AMT", "High amount", 0.8, (FeatureValue("f0", 120.5, 0.8),))
    for i in range(120):
        sink = _Sink()
        log = TrafficLog(sink, "t", 1.0, sample_salt=b"s", clock=lambda: 1_796_000_000.5)
        row = np.asarray([_random_row(rng)], np.float32)
        sent_mask = np.array([j % (i % 3 + 1) == 0 for j in range(len(NAMES))])
        fetched = FetchRow(row, sent_mask, {}, 1_000)
        sent = {n: float(v) for n, v, s in zip(NAMES, row[0], sent_mask, strict=True) if s}
        entity_ids = MappingProxyType({"card_id": f"c-{i}"}) if i % 2 else MappingProxyType({})
        request = ScoreInput("fraud", f"r-{i}", MappingProxyType(sent), entity_ids)
        freshness = (Freshness("card_activity", f"c-{i}", 12 + i),) if i % 4 == 0 else ()
        result = ScoreResult(
            f"r-{i}",
            float(rng.random()),
            "fraud",
            "2",
            Route.CANARY if i % 5 == 0 else Route.CHAMPION,
            defaulted_features=("f3",) if i % 2 else (),
            freshness=freshness,
            degraded_reasons=("snapshot_missing",) if i % 6 == 0 else (),
            artifact_sha256="abc123",
            reasons=(reason,) if i % 3 == 0 else None,
            reasons_base_value=-1.5,
        )
        timings = {"pipeline_us": 100 + i}
        log.offer(
            request,
            result,
            names=NAMES,
            row=row,
            t_ms=1_000,
            threshold=0.5,
            timings=timings,
            fetched=fetched,
            lineage=lambda: LINEAGE,
        )
        reference = traffic_record(
            ts=1_796_000_000.5,
            model="fraud",
            model_version=None,
            request_id=f"r-{i}",
            entity_ids=entity_ids,
            request_features=sent,
            event_time_ms=None,
            t_ms=1_000,
            features=dict(zip(NAMES, row[0].tolist(), strict=True)),
            score=result.score,
            version="2",
            route=result.route.value,
            threshold=0.5,
            defaulted_features=result.defaulted_features,
            degraded_reasons=result.degraded_reasons,
            timings=timings,
            feature_sources=feature_sources(NAMES, fetched, None),
            freshness=[f._asdict() for f in freshness],
            artifact_sha256="abc123",
            lineage=LINEAGE,
            reasons=result.reasons,
            reasons_base_value=-1.5,
            process={"pid": os.getpid(), "index": 0},
        )
        (encode,) = sink.values
        encoded = encode()
        expected = json.dumps(reference, separators=(",", ":"))
        assert json.loads(encoded) == json.loads(expected)
        if "e-0" not in expected and "e+" not in expected:
            assert encoded == expected.encode()
