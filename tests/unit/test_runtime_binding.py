"""OnnxModel runs the session through ORT's binding, or its public run when absent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.runtime import RuntimeOptions, _session_run, load_version
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores, write_linear_model


def test_run_sync_answers_what_session_run_answers(tmp_path: Path) -> None:
    version_dir, weights, bias = write_linear_model(tmp_path, "m", "1", list(TEST_FEATURES))
    model = load_version(version_dir, RuntimeOptions())
    rows = np.random.default_rng(0).random((3, len(TEST_FEATURES)), dtype=np.float32)
    outputs = model.run_sync(rows)
    names = [o.name for o in model.manifest.outputs]
    expected = model._session.run(names, {model.manifest.input.name: rows})
    assert list(outputs) == names
    for name, value in zip(names, expected, strict=True):
        np.testing.assert_array_equal(outputs[name], value)
    score = outputs[model.manifest.score_output]
    column = score[:, model.manifest.score_index] if score.ndim == 2 else score
    np.testing.assert_allclose(column, linear_scores(rows, weights, bias), rtol=1e-5)


def test_a_session_without_the_binding_runs_through_its_public_method() -> None:
    calls: list[tuple[Any, ...]] = []

    class Session:
        def run(self, *args: Any) -> list[Any]:
            calls.append(args)
            return []

    session = Session()
    _session_run(session)(["out"], {"in": 1}, None)
    assert calls == [(["out"], {"in": 1}, None)]
