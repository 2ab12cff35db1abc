"""Drift monitor without Redis I/O: attach rules and the per-process fold."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.drift.metrics import DriftMetrics
from server.drift.monitor import DriftMonitor
from server.features import Prepared
from server.manifest import ModelManifest
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
