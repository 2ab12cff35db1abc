"""The online feature fetcher: one Redis round trip per micro-batch, assembled rows.

Beside the definitions (:mod:`feature_streams.definitions`) and the pure window math
(:mod:`feature_streams.windows`) that the stream worker and the backfill share, this
is the online read side of the feature store:

* :class:`BatchSnapshotCache` keeps the active snapshot id of each batch group,
  refreshed in the background, so the request path reads a pointer without I/O;
* :class:`FeatureFetcher` completes a micro-batch of :class:`FetchRow` s with ONE
  round trip (:func:`~feature_streams.reply_loop.execute_reads`: the commands in one
  write, the replies in one loop): an ``HMGET`` per (batch group, entity) from the group's
  active snapshot (:func:`~feature_streams.read_plan.queue_reads`) and an ``HGETALL``
  per (stream group, entity) tile hash, whose windows are evaluated at each row's
  time by :class:`~feature_streams.hash_reader.HashWindowReader` (tested equal to
  :mod:`feature_streams.windows`). Missing entities, rows and fields get the defined
  defaults and are listed in ``FetchRow.defaulted``.

A problem of one key degrades only the rows that read it (``FetchRow.degraded``
names it): :data:`KEY_ERROR` when Redis answers that key with an error such as
``WRONGTYPE`` (something other than a hash was written there), :data:`VALUE_INVALID`
when a stored value is no finite number. Anything else (connection lost, the
timeout, a server-wide error reply such as ``LOADING`` or ``OOM``) is raised to the
caller, which owns the failure policy (the server: degrade or fail, its breaker).

On a Redis Cluster the micro-batch's reads go out as one pipeline per node
(:class:`~feature_streams.cluster_pipeline.NodePipelines`), concurrently, each under the
timeout. A node that fails degrades only the rows reading a key it holds
(:data:`NODE_UNAVAILABLE`, defaults served); the rest of the micro-batch is served and
nothing is raised for it (the per-node :class:`~feature_streams.cluster_pipeline.NodeHealth`
counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError, ResponseError

from feature_streams.batch_cache import BatchRow, BatchValueCache
from feature_streams.cluster_pipeline import (
    NodeHealth,
    NodePipelines,
    NodeUnavailableError,
    QueuedReads,
)
from feature_streams.keys import (
    LAST_TS_FIELD_BYTES,
    active_key,
    as_text,
    check_group,
    data_key,
    registry_key,
    tile_key,
)
from feature_streams.read_plan import (
    BatchColumns,
    BatchReadPlan,
    BatchReadResult,
    FetchPlan,
    FetchRow,
    Freshness,
    SnapshotGoneError,
    StreamColumns,
    queue_reads,
)
from feature_streams.redis_client import AnyRedis
from feature_streams.reply_loop import execute_reads
from feature_streams.tile_cache import TileEntry, TileHashCache

__all__ = [
    "KEY_ERROR",
    "NODE_UNAVAILABLE",
    "SNAPSHOT_GONE",
    "VALUE_INVALID",
    "BatchSnapshotCache",
    "FeatureFetcher",
    "FetchResult",
    "default_all",
    "defaulted",
]

logger = logging.getLogger(__name__)

SNAPSHOT_GONE = "batch_snapshot_gone"
"""``FetchRow.degraded`` reason: the snapshot read was being deleted (defaults served)."""

KEY_ERROR = "store_key_error"
"""``FetchRow.degraded`` reason: Redis answered this row's key with an error (e.g.
``WRONGTYPE``); that group's values are defaults for this row only."""

VALUE_INVALID = "store_value_invalid"
"""``FetchRow.degraded`` reason: a stored value of this row's key is no finite number;
the values it feeds are defaults for this row only."""

NODE_UNAVAILABLE = "redis_node_unavailable"
"""``FetchRow.degraded`` reason (cluster): the node holding one of this row's keys
failed or was too slow; the values read there are defaults for this row only."""

_KEY_ERRORS = ("WRONGTYPE", "NOPERM")
"""Error replies about one key (its type, an ACL on it); any other is store-wide."""

