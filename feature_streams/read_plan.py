"""What the online fetcher reads for one micro-batch, and how the replies decode. Pure.

:class:`FetchPlan` (built once per model version) says which batch-group fields
and which stream-group windows fill which columns of a row. :class:`FetchRow` is
one request's row on its way through the fetch: the caller fills ``row``,
``sent``, ``entity_ids`` and ``t_ms``; :class:`feature_streams.fetcher.FeatureFetcher`
completes the row in place and records what it served as defaults, the freshness
of each stream group and the snapshot ids it read.

Batch snapshots are read by :func:`queue_reads` / :meth:`BatchReadPlan.decode`
under the consistency rule of :mod:`feature_streams.batch_store`:

* a whole micro-batch of one group is read from ONE snapshot id (the active one,
  cached by :class:`~feature_streams.fetcher.BatchSnapshotCache`); a snapshot only
  becomes active once fully written and is never written again, so a read sees one
  complete snapshot, never a mix;
* each group's reads end with an ``HGET`` of the snapshot's registry entry.
  Commands of one connection run in order, so if that entry is not ``deleting``,
  every value read before it predates the deletion; otherwise
  :meth:`BatchReadPlan.decode` raises :class:`SnapshotGoneError` rather than return
  a partial snapshot. (On Redis Cluster a pipeline spans nodes, so there only the
  writer's grace period holds.)

Read path of one group, per micro-batch::

    snapshot_id = cache.snapshot_id(spec.group)           # one id for the micro-batch
    async with client.pipeline(transaction=False) as pipe:
        plan = queue_reads(pipe, spec, snapshot_id, entity_ids)
        ...                                               # stream tile reads, same pipe
        results = await pipe.execute()
    batch = plan.decode(results[:plan.n_commands])        # its slice, in queue order
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from feature_streams.definitions import BatchGroup, FeatureDefinitions
from feature_streams.hash_reader import HashWindowReader
from feature_streams.keys import READABLE_STATES, check_group, data_key, registry_key
from feature_streams.windows import GroupPlan

__all__ = [
    "BatchColumns",
    "BatchReadPlan",
    "BatchReadResult",
    "FetchPlan",
    "FetchRow",
    "Freshness",
    "GroupReadSpec",
    "ReadPipeline",
    "SnapshotGoneError",
    "StreamColumns",
    "queue_reads",
]


class SnapshotGoneError(Exception):
    """A read raced the deletion of its snapshot; its values must not be used.

    Only possible when a reader kept a pointer longer than the grace period. Refresh
    the snapshot cache and read again (or serve defaults, flagged).
    """

    def __init__(self, group: str, snapshot_id: str) -> None:
        self.group = group
        self.snapshot_id = snapshot_id
        super().__init__(f"batch group {group!r}: snapshot {snapshot_id!r} is being deleted")


class ReadPipeline(Protocol):
    """The part of a redis-py pipeline the read plan queues commands on."""

    def hmget(self, name: str, keys: Any, /) -> object: ...
    def hget(self, name: str, key: str, /) -> object: ...
    def hgetall(self, name: str, /) -> object: ...


# --- batch snapshots -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupReadSpec:
    """Which fields of a group to read, with their defaults (build once per model)."""

    group: str
    fields: tuple[str, ...]
    defaults: tuple[float, ...]

    def __post_init__(self) -> None:
        check_group(self.group)
        if not self.fields or len(self.fields) != len(self.defaults):
            raise ValueError("fields must be non-empty and match defaults one to one")

    @classmethod
    def from_group(cls, group: BatchGroup, fields: Sequence[str] | None = None) -> GroupReadSpec:
        """All of ``group``'s fields, or the named ones (``KeyError`` names an unknown one)."""
        names = tuple(group.fields) if fields is None else tuple(dict.fromkeys(fields))
        for name in names:
            if name not in group.fields:
                raise KeyError(f"batch group {group.name!r} has no field {name!r}")
        defaults = tuple(float(group.fields[n].default) for n in names)
        return cls(group.name, names, defaults)

    @property
    def default_values(self) -> dict[str, float]:
        """A fresh ``{field: default}`` dict."""
        return dict(zip(self.fields, self.defaults, strict=True))


