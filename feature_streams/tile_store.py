"""Redis tile store: key layout, the apply-once tile script, trimming and reads.

Key layout
----------
One hash per stream group and entity key, :func:`feature_streams.keys.tile_key`
(``st:<group>:<entity key>``). Its fields are:

* tile fields ``"<tile_start_ms>:<slot>"`` (and ``"<start>:<slot>:ts"`` for
  ``last`` slots), exactly as :mod:`feature_streams.windows` documents them;
* ``_off:<topic>:<partition>`` (:func:`~feature_streams.keys.offset_field`): the
  highest Kafka offset of that partition whose event has been folded into this hash
  (applied, or dropped as too late);
* ``_last_ts`` (:data:`~feature_streams.keys.LAST_TS_FIELD`): the newest applied
  event time (epoch ms) — the freshness mark, the "max seen" of the lateness rule
  and the ``now`` of trimming;
* ``_v`` (:data:`~feature_streams.keys.VERSION_FIELD`): the hash's version, raised
  in the same script call by every write that changes a tile or ``_last_ts`` (an
  applied event, a trim that deleted something) to ``max(old + 1, Redis TIME in
  microseconds)``; so a hash re-created after its expiry starts above any version it
  had. The server keeps decoded hashes by version (:mod:`feature_streams.tile_cache`),
  so every writer of tile hashes must raise it: this script and :data:`TRIM_SCRIPT`
  are the only ones. Offsets alone (duplicates, too-late events) do not raise it.

Fields starting with ``_`` are never tile fields (those start with a digit), so
:func:`windows.read_hash` and :func:`windows.expired_fields` ignore them.

Apply-once script
-----------------
:meth:`TileStore.apply` runs one ``EVALSHA`` per :class:`KeyBatch` (one key, one
partition, events in offset order), all in one non-transactional pipeline. For
each event the script, atomically on its one key (so it also works on Redis
Cluster):

1. skips it when its offset is ``<=`` the hash's ``_off:<topic>:<partition>``
   (a replay after a crash between the Redis write and the Kafka commit);
2. drops it as too late when ``ts < _last_ts - allowed_lateness`` (the rule of
   :func:`windows.is_too_late`, tracked **per key** and persisted in the hash,
   so a crash, replay or rebalance cannot change the decision for a key whose
   events all come from one partition — the topic is partitioned by entity
   key. A key fed by several partitions, e.g. merchants on a topic keyed by
   card, sees them interleaved in consumption order, and so may its lateness);
3. otherwise applies its :class:`~feature_streams.windows.TileUpdate` s
   (``incr`` = ``HINCRBYFLOAT``; ``min``/``max``/``last`` compare-and-set) and
   raises ``_last_ts``.

It then stores the highest offset seen and, when anything was applied,
``PEXPIRE`` s the hash by the group's ``retention_ms`` (wall clock after the last
write). The events travel as ONE newline-separated argument, per event
``offset, ts, m`` and ``m`` update tokens: ``TileUpdate.args()`` cut to ``op,
field, value`` except for ``last``; the script splits it with ``string.find``.
redis-py's per-argument packing was most of the client-side cost of a call: one
argument instead of one per token cut the worker's CPU per event by about a third
(bench/RESULTS.md, "Stream worker"). A script is not rolled back on error,
so it first validates every token of its payload and every stored value it will
update (``INVALID ...`` before any write, reported in :attr:`ApplyResult.failed`);
a key holding a non-hash fails on the first ``HMGET`` before any write (reported,
:attr:`ApplyResult.rejected`), and connection/``OOM`` failures are raised for the
caller to retry — re-running a whole batch is harmless by step 1.

The script is registered with ``register_script`` (SHA computed once) and sent
as plain ``EVALSHA`` inside the pipeline; entries answered ``NOSCRIPT`` (Redis
restarted or ``SCRIPT FLUSH``) are re-sent after one ``SCRIPT LOAD``. This saves
the ``SCRIPT EXISTS`` round trip redis-py's pipeline would add to every batch.

Trimming
--------
Expired tiles are removed periodically, not per event (:meth:`TileStore.trim`):
``HKEYS`` + ``HGET _last_ts`` per key in one pipeline, then
:func:`windows.expired_fields` with ``now = _last_ts`` and, per key with expired
fields, :data:`TRIM_SCRIPT` (``HDEL`` and the version raise, atomically) in a second
pipeline. Safe against concurrent writers: ``_last_ts`` only grows, so an
expired field stays expired, and the lateness rule keeps accepted events out of
expired tiles. Whole idle hashes go away by their ``PEXPIRE``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any

from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from feature_streams.cluster_pipeline import NodePipelines
from feature_streams.keys import LAST_TS_FIELD, VERSION_FIELD, lua_string, offset_field
from feature_streams.redis_client import AnyRedis
from feature_streams.windows import GroupPlan, TileUpdate, UpdateOp, expired_fields

__all__ = [
    "APPLY_SCRIPT",
    "TRIM_SCRIPT",
    "ApplyResult",
    "EventUpdates",
    "KeyBatch",
    "TileStore",
    "read_hashes",
]

logger = logging.getLogger(__name__)

_TRIM_CHUNK = 500

STORE_WIDE = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOSCRIPT",
    "NOREPLICAS",
    "MISCONF",
)
"""Error replies about the server, not the call: :meth:`TileStore.apply` raises them."""

_APPLY_SOURCE = """
local key = KEYS[1]
local off_field = ARGV[1]
local lateness = tonumber(ARGV[3])
local head = redis.call('HMGET', key, off_field, $last_ts, $version)
local stored_off = tonumber(head[1] or '-1')
local last_raw = head[2]
local last_ts = last_raw and tonumber(last_raw)
local a, n = {}, 0
local p = ARGV[4]
local pos, len = 1, #p
while pos <= len do
  local e = string.find(p, '\\n', pos, true)
  n = n + 1
  a[n] = string.sub(p, pos, e - 1)
  pos = e + 1
