"""Path Shapley values from one precomputed table per path: ``O(d)`` per (row, path).

For a path ``P`` (``d`` players, leaf value ``v``) a row satisfies the players ``A``
(``o = 1``) and fails the others. With ``w(s) = s! (d-s-1)! / d!``,
``Z(C) = prod_{j in C} z_j``, ``E(C) = sum_{S ⊆ C} w(|S|) Z(C \\ S)`` and
``K(C) = v Z(P \\ C) E(C)``, the path's TreeSHAP values (see
:mod:`server.explain.polynomial`) are

    phi_i = -K(A)                        for i not in A (o_i = 0)
    phi_i = (1 - z_i) / z_i * K(A \\ {i})  for i in A (o_i = 1)

so one table per path over the ``2^d`` bitmasks of satisfied players gives every
player's value with one lookup, at ``A - o_i bit_i`` (the per-leaf subset
precomputation of Fast TreeSHAP v2, Yang 2021, reduced to one scalar per subset).
Tables are built once at load (``O(2^d d)`` per path).

Per row, a player's ``o`` is one interval test: splits ``<=, <, >=, >`` on one feature
along a path intersect to ``lo <= x <= hi`` in float32 steps (ONNX Runtime compares
float32), and a NaN satisfies them iff every one of them sends missing values its way.
A batch is then a fixed number of numpy passes over the (path, player) cells. Paths
with ``==``/``!=`` splits or infinite thresholds are not intervals: they are left to the
polynomial engine (:func:`intervals` returns None for them).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import factorial
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from server.explain.paths import Condition, TreePath
from server.explain.trees import MODES, TreeEnsemble

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

PACKED: Final = np.dtype("<u2")
"""A path's satisfied mask, as packed from its players' bits (little-endian)."""
MAX_DEPTH: Final = 8 * PACKED.itemsize
"""Longest path (players) given a table: ``2^16`` values, 0.5 MiB."""
BUILD_ELEMENTS: Final = 1 << 22
"""Largest working array (float64 values) while tables are built."""
_UP: Final = np.float32(np.inf)
_DOWN: Final = np.float32(-np.inf)


def table_size(depth: int) -> int:
    """Values in the table of a path with ``depth`` players."""
    return 1 << depth


def _tables(zeros: F64, values: F64) -> F64:
    """``[n, 2^d]`` tables ``K[a] = v Z(P \\ a) E(a)`` of ``n`` paths of ``d`` players."""
    n, d = zeros.shape
    size = table_size(d)
    weights = np.array([factorial(s) * factorial(d - s - 1) / factorial(d) for s in range(d)])
    # coef[:, C, k]: coefficient of t^k in prod_{j in C} (z_j + t); inside[:, C] = Z(C)
    coef = np.zeros((n, size, d + 1), dtype=np.float64)
    coef[:, 0, 0] = 1.0
    inside = np.ones((n, size), dtype=np.float64)
    for h in range(d):
        low = coef[:, : 1 << h]
        high = low * zeros[:, h, None, None]
        high[..., 1:] += low[..., :-1]
        coef[:, 1 << h : 2 << h] = high
        inside[:, 1 << h : 2 << h] = inside[:, : 1 << h] * zeros[:, h, None]
    # Z(P \ a) is Z at the complement, index (2^d - 1) - a
    tables: F64 = values[:, None] * inside[:, ::-1] * (coef[..., :d] @ weights)
    return tables


def intervals(
    ensemble: TreeEnsemble, player: Sequence[Condition]
) -> tuple[np.float32, np.float32, bool] | None:
    """``(lo, hi, nan_ok)``: a float32 ``x`` satisfies ``player``'s splits iff
    ``lo <= x <= hi``, a NaN iff ``nan_ok``; None if they are not an interval."""
    lo, hi, nan_ok = _DOWN, _UP, True
    for node, went_true in player:
        mode = MODES[int(ensemble.mode[node])]
        t = np.float32(ensemble.threshold[node])
        if not np.isfinite(t) or mode not in ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"):
            return None
        nan_ok = nan_ok and bool(ensemble.missing_true[node]) == went_true
        below = (mode in ("BRANCH_LEQ", "BRANCH_LT")) == went_true  # x on the low side
        strict = (
            mode in ("BRANCH_LT", "BRANCH_GT")
            if went_true
            else mode in ("BRANCH_LEQ", "BRANCH_GTE")
        )
        if below:
            hi = min(hi, np.nextafter(t, _DOWN) if strict else t)
        else:
            lo = max(lo, np.nextafter(t, _UP) if strict else t)
    return lo, hi, nan_ok


class _Work:
    """Arrays one pass of :meth:`SubsetPaths.add_to` writes into, allocated once: fresh
    ones would be mmapped and page-faulted on every call (the server fixes glibc's mmap
    threshold, see :mod:`server.allocator`), which costs as much as the work."""

    def __init__(self, cells: int, paths: int) -> None:
        shape = (cells,)  # one row at a time: batches gain little per row (memory-bound)
        self.lock = threading.Lock()
        self.values = np.empty(shape, dtype=np.float32)
        self.one = np.empty(shape, dtype=bool)
        self.flag = np.empty(shape, dtype=bool)
        self.on = np.empty(shape, dtype=np.int32)
        self.index = np.empty(shape, dtype=np.int64)
        self.phi = np.empty(shape, dtype=np.float64)
        self.factor = np.empty(shape, dtype=np.float64)
        self.packed = np.zeros(paths * MAX_DEPTH, dtype=bool)
        """Only the cells' slots are ever written; the rest stay False."""


