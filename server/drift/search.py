"""Every column's bin (and category) of a block of float32 values in one search (pure).

Each value becomes a 64-bit key: its column in the high 32 bits, an order-preserving
integer image of the float32 in the low 32 (sign flipped for positives, all bits
inverted for negatives, so integer order is float order). Every column's edges become
keys the same way, concatenated in column order: one ``np.searchsorted`` over that
sorted array finds every value's bin in every column at once, with no per-column
Python. Categories are found the same way (exact key equality).

Values are compared as float32 (the models' input and output precision). A float64
edge ``e`` is stored as the smallest float32 above it, so ``e < v`` exactly when
``v >= key(e)``: the same bins as ``np.searchsorted(edges, v, side="left")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Keys = npt.NDArray[np.uint64]
Slots = npt.NDArray[np.intp]

_SIGN = np.uint32(0x80000000)
_LOW = np.uint32(0x7FFFFFFF)


def float_keys(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Order-preserving uint32 image of float32 ``values`` (-0.0 keyed as +0.0)."""
    bits = (values + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 is +0.0
    return bits ^ ((bits >> np.uint32(31)) * _LOW | _SIGN)


def _above(edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The smallest float32 strictly above each float64 edge."""
    with np.errstate(over="ignore"):
        rounded = edges.astype(np.float32)
    below = rounded.astype(np.float64) <= edges
    rounded[below] = np.nextafter(rounded[below], np.float32(np.inf))
    return rounded


def _column_keys(column: int, values: npt.NDArray[np.float32]) -> Keys:
    return (np.uint64(column) << np.uint64(32)) | float_keys(values).astype(np.uint64)


@dataclass(frozen=True, slots=True)
class ColumnSearch:
    """Compiled edges and categories of C columns, and the count slots they map to."""

    columns: int
    edge_keys: Keys
    bin_shift: Slots
    """[C]: added to a value's search position to give its bin's slot."""
    nan_slots: Slots
    """[C]: slot of a NaN value."""
    categorical: Slots
    """Columns with categories (indices into C)."""
    category_keys: Keys
    category_slots: Slots
    """Slot of each category key (same order)."""
    other_slots: Slots
    """[len(categorical)]: slot of a value that is none of its column's categories."""

    @classmethod
    def compile(
        cls,
        edges: Sequence[npt.NDArray[np.float64]],
        starts: Sequence[int],
        nan_slots: Sequence[int],
        categories: Sequence[tuple[npt.NDArray[np.float64], int] | None],
    ) -> ColumnSearch:
        """Per column: its sorted edges, first bin slot, NaN slot, and (categories,
        first category slot) or None; a column's "other" slot follows its categories."""
        keys: list[Keys] = []
        shift: list[int] = []
        position = 0
        for column, column_edges in enumerate(edges):
            keys.append(_column_keys(column, _above(np.asarray(column_edges, np.float64))))
            shift.append(starts[column] - position)
            position += column_edges.size
        coded = [(c, spec) for c, spec in enumerate(categories) if spec is not None]
        category_keys: list[Keys] = []
        category_slots: list[Slots] = []
        for column, (values, first) in coded:
            exact = values.astype(np.float32).astype(np.float64) == values  # others never match
            slots = np.flatnonzero(exact) + first
            category_keys.append(_column_keys(column, values[exact].astype(np.float32)))
            category_slots.append(slots.astype(np.intp))
        return cls(
            len(edges),
            np.concatenate(keys) if keys else np.zeros(0, np.uint64),
            np.array(shift, np.intp),
            np.array(nan_slots, np.intp),
            np.array([c for c, _ in coded], np.intp),
            np.concatenate(category_keys) if category_keys else np.zeros(0, np.uint64),
            np.concatenate(category_slots) if category_slots else np.zeros(0, np.intp),
            np.array([spec[1] + spec[0].size for _, spec in coded], np.intp),
        )

    def slots(self, values: npt.NDArray[np.float32]) -> Slots:
        """The slot of every value of ``values`` ([rows, C]) in every count it adds to:
        its bin (or NaN slot), and its category (or "other") for a categorical column."""
        keys = float_keys(values).astype(np.uint64)
        keys |= np.arange(self.columns, dtype=np.uint64) << np.uint64(32)
        nan = np.isnan(values)
        found = np.searchsorted(self.edge_keys, keys, side="right")
        binned = np.where(nan, self.nan_slots, found + self.bin_shift).ravel()
        if not self.categorical.size:
            return binned
        coded = keys[:, self.categorical]
        if self.category_keys.size:
            where = np.searchsorted(self.category_keys, coded, side="left")
            clipped = np.minimum(where, self.category_keys.size - 1)
            hit = self.category_keys[clipped] == coded
            category = np.where(hit, self.category_slots[clipped], self.other_slots)
        else:
            category = np.broadcast_to(self.other_slots, coded.shape)
        return np.concatenate([binned, category[~nan[:, self.categorical]]])
