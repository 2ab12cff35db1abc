"""Exact path-dependent TreeSHAP of a tree ensemble, vectorised over rows with numpy.

The ensemble's leaves become paths of distinct-feature players
(:mod:`server.explain.paths`); each path's Shapley values are Lundberg's TreeSHAP
(path-dependent, as LightGBM ``pred_contrib`` and shap's ``tree_path_dependent``).
Paths are explained by a precomputed table per path (:mod:`server.explain.subsets`,
``O(d)`` per row and path; looked up by the compiled kernel of
:mod:`server.explain.compiled` when it is built) while their tables fit
:data:`SUBSET_BUDGET`, shortest first; longer paths by the product polynomial
(:mod:`server.explain.polynomial`, ``O(d^2)``, no table). The base value is
``sum_paths v prod z`` (the cover-weighted mean output); ``phi.sum(1) + base``
equals the ensemble's margin for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from server.explain.compiled import lookup_engine
from server.explain.paths import TreePath, decompose
from server.explain.polynomial import PolynomialPaths
from server.explain.subsets import MAX_DEPTH, SubsetPaths, intervals, table_size
from server.explain.trees import TreeEnsemble

F64 = npt.NDArray[np.float64]

SUBSET_BUDGET: Final = 1 << 22
"""Most subset-table values per version (float64: 32 MiB)."""
CHUNK_ELEMENTS: Final = 1 << 20
"""Rows are processed in chunks of at most this many per-row cells."""


def _intervals(ensemble: TreeEnsemble, path: TreePath) -> bool:
    """Whether ``path`` can have a subset table (short enough, interval splits)."""
    return path.depth <= MAX_DEPTH and all(
        intervals(ensemble, player) is not None for player in path.conditions
    )


class _Engine(Protocol):
    @property
    def cells(self) -> int: ...

    def add_to(self, x: npt.NDArray[np.floating[Any]], out: F64) -> None: ...


@dataclass(frozen=True, eq=False)
class PathTable:
    """An ensemble's paths, split between the subset-table and polynomial engines."""

    n_features: int
    engines: tuple[_Engine, ...]
    base_value: float
    depth: int
    """Largest number of distinct features on a path."""
    subset_paths: int
    """Paths explained by table lookup (the rest by the polynomial)."""

    @classmethod
    def build(
        cls,
        ensemble: TreeEnsemble,
        covers: F64,
        subset_budget: int = SUBSET_BUDGET,
        *,
        compiled: bool = True,
    ) -> PathTable:
        """Decompose ``ensemble`` (with node ``covers``, checked) into paths and give the
        shortest ones subset tables while ``subset_budget`` values last. ``compiled``:
        look the tables up with the compiled kernel when it is built (else numpy)."""
        paths, base_value = decompose(ensemble, covers)
        players = sorted((p for p in paths if p.depth), key=lambda p: p.depth)
        tabled: list[TreePath] = []
        rest: list[TreePath] = []
        used = 0
        for path in players:
            fits = used + table_size(path.depth) <= subset_budget and _intervals(ensemble, path)
            if fits:
                used += table_size(path.depth)
            (tabled if fits else rest).append(path)
        engines: list[_Engine] = []
        if tabled:
            subsets = SubsetPaths.build(ensemble, tabled)
            engines.append(lookup_engine(subsets, ensemble.n_features, compiled))
        if rest:
            engines.append(PolynomialPaths.build(ensemble, rest))
        return cls(
            n_features=ensemble.n_features,
            engines=tuple(engines),
            base_value=base_value,
            depth=max((p.depth for p in players), default=0),
            subset_paths=len(tabled),
        )

    def shap_values(self, x: npt.NDArray[np.floating[Any]]) -> F64:
        """``[R, F]`` attributions of ``x``'s rows."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must be [N, {self.n_features}], got {list(x.shape)}")
        rows = x.shape[0]
        out = np.zeros((rows, self.n_features + 1), dtype=np.float64)
        for engine in self.engines:
            step = max(1, CHUNK_ELEMENTS // max(1, engine.cells))
            if rows <= step:  # one chunk (a served answer's row): no slicing
                engine.add_to(x, out)
                continue
            for start in range(0, rows, step):
                engine.add_to(x[start : start + step], out[start : start + step])
        return out[:, : self.n_features]
