"""Drift monitor without Redis I/O: attach rules and the per-process fold."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.batcher import BatchPolicy, MicroBatcher
from server.drift.metrics import DriftMetrics
from server.drift.monitor import FOLD_WAIT_S, LONE_ROWS_CAP, PENDING_ROWS, DriftMonitor
from server.executor import Job, JobResult, VersionBatchRunner
from server.features import FeatureLayout, Prepared
from server.manifest import ModelManifest
from server.runtime import RuntimeOptions, load_version
from server.settings import DriftSettings
from tests.conftest import TEST_FEATURES
from tests.support.drift import draw, write_reference_profile
from tests.support.model_factory import write_linear_model


def monitor(clock: float = 120.0) -> DriftMonitor:
    return DriftMonitor(
        DriftSettings(),
        Redis(),  # never contacted here
        DriftMetrics(CollectorRegistry()),
        clock=lambda: clock,
    )


def test_a_version_without_profile_is_not_monitored_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version_dir, _, _ = write_linear_model(tmp_path, "lin", "1", TEST_FEATURES)
    with caplog.at_level(logging.INFO, logger="server.drift.monitor"):
        drift = monitor().attach(version_dir, ModelManifest.read(version_dir), TEST_FEATURES)
    assert drift is None
    off = [r for r in caplog.records if "drift monitoring off" in r.getMessage()]
    assert len(off) == 1


def test_fold_counts_rows_bins_and_defaulted_features(tmp_path: Path) -> None:
    version_dir, weights, bias = write_linear_model(tmp_path, "lin", "1", TEST_FEATURES)
    write_reference_profile(version_dir, weights, bias, rows=5000)
    drift = monitor().attach(version_dir, ModelManifest.read(version_dir), TEST_FEATURES)
    assert drift is not None
    rows = draw(np.random.default_rng(1), 4000)
    scores = 1 / (1 + np.exp(-(rows @ weights + bias)))
    probabilities = np.stack([1 - scores, scores], axis=1).astype(np.float32)

    def prepared(defaulted: list[str]) -> Prepared:
        return Prepared(rows[:1], np.ones(8, bool), {}, 0, defaulted=defaulted)

    class Job:
        def __init__(self, p: Prepared | None) -> None:
            self.prepared = p

    half = len(rows) // 2
    jobs_a = [Job(prepared(["f1"] if i % 2 else [])) for i in range(half)]
    drift.observe(rows[:half], {"probabilities": probabilities[:half]}, jobs_a)
    drift.observe(rows[half:], {"probabilities": probabilities[half:]}, [Job(None)])
    drift.fold()
    (vector,) = drift._buckets.values()
    view = drift.window_view(vector, 1)
    assert view.rows == len(rows)
    assert view.defaulted_share["f1"] == pytest.approx(0.25)
    assert view.defaulted_share["f0"] == 0.0
    assert max(c.psi for c in view.columns) < 0.02


class FoldOrder:
    """A real version's batcher, runner and drift counts; records answers and folds."""

    def __init__(self, tmp_path: Path, *, fast_path: bool) -> None:
        version_dir, weights, bias = write_linear_model(tmp_path, "lin", "1", TEST_FEATURES)
        write_reference_profile(version_dir, weights, bias, rows=2000)
        manifest = ModelManifest.read(version_dir)
        drift = monitor().attach(version_dir, manifest, TEST_FEATURES)
        assert drift is not None
        self.drift = drift
        self.events: list[str] = []
        fold = drift.fold

        def recorded_fold() -> None:
            self.events.append(f"fold of {drift.pending_rows} rows")
            fold()

        drift.fold = recorded_fold  # type: ignore[method-assign]
        self.model = load_version(version_dir, RuntimeOptions())
        runner = VersionBatchRunner(
            self.model,
            FeatureLayout.from_manifest(manifest),
            None,
            "degrade",
            on_batch=drift.observe,
        )
        # a probe interval of an hour: after the first request every lone one runs inline
        self.batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
            "lin/1",
            runner.run,
            BatchPolicy(lone_probe_interval_s=3600.0),
            run_now=runner.run_now if fast_path else None,
        )
        self.rng = np.random.default_rng(5)

    async def ask(self, name: str) -> None:
        await self.batcher.submit(Job(rows=draw(self.rng, 1)))
        self.events.append(name)

    async def close(self) -> None:
        await self.batcher.close()
        self.model.close()


