"""Small ONNX models built in tests, with manifests, for fast server tests.

``write_linear_model`` builds ``p = sigmoid(x @ w + b)`` with outputs ``label``
(int64 [N]) and ``probabilities`` (float32 [N, 2]), the same interface as the demo
models. ``slow_layers`` adds square MatMul layers whose result is multiplied by
zero and added back, so the score is unchanged but each batch takes time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.manifest import MODEL_FILE, ModelManifest, TensorSpec, TrainingInfo, sha256_of


def linear_scores(
    rows: npt.NDArray[np.float32], weights: npt.NDArray[np.float32], bias: float
) -> npt.NDArray[np.float64]:
    """Reference P(positive) of the linear model, computed with numpy."""
    logits = rows.astype(np.float64) @ weights.astype(np.float64) + bias
    return 1.0 / (1.0 + np.exp(-logits))


def write_linear_model(
    repository: Path,
    name: str,
    version: str,
    features: list[str],
    *,
    seed: int = 0,
    slow_layers: int = 0,
    slow_width: int = 1024,
    nan_allowed: frozenset[str] = frozenset(),
    weight_scale: float = 1.0,
) -> tuple[Path, npt.NDArray[np.float32], float]:
    """Write ``repository/name/version`` and return (dir, weights, bias)."""
    rng = np.random.default_rng(seed)
    width = len(features)
    weights = (rng.normal(size=width) / np.sqrt(width) * weight_scale).astype(np.float32)
    bias = float(rng.normal() * 0.1)
    initializers = [
        numpy_helper.from_array(weights.reshape(width, 1), "w"),
        numpy_helper.from_array(np.array([bias], dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logit0"]),
    ]
    logit = "logit0"
    if slow_layers:
        initializers.append(
            numpy_helper.from_array(
                rng.normal(size=(width, slow_width)).astype(np.float32), "slow_in"
            )
        )
        initializers.append(
            numpy_helper.from_array(
                (rng.normal(size=(slow_width, slow_width)) / slow_width).astype(np.float32),
                "slow_w",
            )
        )
        initializers.append(numpy_helper.from_array(np.zeros((slow_width, 1), np.float32), "zero"))
        nodes.append(helper.make_node("MatMul", ["features", "slow_in"], ["h0"]))
        for layer in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"h{layer}", "slow_w"], [f"h{layer + 1}"]))
        nodes.append(helper.make_node("MatMul", [f"h{slow_layers}", "zero"], ["slow_zero"]))
        nodes.append(helper.make_node("Add", ["logit0", "slow_zero"], ["logit1"]))
        logit = "logit1"
    nodes += [
        helper.make_node("Sigmoid", [logit], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1),
        helper.make_node("Greater", ["p1", "half"], ["above"]),
        helper.make_node("Cast", ["above"], ["label_2d"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["label_2d", "flat"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"{name}_{version}",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    version_dir = repository / name / version
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version_dir / MODEL_FILE))
    ModelManifest(
        name=name,
        version=version,
        features=tuple(features),
        input=TensorSpec(name="features", dtype="float32"),
        outputs=(
            TensorSpec(name="label", dtype="int64"),
            TensorSpec(name="probabilities", dtype="float32"),
        ),
        score_output="probabilities",
        score_index=1,
        nan_allowed=nan_allowed,
        sha256=sha256_of(version_dir / MODEL_FILE),
        training=TrainingInfo(
            data_snapshot="test", code_commit="test", created_at=datetime.now(UTC)
        ),
    ).write(version_dir)
    return version_dir, weights, bias
