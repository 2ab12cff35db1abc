"""The one declarative feature definition file, loaded into validated frozen models.

``features.yaml`` declares every feature a model may take and where it comes from;
the stream worker, the server's feature assembly and the offline backfill all load
it with :func:`load_definitions`, so they agree by construction.

Layout (mapping keys are the names; every name is ``[A-Za-z_][A-Za-z0-9_]*``)::

    version: 1
    entities:                        # what features are keyed by
      card_id: {key_type: str}       # str | int
    batch_groups:                    # precomputed, loaded into Redis by pipelines
      card_profile:
        entity: card_id
        fields:
          card_age_days: {dtype: float, default: 365.0}   # dtype: float | int | bool
    stream_groups:                   # windows over a Kafka topic (see windows.py)
      card_activity:
        topic: transactions
        entity: card_id
        key_field: card_id           # event field holding the key; defaults to `entity`
        event_time_field: event_time_ms   # epoch milliseconds
        allowed_lateness: 10m
        tiles:                       # a window uses the smallest tier whose
          - {size: 1m, max_window: 1h}    # max_window >= window, unless the
          - {size: 1h, max_window: 7d}    # aggregation names `tile:` itself
        aggregations:
          - {name: card_txn_count_1h, agg: count, window: 1h}
          - {name: card_amount_max_24h, agg: max, field: amount, window: 24h}
          - {name: card_intl_count_24h, agg: count, window: 24h,
             where: {is_international: 1}}
    request_features:                # sent with the scoring call
      amount: {dtype: float, gt: 0, default: 1.0}   # ge/gt/le/lt, allow_nan: false

Durations are ``<int><unit>`` with unit ``ms``, ``s``, ``m``, ``h`` or ``d`` and are
stored as integer milliseconds (fields ending in ``_ms``). Aggregations are
``count``, ``sum``, ``mean``, ``min``, ``max``, ``last`` (value of the latest event)
and ``time_since_last`` (seconds since the latest event); ``field`` is required
except for ``count`` and ``time_since_last``, which take none. A window's length
must be a multiple of its tile size. ``default`` is the value of a window that
holds no event (and the value to serve when the state cannot be read); it may be
omitted only for ``count`` and ``sum`` (0.0). Feature names are unique across
request features, batch fields and stream aggregations.

Every problem is reported with its key path, all at once, in a
:class:`DefinitionError`, e.g.
``stream_groups.card_activity.aggregations[2].window: '5x' is not a duration``.

An entity's ``key_type`` decides how a raw id becomes its key (:meth:`Entity.key`,
rule in :mod:`feature_streams.entity_keys`).

This module does no I/O beyond reading the one file, and imports no asyncio,
redis, aiokafka, grpc or server code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from feature_streams.entity_keys import EntityKeyError, KeyType, entity_key, key_problem

__all__ = [
    "AggKind",
    "Aggregation",
    "BatchField",
    "BatchGroup",
    "DType",
    "DefinitionError",
    "Entity",
    "EntityKeyError",
    "FeatureDefinitions",
    "FeatureRef",
    "FeatureResolution",
    "FeatureSource",
    "RequestFeature",
    "StreamGroup",
    "TileTier",
    "UndefinedFeaturesError",
    "feature_sources",
    "format_duration",
    "load_definitions",
    "parse_definitions",
    "parse_duration",
    "resolve_features",
]

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""Feature, group and entity names: identifiers, since they become Redis key parts,
tile fields and column names (model names: ``server.manifest.MODEL_NAME_PATTERN``)."""
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS: dict[str, int] = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}


class DefinitionError(ValueError):
    """The definition file is unreadable or invalid; ``problems`` lists every issue."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid feature definitions in {source}:\n{lines}")


class UndefinedFeaturesError(KeyError):
    """Some requested feature names are not defined; ``names`` lists all of them."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        super().__init__(f"undefined features: {', '.join(self.names)}")

    def __str__(self) -> str:
        return str(self.args[0])


