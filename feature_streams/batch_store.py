"""Batch feature snapshots in Redis: write, atomic flip, rollback, consistent reads.

A batch group (``customer_profile``…) is served from one immutable *snapshot*: a
full copy of the group's values written by :func:`write_snapshot`, made live by
:func:`activate` (one atomic pointer flip) and never modified afterwards.

Key layout (``<g>`` group name, ``<s>`` snapshot id, ``<e>`` entity id)::

    bf:<g>:<s>:<e>        hash    field -> value as float text, one per entity
    bf:{<g>}:active       string  id of the snapshot readers use
    bf:{<g>}:previous     string  id of the snapshot rollback restores
    bf:{<g>}:snapshots    hash    id -> JSON {state, created_at_ms, rows, source,
                                  ready_at_ms, activated_at_ms, deactivated_at_ms}

The three metadata keys share the hash tag ``{<g>}`` (one Redis Cluster slot), so the
flip script may touch them together; data keys carry no tag and spread over the
cluster. A field left empty in the file is not stored; readers serve its default.
**No key has a TTL**: a snapshot lives until a later load replaces it and the
garbage rule below deletes it.

Snapshot states: ``loading`` (being written) -> ``ready`` -> ``active`` <->
``previous`` -> ``retired`` -> ``deleting`` -> gone. :func:`activate` makes the
target ``active``, the old active ``previous`` and the old previous ``retired``, in
one Lua script over the metadata keys. :func:`rollback` is ``activate(previous)``:
it *swaps* active and previous, so the rolled-back snapshot stays available as
``previous`` (a second rollback undoes the first) and nothing is deleted.

Consistency rule:

* Readers take ``active`` from :class:`BatchSnapshotCache` (refreshed every ~0.5 s)
  and read a whole micro-batch of one group from that ONE snapshot id
  (:func:`queue_reads`). A snapshot only becomes active once fully written, and is
  never written again, so every read sees one complete snapshot, never a mix.
* :func:`collect_garbage` deletes only ``retired`` snapshots (neither active nor
  previous) whose ``deactivated_at_ms`` (when they stopped being active) is at least
  ``grace_s`` old, plus abandoned ``loading``/``ready`` ones; a deletion that is not
  yet due is deferred to the next load. So a reader holding a just-replaced pointer
  always finds its snapshot complete: the snapshot is at least ``previous`` for a
  whole load cycle and ``grace_s`` (default 60 s) far exceeds the cache refresh.
* Belt and braces: a snapshot is marked ``deleting`` (atomically, before any key is
  unlinked), and each read plan ends with an ``HGET`` of the snapshot's registry
  entry. Commands of one connection run in order, so if that entry is not
  ``deleting``, every value read before it predates the deletion; otherwise
  :meth:`BatchReadPlan.decode` raises :class:`SnapshotGoneError` rather than return a
  partial snapshot. (On Redis Cluster a pipeline spans nodes, so there only the
  grace period holds.)

Server read path, per micro-batch (``spec`` built once per model version)::

    snapshot_id = cache.snapshot_id(spec.group)           # one id for the micro-batch
    async with client.pipeline(transaction=False) as pipe:
        plan = queue_reads(pipe, spec, snapshot_id, entity_ids)
        ...                                               # stream tile reads, same pipe
        results = await pipe.execute()
    batch = plan.decode(results[:plan.n_commands])        # its slice, in queue order
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from feature_streams.definitions import NAME_PATTERN, BatchGroup

__all__ = [
    "DEFAULT_GRACE_S",
    "ActivateResult",
    "BatchReadPlan",
    "BatchReadResult",
    "BatchSnapshotCache",
    "BatchStoreError",
    "GroupReadSpec",
    "SnapshotGoneError",
    "SnapshotInfo",
    "SnapshotStateError",
    "activate",
    "collect_garbage",
    "data_key",
    "delete_snapshot",
    "get_pointers",
    "list_snapshots",
    "new_snapshot_id",
    "queue_reads",
    "rollback",
    "write_snapshot",
]

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S: Final = 60.0
"""How long a snapshot stays after it stopped being active (and is no longer previous)."""
DEFAULT_ABANDONED_AFTER_S: Final = 6 * 3600.0
"""A snapshot still ``loading``/``ready`` (never activated) this long after creation is
garbage: its loader crashed or gave up."""
DEFAULT_CHUNK_SIZE: Final = 1_000
_DELETE_CHUNK: Final = 1_000

_GROUP_RE: Final = re.compile(NAME_PATTERN)
_SNAPSHOT_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_READABLE_STATES: Final = frozenset({"ready", "active", "previous", "retired"})


class BatchStoreError(Exception):
    """Base of the batch store's errors."""


