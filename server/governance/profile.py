"""The reference profile a served version is monitored against.

Per feature and for the score: the holdout distribution as quantile bins —
sorted inner ``edges`` and the share of rows in each of ``len(edges) + 1`` bins,
bin ``i`` holding ``edges[i-1] < x <= edges[i]`` (``bin_index``; the monitor folds
live values with the same function) — plus the share of NaN values. A feature
with few distinct values (<= ``max_categories``) also gets its category
frequencies, for a Jensen-Shannon comparison.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

PROFILE_FILE = "reference_profile.json"
SCORE = "__score__"
"""Key of the score's distribution in ``ReferenceProfile.distributions``."""


class Distribution(BaseModel):
    """One column's reference distribution."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edges: tuple[float, ...] = Field(description="Sorted inner bin edges.")
    frequencies: tuple[float, ...] = Field(description="Share of non-NaN rows per bin.")
    nan_share: float = Field(ge=0.0, le=1.0)
    categories: dict[str, float] | None = Field(
        default=None, description="Value -> share of non-NaN rows, for low-cardinality columns."
    )


class ReferenceProfile(BaseModel):
    """Reference distributions of one model version's features and score."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    version: str
    artifact_sha256: str
    rows: int
    source: str = Field(description="Where the rows came from (the holdout file).")
    distributions: dict[str, Distribution]

    def write(self, version_dir: Path) -> Path:
        path = version_dir / PROFILE_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, version_dir: Path) -> ReferenceProfile:
        return cls.model_validate(json.loads((version_dir / PROFILE_FILE).read_text()))


def bin_index(
    values: npt.NDArray[np.floating[Any]], edges: Sequence[float] | npt.NDArray[np.float64]
) -> npt.NDArray[Any]:
    """Bin of each value for inner ``edges``, vectorised (drop NaN first: it sorts last)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")


def distribution(
    values: npt.NDArray[np.float64], bins: int = 10, max_categories: int = 20
) -> Distribution:
    """Quantile bins (deduplicated edges for tied quantiles) and, if few, categories."""
    finite = values[~np.isnan(values)]
    nan_share = float(1.0 - finite.size / values.size) if values.size else 0.0
    if finite.size == 0:
        return Distribution(edges=(), frequencies=(1.0,), nan_share=nan_share)
    quantiles = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="lower")
    edges = np.unique(quantiles)
    counts = np.bincount(bin_index(finite, edges), minlength=edges.size + 1)
    categories = None
    distinct, distinct_counts = np.unique(finite, return_counts=True)
    if distinct.size <= max_categories:
        categories = {
            _category(v): float(c / finite.size)
            for v, c in zip(distinct, distinct_counts, strict=True)
        }
    return Distribution(
        edges=tuple(float(e) for e in edges),
        frequencies=tuple(float(c / finite.size) for c in counts),
        nan_share=nan_share,
        categories=categories,
    )


def _category(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def build_profile(
    *,
    model: str,
    version: str,
    artifact_sha256: str,
    source: str,
    columns: Mapping[str, npt.NDArray[np.float64]],
    scores: npt.NDArray[np.float64],
    bins: int = 10,
) -> ReferenceProfile:
    """Profile every column of ``columns`` and the score."""
    distributions = {name: distribution(values, bins) for name, values in columns.items()}
    distributions[SCORE] = distribution(scores, bins, max_categories=0)
    return ReferenceProfile(
        model=model,
        version=version,
        artifact_sha256=artifact_sha256,
        rows=int(scores.size),
        source=source,
        distributions=distributions,
    )
