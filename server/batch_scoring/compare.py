"""``--compare-version``: how a candidate version differs from the base on the same rows.

The summary is accumulated chunk by chunk (counts only, so memory is constant):

* ``agreement``: share of rows whose decisions (each version at its own manifest
  threshold) are equal;
* ``score_psi``: population stability index of the candidate's scores against the
  base's, over ``bins`` equal-width bins of [0, 1] (scores outside are clipped into the
  end bins); each bin's share is floored at ``1e-6`` so an empty bin stays finite:
  ``sum((q - p) * ln(q / p))``, ``p`` base, ``q`` candidate;
* ``segments``: per value of the ``--segment-by`` column (and ``"(all)"``), rows and
  the positive-decision rate of each version and its change (candidate - base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

__all__ = ["ALL_SEGMENT", "Comparison"]

ALL_SEGMENT: Final = "(all)"
_FLOOR: Final = 1e-6


@dataclass
class _Segment:
    rows: int = 0
    base_positive: int = 0
    candidate_positive: int = 0


@dataclass
class Comparison:
    """Running comparison of base vs candidate scores and decisions."""

    base_version: str
    candidate_version: str
    segment_by: str | None = None
    bins: int = 10
    rows: int = 0
    agreed: int = 0
    base_hist: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    candidate_hist: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    segments: dict[str, _Segment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base_hist = np.zeros(self.bins, np.int64)
        self.candidate_hist = np.zeros(self.bins, np.int64)

    def _bin(self, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        index = np.floor(np.asarray(scores, np.float64) * self.bins).astype(np.int64)
        return np.bincount(np.clip(index, 0, self.bins - 1), minlength=self.bins)

    def add(self, out: pa.Table) -> None:
        """Fold one output chunk (``score``/``decision``/``compare_*`` columns)."""
        base = out.column("score").to_numpy()
        cand = out.column("compare_score").to_numpy()
        d_base = out.column("decision").to_numpy(zero_copy_only=False).astype(bool)
        d_cand = out.column("compare_decision").to_numpy(zero_copy_only=False).astype(bool)
        self.rows += len(base)
        self.agreed += int((d_base == d_cand).sum())
        self.base_hist += self._bin(base)
        self.candidate_hist += self._bin(cand)
        keys: list[str] = [ALL_SEGMENT] * len(base)
        self._fold(keys, d_base, d_cand)
        if self.segment_by is not None:
            values = [str(v) for v in out.column(self.segment_by).to_pylist()]
            self._fold(values, d_base, d_cand)

    def _fold(
        self, keys: list[str], d_base: npt.NDArray[np.bool_], d_cand: npt.NDArray[np.bool_]
    ) -> None:
        unique, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        rows = np.bincount(inverse, minlength=len(unique))
        pos_b = np.bincount(inverse, weights=d_base, minlength=len(unique))
        pos_c = np.bincount(inverse, weights=d_cand, minlength=len(unique))
        for k, key in enumerate(unique.tolist()):
            seg = self.segments.setdefault(str(key), _Segment())
            seg.rows += int(rows[k])
            seg.base_positive += int(pos_b[k])
            seg.candidate_positive += int(pos_c[k])

    def psi(self) -> float:
        """PSI of the candidate's score distribution against the base's."""
        if self.rows == 0:
            return 0.0
        p = np.maximum(self.base_hist / self.rows, _FLOOR)
        q = np.maximum(self.candidate_hist / self.rows, _FLOOR)
        return float(np.sum((q - p) * np.log(q / p)))

    def summary(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        segments = {}
        for key in sorted(self.segments, key=lambda k: (k != ALL_SEGMENT, k)):
            seg = self.segments[key]
            base_rate = seg.base_positive / seg.rows if seg.rows else math.nan
            cand_rate = seg.candidate_positive / seg.rows if seg.rows else math.nan
            segments[key] = {
                "rows": seg.rows,
                "base_decision_rate": base_rate,
                "candidate_decision_rate": cand_rate,
                "decision_rate_change": cand_rate - base_rate,
            }
        return {
            "base_version": self.base_version,
            "candidate_version": self.candidate_version,
            "rows": self.rows,
            "agreement": self.agreed / self.rows if self.rows else math.nan,
            "score_psi": self.psi(),
            "psi_bins": self.bins,
            "segment_by": self.segment_by,
            "segments": segments,
        }
