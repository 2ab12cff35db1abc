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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.batch_scoring.features import PointInTimeFeatures, feature_columns, feature_matrix
from server.batch_scoring.online import OnlineFeatures
from server.batch_scoring.reasons import BatchReasons
from server.batch_scoring.scoring import ModelRef, ScoringModel

__all__ = ["ChunkJob", "score_chunk"]


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs to score chunks (picklable, loaded once per process)."""

    model: ModelRef
    features: PointInTimeFeatures | OnlineFeatures
    key_columns: tuple[str, ...]
    compare: ModelRef | None = None
    with_features: bool = False
    reasons: BatchReasons | None = None
    """The catalogue and top N when ``--reasons`` (the model has an explainer)."""


@functools.cache
def _loaded(ref: ModelRef, explain: bool) -> ScoringModel:
    """One load per process and version (sha256 checked on load)."""
    return ScoringModel.load(ref, explain=explain)


def score_chunk(job: ChunkJob, chunk: pa.Table, first_row: int = 1) -> pa.Table:
    """The output rows of one chunk (same order as the chunk)."""
    model = _loaded(job.model, job.reasons is not None)
    if isinstance(job.features, PointInTimeFeatures):
        table = job.features.table(chunk)
    else:
        table = job.features.table(chunk, first_row)
    names = model.manifest.features
    by_feature = feature_columns(table, names)
    rows = np.ascontiguousarray(by_feature.T)
    scores = model.scores(rows)
    n = chunk.num_rows
    columns: dict[str, pa.Array] = {c: table.column(c) for c in job.key_columns}
    columns["score"] = pa.array(scores, pa.float32())
    columns["decision"] = pa.array(model.decisions(scores))
    columns["model_version"] = _repeat(model.manifest.version, n)
    columns["model_sha256"] = _repeat(model.manifest.sha256, n)
    if job.compare is not None:
        other = _loaded(job.compare, False)
        same = tuple(other.manifest.features) == tuple(names)
        rows_b = rows if same else feature_matrix(table, other.manifest.features)
        scores_b = other.scores(rows_b)
        columns["compare_score"] = pa.array(scores_b, pa.float32())
        columns["compare_decision"] = pa.array(other.decisions(scores_b))
        columns["compare_version"] = _repeat(other.manifest.version, n)
    if job.with_features:
        for j, name in enumerate(names):
            columns[f"feature.{name}"] = pa.array(by_feature[j], pa.float32())
    if job.reasons is not None and model.explainer is not None:
        columns["reasons"] = job.reasons.column(model.explainer, rows)
    return pa.table(columns)


def _repeat(text: str, n: int) -> pa.Array:
    """``n`` copies of ``text`` as a string column (no Python list of ``n`` items)."""
    return pa.repeat(pa.scalar(text, pa.string()), n)