end
-- Validate everything before the first write: a script is not rolled back on error.
local function num(s)
  local x = tonumber(s)
  if x and x == x and x ~= math.huge and x ~= -math.huge then return x end
  return nil
end
local function bad(what) return redis.error_reply('INVALID ' .. key .. ': ' .. what) end
if not num(ARGV[2]) or not lateness then return bad('retention or lateness') end
if not stored_off then return bad('offset mark holds no number') end
if last_raw and not last_ts then return bad('last event time holds no number') end
local targets, nt, seen = {}, 0, {}
local function target(f)
  if not seen[f] then seen[f] = true; nt = nt + 1; targets[nt] = f end
end
local i = 1
while i <= n do
  local m = num(a[i + 2])
  if not num(a[i]) or not num(a[i + 1]) or not m or m < 0 or i + 2 + m > n then
    return bad('event at token ' .. i)
  end
  local k, stop = i + 3, i + 3 + m
  while k < stop do
    local op = a[k]
    local width = 3
    if op == 'last' then
      width = 5
      if not num(a[k + 4]) then return bad('update at token ' .. k) end
      target(a[k + 3])
    elseif op ~= 'incr' and op ~= 'min' and op ~= 'max' then
      return bad('unknown update ' .. tostring(op))
    end
    if k + width > stop or not num(a[k + 2]) then return bad('update at token ' .. k) end
    target(a[k + 1])
    k = k + width
  end
  i = stop
end
for lo = 1, nt, 500 do
  local hi = math.min(lo + 499, nt)
  local cur = redis.call('HMGET', key, unpack(targets, lo, hi))
  for j = 1, #cur do
    if cur[j] and not num(cur[j]) then
      return bad('field ' .. targets[lo + j - 1] .. ' holds no number')
    end
  end
