"""Feature layout of one model version: which column comes from where, and request
validation. Pure: no I/O (the store side is :mod:`server.feature_store`).

``FeatureLayout`` is built once per loaded version (manifest + feature definitions):
column order, defaults, validation rules, and the
:class:`~feature_streams.read_plan.FetchPlan` of the columns the feature store fills.
On the request path, ``FeatureLayout.prepare`` validates one request (unknown feature
or entity, an entity id that is not its entity's canonical key
(``feature_streams.entity_keys``: ``" c-1"``, an int entity's ``"042"``), out-of-range
or NaN request value: ``InvalidInput`` naming it) and starts its row from defaults
overlaid with every value the request carries. A request may carry its model's request
features; a store feature only with the ``features.allow_overrides`` permission
(replays with frozen features, tests): then the value sent wins over the store, and a
group whose every column was sent is not fetched at all. Without it the store feature
is ``InvalidInput`` naming it (a caller must not set, e.g., its card's 1-hour count).
The row is then completed, a micro-batch at a time, by
:class:`server.feature_store.FeatureStore` (which adds the failure policy to
:class:`feature_streams.fetcher.FeatureFetcher`, the one Redis round trip).

Without a definitions file the layout is request-only: every model feature must be
sent (the mode of a deployment without a feature store).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from feature_streams.definitions import (
    Entity,
    FeatureDefinitions,
    FeatureSource,
    RequestFeature,
    UndefinedFeaturesError,
    feature_sources,
    resolve_features,
)
from feature_streams.read_plan import FetchPlan, FetchRow, Freshness
from server.errors import InvalidInput, ModelLoadError
from server.manifest import ModelManifest

__all__ = [
    "F32_MAX",
    "OVERRIDE_PERMISSION",
    "FailurePolicy",
    "FeatureLayout",
    "Freshness",
    "Prepared",
]

FailurePolicy = Literal["degrade", "fail"]
"""What a micro-batch gets when the feature store is unreachable: defaults, flagged
``degraded`` (``degrade``), or UNAVAILABLE (``fail``)."""
F32_MAX = float(np.finfo(np.float32).max)
"""Largest magnitude a feature value may have: rows are float32, so a finite double
beyond it would reach the model as infinity."""
_NOT_FLOAT32 = "{} not allowed (must be finite and within float32 range)"
OVERRIDE_PERMISSION = "features.allow_overrides"
STORE_FEATURE_REFUSED = (
    f"store feature; overrides need permission {OVERRIDE_PERMISSION} "
    "(metadata x-streamscore-override-token, server.overrides)"
)


_NO_FETCH = FetchPlan(())


MAX_NAME_LENGTH = 128
"""Default of ``server.limits.max_name_length``."""


def _check_name_length(name: str, limit: int) -> None:
    """An unknown feature name over ``limit``: refused without echoing it whole."""
    if len(name) > limit:
        raise InvalidInput(
            f"features[{name[:32]!r}...]",
            f"{len(name)} characters exceed the limit of {limit} (server.limits.max_name_length)",
        )


#: ``ndarray.sum`` without its Python wrapper (``_methods._sum``) on the per-call check.
_add_reduce = np.add.reduce


def _fits_float32(value: float) -> bool:
    """Finite and representable as a finite float32 (False for NaN)."""
    return -F32_MAX <= value <= F32_MAX


@dataclass(slots=True)
class Prepared(FetchRow):
    """One request on its way through assembly; ``row`` is completed in place."""


@dataclass(frozen=True, slots=True)
class FeatureLayout:
    """Column order, sources and validation rules of one model version's input."""

    model_key: str
    names: tuple[str, ...]
    index: Mapping[str, int]
    nan_allowed: frozenset[str]
    nan_allowed_mask: npt.NDArray[np.bool_]
    #: Read-only all-True ``Prepared.sent`` shared by request-only rows (no per-request array).
    all_sent: npt.NDArray[np.bool_]
    defaults: npt.NDArray[np.float32]
    request_rules: Mapping[str, RequestFeature] = field(default_factory=dict)
    request_columns: tuple[int, ...] = ()
    fetch: FetchPlan = _NO_FETCH
    defined_features: frozenset[str] = frozenset()
    entities: frozenset[str] = frozenset()
    entity_defs: Mapping[str, Entity] = field(default_factory=dict)

    @classmethod
    def from_manifest(
        cls, manifest: ModelManifest, definitions: FeatureDefinitions | None = None
    ) -> FeatureLayout:
        """Precompute the layout; ``ModelLoadError`` names every undefined feature."""
        names = tuple(manifest.features)
        index = {name: i for i, name in enumerate(names)}
        key = f"{manifest.name}/{manifest.version}"
        all_sent = np.ones(len(names), bool)
        all_sent.setflags(write=False)
        base = {
            "model_key": key,
            "names": names,
            "index": index,
            "nan_allowed": manifest.nan_allowed,
            "nan_allowed_mask": np.array([n in manifest.nan_allowed for n in names], bool),
            "all_sent": all_sent,
        }
        if definitions is None:
            return cls(
                **base,  # type: ignore[arg-type]
                defaults=np.zeros(len(names), np.float32),
                fetch=FetchPlan(names),
            )
        try:
            resolution = resolve_features(definitions, names)
        except UndefinedFeaturesError as error:
            raise ModelLoadError(
                f"model {key} needs features that are not defined: {', '.join(error.names)}"
            ) from error
        defaults = np.array([ref.default for ref in resolution.refs], dtype=np.float32)
        fetch = FetchPlan.build(
            definitions, names, resolution.batch_groups, resolution.stream_groups
        )
        request_rules = {
            ref.name: definitions.request_features[ref.name]
            for ref in resolution.refs
            if ref.source is FeatureSource.REQUEST
        }
        return cls(
            **base,  # type: ignore[arg-type]
            defaults=defaults,
            request_rules=request_rules,
            request_columns=tuple(index[n] for n in request_rules),
            fetch=fetch,
            defined_features=frozenset(feature_sources(definitions)),
            entities=frozenset(definitions.entities),
            entity_defs=dict(definitions.entities),
        )

    @property
    def width(self) -> int:
        """Number of input columns."""
        return len(self.names)

    @property
    def uses_store(self) -> bool:
        """True when some column may come from Redis."""
        return self.fetch.uses_store

    def assemble_row(
        self, features: Mapping[str, float], max_name_length: int = MAX_NAME_LENGTH
    ) -> npt.NDArray[np.float32]:
        """Request-only mode: one [1, F] row; every column must be present and valid."""
        found = list(map(features.get, self.names))  # one bound method, not one per name
        if len(features) != len(self.names) or None in found:
            raise self._shape_error(features, max_name_length)
        values = cast(list[float], found)
        # all finite first: min/max are only meaningful without NaN
        if not all(map(math.isfinite, values)) or not (
            min(values) >= -F32_MAX and max(values) <= F32_MAX
        ):
            for name, value in zip(self.names, values, strict=True):
                if not _fits_float32(value) and name not in self.nan_allowed:
                    raise InvalidInput(f"features.{name}", _NOT_FLOAT32.format(value))
        return np.array([values], dtype=np.float32)  # [1, F] in one call

    def prepare(
        self,
        features: Mapping[str, float],
        entity_ids: Mapping[str, str],
        t_ms: int,
        overrides_allowed: bool = False,
        max_name_length: int = MAX_NAME_LENGTH,
    ) -> Prepared:
        """Validate one request and start its row (defaults overlaid with sent values);
        a store feature is refused unless ``overrides_allowed``, an unknown name longer
        than ``max_name_length`` with that limit's error (never echoed whole)."""
        if not self.uses_store and not self.request_rules:
            row = self.assemble_row(features, max_name_length)
            return Prepared(row, self.all_sent, entity_ids, t_ms, store_sent=True)
        for name, entity_id in entity_ids.items():
            entity = self.entity_defs.get(name)
            if entity is None:
                known = ", ".join(sorted(self.entities))
                raise InvalidInput(f"entity_ids.{name}", f"unknown entity (defined: {known})")
            problem = entity.key_problem(entity_id)
            if problem is not None:
                raise InvalidInput(f"entity_ids.{name}", problem)
        row = self.defaults.copy().reshape(1, -1)
        sent = np.zeros(self.width, bool)
        store_sent = False
        index = self.index
        for name, value in features.items():
            column = index.get(name)
            if column is None:
                if name in self.defined_features:
                    continue  # defined, just not an input of this version
                _check_name_length(name, max_name_length)
                raise InvalidInput(f"features.{name}", "unknown feature")
            rule = self.request_rules.get(name)
            if rule is not None:
                problem = rule.violation(value)
                if problem is not None:
                    raise InvalidInput(f"features.{name}", problem)
            else:
                if not overrides_allowed:
                    raise InvalidInput(f"features.{name}", STORE_FEATURE_REFUSED)
                store_sent = True
            if not _fits_float32(value) and name not in self.nan_allowed:
                raise InvalidInput(f"features.{name}", _NOT_FLOAT32.format(value))
            row[0, column] = value
            sent[column] = True
        prepared = Prepared(row, sent, entity_ids, t_ms, store_sent)
        for column in self.request_columns:
            if not sent[column]:
                prepared.defaulted.append(self.names[column])
        return prepared

    def _shape_error(self, features: Mapping[str, float], max_name_length: int) -> InvalidInput:
        for name in features:
            if name not in self.index:
                _check_name_length(name, max_name_length)
                return InvalidInput(
                    f"features.{name}", f"unknown feature for model {self.model_key}"
                )
        missing = [n for n in self.names if n not in features]
        more = ", ..." if len(missing) > 10 else ""
        return InvalidInput(
            f"features.{missing[0]}",
            f"missing ({len(missing)} missing: {', '.join(missing[:10])}{more})",
        )

    def check_rows(
        self, rows: npt.NDArray[np.float32], field: str, values: Iterable[float] | None = None
    ) -> None:
        """Refuse NaN/inf in columns that do not allow it, naming row and feature.
        ``values``: the same numbers as a Python iterable (e.g. a memoryview of the wire
        bytes), summed by the interpreter instead of a numpy call for a row or two."""
        if not self.nan_allowed and math.isfinite(
            _add_reduce(rows, None) if values is None else sum(values)
        ):
            return  # one reduction: NaN or inf anywhere makes the sum non-finite
        finite = np.isfinite(rows)
        bad = ~(finite | self.nan_allowed_mask)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(
                field,
                f"row {row} feature {self.names[column]!r} is {rows[row, column]} (must be finite)",
            )
