"""Reasons on the request path: one explanation batcher per loaded version.

A version with a checked explainer gets a :class:`VersionReasons`: its own
:class:`~server.batcher.MicroBatcher` of *explanation* jobs, separate from the
scoring batcher. A request is scored first, like every other; only a request whose
answer needs reasons (per the model's :class:`ReasonPolicy` and the request's flag)
then submits its scored row here. Concurrent such rows are explained together, one
TreeSHAP batch on a worker thread (off the event loop), so answers that need no
reasons never wait for an explanation: they left with their scoring batch.

A job here is a whole call's rows (``[N, F]``: one for a Score, N for a v2 call asking
for reasons), so a call is admitted to the queue, or refused, whole: never some rows
explained and the rest refused part-way.

One exception, for a lone caller: when the caller says the loop is otherwise idle
(the version's scoring batcher sees a lone caller), the reasons batcher is idle too,
and one row's measured cost is within ``inline_max_s``, a one-row explanation runs
at once on the loop. There is nobody for it to delay, and it saves the thread hop and
the batcher's wake-up (~0.25 ms of a ~0.6 ms answer; bench/RESULTS.md). Until a cost
has been measured (the first explanation of a version), it goes batched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from feature_streams.definitions import FeatureDefinitions
from server.batcher import BatchPolicy, MicroBatcher
from server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelLoadError,
    ScoringError,
)
from server.explain.explainer import ExplainerError, TreeExplainer, load_explainer
from server.explain.reasons import DEFAULT_TOP_N, Reason, ReasonCatalogue, ReasonSpec
from server.manifest import ModelManifest

logger = logging.getLogger(__name__)

ReasonsWhen = Literal["always", "on_request", "above_threshold"]
EXPLAIN_BATCH: Final = 64
_ROW_TIME_WEIGHT: Final = 0.2
"""Weight of the newest explanation in the moving average of a row's cost."""


@dataclass(frozen=True, slots=True)
class ReasonPolicy:
    """When a model's answers carry reasons, and how many."""

    when: ReasonsWhen = "on_request"
    top_n: int = DEFAULT_TOP_N
    #: Explanation jobs (calls) waiting per version; past it a call is refused whole.
    max_queue_size: int = 1024
    inline_max_s: float = 0.002
    """A lone caller's row is explained on the loop while a row costs at most this
    (0: always batched off the loop)."""

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError("reasons.top_n must be >= 1")
        if self.max_queue_size < 1:
            raise ValueError("reasons.max_queue_size must be >= 1")
        if not self.inline_max_s >= 0:
            raise ValueError("reasons.inline_max_ms must be >= 0")

    def needed(self, asked: bool, decision: bool) -> bool:
        """Whether one answer needs reasons: asked for (any mode), always, or a
        flagged decision (``above_threshold``)."""
        return asked or self.when == "always" or (self.when == "above_threshold" and decision)


DEFAULT_REASONS: Final = ReasonPolicy()


@dataclass(frozen=True, slots=True)
class Explained:
    """One row's reasons and the base value its contributions add to."""

    reasons: tuple[Reason, ...]
    base_value: float


def explain_batching(scoring: BatchPolicy, max_queue_size: int) -> BatchPolicy:
    """The explanation batcher's limits beside a version's scoring ``BatchPolicy``.

    Batches gather up to ``EXPLAIN_BATCH`` rows, or more when the scoring batcher takes
    more, so any call the scoring batcher admits fits as one job. ``max_queue_size``
    bounds waiting calls; rows waiting are bounded like the scoring queue's (a v2 call of
    N rows counts N), so one call per slot cannot hide an unbounded backlog of work.
    """
    batch = max(EXPLAIN_BATCH, scoring.max_batch_size)
    rows = scoring.max_queue_rows
    return BatchPolicy(
        max_batch_size=batch,
        max_queue_size=max_queue_size,
        max_queue_rows=None if rows is None else max(rows, batch),
    )


def catalogue_for(
    manifest: ModelManifest, definitions: FeatureDefinitions | None
) -> ReasonCatalogue:
    """The version's catalogue from ``features.yaml``'s ``reasons`` (restricted to the
    model's features), or one reason per feature (code = feature name) when the file
    has none. Raises ``ValueError`` when the catalogue leaves a model feature out."""
    features = manifest.features
    if definitions is None or not definitions.reasons:
        logger.warning(
            "no reason catalogue: one reason per feature",
            extra={"model": manifest.name, "version": manifest.version},
        )
        specs = [ReasonSpec(code=f, text=f, features=(f,)) for f in features]
        return ReasonCatalogue.build(specs, features)
    wanted = set(features)
    specs = []
    for reason in definitions.reasons.values():
        mine = tuple(f for f in reason.features if f in wanted)
        if mine:
            specs.append(ReasonSpec(code=reason.code, text=reason.text, features=mine))
    return ReasonCatalogue.build(specs, features)