def parse_duration(text: str) -> int:
    """``'5m'`` -> 300000 (milliseconds). Raises ``ValueError`` naming the text."""
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use e.g. 500ms, 30s, 5m, 1h, 7d)")
    value = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def format_duration(ms: int) -> str:
    """Canonical text of a duration: the largest unit dividing it (300000 -> ``'5m'``)."""
    for unit, size in _UNIT_MS.items():
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _duration(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"{value!r} is not a duration: write a unit, e.g. '{value}ms' or '{value}s'"
        )
    raise ValueError(f"{value!r} is not a duration")


DurationMs = Annotated[int, BeforeValidator(_duration)]
"""A duration written as text in the file, held as integer milliseconds."""


def _scalar(value: object) -> object:
    if isinstance(value, bool | int | str):
        return value
    raise ValueError(f"{value!r} is not a bool, int or string")


def _number(value: object) -> object:
    if isinstance(value, bool | int | float):
        return value
    raise ValueError(f"{value!r} is not a number or bool")


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Scalar = Annotated[bool | int | str, BeforeValidator(_scalar)]
"""A ``where`` value: compared with ``==`` to the event's field (``1 == True``)."""
DType = Literal["float", "int", "bool"]


class AggKind(StrEnum):
    """Window aggregations."""

    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    LAST = "last"
    TIME_SINCE_LAST = "time_since_last"


_NO_FIELD = frozenset({AggKind.COUNT, AggKind.TIME_SINCE_LAST})
_ZERO_DEFAULT = frozenset({AggKind.COUNT, AggKind.SUM})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Entity(_Frozen):
    """Something features are keyed by (a card, a customer, a merchant)."""

    name: Name
    key_type: KeyType = "str"

    def key(self, raw: object) -> str:
        """The key a raw id of this entity is stored under; raises
        :class:`EntityKeyError` (rule: :mod:`feature_streams.entity_keys`)."""
        return entity_key(self.key_type, raw)

    def key_problem(self, text: str) -> str | None:
        """Why ``text`` is not a canonical key of this entity, or ``None`` when it is."""
        return key_problem(self.key_type, text)


class BatchField(_Frozen):
    """One precomputed feature of a batch group."""

    name: Name
    dtype: DType = "float"
    default: Annotated[bool | int | float, BeforeValidator(_number)]


class BatchGroup(_Frozen):
    """Features precomputed offline for one entity, stored together."""

    name: Name
    entity: Name
    fields: dict[Name, BatchField]


class TileTier(_Frozen):
    """Tiles of ``size_ms`` serve windows up to ``max_window_ms`` long."""

    size_ms: DurationMs = Field(alias="size")
    max_window_ms: DurationMs = Field(alias="max_window")


class Aggregation(_Frozen):
    """One stream feature: ``agg`` of ``field`` over the last ``window_ms``."""

    name: Name
    agg: AggKind
    field: Name | None = None
    window_ms: DurationMs = Field(alias="window")
    tile_ms: DurationMs | None = Field(default=None, alias="tile")
    where: dict[Name, Scalar] = Field(default_factory=dict)
    """Only events whose fields equal all of these values (``==``) are aggregated."""
    default: float | None = None

    @property
    def default_value(self) -> float:
        """The value of an empty window (0.0 for count/sum when not given)."""
        return 0.0 if self.default is None else self.default


class StreamGroup(_Frozen):
    """Windowed aggregations over one topic, keyed by one entity."""

    name: Name
    topic: str = Field(min_length=1)
    entity: Name
    key_field: Name | None = None
    """Event field holding the entity key; ``None`` means the entity's name."""
    event_time_field: Name
    allowed_lateness_ms: DurationMs = Field(alias="allowed_lateness")
    tiles: tuple[TileTier, ...]
    aggregations: tuple[Aggregation, ...]

    @property
    def key(self) -> str:
        """The event field holding the entity key."""
        return self.key_field or self.entity

    def tile_for(self, aggregation: Aggregation) -> int:
        """Tile size (ms) of an aggregation: its ``tile`` or the first fitting tier.

        Tiers are tried from the smallest size up; the first whose ``max_window``
        covers the window wins. Raises ``ValueError`` when none does.
        """
        if aggregation.tile_ms is not None:
            return aggregation.tile_ms
        for tier in sorted(self.tiles, key=lambda t: t.size_ms):
            if aggregation.window_ms <= tier.max_window_ms:
                return tier.size_ms
        raise ValueError(
            f"window {format_duration(aggregation.window_ms)} is longer than every "
            "tile tier's max_window"
        )