end
local applied, dup, late = 0, 0, 0
local new_off = nil
i = 1
while i <= n do
  local off = tonumber(a[i])
  local ts = tonumber(a[i + 1])
  local first = i + 3
  i = first + tonumber(a[i + 2])
  if off <= stored_off then
    dup = dup + 1
  else
    new_off = a[first - 3]
    stored_off = off
    if last_ts and ts < last_ts - lateness then
      late = late + 1
    else
      local k = first
      while k < i do
        local op, f, v = a[k], a[k + 1], a[k + 2]
        if op == 'incr' then
          redis.call('HINCRBYFLOAT', key, f, v)
          k = k + 3
        elseif op == 'last' then
          local tf, et = a[k + 3], tonumber(a[k + 4])
          local ct = tonumber(redis.call('HGET', key, tf) or '')
          if not ct or et > ct or (et == ct and
              tonumber(v) > tonumber(redis.call('HGET', key, f) or '-1e308')) then
            redis.call('HSET', key, f, v, tf, a[k + 4])
          end
          k = k + 5
        else
          local cur = redis.call('HGET', key, f)
          if not cur or (op == 'max' and tonumber(v) > tonumber(cur))
              or (op == 'min' and tonumber(v) < tonumber(cur)) then
            redis.call('HSET', key, f, v)
          end
          k = k + 3
        end
      end
      if not last_ts or ts > last_ts then
        last_ts = ts
        last_raw = a[first - 2]
      end
      applied = applied + 1
    end
  end
end
if applied > 0 then
  local t = redis.call('TIME')
  local v = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local old = tonumber(head[3] or '')
  if old and old >= v and old < 2^53 - 1 then v = old + 1 end
  redis.call('HSET', key, off_field, new_off, $last_ts, last_raw,
             $version, string.format('%.0f', v))
  redis.call('PEXPIRE', key, ARGV[2])
elseif new_off then
  redis.call('HSET', key, off_field, new_off)
end
return {applied, dup, late}
"""
_BUMP_SOURCE = """
do
  local t = redis.call('TIME')
  local v = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local old = tonumber(redis.call('HGET', key, $version) or '')
  if old and old >= v and old < 2^53 - 1 then v = old + 1 end
  redis.call('HSET', key, $version, string.format('%.0f', v))