async def test_a_fold_runs_after_the_lone_answer_that_fills_the_block(tmp_path: Path) -> None:
    """The idle fast path answers inline; the fold its answer triggers comes after it.
    A lone caller's one-row batches are not folded every PENDING_ROWS (each fold a stall
    of one request) but at LONE_ROWS_CAP, or by the periodic flush before that."""
    order = FoldOrder(tmp_path, fast_path=True)
    try:
        for i in range(LONE_ROWS_CAP):
            await order.ask(f"answer {i}")
            if i == PENDING_ROWS:
                for _ in range(3):
                    await asyncio.sleep(0)
                assert not any(e.startswith("fold") for e in order.events)
        assert order.batcher._next_probe > 0  # lone requests took the fast path
        assert order.events[-1] == f"answer {LONE_ROWS_CAP - 1}"  # not folded before it
        for _ in range(3):
            await asyncio.sleep(0)
        assert order.events[-2:] == [
            f"answer {LONE_ROWS_CAP - 1}",
            f"fold of {LONE_ROWS_CAP} rows",
        ]
        assert [e for e in order.events if e.startswith("fold")] == [
            f"fold of {LONE_ROWS_CAP} rows"
        ]
    finally:
        await order.close()
    assert int(order.drift._buckets[2][-1]) == LONE_ROWS_CAP  # clock 120 s: bucket 2


async def test_a_fold_runs_after_every_caller_of_its_batch_resumed(tmp_path: Path) -> None:
    """A batched answer: the batch's callers all get their result before the fold."""
    order = FoldOrder(tmp_path, fast_path=False)
    try:
        for _ in range(PENDING_ROWS - 10):  # observed outside any answer: no fold yet
            order.drift.observe(draw(order.rng, 1), {"probabilities": np.zeros((1, 2))}, [])
        await asyncio.gather(*(order.ask(f"caller {i}") for i in range(32)))
        for _ in range(3):
            await asyncio.sleep(0)
        # one batch of 32: every caller resumed before its fold
        assert order.events == [f"caller {i}" for i in range(32)] + [
            f"fold of {PENDING_ROWS + 22} rows"
        ]
    finally:
        await order.close()
    assert int(order.drift._buckets[2][-1]) == PENDING_ROWS + 22


@pytest.mark.parametrize(
    ("interval_s", "expected_wait_s"), [(0.02, 0.01), (1.0, FOLD_WAIT_S)], ids=["short", "default"]
)
async def test_the_periodic_flush_waits_for_an_answer_at_most_half_its_interval(
    monkeypatch: pytest.MonkeyPatch, interval_s: float, expected_wait_s: float
) -> None:
    """The periodic flush folds behind the next answer but waits for one at most
    ``FOLD_WAIT_S`` and never more than half its interval (a flat 50 ms outlasted a
    short interval: flushes fell behind it)."""
    drift = DriftMonitor(
        DriftSettings(flush_interval_s=interval_s, grace_s=interval_s),
        Redis(),  # never contacted: flush is replaced
        DriftMetrics(CollectorRegistry()),
        clock=lambda: 120.0,
    )
    waits: list[float] = []
    flushed = asyncio.Event()

    async def record(fold_wait_s: float = 0.0) -> bool:
        waits.append(fold_wait_s)
        flushed.set()
        return True

    monkeypatch.setattr(drift, "flush", record)
    await drift.start()
    await asyncio.wait_for(flushed.wait(), 5.0)
    await drift.stop()  # its final flush passes no wait
    assert waits[0] == pytest.approx(expected_wait_s)
    assert waits[-1] == 0.0