@dataclass(frozen=True, slots=True)
class BatchReadResult:
    """One group's values for a micro-batch, all from ``snapshot_id``.

    ``values`` has every requested entity; ``missing_entities`` got all defaults (no
    row in the snapshot, or no snapshot at all); ``missing_fields`` lists, per entity
    that has a row, the fields served as defaults. ``key_errors`` (entity -> Redis
    error, e.g. ``WRONGTYPE``: its key holds no hash) and ``invalid_fields`` (entity ->
    fields holding no finite number) are also among the missing: a problem of one
    entity's data, not of the store.
    """

    group: str
    snapshot_id: str | None
    values: Mapping[str, Mapping[str, float]]
    missing_entities: frozenset[str]
    missing_fields: Mapping[str, tuple[str, ...]]
    key_errors: Mapping[str, str] = field(default_factory=dict)
    invalid_fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchReadPlan:
    """Commands :func:`queue_reads` added to a pipeline; decodes their results."""

    spec: GroupReadSpec
    snapshot_id: str | None
    entity_ids: tuple[str, ...]

    @property
    def n_commands(self) -> int:
        """How many pipeline results belong to this plan."""
        return 0 if self.snapshot_id is None else len(self.entity_ids) + 1

    def decode(self, results: Sequence[object]) -> BatchReadResult:
        """Per-entity values from this plan's slice of the pipeline results.

        Raises :class:`SnapshotGoneError` if the snapshot was being deleted, and
        re-raises an error the pipeline returned for the registry entry; an error in
        place of one entity's row is that entity's (``key_errors``, defaults served).
        """
        if len(results) != self.n_commands:
            raise ValueError(f"expected {self.n_commands} results, got {len(results)}")
        if results and isinstance(results[-1], BaseException):
            raise results[-1]
        spec = self.spec
        if self.snapshot_id is None:
            return BatchReadResult(
                spec.group,
                None,
                {e: spec.default_values for e in self.entity_ids},
                frozenset(self.entity_ids),
                {},
            )
        registry_entry = results[-1]
        state = None
        if isinstance(registry_entry, str | bytes):
            state = json.loads(registry_entry).get("state")
        if state not in READABLE_STATES:
            raise SnapshotGoneError(spec.group, self.snapshot_id)

        values: dict[str, Mapping[str, float]] = {}
        missing_entities: set[str] = set()
        missing_fields: dict[str, tuple[str, ...]] = {}
        key_errors: dict[str, str] = {}
        invalid_fields: dict[str, tuple[str, ...]] = {}
        fields, defaults = spec.fields, spec.defaults
        for entity_id, raw in zip(self.entity_ids, results, strict=False):
            if isinstance(raw, BaseException):
                key_errors[entity_id] = str(raw)
                values[entity_id] = spec.default_values
                missing_entities.add(entity_id)
                continue
            if not isinstance(raw, list | tuple) or len(raw) != len(fields):
                raise ValueError(f"result for entity {entity_id!r} is not an HMGET reply")
            row: dict[str, float] = {}
            absent: list[str] = []
            invalid: list[str] = []
            for name, default, cell in zip(fields, defaults, raw, strict=True):
                value = _parse(cell)
                if value is None:
                    absent.append(name)
                    row[name] = default
                    if cell is not None:
                        invalid.append(name)
                else:
                    row[name] = value
            values[entity_id] = row
            if invalid:
                invalid_fields[entity_id] = tuple(invalid)
            if len(absent) == len(fields):
                missing_entities.add(entity_id)
            elif absent:
                missing_fields[entity_id] = tuple(absent)
        return BatchReadResult(
            spec.group,
            self.snapshot_id,
            values,
            frozenset(missing_entities),
            missing_fields,
            key_errors,
            invalid_fields,
        )


