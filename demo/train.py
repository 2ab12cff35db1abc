"""Train the demo ``fraud`` models and export them, with manifests, to a model repository.

Two versions on different synthetic snapshots: ``1`` (smaller snapshot, fewer trees)
and ``2`` (another seed, more rows and trees), both LightGBM converted with
onnxmltools to one float32 input ``features [N, 30]`` and outputs ``label [N]``
(int64) and ``probabilities [N, 2]`` (float32, no ZipMap).

Two details make the export exact and reproducible:

* LightGBM keeps split thresholds as float64; ONNX tree ensembles use float32, and
  rounding a threshold *up* onto a float32 data value flips ``x <= t`` for that
  value. Each threshold is therefore replaced by the largest float32 not above
  it, which gives identical decisions for every float32 input.
* onnxmltools names the graph with a random uuid and lists opset imports in set
  order (varies with ``PYTHONHASHSEED``); the graph gets a fixed name and the
  imports are sorted, so the same spec yields a byte-identical ``model.onnx``
  (training runs with ``deterministic=True`` on one thread with fixed seeds).

The exported graph is checked with onnxruntime against the classifier's
``predict_proba`` on held-out rows; a version that differs is not written.
Train-only libraries (lightgbm, onnxmltools, onnx, scikit-learn) are imported
inside the functions that use them, so importing this module needs only the
serving dependencies.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from demo.synthetic import DEMO_FEATURES, generate_dataset
from server.explain.artifact import write_explainer
from server.manifest import (
    MODEL_FILE,
    ExplainerSpec,
    ModelManifest,
    TensorSpec,
    TrainingInfo,
    sha256_of,
)

logger = logging.getLogger(__name__)

MODEL_NAME: Final = "fraud"
INPUT_NAME: Final = "features"
LABEL_OUTPUT: Final = "label"
SCORE_OUTPUT: Final = "probabilities"
DEFAULT_N_ROWS: Final = 80_000
PARITY_TOLERANCE: Final = 1e-4
"""Largest accepted |ONNX - predict_proba| on held-out rows."""
TARGET_OPSET: Final = 15
HOLDOUT_FILE: Final = "holdout.parquet"
HOLDOUT_ROWS: Final = 4_000
HOLDOUT_SEED_OFFSET: Final = 7_919
"""The holdout of version v is drawn with seed ``spec.seed + HOLDOUT_SEED_OFFSET``."""
VALIDATION_SEGMENTS: Final = ("channel",)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class ExportCheckError(RuntimeError):
    """The exported ONNX graph does not reproduce the trained model."""


@dataclass(frozen=True)
class DemoVersionSpec:
    """How one version is trained: data snapshot and hyperparameters."""

    version: str
    seed: int
    n_rows: int
    n_estimators: int
    num_leaves: int = 31
    learning_rate: float = 0.05

    @property
    def data_snapshot(self) -> str:
        """Id of the synthetic snapshot, e.g. ``synthetic-seed101-n80000``."""
        return f"synthetic-seed{self.seed}-n{self.n_rows}"


@dataclass(frozen=True)
class TrainedVersion:
    """A trained, exported and checked version, not yet written."""

    spec: DemoVersionSpec
    classifier: Any
    """The fitted ``lightgbm.LGBMClassifier``."""
    onnx_bytes: bytes
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict)
    algorithm: str = ""


def demo_version_specs(n_rows: int = DEFAULT_N_ROWS) -> tuple[DemoVersionSpec, ...]:
    """The two demo versions; version 2 sees a different, 25 % larger snapshot."""
    if n_rows < 1_000:
        raise ValueError(f"n_rows must be >= 1000, got {n_rows}")
    return (
        DemoVersionSpec(version="1", seed=101, n_rows=n_rows, n_estimators=120),
        DemoVersionSpec(version="2", seed=202, n_rows=n_rows * 5 // 4, n_estimators=200),
    )


def _split(x: F32, y: I64, seed: int) -> tuple[tuple[F32, I64], tuple[F32, I64], tuple[F32, I64]]:
    """70 / 15 / 15 train / validation / test split by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(y))
    a, b = int(len(y) * 0.70), int(len(y) * 0.85)
    parts = (order[:a], order[a:b], order[b:])
    train, valid, test = ((x[p], y[p]) for p in parts)
    return train, valid, test