_LOG_EVERY_S = 10.0


class BatchSnapshotCache:
    """The active snapshot id of each group, refreshed in the background.

    ``snapshot_id`` is a plain attribute read (no I/O) for the request path;
    ``refresh`` reads all pointers now (one pipeline). While Redis is unreachable the
    last known ids are kept and a warning is logged once per outage. ``on_change`` is
    called with the new ids whenever a refresh finds a different one.
    """

    def __init__(
        self,
        client: AnyRedis,
        groups: Iterable[str],
        *,
        refresh_interval_s: float = 0.5,
        on_change: Callable[[Mapping[str, str | None]], None] | None = None,
    ) -> None:
        self._client = client
        self._on_change = on_change
        self._groups = tuple(check_group(g) for g in dict.fromkeys(groups))
        self._interval = refresh_interval_s
        self._ids: Mapping[str, str | None] = MappingProxyType(dict.fromkeys(self._groups))
        self._refreshed_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        #: Set by ``stop``: the loop ends even if the task's cancellation was swallowed.
        self._stopping = False
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
                    pipe.get(active_key(group))
                replies = await pipe.execute()
            ids = {g: as_text(r) for g, r in zip(self._groups, replies, strict=True)}
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
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="batch-snapshot-cache")

    async def stop(self) -> None:
        """Stop the background refresh (idempotent).

        The loop also checks a flag: a cancellation that arrives while a read is timing
        out can come back from redis-py as its ``TimeoutError`` (a ``RedisError`` the
        loop logs and survives), and ``stop`` would then wait for the task forever."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
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
        while not self._stopping:
            await asyncio.sleep(self._interval)
            if self._stopping:
                return
            await self._refresh_logged()


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What one :meth:`FeatureFetcher.fetch` did (the values are in the rows)."""

    round_trip_s: float | None
    """Seconds from queueing the reads to their replies; ``None`` when nothing was read."""
    snapshots: Mapping[str, str | None]
    """Batch group -> snapshot id read (one per group for the whole micro-batch)."""
    gone: tuple[str, ...] = ()
    """Batch groups whose snapshot was being deleted: their rows got defaults."""
    unavailable_nodes: tuple[str, ...] = ()
    """Cluster nodes that failed this micro-batch (their keys' rows degraded)."""


_NOTHING_READ = FetchResult(None, MappingProxyType({}))


@dataclass(slots=True)
class _BatchRead:
    """One batch group of a micro-batch: rows held in the cache and the reads queued."""

    columns: BatchColumns
    snapshot_id: str | None
    members: list[FetchRow]
    cached: dict[str, BatchRow]
    plan: BatchReadPlan | None  # None: every entity was cached, nothing queued

    @property
    def n_commands(self) -> int:
        return 0 if self.plan is None else self.plan.n_commands


@dataclass(slots=True)
class _StreamRead:
    """One stream group of a micro-batch: its rows, their keys and one read per key."""

    columns: StreamColumns
    members: list[FetchRow]
    keys: list[str]  # per member
    unique: list[str]  # one command each, in queue order
    held: list[TileEntry | None]  # per unique key: the hash checked by version, if any


_Batches = list[_BatchRead]
_Streams = list[_StreamRead]
_Fetched = Mapping[str, Mapping[bytes, bytes] | BaseException]