class SnapshotStateError(BatchStoreError):
    """The operation does not apply to the snapshot (unknown, loading, no previous…)."""


class SnapshotGoneError(BatchStoreError):
    """A read raced the deletion of its snapshot; its values must not be used.

    Only possible when a reader kept a pointer longer than the grace period. Refresh
    the :class:`BatchSnapshotCache` and read again (or serve defaults, flagged).
    """

    def __init__(self, group: str, snapshot_id: str) -> None:
        self.group = group
        self.snapshot_id = snapshot_id
        super().__init__(f"batch group {group!r}: snapshot {snapshot_id!r} is being deleted")


# --- keys ----------------------------------------------------------------------


def _check_group(group: str) -> str:
    if not _GROUP_RE.match(group):
        raise ValueError(f"invalid batch group name {group!r}")
    return group


def _check_snapshot(snapshot_id: str) -> str:
    if not _SNAPSHOT_RE.match(snapshot_id):
        raise ValueError(f"invalid snapshot id {snapshot_id!r} (use [A-Za-z0-9_.-], 1-64)")
    return snapshot_id


def data_key(group: str, snapshot_id: str, entity_id: str) -> str:
    """Key of one entity's hash in one snapshot: ``bf:<g>:<s>:<e>``."""
    return f"bf:{group}:{snapshot_id}:{entity_id}"


def _active_key(group: str) -> str:
    return f"bf:{{{group}}}:active"


def _previous_key(group: str) -> str:
    return f"bf:{{{group}}}:previous"


def _registry_key(group: str) -> str:
    return f"bf:{{{group}}}:snapshots"


def _meta_keys(group: str) -> list[str]:
    _check_group(group)
    return [_active_key(group), _previous_key(group), _registry_key(group)]


def new_snapshot_id(now_s: float | None = None) -> str:
    """A fresh id sortable by creation time, e.g. ``20250314T093012Z-a1b2``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    return f"{stamp}-{secrets.token_hex(2)}"


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- registry --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot's registry entry."""

    group: str
    snapshot_id: str
    state: str
    created_at_ms: int
    rows: int
    source: str
    ready_at_ms: int | None = None
    activated_at_ms: int | None = None
    deactivated_at_ms: int | None = None

    @classmethod
    def from_json(cls, group: str, snapshot_id: str, raw: str | bytes) -> SnapshotInfo:
        """Parse a registry value."""
        meta: dict[str, Any] = json.loads(raw)

        def opt(key: str) -> int | None:
            value = meta.get(key)
            return None if value is None else int(value)

        return cls(
            group=group,
            snapshot_id=snapshot_id,
            state=str(meta.get("state", "")),
            created_at_ms=int(meta.get("created_at_ms", 0)),
            rows=int(meta.get("rows", 0)),
            source=str(meta.get("source", "")),
            ready_at_ms=opt("ready_at_ms"),
            activated_at_ms=opt("activated_at_ms"),
            deactivated_at_ms=opt("deactivated_at_ms"),
        )


