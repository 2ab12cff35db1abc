"""ShadowRunner: scores after the answer, records side by side, counts errors and shedding."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from server.errors import ModelNotFound
from server.manifest import ModelManifest, TensorSpec, TrainingInfo
from server.records.kafka_sink import Payload
from server.records.shadow import (
    SHADOW_SCHEMA,
    ScoringVersion,
    ShadowMetrics,
    ShadowOptions,
    ShadowRunner,
    live_backlog,
)
from tests.support.readers import records_of

NAMES = ("a", "b", "c", "d")
TOPIC = "shadow-records"


def manifest(version: str, names: tuple[str, ...], threshold: float = 0.5) -> ModelManifest:
    return ModelManifest(
        name="m",
        version=version,
        features=names,
        input=TensorSpec(name="x", dtype="float32"),
        outputs=(TensorSpec(name="probabilities", dtype="float32"),),
        score_output="probabilities",
        score_index=1,
        threshold=threshold,
        sha256="0" * 64,
        training=TrainingInfo(data_snapshot="t", code_commit="t", created_at=datetime.now(UTC)),
    )


def probability(rows: npt.NDArray[np.float32], weights: npt.NDArray[np.float32]) -> Any:
    return 1.0 / (1.0 + np.exp(-(rows.astype(np.float64) @ weights)))


@dataclass
class FakeModel:
    manifest: ModelManifest
    weights: npt.NDArray[np.float32]
    fail: bool = False
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    batch_sizes: list[int] = field(default_factory=list)

    async def run(self, rows: npt.NDArray[np.float32]) -> Mapping[str, npt.NDArray[Any]]:
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("model exploded")
        self.batch_sizes.append(int(rows.shape[0]))
        p = probability(rows, self.weights)
        return {"probabilities": np.column_stack([1 - p, p]).astype(np.float32)}


@dataclass(frozen=True)
class FakeLayout:
    names: tuple[str, ...]


@dataclass(frozen=True)
class FakeVersion:
    model: FakeModel
    layout: FakeLayout


def version(v: str, seed: int, names: tuple[str, ...] = NAMES) -> FakeVersion:
    weights = np.random.default_rng(seed).normal(size=len(names)).astype(np.float32)
    return FakeVersion(FakeModel(manifest(v, names), weights), FakeLayout(names))


class MemorySink:
    """Collects records (encoding lazily like the Kafka sink's sender)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.keys: list[bytes | None] = []
        self._changed = asyncio.Event()

    def offer(self, topic: str, value: Payload, key: bytes | None = None) -> bool:
        assert topic == TOPIC
        data = value if isinstance(value, bytes) else value()
        for record in records_of(data):
            self.records.append(record)
            self.keys.append(record["request_id"].encode())
        self._changed.set()
        return True

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(5):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.records


class Setup:
    def __init__(
        self,
        versions: dict[str, FakeVersion],
        options: ShadowOptions | None = None,
        busy: bool = False,
    ) -> None:
        self.registry = CollectorRegistry()
        self.sink = MemorySink()
        self.versions = versions
        self.busy = busy
        self.runner = ShadowRunner(
            self.lookup,
            ShadowMetrics(self.registry),
            sink=self.sink,
            options=options or ShadowOptions(records_topic=TOPIC),
            is_busy=lambda: self.busy,
        )

    def lookup(self, model: str, v: str) -> ScoringVersion:
        if v not in self.versions:
            raise ModelNotFound(f"no version {v}")
        return self.versions[v]

    def submit(
        self, request_id: str, row: npt.NDArray[np.float32], shadows: tuple[str, ...]
    ) -> float:
        live = self.versions["1"]
        score = float(probability(row, live.model.weights)[0])
        self.runner.submit(
            request_id=request_id,
            model="m",
            live=live,
            live_score=score,
            route="champion",
            row=row,
            shadows=shadows,
        )
        return score

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def rows(n: int, width: int = len(NAMES), seed: int = 7) -> list[npt.NDArray[np.float32]]:
    data = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    return [data[i : i + 1] for i in range(n)]


async def test_shadow_scores_after_the_answer_and_records_both_sides() -> None:
    s = Setup({"1": version("1", 1), "2": version("2", 2)})
    inputs = rows(20)
    live_scores = [s.submit(f"r{i}", row, ("2",)) for i, row in enumerate(inputs)]
    # submit only queued: nothing was scored on the caller's (answer's) turn
    assert s.sink.records == []
    assert s.metric("streamscore_shadow_compared_total", live_version="1", version="2") == 0
    records = await s.sink.wait_for(20)
    shadow_model = s.versions["2"].model
    assert shadow_model.batch_sizes == [20]  # one batch for the burst
    expected = probability(np.concatenate(inputs), shadow_model.weights)
    agreed = 0
    for i, record in enumerate(records):
        assert record["schema"] == SHADOW_SCHEMA
        assert record["request_id"] == f"r{i}" and record["model"] == "m"
        assert record["live"] == {
            "version": "1",
            "route": "champion",
            "score": live_scores[i],
            "threshold": 0.5,
            "decision": live_scores[i] >= 0.5,
        }
        shadow = record["shadow"]
        assert shadow["version"] == "2"
        assert shadow["score"] == pytest.approx(expected[i], abs=1e-6)
        assert shadow["decision"] == (shadow["score"] >= 0.5)
        assert record["agree"] == (shadow["decision"] == record["live"]["decision"])
        assert record["score_diff"] == pytest.approx(shadow["score"] - live_scores[i])
        assert shadow["latency_us"] >= 0
        agreed += record["agree"]
    assert s.sink.keys[0] == b"r0"
    labels = {"live_version": "1", "version": "2"}
    assert s.metric("streamscore_shadow_compared_total", **labels) == 20
    assert s.metric("streamscore_shadow_agreed_total", **labels) == agreed
    assert 0 < agreed < 20  # different weights: some decisions differ
    assert s.metric("streamscore_shadow_score_diff_count", **labels) == 20
    assert s.metric("streamscore_shadow_latency_seconds_count", version="2") == 20
    await s.runner.close()


async def test_a_failing_shadow_never_raises_and_is_counted() -> None:
    s = Setup({"1": version("1", 1), "2": version("2", 2)})
    s.versions["2"].model.fail = True
    for i, row in enumerate(rows(5)):
        s.submit(f"r{i}", row, ("2",))  # must not raise
    records = await s.sink.wait_for(5)
    assert [r["shadow"].get("error") for r in records] == ["inference"] * 5
    assert all("score" not in r["shadow"] for r in records)
    assert s.metric("streamscore_shadow_errors_total", version="2", reason="inference") == 5
    assert s.metric("streamscore_shadow_compared_total", live_version="1", version="2") == 0
    s.versions["2"].model.fail = False  # the lane survives its model's failure
    s.submit("after", rows(1)[0], ("2",))
    [*_, last] = await s.sink.wait_for(6)
    assert last["request_id"] == "after" and "score" in last["shadow"]
    await s.runner.close()


async def test_unknown_shadow_version_is_an_error_not_an_exception() -> None:
    s = Setup({"1": version("1", 1)})
    s.submit("r0", rows(1)[0], ("9",))
    assert s.metric("streamscore_shadow_errors_total", version="9", reason="not_loaded") == 1
    await s.runner.close()


async def test_busy_server_sheds_shadows_first() -> None:
    s = Setup({"1": version("1", 1), "2": version("2", 2)}, busy=True)
    for i, row in enumerate(rows(3)):
        s.submit(f"r{i}", row, ("2",))
    assert s.metric("streamscore_shadow_shed_total", version="2", reason="busy") == 3
    await s.runner.close()
    assert s.sink.records == []
    assert s.versions["2"].model.batch_sizes == []


async def test_full_shadow_queue_sheds_and_counts() -> None:
    options = ShadowOptions(max_queue_size=4, records_topic=TOPIC)
    s = Setup({"1": version("1", 1), "2": version("2", 2)}, options)
    shadow = s.versions["2"].model
    shadow.gate = asyncio.Event()
    inputs = rows(8)
    s.submit("r0", inputs[0], ("2",))
    await shadow.started.wait()  # r0's batch is running (blocked)
    for i in range(1, 8):
        s.submit(f"r{i}", inputs[i], ("2",))
    assert s.metric("streamscore_shadow_shed_total", version="2", reason="queue_full") == 3
    shadow.gate.set()
    records = await s.sink.wait_for(5)
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2", "r3", "r4"]
    await s.runner.close()


async def test_close_sheds_what_is_still_queued() -> None:
    s = Setup({"1": version("1", 1), "2": version("2", 2)})
    shadow = s.versions["2"].model
    shadow.gate = asyncio.Event()
    inputs = rows(4)
    s.submit("r0", inputs[0], ("2",))
    await shadow.started.wait()
    for i in range(1, 4):
        s.submit(f"r{i}", inputs[i], ("2",))
    await s.runner.close(timeout_s=0.05)
    assert s.metric("streamscore_shadow_shed_total", version="2", reason="closed") == 4
    s.submit("late", inputs[0], ("2",))
    assert s.metric("streamscore_shadow_shed_total", version="2", reason="closed") == 5


async def test_shadow_with_other_column_order_gets_its_own_order() -> None:
    reordered = tuple(reversed(NAMES))
    s = Setup({"1": version("1", 1), "2": version("2", 2, reordered)})
    row = rows(1)[0]
    s.submit("r0", row, ("2",))
    [record] = await s.sink.wait_for(1)
    expected = probability(row[:, ::-1], s.versions["2"].model.weights)[0]
    assert record["shadow"]["score"] == pytest.approx(expected, abs=1e-6)
    await s.runner.close()


async def test_shadow_needing_a_feature_the_live_row_lacks_is_an_error() -> None:
    s = Setup({"1": version("1", 1), "2": version("2", 2, (*NAMES, "extra"))})
    s.submit("r0", rows(1)[0], ("2",))
    assert s.metric("streamscore_shadow_errors_total", version="2", reason="feature_mismatch") == 1
    await s.runner.close()
    assert s.versions["2"].model.batch_sizes == []


@dataclass(frozen=True)
class FakeBatcher:
    depth: int


@dataclass(frozen=True)
class Batched:
    batcher: FakeBatcher


def test_live_backlog_sums_waiting_requests() -> None:
    versions = [Batched(FakeBatcher(3)), Batched(FakeBatcher(4))]
    assert live_backlog(lambda: versions, 7)()
    assert not live_backlog(lambda: versions, 8)()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_queue_size"):
        ShadowOptions(max_queue_size=0)