class FeatureFetcher:
    """Completes micro-batches of rows from Redis; one per process.

    Does not own ``client`` or ``snapshots`` (the caller starts, stops and closes them).
    ``node_health`` gates each cluster node's pipeline (ignored on a standalone Redis).
    ``batch_cache`` keeps decoded batch-snapshot rows by snapshot id, so only entities
    it does not hold are read (:mod:`feature_streams.batch_cache`); ``None``: read all.
    ``tile_cache`` keeps fetched tile hashes by version, so for a hash it holds only
    its version and offsets are read (``HMGET``), and the hash is read whole, in a
    second round trip, only when it changed (:mod:`feature_streams.tile_cache`;
    standalone Redis only); ``None``: read all.
    """

    def __init__(
        self,
        client: AnyRedis,
        snapshots: BatchSnapshotCache,
        node_health: NodeHealth | None = None,
        batch_cache: BatchValueCache | None = None,
        tile_cache: TileHashCache | None = None,
    ) -> None:
        self._client = client
        self._snapshots = snapshots
        self._batch_cache = batch_cache if batch_cache is not None and batch_cache.enabled else None
        self._cluster: NodePipelines | None = None
        self._standalone: Redis | None = None
        self._tile_cache: TileHashCache | None = None
        if isinstance(client, RedisCluster):
            self._cluster = NodePipelines(client, node_health)
        else:
            self._standalone = client
            if tile_cache is not None and tile_cache.enabled:
                self._tile_cache = tile_cache
        self._refreshing: asyncio.Task[object] | None = None
        self._next_log = 0.0

    @property
    def snapshots(self) -> BatchSnapshotCache:
        """The active-snapshot cache reads follow."""
        return self._snapshots

    @property
    def batch_cache(self) -> BatchValueCache | None:
        """The decoded batch rows kept between micro-batches (``None``: none kept)."""
        return self._batch_cache

    @property
    def tile_cache(self) -> TileHashCache | None:
        """The tile hashes kept by version (``None``: none kept, e.g. on a cluster)."""
        return self._tile_cache

    async def aclose(self) -> None:
        """Stop background work (a cluster slot map refresh in flight); idempotent."""
        if self._cluster is not None:
            await self._cluster.aclose()

    async def fetch(
        self, plan: FetchPlan, rows: Sequence[FetchRow], timeout_s: float | None = None
    ) -> FetchResult:
        """Complete every row of ``rows`` in place with one Redis round trip.

        Raises ``RedisError``, ``OSError`` or ``TimeoutError`` (after ``timeout_s``)
        when Redis cannot answer; rows may then hold ``defaulted`` entries for missing
        entity ids, nothing else is changed. An error about one key degrades only the
        rows reading it (:data:`KEY_ERROR`, :data:`VALUE_INVALID`).
        """
        if not plan.uses_store or not rows:
            return _NOTHING_READ
        loop = asyncio.get_running_loop()
        started = loop.time()
        unavailable: tuple[str, ...] = ()
        round_trip_s: float | None = None
        results: Sequence[object] = ()
        queued = QueuedReads()
        batch_reads, stream_reads, checks = self._queue(plan, rows, queued)
        if not batch_reads and not stream_reads:
            return _NOTHING_READ
        if queued.commands:
            if self._cluster is not None:
                results = await self._cluster.execute(queued.commands, timeout_s)
                unavailable = _unavailable_nodes(results)
            elif self._standalone is not None:
                results = await execute_reads(self._standalone, queued.commands, timeout_s)
                if checks:
                    results = await self._read_changed(
                        self._standalone, checks, results, timeout_s, started
                    )
            round_trip_s = loop.time() - started
        for reply in results:
            if (
                isinstance(reply, BaseException)
                and not _is_key_error(reply)
                and not isinstance(reply, NodeUnavailableError)
            ):
                raise reply
        snapshots: dict[str, str | None] = {}
        gone: list[str] = []
        offset = 0
        for batch_read in batch_reads:
            chunk = results[offset : offset + batch_read.n_commands]
            offset += batch_read.n_commands
            snapshots[batch_read.columns.spec.group] = batch_read.snapshot_id
            if not self._apply_batch_group(batch_read, chunk):
                gone.append(batch_read.columns.spec.group)
        for stream_read in stream_reads:
            unique = stream_read.unique
            chunk = results[offset : offset + len(unique)]
            offset += len(unique)
            fetched, memos = self._hashes(stream_read, chunk)
            self._apply_stream_group(stream_read, fetched, memos)
        read = MappingProxyType(snapshots)
        if snapshots:
            for item in rows:
                item.snapshots = read
        if unavailable and self._may_log():
            logger.warning(
                "redis cluster node(s) %s unavailable: their keys' rows degraded",
                ", ".join(unavailable),
                extra={"nodes": list(unavailable)},
            )
        return FetchResult(round_trip_s, read, tuple(gone), unavailable)

    def _queue(
        self, plan: FetchPlan, rows: Sequence[FetchRow], pipe: QueuedReads
    ) -> tuple[_Batches, _Streams, list[tuple[int, str, TileEntry]]]:
        batch_reads: _Batches = []
        cache = self._batch_cache
        for columns in plan.batch:
            members = []
            for item in rows:
                if item.store_sent and item.sent[columns.column_index].all():
                    continue
                if columns.entity not in item.entity_ids:
                    self._missing_entity(plan, item, columns.columns)
                    continue
                members.append(item)
            if members:
                spec = columns.spec
                ids = [m.entity_ids[columns.entity] for m in members]
                snapshot = self._snapshots.snapshot_id(spec.group)
                cached: dict[str, BatchRow] = {}
                if cache is not None and snapshot is not None:
                    cached, ids = cache.lookup(spec.group, snapshot, spec.fields, ids)
                read_plan = queue_reads(pipe, spec, snapshot, ids) if ids else None
                batch_reads.append(_BatchRead(columns, snapshot, members, cached, read_plan))
        stream_reads: _Streams = []
        checks: list[tuple[int, str, TileEntry]] = []  # (command position, key, hash held)
        tiles = self._tile_cache
        for stream in plan.stream:
            members, keys = [], []
            queued: dict[str, TileEntry | None] = {}
            for item in rows:
                if item.store_sent and item.sent[stream.column_index].all():
                    continue
                entity_id = item.entity_ids.get(stream.entity)
                if entity_id is None:
                    self._missing_entity(plan, item, [c for _, c in stream.outputs])
                    continue
                key = tile_key(stream.plan.group.name, entity_id)
                if key not in queued:  # one read per entity, however many requests
                    held = None if tiles is None else tiles.get(key)
                    queued[key] = held
                    if held is None:
                        pipe.hgetall(key)
                    else:  # version and offsets only: read whole only if it changed
                        checks.append((len(pipe), key, held))
                        pipe.hmget(key, held.check)
                members.append(item)
                keys.append(key)
            if members:
                stream_reads.append(
                    _StreamRead(stream, members, keys, list(queued), list(queued.values()))
                )
        return batch_reads, stream_reads, checks

    @staticmethod
    async def _read_changed(
        client: Redis,
        checks: Sequence[tuple[int, str, TileEntry]],
        results: Sequence[object],
        timeout_s: float | None,
        started: float,
    ) -> Sequence[object]:
        """``results`` with each checked hash whose version is no longer the one held
        replaced by its ``HGETALL``, read now: a second round trip, only when some kept
        hash changed (an error reply stays: that key's error), within the same budget."""
        changed = [
            (n, key)
            for n, key, held in checks
            if not isinstance(results[n], BaseException) and results[n] != held.expected
        ]
        if not changed:
            return results
        left = None
        if timeout_s is not None:
            left = timeout_s - (asyncio.get_running_loop().time() - started)
            if left <= 0:
                raise TimeoutError("feature fetch: no time left to read the changed hashes")
        again = await execute_reads(client, [("HGETALL", key) for _, key in changed], left)
        replaced = list(results)
        for (n, _), reply in zip(changed, again, strict=True):
            replaced[n] = reply
        return replaced

    def _hashes(
        self, read: _StreamRead, replies: Sequence[object]
    ) -> tuple[_Fetched, Mapping[str, dict[object, Any]]]:
        """Each key's hash (or error) from its reply, and the merge memo of each hash
        the tile cache holds; what was read whole is kept by the cache."""
        tiles = self._tile_cache
        fetched: dict[str, Mapping[bytes, bytes] | BaseException] = {}
        memos: dict[str, dict[object, Any]] = {}
        for key, raw, held in zip(read.unique, replies, read.held, strict=True):
            if isinstance(raw, BaseException):
                fetched[key] = raw
                if tiles is not None:
                    tiles.discard(key)
                continue
            if held is not None and tiles is not None and not isinstance(raw, dict):
                fetched[key] = tiles.hit(held)  # its version was the one held
                memos[key] = held.merge_memo()
                continue
            fields = raw if isinstance(raw, dict) else {}
            fetched[key] = fields
            if tiles is not None:
                entry = tiles.store(key, fields)
                if entry is not None:
                    memos[key] = entry.merge_memo()
        return fetched, memos

    def _apply_batch_group(self, batch: _BatchRead, results: Sequence[object]) -> bool:
        """Place one group's values; False when its snapshot was gone (defaults)."""
        columns, members = batch.columns, batch.members
        rows: dict[str, BatchRow] = batch.cached
        key_errors: Mapping[str, str] = {}
        down: set[str] = set()
        plan = batch.plan
        if plan is not None:
            try:
                read = plan.decode(results)
            except NodeUnavailableError:  # the registry entry's node: no deletion check
                for item in members:
                    _flag_node_unavailable(item)
                    defaulted(item, columns.spec.fields, columns.columns)
                return True
            except SnapshotGoneError:
                self._refresh_snapshots()
                if self._batch_cache is not None:
                    self._batch_cache.invalidate(columns.spec.group)
                for item in members:
                    item.degraded.append(SNAPSHOT_GONE)
                    defaulted(item, columns.spec.fields, columns.columns)
                return False
            except ResponseError as error:  # the registry key itself (checked: a key error)
                self._log_key_error(registry_key(columns.spec.group), str(error))
                for item in members:
                    item.degraded.append(KEY_ERROR)
                    defaulted(item, columns.spec.fields, columns.columns)
                return True
            rows, key_errors, down = self._decoded_rows(batch, plan, read, results)
        fields, cols = columns.spec.fields, columns.columns
        for item in members:
            entity_id = item.entity_ids[columns.entity]
            batch_row = rows[entity_id]
            values = batch_row.values
            if entity_id in down:
                _flag_node_unavailable(item)
            elif entity_id in key_errors:
                item.degraded.append(KEY_ERROR)
            elif batch_row.invalid:
                item.degraded.append(VALUE_INVALID)
            row = item.row[0]
            if item.store_sent:
                for name, column in zip(fields, cols, strict=True):
                    if not item.sent[column]:
                        row[column] = values[name]
            else:
                for name, column in zip(fields, cols, strict=True):
                    row[column] = values[name]
            if batch_row.missing:
                defaulted(item, fields, cols)
            elif absent := batch_row.absent:
                item.defaulted.extend(n for n in absent if not item.sent[_col(columns, n)])
        return True

    def _decoded_rows(
        self,
        batch: _BatchRead,
        plan: BatchReadPlan,
        read: BatchReadResult,
        results: Sequence[object],
    ) -> tuple[dict[str, BatchRow], Mapping[str, str], set[str]]:
        """The rows of a group (cached and just read), logging and caching what was read;
        also the entities whose key answered an error and those on an unavailable node."""
        spec = batch.columns.spec
        down = {
            entity_id
            for entity_id, reply in zip(plan.entity_ids, results, strict=False)
            if isinstance(reply, NodeUnavailableError)
        }
        for entity_id, reply in read.key_errors.items():
            if entity_id in down:
                continue
            self._log_key_error(data_key(spec.group, str(plan.snapshot_id), entity_id), reply)
        for entity_id, names in read.invalid_fields.items():
            self._log_invalid(spec.group, entity_id, names)
        fresh = {
            entity_id: BatchRow(
                read.values[entity_id],
                entity_id in read.missing_entities,
                read.missing_fields.get(entity_id, ()),
                read.invalid_fields.get(entity_id, ()),
            )
            for entity_id in plan.entity_ids
        }
        cache = self._batch_cache
        if cache is not None and plan.snapshot_id is not None:
            complete = {
                e: row for e, row in fresh.items() if e not in down and e not in read.key_errors
            }
            cache.store(spec.group, plan.snapshot_id, spec.fields, complete)
        rows = batch.cached
        rows.update(fresh)
        return rows, read.key_errors, down

    def _apply_stream_group(
        self, read: _StreamRead, fetched: _Fetched, memos: Mapping[str, dict[object, Any]]
    ) -> None:
        stream, members, keys = read.columns, read.members, read.keys
        group = stream.plan.group.name
        read_many = stream.reader.read_many
        placement = stream.placement
        by_key: dict[str, list[FetchRow]] = {}
        for item, key in zip(members, keys, strict=True):
            by_key.setdefault(key, []).append(item)
        for key, items in by_key.items():
            hash_fields = fetched[key]
            reason = KEY_ERROR
            if isinstance(hash_fields, NodeUnavailableError):
                names = [n for n, _ in stream.outputs]
                columns = [c for _, c in stream.outputs]
                for item in items:
                    _flag_node_unavailable(item)
                    defaulted(item, names, columns)
                continue
            try:
                if isinstance(hash_fields, BaseException):
                    self._log_key_error(key, str(hash_fields))
                    raise hash_fields
                reason = VALUE_INVALID
                last = hash_fields.get(LAST_TS_FIELD_BYTES)
                last_ms = None if last is None else int(float(last))
                times = [item.t_ms for item in items]
                all_values = read_many(hash_fields, times, memos.get(key))
            except (ResponseError, ValueError, TypeError, OverflowError) as error:
                if reason == VALUE_INVALID:
                    self._log_invalid(group, key, (repr(error)[:200],))
                names = [n for n, _ in stream.outputs]
                columns = [c for _, c in stream.outputs]
                for item in items:
                    item.degraded.append(reason)
                    defaulted(item, names, columns)
                continue
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

    @staticmethod
    def _missing_entity(plan: FetchPlan, item: FetchRow, columns: Sequence[int]) -> None:
        defaulted(item, [plan.names[c] for c in columns], columns)

    def _log_key_error(self, key: str, error: str) -> None:
        if self._may_log():
            logger.warning(
                "feature store key %s answered an error (its rows degraded): %s",
                key,
                error,
                extra={"key": key, "error": error},
            )

    def _log_invalid(self, group: str, entity: str, detail: Sequence[str]) -> None:
        if self._may_log():
            logger.warning(
                "feature store group %s, %s: a stored value is no number (rows degraded): %s",
                group,
                entity,
                ", ".join(detail),
                extra={"group": group, "entity": entity},
            )

    def _may_log(self) -> bool:
        """At most one such warning per :data:`_LOG_EVERY_S` (the metric counts all)."""
        now = time.monotonic()
        if now < self._next_log:
            return False
        self._next_log = now + _LOG_EVERY_S
        return True

    def _refresh_snapshots(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._snapshots.refresh())