def _float32_exact_booster(booster: Any) -> Any:
    """Copy of ``booster`` whose thresholds are floored to float32 (see module doc)."""
    import lightgbm as lgb

    lines = []
    for line in booster.model_to_string().split("\n"):
        if line.startswith("tree_sizes="):
            continue  # byte offsets of the trees; stale once thresholds change
        if line.startswith("num_cat=") and line != "num_cat=0":
            raise ExportCheckError("categorical splits are not supported by the float32 patch")
        if line.startswith("threshold="):
            values = np.array(line.removeprefix("threshold=").split(" "), dtype=np.float64)
            floored = values.astype(np.float32)
            up = floored.astype(np.float64) > values
            floored[up] = np.nextafter(floored[up], np.float32(-np.inf))
            line = "threshold=" + " ".join(repr(float(v)) for v in floored)
        lines.append(line)
    return lgb.Booster(model_str="\n".join(lines))


def _to_onnx(booster: Any, graph_name: str) -> bytes:
    """Convert, fix the graph name and output shapes, validate, serialize."""
    import onnx
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = convert_lightgbm(
        booster,
        name=graph_name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(DEMO_FEATURES)]))],
        zipmap=False,
        target_opset=TARGET_OPSET,
    )
    graph = model.graph
    graph.name = graph_name  # onnxmltools otherwise uses a random uuid
    shapes = {
        INPUT_NAME: ("N", len(DEMO_FEATURES)),
        LABEL_OUTPUT: ("N",),
        SCORE_OUTPUT: ("N", 2),
    }
    for value in [*graph.input, *graph.output]:
        if value.name not in shapes:
            raise ExportCheckError(f"unexpected graph tensor {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[value.name]:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    # onnxmltools emits opset imports in set order, which varies between processes.
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    model.doc_string = f"streamscore demo model {graph_name}"
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def check_onnx_parity(
    onnx_bytes: bytes, classifier: Any, x: F32, tolerance: float = PARITY_TOLERANCE
) -> tuple[float, F32]:
    """Max |ONNX - predict_proba| over ``x`` and the ONNX probabilities.

    Raises :class:`ExportCheckError` if the graph's tensors are not the expected
    ones or the difference exceeds ``tolerance``.
    """
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.type) for i in session.get_inputs()]
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    if inputs != [(INPUT_NAME, "tensor(float)")] or outputs != [
        (LABEL_OUTPUT, "tensor(int64)"),
        (SCORE_OUTPUT, "tensor(float)"),
    ]:
        raise ExportCheckError(f"unexpected ONNX signature: inputs={inputs} outputs={outputs}")
    _, probabilities = session.run([LABEL_OUTPUT, SCORE_OUTPUT], {INPUT_NAME: x})
    expected = np.asarray(classifier.predict_proba(x), dtype=np.float64)
    got = np.asarray(probabilities, dtype=np.float32)
    if got.shape != expected.shape:
        raise ExportCheckError(f"ONNX probabilities shape {got.shape} != {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not diff <= tolerance:
        raise ExportCheckError(f"ONNX differs from the model by {diff:.3g} > {tolerance:g}")
    return diff, got


def _best_f1_threshold(y: I64, score: npt.NDArray[np.float64]) -> float:
    """Validation threshold maximising F1, rounded to 4 decimals."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, score)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return round(float(thresholds[int(np.argmax(f1))]), 4)


def _test_metrics(y: I64, score: npt.NDArray[np.float64], threshold: float) -> dict[str, float]:
    from sklearn.metrics import f1_score, log_loss, precision_score, recall_score, roc_auc_score

    predicted = (score >= threshold).astype(np.int64)
    return {
        "auc": round(float(roc_auc_score(y, score)), 6),
        "logloss": round(float(log_loss(y, score, labels=[0, 1])), 6),
        "precision": round(float(precision_score(y, predicted, zero_division=0)), 6),
        "recall": round(float(recall_score(y, predicted, zero_division=0)), 6),
        "f1": round(float(f1_score(y, predicted, zero_division=0)), 6),
        "positive_rate": round(float(y.mean()), 6),
    }


def train_version(spec: DemoVersionSpec) -> TrainedVersion:
    """Generate the snapshot, fit, export and check one version (writes nothing)."""
    import lightgbm as lgb
    import onnxmltools

    x, y = generate_dataset(spec.n_rows, spec.seed)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _split(x, y, spec.seed)
    classifier = lgb.LGBMClassifier(
        n_estimators=spec.n_estimators,
        num_leaves=spec.num_leaves,
        learning_rate=spec.learning_rate,
        random_state=spec.seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=1,
        verbose=-1,
    )
    classifier.fit(x_train, y_train)
    onnx_bytes = _to_onnx(
        _float32_exact_booster(classifier.booster_), f"{MODEL_NAME}_v{spec.version}"
    )
    valid_score = np.asarray(classifier.predict_proba(x_valid), dtype=np.float64)[:, 1]
    threshold = _best_f1_threshold(y_valid, valid_score)
    diff, probabilities = check_onnx_parity(onnx_bytes, classifier, x_test)
    metrics = _test_metrics(y_test, probabilities[:, 1].astype(np.float64), threshold)
    metrics |= {
        "onnx_max_abs_diff": diff,
        "n_train": float(len(y_train)),
        "n_test": float(len(y_test)),
    }
    algorithm = (
        f"lightgbm {lgb.__version__} LGBMClassifier(n_estimators={spec.n_estimators}, "
        f"num_leaves={spec.num_leaves}, learning_rate={spec.learning_rate}) "
        f"-> onnxmltools {onnxmltools.__version__}"
    )
    return TrainedVersion(
        spec=spec,
        classifier=classifier,
        onnx_bytes=onnx_bytes,
        threshold=threshold,
        metrics=metrics,
        algorithm=algorithm,
    )


def _code_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this file, else ``unknown``."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def is_current(version_dir: Path, version: str, *, validated: bool = False) -> bool:
    """True if ``version_dir`` holds a valid manifest for ``fraud/<version>`` whose
    sha256 matches its ``model.onnx`` and whose explainer matches its file (and, when
    ``validated``, a validation report beside them)."""
    from server.governance.report import REPORT_FILE

    model_path = version_dir / MODEL_FILE
    try:
        manifest = ModelManifest.read(version_dir)
        explainer = manifest.explainer
        return (
            manifest.name == MODEL_NAME
            and manifest.version == version
            and model_path.is_file()
            and manifest.sha256 == sha256_of(model_path)
            and explainer is not None
            and explainer.sha256 == sha256_of(version_dir / explainer.path)
            and (not validated or (version_dir / REPORT_FILE).is_file())
        )
    except (OSError, ValueError):
        return False


def write_holdout(path: Path, spec: DemoVersionSpec, n_rows: int = HOLDOUT_ROWS) -> Path:
    """A labelled holdout from a seed the version never saw (features + ``label``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = generate_dataset(n_rows, spec.seed + HOLDOUT_SEED_OFFSET)
    columns = {name: x[:, i] for i, name in enumerate(DEMO_FEATURES)}
    table = pa.table({**columns, "label": y.astype(np.int8)})
    pq.write_table(table, path)
    return path


def validate_version(version_dir: Path, champion: str | None) -> None:
    """``write_validation_artifacts`` on the version's holdout: report, model card,
    reference profile (what ``make run`` and drift monitoring read)."""
    from server.governance.holdout import read_holdout
    from server.governance.validation import write_validation_artifacts

    result = write_validation_artifacts(
        version_dir,
        read_holdout(version_dir / HOLDOUT_FILE),
        segments=VALIDATION_SEGMENTS,
        champion_version=champion,
        latency_runs=60,
    )
    if not result.online.passed:
        raise ExportCheckError(f"{version_dir}: online-path check failed ({result.report_path})")


def _manifest(
    trained: TrainedVersion, sha256: str, commit: str, explainer: ExplainerSpec
) -> ModelManifest:
    return ModelManifest(
        name=MODEL_NAME,
        version=trained.spec.version,
        features=DEMO_FEATURES,
        input=TensorSpec(name=INPUT_NAME, dtype="float32"),
        outputs=(
            TensorSpec(name=LABEL_OUTPUT, dtype="int64"),
            TensorSpec(name=SCORE_OUTPUT, dtype="float32"),
        ),
        score_output=SCORE_OUTPUT,
        score_index=1,
        nan_allowed=frozenset(),
        threshold=trained.threshold,
        sha256=sha256,
        training=TrainingInfo(
            data_snapshot=trained.spec.data_snapshot,
            code_commit=commit,
            metrics=trained.metrics,
            created_at=datetime.now(UTC),
            algorithm=trained.algorithm,
        ),
        explainer=explainer,
    )


def _write_version(trained: TrainedVersion, version_dir: Path, commit: str) -> None:
    """Write into a hidden staging dir beside ``version_dir``, then swap it in."""
    parent = version_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}.staging-", dir=parent))
    try:
        model_path = staging / MODEL_FILE
        model_path.write_bytes(trained.onnx_bytes)
        # covers from the booster: LightGBM's own counts, so TreeSHAP equals pred_contrib
        explainer = write_explainer(model_path, booster=trained.classifier.booster_)
        _manifest(trained, sha256_of(model_path), commit, explainer).write(staging)
        write_holdout(staging / HOLDOUT_FILE, trained.spec)
        os.chmod(staging, 0o755)  # mkdtemp creates 0700
        if version_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}.old-", dir=parent))
            os.replace(version_dir, retired / version_dir.name)
            os.replace(staging, version_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, version_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def build_demo_repository(
    repository: Path,
    *,
    force: bool = False,
    n_rows: int = DEFAULT_N_ROWS,
    specs: Sequence[DemoVersionSpec] | None = None,
    validate: bool = True,
) -> list[Path]:
    """Train and write ``<repository>/fraud/<version>/`` for each demo version.

    Each version gets ``model.onnx``, its explainer (``explainer.json``), the manifest
    and a holdout; with ``validate`` also the validation report, model card and
    reference profile (against the previous demo version as champion). A version
    whose directory already holds all that, matching, is skipped unless ``force``.
    Returns the version directories written (skipped ones are not listed). Raises
    :class:`ExportCheckError` if an export does not reproduce its model (that version
    is not written) or its online-path check fails.
    """
    written: list[Path] = []
    commit: str | None = None
    previous: str | None = None
    for spec in specs if specs is not None else demo_version_specs(n_rows):
        version_dir = repository / MODEL_NAME / spec.version
        champion, previous = previous, spec.version
        if not force and is_current(version_dir, spec.version, validated=validate):
            logger.info("%s is current, skipping (use force to rebuild)", version_dir)
            continue
        trained = train_version(spec)
        commit = commit or _code_commit()
        _write_version(trained, version_dir, commit)
        if validate:
            validate_version(version_dir, champion)
        logger.info(
            "wrote %s: %s auc=%.4f threshold=%.4f precision=%.3f recall=%.3f",
            version_dir,
            spec.data_snapshot,
            trained.metrics["auc"],
            trained.threshold,
            trained.metrics["precision"],
            trained.metrics["recall"],
        )
        written.append(version_dir)
    return written


def main_models_demo(repository: Path, force: bool) -> int:
    """CLI body of ``streamscore models demo``; returns the process exit code."""
    try:
        written = build_demo_repository(repository, force=force)
    except ExportCheckError as error:
        logger.error("demo model export refused: %s", error)
        return 1
    if written:
        logger.info("demo models written to %s: %s", repository, [str(p) for p in written])
    else:
        logger.info("demo models in %s are up to date", repository)
    return 0