def _parse(cell: object) -> float | None:
    """A stored value, or ``None`` when absent or no finite number (default served)."""
    if cell is None:
        return None
    try:
        value = float(cell)  # type: ignore[arg-type]  # bytes/str from HMGET
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def queue_reads(
    pipe: ReadPipeline, spec: GroupReadSpec, snapshot_id: str | None, entity_ids: Iterable[str]
) -> BatchReadPlan:
    """Add one group's reads for a micro-batch to ``pipe``; decode with the returned plan.

    Call once per group per micro-batch with ``cache.snapshot_id(group)`` so the whole
    micro-batch reads one snapshot. Queues one ``HMGET`` per distinct entity plus an
    ``HGET`` of the snapshot's registry entry (the deletion check); nothing when
    ``snapshot_id`` is ``None`` (group never loaded: every entity gets defaults).
    """
    unique = tuple(dict.fromkeys(entity_ids))
    if snapshot_id is not None:
        group = spec.group
        for entity_id in unique:
            pipe.hmget(data_key(group, snapshot_id, entity_id), spec.fields)
        pipe.hget(registry_key(group), snapshot_id)
    return BatchReadPlan(spec, snapshot_id, unique)


# --- one model version's reads -----------------------------------------------------


class Freshness(NamedTuple):
    """Age of the newest applied event behind a stream group, for one entity."""

    group: str
    entity: str
    age_ms: int


@dataclass(slots=True)
class FetchRow:
    """One request's row: the caller fills the first four fields, the fetch the rest.

    Start ``row`` from the columns' defaults: a column the fetch lists in
    ``defaulted`` because it had nothing to read there (no entity id, snapshot gone)
    is left as the row holds it.

    ``sent`` marks columns the caller already holds; when ``store_sent`` is true some
    of them are store columns, which the fetch then leaves as they are (and a group
    whose every column was sent is not read at all).
    """

    row: npt.NDArray[np.float32]  # [1, F], completed in place
    sent: npt.NDArray[np.bool_]  # columns the caller holds
    entity_ids: Mapping[str, str]
    t_ms: int
    store_sent: bool = False  # the caller holds a column the store would fill
    defaulted: list[str] = field(default_factory=list)
    """Columns served as their defined default (no entity id, no row, no value...)."""
    freshness: list[Freshness] = field(default_factory=list)
    """Per stream group read with a known last event: how old that event is."""
    degraded: list[str] = field(default_factory=list)
    """Why store values are defaults because of a store problem (e.g. a snapshot gone)."""
    snapshots: Mapping[str, str | None] = field(default_factory=dict)
    """Batch group -> snapshot id read for this row (``None``: group never loaded)."""


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


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """Which store reads fill which columns of a row (built once per model version)."""

    names: tuple[str, ...]
    batch: tuple[BatchColumns, ...] = ()
    stream: tuple[StreamColumns, ...] = ()

    @classmethod
    def build(
        cls,
        definitions: FeatureDefinitions,
        names: Sequence[str],
        batch_groups: Iterable[str],
        stream_groups: Iterable[str],
    ) -> FetchPlan:
        """Plan the reads of ``batch_groups`` and ``stream_groups`` for the columns
        ``names`` (only the fields and outputs named there are placed)."""
        index = {name: i for i, name in enumerate(names)}
        batch = []
        for group_name in batch_groups:
            group = definitions.batch_groups[group_name]
            used = [n for n in names if n in group.fields]
            spec = GroupReadSpec.from_group(group, used)
            cols = tuple(index[n] for n in spec.fields)
            batch.append(BatchColumns(spec, group.entity, cols, np.array(cols, np.intp)))
        stream = []
        for group_name in stream_groups:
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
        return cls(tuple(names), tuple(batch), tuple(stream))

    @property
    def uses_store(self) -> bool:
        """True when some column comes from Redis."""
        return bool(self.batch or self.stream)

    def sources(self, row: FetchRow) -> dict[str, str]:
        """Where each store column of a fetched ``row`` came from, by feature name:
        ``request`` (sent), ``default``, ``snapshot:<group>/<id>`` or ``stream:<group>``.

        Off the request path (decision records, debugging): not cheap.
        """
        defaulted = set(row.defaulted)
        out: dict[str, str] = {}

        def put(name: str, column: int, source: str) -> None:
            if row.sent[column]:
                out[name] = "request"
            elif name in defaulted:
                out[name] = "default"
            else:
                out[name] = source

        for columns in self.batch:
            group = columns.spec.group
            source = f"snapshot:{group}/{row.snapshots.get(group)}"
            for name, column in zip(columns.spec.fields, columns.columns, strict=True):
                put(name, column, source)
        for stream in self.stream:
            for name, column in stream.outputs:
                put(name, column, f"stream:{stream.plan.group.name}")
        return out
