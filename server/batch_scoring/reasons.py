"""``--reasons``: each row's reason codes, exactly as a Score answer carries them.

The served version's explainer (exact TreeSHAP of the checked artifact), the reason
catalogue of the online path (:func:`server.explain.service.catalogue_for`:
``features.yaml``'s ``reasons``) and the model's ``reasons.top_n`` rank the reasons
(:meth:`~server.explain.reasons.ReasonCatalogue.rank`, the ranking behind
:meth:`~server.explain.reasons.ReasonCatalogue.top`). The column is built with numpy
and Arrow, no Python object per row: per row a list of ``{code, text, contribution,
features: [{name, value, contribution}]}``, largest contribution first, only reasons
pushing toward the adverse outcome (the answer's ``reasons`` field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from server.explain.explainer import TreeExplainer
from server.explain.reasons import ReasonCatalogue

__all__ = ["REASONS_TYPE", "BatchReasons"]

_FEATURE: Final = pa.struct(
    [("name", pa.string()), ("value", pa.float64()), ("contribution", pa.float64())]
)
REASONS_TYPE: Final = pa.list_(
    pa.struct(
        [
            ("code", pa.string()),
            ("text", pa.string()),
            ("contribution", pa.float64()),
            ("features", pa.list_(_FEATURE)),
        ]
    )
)


def _offsets(counts: npt.NDArray[np.int64]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())


@dataclass(frozen=True, eq=False)
class BatchReasons:
    """The catalogue and how many reasons per row (picklable: sent to the workers)."""

    catalogue: ReasonCatalogue
    top_n: int

    def column(self, explainer: TreeExplainer, rows: npt.NDArray[np.float32]) -> pa.Array:
        """``REASONS_TYPE`` per row of ``rows`` (``[R, F]``, what the model scored)."""
        catalogue = self.catalogue
        values = explainer.explain(rows).values
        ranked = catalogue.rank(values, self.top_n)
        # ranked by decreasing contribution, NaN once <= 0: the valid ones lead each row
        valid = ranked.contribution > 0.0
        counts = valid.sum(axis=1).astype(np.int64)
        reason = ranked.index[valid]
        owner = np.repeat(np.arange(rows.shape[0]), counts)
        members = [
            [catalogue.features.index(f) for f in spec.features] for spec in catalogue.reasons
        ]
        sizes = np.array([len(m) for m in members], np.int64)
        padded = np.zeros((len(members), int(sizes.max(initial=1))), np.int64)
        for k, m in enumerate(members):
            padded[k, : len(m)] = m
        per_reason = sizes[reason]
        taken = np.arange(padded.shape[1]) < per_reason[:, None]
        column = padded[reason][taken]
        row = np.repeat(owner, per_reason)
        names: Any = pa.array(catalogue.features, pa.string())
        features = pa.StructArray.from_arrays(
            [
                names.take(pa.array(column)),
                pa.array(rows[row, column].astype(np.float64)),
                pa.array(values[row, column]),
            ],
            fields=list(_FEATURE),
        )
        codes: Any = pa.array([r.code for r in catalogue.reasons], pa.string())
        texts: Any = pa.array([r.text for r in catalogue.reasons], pa.string())
        picked = pa.array(reason)
        structs = pa.StructArray.from_arrays(
            [
                codes.take(picked),
                texts.take(picked),
                pa.array(ranked.contribution[valid]),
                pa.ListArray.from_arrays(_offsets(per_reason), features),
            ],
            fields=list(REASONS_TYPE.value_type),
        )
        return pa.ListArray.from_arrays(_offsets(counts), structs).cast(REASONS_TYPE)
