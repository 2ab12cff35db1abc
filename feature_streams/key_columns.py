"""Whether a column of raw entity ids is already keys, checked column-wise (Arrow);
key -> position lookups for whole columns of keys (:class:`KeyIndex`).

The key rule (:mod:`feature_streams.entity_keys`) is per value in Python; readers of
large files (spines, batch snapshots) ask here first and skip it when every id is
provably its own key. The check is deliberately narrow: ``str`` ids of printable
ASCII with no surrounding spaces (which ``str.strip`` leaves alone); anything else
goes through the rule value by value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]

from feature_streams.entity_keys import KeyType

__all__ = ["KeyIndex", "already_keys"]

_PLAIN: Final = r"^[!-~]([ -~]*[!-~])?$"
"""Printable ASCII, first and last not a space: ``entity_key('str', v) == v``."""


def already_keys(values: pa.Array | pa.ChunkedArray, key_type: KeyType) -> bool:
    """True when every non-null value is its own ``key_type`` key (nulls are no id)."""
    if key_type != "str" or not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    ):
        return False
    present = pc.drop_null(values)
    return len(present) == 0 or bool(pc.all(pc.match_substring_regex(present, _PLAIN)).as_py())


class KeyIndex:
    """Distinct keys by position (``0 .. n-1``), looked up column-wise or one by one.

    :meth:`positions` answers a whole Arrow column of keys with one hash lookup in
    Arrow (``index_in``); :meth:`get` answers one key from a dict built on first use.
    The keys must be distinct (a key's position is then unambiguous)."""

    def __init__(self, keys: pa.Array | Sequence[str]) -> None:
        if isinstance(keys, pa.Array):
            self._array: pa.Array | None = keys.cast(pa.large_string())
            self._list: Sequence[str] | None = None
        else:
            self._array, self._list = None, keys
        self._mapping: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._list) if self._list is not None else len(self.array)

    @property
    def array(self) -> pa.Array:
        """The keys as a ``large_string`` array, in position order."""
        if self._array is None:
            self._array = pa.array(list(self._list or ()), pa.large_string())
        return self._array

    def get(self, key: str, default: int = -1) -> int:
        """The position of ``key`` (``default`` when absent)."""
        if self._mapping is None:
            keys = self._list if self._list is not None else self.array.to_pylist()
            self._mapping = {k: i for i, k in enumerate(keys)}
        return self._mapping.get(key, default)

    def positions(self, values: pa.Array) -> npt.NDArray[np.int64]:
        """Per value (text, e.g. a column's distinct keys) its position; ``-1`` when
        absent or null."""
        if len(values) == 0:
            return np.empty(0, np.int64)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            return np.array([self.get(v) if isinstance(v, str) else -1 for v in values.to_pylist()])
        found = pc.index_in(values.cast(pa.large_string()), value_set=self.array)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
