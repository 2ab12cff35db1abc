"""Feature assembly: turn a request's features into the model's input row.

``FeatureLayout`` is built once per loaded version from its manifest (name ->
column, which columns may be NaN), so the request path only fills an array.
The feature layer (Redis batch groups, stream windows) plugs in here: it fills
the columns a request does not carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.errors import InvalidInput
from server.manifest import ModelManifest


@dataclass(frozen=True, slots=True)
class FeatureLayout:
    """Column order and validation rules of one model version's input."""

    model_key: str
    names: tuple[str, ...]
    index: Mapping[str, int]
    nan_allowed: frozenset[str]
    nan_allowed_mask: npt.NDArray[np.bool_]

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> FeatureLayout:
        """Precompute the layout of ``manifest``'s input."""
        names = tuple(manifest.features)
        return cls(
            model_key=f"{manifest.name}/{manifest.version}",
            names=names,
            index={name: i for i, name in enumerate(names)},
            nan_allowed=manifest.nan_allowed,
            nan_allowed_mask=np.array([n in manifest.nan_allowed for n in names], dtype=bool),
        )

    @property
    def width(self) -> int:
        """Number of input columns."""
        return len(self.names)

    def assemble_row(self, features: Mapping[str, float]) -> npt.NDArray[np.float32]:
        """One [1, F] float32 row from request features; every column must be present."""
        values = [features.get(name) for name in self.names]
        if len(features) != len(self.names) or None in values:
            raise self._shape_error(features)
        if not all(map(math.isfinite, values)):  # type: ignore[arg-type]
            for name, value in zip(self.names, values, strict=True):
                if not math.isfinite(value) and name not in self.nan_allowed:  # type: ignore[arg-type]
                    raise InvalidInput(f"features.{name}", f"{value} not allowed (must be finite)")
        return np.array(values, dtype=np.float32).reshape(1, -1)

    def _shape_error(self, features: Mapping[str, float]) -> InvalidInput:
        for name in features:
            if name not in self.index:
                return InvalidInput(
                    f"features.{name}", f"unknown feature for model {self.model_key}"
                )
        missing = [n for n in self.names if n not in features]
        more = ", ..." if len(missing) > 10 else ""
        return InvalidInput(
            f"features.{missing[0]}",
            f"missing ({len(missing)} missing: {', '.join(missing[:10])}{more})",
        )

    def check_rows(self, rows: npt.NDArray[np.float32], field: str) -> None:
        """Refuse NaN/inf in columns that do not allow it, naming row and feature."""
        finite = np.isfinite(rows)
        bad = ~(finite | self.nan_allowed_mask)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(
                field,
                f"row {row} feature {self.names[column]!r} is {rows[row, column]} (must be finite)",
            )
