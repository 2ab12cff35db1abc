"""The scoring pipeline, shared by both gRPC APIs and free of protobuf.

One direction: router -> feature assembly -> micro-batcher -> runtime -> result.
Servicers decode protobuf into the inputs here and encode the results back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from server.errors import InvalidInput, NoExplainer, ScoringError
from server.executor import Job, JobResult
from server.features import MAX_NAME_LENGTH, OVERRIDE_PERMISSION, Prepared
from server.lineage import Lineage
from server.registry import LoadedVersion, ModelRegistry
from server.rollout.stats import StatsRecorder
from server.router import Decision, Route
from server.scoring_types import RowFeatures, ScoreInput, ScoreResult

if TYPE_CHECKING:
    from server.explain.service import Explained, VersionReasons
    from server.records.shadow import ShadowRunner
    from server.records.traffic_log import TrafficLog


@dataclass(slots=True)  # not frozen: its __init__ would set each field through object
class _Call:
    """One Score request between routing and its answer."""

    request: ScoreInput
    decision: Decision
    loaded: LoadedVersion
    prepared: Prepared
    t_ms: int
    started: float
    score: float | None = None
    """The answer's score once read from the outputs (reasons check, then the answer)."""


@dataclass(slots=True)  # not frozen: built per v2 call
class InferResult:
    """Raw outputs of a v2 inference on caller-supplied rows."""

    loaded: LoadedVersion
    outputs: Mapping[str, npt.NDArray[Any]]
    explained: tuple[Explained, ...] | None = None
    """Each row's reasons when the call asked for them."""