@dataclass(frozen=True, slots=True)
class ActivateResult:
    """Pointers after a flip; ``retired`` is the snapshot that stopped being previous."""

    group: str
    active: str
    previous: str | None
    retired: str | None
    changed: bool


async def list_snapshots(client: Redis, group: str) -> list[SnapshotInfo]:
    """Every registered snapshot of ``group``, oldest first."""
    raw: dict[Any, Any] = await client.hgetall(_registry_key(_check_group(group)))
    infos = [SnapshotInfo.from_json(group, _text(k) or "", v) for k, v in raw.items()]
    return sorted(infos, key=lambda i: (i.created_at_ms, i.snapshot_id))


async def get_pointers(client: Redis, group: str) -> tuple[str | None, str | None]:
    """``(active, previous)`` snapshot ids of ``group`` (``None`` when unset)."""
    active, previous = await client.mget(_active_key(group), _previous_key(group))
    return _text(active), _text(previous)


# --- writing ---------------------------------------------------------------------

# KEYS: registry. ARGV: id, json. Registers a new snapshot; refuses an existing id.
_REGISTER_LUA: Final = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.error_reply('EXISTS snapshot ' .. ARGV[1] .. ' already exists')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: registry. ARGV: id, expected state, new state, rows ('' keeps), stamp field, now.
_TRANSITION_LUA: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return redis.error_reply('NOSNAPSHOT unknown snapshot ' .. ARGV[1]) end
local meta = cjson.decode(raw)
if meta.state ~= ARGV[2] then
  return redis.error_reply('BADSTATE snapshot ' .. ARGV[1] .. ' is ' .. tostring(meta.state))
end
meta.state = ARGV[3]
if ARGV[4] ~= '' then meta.rows = tonumber(ARGV[4]) end
meta[ARGV[5]] = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(meta))
return 1
"""


def _state_error(exc: ResponseError) -> SnapshotStateError:
    message = str(exc)
    for prefix in ("NOSNAPSHOT ", "BADSTATE ", "NOPREVIOUS ", "EXISTS "):
        message = message.removeprefix(prefix)
    return SnapshotStateError(message)


async def write_snapshot(
    client: Redis,
    group: str,
    rows: Iterable[tuple[str, Mapping[str, float]]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    snapshot_id: str | None = None,
    source: str = "",
) -> SnapshotInfo:
    """Write a new snapshot of ``group`` in pipelined chunks; it is ``ready``, not active.

    ``rows`` gives each entity once with its field values (fields absent from a row
    are served as defaults; a row without fields is skipped). ``progress`` is called
    with the number of rows written after each chunk. If writing fails the snapshot
    stays ``loading``: it is never read and :func:`collect_garbage` removes it later
    (or call :func:`delete_snapshot`).
    """
    _check_group(group)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    sid = _check_snapshot(snapshot_id or new_snapshot_id())
    created = _now_ms()
    meta = {"state": "loading", "created_at_ms": created, "rows": 0, "source": source}
    registry = _registry_key(group)
    try:
        await client.eval(_REGISTER_LUA, 1, registry, sid, json.dumps(meta))
    except ResponseError as exc:
        raise _state_error(exc) from None

    written = 0
    pending = 0
    pipe = client.pipeline(transaction=False)
    async with pipe:
        for entity_id, values in rows:
            if not values:
                continue
            mapping: dict[FieldT, EncodableT] = {n: repr(float(v)) for n, v in values.items()}
            pipe.hset(data_key(group, sid, entity_id), mapping=mapping)
            pending += 1
            if pending >= chunk_size:
                await pipe.execute()
                written += pending
                pending = 0
                if progress is not None:
                    progress(written)
        if pending:
            await pipe.execute()
            written += pending
            if progress is not None:
                progress(written)

    now = _now_ms()
    try:
        await client.eval(
            _TRANSITION_LUA, 1, registry, sid, "loading", "ready", str(written), "ready_at_ms", now
        )
    except ResponseError as exc:
        raise _state_error(exc) from None
    logger.info(
        "batch snapshot written", extra={"group": group, "snapshot_id": sid, "rows": written}
    )
    return SnapshotInfo(group, sid, "ready", created, written, source, ready_at_ms=now)


# --- flipping --------------------------------------------------------------------

# KEYS: active, previous, registry. ARGV: target id ('' = the previous: rollback), now.
# Returns {active, previous or '', retired or '', changed 0/1}.
_ACTIVATE_LUA: Final = """
local now = tonumber(ARGV[2])
local target = ARGV[1]
local active = redis.call('GET', KEYS[1])
local previous = redis.call('GET', KEYS[2])
if target == '' then
  if not previous then
    return redis.error_reply('NOPREVIOUS no previous snapshot to roll back to')
  end
  target = previous
