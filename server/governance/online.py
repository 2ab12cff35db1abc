"""The online-path check: holdout rows scored through a real in-process server.

A server (``server.app.AppContext``, the production request path: gRPC decode,
feature assembly, micro-batcher, ONNX runtime) is started on a free loopback port
over a private repository holding only the version under test (a symlink), and
every row is sent to ``Scoring.Score`` with its features and the version pinned.
Its answers must equal the offline ONNX scores to float32 precision; a skew
between how the holdout was scored offline and what the server computes (a
column transformed, reordered or defaulted) shows up as mismatching rows.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.app import AppContext
from server.manifest import ModelManifest
from server.settings import Settings, load_settings

TOLERANCE = 1e-6
"""Largest allowed |online - offline|: a few float32 ulps of a probability."""


@dataclass(frozen=True)
class OnlineCheck:
    """How the server's answers compare with the offline scores."""

    rows: int
    mismatched: int
    max_abs_diff: float
    tolerance: float
    first_mismatches: tuple[int, ...]
    errors: tuple[str, ...]
    online_scores: npt.NDArray[np.float64]

    @property
    def passed(self) -> bool:
        return self.mismatched == 0


def compare(
    online: npt.NDArray[np.float64],
    offline: npt.NDArray[np.float64],
    errors: Sequence[str] = (),
    tolerance: float = TOLERANCE,
) -> OnlineCheck:
    """Row-wise comparison of online with offline scores (a NaN online score mismatches)."""
    diff = np.abs(online - offline)
    bad = np.flatnonzero(~(diff <= tolerance))
    return OnlineCheck(
        rows=int(online.size),
        mismatched=int(bad.size),
        max_abs_diff=float(np.max(diff, initial=0.0, where=~np.isnan(diff))),
        tolerance=tolerance,
        first_mismatches=tuple(int(i) for i in bad[:10]),
        errors=tuple(errors[:10]),
        online_scores=online,
    )


def score_online(
    version_dir: Path, rows: npt.NDArray[np.float32], *, concurrency: int = 64
) -> tuple[npt.NDArray[np.float64], list[str]]:
    """Score ``rows`` (model feature order) through a private in-process server.

    Returns the scores (NaN where the server refused the row) and the refusals.
    Runs its own event loop: call it from synchronous code.
    """
    manifest = ModelManifest.read(version_dir)
    with tempfile.TemporaryDirectory(prefix="streamscore-validate-") as scratch:
        repository = Path(scratch) / "models"
        (repository / manifest.name).mkdir(parents=True)
        (repository / manifest.name / manifest.version).symlink_to(version_dir.resolve())
        settings = load_settings(
            None,
            {},
            [
                "server.host=127.0.0.1",
                "server.port=0",
                "server.metrics_port=0",
                "server.processes=1",
                f"models.repository={repository}",
                "routing.store=file",
                f"routing.file_path={Path(scratch) / 'routing.json'}",
                "logging.level=WARNING",
            ],
        )
        return asyncio.run(_serve_and_score(settings, manifest, rows, concurrency))


async def _serve_and_score(
    settings: Settings,
    manifest: ModelManifest,
    rows: npt.NDArray[np.float32],
    concurrency: int,
) -> tuple[npt.NDArray[np.float64], list[str]]:
    async with (
        AppContext(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        return await _score_all(pb_grpc.ScoringStub(channel), manifest, rows, concurrency)


async def _score_all(
    stub: pb_grpc.ScoringAsyncStub,
    manifest: ModelManifest,
    rows: npt.NDArray[np.float32],
    concurrency: int,
) -> tuple[npt.NDArray[np.float64], list[str]]:
    scores = np.full(rows.shape[0], np.nan, dtype=np.float64)
    names: Sequence[str] = manifest.features
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(index: int) -> None:
        features = dict(zip(names, rows[index].tolist(), strict=True))
        request = pb.ScoreRequest(
            model=manifest.name,
            model_version=manifest.version,
            request_id=f"validate-{index}",
            features=features,
        )
        async with gate:
            try:
                reply = await stub.Score(request, timeout=30.0)
            except grpc.aio.AioRpcError as error:  # the row stays NaN: a mismatch
                errors.append(f"row {index}: {error.code().name}: {error.details()}")
                return
        scores[index] = reply.score

    await asyncio.gather(*(one(i) for i in range(rows.shape[0])))
    return scores, sorted(errors)


def check_online_path(
    version_dir: Path,
    sent_rows: npt.NDArray[np.float32],
    offline_scores: npt.NDArray[np.float64],
) -> OnlineCheck:
    """Score ``sent_rows`` through the server and compare with ``offline_scores``."""
    online, errors = score_online(version_dir, sent_rows)
    return compare(online, offline_scores, errors)
