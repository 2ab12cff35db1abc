"""Reference bins of one version and the vectorised fold of live rows into them (pure).

A :class:`BinLayout` is compiled once per version from its reference profile: every
monitored column (the features with a distribution, then the score) owns a slice of
one flat count vector — its quantile bins (``len(edges) + 1``), one slot for NaN and,
for a categorical column, one slot per reference category plus one for any other
value. :meth:`BinLayout.fold_values` turns a block of monitored values (``[rows, C]``
float32: the monitored feature columns, then the score) into that vector with one
search for all columns (:mod:`server.drift.search`) and one ``np.bincount``: no
per-row and no per-column Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from server.drift.search import ColumnSearch
from server.governance.profile import SCORE, Distribution, ReferenceProfile

Counts = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ColumnBins:
    """Where one monitored column's slots sit in the flat count vector."""

    name: str
    column: int
    """Matrix column of the feature; -1 for the score."""
    edges: npt.NDArray[np.float64]
    start: int
    """First quantile-bin slot; then ``len(edges) + 1`` bins, then the NaN slot."""
    reference: npt.NDArray[np.float64]
    """Reference share per quantile bin (non-NaN rows)."""
    categories: npt.NDArray[np.float64] | None = None
    """Sorted reference category values, for a categorical column."""
    category_start: int = 0
    """First category slot (one per category, then one for any other value)."""
    category_reference: npt.NDArray[np.float64] | None = None

    @property
    def bins(self) -> int:
        return int(self.edges.size) + 1

    @property
    def nan_slot(self) -> int:
        return self.start + self.bins


@dataclass(frozen=True, slots=True)
class BinLayout:
    """Compiled reference bins of one version: the features it monitors and the score."""

    features: tuple[ColumnBins, ...]
    score: ColumnBins
    size: int
    width: int
    """Input columns of the version (the matrix width it folds)."""
    sources: npt.NDArray[np.intp]
    """Matrix column of each monitored feature, in order."""
    search: ColumnSearch

    @classmethod
    def compile(cls, profile: ReferenceProfile, feature_names: Sequence[str]) -> BinLayout:
        """Bins of every input feature that has a reference distribution, and the score.

        ``ValueError`` when the profile has no score distribution.
        """
        if SCORE not in profile.distributions:
            raise ValueError("reference profile has no score distribution")
        offset = 0
        features: list[ColumnBins] = []
        for column, name in enumerate(feature_names):
            dist = profile.distributions.get(name)
            if dist is None:
                continue
            bins, offset = _column(name, column, dist, offset)
            features.append(bins)
        score, offset = _column(SCORE, -1, profile.distributions[SCORE], offset)
        sources = np.array([b.column for b in features], np.intp)
        search = ColumnSearch.compile(
            [c.edges for c in (*features, score)],
            [c.start for c in (*features, score)],
            [c.nan_slot for c in (*features, score)],
            [
                None if c.categories is None else (c.categories, c.category_start)
                for c in (*features, score)
            ],
        )
        return cls(tuple(features), score, offset, len(feature_names), sources, search)

    @property
    def columns(self) -> tuple[ColumnBins, ...]:
        """Every monitored column, the score last."""
        return (*self.features, self.score)

    def empty(self) -> Counts:
        """A zero count vector."""
        return np.zeros(self.size, np.int64)

    def fold(
        self, matrix: npt.NDArray[np.floating[Any]], scores: npt.NDArray[np.floating[Any]]
    ) -> Counts:
        """Counts of ``matrix`` ([rows, width]) and ``scores`` ([rows]) in every slot."""
        if matrix.ndim != 2 or matrix.shape[1] != self.width:
            raise ValueError(f"matrix shape {matrix.shape} does not have {self.width} columns")
        if scores.shape[0] != matrix.shape[0]:
            raise ValueError(f"{scores.shape[0]} scores for {matrix.shape[0]} rows")
        values = np.empty((matrix.shape[0], len(self.features) + 1), np.float32)
        values[:, :-1] = matrix[:, self.sources]
        values[:, -1] = scores
        return self.fold_values(values)

    def fold_values(self, values: npt.NDArray[np.float32]) -> Counts:
        """Counts of monitored ``values`` ([rows, C] float32: the features' columns, then
        the score) in every slot: one search for all columns, one ``np.bincount``."""
        slots = self.search.slots(values)
        return np.bincount(slots, minlength=self.size).astype(np.int64, copy=False)


def _column(name: str, column: int, dist: Distribution, offset: int) -> tuple[ColumnBins, int]:
    edges = np.asarray(dist.edges, np.float64)
    start = offset
    offset += edges.size + 2  # bins + NaN
    reference = np.asarray(dist.frequencies, np.float64)
    if reference.size != edges.size + 1:
        raise ValueError(f"{name}: {reference.size} frequencies for {edges.size} edges")
    if not dist.categories:
        return ColumnBins(name, column, edges, start, reference), offset
    pairs = sorted((float(value), share) for value, share in dist.categories.items())
    values = np.array([v for v, _ in pairs], np.float64)
    shares = np.array([s for _, s in pairs] + [0.0], np.float64)
    category_start = offset
    offset += values.size + 1
    return (
        ColumnBins(name, column, edges, start, reference, values, category_start, shares),
        offset,
    )


def psi(
    reference: npt.NDArray[np.float64], counts: npt.NDArray[np.int64], epsilon: float = 1e-4
) -> float:
    """Population stability index of live ``counts`` against ``reference`` shares.

    Both sides are floored at ``epsilon`` (an empty bin would make it infinite);
    0.0 without live rows.
    """
    total = int(counts.sum())
    if total == 0:
        return 0.0
    expected = np.maximum(reference, epsilon)
    actual = np.maximum(counts / total, epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def jensen_shannon(reference: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of live ``counts`` vs ``reference``."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    p = reference / max(float(reference.sum()), 1e-12)
    q = counts / total
    m = 0.5 * (p + q)
    return float(0.5 * _kl(p, m) + 0.5 * _kl(q, m))


def _kl(p: npt.NDArray[np.float64], m: npt.NDArray[np.float64]) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))


@dataclass(frozen=True, slots=True)
class ColumnDrift:
    """One column's comparison over a window."""

    name: str
    psi: float
    js: float | None
    """Jensen-Shannon over categories, for a categorical column."""
    nan_share: float
    rows: int


def compare(layout: BinLayout, counts: Counts) -> tuple[ColumnDrift, ...]:
    """PSI (and JS for categorical columns) of every monitored column, the score last."""
    out: list[ColumnDrift] = []
    for bins in layout.columns:
        binned = counts[bins.start : bins.start + bins.bins]
        nan = int(counts[bins.nan_slot])
        rows = int(binned.sum()) + nan
        js = None
        if bins.categories is not None and bins.category_reference is not None:
            live = counts[bins.category_start : bins.category_start + bins.categories.size + 1]
            js = jensen_shannon(bins.category_reference, live)
        nan_share = nan / rows if rows else 0.0
        out.append(ColumnDrift(bins.name, psi(bins.reference, binned), js, nan_share, rows))
    return tuple(out)
