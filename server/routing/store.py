"""Where the routing state and its audit log persist: Redis, or a local file.

Both stores keep one document (every endpoint's ``EndpointState`` as JSON) and a
revision, and change them only by compare-and-set on the revision, so two admins
(or two processes) can never lose each other's update. An applied change and its
audit entry are written together, atomically.

Redis layout (``routing.redis_key`` / ``routing.audit_key``)::

    HASH   streamscore:{routing}         revision -> "7", state -> {"fraud": {...}, ...},
                                         records -> {"fraud": {"3": {"approval": ...}}}
    STREAM streamscore:{routing}:audit   entry -> {"time":..., "actor":..., "before":..., ...}

The compare-and-set is one Lua script touching both keys, so they share the hash tag
``{routing}`` (one Redis Cluster slot); on a cluster, keys in different slots are
refused at construction (``ValueError`` naming both settings).

File layout (``routing.file_path``): ``<path>`` holds ``{"revision": n, "endpoints":
{...}, "records": {...}}`` (``records``: who loaded each version, its approval),
replaced atomically (write + rename) under an ``flock`` on ``<stem>.lock``;
the audit log is ``<stem>.audit.jsonl``, rotated to ``<stem>.audit.1.jsonl`` past
``routing.audit_max_bytes`` and read backwards from its end. It serves the processes
of one machine.

Failures to reach the store raise ``DependencyUnavailable`` (gRPC UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from server.errors import DependencyUnavailable
from server.routing.state import AuditEntry, RoutingState

#: Most audit entries a listing returns.
MAX_AUDIT_LIMIT = 1000


class RoutingStore(Protocol):
    """Persistence of the routing state and the audit log."""

    async def revision(self) -> int:
        """The current revision (0 = nothing persisted)."""
        ...

    async def read(self) -> RoutingState:
        """The current state."""
        ...

    async def commit(
        self, expected_revision: int, state: RoutingState, entries: Sequence[AuditEntry]
    ) -> bool:
        """Write ``state`` (at ``expected_revision + 1``) and append ``entries``, iff the
        stored revision is still ``expected_revision``; False when it moved on."""
        ...

    async def append_audit(self, entry: AuditEntry) -> None:
        """Append an entry that changes no state (a refused action)."""
        ...

    async def audit(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first, optionally of one endpoint."""
        ...