end
local raw = redis.call('HGET', KEYS[3], target)
if not raw then return redis.error_reply('NOSNAPSHOT unknown snapshot ' .. target) end
local meta = cjson.decode(raw)
if meta.state == 'loading' or meta.state == 'deleting' then
  return redis.error_reply('BADSTATE snapshot ' .. target .. ' is ' .. tostring(meta.state))
end
if target == active then return {target, previous or '', '', 0} end

local function update(id, state, field)
  local entry = redis.call('HGET', KEYS[3], id)
  if not entry then return end
  local m = cjson.decode(entry)
  m.state = state
  if field then m[field] = now end
  redis.call('HSET', KEYS[3], id, cjson.encode(m))
end

local retired = ''
if previous and previous ~= target and previous ~= active then
  update(previous, 'retired', nil)
  retired = previous
end
if active then
  update(active, 'previous', 'deactivated_at_ms')
  redis.call('SET', KEYS[2], active)
elseif previous then
  redis.call('DEL', KEYS[2])
end
meta.state = 'active'
meta.activated_at_ms = now
meta.deactivated_at_ms = nil
redis.call('HSET', KEYS[3], target, cjson.encode(meta))
redis.call('SET', KEYS[1], target)
return {target, active or '', retired, 1}
"""


async def _flip(client: Redis, group: str, target: str) -> ActivateResult:
    try:
        reply = await client.eval(_ACTIVATE_LUA, 3, *_meta_keys(group), target, _now_ms())
    except ResponseError as exc:
        raise _state_error(exc) from None
    active, previous, retired, changed = (_text(v) or "" for v in reply)
    result = ActivateResult(group, active, previous or None, retired or None, changed == "1")
    if result.changed:
        logger.info(
            "batch snapshot activated",
            extra={"group": group, "active": active, "previous": result.previous},
        )
    return result


async def activate(client: Redis, group: str, snapshot_id: str) -> ActivateResult:
    """Atomically make ``snapshot_id`` active; the old active becomes previous.

    The old previous becomes ``retired`` (deleted later by :func:`collect_garbage`).
    Any complete snapshot (ready, previous, retired) may be activated; activating the
    active one changes nothing. Raises :class:`SnapshotStateError` otherwise.
    """
    return await _flip(client, group, _check_snapshot(snapshot_id))


async def rollback(client: Redis, group: str) -> ActivateResult:
    """Swap active and previous atomically (the rolled-back snapshot becomes previous).

    Raises :class:`SnapshotStateError` when there is no previous snapshot.
    """
    return await _flip(client, group, "")


# --- deleting --------------------------------------------------------------------

# KEYS: active, previous, registry. ARGV: id, comma-separated allowed states.
# Marks the snapshot 'deleting' unless it is pointed to or in another state.
_MARK_DELETING_LUA: Final = """
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] or redis.call('GET', KEYS[2]) == ARGV[1] then
  return 0
end
local meta = cjson.decode(raw)
local allowed = false
for state in string.gmatch(ARGV[2], '[^,]+') do
  if meta.state == state then allowed = true end
