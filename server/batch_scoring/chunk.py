"""One chunk of a spine, scored: the unit of work of every engine.

:func:`score_chunk` takes a checked spine chunk (see :mod:`.spine`), computes the
features (:mod:`.features` or :mod:`.online`), runs every version asked for and
returns the output rows: the key columns, ``score`` and ``decision`` (plus
``<version>:score``/``decision`` columns per compared version), the model version and
sha256, optionally the features and the reasons. The local engine's worker
processes and the Spark engine's ``mapInPandas`` both call it, so the engines cannot
compute different things.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.batch_scoring.features import PointInTimeFeatures, feature_matrix
from server.batch_scoring.online import OnlineFeatures
from server.batch_scoring.scoring import ModelRef, ScoringModel

__all__ = ["REASONS_TOP_N", "ChunkJob", "score_chunk"]

REASONS_TOP_N: Final = 3


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs to score chunks (picklable, loaded once per process)."""

    model: ModelRef
    features: PointInTimeFeatures | OnlineFeatures
    key_columns: tuple[str, ...]
    compare: ModelRef | None = None
    with_features: bool = False
    reasons: bool = False


@functools.cache
def _loaded(ref: ModelRef, explain: bool) -> ScoringModel:
    """One load per process and version (sha256 checked on load)."""
    return ScoringModel.load(ref, explain=explain)


def score_chunk(job: ChunkJob, chunk: pa.Table, first_row: int = 1) -> pa.Table:
    """The output rows of one chunk (same order as the chunk)."""
    model = _loaded(job.model, job.reasons)
    if isinstance(job.features, OnlineFeatures):
        table = job.features.table(chunk, first_row)
    else:
        table = job.features.table(chunk)
    names = model.manifest.features
    rows = feature_matrix(table, names)
    scores = model.scores(rows)
    n = chunk.num_rows
    columns: dict[str, pa.Array] = {c: table.column(c) for c in job.key_columns}
    columns["score"] = pa.array(scores, pa.float32())
    columns["decision"] = pa.array(model.decisions(scores))
    columns["model_version"] = pa.array([model.manifest.version] * n, pa.string())
    columns["model_sha256"] = pa.array([model.manifest.sha256] * n, pa.string())
    if job.compare is not None:
        other = _loaded(job.compare, False)
        same = tuple(other.manifest.features) == tuple(names)
        rows_b = rows if same else feature_matrix(table, other.manifest.features)
        scores_b = other.scores(rows_b)
        columns["compare_score"] = pa.array(scores_b, pa.float32())
        columns["compare_decision"] = pa.array(other.decisions(scores_b))
        columns["compare_version"] = pa.array([other.manifest.version] * n, pa.string())
    if job.with_features:
        for j, name in enumerate(names):
            columns[f"feature.{name}"] = pa.array(rows[:, j], pa.float32())
    if job.reasons and model.explainer is not None:
        columns["reasons"] = _reasons(model, rows)
    return pa.table(columns)


def _reasons(model: ScoringModel, rows: npt.NDArray[np.float32]) -> pa.Array:
    """Per row, the top features pushing the margin toward the adverse outcome."""
    assert model.explainer is not None
    values = model.explainer.explain(rows).values
    names: Sequence[str] = model.manifest.features
    order = np.argsort(-values, axis=1, kind="stable")[:, :REASONS_TOP_N]
    top = np.take_along_axis(values, order, axis=1)
    out: list[list[dict[str, object]]] = []
    for index, contribution, row in zip(order, top, rows, strict=True):
        out.append(
            [
                {"feature": names[j], "value": float(row[j]), "contribution": float(c)}
                for j, c in zip(index.tolist(), contribution.tolist(), strict=True)
                if c > 0.0
            ]
        )
    kind = pa.list_(
        pa.struct(
            [("feature", pa.string()), ("value", pa.float64()), ("contribution", pa.float64())]
        )
    )
    return pa.array(out, kind)
