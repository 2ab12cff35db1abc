"""Whether a column of raw entity ids is already keys, checked column-wise (Arrow).

The key rule (:mod:`feature_streams.entity_keys`) is per value in Python; readers of
large files (spines, batch snapshots) ask here first and skip it when every id is
provably its own key. The check is deliberately narrow: ``str`` ids of printable
ASCII with no surrounding spaces (which ``str.strip`` leaves alone); anything else
goes through the rule value by value.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]

from feature_streams.entity_keys import KeyType

__all__ = ["already_keys"]

_PLAIN: Final = r"^[!-~]([ -~]*[!-~])?$"
"""Printable ASCII, first and last not a space: ``entity_key('str', v) == v``."""


def already_keys(values: pa.Array | pa.ChunkedArray, key_type: KeyType) -> bool:
    """True when every non-null value is its own ``key_type`` key (nulls are no id)."""
    if key_type != "str" or not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    ):
        return False
    present = pc.unique(pc.drop_null(values))  # a hash per id is cheaper than a regex match
    return len(present) == 0 or bool(pc.all(pc.match_substring_regex(present, _PLAIN)).as_py())
