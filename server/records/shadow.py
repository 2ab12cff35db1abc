"""Shadow scoring: other versions score the live answer's exact input row, after the answer.

The pipeline calls ``ShadowRunner.submit`` once the live score is known, with the
assembled ``[1, F]`` row the live model saw. ``submit`` is synchronous, cheap and
never raises: per shadow version it appends the row to that version's own bounded
shadow queue (not the live batcher) or sheds it, counted. No feature is fetched
again, and nothing is awaited on the answer path.

Lower priority (asyncio has no task priorities; this is what is done instead):

* shadow work runs in one task per shadow version, never in the request's task, so
  the answer is encoded and handed to gRPC before any shadow work starts;
* a shadow batch waits up to ``linger_s`` to fill (fewer, larger model runs),
  then yields ``yield_turns`` loop turns, so live work that is ready (new calls,
  live batches) runs first;
* while the live batchers have a backlog (``is_busy()``), shadow batches wait on a
  timer (no spinning) and new shadow requests are shed (``busy``);
* each shadow queue is bounded (``max_queue_size``); past it requests are shed
  (``queue_full``). Shedding is counted in ``streamscore_shadow_shed_total``.

A shadow batch runs the version's model directly (``OnnxModel.run``: inline or on
its worker thread, as configured), several rows per run.

Per (model, live version, shadow version): score difference (shadow - live)
histogram, compared and agreed counters (same decision, each version at its own
manifest threshold, ``score >= threshold``); per (model, shadow version): latency
from submit to shadow score, errors and shed by reason. Each comparison (and each
shadow error) is also written as one JSON record (``SHADOW_SCHEMA``) to the sink,
live and shadow side by side, so reading it needs no join. Records are JSON lines:
the comparisons finished in one event-loop turn travel in one Kafka message, since
a message costs the serving process far more than a line (split a message on
newlines to read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.manifest import ModelManifest
from server.records.kafka_sink import RecordSink

__all__ = [
    "ERROR_REASONS",
    "SHADOW_SCHEMA",
    "SHED_REASONS",
    "ScoringVersion",
    "ShadowMetrics",
    "ShadowOptions",
    "ShadowRunner",
    "live_backlog",
    "scores_of",
]

logger = logging.getLogger(__name__)

SHADOW_SCHEMA = "streamscore.shadow/1"
SHED_REASONS = ("busy", "queue_full", "closed")
ERROR_REASONS = ("not_loaded", "feature_mismatch", "inference", "non_finite", "internal")

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
_DIFF_BUCKETS = (
    -1.0, -0.5, -0.25, -0.1, -0.05, -0.02, -0.01, -0.001, 0.0,
    0.001, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
_ERROR_LOG_INTERVAL_S = 60.0
#: Shadow results handled between two yields to the event loop.
_SLICE = 16


class ShadowModel(Protocol):
    """The part of ``server.runtime.OnnxModel`` shadow scoring uses."""

    @property
    def manifest(self) -> ModelManifest: ...

    async def run(self, rows: npt.NDArray[np.float32]) -> Mapping[str, npt.NDArray[Any]]: ...


class ShadowLayout(Protocol):
    """The part of ``server.features.FeatureLayout`` shadow scoring uses."""

    @property
    def names(self) -> tuple[str, ...]: ...


class ScoringVersion(Protocol):
    """A loaded version as shadow scoring sees it (``server.registry.LoadedVersion``)."""

    @property
    def model(self) -> ShadowModel: ...

    @property
    def layout(self) -> ShadowLayout: ...


class _Depth(Protocol):
    @property
    def depth(self) -> int: ...


class _Batched(Protocol):
    @property
    def batcher(self) -> _Depth: ...


def live_backlog(
    versions: Callable[[], Iterable[_Batched]], max_waiting: int
) -> Callable[[], bool]:
    """An ``is_busy`` for ``ShadowRunner``: live batchers hold ``max_waiting``+ waiting requests.

    ``versions`` is e.g. ``registry.all_versions`` (the live batchers; shadow queues are
    not in it).
    """

    def busy() -> bool:
        return sum(v.batcher.depth for v in versions()) >= max_waiting

    return busy


def scores_of(
    manifest: ModelManifest, outputs: Mapping[str, npt.NDArray[Any]]
) -> npt.NDArray[np.float64]:
    """The score of every row of ``outputs``, as the pipeline reads it (score_output/index)."""
    values = np.asarray(outputs[manifest.score_output])
    column = values[:, manifest.score_index] if values.ndim == 2 else values.reshape(-1)
    return column.astype(np.float64, copy=False)


@dataclass(frozen=True, slots=True)
class ShadowOptions:
    """Limits of the shadow queues (one per shadow version)."""

    max_batch_size: int = 64
    max_queue_size: int = 256
    #: How long a shadow batch waits to fill (up to ``max_batch_size``) before it runs:
    #: fewer, larger model runs per shadow request; shadows are not latency-bound.
    linger_s: float = 0.01
    #: Loop turns a shadow batch yields to live work before it runs.
    yield_turns: int = 2
    #: While the live path is busy, how long a shadow batch sleeps before looking again.
    busy_backoff_s: float = 0.001
    #: Kafka topic of comparison records; ``None`` = metrics only.
    records_topic: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if self.yield_turns < 0 or self.busy_backoff_s <= 0 or self.linger_s < 0:
            raise ValueError("yield_turns and linger_s must be >= 0, busy_backoff_s > 0")


class ShadowMetrics:
    """Prometheus families of shadow scoring (create once per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        comparison = ["model", "live_version", "version"]
        self.compared = Counter(
            "streamscore_shadow_compared",
            "Shadow scores compared with the live answer.",
            comparison,
            registry=registry,
        )
        self.agreed = Counter(
            "streamscore_shadow_agreed",
            "Shadow decisions equal to the live decision (each at its own threshold).",
            comparison,
            registry=registry,
        )
        self.score_diff = Histogram(
            "streamscore_shadow_score_diff",
            "Shadow score minus live score, per request.",
            comparison,
            buckets=_DIFF_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "streamscore_shadow_latency_seconds",
            "From the live answer to the shadow score (shadow queue + inference).",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "streamscore_shadow_errors",
            "Shadow requests that failed, by reason "
            "(not_loaded, feature_mismatch, inference, non_finite, internal).",
            ["model", "version", "reason"],
            registry=registry,
        )
        self.shed = Counter(
            "streamscore_shadow_shed",
            "Shadow requests dropped to protect live traffic, by reason "
            "(busy, queue_full, closed).",
            ["model", "version", "reason"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "streamscore_shadow_queue_depth",
            "Shadow requests waiting, per shadow version.",
            ["model", "version"],
            registry=registry,
        )


class _Item(NamedTuple):
    request_id: str
    row: npt.NDArray[np.float32]
    live_version: str
    live_score: float
    live_threshold: float
    route: str
    submitted: float


class _Comparison(NamedTuple):
    compared: Counter
    agreed: Counter
    diff: Histogram


class _Lane:
    """The shadow queue and worker of one (model, shadow version)."""

    def __init__(self, model: str, target: ScoringVersion, metrics: ShadowMetrics) -> None:
        manifest = target.model.manifest
        self.model = model
        self.target = target
        self.manifest = manifest
        self.version = manifest.version
        self.threshold = manifest.threshold
        self.queue: deque[_Item] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        self.task: asyncio.Task[None] | None = None
        self.last_error_log = -math.inf
        self._metrics = metrics
        self.latency = metrics.latency.labels(model, self.version)
        self.depth = metrics.queue_depth.labels(model, self.version)
        self._shed = {r: metrics.shed.labels(model, self.version, r) for r in SHED_REASONS}
        self._errors = {r: metrics.errors.labels(model, self.version, r) for r in ERROR_REASONS}
        self._comparisons: dict[str, _Comparison] = {}

    def shed(self, reason: str, count: int = 1) -> None:
        self._shed[reason].inc(count)

    def error(self, reason: str, count: int = 1) -> None:
        self._errors[reason].inc(count)

    def comparison(self, live_version: str) -> _Comparison:
        children = self._comparisons.get(live_version)
        if children is None:
            labels = (self.model, live_version, self.version)
            children = self._comparisons[live_version] = _Comparison(
                self._metrics.compared.labels(*labels),
                self._metrics.agreed.labels(*labels),
                self._metrics.score_diff.labels(*labels),
            )
        return children


class _RowMap(NamedTuple):
    live: ShadowLayout
    shadow: ShadowLayout
    #: Columns of the live row, in the shadow's order; ``None`` = same layout.
    columns: npt.NDArray[np.intp] | None
    missing: tuple[str, ...]


class ShadowRunner:
    """Scores live rows with shadow versions, in the background; one per process."""

    def __init__(
        self,
        lookup: Callable[[str, str], ScoringVersion],
        metrics: ShadowMetrics,
        *,
        sink: RecordSink | None = None,
        options: ShadowOptions = ShadowOptions(),
        is_busy: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``lookup(model, version)`` returns the loaded version (e.g. ``registry.get``)."""
        self._lookup = lookup
        self._metrics = metrics
        self._sink = sink if options.records_topic else None
        self._topic = options.records_topic or ""
        self.options = options
        self._is_busy = is_busy
        self._clock = clock
        self._lanes: dict[tuple[str, str], _Lane] = {}
        #: Lanes of replaced versions still draining, by task (removed when it ends).
        self._retired: dict[asyncio.Task[None], _Lane] = {}
        self._pending_records: list[Callable[[], bytes]] = []
        self._records_scheduled = False
        self._maps: dict[tuple[int, int], _RowMap] = {}
        self._closed = False

    def submit(
        self,
        *,
        request_id: str,
        model: str,
        live: ScoringVersion,
        live_score: float,
        route: str,
        row: npt.NDArray[np.float32],
        shadows: Sequence[str],
    ) -> None:
        """Queue ``row`` ([1, F], the live version's column order) for each shadow version.

        Never blocks and never raises: what cannot be queued is counted.
        """
        if not shadows:
            return
        try:
            busy = self._busy()
            manifest = live.model.manifest
            for version in shadows:
                self._submit_one(
                    model,
                    version,
                    busy,
                    _Item(
                        request_id,
                        row,
                        manifest.version,
                        live_score,
                        manifest.threshold,
                        route,
                        0.0,
                    ),
                    live.layout,
                )
        except Exception:
            logger.exception("shadow submit failed", extra={"model": model})
            with contextlib.suppress(Exception):
                for version in shadows:
                    self._metrics.errors.labels(model, version, "internal").inc()

    def _submit_one(
        self, model: str, version: str, busy: bool, item: _Item, live_layout: ShadowLayout
    ) -> None:
        if self._closed:
            self._metrics.shed.labels(model, version, "closed").inc()
            return
        try:
            target = self._lookup(model, version)
        except Exception:
            self._metrics.errors.labels(model, version, "not_loaded").inc()
            return
        lane = self._lanes.get((model, version))
        if lane is None or lane.target is not target:
            lane = self._open_lane(model, target, lane)
        if busy:
            lane.shed("busy")
            return
        if len(lane.queue) >= self.options.max_queue_size:
            lane.shed("queue_full")
            return
        mapping = self._row_map(live_layout, target.layout)
        if mapping.missing:
            lane.error("feature_mismatch")
            self._log_error(lane, f"live row lacks shadow features {list(mapping.missing)}")
            return
        row = item.row if mapping.columns is None else item.row[:, mapping.columns]
        lane.queue.append(item._replace(row=row, submitted=time.monotonic()))
        if len(lane.queue) == 1 or len(lane.queue) >= self.options.max_batch_size:
            lane.wakeup.set()

    def _open_lane(self, model: str, target: ScoringVersion, previous: _Lane | None) -> _Lane:
        if previous is not None:  # the version was reloaded: let the old lane drain
            previous.closing = True
            previous.wakeup.set()
            if previous.task is not None:
                self._retired[previous.task] = previous
                previous.task.add_done_callback(self._forget)
            self._maps.clear()
        lane = _Lane(model, target, self._metrics)
        lane.task = asyncio.get_running_loop().create_task(
            self._work(lane), name=f"shadow:{model}/{lane.version}"
        )
        self._lanes[(model, lane.version)] = lane
        return lane

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._retired.pop(task, None)

    def lanes(self) -> list[tuple[str, str]]:
        """``(model, version)`` of every lane, draining ones included (for tests and ops)."""
        draining = [(lane.model, lane.version) for lane in self._retired.values()]
        return sorted({*self._lanes, *draining})

    async def release(self, target: ScoringVersion, timeout_s: float = 2.0) -> None:
        """Drop every lane of ``target``, a version being unloaded or replaced (call before
        its model is closed): its queue is scored within ``timeout_s``, what is left is
        shed as ``closed``, and the runner keeps no reference to the version, its model
        session or its task. Later shadow requests for it count as ``not_loaded``."""
        lanes = [lane for lane in self._lanes.values() if lane.target is target]
        lanes += [lane for lane in self._retired.values() if lane.target is target]
        if not lanes:
            return
        for lane in lanes:
            if self._lanes.get((lane.model, lane.version)) is lane:
                del self._lanes[(lane.model, lane.version)]
            lane.closing = True
            lane.wakeup.set()
        self._maps.clear()  # keyed by layout ids: never reuse an entry of a released layout
        tasks = {lane.task for lane in lanes if lane.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for lane in lanes:
            if lane.queue:
                lane.shed("closed", len(lane.queue))
                lane.queue.clear()
            lane.depth.set(0)
            lane.task = None
        logger.info(
            "shadow lane released",
            extra={"model": lanes[0].model, "version": lanes[0].version},
        )

    def _row_map(self, live: ShadowLayout, shadow: ShadowLayout) -> _RowMap:
        key = (id(live), id(shadow))
        cached = self._maps.get(key)
        if cached is not None and cached.live is live and cached.shadow is shadow:
            return cached
        if live.names == shadow.names:
            mapping = _RowMap(live, shadow, None, ())
        else:
            where = {name: i for i, name in enumerate(live.names)}
            missing = tuple(n for n in shadow.names if n not in where)
            index = None if missing else np.array([where[n] for n in shadow.names], np.intp)
            mapping = _RowMap(live, shadow, index, missing)
        self._maps[key] = mapping
        return mapping

    def _busy(self) -> bool:
        if self._is_busy is None:
            return False
        try:
            return self._is_busy()
        except Exception:
            logger.exception("shadow is_busy failed; treating the server as busy")
            return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking shadow requests; finish what is queued within ``timeout_s``.

        What is still queued after that is shed as ``closed``. Idempotent.
        """
        self._closed = True
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.closing = True
            lane.wakeup.set()
        tasks = {lane.task for lane in lanes if lane.task is not None} | set(self._retired)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for lane in lanes:
            if lane.queue:
                lane.shed("closed", len(lane.queue))
                lane.queue.clear()
            lane.depth.set(0)

    async def _work(self, lane: _Lane) -> None:
        options = self.options
        while True:
            if not lane.queue:
                if lane.closing:
                    return
                lane.wakeup.clear()
                await lane.wakeup.wait()
                continue
            if options.linger_s > 0 and len(lane.queue) < options.max_batch_size:
                lane.wakeup.clear()  # set again when the batch is full
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(options.linger_s):
                        await lane.wakeup.wait()
            for _ in range(options.yield_turns):
                await asyncio.sleep(0)
            while not lane.closing:  # live work has a backlog: let it drain first
                if not self._busy():
                    break
                await asyncio.sleep(options.busy_backoff_s)
            count = min(len(lane.queue), options.max_batch_size)
            batch = [lane.queue.popleft() for _ in range(count)]
            lane.depth.set(len(lane.queue))
            try:
                await self._score(lane, batch)
            except asyncio.CancelledError:
                lane.shed("closed", len(batch))
                raise
            except Exception as error:  # a bug here must not stop the lane
                lane.error("internal", len(batch))
                self._log_error(lane, repr(error))

    async def _score(self, lane: _Lane, batch: list[_Item]) -> None:
        matrix = batch[0].row if len(batch) == 1 else np.concatenate([i.row for i in batch])
        try:
            outputs = await lane.target.model.run(matrix)
            scores = scores_of(lane.manifest, outputs)
            if scores.shape[0] != len(batch):
                raise ValueError(f"{scores.shape[0]} scores for {len(batch)} rows")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            lane.error("inference", len(batch))
            self._log_error(lane, f"inference failed: {error!r}")
            ts = self._clock()
            for item in batch:
                self._emit(lane, item, None, None, ts, "inference")
            return
        done = time.monotonic()
        ts = self._clock()
        for index, (item, score) in enumerate(zip(batch, scores.tolist(), strict=True)):
            if index % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)  # let live work in between
            if not math.isfinite(score):
                lane.error("non_finite")
                self._emit(lane, item, None, None, ts, "non_finite")
                continue
            latency = done - item.submitted
            lane.latency.observe(latency)
            children = lane.comparison(item.live_version)
            children.compared.inc()
            agree = (score >= lane.threshold) == (item.live_score >= item.live_threshold)
            if agree:
                children.agreed.inc()
            children.diff.observe(score - item.live_score)
            self._emit(lane, item, score, latency, ts, None)

    def _emit(
        self,
        lane: _Lane,
        item: _Item,
        score: float | None,
        latency_s: float | None,
        ts: float,
        error: str | None,
    ) -> None:
        if self._sink is None:
            return
        encode = functools.partial(
            _encode_record,
            lane.model,
            lane.version,
            lane.threshold,
            item,
            score,
            latency_s,
            ts,
            error,
        )
        self._pending_records.append(encode)
        if not self._records_scheduled:
            self._records_scheduled = True
            asyncio.get_running_loop().call_soon(self._offer_records)

    def _offer_records(self) -> None:
        """One message for the records of this loop turn (encoded on the sink's task)."""
        self._records_scheduled = False
        parts, self._pending_records = self._pending_records, []
        if parts and self._sink is not None:
            self._sink.offer(self._topic, functools.partial(_encode_lines, parts))

    def _log_error(self, lane: _Lane, message: str) -> None:
        now = time.monotonic()
        if now - lane.last_error_log >= _ERROR_LOG_INTERVAL_S:
            lane.last_error_log = now
            logger.warning(
                "shadow %s/%s: %s (logged at most once a minute; see "
                "streamscore_shadow_errors_total)",
                lane.model,
                lane.version,
                message,
            )


def _encode_lines(parts: list[Callable[[], bytes]]) -> bytes:
    return b"\n".join(part() for part in parts)


def _encode_record(
    model: str,
    version: str,
    threshold: float,
    item: _Item,
    score: float | None,
    latency_s: float | None,
    ts: float,
    error: str | None,
) -> bytes:
    live_decision = item.live_score >= item.live_threshold
    shadow: dict[str, Any] = {"version": version, "threshold": threshold}
    record: dict[str, Any] = {
        "schema": SHADOW_SCHEMA,
        "ts": ts,
        "request_id": item.request_id,
        "model": model,
        "live": {
            "version": item.live_version,
            "route": item.route,
            "score": item.live_score,
            "threshold": item.live_threshold,
            "decision": live_decision,
        },
        "shadow": shadow,
    }
    if score is None:
        shadow["error"] = error
    else:
        decision = score >= threshold
        shadow.update(
            score=score,
            decision=decision,
            latency_us=None if latency_s is None else round(latency_s * 1e6),
        )
        record["score_diff"] = score - item.live_score
        record["agree"] = decision == live_decision
    return json.dumps(record, separators=(",", ":")).encode()