def _is_key_error(reply: BaseException) -> bool:
    """An error reply about one key (WRONGTYPE, NOPERM), not about the store."""
    return isinstance(reply, ResponseError) and str(reply).startswith(_KEY_ERRORS)


def _unavailable_nodes(results: Sequence[object]) -> tuple[str, ...]:
    """The nodes named by :class:`NodeUnavailableError` replies, in first-seen order."""
    nodes: dict[str, None] = {}
    for reply in results:
        if isinstance(reply, NodeUnavailableError):
            nodes[reply.node] = None
    return tuple(nodes)


def _col(columns: BatchColumns, name: str) -> int:
    return columns.columns[columns.spec.fields.index(name)]


def defaulted(item: FetchRow, names: Sequence[str], columns: Sequence[int]) -> None:
    """Record ``names`` (at ``columns``) as served by default, except those sent."""
    item.defaulted.extend(n for n, c in zip(names, columns, strict=True) if not item.sent[c])


def default_all(plan: FetchPlan, item: FetchRow) -> None:
    """Record every store column of ``plan`` as served by default (store unavailable)."""
    for columns in plan.batch:
        defaulted(item, columns.spec.fields, columns.columns)
    for stream in plan.stream:
        defaulted(item, [n for n, _ in stream.outputs], [c for _, c in stream.outputs])


def _flag_node_unavailable(item: FetchRow) -> None:
    """Flag ``item`` :data:`NODE_UNAVAILABLE` once, however many of its keys failed."""
    if NODE_UNAVAILABLE not in item.degraded:
        item.degraded.append(NODE_UNAVAILABLE)
