"""Batch feature snapshots in Redis, writer side: write, atomic flip, rollback, GC.

A batch group (``customer_profile``…) is served from one immutable *snapshot*: a
full copy of the group's values written by :func:`write_snapshot`, made live by
:func:`activate` (one atomic pointer flip) and never modified afterwards.

Keys (:mod:`feature_streams.keys`): one data hash per entity per snapshot
(``bf:<g>:<s>:<e>``, field -> value as float text) and three metadata keys per
group sharing the hash tag ``{<g>}`` (one Redis Cluster slot, so the flip script
may touch them together): the ``active`` and ``previous`` pointers and the
``snapshots`` registry (id -> JSON {state, created_at_ms, rows, source,
ready_at_ms, activated_at_ms, deactivated_at_ms}). A field left empty in the file is
not stored; readers serve its default. **No key has a TTL**: a snapshot lives until
a later load replaces it and the garbage rule below deletes it.

Snapshot states: ``loading`` (being written) -> ``ready`` -> ``active`` <->
``previous`` -> ``retired`` -> ``deleting`` -> gone. :func:`activate` makes the
target ``active``, the old active ``previous`` and the old previous ``retired``, in
one Lua script over the metadata keys. :func:`rollback` is ``activate(previous)``:
it *swaps* active and previous, so the rolled-back snapshot stays available as
``previous`` (a second rollback undoes the first) and nothing is deleted.

Consistency rule (the reader's side is :mod:`feature_streams.read_plan`):

* Readers read a whole micro-batch of one group from the ONE snapshot id that was
  active when it started. A snapshot only becomes active once fully written, and is
  never written again, so every read sees one complete snapshot, never a mix.
* :func:`collect_garbage` deletes only ``retired`` snapshots (neither active nor
  previous) whose ``deactivated_at_ms`` (when they stopped being active) is at least
  ``grace_s`` old, plus abandoned ``loading``/``ready`` ones; a deletion that is not
  yet due is deferred to the next load. So a reader holding a just-replaced pointer
  always finds its snapshot complete: the snapshot is at least ``previous`` for a
  whole load cycle and ``grace_s`` (default 60 s) far exceeds the readers' pointer
  refresh (:class:`feature_streams.fetcher.BatchSnapshotCache`).
* Belt and braces: a snapshot is marked ``deleting`` (atomically, before any key is
  unlinked), and readers check its registry entry after their reads
  (:class:`feature_streams.read_plan.SnapshotGoneError`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from string import Template
from typing import Any, Final

from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from feature_streams.keys import (
    ACTIVE,
    DELETING,
    LOADING,
    PREVIOUS,
    READY,
    RETIRED,
    active_key,
    as_text,
    check_group,
    check_snapshot_id,
    data_key,
    data_key_pattern,
    lua_string,
    meta_keys,
    previous_key,
    registry_key,
)
from feature_streams.redis_client import AnyRedis, scan_keys

__all__ = [
    "DEFAULT_GRACE_S",
    "ActivateResult",
    "BatchStoreError",
    "SnapshotInfo",
    "SnapshotStateError",
    "activate",
    "collect_garbage",
    "delete_snapshot",
    "get_pointers",
    "list_snapshots",
    "new_snapshot_id",
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


class BatchStoreError(Exception):
    """Base of the batch store's errors."""


class SnapshotStateError(BatchStoreError):
    """The operation does not apply to the snapshot (unknown, loading, no previous…)."""


def new_snapshot_id(now_s: float | None = None) -> str:
    """A fresh id sortable by creation time, e.g. ``20250314T093012Z-a1b2``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    return f"{stamp}-{secrets.token_hex(2)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lua(source: str) -> str:
    """``source`` with ``$loading``, ``$active``... replaced by the state names."""
    states = (LOADING, READY, ACTIVE, PREVIOUS, RETIRED, DELETING)
    return Template(source).substitute({state: lua_string(state) for state in states})


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


async def list_snapshots(client: AnyRedis, group: str) -> list[SnapshotInfo]:
    """Every registered snapshot of ``group``, oldest first."""
    raw: dict[Any, Any] = await client.hgetall(registry_key(check_group(group)))
    infos = [SnapshotInfo.from_json(group, as_text(k) or "", v) for k, v in raw.items()]
    return sorted(infos, key=lambda i: (i.created_at_ms, i.snapshot_id))


async def get_pointers(client: AnyRedis, group: str) -> tuple[str | None, str | None]:
    """``(active, previous)`` snapshot ids of ``group`` (``None`` when unset)."""
    active, previous = await client.mget(active_key(group), previous_key(group))
    return as_text(active), as_text(previous)


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
    client: AnyRedis,
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
    check_group(group)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    sid = check_snapshot_id(snapshot_id or new_snapshot_id())
    created = _now_ms()
    meta = {"state": LOADING, "created_at_ms": created, "rows": 0, "source": source}
    registry = registry_key(group)
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
            _TRANSITION_LUA, 1, registry, sid, LOADING, READY, str(written), "ready_at_ms", now
        )
    except ResponseError as exc:
        raise _state_error(exc) from None
    logger.info(
        "batch snapshot written", extra={"group": group, "snapshot_id": sid, "rows": written}
    )
    return SnapshotInfo(group, sid, READY, created, written, source, ready_at_ms=now)


# --- flipping --------------------------------------------------------------------

# KEYS: active, previous, registry. ARGV: target id ('' = the previous: rollback), now.
# Returns {active, previous or '', retired or '', changed 0/1}.
_ACTIVATE_LUA: Final = _lua("""
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
if meta.state == $loading or meta.state == $deleting then
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
  update(previous, $retired, nil)
  retired = previous
