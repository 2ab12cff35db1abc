"""Runs one micro-batch of one model version: features -> input matrix -> runtime -> split.

A batch may mix Score jobs (a prepared row whose store features are fetched here,
for the whole batch in one Redis round trip) and v2 jobs (caller-supplied rows).
One ``session.run`` serves them all; each job gets its own slice of the outputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from server.batcher import Outputs, check_rows_out, split_rows
from server.errors import DependencyUnavailable, ScoringError
from server.feature_store import FeatureStore
from server.features import FailurePolicy, FeatureLayout, Prepared
from server.runtime import OnnxModel


@dataclass(slots=True)
class Job:
    """One request's share of a batch: ready rows (v2) or a prepared Score row."""

    rows: npt.NDArray[np.float32] | None = None
    prepared: Prepared | None = None

    @property
    def size(self) -> int:
        """Input rows this job adds to the batch."""
        return 1 if self.rows is None else int(self.rows.shape[0])


class JobResult(NamedTuple):
    """A job's outputs and the exact input rows the model saw for it."""

    outputs: Outputs
    rows: npt.NDArray[np.float32]
    prepared: Prepared | None


#: Sees each answered batch: input matrix, outputs, the jobs it served (drift monitoring).
#: Batched: called with ``call_soon`` once the batcher resolved the batch's futures. Idle
#: fast path: called inline before the lone answer returns, so it must only keep
#: references and leave real work (a fold) to a later loop turn.
BatchHook = Callable[[npt.NDArray[np.float32], Mapping[str, npt.NDArray[Any]], list[Job]], None]


class VersionBatchRunner:
    """Runs the batches of one loaded version: the ``run_batch`` of its micro-batcher."""

    def __init__(
        self,
        model: OnnxModel,
        layout: FeatureLayout,
        store: FeatureStore | None,
        failure_policy: FailurePolicy,
        on_batch: BatchHook | None = None,
    ) -> None:
        self._model = model
        self._layout = layout
        self._store = store
        self._policy = failure_policy
        self._on_batch = on_batch

    async def run(self, jobs: list[Job]) -> list[JobResult | ScoringError]:
        """Fill store features for the Score jobs, run the model once, split per job."""
        failed: dict[int, ScoringError] = {}
        prepared = [job.prepared for job in jobs if job.prepared is not None]
        if prepared and self._store is not None and self._layout.uses_store:
            try:
                await self._store.fill(self._layout, prepared, self._policy)
            except DependencyUnavailable as error:  # policy "fail": only Score jobs fail
                failed = {i: error for i, job in enumerate(jobs) if job.prepared is not None}
        live = [job for i, job in enumerate(jobs) if i not in failed]
        parts: list[tuple[npt.NDArray[np.float32], Outputs]] = []
        if live:
            blocks = [_rows_of(job) for job in live]
            matrix = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
            outputs = await self._model.run(matrix)
            sliced = split_rows(outputs, [block.shape[0] for block in blocks])
            parts = list(zip(blocks, sliced, strict=True))
            if self._on_batch is not None:
                # queued now, runs after the batcher resolved every job's future
                asyncio.get_running_loop().call_soon(self._on_batch, matrix, outputs, live)
        return _results(jobs, failed, parts)

    def run_now(self, jobs: list[Job]) -> list[JobResult | ScoringError] | None:
        """``run`` without waiting, when nothing needs to: an inline model and no
        store features to fetch; ``None`` otherwise (the batcher's idle fast path)."""
        if not self._model.inline:
            return None
        needs_store = self._store is not None and self._layout.uses_store
        if needs_store and any(job.prepared is not None for job in jobs):
            return None
        if len(jobs) == 1:  # the lone request: its rows are the batch, nothing to split
            job = jobs[0]
            matrix = _rows_of(job)
            outputs = self._model.run_sync(matrix)
            check_rows_out(outputs, matrix.shape[0])
            if self._on_batch is not None:
                self._on_batch(matrix, outputs, jobs)  # see below
            return [JobResult(outputs, matrix, job.prepared)]
        blocks = [_rows_of(job) for job in jobs]
        matrix = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
        outputs = self._model.run_sync(matrix)
        sliced = split_rows(outputs, [block.shape[0] for block in blocks])
        if self._on_batch is not None:
            # the idle fast path's answers count too; inline (the hook only keeps
            # references: no callback allocated per lone request), its fold is scheduled
            # for a later loop turn, after the caller's handler has answered in this one
            self._on_batch(matrix, outputs, jobs)
        return _results(jobs, {}, list(zip(blocks, sliced, strict=True)))


def _results(
    jobs: list[Job],
    failed: dict[int, ScoringError],
    parts: list[tuple[npt.NDArray[np.float32], Outputs]],
) -> list[JobResult | ScoringError]:
    """Per job and in order: its failure, or its rows and outputs."""
    ready = iter(parts)
    results: list[JobResult | ScoringError] = []
    for i, job in enumerate(jobs):
        if i in failed:
            results.append(failed[i])
        else:
            block, part = next(ready)
            results.append(JobResult(part, block, job.prepared))
    return results


def _rows_of(job: Job) -> npt.NDArray[np.float32]:
    if job.rows is not None:
        return job.rows
    assert job.prepared is not None
    return job.prepared.row
