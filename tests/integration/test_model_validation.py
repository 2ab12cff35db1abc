"""``streamscore models validate``: report, card, profile; online-path check; seal; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from server.cli import main
from server.governance.holdout import read_holdout
from server.governance.online import check_online_path
from server.governance.profile import SCORE, ReferenceProfile
from server.governance.quality import quality
from server.governance.report import REPORT_FILE, ReportError, verify_report
from server.governance.validation import write_validation_artifacts
from server.manifest import MODEL_FILE, ModelManifest
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROWS = 400


def _holdout(repository: Path, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows drawn around ``lin/2``'s own scores, so it is the better model."""
    manifest = ModelManifest.read(repository / "lin" / "2")
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(ROWS, len(TEST_FEATURES))).astype(np.float32)
    onnx_weights = _weights(repository / "lin" / "2")
    truth = linear_scores(rows, *onnx_weights)
    labels = (rng.random(ROWS) < truth).astype(np.int8)
    columns: dict[str, object] = {f: rows[:, i] for i, f in enumerate(manifest.features)}
    columns["label"] = labels
    columns["region"] = np.where(rows[:, 0] > 0.8, "north", "south")
    table = pa.table(columns)
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return rows, labels, truth


def _weights(version_dir: Path) -> tuple[np.ndarray, float]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(version_dir / MODEL_FILE)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return init["w"].reshape(-1), float(init["b"][0])


