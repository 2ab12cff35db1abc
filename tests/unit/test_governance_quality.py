"""Validation metrics and the reference profile against hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest

from server.governance.profile import SCORE, bin_index, build_profile, distribution
from server.governance.quality import midranks, quality, roc_auc, segment_rates

# positives score {0.35, 0.8, 0.9}, negatives {0.1, 0.4, 0.8}
LABELS = np.array([0, 0, 1, 1, 0, 1], dtype=np.int8)
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])


def test_auc_counts_ties_as_half() -> None:
    # pairs won by the positive: 0.35 beats 0.1 (1); 0.8 beats 0.1, 0.4, ties 0.8 (2.5);
    # 0.9 beats all three (3): 6.5 of 9 pairs
    assert roc_auc(LABELS, SCORES) == pytest.approx(6.5 / 9)
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(3, dtype=np.int8), SCORES[:3])


def test_precision_recall_brier_and_reliability() -> None:
    q = quality(LABELS, SCORES, threshold=0.5, bins=2)
    # flagged (>= 0.5): 0.8 (pos), 0.8 (neg), 0.9 (pos)
    assert (q.flagged, q.positives, q.rows) == (3, 3, 6)
    assert q.precision == pytest.approx(2 / 3)
    assert q.recall == pytest.approx(2 / 3)
    # (0.01 + 0.16 + 0.4225 + 0.04 + 0.64 + 0.01) / 6
    assert q.brier == pytest.approx(1.2825 / 6)
    low, high = q.reliability
    assert (low.lower, low.upper, low.count) == (0.0, 0.5, 3)
    assert low.mean_score == pytest.approx(0.85 / 3)
    assert low.positive_rate == pytest.approx(1 / 3)
    assert high.count == 3
    assert high.mean_score == pytest.approx(2.5 / 3)
    assert high.positive_rate == pytest.approx(2 / 3)


def test_threshold_is_inclusive_and_precision_undefined_without_flags() -> None:
    q = quality(LABELS, SCORES, threshold=0.9)
    assert q.flagged == 1 and q.precision == 1.0
    assert quality(LABELS, SCORES, threshold=0.95).precision is None


def test_segment_decision_rates_and_adverse_impact() -> None:
    segments = np.array(["A", "B", "A", "B", "A", "B"])
    a, b = segment_rates(segments, SCORES, threshold=0.5)
    # A: 0.1, 0.35, 0.8 -> 1 of 3 flagged; B: 0.4, 0.8, 0.9 -> 2 of 3
    assert (a.segment, a.rows, a.flagged) == ("A", 3, 1)
    assert a.decision_rate == pytest.approx(1 / 3) and a.adverse_impact_ratio == 1.0
    # B's not-flagged rate 1/3 over A's 2/3
    assert b.decision_rate == pytest.approx(2 / 3)
    assert b.adverse_impact_ratio == pytest.approx(0.5)


def test_quantile_profile_of_one_to_ten() -> None:
    values = np.array([*range(1, 11), np.nan], dtype=np.float64)
    d = distribution(values, bins=5)
    assert d.edges == (2.0, 4.0, 6.0, 8.0)
    assert d.frequencies == pytest.approx((0.2,) * 5)
    assert d.nan_share == pytest.approx(1 / 11)
    assert d.categories is not None
    assert d.categories == pytest.approx({str(v): 0.1 for v in range(1, 11)})
    # bin i holds edges[i-1] < x <= edges[i]
    assert bin_index(np.array([2.0, 2.5, 8.0, 9.0]), d.edges).tolist() == [0, 1, 3, 4]


def test_profile_ties_share_edges_and_score_has_no_categories() -> None:
    values = np.array([0.0] * 8 + [1.0, 2.0])
    d = distribution(values, bins=10)
    assert d.edges == (0.0, 1.0)  # nine tied deciles collapse
    assert d.frequencies == pytest.approx((0.8, 0.1, 0.1))
    profile = build_profile(
        model="m",
        version="1",
        artifact_sha256="0" * 64,
        source="h.csv",
        columns={"x": values},
        scores=np.linspace(0.0, 1.0, 10),
    )
    assert set(profile.distributions) == {"x", SCORE}
    assert profile.distributions[SCORE].categories is None
    assert sum(profile.distributions[SCORE].frequencies) == pytest.approx(1.0)
