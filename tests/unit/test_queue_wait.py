"""The queue-wait estimate behind ``max_queue_wait_ms`` and deadline refusals."""

from __future__ import annotations

import math
import random

import pytest

from server.queue_wait import BatchTimes, Quantiles, batches_ahead, expected_wait


def test_batch_times_are_zero_until_a_batch_ran() -> None:
    times = BatchTimes(8)
    assert (times.of(1), times.full, len(times)) == (Quantiles(), Quantiles(), 0)


def test_high_is_the_quantile_and_typical_the_median() -> None:
    times = BatchTimes(1, window=10, quantile=0.9)
    for seconds in (0.01, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.1, 0.01, 0.01):
        times.add(seconds, 1)
    # 9th of 10 sorted: one outlier above it is ignored
    assert times.of(1) == Quantiles(high=0.1, typical=0.01)


def test_the_window_forgets_old_batches() -> None:
    times = BatchTimes(1, window=4, quantile=1.0)
    for seconds in (1.0, 0.02, 0.03, 0.04, 0.05):
        times.add(seconds, 1)
    assert len(times) == 4
    assert times.of(1).high == 0.05


def test_full_batches_are_timed_apart_and_kept_through_light_load() -> None:
    times = BatchTimes(8, window=4, quantile=1.0)
    assert times.full == times.of(1)  # no full batch yet: all batches stand in
    times.add(0.08, 8)
    times.add(0.06, 6)  # 6 of 8 rows: full (>= 75%)
    for _ in range(10):  # light load: small batches push the full ones out of "all"
        times.add(0.01, 2)
    assert times.of(2) == Quantiles(high=0.01, typical=0.01)
    assert times.full == Quantiles(high=0.08, typical=0.06)
    assert times.of(7) == times.full


@pytest.mark.parametrize(
    ("queued", "rows", "ahead"),
    [(0, 1, 0), (7, 1, 0), (8, 1, 1), (6, 2, 0), (7, 2, 1), (15, 1, 1), (16, 8, 2)],
)
def test_batches_ahead_counts_only_full_batches_before_the_jobs_own(
    queued: int, rows: int, ahead: int
) -> None:
    assert batches_ahead(queued, rows, 8) == ahead


def test_expected_wait_is_the_rest_of_the_running_batch_plus_full_batches_ahead() -> None:
    assert expected_wait(0, 1, 8, 0.1, None) == 0.0  # idle: runs at once
    assert expected_wait(5, 1, 8, 0.1, None) == 0.0  # joins the batch being gathered
    assert expected_wait(5, 1, 8, 0.1, (0.1, 0.03)) == pytest.approx(0.07)
    assert expected_wait(8, 1, 8, 0.1, (0.1, 0.03)) == pytest.approx(0.17)
    assert expected_wait(8, 1, 8, 0.1, (0.1, 0.5)) == pytest.approx(0.1)  # overran
    assert expected_wait(8, 1, 8, 0.1, (0.02, 0.0)) == pytest.approx(0.12)  # small one runs


@pytest.mark.parametrize(
    ("size", "window", "quantile"), [(0, 8, 0.9), (8, 0, 0.9), (8, 8, 0.4), (8, 8, 1.1)]
)
def test_bad_parameters_are_refused(size: int, window: int, quantile: float) -> None:
    with pytest.raises(ValueError):
        BatchTimes(size, window=window, quantile=quantile)


def test_skip_first_leaves_the_cold_batch_out() -> None:
    """The batcher's first batch (one-time costs) is not recorded; later ones are."""
    times = BatchTimes(4, skip_first=True)
    times.add(0.5, 4)  # cold: 10x the others
    assert len(times) == 0 and times.full == Quantiles()
    times.add(0.05, 4)
    assert len(times) == 1 and times.full.high == 0.05


def test_quantiles_match_a_sort_of_the_window_as_values_come_and_go() -> None:
    rng = random.Random(7)
    window, quantile = 8, 0.9
    times = BatchTimes(64, window=window, quantile=quantile)
    seen: list[float] = []
    for _ in range(200):
        value = rng.choice([0.0, 0.001, 0.002, rng.random() / 100, -0.5])  # repeats, clipped
        times.add(value, 1)
        seen.append(max(0.0, value))
        ordered = sorted(seen[-window:])
        assert times.of(1) == Quantiles(
            high=ordered[math.ceil(quantile * len(ordered)) - 1],
            typical=ordered[(len(ordered) - 1) // 2],
        )
    assert len(times) == window
