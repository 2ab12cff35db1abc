"""Feature assembly: the model's input rows from request fields, Redis batch groups and
stream tiles.

``FeatureLayout`` is built once per loaded version (manifest + feature definitions):
which column comes from where, defaults, validation rules. On the request path:

1. ``FeatureLayout.prepare`` validates one request (unknown feature or entity, an
   entity id that is not its entity's canonical key (``feature_streams.entity_keys``:
   ``" c-1"``, an int entity's ``"042"``), out-of-range or NaN request value:
   ``InvalidInput`` naming it) and starts its row
   from defaults overlaid with every value the request carries. A request may carry
   any model feature: a value sent wins over the store (replays with frozen features,
   callers that compute features themselves), and a group whose every column was
   sent is not fetched at all.
2. ``FeatureStore.fill`` completes a whole micro-batch with ONE Redis pipeline: an
   ``HMGET`` per (batch group, entity) from the group's active snapshot and an
   ``HGETALL`` per (stream group, entity) tile hash; windows are evaluated at each
   request's time by ``feature_streams.hash_reader`` (which looks up exactly the tile
   fields each window reads, and is tested equal to ``feature_streams.windows``, the
   code of the worker and the backfill). Missing entities get the defined defaults
   and are listed as defaulted.
3. Redis unreachable: the model's policy decides. ``degrade`` (the default) answers
   with defaults and flags the response ``degraded`` — a fraud score from request
   features beats no answer for a card authorisation that cannot wait; ``fail``
   answers UNAVAILABLE. After a failure the store waits ``retry_interval_s`` before
   touching Redis again, so an outage costs no connect timeout per request, and
   reconnects by itself when Redis is back.

Without a definitions file the layout is request-only: every model feature must be
sent (the mode of a deployment without a feature store).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.exceptions import RedisError

from feature_streams.batch_store import (
    BatchReadPlan,
    BatchSnapshotCache,
    GroupReadSpec,
    SnapshotGoneError,
    queue_reads,
)
from feature_streams.definitions import (
    Entity,
    FeatureDefinitions,
    FeatureSource,
    RequestFeature,
    UndefinedFeaturesError,
    feature_sources,
    resolve_features,
)
from feature_streams.hash_reader import HashWindowReader
from feature_streams.tile_store import tile_key
from feature_streams.windows import GroupPlan
from server.errors import DependencyUnavailable, InvalidInput, ModelLoadError
from server.manifest import ModelManifest

logger = logging.getLogger(__name__)

FailurePolicy = Literal["degrade", "fail"]
F32_MAX = float(np.finfo(np.float32).max)
"""Largest magnitude a feature value may have: rows are float32, so a finite double
beyond it would reach the model as infinity."""
LAST_EVENT_FIELD = "_last_ts"
_LAST_EVENT_FIELD_BYTES = LAST_EVENT_FIELD.encode()


_NOT_FLOAT32 = "{} not allowed (must be finite and within float32 range)"


def _fits_float32(value: float) -> bool:
    """Finite and representable as a finite float32 (False for NaN)."""
    return -F32_MAX <= value <= F32_MAX


@dataclass(frozen=True, slots=True)
class BatchColumns:
    """One batch group a model reads: what to fetch and where it goes in the row."""

    spec: GroupReadSpec
    entity: str
    columns: tuple[int, ...]  # row column of each spec field, in spec order
    column_index: npt.NDArray[np.intp]  # the same, for numpy indexing


@dataclass(frozen=True, slots=True)
class StreamColumns:
    """One stream group a model reads: its tile plan and the columns of its outputs."""

    plan: GroupPlan
    entity: str
    outputs: tuple[tuple[str, int], ...]  # (feature name, row column)
    column_index: npt.NDArray[np.intp]
    reader: HashWindowReader
    placement: tuple[tuple[int, int], ...]  # (index in the reader's values, row column)


class Freshness(NamedTuple):
    """Age of the newest applied event behind a stream group, for one entity."""

    group: str
    entity: str
    age_ms: int


@dataclass(slots=True)
class Prepared:
    """One request on its way through assembly; ``row`` is completed in place."""

    row: npt.NDArray[np.float32]  # [1, F]
    sent: npt.NDArray[np.bool_]  # columns the request carried
    entity_ids: Mapping[str, str]
    t_ms: int
    store_sent: bool = False  # the request carried a column the store would fill
    defaulted: list[str] = field(default_factory=list)
    freshness: list[Freshness] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


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
    batch: tuple[BatchColumns, ...] = ()
    stream: tuple[StreamColumns, ...] = ()
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
            return cls(**base, defaults=np.zeros(len(names), np.float32))  # type: ignore[arg-type]
        try:
            resolution = resolve_features(definitions, names)
        except UndefinedFeaturesError as error:
            raise ModelLoadError(
                f"model {key} needs features that are not defined: {', '.join(error.names)}"
            ) from error
        defaults = np.array([ref.default for ref in resolution.refs], dtype=np.float32)
        batch = []
        for group_name in resolution.batch_groups:
            group = definitions.batch_groups[group_name]
            used = [n for n in names if n in group.fields]
            spec = GroupReadSpec.from_group(group, used)
            cols = tuple(index[n] for n in spec.fields)
            batch.append(BatchColumns(spec, group.entity, cols, np.array(cols, np.intp)))
        stream = []
        for group_name in resolution.stream_groups:
            stream_group = definitions.stream_groups[group_name]
            plan = GroupPlan.build(stream_group)
            outputs = tuple(
                (agg.name, index[agg.name])
                for agg in stream_group.aggregations
                if agg.name in index
            )
            cols_array = np.array([c for _, c in outputs], np.intp)
            position = {output.name: i for i, output in enumerate(plan.outputs)}
            placement = tuple((position[name], column) for name, column in outputs)
            stream.append(
                StreamColumns(
                    plan,
                    stream_group.entity,
                    outputs,
                    cols_array,
                    HashWindowReader(plan),
                    placement,
                )
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
            batch=tuple(batch),
            stream=tuple(stream),
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
        return bool(self.batch or self.stream)

    def assemble_row(self, features: Mapping[str, float]) -> npt.NDArray[np.float32]:
        """Request-only mode: one [1, F] row; every column must be present and valid."""
        found = [features.get(name) for name in self.names]
        if len(features) != len(self.names) or None in found:
            raise self._shape_error(features)
        values = cast(list[float], found)
        # all finite first: min/max are only meaningful without NaN
        if not all(map(math.isfinite, values)) or not (
            min(values) >= -F32_MAX and max(values) <= F32_MAX
        ):
            for name, value in zip(self.names, values, strict=True):
                if not _fits_float32(value) and name not in self.nan_allowed:
                    raise InvalidInput(f"features.{name}", _NOT_FLOAT32.format(value))
        return np.array(values, dtype=np.float32).reshape(1, -1)

    def prepare(
        self, features: Mapping[str, float], entity_ids: Mapping[str, str], t_ms: int
    ) -> Prepared:
        """Validate one request and start its row (defaults overlaid with sent values)."""
        if not self.uses_store and not self.request_rules:
            row = self.assemble_row(features)
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
                raise InvalidInput(f"features.{name}", "unknown feature")
            rule = self.request_rules.get(name)
            if rule is not None:
                problem = rule.violation(value)
                if problem is not None:
                    raise InvalidInput(f"features.{name}", problem)
            else:
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
        if not self.nan_allowed and math.isfinite(rows.sum()):
            return  # one reduction: NaN or inf anywhere makes the sum non-finite
        finite = np.isfinite(rows)
        bad = ~(finite | self.nan_allowed_mask)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(
                field,
                f"row {row} feature {self.names[column]!r} is {rows[row, column]} (must be finite)",
            )


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How the server talks to the feature store."""

    timeout_s: float = 0.05
    retry_interval_s: float = 0.5