@dataclass(frozen=True, eq=False)
class SubsetPaths:
    """Paths with their subset tables; attributions by lookup. Cells (one per path and
    player) are stored in feature order."""

    feature: I64
    """``[cells]`` feature of each cell."""
    lo: F32
    hi: F32
    nan_ok: npt.NDArray[np.bool_]
    bit: I32
    """``[cells]`` the player's bit in its path's mask."""
    scale: F64
    """``[cells]`` ``1 / z`` of the player (``(1 - z) / z = 1 / z - 1``)."""
    slot: I64
    """``[cells]`` the player's bit in the packed masks, ``MAX_DEPTH`` bits per path."""
    cell_path: I64
    """``[cells]`` path of each cell."""
    path_offset: I64
    """``[P]`` start of each path's table in :attr:`table`."""
    starts: I64
    """Start of each feature's run of cells."""
    features: I64
    """Feature of each run."""
    table: F64
    """Every path's table, concatenated."""
    _work: _Work = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_work", _Work(self.cells, int(self.path_offset.shape[0])))

    @classmethod
    def build(cls, ensemble: TreeEnsemble, paths: Sequence[TreePath]) -> SubsetPaths:
        """Tables of ``paths`` (1 to :data:`MAX_DEPTH` players each, all intervals)."""
        cells: list[tuple[int, np.float32, np.float32, bool, int, float, int]] = []
        path_offset: list[int] = []
        offset = 0
        for index, path in enumerate(paths):
            if not 1 <= path.depth <= MAX_DEPTH:
                raise ValueError(f"a subset table takes 1..{MAX_DEPTH} players, not {path.depth}")
            for j, (feature, zero, player) in enumerate(
                zip(path.features, path.zeros, path.conditions, strict=True)
            ):
                bounds = intervals(ensemble, player)
                if bounds is None:
                    raise ValueError(f"feature {feature}'s splits on a path are not an interval")
                cells.append((feature, *bounds, j, 1.0 / zero, index))
            path_offset.append(offset)
            offset += table_size(path.depth)
        table = np.zeros(offset, dtype=np.float64)
        by_depth: dict[int, list[int]] = {}
        for index, path in enumerate(paths):
            by_depth.setdefault(path.depth, []).append(index)
        for depth, members in by_depth.items():
            chunk = max(1, BUILD_ELEMENTS // (table_size(depth) * (depth + 1)))
            for start in range(0, len(members), chunk):
                some = members[start : start + chunk]
                zeros = np.array([paths[i].zeros for i in some], dtype=np.float64)
                values = np.array([paths[i].value for i in some], dtype=np.float64)
                at = np.asarray([path_offset[i] for i in some])[:, None]
                table[at + np.arange(table_size(depth))] = _tables(zeros, values)
        cells.sort(key=lambda cell: cell[0])
        feature_of = np.array([c[0] for c in cells], dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, feature_of[1:] != feature_of[:-1]])
        player_of = np.array([c[4] for c in cells], dtype=np.int64)
        path_of = np.array([c[6] for c in cells], dtype=np.int64)
        return cls(
            feature=feature_of,
            lo=np.array([c[1] for c in cells], dtype=np.float32),
            hi=np.array([c[2] for c in cells], dtype=np.float32),
            nan_ok=np.array([c[3] for c in cells], dtype=bool),
            bit=(1 << player_of).astype(np.int32),
            scale=np.array([c[5] for c in cells], dtype=np.float64),
            slot=path_of * MAX_DEPTH + player_of,
            cell_path=path_of,
            path_offset=np.asarray(path_offset, dtype=np.int64),
            starts=starts.astype(np.int64),
            features=feature_of[starts],
            table=table,
        )

    @property
    def cells(self) -> int:
        """(path, player) cells per row (the chunking unit)."""
        return int(self.feature.shape[0])

    def add_to(self, x: npt.NDArray[np.floating[Any]], out: F64) -> None:
        """Add the attributions of ``x``'s rows into ``out`` (``[R, n_features + 1]``)."""
        x = np.asarray(x, dtype=np.float32)
        with self._work.lock:
            for row in range(x.shape[0]):
                self._add_row(x[row], out[row])

    def _add_row(self, x: F32, out: F64) -> None:
        work = self._work
        values, one, flag = work.values, work.one, work.flag
        np.take(x, self.feature, out=values, mode="clip")
        np.greater_equal(values, self.lo, out=one)
        one &= np.less_equal(values, self.hi, out=flag)
        if np.isnan(x).any():
            np.isnan(values, out=flag)
            flag &= self.nan_ok
            one |= flag
        # each path's satisfied mask A: its players' bits packed into MAX_DEPTH bits
        work.packed[self.slot] = one
        satisfied = np.packbits(work.packed, bitorder="little").view(PACKED)
        # K(A) for a failed player, K(A \ {i}) for a satisfied one
        index, on = work.index, work.on
        np.take(satisfied + self.path_offset, self.cell_path, out=index, mode="clip")
        index -= np.multiply(one, self.bit, out=on)
        phi, factor = work.phi, work.factor
        np.take(self.table, index, out=phi, mode="clip")
        np.multiply(one, self.scale, out=factor)
        factor -= 1.0  # (1 - z) / z when satisfied, else -1
        phi *= factor
        out[self.features] += np.add.reduceat(phi, self.starts)
