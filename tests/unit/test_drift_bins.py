"""Reference bins and drift statistics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.drift.bins import BinLayout, compare, jensen_shannon, psi
from server.governance.profile import SCORE, Distribution, ReferenceProfile


def profile(**columns: Distribution) -> ReferenceProfile:
    distributions = {
        **columns,
        SCORE: Distribution(edges=(0.5,), frequencies=(0.5, 0.5), nan_share=0.0),
    }
    return ReferenceProfile(
        model="m",
        version="1",
        artifact_sha256="0" * 64,
        rows=4,
        source="t",
        distributions=distributions,
    )


def test_fold_counts_bins_nan_and_categories_in_one_vector() -> None:
    layout = BinLayout.compile(
        profile(
            a=Distribution(edges=(1.0, 2.0), frequencies=(0.25, 0.5, 0.25), nan_share=0.0),
            c=Distribution(
                edges=(0.0,),
                frequencies=(0.5, 0.5),
                nan_share=0.0,
                categories={"0": 0.5, "3": 0.5},
            ),
        ),
        ["a", "unprofiled", "c"],
    )
    matrix = np.array(
        [[0.5, 9, 0], [1.0, 9, 3], [1.5, 9, 3], [9.0, 9, 7], [np.nan, 9, np.nan]], np.float32
    )
    counts = layout.fold(matrix, np.array([0.1, 0.2, 0.9, 0.9, 0.9]))
    a, c, score = layout.columns
    assert a.column == 0 and c.column == 2 and score.column == -1
    # a: x <= 1 -> bin 0 (0.5, 1.0), 1 < x <= 2 -> bin 1, > 2 -> bin 2, NaN slot
    assert counts[a.start : a.nan_slot + 1].tolist() == [2, 1, 1, 1]
    # c: categories 0, 3, other (7); NaN counted only in the NaN slot
    assert counts[c.category_start : c.category_start + 3].tolist() == [1, 2, 1]
    assert counts[c.nan_slot] == 1
    assert counts[score.start : score.nan_slot + 1].tolist() == [2, 3, 0]
    drift = {d.name: d for d in compare(layout, counts)}
    assert drift["a"].nan_share == pytest.approx(0.2) and drift["a"].rows == 5
    assert drift["c"].js is not None and drift["a"].js is None


def test_psi_matches_the_formula_and_is_zero_on_the_reference() -> None:
    reference = np.array([0.5, 0.5])
    assert psi(reference, np.array([50, 50])) == 0.0
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(reference, np.array([80, 20])) == pytest.approx(expected)
    assert psi(reference, np.array([0, 0])) == 0.0


def test_jensen_shannon_is_bounded_by_one() -> None:
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0, 10])) == pytest.approx(1.0)
    assert jensen_shannon(np.array([0.5, 0.5]), np.array([5, 5])) == pytest.approx(0.0)


def test_profile_without_score_is_refused() -> None:
    bad = ReferenceProfile(
        model="m", version="1", artifact_sha256="0" * 64, rows=1, source="t", distributions={}
    )
    with pytest.raises(ValueError, match="score"):
        BinLayout.compile(bad, ["a"])