class RequestFeature(_Frozen):
    """A feature sent with the scoring call, with its valid range."""

    name: Name
    dtype: DType = "float"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    allow_nan: bool = False
    default: float

    def violation(self, value: float) -> str | None:
        """Why ``value`` is invalid for this feature, or ``None`` when it is valid."""
        if math.isnan(value):
            return None if self.allow_nan else f"{self.name}: NaN is not allowed"
        if math.isinf(value):
            return f"{self.name}: {value!r} is not finite"
        if self.dtype != "float" and not float(value).is_integer():
            return f"{self.name}: {value!r} is not an integer"
        if self.ge is not None and not value >= self.ge:
            return f"{self.name}: {value!r} is not >= {self.ge!r}"
        if self.gt is not None and not value > self.gt:
            return f"{self.name}: {value!r} is not > {self.gt!r}"
        if self.le is not None and not value <= self.le:
            return f"{self.name}: {value!r} is not <= {self.le!r}"
        if self.lt is not None and not value < self.lt:
            return f"{self.name}: {value!r} is not < {self.lt!r}"
        return None


REASON_CODE_PATTERN = r"^[A-Za-z0-9_.-]+$"


class ReasonDefinition(_Frozen):
    """One reason code: plain-language text and the features it stands for.

    Correlated features share a code; the server sums their contributions."""

    code: str = Field(pattern=REASON_CODE_PATTERN)
    text: str = Field(min_length=1)
    features: tuple[Name, ...] = Field(min_length=1)


class FeatureDefinitions(_Frozen):
    """The whole definition file. Treat the dicts as read-only."""

    version: Literal[1] = 1
    entities: dict[Name, Entity]
    batch_groups: dict[Name, BatchGroup] = Field(default_factory=dict)
    stream_groups: dict[Name, StreamGroup] = Field(default_factory=dict)
    request_features: dict[Name, RequestFeature] = Field(default_factory=dict)
    reasons: dict[str, ReasonDefinition] = Field(
        default_factory=dict, description="Reason-code catalogue by code (reason codes)."
    )


class FeatureSource(StrEnum):
    """Where a feature's value comes from at request time."""

    REQUEST = "request"
    BATCH = "batch"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """Where one feature comes from. ``group``/``entity`` are ``None`` for request ones."""

    name: str
    source: FeatureSource
    group: str | None
    entity: str | None
    dtype: str
    default: float


@dataclass(frozen=True, slots=True)
class FeatureResolution:
    """A feature list resolved in order, plus the groups it needs fetched."""

    refs: tuple[FeatureRef, ...]
    batch_groups: tuple[str, ...]
    stream_groups: tuple[str, ...]


def feature_sources(defs: FeatureDefinitions) -> dict[str, FeatureRef]:
    """Every defined feature by name."""
    out: dict[str, FeatureRef] = {}
    for req in defs.request_features.values():
        out[req.name] = FeatureRef(
            req.name, FeatureSource.REQUEST, None, None, req.dtype, req.default
        )
    for bg in defs.batch_groups.values():
        for f in bg.fields.values():
            out[f.name] = FeatureRef(
                f.name, FeatureSource.BATCH, bg.name, bg.entity, f.dtype, float(f.default)
            )
    for sg in defs.stream_groups.values():
        for agg in sg.aggregations:
            out[agg.name] = FeatureRef(
                agg.name, FeatureSource.STREAM, sg.name, sg.entity, "float", agg.default_value
            )
    return out