class ScoringPipeline:
    """Routes, assembles features, batches and runs; one instance per process."""

    def __init__(
        self,
        registry: ModelRegistry,
        clock: Callable[[], float] = time.time,
        event_time_skew_s: float = 300.0,
        max_name_length: int = MAX_NAME_LENGTH,
    ) -> None:
        self._registry = registry
        self._clock = clock
        #: ``server.limits.max_name_length``: an unknown feature name over it is named so.
        self.max_name_length = max_name_length
        #: How far a caller's ``event_time`` may lie from the clock without the permission.
        self.event_time_skew_ms = event_time_skew_s * 1000
        #: Rollout statistics (per answered request), when guarded rollouts are on.
        self.stats: StatsRecorder | None = None
        #: Shadow scoring and the traffic log (set by the app); both only queue work.
        self.shadows: ShadowRunner | None = None
        self.traffic: TrafficLog | None = None
        #: Stream items waiting for their reasons (strong references until done).
        self._explaining: set[asyncio.Task[None]] = set()
        #: The serving loop, bound at first use (``asyncio.get_running_loop`` makes a
        #: getpid() system call each time it is asked).
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def score(self, request: ScoreInput, deadline: float | None) -> ScoreResult:
        """Score one transaction; ``deadline`` is an absolute ``loop.time()``."""
        decision = self._route(request)
        started = time.perf_counter()
        try:
            call = self._begin(request, decision, started)
            outcome = call.loaded.batcher.submit_now(Job(prepared=call.prepared), deadline=deadline)
            # the idle fast path answered at once: no coroutine, no loop turn
            result = await outcome if isinstance(outcome, asyncio.Future) else outcome
            explained = None
            reasons = self._reasons_needed(call, result)
            if reasons is not None:
                # a separate batcher: answers not needing reasons already left with their
                # batch; a lone caller's row is explained at once (nobody else waits)
                (explained,) = await reasons.explain(
                    result.rows, deadline, loop_idle=call.loaded.batcher.lone
                )
            return self._finish(call, result, explained)
        except ScoringError:
            self._record(request, decision, started, None)
            raise

    def score_later(
        self,
        request: ScoreInput,
        deadline: float | None,
        done: Callable[[ScoreResult | Exception], None],
    ) -> asyncio.Future[JobResult] | None:
        """Score one transaction without a task of its own: always batched, and
        ``done`` gets the answer or the error (at once when it fails before queueing).
        Returns the queued job's future (cancel it to drop the job), or ``None`` when
        ``done`` was already called."""
        try:
            decision = self._route(request)
        except ScoringError as error:
            done(error)
            return None
        started = time.perf_counter()
        try:
            call = self._begin(request, decision, started)
            future = call.loaded.batcher.enqueue(Job(prepared=call.prepared), deadline=deadline)
        except ScoringError as error:
            self._record(request, decision, started, None)
            done(error)
            return None

        def settle(finished: asyncio.Future[JobResult]) -> None:
            if finished.cancelled():
                return  # the stream went away
            try:
                result = finished.result()
                reasons = self._reasons_needed(call, result)
                if reasons is not None:
                    explaining = asyncio.get_running_loop().create_task(
                        self._finish_explained(call, result, reasons, deadline, done)
                    )
                    self._explaining.add(explaining)
                    explaining.add_done_callback(self._explaining.discard)
                    return
                answer = self._finish(call, result)
            except Exception as failure:  # the item's error, answered on its stream
                self._record(request, decision, started, None)
                done(failure)
                return
            done(answer)

        future.add_done_callback(settle)
        return future

    def _route(self, request: ScoreInput) -> Decision:
        if not request.model:
            raise InvalidInput("model", "required")
        return self._registry.routing.choose(
            request.model, request.model_version, request.entity_ids
        )

    def _record(
        self, request: ScoreInput, decision: Decision, started: float, answer: ScoreResult | None
    ) -> None:
        """Rollout statistics of one answered (or failed: ``answer`` None) request."""
        if self.stats is None:
            return
        latency_s = time.perf_counter() - started
        if answer is None:
            self.stats.record(
                request.model, decision.version, decision.route, ok=False, latency_s=latency_s
            )
        else:
            self.stats.record(
                request.model,
                decision.version,
                decision.route,
                ok=True,
                latency_s=latency_s,
                score=answer.score,
            )

    def _begin(self, request: ScoreInput, decision: Decision, started: float) -> _Call:
        loaded = self._registry.get(request.model, decision.version)
        t_ms = request.event_time_ms
        if t_ms is None:
            t_ms = int(self._clock() * 1000)
        elif not request.overrides_allowed:
            skew_ms = abs(t_ms - self._clock() * 1000)
            if skew_ms > self.event_time_skew_ms:
                raise InvalidInput(
                    "event_time",
                    f"{skew_ms / 1000:.0f} s from the server clock, beyond the bound of "
                    f"{self.event_time_skew_ms / 1000:g} s (server.limits.event_time_skew_s); "
                    f"recorded times need permission {OVERRIDE_PERMISSION}",
                )
        if request.explain and loaded.reasons is None:
            raise NoExplainer(request.model, decision.version)
        prepared = loaded.layout.prepare(
            request.features,
            request.entity_ids,
            t_ms,
            request.overrides_allowed,
            self.max_name_length,
        )
        return _Call(request, decision, loaded, prepared, t_ms, started)

    @staticmethod
    def _score_of(call: _Call, result: JobResult) -> float:
        score = call.score
        if score is None:  # read once per call: item() gives the Python float in one step
            manifest = call.loaded.model.manifest
            values = result.outputs[manifest.score_output]
            score = call.score = float(
                values.item(0, manifest.score_index) if values.ndim == 2 else values.item(0)
            )
        return score

    def _reasons_needed(self, call: _Call, result: JobResult) -> VersionReasons | None:
        """The version's explainer when this answer needs reasons, else None."""
        loaded = call.loaded
        if loaded.reasons is None:
            return None
        flagged = self._score_of(call, result) >= loaded.model.manifest.threshold
        return (
            loaded.reasons if loaded.reason_policy.needed(call.request.explain, flagged) else None
        )

    async def _finish_explained(
        self,
        call: _Call,
        result: JobResult,
        reasons: VersionReasons,
        deadline: float | None,
        done: Callable[[ScoreResult | Exception], None],
    ) -> None:
        """A stream item that needs reasons: explained in the reasons batcher (at once for
        a lone caller), then answered."""
        try:
            (explained,) = await reasons.explain(
                result.rows, deadline, loop_idle=call.loaded.batcher.lone
            )
            answer = self._finish(call, result, explained)
        except Exception as failure:
            self._record(call.request, call.decision, call.started, None)
            done(failure)
            return
        done(answer)

    def _finish(
        self, call: _Call, result: JobResult, explained: Explained | None = None
    ) -> ScoreResult:
        """The answer of a scored call; shadows, traffic log and stats after it."""
        request, decision, loaded, prepared = (
            call.request,
            call.decision,
            call.loaded,
            call.prepared,
        )
        manifest = loaded.model.manifest
        score = self._score_of(call, result)
        flagged = score >= manifest.threshold
        echoed: tuple[tuple[str, float], ...] = ()
        if request.echo_features:
            row = result.rows[0]
            echoed = tuple(zip(loaded.layout.names, (float(v) for v in row), strict=True))
        answer = ScoreResult(
            request_id=request.request_id,
            score=score,
            model=request.model,
            version=decision.version,
            route=decision.route,
            defaulted_features=tuple(prepared.defaulted) if prepared.defaulted else (),
            features=echoed,
            freshness=tuple(prepared.freshness) if prepared.freshness else (),
            degraded_reasons=tuple(prepared.degraded) if prepared.degraded else (),
            artifact_sha256=manifest.sha256,
            threshold=manifest.threshold,
            decision=flagged,
            reasons=None if explained is None else explained.reasons,
            reasons_base_value=0.0 if explained is None else explained.base_value,
        )
        if decision.shadows or self.traffic is not None:
            timings = {"pipeline_us": int((time.perf_counter() - call.started) * 1e6)}
            # queued for the next loop turn: the answer leaves first (both only queue work)
            self._running_loop().call_soon(
                self._after_answer,
                loaded,
                decision,
                answer,
                result.rows,
                call.t_ms,
                timings,
                request,
                prepared,
            )
        self._record(request, decision, call.started, answer)
        return answer

    def _after_answer(
        self,
        loaded: LoadedVersion,
        decision: Decision,
        answer: ScoreResult,
        row: npt.NDArray[np.float32],
        t_ms: int,
        timings: Mapping[str, int],
        request: ScoreInput | None,
        prepared: Prepared | None = None,
    ) -> None:
        """Shadows and the decision record of one answered row ([1, F]); both only queue
        work (never block, never raise). ``request`` is ``None`` when the traffic log
        is known not to sample it; ``prepared`` is the assembled row (None: all sent)."""
        if decision.shadows and self.shadows is not None:
            self.shadows.submit(
                request_id=answer.request_id,
                model=answer.model,
                live=loaded,
                live_score=answer.score,
                route=decision.route.value,
                row=row,
                shadows=decision.shadows,
            )
        if self.traffic is not None and request is not None:
            self.traffic.offer(
                request,
                answer,
                names=loaded.layout.names,
                row=row,
                t_ms=t_ms,
                threshold=loaded.model.manifest.threshold,
                timings=timings,
                fetched=prepared,
                plan=loaded.layout.fetch,
                lineage=functools.partial(Lineage.of, loaded.model.manifest),
            )

    def choose(self, model: str, version: str | None) -> tuple[LoadedVersion, Decision]:
        """The version a v2 call addresses (pinned, or routed as an unpinned request
        without entity ids: the champion) and the routing decision behind it."""
        if not model:
            raise InvalidInput("model_name", "required")
        decision = self._registry.routing.choose(model, version or None)
        return self._registry.get(model, decision.version), decision

    async def infer(
        self,
        loaded: LoadedVersion,
        rows: npt.NDArray[np.float32],
        deadline: float | None,
        *,
        decision: Decision | None = None,
        request_id: str = "",
        explain: bool = False,
    ) -> InferResult:
        """Run caller-supplied rows ([N, F]) through ``loaded``'s batcher; with the
        ``decision`` that chose it, each row is shadowed and offered to the traffic log
        like one Score call (ids ``<request_id>#<row>``). ``explain``: every row's
        reasons too, recorded with it: the rows are one job of the version's reasons
        batcher, queued together with the scoring job before either runs, so the call
        is refused whole (nothing scored) when either queue cannot take it."""
        started = time.perf_counter()
        reasons = loaded.reasons
        n = int(rows.shape[0])
        explained: tuple[Explained, ...] | None = None
        if not explain:
            outcome = loaded.batcher.submit_now(Job(rows=rows), rows=n, deadline=deadline)
            result = await outcome if isinstance(outcome, asyncio.Future) else outcome
        elif reasons is None:
            raise NoExplainer(loaded.name, loaded.version)
        else:
            result, explained = await self._score_explained(loaded, reasons, rows, deadline)
        if decision is not None and (
            (decision.shadows and self.shadows is not None) or self.traffic is not None
        ):
            # after the answer left (next loop turn): records are not on the answer path
            self._running_loop().call_soon(
                self._record_rows,
                loaded,
                decision,
                rows,
                result.outputs,
                request_id,
                int((time.perf_counter() - started) * 1e6),
                explained,
            )
        return InferResult(loaded, result.outputs, explained)

    @staticmethod
    async def _score_explained(
        loaded: LoadedVersion,
        reasons: VersionReasons,
        rows: npt.NDArray[np.float32],
        deadline: float | None,
    ) -> tuple[JobResult, tuple[Explained, ...]]:
        """Score ``rows`` and explain them, both admitted before either runs (no await
        between): a refusal of either job drops the other unrun. The explanation needs
        only the rows, so it runs beside the scoring batch rather than after it."""
        n = int(rows.shape[0])
        scoring = loaded.batcher.enqueue(Job(rows=rows), rows=n, deadline=deadline)
        try:
            explaining = reasons.enqueue(rows, deadline)
        except BaseException:
            scoring.cancel()  # not taken yet: the flush task has not run since
            raise
        try:
            result = await scoring
            explained = await explaining
        finally:
            explaining.cancel()  # a failed or cancelled call: drop what has not run
            scoring.cancel()
        return result, explained

    def _record_rows(
        self,
        loaded: LoadedVersion,
        decision: Decision,
        rows: npt.NDArray[np.float32],
        outputs: Mapping[str, npt.NDArray[Any]],
        request_id: str,
        pipeline_us: int,
        explained: tuple[Explained, ...] | None = None,
    ) -> None:
        """Shadows and traffic-log records of a v2 call's rows (only queues work).

        Rows the call had explained (``explained``) are recorded with their reasons.
        Otherwise a recorded row whose decision needs reasons under its model's
        ``reasons.when`` (``always``, or ``above_threshold`` and flagged) is recorded
        with them once explained, after the answer left."""
        manifest = loaded.model.manifest
        scores = outputs[manifest.score_output]
        column = scores[:, manifest.score_index] if scores.ndim == 2 else scores
        call_id = request_id or uuid.uuid4().hex  # the traffic log samples by id
        names = loaded.layout.names
        t_ms = int(self._clock() * 1000)
        pinned = decision.version if decision.route is Route.PINNED else None
        timings = {"pipeline_us": pipeline_us}
        explain: list[tuple[ScoreResult, npt.NDArray[np.float32], ScoreInput]] = []
        for i, score in enumerate(column.tolist()):
            item_id = f"{call_id}#{i}"
            row = rows[i : i + 1]
            request: ScoreInput | None = None
            if self.traffic is not None and self.traffic.sampled(item_id):
                request = ScoreInput(  # as a Score call sending every feature
                    model=loaded.name,
                    request_id=item_id,
                    features=RowFeatures(names, row[0]),  # a dict once recorded, not now
                    model_version=pinned,
                    event_time_ms=t_ms,
                )
            flagged = score >= manifest.threshold
            answer = ScoreResult(
                item_id,
                score,
                loaded.name,
                decision.version,
                decision.route,
                artifact_sha256=manifest.sha256,
                threshold=manifest.threshold,
                decision=flagged,
            )
            if explained is not None:
                answer = answer._replace(
                    reasons=explained[i].reasons, reasons_base_value=explained[i].base_value
                )
            elif (
                request is not None
                and loaded.reasons is not None
                and loaded.reason_policy.needed(False, flagged)
            ):
                explain.append((answer, row, request))
                request = None  # recorded once explained
            self._after_answer(loaded, decision, answer, row, t_ms, timings, request)
        if explain:
            task = asyncio.get_running_loop().create_task(
                self._record_explained(loaded, decision, explain, t_ms, timings)
            )
            self._explaining.add(task)
            task.add_done_callback(self._explaining.discard)

    async def _record_explained(
        self,
        loaded: LoadedVersion,
        decision: Decision,
        rows: list[tuple[ScoreResult, npt.NDArray[np.float32], ScoreInput]],
        t_ms: int,
        timings: Mapping[str, int],
    ) -> None:
        """Records of v2 rows with their reasons (explained in the version's reasons
        batcher); a row that could not be explained is recorded without, flagged
        ``explain_failed`` in its degraded reasons."""
        reasons = loaded.reasons
        assert reasons is not None
        explained: tuple[Explained, ...] | None = None
        # one job: the rows are explained, or refused together (then recorded flagged)
        with contextlib.suppress(ScoringError):
            explained = await reasons.explain(np.concatenate([r for _, r, _ in rows]), None)
        recorded = Decision(decision.version, decision.route)  # shadows already ran
        for i, (answer, row, request) in enumerate(rows):
            if explained is None:
                answer = answer._replace(degraded_reasons=("explain_failed",))
            else:
                answer = answer._replace(
                    reasons=explained[i].reasons, reasons_base_value=explained[i].base_value
                )
            self._after_answer(loaded, recorded, answer, row, t_ms, timings, request)

    async def settle(self) -> None:
        """Wait for answers and records still waiting on their explanations (drain)."""
        while self._explaining:
            await asyncio.gather(*self._explaining, return_exceptions=True)
