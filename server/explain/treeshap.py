"""Exact path-dependent TreeSHAP, vectorised over rows with numpy.

Each root-to-leaf path is one small game (as in GPUTreeShap, Mitchell et al. 2022):
its players are the distinct features split on along the path; feature ``j`` has a
*zero fraction* ``z_j`` (product of the cover ratios of its splits: the share of
training rows that would follow the path without knowing ``x_j``) and a *one fraction*
``o_j`` (1 if the row satisfies every split on ``j`` along the path, else 0). With
``d`` players and leaf value ``v`` the row's attribution to ``i`` is

    phi_i = v (o_i - z_i) sum_{S ⊆ P\\{i}} |S|! (d-|S|-1)! / d!  prod_{S} o_j  prod_{P\\S\\{i}} z_j

which is Lundberg's TreeSHAP (path-dependent, as LightGBM ``pred_contrib`` and shap's
``tree_path_dependent``). The inner sum is ``sum_s w_s [t^s] prod_{j≠i} (z_j + o_j t)``:
the product polynomial is built once per (row, path) and divided by each player's
factor. Paths are padded to a common length with null players (``z = o = 1``), which
leaves every Shapley value unchanged, so a batch is a fixed number of numpy operations
whatever the number of trees. The base value is ``sum_paths v prod z`` (the cover-weighted
mean output); ``phi.sum(1) + base`` equals the ensemble's margin for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from server.explain.trees import LEAF, TreeEnsemble

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

CHUNK_ELEMENTS: Final = 1 << 20
"""Rows are processed in chunks of at most this many (row, path, player) cells."""
BUCKETS: Final = 3
"""Paths are grouped by length into this many buckets (less padding, few numpy calls)."""


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


@dataclass(frozen=True, eq=False)
class _Bucket:
    """Paths of similar length, padded to ``depth`` players, player axis first."""

    value: F64
    """``[P]`` leaf value of each path."""
    zero: F64
    """``[D, 1, P]`` zero fraction of each player (1 for padding)."""
    cells: slice
    """This bucket's columns in the flat one-fraction array (``D * P``, player-major)."""
    order: I64
    """Cells sorted by feature (for the per-feature sums)."""
    starts: I64
    """Start of each feature's run in ``order``."""
    features: I64
    """Feature of each run (``n_features`` = padding)."""
    weights: F64
    """``[D]`` Shapley weights ``s! (D-s-1)! / D!``."""

    @property
    def depth(self) -> int:
        """Players per path after padding."""
        return int(self.zero.shape[0])


_Path = tuple[float, list[int], list[float], list[list[tuple[int, bool]]]]
"""Leaf value, then per distinct feature: index, zero fraction, its split conditions."""


def _paths(ensemble: TreeEnsemble, covers: F64) -> tuple[list[_Path], float]:
    """Every leaf with a non-zero value as a path of distinct features; the base value."""
    paths: list[_Path] = []
    expected = ensemble.base_value
    for root in ensemble.roots.tolist():
        stack: list[tuple[int, list[tuple[int, bool]]]] = [(root, [])]
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
            players: dict[int, tuple[float, list[tuple[int, bool]]]] = {}
            for split, went_true in conditions:
                child = ensemble.true_child[split] if went_true else ensemble.false_child[split]
                ratio = float(covers[child] / covers[split])
                zero, conds = players.get(int(ensemble.feature[split]), (1.0, []))
                players[int(ensemble.feature[split])] = (zero * ratio, [*conds, (split, went_true)])
            paths.append(
                (
                    value,
                    list(players),
                    [z for z, _ in players.values()],
                    [c for _, c in players.values()],
                )
            )
    return paths, expected