class FeatureStore:
    """Fills micro-batches of prepared rows from Redis; one per process."""

    def __init__(
        self,
        client: Redis,
        snapshots: BatchSnapshotCache,
        options: StoreOptions = StoreOptions(),
        clock: Callable[[], float] = time.time,
        on_fetch: Callable[[float, int], None] | None = None,
    ) -> None:
        self._client = client
        self._snapshots = snapshots
        self._options = options
        self._clock = clock
        self._on_fetch = on_fetch
        self._down_until = 0.0
        self._refreshing: asyncio.Task[object] | None = None

    def now_ms(self) -> int:
        """The store's clock, epoch milliseconds (injectable for tests)."""
        return int(self._clock() * 1000)

    async def fill(
        self, layout: FeatureLayout, batch: Sequence[Prepared], policy: FailurePolicy
    ) -> None:
        """Complete every row of ``batch`` in place with one Redis round trip."""
        if not layout.uses_store or not batch:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            self._unavailable(layout, batch, policy, "redis_unavailable")
            return
        started = loop.time()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                batch_plans, stream_reads = self._queue(layout, batch, pipe)
                if not batch_plans and not stream_reads:
                    return
                results = await asyncio.wait_for(pipe.execute(), self._options.timeout_s)
        except (RedisError, OSError, TimeoutError) as error:
            self._down_until = loop.time() + self._options.retry_interval_s
            logger.warning("feature store unreachable", extra={"error": repr(error)})
            self._unavailable(layout, batch, policy, "redis_unavailable")
            return
        if self._on_fetch is not None:
            self._on_fetch(loop.time() - started, len(batch))
        offset = 0
        for columns, plan, members in batch_plans:
            chunk = results[offset : offset + plan.n_commands]
            offset += plan.n_commands
            self._apply_batch_group(columns, plan, members, chunk)
        for stream, stream_members, keys, unique in stream_reads:
            chunk = results[offset : offset + len(unique)]
            offset += len(unique)
            fetched = {
                key: raw if isinstance(raw, dict) else {}
                for key, raw in zip(unique, chunk, strict=True)
            }
            self._apply_stream_group(stream, stream_members, keys, fetched)

    def _queue(
        self, layout: FeatureLayout, batch: Sequence[Prepared], pipe: object
    ) -> tuple[
        list[tuple[BatchColumns, BatchReadPlan, list[Prepared]]],
        list[tuple[StreamColumns, list[Prepared], list[str], list[str]]],
    ]:
        batch_plans = []
        for columns in layout.batch:
            members = []
            for item in batch:
                if item.store_sent and item.sent[columns.column_index].all():
                    continue
                if columns.entity not in item.entity_ids:
                    self._missing_entity(layout, item, columns.columns)
                    continue
                members.append(item)
            if members:
                ids = [m.entity_ids[columns.entity] for m in members]
                snapshot = self._snapshots.snapshot_id(columns.spec.group)
                plan = queue_reads(pipe, columns.spec, snapshot, ids)  # type: ignore[arg-type]
                batch_plans.append((columns, plan, members))
        stream_reads = []
        for stream in layout.stream:
            members, keys = [], []
            queued: dict[str, None] = {}
            for item in batch:
                if item.store_sent and item.sent[stream.column_index].all():
                    continue
                entity_id = item.entity_ids.get(stream.entity)
                if entity_id is None:
                    self._missing_entity(layout, item, [c for _, c in stream.outputs])
                    continue
                key = tile_key(stream.plan.group.name, entity_id)
                if key not in queued:  # one HGETALL per entity, however many requests
                    queued[key] = None
                    pipe.hgetall(key)  # type: ignore[attr-defined]
                members.append(item)
                keys.append(key)
            if members:
                stream_reads.append((stream, members, keys, list(queued)))
        return batch_plans, stream_reads

    def _apply_batch_group(
        self,
        columns: BatchColumns,
        plan: BatchReadPlan,
        members: list[Prepared],
        results: Sequence[object],
    ) -> None:
        try:
            read = plan.decode(results)
        except SnapshotGoneError:
            self._refresh_snapshots()
            for item in members:
                item.degraded.append("batch_snapshot_gone")
                self._defaulted(item, columns.spec.fields, columns.columns)
            return
        fields, cols = columns.spec.fields, columns.columns
        for item in members:
            entity_id = item.entity_ids[columns.entity]
            values = read.values[entity_id]
            row = item.row[0]
            if item.store_sent:
                for name, column in zip(fields, cols, strict=True):
                    if not item.sent[column]:
                        row[column] = values[name]
            else:
                for name, column in zip(fields, cols, strict=True):
                    row[column] = values[name]
            if entity_id in read.missing_entities:
                self._defaulted(item, fields, cols)
            elif absent := read.missing_fields.get(entity_id):
                item.defaulted.extend(n for n in absent if not item.sent[self._col(columns, n)])

    @staticmethod
    def _col(columns: BatchColumns, name: str) -> int:
        return columns.columns[columns.spec.fields.index(name)]

    def _apply_stream_group(
        self,
        stream: StreamColumns,
        members: list[Prepared],
        keys: list[str],
        fetched: Mapping[str, Mapping[bytes, bytes]],
    ) -> None:
        group = stream.plan.group.name
        read_many = stream.reader.read_many
        placement = stream.placement
        by_key: dict[str, list[Prepared]] = {}
        for item, key in zip(members, keys, strict=True):
            by_key.setdefault(key, []).append(item)
        for key, items in by_key.items():
            hash_fields = fetched[key]
            last = hash_fields.get(_LAST_EVENT_FIELD_BYTES)
            last_ms = None if last is None else int(float(last))
            all_values = read_many(hash_fields, [item.t_ms for item in items])
            for item, values in zip(items, all_values, strict=True):
                row = item.row[0]
                if item.store_sent:
                    sent = item.sent
                    for position, column in placement:
                        if not sent[column]:
                            row[column] = values[position]
                else:
                    for position, column in placement:
                        row[column] = values[position]
                if last_ms is not None:
                    entity = item.entity_ids[stream.entity]
                    item.freshness.append(Freshness(group, entity, item.t_ms - last_ms))

    def _missing_entity(
        self, layout: FeatureLayout, item: Prepared, columns: Sequence[int]
    ) -> None:
        self._defaulted(item, [layout.names[c] for c in columns], columns)

    @staticmethod
    def _defaulted(item: Prepared, names: Sequence[str], columns: Sequence[int]) -> None:
        item.defaulted.extend(n for n, c in zip(names, columns, strict=True) if not item.sent[c])

    def _unavailable(
        self, layout: FeatureLayout, batch: Sequence[Prepared], policy: FailurePolicy, reason: str
    ) -> None:
        if policy == "fail":
            raise DependencyUnavailable(f"feature store unavailable ({reason})")
        for item in batch:
            item.degraded.append(reason)
            for columns in layout.batch:
                self._defaulted(item, columns.spec.fields, columns.columns)
            for stream in layout.stream:
                self._defaulted(
                    item, [n for n, _ in stream.outputs], [c for _, c in stream.outputs]
                )

    def _refresh_snapshots(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._snapshots.refresh())
