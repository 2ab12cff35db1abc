"""``write_validation_artifacts``: everything that proves a version fit to serve.

Writes beside the version (``models/<name>/<version>/``): ``validation_report.json``
(sealed, see ``report``), ``model_card.md`` with ``calibration.png`` and
``score_distribution.png``, and ``reference_profile.json`` (see ``profile``).
The champion compared against is ``champion_version`` when given, else the
highest other version of the model in the repository.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.errors import ModelLoadError
from server.governance.holdout import Holdout, HoldoutError
from server.governance.model_card import CARD_FILE, write_card
from server.governance.online import OnlineCheck, check_online_path
from server.governance.plots import CALIBRATION_PNG, SCORES_PNG, calibration_plot, score_plot
from server.governance.profile import PROFILE_FILE, build_profile
from server.governance.quality import Quality, ReliabilityBin, quality, segment_rates
from server.governance.report import REPORT_FILE, REPORT_FORMAT, write_report
from server.manifest import MANIFEST_FILE, MODEL_FILE, sha256_of
from server.router import version_sort_key
from server.runtime import OnnxModel, RuntimeOptions, load_version

_CHUNK = 8192
MAX_SEGMENT_VALUES = 100


class ValidationError(ValueError):
    """The version or its inputs cannot be validated; one line naming the problem."""


@dataclass(frozen=True)
class ValidationResult:
    """What was written and the headline results."""

    report_path: Path
    report_sha256: str
    metrics: Quality
    online: OnlineCheck


def offline_scores(model: OnnxModel, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The model's score column for ``rows``, straight from ONNX Runtime."""
    manifest = model.manifest
    out: list[npt.NDArray[np.float64]] = []
    for start in range(0, rows.shape[0], _CHUNK):
        values = model.run_sync(rows[start : start + _CHUNK])[manifest.score_output]
        column = values[:, manifest.score_index] if values.ndim == 2 else values.reshape(-1)
        out.append(column.astype(np.float64))
    return np.concatenate(out)


def measure_latency(
    model: OnnxModel, rows: npt.NDArray[np.float32], batch: int, runs: int
) -> dict[str, float | int]:
    """p50/p99/mean milliseconds of ``runs`` synchronous calls of ``batch`` rows."""
    picked = rows[np.arange(batch) % rows.shape[0]]
    for _ in range(min(20, runs)):
        model.run_sync(picked)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run_sync(picked)
        timings.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(timings)
    return {
        "batch": batch,
        "runs": runs,
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean_ms": statistics.fmean(timings),
    }


def find_champion(version_dir: Path, champion_version: str | None) -> Path | None:
    """The champion's directory: the one named, else the highest other version."""
    model_dir = version_dir.parent
    if champion_version is not None:
        chosen = model_dir / champion_version
        if not (chosen / MANIFEST_FILE).is_file():
            raise ValidationError(f"--champion {champion_version}: no such version in {model_dir}")
        return chosen
    others = [
        p
        for p in model_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != version_dir.name
        if (p / MANIFEST_FILE).is_file()
    ]
    return max(others, key=lambda p: version_sort_key(p.name)) if others else None


def _segment_values(holdout: Holdout, column: str) -> npt.NDArray[np.str_]:
    values = holdout.segment(column)
    distinct = np.unique(values).size
    if distinct > MAX_SEGMENT_VALUES:
        raise HoldoutError(
            f"holdout {holdout.path}: segment column {column}: {distinct} distinct values "
            f"(at most {MAX_SEGMENT_VALUES}); segment by a categorical column"
        )
    return values


def _load(version_dir: Path) -> OnnxModel:
    try:
        return load_version(version_dir, RuntimeOptions(intra_op_threads=1))
    except ModelLoadError as error:
        raise ValidationError(str(error)) from error


