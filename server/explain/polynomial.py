"""Path Shapley values from the product polynomial: no table, ``O(d^2)`` per (row, path).

For a path with ``d`` players and leaf value ``v`` the row's attribution to ``i`` is

    phi_i = v (o_i - z_i) sum_{S ⊆ P\\{i}} |S|! (d-|S|-1)! / d!  prod_{S} o_j  prod_{P\\S\\{i}} z_j

which is Lundberg's TreeSHAP (path-dependent, as LightGBM ``pred_contrib`` and shap's
``tree_path_dependent``). The inner sum is ``sum_s w_s [t^s] prod_{j≠i} (z_j + o_j t)``:
the product polynomial is built once per (row, path) and divided by each player's
factor. Paths are padded to a common length with null players (``z = o = 1``), which
leaves every Shapley value unchanged, so a batch is a fixed number of numpy operations
whatever the number of trees. Used for the paths too long for a subset table
(:mod:`server.explain.subsets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import factorial
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from server.explain.paths import TreePath
from server.explain.trees import Splits, TreeEnsemble

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

BUCKETS: Final = 3
"""Paths are grouped by length into this many buckets (less padding, few numpy calls)."""


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


@dataclass(frozen=True, eq=False)
class PolynomialPaths:
    """Paths padded into length buckets; attributions by polynomial division."""

    n_features: int
    buckets: tuple[_Bucket, ...]
    n_cells: int
    cond_node: I64
    """``[C]`` split of each path condition (index into ``splits``), by cell."""
    cond_true: npt.NDArray[np.bool_]
    """``[C]`` whether the path takes that split's true branch."""
    cell_start: I64
    """Start in the conditions of each real player cell."""
    cell_index: I64
    """Flat column of each real player cell."""
    splits: Splits
    """Internal nodes any condition names (evaluated once per batch)."""

    @classmethod
    def build(
        cls, ensemble: TreeEnsemble, paths: Sequence[TreePath], n_buckets: int = BUCKETS
    ) -> PolynomialPaths:
        """Pad ``paths`` (at least one player each) into ``n_buckets`` length buckets."""
        paths = sorted(paths, key=lambda p: p.depth)
        groups = [g for g in np.array_split(np.arange(len(paths)), n_buckets) if g.size]
        buckets: list[_Bucket] = []
        cond_node: list[int] = []
        cond_true: list[bool] = []
        cell_start: list[int] = []
        cell_index: list[int] = []
        offset = 0
        for group in groups:
            members = [paths[i] for i in group.tolist()]
            depth = max(p.depth for p in members)
            n = len(members)
            feature = np.full((depth, n), ensemble.n_features, dtype=np.int64)
            zero = np.ones((depth, n), dtype=np.float64)
            for p, path in enumerate(members):
                feature[: path.depth, p] = path.features
                zero[: path.depth, p] = path.zeros
                for j, player in enumerate(path.conditions):
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
                    value=np.array([p.value for p in members], dtype=np.float64),
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
            splits=ensemble.splits(split_nodes.astype(np.int64)),
        )

    @property
    def cells(self) -> int:
        """(path, player) cells per row, padding included (the chunking unit)."""
        return self.n_cells

    def one_fractions(self, x: npt.NDArray[np.floating[Any]]) -> F64:
        """``[R, cells]`` one fractions of ``x``'s rows (1 for padding)."""
        ones = np.ones((x.shape[0], self.n_cells), dtype=np.float64)
        if self.cell_index.size:
            taken = self.splits.taken(x)
            satisfied = taken[:, self.cond_node] == self.cond_true
            ones[:, self.cell_index] = np.logical_and.reduceat(satisfied, self.cell_start, axis=1)
        return ones

    def add_to(self, x: npt.NDArray[np.floating[Any]], out: F64) -> None:
        """Add the attributions of ``x``'s rows into ``out`` (``[R, n_features + 1]``)."""
        one = self.one_fractions(x)
        for bucket in self.buckets:
            _accumulate(bucket, one[:, bucket.cells], out)


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
