"""Reference profiles for the small linear test models (drift monitoring tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.governance.profile import ReferenceProfile, build_profile
from server.manifest import ModelManifest
from tests.support.model_factory import linear_scores

CATEGORIES = np.array([0.0, 1.0, 2.0])


def draw(
    rng: np.random.Generator, n: int, width: int = 8, shift: float = 0.0
) -> npt.NDArray[np.float32]:
    """Rows like the reference: every column normal but the last, categorical
    ({0, 1, 2}); ``shift`` moves the first column."""
    rows = rng.normal(size=(n, width))
    rows[:, -1] = rng.choice(CATEGORIES, size=n, p=[0.5, 0.3, 0.2])
    rows[:, 0] += shift
    return rows.astype(np.float32)


def write_reference_profile(
    version_dir: Path, weights: npt.NDArray[np.float32], bias: float, rows: int = 20_000
) -> ReferenceProfile:
    """Profile ``rows`` reference rows scored by the linear model, beside the version."""
    manifest = ModelManifest.read(version_dir)
    sample = draw(np.random.default_rng(99), rows, len(manifest.features))
    profile = build_profile(
        model=manifest.name,
        version=manifest.version,
        artifact_sha256=manifest.sha256,
        source="test reference",
        columns={n: sample[:, i].astype(np.float64) for i, n in enumerate(manifest.features)},
        scores=linear_scores(sample, weights, bias),
    )
    profile.write(version_dir)
    return profile
