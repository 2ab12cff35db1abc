"""Explainer core: exact attributions of the ONNX model's margin, refused artifacts, reasons."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from demo import train
from demo.synthetic import DEMO_FEATURES, generate_dataset
from server.explain.artifact import EXPLAINER_FILE, data_covers, lightgbm_covers, write_explainer
from server.explain.explainer import ExplainerError, TreeExplainer, load_explainer
from server.explain.reasons import ReasonCatalogue, ReasonSpec
from server.explain.trees import read_tree_ensemble
from server.manifest import (
    MODEL_FILE,
    ExplainerSpec,
    ModelManifest,
    TensorSpec,
    TrainingInfo,
    sha256_of,
)

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Version:
    directory: Path
    manifest: ModelManifest
    trained: train.TrainedVersion


def _write(root: Path, spec: train.DemoVersionSpec) -> Version:
    trained = train.train_version(spec)
    directory = root / "fraud" / spec.version
    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(trained.onnx_bytes)
    explainer = write_explainer(directory / MODEL_FILE, booster=trained.classifier.booster_)
    manifest = ModelManifest(
        name="fraud",
        version=spec.version,
        features=DEMO_FEATURES,
        input=TensorSpec(name="features", dtype="float32"),
        outputs=(
            TensorSpec(name="label", dtype="int64"),
            TensorSpec(name="probabilities", dtype="float32"),
        ),
        score_output="probabilities",
        sha256=sha256_of(directory / MODEL_FILE),
        training=TrainingInfo(data_snapshot="s", code_commit="c", created_at=datetime.now(UTC)),
        explainer=explainer,
    )
    manifest.write(directory)
    return Version(directory, manifest, trained)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Version, Version]:
    root = tmp_path_factory.mktemp("models")
    return (
        _write(root, train.DemoVersionSpec(version="1", seed=11, n_rows=4_000, n_estimators=25)),
        _write(
            root,
            train.DemoVersionSpec(
                version="2", seed=22, n_rows=5_000, n_estimators=40, num_leaves=15
            ),
        ),
    )


@pytest.fixture(scope="module")
def rows() -> F32:
    x, _ = generate_dataset(300, seed=4242)
    x[::7, 3] = np.nan  # missing values follow each node's default branch
    return x


def _onnx_margin(version: Version, x: F32) -> npt.NDArray[np.float64]:
    """The model's own raw output: logit of its served P(fraud)."""
    session = ort.InferenceSession(
        str(version.directory / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(["probabilities"], {"features": x})
    p = np.asarray(probabilities, dtype=np.float64)[:, 1]
    return np.log(p / (1.0 - p))


def _load(version: Version) -> TreeExplainer:
    explainer = load_explainer(version.directory, version.manifest)
    assert explainer is not None
    return explainer


def test_attributions_plus_base_equal_the_onnx_margin(
    versions: tuple[Version, Version], rows: F32
) -> None:
    for version in versions:
        explanation = _load(version).explain(rows)
        assert explanation.values.shape == (len(rows), len(DEMO_FEATURES))
        # logit(p) of a float32 p is only good to ~1e-7 / (p (1-p)); keep rows where it is sharp
        margin = _onnx_margin(version, rows)
        sharp = np.abs(margin) < 6
        assert sharp.sum() > 100
        np.testing.assert_allclose(explanation.margin[sharp], margin[sharp], atol=2e-4)


def test_attributions_equal_lightgbm_pred_contrib(
    versions: tuple[Version, Version], rows: F32
) -> None:
    for version in versions:
        explanation = _load(version).explain(rows)
        reference = version.trained.classifier.booster_.predict(rows, pred_contrib=True)
        np.testing.assert_allclose(explanation.values, reference[:, :-1], atol=1e-5)
        assert explanation.base_value == pytest.approx(reference[0, -1], abs=1e-5)


def test_one_row_equals_the_same_row_in_a_batch(
    versions: tuple[Version, Version], rows: F32
) -> None:
    explainer = _load(versions[1])
    batch = explainer.explain(rows[:64]).values
    for i in (0, 17, 63):
        np.testing.assert_allclose(explainer.explain(rows[i : i + 1]).values[0], batch[i])


def test_covers_from_training_rows_equal_lightgbm_counts(versions: tuple[Version, Version]) -> None:
    import onnx

    version = versions[0]
    spec = version.trained.spec
    x, y = generate_dataset(spec.n_rows, spec.seed)
    (x_train, _), _, _ = train._split(x, y, spec.seed)
    model = onnx.load(str(version.directory / MODEL_FILE))
    ensemble = read_tree_ensemble(model, len(DEMO_FEATURES), 1)
    booster = version.trained.classifier.booster_
    np.testing.assert_array_equal(
        data_covers(ensemble, x_train), lightgbm_covers(booster, ensemble)
    )


def test_a_model_without_an_explainer_loads_none(versions: tuple[Version, Version]) -> None:
    version = versions[0]
    bare = version.manifest.model_copy(update={"explainer": None})
    assert load_explainer(version.directory, bare) is None


def _tampered(version: Version, tmp_path: Path, edit: Any) -> tuple[Path, ModelManifest]:
    """A copy of the version whose explainer document went through ``edit``, resealed."""
    directory = tmp_path / version.manifest.version
    directory.mkdir()
    (directory / MODEL_FILE).write_bytes((version.directory / MODEL_FILE).read_bytes())
    document = json.loads((version.directory / EXPLAINER_FILE).read_text())
    edit(document)
    (directory / EXPLAINER_FILE).write_text(json.dumps(document))
    spec = ExplainerSpec(
        kind="tree_shap", path=EXPLAINER_FILE, sha256=sha256_of(directory / EXPLAINER_FILE)
    )
    return directory, version.manifest.model_copy(update={"explainer": spec})


def test_wrong_checksum_is_refused_naming_the_version(
    versions: tuple[Version, Version], tmp_path: Path
) -> None:
    directory, manifest = _tampered(versions[0], tmp_path, lambda d: None)
    with (directory / EXPLAINER_FILE).open("a") as handle:
        handle.write(" ")
    with pytest.raises(ExplainerError, match=r"fraud/1: .*sha256"):
        load_explainer(directory, manifest)


def test_wrong_trees_are_refused(versions: tuple[Version, Version], tmp_path: Path) -> None:
    def nudge_a_leaf(document: dict[str, Any]) -> None:
        values = document["trees"]["value"]
        leaf = next(i for i, v in enumerate(values) if v != 0.0)
        values[leaf] += 0.01

    directory, manifest = _tampered(versions[0], tmp_path, nudge_a_leaf)
    with pytest.raises(ExplainerError, match=r"fraud/1: .*the model's margin"):
        load_explainer(directory, manifest)


def test_another_models_explainer_is_refused(
    versions: tuple[Version, Version], tmp_path: Path
) -> None:
    v1, v2 = versions
    other = json.loads((v2.directory / EXPLAINER_FILE).read_text())

    def swap(document: dict[str, Any]) -> None:
        document.update(other, model_sha256=v1.manifest.sha256)  # claims v1, holds v2's trees

    directory, manifest = _tampered(v1, tmp_path, swap)
    with pytest.raises(ExplainerError, match=r"fraud/1: .*margin"):
        load_explainer(directory, manifest)


def test_artifact_for_another_model_file_is_refused(
    versions: tuple[Version, Version], tmp_path: Path
) -> None:
    def other_sha(document: dict[str, Any]) -> None:
        document["model_sha256"] = "0" * 64

    directory, manifest = _tampered(versions[0], tmp_path, other_sha)
    with pytest.raises(ExplainerError, match="written for model 0000"):
        load_explainer(directory, manifest)


def test_explainer_bytes_are_reproducible(
    versions: tuple[Version, Version], tmp_path: Path
) -> None:
    version = versions[0]
    (tmp_path / MODEL_FILE).write_bytes((version.directory / MODEL_FILE).read_bytes())
    spec = write_explainer(tmp_path / MODEL_FILE, booster=version.trained.classifier.booster_)
    assert spec == version.manifest.explainer


def test_manifest_refuses_an_explainer_path_outside_the_version() -> None:
    for path in ("..", MODEL_FILE, "a/b"):
        with pytest.raises(ValueError, match="path"):
            ExplainerSpec(kind="tree_shap", path=path, sha256="0" * 64)


# --- reasons ------------------------------------------------------------------------------

FEATURES = ("amount", "amount_vs_avg", "velocity_5m", "velocity_1h", "hour", "intl")


def _catalogue() -> ReasonCatalogue:
    return ReasonCatalogue.from_mapping(
        {
            "R01": {
                "text": "Amount unusual for this customer",
                "features": ["amount", "amount_vs_avg"],
            },
            "R02": {
                "text": "Many transactions in a short time",
                "features": ["velocity_5m", "velocity_1h"],
            },
            "R03": {"text": "Unusual time of day", "features": ["hour"]},
            "R04": {"text": "International transaction", "features": ["intl"]},
        },
        FEATURES,
    )


def test_reasons_sum_correlated_features_and_rank_toward_adverse() -> None:
    catalogue = _catalogue()
    values = np.array(
        [
            [0.5, 0.25, 0.1, 0.2, -1.0, 0.05],  # R01 0.75, R02 0.3, R04 0.05, R03 < 0
            [-0.5, 0.1, -0.2, -0.1, -0.3, -0.1],  # nothing pushes toward fraud
        ]
    )
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    first, second = catalogue.top(values, x)
    assert [r.code for r in first] == ["R01", "R02", "R04"]
    assert first[0].contribution == pytest.approx(0.75)
    assert first[0].text == "Amount unusual for this customer"
    assert [(f.name, f.value, f.contribution) for f in first[0].features] == [
        ("amount", 0.0, 0.5),
        ("amount_vs_avg", 1.0, 0.25),
    ]
    assert second == []


def test_top_n_limits_and_array_form() -> None:
    catalogue = _catalogue()
    values = np.array([[0.1, 0.0, 0.4, 0.0, 0.3, 0.2]])
    assert [r.code for r in catalogue.top(values, values, top_n=2)[0]] == ["R02", "R03"]
    assert len(catalogue.top(values, values)[0]) == 4  # default 4
    ranked = catalogue.rank(values, top_n=3)
    assert ranked.index.tolist() == [[1, 2, 3]]
    np.testing.assert_allclose(ranked.contribution, [[0.4, 0.3, 0.2]])
    with pytest.raises(ValueError, match="top_n"):
        catalogue.rank(values, top_n=0)


def test_top_agrees_with_rank_ties_included() -> None:
    """top() ranks on Python floats; it must pick rank()'s reasons, in rank()'s order
    (equal contributions in catalogue order), with rank()'s summed contributions."""
    catalogue = _catalogue()
    rng = np.random.default_rng(3)
    values = rng.choice([-0.2, 0.0, 0.1, 0.25], size=(200, 6))  # many ties
    x = rng.normal(size=(200, 6)).astype(np.float32)
    ranked = catalogue.rank(values, top_n=3)
    for row, reasons in enumerate(catalogue.top(values, x, top_n=3)):
        keep = ~np.isnan(ranked.contribution[row])
        assert [r.code for r in reasons] == [
            catalogue.reasons[k].code for k in ranked.index[row][keep].tolist()
        ]
        assert [r.contribution for r in reasons] == ranked.contribution[row][keep].tolist()


def test_catalogue_must_cover_each_feature_once() -> None:
    with pytest.raises(ValueError, match=r"without a reason code: \['intl'\]"):
        ReasonCatalogue.build([ReasonSpec(code="A", text="a", features=FEATURES[:-1])], FEATURES)
    with pytest.raises(ValueError, match="'hour' is in more than one reason"):
        ReasonCatalogue.build(
            [
                ReasonSpec(code="A", text="a", features=FEATURES),
                ReasonSpec(code="B", text="b", features=("hour",)),
            ],
            FEATURES,
        )
    with pytest.raises(ValueError, match=r"unknown features \['nope'\]"):
        ReasonCatalogue.build([ReasonSpec(code="A", text="a", features=("nope",))], FEATURES)


def test_reasons_of_a_real_explanation(versions: tuple[Version, Version], rows: F32) -> None:
    explainer = _load(versions[1])
    explanation = explainer.explain(rows[:64])
    catalogue = ReasonCatalogue.build(
        [
            ReasonSpec(code=f"R{i:02d}", text=name, features=(name,))
            for i, name in enumerate(DEMO_FEATURES)
        ],
        DEMO_FEATURES,
    )
    for row, reasons in enumerate(catalogue.top(explanation.values, rows[:64])):
        contributions = [r.contribution for r in reasons]
        assert contributions == sorted(contributions, reverse=True)
        assert all(c > 0 for c in contributions) and len(reasons) <= 4
        positive = np.sort(explanation.values[row][explanation.values[row] > 0])[::-1][:4]
        np.testing.assert_allclose(contributions, positive)


async def test_a_calls_rows_are_one_job_and_each_call_gets_its_own(
    versions: tuple[Version, Version], rows: F32
) -> None:
    """``VersionReasons.explain`` takes a call's rows as one job; concurrent calls are
    explained in one batch and each gets exactly the reasons of its own rows, in order.
    A job as large as the scoring batch fits (``explain_batching``)."""
    import asyncio

    from server.batcher import BatchPolicy
    from server.explain.service import (
        EXPLAIN_BATCH,
        ReasonPolicy,
        VersionReasons,
        explain_batching,
    )

    catalogue = ReasonCatalogue.build(
        [ReasonSpec(code=name, text=name, features=(name,)) for name in DEMO_FEATURES],
        DEMO_FEATURES,
    )
    scoring = BatchPolicy(max_batch_size=256, max_queue_size=512, max_queue_rows=1024)
    batching = explain_batching(scoring, max_queue_size=8)
    assert (batching.max_batch_size, batching.max_queue_size) == (256, 8)
    assert batching.max_queue_rows == 1024
    assert explain_batching(BatchPolicy(max_batch_size=8), 8).max_batch_size == EXPLAIN_BATCH
    reasons = VersionReasons(_load(versions[1]), catalogue, ReasonPolicy(top_n=3), batching)
    reasons.start()
    try:
        calls = [rows[0:1], rows[1:6], rows[6:9], rows[9:209]]
        answers = await asyncio.gather(*(reasons.explain(call, None) for call in calls))
        for call, answer in zip(calls, answers, strict=True):
            expected = reasons.explain_now(call)
            assert len(answer) == len(expected) == len(call)
            for mine, theirs in zip(answer, expected, strict=True):
                assert [r.code for r in mine.reasons] == [r.code for r in theirs.reasons]
                assert mine.base_value == pytest.approx(theirs.base_value)
                np.testing.assert_allclose(_numbers(mine), _numbers(theirs), atol=1e-9)
    finally:
        await reasons.close()


def _numbers(explained: Any) -> list[float]:
    """Every number of one row's reasons (contributions and feature values; NaN kept)."""
    return [
        number
        for reason in explained.reasons
        for number in (
            reason.contribution,
            *(v for f in reason.features for v in (f.value, f.contribution)),
        )
    ]