class VersionReasons:
    """A version's explainer, catalogue and explanation batcher."""

    def __init__(
        self,
        explainer: TreeExplainer,
        catalogue: ReasonCatalogue,
        policy: ReasonPolicy,
        batching: BatchPolicy | None = None,
    ) -> None:
        self.explainer = explainer
        self.catalogue = catalogue
        self.policy = policy
        #: Moving average of one row's explanation CPU time (s); infinite until measured.
        self.row_seconds = math.inf
        self._batcher: MicroBatcher[npt.NDArray[np.float32], tuple[Explained, ...]] = MicroBatcher(
            f"{explainer.name}/{explainer.version}:reasons",
            self._run,
            batching or explain_batching(BatchPolicy(), policy.max_queue_size),
        )

    def start(self) -> None:
        """Start the explanation batcher."""
        self._batcher.start()

    async def close(self) -> None:
        """Finish queued explanations, then stop."""
        await self._batcher.close()

    async def explain(
        self,
        rows: npt.NDArray[np.float32],
        deadline: float | None,
        *,
        loop_idle: bool = False,
    ) -> tuple[Explained, ...]:
        """Reasons of each scored row of ``rows`` (``[N, F]``, exactly what the model
        saw), in row order: one job, admitted or refused (``QueueFull``) whole.

        ``loop_idle``: the caller knows no other answer is waiting on the loop (its
        scoring batcher sees a lone caller); a single row may then be explained at once,
        on the loop (see the module docstring)."""
        if loop_idle and self._inline(rows):
            return (self._explain_inline(rows, deadline),)
        return await self._batcher.submit(rows, rows=int(rows.shape[0]), deadline=deadline)

    def _inline(self, rows: npt.NDArray[np.float32]) -> bool:
        return (
            rows.shape[0] == 1
            and self.row_seconds <= self.policy.inline_max_s
            and self._batcher.lone
            and not self._batcher.closing
        )

    def _explain_inline(self, row: npt.NDArray[np.float32], deadline: float | None) -> Explained:
        name = self._batcher.name
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise DeadlineExceeded(f"model {name}: deadline passed before explaining")
        try:
            return self.explain_now(row)[0]
        except ScoringError:
            raise
        except Exception as error:
            logger.exception("explanation failed", extra={"model": name, "rows": 1})
            raise InferenceFailed(f"model {name}: explanation failed: {error}") from error

    def enqueue(
        self, rows: npt.NDArray[np.float32], deadline: float | None
    ) -> asyncio.Future[tuple[Explained, ...]]:
        """Queue ``rows`` like ``explain`` (the same checks, raised at once) and return
        the future of their reasons; cancelling it drops the job if it has not run."""
        return self._batcher.enqueue(rows, rows=int(rows.shape[0]), deadline=deadline)

    async def _run(
        self, jobs: list[npt.NDArray[np.float32]]
    ) -> list[tuple[Explained, ...] | ScoringError]:
        matrix = jobs[0] if len(jobs) == 1 else np.concatenate(jobs, axis=0)
        explained = await asyncio.to_thread(self.explain_now, matrix)
        if len(explained) != matrix.shape[0]:
            raise InferenceFailed(
                f"{self._batcher.name}: {len(explained)} explanations for {matrix.shape[0]} rows"
            )
        parts: list[tuple[Explained, ...] | ScoringError] = []
        offset = 0
        for job in jobs:
            size = int(job.shape[0])
            parts.append(tuple(explained[offset : offset + size]))
            offset += size
        return parts

    def explain_now(self, x: npt.NDArray[np.float32]) -> list[Explained]:
        """Reasons of every row of ``x`` (CPU-bound: off the event loop, but for a lone
        caller's row). Updates the measured cost per row."""
        started = time.thread_time()  # CPU, not wall: a worker's waits for the GIL excluded
        explanation = self.explainer.explain(x)
        top = self.catalogue.top(explanation.values, x, self.policy.top_n)
        explained = [Explained(tuple(reasons), explanation.base_value) for reasons in top]
        self._note_row_time((time.thread_time() - started) / max(1, x.shape[0]))
        return explained

    def _note_row_time(self, seconds: float) -> None:
        previous = self.row_seconds
        if math.isinf(previous):
            self.row_seconds = seconds
        else:
            self.row_seconds = previous + _ROW_TIME_WEIGHT * (seconds - previous)


def load_reasons(
    version_dir: Path,
    manifest: ModelManifest,
    definitions: FeatureDefinitions | None,
    policy: ReasonPolicy,
    scoring: BatchPolicy | None = None,
) -> VersionReasons | None:
    """The version's checked reasons, or None without an explainer; a bad explainer or
    catalogue raises :class:`ModelLoadError` naming the version (it is refused).
    ``scoring``: the version's scoring limits (see :func:`explain_batching`)."""
    try:
        explainer = load_explainer(version_dir, manifest)
    except ExplainerError as error:
        raise ModelLoadError(str(error)) from error
    except OSError as error:
        raise ModelLoadError(f"{manifest.name}/{manifest.version}: explainer: {error}") from error
    if explainer is None:
        return None
    try:
        catalogue = catalogue_for(manifest, definitions)
    except ValueError as error:
        raise ModelLoadError(
            f"{manifest.name}/{manifest.version}: reason catalogue: {error}"
        ) from error
    batching = explain_batching(scoring or BatchPolicy(), policy.max_queue_size)
    return VersionReasons(explainer, catalogue, policy, batching)


def reason_codes(reasons: Sequence[Reason]) -> list[str]:
    """The codes of ``reasons``, in order (logs and tests)."""
    return [r.code for r in reasons]
