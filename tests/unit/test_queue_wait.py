"""The queue-wait estimate behind ``max_queue_wait_ms`` and deadline refusals."""

from __future__ import annotations

import pytest

from server.queue_wait import BatchTimes, batches_ahead, expected_wait


def test_batch_times_are_zero_until_a_batch_ran() -> None:
    times = BatchTimes()
    assert (times.high, times.typical, len(times)) == (0.0, 0.0, 0)


def test_high_is_the_quantile_and_typical_the_median() -> None:
    times = BatchTimes(window=10, quantile=0.9)
    for seconds in (0.01, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.1, 0.01, 0.01):
        times.add(seconds)
    assert times.high == 0.1  # 9th of 10 sorted: one outlier above it is ignored
    assert times.typical == 0.01


def test_the_window_forgets_old_batches() -> None:
    times = BatchTimes(window=4, quantile=1.0)
    for seconds in (1.0, 0.02, 0.03, 0.04, 0.05):
        times.add(seconds)
    assert len(times) == 4
    assert times.high == 0.05


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
    assert expected_wait(5, 1, 8, 0.1, 0.03) == pytest.approx(0.07)
    assert expected_wait(8, 1, 8, 0.1, 0.03) == pytest.approx(0.17)
    assert expected_wait(8, 1, 8, 0.1, 0.5) == pytest.approx(0.1)  # overran: no rest left


@pytest.mark.parametrize(("window", "quantile"), [(0, 0.9), (8, 0.4), (8, 1.1)])
def test_bad_parameters_are_refused(window: int, quantile: float) -> None:
    with pytest.raises(ValueError):
        BatchTimes(window=window, quantile=quantile)
