"""Drift monitor of one server process: fold, flush, merge, compare, alert.

The executor hands every micro-batch's input matrix, outputs and jobs to
:meth:`VersionDrift.observe` (batched: with ``call_soon`` once the batch's futures are
resolved; the idle fast path inline), which keeps references to the input and score
arrays (O(1), no numpy call, no allocation) and counts defaulted features;
it keeps no job, so the request objects die young (holding them let them survive into
older collector generations; arrays are not tracked by the collector). A fold of the
kept rows into the reference bins (:meth:`server.drift.bins.BinLayout.fold_values`:
one vectorised pass for all columns, ~0.15-0.35 ms for 256 rows) is never run inside
a request's path: once ``PENDING_ROWS`` are kept, ``observe`` schedules it for the
next loop turn, after the answering step (a lone caller's one-row batches wait for
the periodic flush's fold, or ``LONE_ROWS_CAP`` rows: each fold stalls one of its
requests). Every ``flush_interval_s`` the monitor asks
for the same deferred fold right after the next answered batch (waiting at most
``FOLD_WAIT_S``, then folding itself: no traffic, nobody to delay) and writes this
process's cumulative count vector of each time bucket to Redis. PSI is computed only
when windows are read back (``evaluate``).

Redis layout (``<digest>`` = first 12 hex digits of the profile's sha256, so a
changed profile never mixes with old counts)::

    streamscore:drift:v1:{<model>:<version>}:<digest>:b:<bucket>   hash
        <process id>  int64 count vector of that process in that bucket (raw bytes)
    streamscore:drift:v1:{<model>:<version>}:<digest>:judged:<bucket>   claim (SET NX)
    streamscore:drift:v1:{<model>:<version>}:<digest>:breach            hash
        <column>       closed windows in a row over a threshold
        <column>:open  "1" while a breach episode is open (its event was sent)

A bucket is ``bucket_s`` wide (``int(t // bucket_s)``); a window is the sum over its
buckets of every process's vector (summed on read). A flush overwrites the process's
own field with its cumulative vector, so a failed flush loses nothing and a repeated
one never double counts. The vector holds the slots of :class:`BinLayout`, then one
defaulted count per monitored feature, then the row count.

Every ``evaluate_interval_s`` the monitor reads the short and long windows ending
now (gauges, ``snapshot``; a bucket closed ``grace_s`` ago is read once and kept
summed, so a round reads only the recent buckets) and judges each such bucket:
the process that wins the bucket's claim compares the short window ending there
with the thresholds and updates the breach streaks; a column whose streak reaches
``consecutive`` opens an episode and sends ONE event (Kafka ``drift.topic`` and the
audit log); the episode closes when a judged window is back under the thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from feature_streams.redis_client import AnyRedis
from server.drift.bins import BinLayout, ColumnDrift, Counts, compare
from server.drift.metrics import DriftMetrics
from server.drift.views import VersionView, WindowView
from server.features import Prepared
from server.governance.profile import PROFILE_FILE, SCORE, ReferenceProfile
from server.manifest import ModelManifest
from server.records.kafka_sink import RecordSink
from server.settings import DriftSettings, DriftThresholds

logger = logging.getLogger(__name__)

KEY_PREFIX = "streamscore:drift:v1"
#: Rows kept before a fold is scheduled (keeps each fold, an event-loop stall, ~0.2 ms).
PENDING_ROWS = 256
#: Rows of one-row batches kept before a fold is scheduled: a lone caller's rows are
#: folded by the periodic flush (once a second, behind an answer), or at this many.
LONE_ROWS_CAP = 2048
#: How long a periodic flush waits for an answered batch to fold behind before folding
#: itself (at most half the flush interval).
FOLD_WAIT_S = 0.05


class HasPrepared(Protocol):
    """A job of a micro-batch (``server.executor.Job``): its prepared Score row, if any."""

    @property
    def prepared(self) -> Prepared | None: ...


#: Writes one audit entry for a drift event (model, reason, detail).
AuditWriter = Callable[[str, str, Mapping[str, Any]], Awaitable[None]]


def version_key(model: str, version: str, digest: str) -> str:
    """Prefix of every key of one version's drift counts (one Redis Cluster slot)."""
    return f"{KEY_PREFIX}:{{{model}:{version}}}:{digest}"