@contextlib.contextmanager
def _unavailable(store: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as error:
        raise DependencyUnavailable(f"routing store ({store}) unavailable: {error}") from error


# Compare-and-set: KEYS = state hash, audit stream; ARGV = expected revision,
# new revision, state JSON, audit max length, records JSON, audit entries...
_COMMIT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
if current ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'revision', ARGV[2], 'state', ARGV[3], 'records', ARGV[5])
for i = 6, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'entry', ARGV[i])
end
return 1
"""


class RedisRoutingStore:
    """State in a Redis hash, audit log in a Redis stream."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        key: str,
        audit_key: str,
        audit_max_len: int = 100_000,
    ) -> None:
        if isinstance(redis, RedisCluster) and key_slot(key.encode()) != key_slot(
            audit_key.encode()
        ):
            raise ValueError(
                f"routing.redis_key {key!r} and routing.audit_key {audit_key!r} hash to "
                "different Redis Cluster slots: give them a common hash tag, e.g. "
                "'streamscore:{routing}' and 'streamscore:{routing}:audit'"
            )
        self._redis = redis
        self._key = key
        self._audit_key = audit_key
        self._audit_max_len = audit_max_len
        self._commit = redis.register_script(_COMMIT)

    async def revision(self) -> int:
        with _unavailable("redis"):
            value = await self._redis.hget(self._key, "revision")
        return int(value or 0)

    async def read(self) -> RoutingState:
        with _unavailable("redis"):
            revision, state, records = await self._redis.hmget(
                self._key, ["revision", "state", "records"]
            )
        return RoutingState.from_json(int(revision or 0), state, records)

    async def commit(
        self, expected_revision: int, state: RoutingState, entries: Sequence[AuditEntry]
    ) -> bool:
        args: list[str | int] = [
            expected_revision,
            state.revision,
            state.to_json(),
            self._audit_max_len,
            state.records_json(),
            *(e.to_json() for e in entries),
        ]
        with _unavailable("redis"):
            done = await self._commit(keys=[self._key, self._audit_key], args=args)
        return bool(done)

    async def append_audit(self, entry: AuditEntry) -> None:
        with _unavailable("redis"):
            await self._redis.xadd(
                self._audit_key,
                {"entry": entry.to_json()},
                maxlen=self._audit_max_len,
                approximate=True,
            )

    async def audit(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        limit = max(1, min(limit, MAX_AUDIT_LIMIT))
        found: list[AuditEntry] = []
        newest = "+"
        with _unavailable("redis"):
            while len(found) < limit:
                page = await self._redis.xrevrange(self._audit_key, newest, "-", count=200)
                if not page:
                    break
                for raw_id, fields in page:
                    text = fields.get(b"entry") if fields else None
                    if raw_id is None or text is None:
                        continue
                    entry = AuditEntry.from_json(_text(raw_id), text)
                    if endpoint is None or entry.endpoint == endpoint:
                        found.append(entry)
                last_id = page[-1][0]
                if last_id is None:
                    break
                newest = f"({_text(last_id)}"
        return found[:limit]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: Bytes read per step when the audit log is read backwards from its end.
AUDIT_READ_BLOCK = 64 * 1024
#: Default size past which the file store's audit log is rotated.
AUDIT_MAX_BYTES = 64 * 1024 * 1024


def tail_lines(path: Path, block_size: int = AUDIT_READ_BLOCK) -> Iterator[bytes]:
    """The non-empty lines of ``path``, last first, read backwards in blocks: the newest
    entries of a large log cost what they are, not the whole file. Missing file: none."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""  # the start of a line whose beginning lies in an earlier block
        while position > 0:
            step = min(block_size, position)
            position -= step
            handle.seek(position)
            block = handle.read(step) + rest
            lines = block.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest


class FileRoutingStore:
    """State in a JSON file, audit log in a JSON-lines file beside it (one machine).

    The audit log is appended under the lock; past ``audit_max_bytes`` it is renamed to
    ``<stem>.audit.1.jsonl`` (replacing the previous one) and a new one starts. Listings
    read the current file, then the previous one, backwards from their ends.
    """

    def __init__(self, path: Path, *, audit_max_bytes: int = AUDIT_MAX_BYTES) -> None:
        if audit_max_bytes < 1:
            raise ValueError("audit_max_bytes must be >= 1")
        self._path = path
        self._lock = path.with_name(f"{path.stem}.lock")
        self._audit = path.with_name(f"{path.stem}.audit.jsonl")
        self._audit_previous = path.with_name(f"{path.stem}.audit.1.jsonl")
        self._audit_max_bytes = audit_max_bytes

    async def revision(self) -> int:
        return (await self.read()).revision

    async def read(self) -> RoutingState:
        with _unavailable("file"):
            return await asyncio.to_thread(self._read)

    async def commit(
        self, expected_revision: int, state: RoutingState, entries: Sequence[AuditEntry]
    ) -> bool:
        with _unavailable("file"):
            return await asyncio.to_thread(self._commit, expected_revision, state, entries)

    async def append_audit(self, entry: AuditEntry) -> None:
        with _unavailable("file"):
            await asyncio.to_thread(self._locked_append, [entry])

    async def audit(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        limit = max(1, min(limit, MAX_AUDIT_LIMIT))
        with _unavailable("file"):
            return await asyncio.to_thread(self._newest, endpoint, limit)

    def _newest(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        with self._locked():  # not while an append rotates the files
            for path in (self._audit, self._audit_previous):
                for line in tail_lines(path):
                    entry_id, _, text = line.decode().partition(" ")
                    entry = AuditEntry.from_json(entry_id, text)
                    if endpoint is None or entry.endpoint == endpoint:
                        found.append(entry)
                        if len(found) == limit:
                            return found
        return found

    def _read(self) -> RoutingState:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return RoutingState()
        data: dict[str, Any] = json.loads(text)
        return RoutingState.from_json(
            int(data["revision"]),
            json.dumps(data["endpoints"]),
            json.dumps(data.get("records") or {}),
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit(
        self, expected_revision: int, state: RoutingState, entries: Sequence[AuditEntry]
    ) -> bool:
        with self._locked():
            if self._read().revision != expected_revision:
                return False
            document = (
                f'{{"revision":{state.revision},"endpoints":{state.to_json()},'
                f'"records":{state.records_json()}}}'
            )
            scratch = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
            with scratch.open("w") as out:
                out.write(document)
                out.flush()
                os.fsync(out.fileno())
            os.replace(scratch, self._path)
            self._append(entries)
        return True

    def _locked_append(self, entries: Sequence[AuditEntry]) -> None:
        with self._locked():
            self._append(entries)

    def _append(self, entries: Sequence[AuditEntry]) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._audit.stat().st_size >= self._audit_max_bytes:
                os.replace(self._audit, self._audit_previous)
        stamp = time.time_ns()
        with self._audit.open("a") as out:
            for i, entry in enumerate(entries):
                out.write(f"{stamp}-{i} {entry.to_json()}\n")
            out.flush()
            os.fsync(out.fileno())