def _champion_section(
    champion_dir: Path, holdout: Holdout, labels: npt.NDArray[np.int8]
) -> dict[str, Any]:
    model = _load(champion_dir)
    try:
        manifest = model.manifest
        section: dict[str, Any] = {"version": manifest.version, "artifact_sha256": manifest.sha256}
        missing = [f for f in manifest.features if f not in holdout.columns]
        if missing:
            section["skipped"] = f"holdout lacks its feature(s): {', '.join(missing)}"
            return section
        scores = offline_scores(model, holdout.matrix(manifest.features))
        section["metrics"] = quality(labels, scores, manifest.threshold).to_json()
        return section
    finally:
        model.close()


def write_validation_artifacts(
    version_dir: Path,
    holdout: Holdout,
    *,
    label: str = "label",
    segments: Sequence[str] = (),
    champion_version: str | None = None,
    latency_runs: int = 300,
) -> ValidationResult:
    """Validate ``version_dir`` on ``holdout`` and write every artifact beside it.

    Synchronous (the online-path check runs its own event loop): call it from a
    training script or a CLI, not from inside a running loop.
    """
    model = _load(version_dir)
    try:
        manifest = model.manifest
        holdout.require(
            [*manifest.features, label, *segments],
            f"{manifest.name}/{manifest.version} feature, label or segment",
        )
        segment_values = {column: _segment_values(holdout, column) for column in segments}
        rows = holdout.matrix(manifest.features)
        labels = holdout.labels(label)
        scores = offline_scores(model, rows)
        metrics = quality(labels, scores, manifest.threshold)
        champion_dir = find_champion(version_dir, champion_version)
        champion = _champion_section(champion_dir, holdout, labels) if champion_dir else None
        latency = {
            "batch_1": measure_latency(model, rows, 1, latency_runs),
            "batch_64": measure_latency(model, rows, 64, max(1, latency_runs // 3)),
        }
    finally:
        model.close()
    online = check_online_path(version_dir, rows, scores)
    segment_section: dict[str, Any] = {}
    for column, values in segment_values.items():
        segment_section[column] = [
            vars(r) for r in segment_rates(values, scores, manifest.threshold)
        ]

    profile = build_profile(
        model=manifest.name,
        version=manifest.version,
        artifact_sha256=manifest.sha256,
        source=str(holdout.path),
        columns={f: rows[:, i].astype(np.float64) for i, f in enumerate(manifest.features)},
        scores=scores,
    )
    profile.write(version_dir)
    curves = [(f"{manifest.version} (this)", metrics.reliability)]
    if champion and "metrics" in champion:
        curves.append((f"{champion['version']} (champion)", _bins(champion["metrics"])))
    calibration_plot(version_dir / CALIBRATION_PNG, curves)
    score_plot(version_dir / SCORES_PNG, scores, labels, manifest.threshold)

    body: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "model": manifest.name,
        "version": manifest.version,
        "created_at": datetime.now(UTC).isoformat(),
        "artifact": {
            "file": MODEL_FILE,
            "sha256": manifest.sha256,
            "size_bytes": (version_dir / MODEL_FILE).stat().st_size,
        },
        "holdout": {
            "path": str(holdout.path),
            "sha256": sha256_of(holdout.path),
            "rows": holdout.rows,
            "label": label,
        },
        "metrics": metrics.to_json(),
        "champion": champion,
        "latency": latency,
        "online_check": {
            "passed": online.passed,
            "rows": online.rows,
            "mismatched": online.mismatched,
            "max_abs_diff": online.max_abs_diff,
            "tolerance": online.tolerance,
            "first_mismatches": list(online.first_mismatches),
            "errors": list(online.errors),
        },
        "segments": segment_section,
    }
    write_card(version_dir, manifest, body)
    body["files"] = {
        name: sha256_of(version_dir / name)
        for name in (MANIFEST_FILE, CARD_FILE, CALIBRATION_PNG, SCORES_PNG, PROFILE_FILE)
    }
    digest = write_report(version_dir, body)
    return ValidationResult(
        report_path=version_dir / REPORT_FILE,
        report_sha256=digest,
        metrics=metrics,
        online=online,
    )


def _bins(metrics_json: dict[str, Any]) -> tuple[ReliabilityBin, ...]:
    return tuple(ReliabilityBin(**b) for b in metrics_json["reliability"])
