"""The subset-table lookup of :mod:`server.explain.subsets`, run by a compiled kernel.

Same tables (held as float32 by the kernel: half the bytes a cold row reads; values
agree with the numpy engine to ~1e-7, inside float32 tolerance), same arithmetic
(``server/explain/_lookup.c``): one pass per row over the
paths in path order, each path's players tested against the row, its satisfied mask
``A`` formed, and one table read per path plus one per satisfied player. The numpy
engine streams ~10 arrays of (path, player) cells and their temporaries per row; this
reads the cells once and prefetches a block of paths' table entries before using them,
which is what a table gone cold between explanations (a few % of answers explained)
pays for. :class:`~server.explain.subsets.SubsetPaths` stays the reference (tests
compare the two); :func:`lookup_engine` falls back to it, with a warning, where the
extension was not built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from server.explain.subsets import SubsetPaths

try:
    from server.explain import _lookup
except ImportError:  # a source tree without `pip install -e .` / `setup.py build_ext`
    _lookup = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


def available() -> bool:
    """Whether the compiled kernel was built and imports."""
    return _lookup is not None


def likely_first(
    paths: SubsetPaths,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], F64]:
    """Cells in path order, each path's players by decreasing ``z`` (the share of the
    training rows that went its way: the likeliest to be satisfied), and the tables
    with their mask bits renumbered to match: ``(cell order, path starts, tables)``.

    A row reads ``K(A)`` and ``K(A ^ bit)`` for each satisfied player; with the likely
    players in the low bits those reads fall more often on ``K(A)``'s own cache line
    (8 values), ~15% fewer lines per row on the demo model. The values are the same,
    only where they are stored moves, and a path adds to each feature at most once, so
    the sums are unchanged.
    """
    player = np.log2(paths.bit).astype(np.int64)
    order = np.lexsort((player, -1.0 / paths.scale, paths.cell_path))
    n_paths = int(paths.path_offset.shape[0])
    counts = np.bincount(paths.cell_path, minlength=n_paths)
    start = np.zeros(n_paths + 1, dtype=np.int32)
    np.cumsum(counts, out=start[1:])
    # new_bit[c]: cell c's bit in its path's new mask (its rank in the new order)
    new_bit = np.empty_like(player)
    new_bit[order] = np.arange(order.shape[0]) - start[paths.cell_path[order]]
    table = np.empty_like(paths.table)
    for depth in np.unique(counts).tolist():
        members = np.flatnonzero(counts == depth)
        # moved[i, j]: the new bit of old player j of path members[i]
        moved = np.zeros((members.shape[0], depth), dtype=np.int64)
        cells = np.flatnonzero(counts[paths.cell_path] == depth)
        row = np.searchsorted(members, paths.cell_path[cells])
        moved[row, player[cells]] = new_bit[cells]
        old = np.arange(1 << depth)
        bits = (old[:, None] >> np.arange(depth)) & 1  # [2^d, d] old mask bits
        new = bits @ (1 << moved).T  # [2^d, n] the same subset's new mask
        offset = paths.path_offset[members]
        table[offset[None, :] + new] = paths.table[offset[None, :] + old[:, None]]
    return order, start, table


@dataclass(frozen=True, eq=False)
class CompiledSubsetPaths:
    """A :class:`SubsetPaths`' tables, looked up by the compiled kernel (which holds
    its own checked copy of the cells, in path order, and of the tables)."""

    n_features: int
    kernel: _lookup.Kernel

    @classmethod
    def of(cls, paths: SubsetPaths, n_features: int) -> CompiledSubsetPaths:
        """The same paths and tables, each path's players reordered by decreasing ``z``
        (see :func:`likely_first`)."""
        if _lookup is None:
            raise RuntimeError("server.explain._lookup is not built")
        order, start, table = likely_first(paths)
        kernel = _lookup.Kernel(
            n_features,
            start,
            np.ascontiguousarray(paths.feature[order], dtype=np.int32),
            np.ascontiguousarray(paths.lo[order], dtype=np.float32),
            np.ascontiguousarray(paths.hi[order], dtype=np.float32),
            np.ascontiguousarray(paths.nan_ok[order], dtype=np.uint8),
            np.ascontiguousarray(paths.scale[order], dtype=np.float64),
            np.ascontiguousarray(paths.path_offset, dtype=np.int64),
            table,
        )
        return cls(n_features, kernel)

    @property
    def cells(self) -> int:
        """(path, player) cells per row (the chunking unit)."""
        return self.kernel.cells

    def add_to(self, x: npt.NDArray[np.floating[Any]], out: F64) -> None:
        """Add the attributions of ``x``'s rows into ``out`` (``[R, n_features + 1]``,
        C-contiguous float64)."""
        rows = x
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            rows = np.ascontiguousarray(x, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"x must be [N, {self.n_features}], got {list(rows.shape)}")
        self.kernel.add_to(rows, out)


def lookup_engine(
    paths: SubsetPaths, n_features: int, compiled: bool = True
) -> CompiledSubsetPaths | SubsetPaths:
    """The compiled engine of ``paths`` when built (and ``compiled``), else ``paths``
    itself (numpy, float64 tables: the same values to ~1e-7), with a warning when the
    build is what is missing."""
    if not compiled:
        return paths
    if _lookup is None:
        logger.warning(
            "server.explain._lookup is not built (pip install -e . or "
            "python setup.py build_ext --inplace): explanations use the numpy engine, "
            "~2x slower per row"
        )
        return paths
    return CompiledSubsetPaths.of(paths, n_features)