@dataclass(frozen=True, eq=False)
class PathTable:
    """An ensemble's leaves as padded paths of distinct-feature players, in buckets."""

    n_features: int
    buckets: tuple[_Bucket, ...]
    n_cells: int
    cond_node: I64
    """``[C]`` split of each path condition (index into ``split_nodes``), by cell."""
    cond_true: npt.NDArray[np.bool_]
    """``[C]`` whether the path takes that split's true branch."""
    cell_start: I64
    """Start in the conditions of each real player cell."""
    cell_index: I64
    """Flat column of each real player cell."""
    split_nodes: I64
    """Internal nodes any condition names (evaluated once per batch)."""
    base_value: float

    @property
    def depth(self) -> int:
        """Largest number of distinct features on a path."""
        return max(b.depth for b in self.buckets)

    @classmethod
    def build(cls, ensemble: TreeEnsemble, covers: F64, n_buckets: int = BUCKETS) -> PathTable:
        """Decompose ``ensemble`` (with node ``covers``) into paths; checks the covers."""
        check_covers(ensemble, covers)
        paths, expected = _paths(ensemble, covers)
        paths.sort(key=lambda p: len(p[1]))
        groups = [g for g in np.array_split(np.arange(len(paths)), n_buckets) if g.size]
        buckets: list[_Bucket] = []
        cond_node: list[int] = []
        cond_true: list[bool] = []
        cell_start: list[int] = []
        cell_index: list[int] = []
        offset = 0
        for group in groups:
            members = [paths[i] for i in group.tolist()]
            depth = max([len(p[1]) for p in members] + [1])
            n = len(members)
            feature = np.full((depth, n), ensemble.n_features, dtype=np.int64)
            zero = np.ones((depth, n), dtype=np.float64)
            for p, (_, features, zeros, conds) in enumerate(members):
                feature[: len(features), p] = features
                zero[: len(zeros), p] = zeros
                for j, player in enumerate(conds):
                    cell_start.append(len(cond_node))
                    cell_index.append(offset + j * n + p)
                    cond_node.extend(split for split, _ in player)
                    cond_true.extend(went for _, went in player)
            flat = feature.reshape(-1)
            order = np.argsort(flat, kind="stable")
            sorted_features = flat[order]
            starts = np.flatnonzero(np.r_[True, sorted_features[1:] != sorted_features[:-1]])
            buckets.append(
                _Bucket(
                    value=np.array([p[0] for p in members], dtype=np.float64),
                    zero=zero[:, None, :],
                    cells=slice(offset, offset + depth * n),
                    order=order.astype(np.int64),
                    starts=starts.astype(np.int64),
                    features=sorted_features[starts].astype(np.int64),
                    weights=np.array(
                        [
                            factorial(s) * factorial(depth - s - 1) / factorial(depth)
                            for s in range(depth)
                        ]
                    ),
                )
            )
            offset += depth * n
        split_nodes, compact = np.unique(np.asarray(cond_node, dtype=np.int64), return_inverse=True)
        return cls(
            n_features=ensemble.n_features,
            buckets=tuple(buckets),
            n_cells=offset,
            cond_node=compact.astype(np.int64).reshape(-1),
            cond_true=np.asarray(cond_true, dtype=bool),
            cell_start=np.asarray(cell_start, dtype=np.int64),
            cell_index=np.asarray(cell_index, dtype=np.int64),
            split_nodes=split_nodes.astype(np.int64),
            base_value=expected,
        )

    def one_fractions(self, ensemble: TreeEnsemble, x: npt.NDArray[np.floating[Any]]) -> F64:
        """``[R, cells]`` one fractions of ``x``'s rows (1 for padding)."""
        ones = np.ones((x.shape[0], self.n_cells), dtype=np.float64)
        if self.cell_index.size:
            taken = ensemble.branch_true(x, self.split_nodes)
            satisfied = taken[:, self.cond_node] == self.cond_true
            ones[:, self.cell_index] = np.logical_and.reduceat(satisfied, self.cell_start, axis=1)
        return ones

    def shap_values(self, ensemble: TreeEnsemble, x: npt.NDArray[np.floating[Any]]) -> F64:
        """``[R, F]`` attributions of ``x``'s rows (``ensemble`` is the one built from)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must be [N, {self.n_features}], got {list(x.shape)}")
        out = np.zeros((x.shape[0], self.n_features + 1), dtype=np.float64)
        step = max(1, CHUNK_ELEMENTS // max(1, self.n_cells))
        for start in range(0, x.shape[0], step):
            one = self.one_fractions(ensemble, x[start : start + step])
            for bucket in self.buckets:
                _accumulate(bucket, one[:, bucket.cells], out[start : start + step])
        return out[:, : self.n_features]


def _accumulate(bucket: _Bucket, one_flat: F64, out: F64) -> None:
    """Add the bucket's attributions of ``one_flat`` (``[R, D * P]``) into ``out``."""
    rows, depth, zero = one_flat.shape[0], bucket.depth, bucket.zero
    one = np.ascontiguousarray(one_flat.reshape(rows, depth, -1).transpose(1, 0, 2))
    # coefficients (degree-first) of prod_j (z_j + o_j t)
    coef = np.zeros((depth + 1, *one.shape[1:]), dtype=np.float64)
    coef[0] = 1.0
    for j in range(depth):
        shifted = coef[: j + 1] * one[j]
        coef[: j + 1] *= zero[j]
        coef[1 : j + 2] += shifted
    # players with o_i = 1: divide by (t + z_i) from the top; G = sum_s w_s q_s
    quotient = np.broadcast_to(coef[depth], one.shape)
    gathered = bucket.weights[depth - 1] * quotient
    for s in range(depth - 1, 0, -1):
        quotient = coef[s] - zero * quotient
        gathered += bucket.weights[s - 1] * quotient
    # players with o_i = 0: their factor is the constant z_i
    flat = np.tensordot(bucket.weights, coef[:depth], axes=1)
    gathered = np.where(one > 0.5, gathered, flat / zero)
    cell = (one - zero) * gathered
    cell *= bucket.value
    per_cell = cell.transpose(1, 0, 2).reshape(rows, -1)[:, bucket.order]
    out[:, bucket.features] += np.add.reduceat(per_cell, bucket.starts, axis=1)
