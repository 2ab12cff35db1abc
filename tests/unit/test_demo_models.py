"""Demo fraud models: synthetic data, ONNX export parity, manifests, idempotent builds."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

import demo.train as train
from demo.synthetic import (
    CARD_BATCH_FEATURES,
    CARD_STREAM_FEATURES,
    CUSTOMER_BATCH_FEATURES,
    DEMO_FEATURES,
    MERCHANT_STREAM_FEATURES,
    REQUEST_FEATURES,
    SECONDS_SINCE_LAST_CAP,
    generate_dataset,
    make_population,
    sample_transaction,
    sample_transactions,
)
from demo.train import (
    HOLDOUT_FILE,
    DemoVersionSpec,
    ExportCheckError,
    TrainedVersion,
    build_demo_repository,
    check_onnx_parity,
    demo_version_specs,
    is_current,
    main_models_demo,
    train_version,
)
from server.explain.explainer import load_explainer
from server.governance.profile import PROFILE_FILE
from server.governance.report import REPORT_FILE, verify_report
from server.manifest import MANIFEST_FILE, MODEL_FILE, ModelManifest, sha256_of

N_ROWS = 20_000  # small snapshots keep the module to a few seconds
VERSIONS = ("1", "2")

Dataset = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    written = build_demo_repository(repo, n_rows=N_ROWS)
    assert written == [repo / "fraud" / v for v in VERSIONS]
    return repo


@pytest.fixture(scope="module")
def fresh() -> Dataset:
    """Rows from a seed no version was trained on."""
    return generate_dataset(30_000, seed=4242)


@pytest.fixture(scope="module")
def trained_v1() -> TrainedVersion:
    return train_version(demo_version_specs(N_ROWS)[0])


def _session(repo: Path, version: str) -> ort.InferenceSession:
    path = repo / "fraud" / version / MODEL_FILE
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _mtimes(repo: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((repo / "fraud").rglob("*")) if p.is_file()}


def _col(x: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.float32]:
    return x[:, DEMO_FEATURES.index(name)]


# --- synthetic data ---------------------------------------------------------------------


def test_demo_features_are_30_unique_names_in_group_order() -> None:
    assert len(DEMO_FEATURES) == 30
    assert len(set(DEMO_FEATURES)) == 30
    assert DEMO_FEATURES == (
        REQUEST_FEATURES
        + CUSTOMER_BATCH_FEATURES
        + CARD_BATCH_FEATURES
        + CARD_STREAM_FEATURES
        + MERCHANT_STREAM_FEATURES
    )
    assert DEMO_FEATURES[0] == "amount"
    assert DEMO_FEATURES[-1] == "merchant_txn_count_1h"


def test_dataset_is_reproducible_and_seed_dependent() -> None:
    x1, y1 = generate_dataset(2_000, seed=3)
    x2, y2 = generate_dataset(2_000, seed=3)
    x3, _ = generate_dataset(2_000, seed=4)
    assert x1.dtype == np.float32
    assert x1.shape == (2_000, 30)
    assert y1.shape == (2_000,)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_dataset_values_are_plausible(fresh: Dataset) -> None:
    x, y = fresh
    assert np.isfinite(x).all()
    assert set(np.unique(y).tolist()) == {0, 1}
    assert 0.01 <= y.mean() <= 0.03
    assert (_col(x, "amount") > 0).all()
    assert set(np.unique(_col(x, "channel")).tolist()) <= {0.0, 1.0, 2.0}
    hour = _col(x, "hour_of_day")
    assert set(np.unique(hour).tolist()) <= set(map(float, range(24)))
    assert set(np.unique(_col(x, "day_of_week")).tolist()) <= set(map(float, range(7)))
    for flag in ("is_international", "card_present"):
        assert set(np.unique(_col(x, flag)).tolist()) <= {0.0, 1.0}
    assert (_col(x, "card_present") == (_col(x, "channel") != 1)).all()
    counts = [
        "txn_count_90d",
        "chargebacks_365d",
        "card_txn_count_5m",
        "card_txn_count_1h",
        "card_txn_count_24h",
        "card_intl_count_24h",
        "merchant_txn_count_1h",
    ]
    for name in counts:
        column = _col(x, name)
        assert (column >= 0).all() and (column == np.round(column)).all(), name
    assert (_col(x, "card_txn_count_5m") <= _col(x, "card_txn_count_1h")).all()
    assert (_col(x, "card_txn_count_1h") <= _col(x, "card_txn_count_24h")).all()
    assert (_col(x, "card_intl_count_24h") <= _col(x, "card_txn_count_24h")).all()
    sum_24h = _col(x, "card_amount_sum_24h")
    assert (_col(x, "card_amount_sum_1h") <= sum_24h + 0.01).all()
    assert (_col(x, "card_amount_max_24h") <= sum_24h + 0.01).all()
    assert (_col(x, "card_amount_mean_24h") <= _col(x, "card_amount_max_24h") + 0.01).all()
    quiet = _col(x, "card_txn_count_24h") == 0
    assert (sum_24h[quiet] == 0).all()
    since = _col(x, "card_seconds_since_last_txn")
    assert (since >= 0).all() and (since <= SECONDS_SINCE_LAST_CAP).all()
    assert (since[~quiet] < 86_400).all()
    assert (_col(x, "bureau_risk_score") >= 0).all() and (_col(x, "bureau_risk_score") <= 1).all()
    # The fraud signal: bursts and large amounts relative to the customer's history.
    assert (
        _col(x, "card_txn_count_5m")[y == 1].mean()
        > 5 * _col(x, "card_txn_count_5m")[y == 0].mean()
    )


def test_sample_transaction_gives_request_features_and_known_ids() -> None:
    population = make_population(np.random.default_rng(0), n_customers=200, n_merchants=50)
    first = sample_transaction(np.random.default_rng(9), population)
    again = sample_transaction(np.random.default_rng(9), population)
    assert first == again
    assert tuple(first.request) == REQUEST_FEATURES
    assert first.request["amount"] > 0
    assert first.customer_id in population.customer_ids
    assert first.card_id in population.card_ids
    assert first.merchant_id in population.merchant_ids
    assert tuple(population.customer_features(first.customer_id)) == CUSTOMER_BATCH_FEATURES
    assert tuple(population.card_features(first.card_id)) == CARD_BATCH_FEATURES
    rng = np.random.default_rng(1)
    draws = [sample_transaction(rng, population) for _ in range(2_000)]
    assert 0 < sum(t.is_fraud for t in draws) < 200
    assert all(t.is_fraud == (t.pattern != "legit") for t in draws)
    with pytest.raises(KeyError):
        population.customer_features("cust-999999")
    with pytest.raises(KeyError):
        population.card_features("nope")


def test_sample_transactions_draws_many_like_one_at_a_time() -> None:
    population = make_population(np.random.default_rng(0), n_customers=200, n_merchants=50)
    batch = sample_transactions(np.random.default_rng(9), population, 4_000)
    one = sample_transactions(np.random.default_rng(9), population, 1)
    assert one == [sample_transaction(np.random.default_rng(9), population)]
    assert batch == sample_transactions(np.random.default_rng(9), population, 4_000)
    assert len({t.card_id for t in batch}) > 100  # not one card repeated
    assert all(tuple(t.request) == REQUEST_FEATURES for t in batch)
    singles = [sample_transaction(np.random.default_rng(i), population) for i in range(4_000)]
    for draws in (batch, singles):  # the same fraud mix either way (binomial, n=4000)
        assert 0.01 < sum(t.is_fraud for t in draws) / len(draws) < 0.1
    rates = [sum(t.is_fraud for t in d) / len(d) for d in (batch, singles)]
    assert abs(rates[0] - rates[1]) < 0.02


# --- export ---------------------------------------------------------------------------


def test_onnx_equals_original_model_on_fresh_rows(
    repository: Path, trained_v1: TrainedVersion, fresh: Dataset
) -> None:
    # Retraining the same spec in-process gives the very bytes on disk.
    manifest = ModelManifest.read(repository / "fraud" / "1")
    assert hashlib.sha256(trained_v1.onnx_bytes).hexdigest() == manifest.sha256
    x = fresh[0][:5_000]
    _, probabilities = _session(repository, "1").run(["label", "probabilities"], {"features": x})
    expected = trained_v1.classifier.predict_proba(x)
    assert np.abs(np.asarray(probabilities) - expected).max() < 1e-4


def _split_thresholds(booster: Any) -> list[tuple[int, float]]:
    found: list[tuple[int, float]] = []

    def walk(node: dict[str, Any]) -> None:
        if "split_index" in node:
            found.append((int(node["split_feature"]), float(node["threshold"])))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    return found


def test_export_is_exact_on_values_at_rounded_thresholds(
    trained_v1: TrainedVersion, fresh: Dataset
) -> None:
    # Inputs equal to float32(t) for thresholds t that round *up*: a plain float32 cast
    # of the thresholds sends these rows down the wrong branch (diff ~0.5).
    booster = trained_v1.classifier.booster_
    risky = [(f, t) for f, t in _split_thresholds(booster) if float(np.float32(t)) > t]
    assert risky, "expected some float64 thresholds that round up in float32"
    base = fresh[0][:20]
    rows = []
    for feature, threshold in risky:
        block = base.copy()
        block[:, feature] = np.float32(threshold)
        rows.append(block)
    x = np.vstack(rows)
    session = ort.InferenceSession(trained_v1.onnx_bytes, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"features": x})
    expected = trained_v1.classifier.predict_proba(x)
    assert np.abs(np.asarray(probabilities) - expected).max() < 1e-5


def test_parity_check_refuses_a_different_model(trained_v1: TrainedVersion, fresh: Dataset) -> None:
    class Shifted:
        def predict_proba(self, x: npt.NDArray[np.float32]) -> Any:
            probabilities = trained_v1.classifier.predict_proba(x)
            return probabilities[:, ::-1]

    x = fresh[0][:2_000]
    diff, _ = check_onnx_parity(trained_v1.onnx_bytes, trained_v1.classifier, x)
    assert diff < 1e-4
    with pytest.raises(ExportCheckError):
        check_onnx_parity(trained_v1.onnx_bytes, Shifted(), x)


def test_build_refuses_to_write_a_mismatching_export(
    tmp_path: Path, trained_v1: TrainedVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_to_onnx = train._to_onnx

    def export_other_model(booster: Any, graph_name: str) -> bytes:
        return real_to_onnx(trained_v1.classifier.booster_, graph_name)

    monkeypatch.setattr(train, "_to_onnx", export_other_model)
    spec = DemoVersionSpec(version="9", seed=5, n_rows=4_000, n_estimators=20)
    with pytest.raises(ExportCheckError):
        build_demo_repository(tmp_path, specs=[spec])
    leftovers = list((tmp_path / "fraud").iterdir()) if (tmp_path / "fraud").exists() else []
    assert leftovers == []


def test_versions_are_good_and_different(repository: Path, fresh: Dataset) -> None:
    x, y = fresh
    digests = set()
    for version in VERSIONS:
        _, probabilities = _session(repository, version).run(None, {"features": x})
        auc = roc_auc_score(y, np.asarray(probabilities)[:, 1])
        assert 0.85 < auc < 1.0, (version, auc)
        manifest = ModelManifest.read(repository / "fraud" / version)
        assert manifest.training.metrics["auc"] > 0.85
        digests.add(manifest.sha256)
    assert len(digests) == 2


def test_manifest_parses_and_matches_its_file(repository: Path) -> None:
    for version, spec in zip(VERSIONS, demo_version_specs(N_ROWS), strict=True):
        version_dir = repository / "fraud" / version
        manifest = ModelManifest.read(version_dir)
        assert manifest.sha256 == sha256_of(version_dir / MODEL_FILE)
        assert (manifest.name, manifest.version) == ("fraud", version)
        assert manifest.features == DEMO_FEATURES
        assert manifest.score_output == "probabilities" and manifest.score_index == 1
        assert manifest.nan_allowed == frozenset()
        assert 0.0 < manifest.threshold < 1.0
        assert manifest.training.data_snapshot == spec.data_snapshot
        assert manifest.training.code_commit
        metrics = manifest.training.metrics
        assert {"auc", "logloss", "precision", "recall"} <= set(metrics)
        assert metrics["onnx_max_abs_diff"] < 1e-4
        assert is_current(version_dir, version)


def test_session_signature_matches_manifest(repository: Path, fresh: Dataset) -> None:
    for version in VERSIONS:
        manifest = ModelManifest.read(repository / "fraud" / version)
        session = _session(repository, version)
        (only_input,) = session.get_inputs()
        assert only_input.name == manifest.input.name
        assert only_input.type == "tensor(float)"
        assert len(only_input.shape) == 2 and only_input.shape[1] == len(manifest.features)
        assert [o.name for o in session.get_outputs()] == [o.name for o in manifest.outputs]
        results = session.run(None, {manifest.input.name: fresh[0][:3]})
        for spec, value in zip(manifest.outputs, results, strict=True):
            assert np.asarray(value).dtype == np.dtype(spec.dtype)
        label, probabilities = (np.asarray(r) for r in results)
        assert label.shape == (3,) and probabilities.shape == (3, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_each_version_has_a_checked_explainer_and_validation(
    repository: Path, fresh: Dataset
) -> None:
    for version in VERSIONS:
        version_dir = repository / "fraud" / version
        manifest = ModelManifest.read(version_dir)
        explainer = load_explainer(version_dir, manifest, rows=fresh[0][:256])
        assert explainer is not None
        (margin,) = _session(repository, version).run(["probabilities"], {"features": fresh[0][:5]})
        explained = explainer.transform(explainer.explain(fresh[0][:5]).margin)
        np.testing.assert_allclose(explained, np.asarray(margin)[:, 1], atol=1e-5)
        for name in (REPORT_FILE, PROFILE_FILE, "model_card.md", HOLDOUT_FILE):
            assert (version_dir / name).is_file(), (version, name)
        verify_report(version_dir)


# --- idempotence and reproducibility ---------------------------------------------------


def test_second_build_without_force_writes_nothing(repository: Path) -> None:
    before = _mtimes(repository)
    assert build_demo_repository(repository, n_rows=N_ROWS) == []
    assert _mtimes(repository) == before


def test_force_rebuild_reproduces_the_same_bytes(repository: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repository, copy)
    before = _mtimes(copy)
    written = build_demo_repository(copy, force=True, n_rows=N_ROWS, validate=False)
    assert written == [copy / "fraud" / v for v in VERSIONS]
    for version in VERSIONS:
        original = ModelManifest.read(repository / "fraud" / version)
        rebuilt = ModelManifest.read(copy / "fraud" / version)
        assert rebuilt.sha256 == original.sha256 == sha256_of(copy / "fraud" / version / MODEL_FILE)
        assert rebuilt.explainer is not None and rebuilt.explainer == original.explainer
        for name in (rebuilt.explainer.path, HOLDOUT_FILE):
            assert sha256_of(copy / "fraud" / version / name) == sha256_of(
                repository / "fraud" / version / name
            )
    assert _mtimes(copy) != before
    assert sorted(p.name for p in (copy / "fraud").iterdir()) == list(VERSIONS)  # no staging


def test_tampered_version_is_rebuilt(repository: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repository, copy)
    model = copy / "fraud" / "1" / MODEL_FILE
    model.write_bytes(model.read_bytes() + b"\0")
    (copy / "fraud" / "2" / MANIFEST_FILE).write_text("{not json")
    assert not is_current(model.parent, "1")
    assert not is_current(copy / "fraud" / "2", "2")
    written = build_demo_repository(
        copy, n_rows=N_ROWS, specs=demo_version_specs(N_ROWS)[:1], validate=False
    )
    assert written == [model.parent]
    assert sha256_of(model) == ModelManifest.read(repository / "fraud" / "1").sha256


def test_main_models_demo_reports_and_returns_status(
    repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repository, copy)
    caplog.set_level(logging.INFO, logger="demo.train")
    # Different n_rows does not matter: current versions are skipped, not retrained.
    assert main_models_demo(copy, force=False) == 0
    assert "up to date" in caplog.text

    def refuse(repository: Path, *, force: bool = False, n_rows: int = 0) -> list[Path]:
        raise ExportCheckError("differs")

    monkeypatch.setattr(train, "build_demo_repository", refuse)
    assert main_models_demo(copy, force=True) == 1
    assert "refused" in caplog.text
