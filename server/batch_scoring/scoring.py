"""The model side of batch scoring: the served artifact, its scores and decisions.

Versions load through :func:`server.runtime.load_version` (sha256 and graph checked
against the manifest, the server's runtime settings), so a batch score comes from
exactly the bytes the server would run. The score is the manifest's score output
and column, the decision ``score >= threshold`` (the server's and shadow's rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.errors import ModelLoadError
from server.explain.explainer import ExplainerError, TreeExplainer, load_explainer
from server.manifest import ModelManifest
from server.runtime import OnnxModel, RuntimeOptions, load_version

__all__ = ["ModelRef", "ScoringModel", "UnknownModelError", "resolve_version"]


class UnknownModelError(ValueError):
    """No such model or version in the repository (the message names it)."""


@dataclass(frozen=True)
class ModelRef:
    """Where a version lives and how to run it (picklable)."""

    repository: Path
    name: str
    version: str
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @property
    def directory(self) -> Path:
        """``<repository>/<name>/<version>``."""
        return self.repository / self.name / self.version


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if re.fullmatch(r"\d+", version) else (1, version)


def resolve_version(repository: Path, name: str, version: str | None) -> str:
    """``version``, or the highest one present; ``UnknownModelError`` names what is not."""
    model_dir = repository / name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not model_dir.is_dir():
        raise UnknownModelError(f"unknown model {name!r} (not in {repository})")
    found = sorted(
        (p.name for p in model_dir.iterdir() if (p / "manifest.json").is_file()),
        key=_version_order,
    )
    if version is None:
        if not found:
            raise UnknownModelError(f"model {name!r} has no versions in {model_dir}")
        return found[-1]
    if version not in found:
        raise UnknownModelError(
            f"unknown version {version!r} of model {name!r} (have: {', '.join(found) or 'none'})"
        )
    return version


@dataclass(frozen=True, eq=False)
class ScoringModel:
    """A loaded, verified version, with its explainer when the manifest names one."""

    ref: ModelRef
    model: OnnxModel
    explainer: TreeExplainer | None

    @property
    def manifest(self) -> ModelManifest:
        """The version's manifest."""
        return self.model.manifest

    @classmethod
    def load(cls, ref: ModelRef, *, explain: bool = False) -> ScoringModel:
        """Load and check ``ref``; ``ModelLoadError``/``ExplainerError`` name the problem."""
        model = load_version(ref.directory, ref.runtime)
        explainer = load_explainer(ref.directory, model.manifest) if explain else None
        return cls(ref, model, explainer)

    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``[N]`` scores of ``[N, F]`` rows, as the server reads them off the output."""
        manifest = self.manifest
        if rows.shape[0] == 0:
            return np.empty(0, np.float32)
        values: npt.NDArray[Any] = self.model.run_sync(rows)[manifest.score_output]
        column = values[:, manifest.score_index] if values.ndim == 2 else values.reshape(-1)
        return np.asarray(column, dtype=np.float32)

    def decisions(self, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """``score >= threshold`` per row."""
        return np.asarray(scores >= self.manifest.threshold)


__all__ += ["ExplainerError", "ModelLoadError"]
