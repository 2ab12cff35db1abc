"""Reason codes: attributions summed per reason, top N toward the adverse outcome.

A :class:`ReasonCatalogue` maps every model feature to a reason code and its
plain-language text; correlated features may share a code, and their contributions
are summed. :meth:`ReasonCatalogue.top` ranks, for a whole batch at once, the reasons
with a positive summed contribution (pushing the score toward the adverse outcome,
e.g. fraud or decline), largest first.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DEFAULT_TOP_N: Final = 4


class ReasonSpec(BaseModel):
    """One reason: its code, its text and the features behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    text: str = Field(min_length=1)
    features: tuple[str, ...] = Field(min_length=1)


@dataclass(frozen=True)
class FeatureValue:
    """A feature behind a reason, its value in the row and its own contribution."""

    name: str
    value: float
    contribution: float


@dataclass(frozen=True)
class Reason:
    """A principal reason for one decision."""

    code: str
    text: str
    contribution: float
    """Summed contribution of its features to the margin (> 0: toward adverse)."""
    features: tuple[FeatureValue, ...]


@dataclass(frozen=True)
class RankedReasons:
    """A batch's top reasons as arrays (no Python objects per row)."""

    index: I64
    """``[R, N]`` reason index into the catalogue, by decreasing contribution."""
    contribution: F64
    """``[R, N]`` summed contributions (NaN where fewer than N reasons push up)."""


@dataclass(frozen=True, eq=False)
class ReasonCatalogue:
    """Reasons over a model's ordered features (every feature in exactly one reason)."""

    reasons: tuple[ReasonSpec, ...]
    features: tuple[str, ...]
    membership: F64
    """``[F, K]``: 1 where feature f belongs to reason k."""

    @classmethod
    def build(cls, reasons: Sequence[ReasonSpec], features: Sequence[str]) -> ReasonCatalogue:
        """Check the reasons cover ``features`` exactly once; raises ``ValueError``."""
        codes = [r.code for r in reasons]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"reason codes listed twice: {dupes}")
        column = {f: i for i, f in enumerate(features)}
        membership = np.zeros((len(features), len(reasons)), dtype=np.float64)
        for k, reason in enumerate(reasons):
            unknown = [f for f in reason.features if f not in column]
            if unknown:
                raise ValueError(f"reason {reason.code}: unknown features {unknown}")
            for name in reason.features:
                if membership[column[name]].any():
                    raise ValueError(f"feature {name!r} is in more than one reason")
                membership[column[name], k] = 1.0
        missing = [f for f, row in zip(features, membership, strict=True) if not row.any()]
        if missing:
            raise ValueError(f"features without a reason code: {missing}")
        return cls(tuple(reasons), tuple(features), membership)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Mapping[str, Any]], features: Sequence[str]
    ) -> ReasonCatalogue:
        """From ``{code: {text: ..., features: [...]}}`` (YAML or manifest form)."""
        reasons = [ReasonSpec(code=code, **dict(body)) for code, body in data.items()]
        return cls.build(reasons, features)

    def summed(self, values: F64) -> F64:
        """``[R, K]`` contributions summed per reason, each reason's features added left
        to right in its own order (as :meth:`top` adds them per row: the same floats)."""
        values = np.asarray(values, dtype=np.float64)
        out = np.empty((values.shape[0], len(self.reasons)), dtype=np.float64)
        for k, columns in enumerate(self._columns):
            out[:, k] = values[:, columns[0]]
            for c in columns[1:]:
                out[:, k] += values[:, c]
        return out

    def rank(self, values: F64, top_n: int = DEFAULT_TOP_N) -> RankedReasons:
        """The ``top_n`` reasons with the largest positive summed contribution, per row."""
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        summed = self.summed(values)
        n = min(top_n, summed.shape[1])
        # stable: equal contributions keep catalogue order
        index = np.argsort(-summed, axis=1, kind="stable")[:, :n]
        contribution = np.take_along_axis(summed, index, axis=1)
        contribution = np.where(contribution > 0.0, contribution, np.nan)
        return RankedReasons(index.astype(np.int64), contribution)

    def top(
        self, values: F64, x: npt.NDArray[np.floating[Any]], top_n: int = DEFAULT_TOP_N
    ) -> list[list[Reason]]:
        """Per row of ``x``, up to ``top_n`` reasons toward the adverse outcome, with the
        values and contributions of their features.

        The same ranking as :meth:`rank` (the same sums, added in the same order, and a
        stable sort), done per row on Python floats: for the one or few rows an answer
        explains, numpy calls on arrays of ~30 values cost more than the work, and
        several times more when the explanation is the first thing in tens of
        milliseconds to run them (their code and data out of the caches)."""
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        rows = np.asarray(values, dtype=np.float64).tolist()
        inputs = np.asarray(x).tolist()
        columns = self._columns
        out: list[list[Reason]] = []
        for row, seen in zip(rows, inputs, strict=True):
            sums = []
            for features in columns:
                total = row[features[0]]
                for c in features[1:]:
                    total += row[c]
                sums.append(total)
            # stable: equal contributions keep catalogue order (as rank's argsort)
            order = sorted(range(len(sums)), key=lambda k: -sums[k])[:top_n]
            reasons = []
            for k in order:
                total = sums[k]
                if not total > 0.0:
                    break
                spec = self.reasons[k]
                behind = tuple(
                    FeatureValue(name, float(seen[c]), float(row[c]))
                    for name, c in zip(spec.features, columns[k], strict=True)
                )
                reasons.append(Reason(spec.code, spec.text, total, behind))
            out.append(reasons)
        return out

    @functools.cached_property
    def _columns(self) -> tuple[tuple[int, ...], ...]:
        """Per reason, the columns of its features (in the reason's order)."""
        column = {f: i for i, f in enumerate(self.features)}
        return tuple(tuple(column[name] for name in r.features) for r in self.reasons)