end
if not allowed then return 0 end
meta.state = 'deleting'
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(meta))
return 1
"""


async def _delete_marked(client: Redis, group: str, snapshot_id: str) -> int:
    """UNLINK a ``deleting`` snapshot's data keys in chunks, then drop its entry."""
    removed = 0
    batch: list[Any] = []
    async for key in client.scan_iter(match=f"bf:{group}:{snapshot_id}:*", count=_DELETE_CHUNK):
        batch.append(key)
        if len(batch) >= _DELETE_CHUNK:
            removed += int(await client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(await client.unlink(*batch))
    await client.hdel(_registry_key(group), snapshot_id)
    logger.info(
        "batch snapshot deleted",
        extra={"group": group, "snapshot_id": snapshot_id, "keys": removed},
    )
    return removed


async def delete_snapshot(client: Redis, group: str, snapshot_id: str) -> bool:
    """Delete a snapshot now, whatever its age, unless it is active or previous.

    For discarding a failed or unwanted load. Returns whether it was deleted.
    """
    keys = _meta_keys(group)
    marked = await client.eval(
        _MARK_DELETING_LUA,
        3,
        *keys,
        _check_snapshot(snapshot_id),
        "loading,ready,retired,deleting",
    )
    if not int(marked):
        return False
    await _delete_marked(client, group, snapshot_id)
    return True


async def collect_garbage(
    client: Redis,
    group: str,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    abandoned_after_s: float = DEFAULT_ABANDONED_AFTER_S,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Delete the snapshots that are due; returns ``(deleted, deferred)`` ids.

    Due: ``retired`` ones inactive for ``grace_s`` or more, ``loading``/``ready``
    ones created ``abandoned_after_s`` or more ago, and interrupted deletions.
    ``deferred`` lists retired snapshots still inside their grace period.
    """
    now = _now_ms()
    deleted: list[str] = []
    deferred: list[str] = []
    for info in await list_snapshots(client, group):
        if info.state == "retired":
            since = info.deactivated_at_ms or info.created_at_ms
            if now - since < grace_s * 1000:
                deferred.append(info.snapshot_id)
                continue
            allowed = "retired"
        elif info.state in ("loading", "ready"):
            if now - info.created_at_ms < abandoned_after_s * 1000:
                continue
            allowed = info.state
        elif info.state == "deleting":
            allowed = "deleting"
        else:
            continue
        marked = await client.eval(
            _MARK_DELETING_LUA, 3, *_meta_keys(group), info.snapshot_id, allowed
        )
        if int(marked):
            await _delete_marked(client, group, info.snapshot_id)
            deleted.append(info.snapshot_id)
    return tuple(deleted), tuple(deferred)


# --- reading ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupReadSpec:
    """Which fields of a group to read, with their defaults (build once per model)."""

    group: str
    fields: tuple[str, ...]
    defaults: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_group(self.group)
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
    that has a row, the fields served as defaults.
    """

    group: str
    snapshot_id: str | None
    values: Mapping[str, Mapping[str, float]]
    missing_entities: frozenset[str]
    missing_fields: Mapping[str, tuple[str, ...]]


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
        re-raises an error the pipeline returned in place of a result.
        """
        if len(results) != self.n_commands:
            raise ValueError(f"expected {self.n_commands} results, got {len(results)}")
        for item in results:
            if isinstance(item, BaseException):
                raise item
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
        if state not in _READABLE_STATES:
            raise SnapshotGoneError(spec.group, self.snapshot_id)

        values: dict[str, Mapping[str, float]] = {}
        missing_entities: set[str] = set()
        missing_fields: dict[str, tuple[str, ...]] = {}
        fields, defaults = spec.fields, spec.defaults
        for entity_id, raw in zip(self.entity_ids, results, strict=False):
            if not isinstance(raw, list | tuple) or len(raw) != len(fields):
                raise ValueError(f"result for entity {entity_id!r} is not an HMGET reply")
            row: dict[str, float] = {}
            absent: list[str] = []
            for name, default, cell in zip(fields, defaults, raw, strict=True):
                value = _parse(cell)
                if value is None:
                    absent.append(name)
                    row[name] = default
                else:
                    row[name] = value
            values[entity_id] = row
            if len(absent) == len(fields):
                missing_entities.add(entity_id)
            elif absent:
                missing_fields[entity_id] = tuple(absent)
        return BatchReadResult(
            spec.group, self.snapshot_id, values, frozenset(missing_entities), missing_fields
        )


def _parse(cell: object) -> float | None:
    """A stored value, or ``None`` when absent or unreadable (served as the default)."""
    if cell is None:
        return None
    try:
        value = float(cell)  # type: ignore[arg-type]  # bytes/str from HMGET
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def queue_reads(
    pipe: Pipeline, spec: GroupReadSpec, snapshot_id: str | None, entity_ids: Iterable[str]
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
        pipe.hget(_registry_key(group), snapshot_id)
    return BatchReadPlan(spec, snapshot_id, unique)


class BatchSnapshotCache:
    """The active snapshot id of each group, refreshed in the background.

    ``snapshot_id`` is a plain attribute read (no I/O) for the request path;
    ``refresh`` reads all pointers now (one pipeline). While Redis is unreachable the
    last known ids are kept and a warning is logged once per outage. ``on_change`` is
    called with the new ids whenever a refresh finds a different one.
    """

    def __init__(
        self,
        client: Redis,
        groups: Iterable[str],
        *,
        refresh_interval_s: float = 0.5,
        on_change: Callable[[Mapping[str, str | None]], None] | None = None,
    ) -> None:
        self._client = client
        self._on_change = on_change
        self._groups = tuple(_check_group(g) for g in dict.fromkeys(groups))
        self._interval = refresh_interval_s
        self._ids: Mapping[str, str | None] = MappingProxyType(dict.fromkeys(self._groups))
        self._refreshed_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups tracked."""
        return self._groups

    @property
    def refreshed_at(self) -> float | None:
        """``time.monotonic()`` of the last successful refresh (``None`` before one)."""
        return self._refreshed_at

    def snapshot_id(self, group: str) -> str | None:
        """Cached active snapshot of ``group`` (``None``: never loaded). ``KeyError`` if
        the group is not tracked."""
        return self._ids[group]

    def snapshot_ids(self) -> Mapping[str, str | None]:
        """All cached ids (an immutable view, consistent across groups)."""
        return self._ids

    async def refresh(self) -> Mapping[str, str | None]:
        """Read every group's active pointer now; returns the new ids."""
        if self._groups:
            async with self._client.pipeline(transaction=False) as pipe:
                for group in self._groups:
                    pipe.get(_active_key(group))
                replies = await pipe.execute()
            ids = {g: _text(r) for g, r in zip(self._groups, replies, strict=True)}
            changed = ids != dict(self._ids)
            self._ids = MappingProxyType(ids)
            if changed:
                logger.info("batch snapshots changed", extra={"snapshots": ids})
                if self._on_change is not None:
                    try:
                        self._on_change(self._ids)
                    except Exception:
                        logger.exception("batch snapshot on_change callback failed")
        self._refreshed_at = time.monotonic()
        return self._ids

    async def start(self) -> None:
        """Refresh once (logging a failure) and start the background refresh."""
        if self._task is not None:
            return
        await self._refresh_logged()
        self._task = asyncio.create_task(self._run(), name="batch-snapshot-cache")

    async def stop(self) -> None:
        """Stop the background refresh (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> BatchSnapshotCache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError) as exc:
            if not self._failing:
                logger.warning("batch snapshot refresh failed: %s", exc)
            self._failing = True
        except Exception:  # a bug must not silently stop the refresh
            logger.exception("batch snapshot refresh failed")
        else:
            if self._failing:
                logger.info("batch snapshot refresh recovered")
            self._failing = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._refresh_logged()