class VersionDrift:
    """Counts of one served version in this process; ``observe`` is the executor's hook."""

    def __init__(
        self,
        model: str,
        version: str,
        layout: BinLayout,
        manifest: ModelManifest,
        digest: str,
        settings: DriftSettings,
        clock: Callable[[], float],
    ) -> None:
        self.model = model
        self.version = version
        self.layout = layout
        self.key = version_key(model, version, digest)
        self._settings = settings
        self._clock = clock
        self._score_output = manifest.score_output
        self._score_index = manifest.score_index
        self._feature_slot = {b.name: i for i, b in enumerate(layout.features)}
        self.vector_size = layout.size + len(layout.features) + 1
        self._matrices: list[npt.NDArray[Any]] = []
        """Input matrix of each batch not folded yet (``_scores``: its score output)."""
        self._scores: list[npt.NDArray[Any]] = []
        self._filled = 0
        self._fold_scheduled = False
        self._fold_waiter: asyncio.Future[None] | None = None
        """Set by a flush that waits for the next answered batch to fold behind."""
        self._defaulted = [0] * len(layout.features)
        """Defaulted answers per monitored feature since the last fold."""
        self._all_features = bool(
            np.array_equal(layout.sources, np.arange(layout.width, dtype=np.intp))
        )
        self._buckets: dict[int, Counts] = {}
        """Cumulative vector of this process per bucket, kept until flushed after it closed."""
        self._dirty: set[int] = set()
        self._merged: dict[int, Counts] = {}
        """Sum over every process of each bucket already final (see ``read_window``)."""
        self.last_judged: int | None = None
        self.view: VersionView | None = None

    def observe(
        self,
        matrix: npt.NDArray[Any],
        outputs: Mapping[str, npt.NDArray[Any]],
        jobs: Sequence[HasPrepared],
    ) -> None:
        """Keep one answered batch's input and score arrays for the next fold.

        O(1) and no numpy call per batch (a lone caller's batches are one row: numpy's
        per-call overhead was the cost there). Only the arrays are kept, never the jobs:
        arrays are not tracked by the cyclic collector, so holding them adds no
        collection work (holding the jobs did). Defaulted features are counted now.
        With ``PENDING_ROWS`` kept (``LONE_ROWS_CAP`` after a one-row batch), or a flush
        waiting, the fold is scheduled for the next loop turn, behind the steps that
        deliver this batch's answers; outside an event loop (offline use) it runs at once.
        """
        self._matrices.append(matrix)
        self._scores.append(outputs[self._score_output])
        self._filled += int(matrix.shape[0])
        for job in jobs:
            prepared = job.prepared
            if prepared is not None and prepared.defaulted:
                for name in prepared.defaulted:
                    slot = self._feature_slot.get(name)
                    if slot is not None:
                        self._defaulted[slot] += 1
        # One-row batches (a lone caller's) wait for the periodic flush's fold, or
        # LONE_ROWS_CAP rows: a fold every PENDING_ROWS of them stalled 1 in 256 of a
        # lone caller's requests by ~0.15-0.3 ms, which moved its p99 by ~10%.
        due = self._filled >= (PENDING_ROWS if matrix.shape[0] > 1 else LONE_ROWS_CAP)
        if (due or self._fold_waiter is not None) and not self._fold_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.fold()
                return
            self._fold_scheduled = True
            loop.call_soon(self._scheduled_fold)

    @property
    def pending_rows(self) -> int:
        """Rows kept, not folded yet."""
        return self._filled

    def _scheduled_fold(self) -> None:
        self._fold_scheduled = False
        try:
            self.fold()
        except Exception:  # a fold must never take the loop down; its rows are lost
            logger.exception(
                "drift fold failed", extra={"model": self.model, "version": self.version}
            )

    def fold(self) -> None:
        """Fold the kept batches and defaulted counts into the current bucket's vector."""
        waiter, self._fold_waiter = self._fold_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._matrices:
            return
        matrices, scores = self._matrices, self._scores
        self._matrices, self._scores = [], []
        rows, self._filled = self._filled, 0
        matrix = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
        raw = scores[0] if len(scores) == 1 else np.concatenate(scores)
        block = np.empty((rows, len(self.layout.features) + 1), np.float32)
        block[:, :-1] = matrix if self._all_features else matrix[:, self.layout.sources]
        block[:, -1] = raw[:, self._score_index] if raw.ndim == 2 else raw.reshape(-1)
        self._add(self.layout.fold_values(block), rows)

    def _add(self, counts: Counts, rows: int) -> None:
        layout = self.layout
        vector = np.zeros(self.vector_size, np.int64)
        vector[: layout.size] = counts
        vector[layout.size : -1] = self._defaulted
        self._defaulted = [0] * len(layout.features)
        vector[-1] = rows
        bucket = int(self._clock() // self._settings.bucket_s)
        current = self._buckets.get(bucket)
        self._buckets[bucket] = vector if current is None else current + vector
        self._dirty.add(bucket)

    async def flush(self, redis: AnyRedis, process_id: str, fold_wait_s: float = 0.0) -> None:
        """Write this process's vector of every changed bucket (overwrite: idempotent).

        Rows kept since the last fold are folded first: right after the next answered
        batch when one comes within ``fold_wait_s`` (so the fold lands between answers,
        not on a request), else here.
        """
        if self._matrices and fold_wait_s > 0:
            waiter = asyncio.get_running_loop().create_future()
            self._fold_waiter = waiter
            try:
                await asyncio.wait([waiter], timeout=fold_wait_s)
            finally:
                if self._fold_waiter is waiter:
                    self._fold_waiter = None
        self.fold()
        if not self._dirty:
            return
        # flags taken before the await: a fold while Redis answers marks its bucket again
        dirty = sorted(self._dirty)
        self._dirty.clear()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for bucket in dirty:
                    key = f"{self.key}:b:{bucket}"
                    pipe.hset(key, process_id, self._buckets[bucket].tobytes())
                    pipe.expire(key, self._settings.key_ttl_s)
                await pipe.execute()
        except BaseException:
            self._dirty.update(dirty)  # sent again at the next flush
            raise
        current = int(self._clock() // self._settings.bucket_s)
        for bucket in [b for b in self._buckets if b < current - 1 and b not in self._dirty]:
            del self._buckets[bucket]

    async def read_window(
        self, redis: AnyRedis, last_bucket: int, buckets: int, final: int | None = None
    ) -> Counts:
        """Sum over every process of the buckets ``last_bucket - buckets + 1 .. last_bucket``.

        Buckets up to ``final`` (closed ``grace_s`` ago, as judged) are read once and
        kept summed, so an evaluation reads only the few recent buckets, not the whole
        long window; older ones are dropped from that cache.
        """
        total = np.zeros(self.vector_size, np.int64)
        missing: list[int] = []
        for bucket in range(last_bucket - buckets + 1, last_bucket + 1):
            cached = self._merged.get(bucket)
            if cached is None:
                missing.append(bucket)
            else:
                total += cached
        if missing:
            async with redis.pipeline(transaction=False) as pipe:
                for bucket in missing:
                    pipe.hvals(f"{self.key}:b:{bucket}")
                replies = await pipe.execute()
            width = self.vector_size * 8
            for bucket, values in zip(missing, replies, strict=True):
                summed = np.zeros(self.vector_size, np.int64)
                for raw in values:
                    if len(raw) == width:
                        summed += np.frombuffer(raw, np.int64)
                total += summed
                if final is not None and bucket <= final:
                    self._merged[bucket] = summed
        if final is not None:
            oldest = final - self._settings.long_window_buckets
            for bucket in [b for b in self._merged if b < oldest]:
                del self._merged[bucket]
        return total

    def window_view(self, counts: Counts, buckets: int) -> WindowView:
        """Comparison of a summed window with the reference."""
        layout = self.layout
        rows = int(counts[-1])
        defaulted = counts[layout.size : layout.size + len(layout.features)]
        shares = {
            b.name: (float(defaulted[i]) / rows if rows else 0.0)
            for i, b in enumerate(layout.features)
        }
        return WindowView(buckets, rows, compare(layout, counts[: layout.size]), shares)


def over_threshold(view: WindowView, thresholds: DriftThresholds) -> dict[str, ColumnDrift]:
    """Columns of ``view`` over a threshold (PSI, JS, or defaulted share)."""
    over: dict[str, ColumnDrift] = {}
    for column in view.columns:
        if (
            column.psi > thresholds.psi
            or (column.js is not None and column.js > thresholds.js)
            or view.defaulted_share.get(column.name, 0.0) > thresholds.defaulted_share
        ):
            over[column.name] = column
    return over


class DriftMonitor:
    """Every monitored version of this process, its flush/evaluate task, gauges and events.

    ``attach``/``detach`` follow the registry's loads; ``start``/``stop`` run the
    task (``stop`` flushes once more). Does not own ``redis`` or ``sink``.
    """

    def __init__(
        self,
        settings: DriftSettings,
        redis: AnyRedis,
        metrics: DriftMetrics,
        *,
        sink: RecordSink | None = None,
        audit: AuditWriter | None = None,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._metrics = metrics
        self._sink = sink
        self._audit = audit
        self._clock = clock
        self.process_id = uuid.uuid4().hex
        self._versions: dict[tuple[str, str], VersionDrift] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def attach(
        self, version_dir: Path, manifest: ModelManifest, feature_names: Sequence[str]
    ) -> VersionDrift | None:
        """Monitor a loaded version; None (said once in the log) without a usable profile."""
        name, version = manifest.name, manifest.version
        path = version_dir / PROFILE_FILE
        if not path.is_file():
            logger.info(
                "drift monitoring off: no reference profile",
                extra={"model": name, "version": version, "path": str(path)},
            )
            return None
        try:
            text = path.read_bytes()
            profile = ReferenceProfile.model_validate_json(text)
            layout = BinLayout.compile(profile, feature_names)
        except (OSError, ValueError) as error:
            logger.warning(
                "drift monitoring off: reference profile unusable",
                extra={"model": name, "version": version, "error": str(error)},
            )
            return None
        digest = hashlib.sha256(text).hexdigest()[:12]
        drift = VersionDrift(name, version, layout, manifest, digest, self._settings, self._clock)
        self._versions[(name, version)] = drift
        logger.info(
            "drift monitoring on",
            extra={"model": name, "version": version, "features": len(layout.features)},
        )
        return drift

    def detach(self, model: str, version: str) -> None:
        """Stop monitoring a version that was unloaded (its gauges are removed)."""
        drift = self._versions.pop((model, version), None)
        if drift is not None:
            self._metrics.remove(model, version, [b.name for b in drift.layout.features])

    def view(self, model: str, version: str) -> VersionView | None:
        """The last evaluated windows of a version (None: not monitored or not yet read)."""
        drift = self._versions.get((model, version))
        return drift.view if drift is not None else None

    def monitored(self) -> list[tuple[str, str]]:
        """(model, version) of every monitored version."""
        return sorted(self._versions)

    async def flush(self, fold_wait_s: float = 0.0) -> bool:
        """Fold and write every version's counts; True when all were written.

        ``fold_wait_s``: see :meth:`VersionDrift.flush` (the periodic flush waits
        ``FOLD_WAIT_S``; a final or explicit flush folds at once).
        """
        ok = True
        for drift in list(self._versions.values()):
            try:
                await drift.flush(self._redis, self.process_id, fold_wait_s)
            except (RedisError, OSError) as error:
                ok = False
                self._metrics.flush_failed()
                logger.warning(
                    "drift flush failed; sent again at the next flush",
                    extra={"model": drift.model, "version": drift.version, "error": repr(error)},
                )
        return ok

    async def evaluate(self) -> None:
        """Export the windows ending now and judge the buckets closed since the last look."""
        async with self._lock:
            for drift in list(self._versions.values()):
                try:
                    await self._evaluate(drift)
                except (RedisError, OSError) as error:
                    where = {"model": drift.model, "version": drift.version}
                    logger.warning(
                        "drift evaluation failed; retried next interval",
                        extra={**where, "error": repr(error)},
                    )

    async def _evaluate(self, drift: VersionDrift) -> None:
        s = self._settings
        now = self._clock()
        current = int(now // s.bucket_s)
        closed = int((now - s.grace_s) // s.bucket_s) - 1
        short = drift.window_view(
            await drift.read_window(self._redis, current, s.short_window_buckets, closed),
            s.short_window_buckets,
        )
        long = drift.window_view(
            await drift.read_window(self._redis, current, s.long_window_buckets, closed),
            s.long_window_buckets,
        )
        self._metrics.export(drift.model, drift.version, short)
        start = closed if drift.last_judged is None else drift.last_judged + 1
        for bucket in range(max(start, closed - s.short_window_buckets + 1), closed + 1):
            await self._judge(drift, bucket)
        if drift.last_judged is None or closed > drift.last_judged:
            drift.last_judged = closed
        breach = await self._redis.hgetall(f"{drift.key}:breach")
        open_now = tuple(
            sorted(
                _text(k)[: -len(":open")]
                for k, v in breach.items()
                if _text(k).endswith(":open") and _text(v) == "1"
            )
        )
        drift.view = VersionView(short, long, open_now, s.bucket_s)

    async def _judge(self, drift: VersionDrift, bucket: int) -> None:
        """Judge the short window ending at ``bucket``, once across every process."""
        s = self._settings
        claimed = await self._redis.set(
            f"{drift.key}:judged:{bucket}", self.process_id, nx=True, ex=s.key_ttl_s
        )
        if not claimed:
            return
        thresholds = s.thresholds(drift.model)
        view = drift.window_view(
            await drift.read_window(self._redis, bucket, s.short_window_buckets, bucket),
            s.short_window_buckets,
        )
        if view.rows < thresholds.min_rows:
            return  # too few rows to judge: streaks stay as they are
        over = over_threshold(view, thresholds)
        state_key = f"{drift.key}:breach"
        state = {_text(k): _text(v) for k, v in (await self._redis.hgetall(state_key)).items()}
        updates: dict[FieldT, EncodableT] = {}
        events: list[ColumnDrift] = []
        for column in view.columns:
            name = column.name
            if name in over:
                streak = int(state.get(name, "0")) + 1
                updates[name] = str(streak)
                if streak >= thresholds.consecutive and state.get(f"{name}:open") != "1":
                    updates[f"{name}:open"] = "1"
                    events.append(column)
            elif state.get(name, "0") != "0" or state.get(f"{name}:open") == "1":
                updates[name] = "0"
                updates[f"{name}:open"] = "0"
        if updates:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(state_key, mapping=updates)
                pipe.expire(state_key, s.key_ttl_s)
                await pipe.execute()
        for column in events:
            await self._emit(drift, bucket, view, column, thresholds)

    async def _emit(
        self,
        drift: VersionDrift,
        bucket: int,
        view: WindowView,
        column: ColumnDrift,
        thresholds: DriftThresholds,
    ) -> None:
        s = self._settings
        event: dict[str, Any] = {
            "type": "drift",
            "model": drift.model,
            "version": drift.version,
            "feature": column.name,
            "is_score": column.name == SCORE,
            "psi": _finite(column.psi),
            "js": None if column.js is None else _finite(column.js),
            "defaulted_share": view.defaulted_share.get(column.name, 0.0),
            "nan_share": column.nan_share,
            "rows": view.rows,
            "window_end_ms": int((bucket + 1) * s.bucket_s * 1000),
            "window_s": s.bucket_s * s.short_window_buckets,
            "consecutive": thresholds.consecutive,
            "thresholds": thresholds.model_dump(),
            "time": self._clock(),
        }
        self._metrics.event(drift.model, drift.version)
        logger.warning("drift breach", extra={k: event[k] for k in ("model", "version", "feature")})
        if self._sink is not None:
            payload = json.dumps(event, sort_keys=True).encode()
            self._sink.offer(s.topic, payload, key=f"{drift.model}/{drift.version}".encode())
        if self._audit is not None:
            reason = f"{column.name} over its drift threshold for {thresholds.consecutive} windows"
            try:
                await self._audit(drift.model, reason, event)
            except Exception:
                logger.exception("drift event not audit-logged", extra={"model": drift.model})

    async def start(self) -> None:
        """Start the flush/evaluate task."""
        if self._task is not None:
            raise RuntimeError("drift monitor already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="drift-monitor")

    async def stop(self) -> None:
        """Stop the task, then flush once more. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task
        await self.flush()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_evaluation = loop.time()
        fold_wait_s = min(FOLD_WAIT_S, self._settings.flush_interval_s / 2)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.flush_interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.flush(fold_wait_s)
                if loop.time() >= next_evaluation:
                    next_evaluation = loop.time() + self._settings.evaluate_interval_s
                    await self.evaluate()
            except Exception:
                logger.exception("drift monitor round crashed; retrying next interval")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
