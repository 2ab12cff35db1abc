"""The subset-table lookup of :mod:`server.explain.subsets`, run by a compiled kernel.

Same tables, same arithmetic (``server/explain/_lookup.c``): one pass per row over the
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


@dataclass(frozen=True, eq=False)
class CompiledSubsetPaths:
    """A :class:`SubsetPaths`' tables, looked up by the compiled kernel (which holds
    its own checked copy of the cells, in path order, and of the tables)."""

    n_features: int
    kernel: _lookup.Kernel

    @classmethod
    def of(cls, paths: SubsetPaths, n_features: int) -> CompiledSubsetPaths:
        """The same paths and tables, cells reordered by (path, player)."""
        if _lookup is None:
            raise RuntimeError("server.explain._lookup is not built")
        player = np.log2(paths.bit).astype(np.int64)
        order = np.lexsort((player, paths.cell_path))
        counts = np.bincount(paths.cell_path, minlength=int(paths.path_offset.shape[0]))
        start = np.zeros(counts.shape[0] + 1, dtype=np.int32)
        np.cumsum(counts, out=start[1:])
        kernel = _lookup.Kernel(
            n_features,
            start,
            np.ascontiguousarray(paths.feature[order], dtype=np.int32),
            np.ascontiguousarray(paths.lo[order], dtype=np.float32),
            np.ascontiguousarray(paths.hi[order], dtype=np.float32),
            np.ascontiguousarray(paths.nan_ok[order], dtype=np.uint8),
            np.ascontiguousarray(paths.scale[order], dtype=np.float64),
            np.ascontiguousarray(paths.path_offset, dtype=np.int64),
            np.ascontiguousarray(paths.table, dtype=np.float64),
        )
        return cls(n_features, kernel)

    @property
    def cells(self) -> int:
        """(path, player) cells per row (the chunking unit)."""
        return self.kernel.cells

    def add_to(self, x: npt.NDArray[np.floating[Any]], out: F64) -> None:
        """Add the attributions of ``x``'s rows into ``out`` (``[R, n_features + 1]``,
        C-contiguous float64)."""
        rows = np.ascontiguousarray(x, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"x must be [N, {self.n_features}], got {list(rows.shape)}")
        self.kernel.add_to(rows, out)


def lookup_engine(
    paths: SubsetPaths, n_features: int, compiled: bool = True
) -> CompiledSubsetPaths | SubsetPaths:
    """The compiled engine of ``paths`` when built (and ``compiled``), else ``paths``
    itself (numpy, the same values), with a warning when the build is what is missing."""
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
