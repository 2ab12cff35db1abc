"""The explainer artifact: trees and covers beside ``model.onnx``, written by training.

``explainer.json`` holds the tree ensemble read from the ONNX graph (so the explainer
is self-contained and can be checked against the graph at load) plus the one thing the
graph lacks, each node's *cover* (training rows through it). It is written by
:func:`write_explainer`, which any training pipeline calls after exporting the model,
and described in the manifest by the :class:`~server.manifest.ExplainerSpec` it returns.
The bytes are deterministic (sorted keys, exact float repr), so a reproducible model
gives a reproducible explainer sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from server.explain.paths import check_covers
from server.explain.trees import LEAF, TreeEnsemble, read_tree_ensemble
from server.manifest import ExplainerSpec, sha256_of

F64 = npt.NDArray[np.float64]

EXPLAINER_FILE: Final = "explainer.json"
FORMAT: Final = 1
KIND: Final = "tree_shap"


def lightgbm_covers(booster: Any, ensemble: TreeEnsemble) -> F64:
    """Node covers from a LightGBM booster (``internal_count`` / ``leaf_count``).

    Walks each LightGBM tree beside the ONNX tree (left child = true branch) and
    raises ``ValueError`` naming the first node whose split feature differs.
    """
    dumped = booster.dump_model()["tree_info"]
    roots = ensemble.roots.tolist()
    if len(dumped) != len(roots):
        raise ValueError(f"booster has {len(dumped)} trees, the ONNX graph {len(roots)}")
    covers = np.zeros(ensemble.n_nodes, dtype=np.float64)
    for tree, root in zip(dumped, roots, strict=True):
        stack: list[tuple[dict[str, Any], int]] = [(tree["tree_structure"], root)]
        while stack:
            node, index = stack.pop()
            if "split_index" in node:
                if ensemble.mode[index] == LEAF or ensemble.feature[index] != node["split_feature"]:
                    raise ValueError(f"tree {tree['tree_index']}: ONNX node {index} differs")
                covers[index] = float(node["internal_count"])
                stack.append((node["left_child"], int(ensemble.true_child[index])))
                stack.append((node["right_child"], int(ensemble.false_child[index])))
            else:
                if ensemble.mode[index] != LEAF:
                    raise ValueError(f"tree {tree['tree_index']}: ONNX node {index} differs")
                covers[index] = float(node["leaf_count"])
    return covers


def data_covers(ensemble: TreeEnsemble, rows: npt.NDArray[np.floating[Any]]) -> F64:
    """Node covers counted by routing ``rows`` (e.g. the training set) through the trees.

    Works for any ONNX tree ensemble; every node must be reached by some row.
    """
    leaves = ensemble.leaves_of(np.asarray(rows)).reshape(-1)
    covers = np.bincount(leaves, minlength=ensemble.n_nodes).astype(np.float64)
    parent = np.full(ensemble.n_nodes, -1, dtype=np.int64)
    internal = np.flatnonzero(ensemble.mode != LEAF)
    parent[ensemble.true_child[internal]] = internal
    parent[ensemble.false_child[internal]] = internal
    # children before parents: deeper nodes first
    depth = np.zeros(ensemble.n_nodes, dtype=np.int64)
    at = parent.copy()
    while (at >= 0).any():
        depth += at >= 0
        at = np.where(at >= 0, parent[np.maximum(at, 0)], -1)
    for level in range(int(depth.max()), 0, -1):
        nodes = np.flatnonzero(depth == level)
        np.add.at(covers, parent[nodes], covers[nodes])
    return covers


def explainer_document(
    ensemble: TreeEnsemble, covers: F64, model_sha256: str, covers_source: str
) -> dict[str, Any]:
    """The JSON document :func:`write_explainer` writes (checks the covers)."""
    check_covers(ensemble, covers)
    return {
        "format": FORMAT,
        "kind": KIND,
        "model_sha256": model_sha256,
        "covers_source": covers_source,
        "trees": ensemble.to_arrays(),
        "covers": covers.tolist(),
    }


def write_explainer(
    model_path: Path,
    *,
    score_index: int = 1,
    booster: Any = None,
    rows: npt.NDArray[np.floating[Any]] | None = None,
    file_name: str = EXPLAINER_FILE,
) -> ExplainerSpec:
    """Write the explainer for ``model_path`` (an ONNX tree ensemble) beside it.

    Covers come from the trained LightGBM ``booster`` (exact, as LightGBM's own
    ``pred_contrib``) or, for any other trainer, from routing training ``rows`` through
    the trees. Returns the manifest entry (path, sha256, kind).
    """
    import onnx

    if (booster is None) == (rows is None):
        raise ValueError("give exactly one of booster= or rows= for the covers")
    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].dim_value:
        raise ValueError("the model input must be [N, F] with a fixed F")
    ensemble = read_tree_ensemble(model, int(dims[1].dim_value), score_index)
    if booster is not None:
        covers, source = lightgbm_covers(booster, ensemble), "lightgbm internal/leaf counts"
    else:
        assert rows is not None
        covers, source = data_covers(ensemble, rows), f"{len(rows)} rows routed"
    document = explainer_document(ensemble, covers, sha256_of(model_path), source)
    path = model_path.parent / file_name
    path.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n")
    return ExplainerSpec(kind=KIND, path=file_name, sha256=sha256_of(path))