def resolve_features(defs: FeatureDefinitions, names: Sequence[str]) -> FeatureResolution:
    """Resolve a model's feature list; raises :class:`UndefinedFeaturesError` naming all
    undefined ones. Groups are listed in first-use order."""
    sources = feature_sources(defs)
    missing = [n for n in names if n not in sources]
    if missing:
        raise UndefinedFeaturesError(list(dict.fromkeys(missing)))
    refs = tuple(sources[n] for n in names)
    batch = [r.group for r in refs if r.source is FeatureSource.BATCH and r.group]
    stream = [r.group for r in refs if r.source is FeatureSource.STREAM and r.group]
    return FeatureResolution(refs, tuple(dict.fromkeys(batch)), tuple(dict.fromkeys(stream)))


# --- loading -------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return dict(loader.construct_pairs(node, deep=True))


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_definitions(path: str | os.PathLike[str]) -> FeatureDefinitions:
    """Read and validate a definition file; raises :class:`DefinitionError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError(str(p), [f"cannot read: {exc}"]) from exc
    return parse_definitions(text, source=str(p))


def parse_definitions(text: str, source: str = "<string>") -> FeatureDefinitions:
    """Validate definition file text; raises :class:`DefinitionError` with key paths."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise DefinitionError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise DefinitionError(source, ["<root>: expected a mapping"])
    try:
        defs = FeatureDefinitions.model_validate(_with_names(raw))
    except ValidationError as exc:
        raise DefinitionError(source, [_format_error(e) for e in exc.errors()]) from None
    problems = list(_semantic_problems(defs))
    if problems:
        raise DefinitionError(source, problems)
    return defs


def _named(section: object) -> object:
    """Copy each mapping entry's key into its ``name`` unless it states one."""
    if not isinstance(section, dict):
        return section
    return {
        k: ({"name": k, **v} if isinstance(v, dict) and "name" not in v else v)
        for k, v in section.items()
    }


def _with_codes(section: object) -> object:
    """Copy each reason's key into its ``code`` unless it states one."""
    if not isinstance(section, dict):
        return section
    return {
        k: ({"code": k, **v} if isinstance(v, dict) and "code" not in v else v)
        for k, v in section.items()
    }


