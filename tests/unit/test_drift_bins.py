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


def reference_fold(layout: BinLayout, matrix: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Column by column, the plain way: searchsorted per column, categories by lookup."""
    counts = np.zeros(layout.size, np.int64)
    for bins in layout.columns:
        values = (scores if bins.column < 0 else matrix[:, bins.column]).astype(np.float64)
        for value in values:
            if np.isnan(value):
                counts[bins.nan_slot] += 1
                continue
            counts[bins.start + int(np.searchsorted(bins.edges, value, side="left"))] += 1
            if bins.categories is not None:
                hits = np.flatnonzero(bins.categories == value)
                offset = int(hits[0]) if hits.size else bins.categories.size
                counts[bins.category_start + offset] += 1
    return counts


def test_vectorised_fold_equals_the_column_by_column_fold() -> None:
    rng = np.random.default_rng(5)
    edges = {
        "wide": Distribution(
            edges=tuple(np.sort(rng.normal(size=9))), frequencies=(0.1,) * 10, nan_share=0.0
        ),
        "one": Distribution(edges=(0.0,), frequencies=(0.5, 0.5), nan_share=0.0),
        "none": Distribution(edges=(), frequencies=(1.0,), nan_share=0.0),
        "coded": Distribution(
            edges=(1.0, 2.0),
            frequencies=(0.3, 0.3, 0.4),
            nan_share=0.0,
            categories={"0": 0.3, "1": 0.3, "2": 0.2, "5": 0.1, "0.1": 0.1},
        ),
        "pair": Distribution(
            edges=(0.0,), frequencies=(0.5, 0.5), nan_share=0.0, categories={"0": 0.5, "1": 0.5}
        ),
    }
    names = ["wide", "skip", "one", "none", "coded", "pair"]
    layout = BinLayout.compile(profile(**edges), names)
    matrix = rng.normal(size=(3000, len(names)))
    matrix[:, 4] = rng.choice([0.0, 1.0, 2.0, 3.0, 5.0], size=3000)
    matrix[:, 5] = rng.choice([0.0, 1.0, 7.0], size=3000)
    matrix[rng.random(matrix.shape) < 0.05] = np.nan
    matrix[:50, 2] = 0.0  # exactly on an edge
    matrix[50:60, 2] = -0.0
    matrix[60:63, 4] = np.array([-0.0, 0.1, np.float32(0.1)])  # 0.1: no float32 (no category)
    near = np.float32(edges["wide"].edges[3])  # float32 values around a float64 edge
    matrix[63:66, 0] = np.array(
        [np.nextafter(near, np.float32(-9)), near, np.nextafter(near, np.float32(9))]
    )
    matrix[70:80, :] = np.inf
    matrix[80:90, :] = -np.inf
    scores = rng.random(3000).astype(np.float32)
    scores[:10] = np.nan
    matrix32 = matrix.astype(np.float32)
    assert np.array_equal(layout.fold(matrix32, scores), reference_fold(layout, matrix32, scores))


def column_by_column(layout: BinLayout, counts: np.ndarray) -> list[tuple[float, float | None]]:
    """PSI and JS of every column through the scalar formulas (what ``compare`` vectorises)."""
    out: list[tuple[float, float | None]] = []
    for bins in layout.columns:
        js = None
        if bins.categories is not None and bins.category_reference is not None:
            live = counts[bins.category_start : bins.category_start + bins.categories.size + 1]
            js = jensen_shannon(bins.category_reference, live)
        out.append((psi(bins.reference, counts[bins.start : bins.start + bins.bins]), js))
    return out


@pytest.mark.parametrize("empty", ["", "coded", "wide"])
def test_vectorised_compare_equals_the_scalar_formulas(empty: str) -> None:
    """One pass for all columns gives each column's :func:`psi` / :func:`jensen_shannon`,
    including a column with no live rows (0, not NaN) and zero reference shares."""
    rng = np.random.default_rng(9)
    distributions = {
        "wide": Distribution(
            edges=tuple(np.sort(rng.normal(size=9))),
            frequencies=(0.0, 0.2, *(0.1,) * 6, 0.2, 0.0),
            nan_share=0.0,
        ),
        "none": Distribution(edges=(), frequencies=(1.0,), nan_share=0.0),
        "coded": Distribution(
            edges=(1.0, 2.0),
            frequencies=(0.3, 0.3, 0.4),
            nan_share=0.0,
            categories={"0": 0.3, "1": 0.3, "2": 0.2, "5": 0.0},
        ),
        "pair": Distribution(
            edges=(0.0,), frequencies=(0.5, 0.5), nan_share=0.0, categories={"0": 0.5, "1": 0.5}
        ),
    }
    layout = BinLayout.compile(profile(**distributions), ["wide", "none", "coded", "pair"])
    counts = rng.integers(0, 500, size=layout.size).astype(np.int64)
    counts[rng.random(layout.size) < 0.2] = 0
    if empty:
        (bins,) = [b for b in layout.columns if b.name == empty]
        counts[bins.start : bins.nan_slot + 1] = 0
        if bins.categories is not None:
            counts[bins.category_start : bins.category_start + bins.categories.size + 1] = 0
    drift = compare(layout, counts)
    expected = column_by_column(layout, counts)
    assert [d.name for d in drift] == ["wide", "none", "coded", "pair", SCORE]
    for column, (want_psi, want_js) in zip(drift, expected, strict=True):
        assert column.psi == pytest.approx(want_psi, rel=1e-12, abs=1e-15), column.name
        if want_js is None:
            assert column.js is None
        else:
            assert column.js == pytest.approx(want_js, rel=1e-12, abs=1e-15), column.name
        if column.name == empty:
            assert column.psi == 0.0 and column.rows == 0 and column.nan_share == 0.0
    assert any(d.psi > 0.01 for d in drift) and any(d.js for d in drift)