end"""
_BUMP = Template(_BUMP_SOURCE).substitute(version=lua_string(VERSION_FIELD))
"""Raise the hash's :data:`~feature_streams.keys.VERSION_FIELD` to ``max(old + 1, TIME
in us)`` (Lua ``key`` in scope). Exact in a Lua double below 2**53 (TIME in
microseconds is ~1.8e15); a field holding no number restarts at TIME. The apply script
does the same inline: the old version read by its first ``HMGET`` and the new one
written by its last ``HSET`` (no call of their own, on the worker's hot script)."""

APPLY_SCRIPT = Template(_APPLY_SOURCE).substitute(
    last_ts=lua_string(LAST_TS_FIELD), version=lua_string(VERSION_FIELD)
)
"""KEYS[1] = hash; ARGV = offset field, retention ms, lateness ms, payload. The
payload is the events' tokens, each ended by a newline: per event ``offset, ts_ms,
m`` followed by ``m`` tokens, each update's ``TileUpdate.args()`` cut to ``op,
field, value`` except for ``last`` (whose ``ts_field, ts`` are used). Returns
``{applied, duplicate, late}`` event counts."""

TRIM_SCRIPT = Template("""
local key = KEYS[1]
local n = 0
for lo = 1, #ARGV, 500 do
  n = n + redis.call('HDEL', key, unpack(ARGV, lo, math.min(lo + 499, #ARGV)))
end
if n > 0 then
  $bump
end
return n
""").substitute(bump=_BUMP)
"""KEYS[1] = hash; ARGV = tile fields to delete. Deletes them and, when any was there,
raises the version in the same atomic step (a reader never sees the fields gone under
the old version). Returns how many were deleted."""


@dataclass(frozen=True, slots=True)
class EventUpdates:
    """One event's tile updates for one key, with its Kafka offset and event time."""

    offset: int
    ts_ms: int
    updates: Sequence[TileUpdate]


@dataclass(frozen=True, slots=True)
class KeyBatch:
    """Events of ONE partition for ONE hash, in offset order: one script call."""

    key: str
    topic: str
    partition: int
    retention_ms: int
    lateness_ms: int
    events: Sequence[EventUpdates]

    def script_args(self) -> list[str]:
        """``ARGV`` of the apply script: offset field, retention, lateness, payload.

        Raises ``ValueError`` if a token holds a newline (the payload separator;
        slot names built from definitions never do: names are identifiers and
        ``where`` values are JSON-escaped).
        """
        tokens: list[str] = []
        for ev in self.events:
            head = len(tokens)
            tokens += (str(ev.offset), str(ev.ts_ms), "")
            for update in ev.updates:
                # Only `last` reads ts_field/ts: 3 tokens instead of 5 for the others.
                parts = update.args()
                tokens += parts if update.op is UpdateOp.LAST else parts[:3]
            tokens[head + 2] = str(len(tokens) - head - 3)
        payload = "\n".join(tokens) + "\n"
        if payload.count("\n") != len(tokens):
            raise ValueError(f"a tile update of {self.key!r} holds a newline")
        return [
            offset_field(self.topic, self.partition),
            str(self.retention_ms),
            str(self.lateness_ms),
            payload,
        ]


@dataclass(slots=True)
class ApplyResult:
    """Event counts of one :meth:`TileStore.apply` (summed over its key batches)."""

    applied: int = 0
    duplicate: int = 0
    late: int = 0
    per_batch: list[tuple[int, int, int]] = field(default_factory=list)
    """``(applied, duplicate, late)`` of each key batch, in input order."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """``(batch index, error)`` of batches whose key holds a non-hash value
    (``WRONGTYPE``): nothing of them was applied, and retrying cannot help."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """``(batch index, error)`` of batches the script refused or failed on (``INVALID``:
    a malformed argument or a stored value that is no number, found before any write;
    any other error of that one call). Nothing of them is marked applied."""


class TileStore:
    """Tile hashes in Redis. Does not own ``client`` (the caller ``aclose()`` s it).

    ``client`` may use ``decode_responses`` either way; :meth:`read` returns what
    the client returns (``bytes`` by default), which :func:`windows.read_hash` takes.
    On a cluster each node's apply pipeline ends with ``WAIT 1 replica_wait_ms`` (best
    effort), so what the worker then commits to Kafka is, as a rule, on a replica too
    and survives a failover.
    """

    def __init__(self, client: AnyRedis, *, replica_wait_ms: int = 100) -> None:
        self._client = client
        self._replica_wait_ms = replica_wait_ms
        self._script: AsyncScript = client.register_script(APPLY_SCRIPT)
        # a cluster blocks EVALSHA in its pipeline: one pipeline per node instead, so a
        # failed node fails only its keys' calls (raised: the caller retries the batch)
        self._nodes = NodePipelines(client) if isinstance(client, RedisCluster) else None

    @property
    def client(self) -> AnyRedis:
        """The Redis client this store uses."""
        return self._client

    async def load_script(self) -> None:
        """``SCRIPT LOAD`` the apply script now (optional: apply loads it on demand)."""
        self._script.sha = await self._client.script_load(APPLY_SCRIPT)

    async def apply(self, batches: Sequence[KeyBatch]) -> ApplyResult:
        """Apply every batch with one ``EVALSHA`` each, in one pipeline.

        A key holding something other than a hash is reported in
        :attr:`ApplyResult.rejected` (the script fails on its first ``HMGET``,
        before writing); an error of one call (``INVALID`` input found before any
        write, a script error) in :attr:`ApplyResult.failed`. Store-wide errors
        (connection, timeout, ``OOM``, ``BUSY``, ``LOADING``...) are raised;
        retrying the same batches afterwards is always safe.
        """
        result = ApplyResult()
        if not batches:
            return result
        arg_lists = [b.script_args() for b in batches]
        replies = await self._evalsha_many([b.key for b in batches], arg_lists)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.load_script()
            redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            again = await self._evalsha_many(
                [batches[i].key for i in redo], [arg_lists[i] for i in redo]
            )
            for i, reply in zip(redo, again, strict=True):
                replies[i] = reply
        for n, reply in enumerate(replies):
            if isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
                result.rejected.append((n, str(reply)))
                result.per_batch.append((0, 0, 0))
                continue
            if isinstance(reply, ResponseError) and not str(reply).startswith(STORE_WIDE):
                result.failed.append((n, str(reply)))
                result.per_batch.append((0, 0, 0))
                continue
            if isinstance(reply, BaseException):
                raise reply
            applied, dup, late = (int(x) for x in reply)
            result.applied += applied
            result.duplicate += dup
            result.late += late
            result.per_batch.append((applied, dup, late))
        return result

    async def _evalsha_many(self, keys: Sequence[str], arg_lists: Sequence[list[str]]) -> list[Any]:
        sha = self._script.sha
        if self._nodes is not None:
            commands = [
                ("EVALSHA", sha, 1, key, *args) for key, args in zip(keys, arg_lists, strict=True)
            ]
            return await self._nodes.execute_keyed(
                keys, commands, None, replica_wait_ms=self._replica_wait_ms
            )
        pipe = self._client.pipeline(transaction=False)
        for key, args in zip(keys, arg_lists, strict=True):
            # execute_command, not pipe.evalsha: redis-py blocks the evalsha method in a
            # cluster pipeline, while the command itself routes by its one key
            pipe.execute_command("EVALSHA", sha, 1, key, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def read(self, keys: Sequence[str]) -> list[dict[Any, Any]]:
        """``HGETALL`` of every key in one pipeline (``{}`` for a missing key)."""
        return await read_hashes(self._client, keys)

    async def trim(self, plan: GroupPlan, keys: Sequence[str]) -> int:
        """Delete expired tile fields of ``keys`` (all of ``plan``'s group), with
        ``now`` = each hash's ``_last_ts``. Returns how many fields were deleted."""
        deleted = 0
        for lo in range(0, len(keys), _TRIM_CHUNK):
            chunk = keys[lo : lo + _TRIM_CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for key in chunk:
                pipe.hkeys(key)
                pipe.hget(key, LAST_TS_FIELD)
            # one key that is not a hash (WRONGTYPE) must not stop the others' trim
            replies = await pipe.execute(raise_on_error=False)
            pipe = self._client.pipeline(transaction=False)
            doomed = 0
            for n, key in enumerate(chunk):
                fields, last = replies[2 * n], replies[2 * n + 1]
                if isinstance(fields, Exception) or isinstance(last, Exception):
                    logger.warning("cannot trim %s: %s", key, fields, extra={"key": key})
                    continue
                if last is None:
                    continue
                expired = expired_fields(plan, fields, int(float(last)))
                if expired:
                    # EVAL, not EVALSHA: periodic, and needs no NOSCRIPT handling
                    pipe.execute_command("EVAL", TRIM_SCRIPT, 1, key, *expired)
                    doomed += 1
            if doomed:
                results = await pipe.execute(raise_on_error=False)
                deleted += sum(int(n) for n in results if not isinstance(n, Exception))
        return deleted


async def read_hashes(client: AnyRedis, keys: Sequence[str]) -> list[dict[Any, Any]]:
    """``HGETALL`` of every key in one pipeline round trip, in order; a missing key
    reads as ``{}``. Pass each to :func:`windows.read_hash`."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return [dict(h) for h in await pipe.execute()]
