"""Loading a version's explainer and checking it against the model that scores.

:func:`load_explainer` reads the manifest's explainer artifact, verifies its sha256
and that it was written for this ``model.onnx``, then proves it on probe rows:
attributions plus the base value must equal the ONNX graph's own raw margin (its tree
node run by ONNX Runtime with ``post_transform`` NONE) to float32 tolerance, and the
transformed margin must equal the served score. Any failure raises
:class:`ExplainerError` naming the version; the caller refuses that version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from server.explain.artifact import FORMAT, KIND
from server.explain.paths import CoverError
from server.explain.trees import LEAF, TreeEnsemble, UnsupportedModelError, margin_model
from server.explain.treeshap import PathTable
from server.manifest import MODEL_FILE, ModelManifest, sha256_of

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

PROBE_ROWS: Final = 64
EPS32: Final = float(np.finfo(np.float32).eps)
SCORE_TOLERANCE: Final = 1e-5
"""Largest |transform(margin) - served score| (a probability) accepted at load."""


class ExplainerError(ValueError):
    """The explainer artifact is missing, corrupt or does not explain this model."""


@dataclass(frozen=True)
class Explanation:
    """Attributions of a batch: ``values.sum(1) + base_value == margin`` per row."""

    values: F64
    """``[R, F]`` contribution of each feature to the margin."""
    base_value: float
    """Cover-weighted mean margin (the margin when nothing is known)."""

    @property
    def margin(self) -> F64:
        """``[R]`` the explained raw output."""
        margin: F64 = self.values.sum(axis=1) + self.base_value
        return margin


@dataclass(frozen=True, eq=False)
class TreeExplainer:
    """Exact TreeSHAP of one loaded version's score margin."""

    name: str
    version: str
    features: tuple[str, ...]
    ensemble: TreeEnsemble
    table: PathTable

    def explain(self, x: npt.NDArray[np.floating[Any]]) -> Explanation:
        """Attributions of ``x`` (``[R, F]``, the model's input columns); CPU-bound,
        call it off the event loop."""
        return Explanation(self.table.shap_values(x), self.table.base_value)

    def transform(self, margin: F64) -> F64:
        """The served score of a margin (``sigmoid`` for LOGISTIC, else itself)."""
        if self.ensemble.post_transform == "LOGISTIC":
            return 1.0 / (1.0 + np.exp(-margin))
        return margin


def margin_tolerance(ensemble: TreeEnsemble) -> float:
    """Float32 summation bound: trees x eps x (|base| + sum of each tree's largest |leaf|)."""
    leaf = ensemble.mode == LEAF
    largest = np.zeros(max(ensemble.n_trees, 1))
    np.maximum.at(largest, ensemble.tree[leaf], np.abs(ensemble.value[leaf]))
    scale = abs(ensemble.base_value) + float(largest.sum())
    return (ensemble.n_trees + 1) * EPS32 * max(scale, 1.0)


def probe_rows(ensemble: TreeEnsemble, n: int = PROBE_ROWS, seed: int = 0) -> F32:
    """Rows whose values sit on and beside the split thresholds (every branch gets
    taken), with a few NaNs; deterministic."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, ensemble.n_features), dtype=np.float32)
    internal = ensemble.mode != LEAF
    for feature in range(ensemble.n_features):
        at = internal & (ensemble.feature == feature)
        if not at.any():
            continue
        t = ensemble.threshold[at].astype(np.float32)
        candidates = np.concatenate(
            [t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))]
        )
        x[:, feature] = rng.choice(candidates, size=n)
    x[rng.random(x.shape) < 0.02] = np.nan
    return x


def _fail(manifest: ModelManifest, message: str) -> ExplainerError:
    return ExplainerError(f"{manifest.name}/{manifest.version}: explainer refused: {message}")


def load_explainer(
    version_dir: Path,
    manifest: ModelManifest,
    rows: npt.NDArray[np.floating[Any]] | None = None,
) -> TreeExplainer | None:
    """The version's checked explainer, or None if its manifest names none.

    ``rows`` are extra probe rows (e.g. held-out data) added to the generated ones.
    Raises :class:`ExplainerError` naming the version and the problem.
    """
    spec = manifest.explainer
    if spec is None:
        return None
    path = version_dir / spec.path
    try:
        digest = sha256_of(path)
    except OSError as exc:
        raise _fail(manifest, f"cannot read {spec.path}: {exc}") from exc
    if digest != spec.sha256:
        raise _fail(manifest, f"{spec.path} sha256 {digest} != manifest {spec.sha256}")
    model_bytes = (version_dir / MODEL_FILE).read_bytes()
    try:
        document = json.loads(path.read_text())
        if document.get("format") != FORMAT or document.get("kind") != KIND:
            raise ValueError(f"format/kind {document.get('format')}/{document.get('kind')}")
        ensemble = TreeEnsemble.from_arrays(document["trees"])
        table = PathTable.build(ensemble, np.asarray(document["covers"], dtype=np.float64))
    except (KeyError, TypeError, ValueError, CoverError) as exc:
        raise _fail(manifest, f"{spec.path} is malformed: {exc}") from exc
    if document.get("model_sha256") != manifest.sha256:
        raise _fail(manifest, f"{spec.path} was written for model {document.get('model_sha256')}")
    if ensemble.n_features != len(manifest.features):
        raise _fail(
            manifest, f"{ensemble.n_features} features, manifest has {len(manifest.features)}"
        )
    explainer = TreeExplainer(manifest.name, manifest.version, manifest.features, ensemble, table)
    _check_against_model(explainer, manifest, model_bytes, rows)
    return explainer


def _check_against_model(
    explainer: TreeExplainer,
    manifest: ModelManifest,
    model_bytes: bytes,
    rows: npt.NDArray[np.floating[Any]] | None,
) -> None:
    import onnx

    probe = probe_rows(explainer.ensemble)
    if rows is not None:
        probe = np.vstack([probe, np.asarray(rows, dtype=np.float32)])
    try:
        model = onnx.load_from_string(model_bytes)
        margin_session = ort.InferenceSession(
            margin_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
        )
    except (UnsupportedModelError, ValueError) as exc:
        raise _fail(manifest, str(exc)) from exc
    (scores,) = margin_session.run(None, {manifest.input.name: probe})
    onnx_margin = np.asarray(scores, dtype=np.float64).reshape(len(probe), -1)
    onnx_margin = onnx_margin[:, min(manifest.score_index, onnx_margin.shape[1] - 1)]
    explained = explainer.explain(probe).margin
    tolerance = margin_tolerance(explainer.ensemble)
    diff = np.abs(explained - onnx_margin)
    worst = int(np.argmax(diff))
    if not diff[worst] <= tolerance:
        raise _fail(
            manifest,
            f"attributions + base = {explained[worst]:.6g} but the model's margin is "
            f"{onnx_margin[worst]:.6g} (probe row {worst}, tolerance {tolerance:.2g})",
        )
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (served,) = session.run([manifest.score_output], {manifest.input.name: probe})
    served_score = np.asarray(served, dtype=np.float64).reshape(len(probe), -1)
    served_score = served_score[:, min(manifest.score_index, served_score.shape[1] - 1)]
    off = np.abs(explainer.transform(explained) - served_score)
    if not np.nanmax(off) <= SCORE_TOLERANCE:
        raise _fail(
            manifest, f"the explained margin does not give the served score ({off.max():.3g})"
        )
    logger.info(
        "%s/%s: explainer checked on %d rows (max |margin diff| %.2g <= %.2g)",
        manifest.name,
        manifest.version,
        len(probe),
        float(diff[worst]),
        tolerance,
    )
