"""A labelled holdout file (Parquet or CSV) read into numpy columns.

Feature and label columns must be numeric (booleans count as 0/1; nulls become
NaN); segment columns may be anything and are compared as strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

MISSING_SEGMENT = "(missing)"


class HoldoutError(ValueError):
    """The holdout cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True)
class Holdout:
    """The holdout's columns, as read."""

    path: Path
    table: pa.Table

    @property
    def rows(self) -> int:
        return int(self.table.num_rows)

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def require(self, columns: Sequence[str], what: str) -> None:
        """Raise ``HoldoutError`` naming every column of ``columns`` the file lacks."""
        present = set(self.table.column_names)
        missing = [c for c in columns if c not in present]
        if missing:
            raise HoldoutError(
                f"holdout {self.path}: missing {what} column(s): {', '.join(missing)}"
            )

    def numeric(self, column: str) -> npt.NDArray[np.float64]:
        """One numeric column as float64 (nulls are NaN)."""
        data = self.table.column(column)
        if pa.types.is_boolean(data.type):
            data = pc.cast(data, pa.int8())
        if not (pa.types.is_integer(data.type) or pa.types.is_floating(data.type)):
            raise HoldoutError(f"holdout {self.path}: column {column}: not numeric ({data.type})")
        return np.asarray(
            pc.fill_null(pc.cast(data, pa.float64()), float("nan")).to_numpy(), dtype=np.float64
        )

    def matrix(self, features: Sequence[str]) -> npt.NDArray[np.float32]:
        """``[rows, len(features)]`` float32, the model's input layout."""
        if not features:
            return np.zeros((self.rows, 0), dtype=np.float32)
        return np.column_stack([self.numeric(f) for f in features]).astype(np.float32)

    def labels(self, column: str) -> npt.NDArray[np.int8]:
        """The label column as 0/1; anything else is a ``HoldoutError``."""
        values = self.numeric(column)
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            example = values[bad][0]
            raise HoldoutError(
                f"holdout {self.path}: column {column}: labels must be 0/1, "
                f"{int(bad.sum())} row(s) are not (e.g. {example})"
            )
        if values.size and (values.min() == values.max()):
            raise HoldoutError(
                f"holdout {self.path}: column {column}: needs both classes, all rows are "
                f"{int(values[0])}"
            )
        return values.astype(np.int8)

    def segment(self, column: str) -> npt.NDArray[np.str_]:
        """A segment column as strings (nulls are ``(missing)``)."""
        data = self.table.column(column)
        strings = pc.fill_null(pc.cast(data, pa.string()), MISSING_SEGMENT)
        return np.asarray(strings.to_pylist(), dtype=np.str_)


def read_holdout(path: Path) -> Holdout:
    """Read a ``.parquet``/``.pq`` or ``.csv`` file; ``HoldoutError`` when it cannot."""
    if not path.is_file():
        raise HoldoutError(f"holdout {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pa_csv.read_csv(path)
        else:
            raise HoldoutError(f"holdout {path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HoldoutError(f"holdout {path}: unreadable: {first}") from error
    if table.num_rows == 0:
        raise HoldoutError(f"holdout {path}: no rows")
    return Holdout(path, table)