def _with_names(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    if "reasons" in raw:
        out["reasons"] = _with_codes(raw["reasons"])
    for key in ("entities", "stream_groups", "request_features"):
        out[key] = _named(raw.get(key, {}))
    groups = _named(raw.get("batch_groups", {}))
    if isinstance(groups, dict):
        groups = {
            k: ({**g, "fields": _named(g.get("fields"))} if isinstance(g, dict) else g)
            for k, g in groups.items()
        }
    out["batch_groups"] = groups
    return out


def _format_loc(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "<root>"


def _format_error(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "missing":
        msg = "required key is missing"
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif isinstance(err.get("input"), bool | int | float | str):
        msg = f"{err['input']!r}: {msg}"
    return f"{_format_loc(err['loc'])}: {msg}"


def _semantic_problems(defs: FeatureDefinitions) -> Iterator[str]:
    """Cross-reference checks pydantic cannot express, each with its key path."""
    sections: list[tuple[str, Mapping[str, BaseModel]]] = [
        ("entities", defs.entities),
        ("batch_groups", defs.batch_groups),
        ("stream_groups", defs.stream_groups),
        ("request_features", defs.request_features),
    ]
    for section, items in sections:
        for key, item in items.items():
            if getattr(item, "name", key) != key:
                yield f"{section}.{key}.name: must equal its key {key!r}"

    defined_at: dict[str, str] = {}

    def claim(name: str, path: str) -> Iterator[str]:
        if name in defined_at:
            yield f"{path}: feature {name!r} is already defined at {defined_at[name]}"
        else:
            defined_at[name] = path

    for name, req in defs.request_features.items():
        path = f"request_features.{name}"
        yield from claim(name, path)
        if req.violation(req.default) is not None:
            yield f"{path}.default: {req.violation(req.default)}"

    for gname, bg in defs.batch_groups.items():
        path = f"batch_groups.{gname}"
        if bg.entity not in defs.entities:
            yield f"{path}.entity: unknown entity {bg.entity!r}"
        if not bg.fields:
            yield f"{path}.fields: at least one field is required"
        for fname, f in bg.fields.items():
            fpath = f"{path}.fields.{fname}"
            if f.name != fname:
                yield f"{fpath}.name: must equal its key {fname!r}"
            yield from claim(f.name, fpath)
            problem = _default_problem(f.dtype, f.default)
            if problem:
                yield f"{fpath}.default: {problem}"

    for gname, sg in defs.stream_groups.items():
        path = f"stream_groups.{gname}"
        if sg.entity not in defs.entities:
            yield f"{path}.entity: unknown entity {sg.entity!r}"
        if not sg.tiles:
            yield f"{path}.tiles: at least one tile tier is required"
        if not sg.aggregations:
            yield f"{path}.aggregations: at least one aggregation is required"
        sizes = [t.size_ms for t in sg.tiles]
        if len(set(sizes)) != len(sizes):
            yield f"{path}.tiles: tile sizes must be distinct"
        for i, tier in enumerate(sg.tiles):
            if tier.max_window_ms % tier.size_ms:
                yield f"{path}.tiles[{i}].max_window: not a multiple of size"
        for i, agg in enumerate(sg.aggregations):
            apath = f"{path}.aggregations[{i}]"
            yield from claim(agg.name, f"{apath}.name")
            yield from _aggregation_problems(sg, agg, apath, sizes)

    yield from _reason_problems(defs, defined_at)


def _reason_problems(defs: FeatureDefinitions, defined: Mapping[str, str]) -> Iterator[str]:
    """Reasons name defined features, each feature in at most one reason."""
    reason_of: dict[str, str] = {}
    for code, reason in defs.reasons.items():
        path = f"reasons.{code}"
        if reason.code != code:
            yield f"{path}.code: must equal its key {code!r}"
        unknown = [f for f in reason.features if f not in defined]
        if unknown:
            yield f"{path}.features: unknown features {unknown}"
        for name in reason.features:
            if name in reason_of:
                yield f"{path}.features: {name!r} is already in reason {reason_of[name]!r}"
            else:
                reason_of[name] = code


def _aggregation_problems(
    sg: StreamGroup, agg: Aggregation, apath: str, sizes: Sequence[int]
) -> Iterator[str]:
    if agg.agg in _NO_FIELD and agg.field is not None:
        yield f"{apath}.field: {agg.agg} takes no field"
    if agg.agg not in _NO_FIELD and agg.field is None:
        yield f"{apath}.field: required for {agg.agg}"
    if agg.field is not None and agg.field in (sg.key, sg.event_time_field):
        yield f"{apath}.field: {agg.field!r} is the group's key or event time field"
    if agg.default is None and agg.agg not in _ZERO_DEFAULT:
        yield f"{apath}.default: required for {agg.agg}"
    elif agg.default is not None and not math.isfinite(agg.default):
        yield f"{apath}.default: must be finite"
    if agg.tile_ms is not None and agg.tile_ms not in sizes:
        yield f"{apath}.tile: {format_duration(agg.tile_ms)} is not one of the group's tiles"
        return
    try:
        tile = sg.tile_for(agg)
    except ValueError as exc:
        yield f"{apath}.window: {exc}"
        return
    if agg.window_ms % tile:
        yield (
            f"{apath}.window: {format_duration(agg.window_ms)} is not a multiple of its "
            f"tile size {format_duration(tile)}"
        )


def _default_problem(dtype: str, default: bool | int | float) -> str | None:
    if dtype == "bool" and not isinstance(default, bool):
        return f"{default!r} is not a bool"
    if dtype == "int" and (isinstance(default, bool) or not isinstance(default, int)):
        return f"{default!r} is not an int"
    if dtype == "float" and isinstance(default, bool):
        return f"{default!r} is not a float"
    if dtype == "float" and not math.isfinite(float(default)):
        return "must be finite"
    return None
