"""Offline quality metrics of scores against 0/1 labels (pure numpy).

The decision is ``score >= threshold`` (a flag, the adverse outcome), as on the
server. Adverse-impact ratio compares the favourable outcome (not flagged)
between segments: a segment's not-flagged rate over the best segment's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int8]


def midranks(values: Floats) -> Floats:
    """1-based ranks of ``values``, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    mid = start + (counts + 1) / 2.0
    return np.asarray(mid[inverse], dtype=np.float64)


def roc_auc(labels: Labels, scores: Floats) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    ranks = midranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width score bin: how many rows, mean score, observed positive rate."""

    lower: float
    upper: float
    count: int
    mean_score: float | None
    positive_rate: float | None


@dataclass(frozen=True)
class Quality:
    """Discrimination and calibration of one version's scores on the holdout."""

    rows: int
    positives: int
    auc: float
    threshold: float
    flagged: int
    precision: float | None
    recall: float
    brier: float
    reliability: tuple[ReliabilityBin, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reliability_bins(labels: Labels, scores: Floats, bins: int = 10) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins over [0, 1]; the last bin includes 1.0."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    score_sums = np.bincount(index, weights=scores, minlength=bins)
    positive_sums = np.bincount(index, weights=labels.astype(np.float64), minlength=bins)
    out = []
    for i in range(bins):
        n = int(counts[i])
        out.append(
            ReliabilityBin(
                lower=float(edges[i]),
                upper=float(edges[i + 1]),
                count=n,
                mean_score=float(score_sums[i] / n) if n else None,
                positive_rate=float(positive_sums[i] / n) if n else None,
            )
        )
    return tuple(out)


def quality(labels: Labels, scores: Floats, threshold: float, bins: int = 10) -> Quality:
    """AUC, precision/recall at ``threshold``, Brier score and reliability bins."""
    flagged = scores >= threshold
    positive = labels == 1
    true_pos = int((flagged & positive).sum())
    n_flagged = int(flagged.sum())
    n_pos = int(positive.sum())
    return Quality(
        rows=int(labels.size),
        positives=n_pos,
        auc=roc_auc(labels, scores),
        threshold=threshold,
        flagged=n_flagged,
        precision=true_pos / n_flagged if n_flagged else None,
        recall=true_pos / n_pos,
        brier=float(np.mean((scores - labels) ** 2)),
        reliability=reliability_bins(labels, scores, bins),
    )


@dataclass(frozen=True)
class SegmentRate:
    """Decision rate of one segment value and its adverse-impact ratio."""

    segment: str
    rows: int
    flagged: int
    decision_rate: float
    adverse_impact_ratio: float | None


def segment_rates(
    segments: npt.NDArray[np.str_], scores: Floats, threshold: float
) -> tuple[SegmentRate, ...]:
    """Per segment value: share flagged, and not-flagged rate / the best segment's."""
    values, inverse = np.unique(segments, return_inverse=True)
    rows = np.bincount(inverse, minlength=values.size)
    flagged = np.bincount(inverse, weights=(scores >= threshold), minlength=values.size)
    rate = flagged / rows
    favourable = 1.0 - rate
    best = float(favourable.max())
    return tuple(
        SegmentRate(
            segment=str(values[i]),
            rows=int(rows[i]),
            flagged=int(flagged[i]),
            decision_rate=float(rate[i]),
            adverse_impact_ratio=float(favourable[i] / best) if best > 0 else None,
        )
        for i in range(values.size)
    )