end
if active then
  update(active, $previous, 'deactivated_at_ms')
  redis.call('SET', KEYS[2], active)
elseif previous then
  redis.call('DEL', KEYS[2])
end
meta.state = $active
meta.activated_at_ms = now
meta.deactivated_at_ms = nil
redis.call('HSET', KEYS[3], target, cjson.encode(meta))
redis.call('SET', KEYS[1], target)
return {target, active or '', retired, 1}
""")


async def _flip(client: AnyRedis, group: str, target: str) -> ActivateResult:
    try:
        reply = await client.eval(_ACTIVATE_LUA, 3, *meta_keys(group), target, _now_ms())
    except ResponseError as exc:
        raise _state_error(exc) from None
    active, previous, retired, changed = (as_text(v) or "" for v in reply)
    result = ActivateResult(group, active, previous or None, retired or None, changed == "1")
    if result.changed:
        logger.info(
            "batch snapshot activated",
            extra={"group": group, "active": active, "previous": result.previous},
        )
    return result


async def activate(client: AnyRedis, group: str, snapshot_id: str) -> ActivateResult:
    """Atomically make ``snapshot_id`` active; the old active becomes previous.

    The old previous becomes ``retired`` (deleted later by :func:`collect_garbage`).
    Any complete snapshot (ready, previous, retired) may be activated; activating the
    active one changes nothing. Raises :class:`SnapshotStateError` otherwise.
    """
    return await _flip(client, group, check_snapshot_id(snapshot_id))


async def rollback(client: AnyRedis, group: str) -> ActivateResult:
    """Swap active and previous atomically (the rolled-back snapshot becomes previous).

    Raises :class:`SnapshotStateError` when there is no previous snapshot.
    """
    return await _flip(client, group, "")


# --- deleting --------------------------------------------------------------------

# KEYS: active, previous, registry. ARGV: id, comma-separated allowed states.
# Marks the snapshot 'deleting' unless it is pointed to or in another state.
_MARK_DELETING_LUA: Final = _lua("""
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
meta.state = $deleting
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(meta))
return 1
""")


async def _delete_marked(client: AnyRedis, group: str, snapshot_id: str) -> int:
    """UNLINK a ``deleting`` snapshot's data keys in chunks, then drop its entry."""
    removed = 0
    batch: list[Any] = []
    pattern = data_key_pattern(group, snapshot_id)
    async for key in scan_keys(client, pattern, _DELETE_CHUNK):  # every primary
        batch.append(key)
        if len(batch) >= _DELETE_CHUNK:
            removed += int(await client.unlink(*batch))  # split per slot on a cluster
            batch.clear()
    if batch:
        removed += int(await client.unlink(*batch))
    await client.hdel(registry_key(group), snapshot_id)
    logger.info(
        "batch snapshot deleted",
        extra={"group": group, "snapshot_id": snapshot_id, "keys": removed},
    )
    return removed


async def delete_snapshot(client: AnyRedis, group: str, snapshot_id: str) -> bool:
    """Delete a snapshot now, whatever its age, unless it is active or previous.

    For discarding a failed or unwanted load. Returns whether it was deleted.
    """
    keys = meta_keys(group)
    marked = await client.eval(
        _MARK_DELETING_LUA,
        3,
        *keys,
        check_snapshot_id(snapshot_id),
        ",".join((LOADING, READY, RETIRED, DELETING)),
    )
    if not int(marked):
        return False
    await _delete_marked(client, group, snapshot_id)
    return True


async def collect_garbage(
    client: AnyRedis,
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
        if info.state == RETIRED:
            since = info.deactivated_at_ms or info.created_at_ms
            if now - since < grace_s * 1000:
                deferred.append(info.snapshot_id)
                continue
            allowed = RETIRED
        elif info.state in (LOADING, READY):
            if now - info.created_at_ms < abandoned_after_s * 1000:
                continue
            allowed = info.state
        elif info.state == DELETING:
            allowed = DELETING
        else:
            continue
        marked = await client.eval(
            _MARK_DELETING_LUA, 3, *meta_keys(group), info.snapshot_id, allowed
        )
        if int(marked):
            await _delete_marked(client, group, info.snapshot_id)
            deleted.append(info.snapshot_id)
    return tuple(deleted), tuple(deferred)