def test_validate_writes_sealed_report_card_and_profile(
    linear_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holdout = tmp_path / "holdout.parquet"
    rows, labels, truth = _holdout(linear_repository, holdout)
    code = main(
        [
            "models", "validate", "lin", "2", "--holdout", str(holdout),
            "--repository", str(linear_repository), "--segments", "region",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "online path equal" in capsys.readouterr().out
    version_dir = linear_repository / "lin" / "2"
    report = verify_report(version_dir)
    manifest = ModelManifest.read(version_dir)
    assert report["artifact"]["sha256"] == manifest.sha256
    assert report["artifact"]["size_bytes"] == (version_dir / MODEL_FILE).stat().st_size
    # metrics are those of the numpy reference scores (float32 ONNX ~ float64 numpy)
    expected = quality(labels, truth, manifest.threshold)
    assert report["metrics"]["auc"] == pytest.approx(expected.auc, abs=1e-6)
    assert report["metrics"]["recall"] == pytest.approx(expected.recall)
    assert report["metrics"]["brier"] == pytest.approx(expected.brier, abs=1e-6)
    # the champion is the highest other version, scored on the same rows
    champion = report["champion"]
    assert champion["version"] == "1"
    champion_truth = linear_scores(rows, *_weights(linear_repository / "lin" / "1"))
    assert champion["metrics"]["auc"] == pytest.approx(
        quality(labels, champion_truth, 0.5).auc, abs=1e-6
    )
    assert report["online_check"] == {
        "passed": True, "rows": ROWS, "mismatched": 0, "max_abs_diff": pytest.approx(0, abs=1e-6),
        "tolerance": 1e-6, "first_mismatches": [], "errors": [],
    }  # fmt: skip
    assert report["latency"]["batch_1"]["batch"] == 1
    assert report["latency"]["batch_64"]["p50_ms"] > 0
    regions = {r["segment"]: r for r in report["segments"]["region"]}
    assert set(regions) == {"north", "south"}
    assert sum(r["rows"] for r in regions.values()) == ROWS
    assert max(r["adverse_impact_ratio"] for r in regions.values()) == 1.0
    # the reference profile: every feature and the score, bound to the artifact
    profile = ReferenceProfile.read(version_dir)
    assert profile.artifact_sha256 == manifest.sha256 and profile.rows == ROWS
    assert set(profile.distributions) == {*TEST_FEATURES, SCORE}
    assert sum(profile.distributions["f0"].frequencies) == pytest.approx(1.0)
    card = (version_dir / "model_card.md").read_text()
    assert "# Model card: lin 2" in card and "champion 1" in card and "| north |" in card
    for png in ("calibration.png", "score_distribution.png"):
        assert (version_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_bound_to_artifact_and_its_files(linear_repository: Path, tmp_path: Path) -> None:
    holdout = tmp_path / "holdout.csv"  # CSV reads the same way
    _holdout(linear_repository, holdout)
    version_dir = linear_repository / "lin" / "2"
    result = write_validation_artifacts(version_dir, read_holdout(holdout), champion_version="1")
    assert verify_report(version_dir)["report_sha256"] == result.report_sha256

    model = version_dir / MODEL_FILE
    original = model.read_bytes()
    model.write_bytes(original + b"\0")
    with pytest.raises(ReportError, match="artifact sha256"):
        verify_report(version_dir)
    model.write_bytes(original)
    verify_report(version_dir)

    card = version_dir / "model_card.md"
    card.write_text(card.read_text() + "approved by me\n")
    with pytest.raises(ReportError, match=r"model_card\.md changed"):
        verify_report(version_dir)

    report_path = version_dir / REPORT_FILE
    sealed = json.loads(report_path.read_text())
    sealed["metrics"]["auc"] = 0.99
    report_path.write_text(json.dumps(sealed))
    with pytest.raises(ReportError, match="altered"):
        verify_report(version_dir)


def test_online_path_check_catches_a_skewed_feature(
    linear_repository: Path, tmp_path: Path
) -> None:
    holdout = tmp_path / "holdout.parquet"
    rows, _, _ = _holdout(linear_repository, holdout)
    version_dir = linear_repository / "lin" / "2"
    offline = linear_scores(rows, *_weights(version_dir))
    # what offline scoring saw, sent as is: equal
    assert check_online_path(version_dir, rows, offline).passed
    # the same holdout with one column transformed before the online call (log scale)
    skewed = rows.copy()
    skewed[:, 3] = np.log1p(np.abs(skewed[:, 3]))
    check = check_online_path(version_dir, skewed, offline)
    assert not check.passed
    assert check.mismatched > ROWS // 2 and check.max_abs_diff > 1e-3


def test_online_path_check_counts_rows_the_server_refuses(
    linear_repository: Path, tmp_path: Path
) -> None:
    rows = np.zeros((3, len(TEST_FEATURES)), dtype=np.float32)
    rows[1, 2] = np.nan  # f2 is not nan_allowed: INVALID_ARGUMENT naming features.f2
    version_dir = linear_repository / "lin" / "2"
    check = check_online_path(version_dir, rows, linear_scores(rows, *_weights(version_dir)))
    assert check.mismatched == 1 and check.first_mismatches == (1,)
    assert "row 1: INVALID_ARGUMENT" in check.errors[0] and "f2" in check.errors[0]


def test_holdout_missing_features_or_label_is_one_line_exit_2(
    linear_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holdout = tmp_path / "holdout.parquet"
    pq.write_table(
        pa.table({f: [0.0, 1.0] for f in TEST_FEATURES if f not in ("f3", "f5")}), holdout
    )
    argv = ["models", "validate", "lin", "2", "--holdout", str(holdout)]
    code = main([*argv, "--repository", str(linear_repository), "--segments", "region"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "missing" in err and "f3, f5, label, region" in err
    assert not (linear_repository / "lin" / "2" / REPORT_FILE).exists()

    assert main([*argv, "--repository", str(linear_repository / "nope")]) == 2
    assert "lin/2: no such version" in capsys.readouterr().err
    pq.write_table(
        pa.table({**{f: [0.0, 1.0] for f in TEST_FEATURES}, "label": [0.0, 2.0]}), holdout
    )
    assert main([*argv, "--repository", str(linear_repository)]) == 2
    assert "label: labels must be 0/1" in capsys.readouterr().err
