"""An ensemble's leaves as root-to-leaf paths of distinct-feature players.

Each path is one small game of path-dependent TreeSHAP (as in GPUTreeShap, Mitchell
et al. 2022): its players are the distinct features split on along the path; feature
``j`` has a *zero fraction* ``z_j`` (product of the cover ratios of its splits: the
share of training rows that would follow the path without knowing ``x_j``) and, for a
row, a *one fraction* ``o_j`` (1 if the row satisfies every split on ``j`` along the
path, else 0). The engines (:mod:`server.explain.subsets`,
:mod:`server.explain.polynomial`) compute each path's Shapley values from these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.explain.trees import LEAF, TreeEnsemble

F64 = npt.NDArray[np.float64]


class CoverError(ValueError):
    """Covers are missing, non-positive or not additive (parent = sum of children)."""


def check_covers(ensemble: TreeEnsemble, covers: F64) -> None:
    """Covers are positive and each internal node's equals its children's sum."""
    if covers.shape != (ensemble.n_nodes,):
        raise CoverError(f"covers: {covers.shape[0]} values for {ensemble.n_nodes} nodes")
    bad = np.flatnonzero(~(covers > 0))
    if bad.size:
        raise CoverError(f"covers: node {int(bad[0])} has cover {covers[bad[0]]!r} (must be > 0)")
    internal = np.flatnonzero(ensemble.mode != LEAF)
    total = covers[ensemble.true_child[internal]] + covers[ensemble.false_child[internal]]
    off = ~np.isclose(total, covers[internal], rtol=1e-9, atol=0.0)
    if off.any():
        node = int(internal[np.argmax(off)])
        raise CoverError(f"covers: node {node} cover is not the sum of its children's")


Condition = tuple[int, bool]
"""An internal node on the path and whether the path takes its true branch."""


@dataclass(frozen=True, slots=True)
class TreePath:
    """One leaf's path: its value and its players in order of first split."""

    value: float
    features: tuple[int, ...]
    zeros: tuple[float, ...]
    """Zero fraction of each player (in ``(0, 1]``)."""
    conditions: tuple[tuple[Condition, ...], ...]
    """Each player's splits along the path (the row must satisfy all for ``o = 1``)."""

    @property
    def depth(self) -> int:
        """Number of players (distinct features)."""
        return len(self.features)


def decompose(ensemble: TreeEnsemble, covers: F64) -> tuple[list[TreePath], float]:
    """Every leaf with a non-zero value as a path; the base value (``sum_paths v prod z``,
    the cover-weighted mean output). Checks the covers first."""
    check_covers(ensemble, covers)
    paths: list[TreePath] = []
    expected = ensemble.base_value
    for root in ensemble.roots.tolist():
        stack: list[tuple[int, list[Condition]]] = [(root, [])]
        while stack:
            node, conditions = stack.pop()
            if ensemble.mode[node] != LEAF:
                stack.append((int(ensemble.false_child[node]), [*conditions, (node, False)]))
                stack.append((int(ensemble.true_child[node]), [*conditions, (node, True)]))
                continue
            value = float(ensemble.value[node])
            if value == 0.0:
                continue  # contributes nothing to this target
            expected += value * float(covers[node] / covers[root])
            players: dict[int, tuple[float, list[Condition]]] = {}
            for split, went_true in conditions:
                child = ensemble.true_child[split] if went_true else ensemble.false_child[split]
                ratio = float(covers[child] / covers[split])
                feature = int(ensemble.feature[split])
                zero, conds = players.get(feature, (1.0, []))
                players[feature] = (zero * ratio, [*conds, (split, went_true)])
            paths.append(
                TreePath(
                    value=value,
                    features=tuple(players),
                    zeros=tuple(z for z, _ in players.values()),
                    conditions=tuple(tuple(c) for _, c in players.values()),
                )
            )
    return paths, expected
