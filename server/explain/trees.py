"""Tree ensembles read from an ONNX graph, as flat node arrays.

Reads the single ``ai.onnx.ml`` ``TreeEnsembleClassifier`` or ``TreeEnsembleRegressor``
of a model into :class:`TreeEnsemble`: one row per node, leaf weights of the one output
column being explained (the *target*), and the base value ONNX adds. Evaluating it
(:meth:`TreeEnsemble.margin`) reproduces the node's raw output before its
``post_transform`` (the *margin*; ``logit(p)`` for a LightGBM binary classifier).
Branch semantics follow ONNX Runtime: ``mode(x, threshold)`` or, when ``x`` is NaN,
the node's ``missing_value_tracks_true``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

MODES: Final = (
    "LEAF",
    "BRANCH_LEQ",
    "BRANCH_LT",
    "BRANCH_GTE",
    "BRANCH_GT",
    "BRANCH_EQ",
    "BRANCH_NEQ",
)
"""Node modes, indexed by the codes stored in :attr:`TreeEnsemble.mode`."""
LEAF: Final = 0
TREE_OPS: Final = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")
POST_TRANSFORMS: Final = ("NONE", "LOGISTIC")
"""Output transforms whose margin is explained (monotone, per column)."""
_COMPARE: Final[dict[int, Callable[[F64, F64], B]]] = {
    1: np.less_equal,
    2: np.less,
    3: np.greater_equal,
    4: np.greater,
    5: np.equal,
    6: np.not_equal,
}
"""Branch test of each internal mode (NaN is decided by ``missing_value_tracks_true``)."""


class UnsupportedModelError(ValueError):
    """The ONNX graph is not a tree ensemble this explainer can read."""


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    """Flat node arrays of one ensemble's target column (leaves hold that column's weight)."""

    n_features: int
    tree: I64
    """Tree index (0..T-1) of each node."""
    feature: I64
    """Split feature of each node (-1 for leaves)."""
    threshold: F64
    mode: I64
    """Index into :data:`MODES`."""
    true_child: I64
    """Node index taken when the condition holds (-1 for leaves)."""
    false_child: I64
    missing_true: B
    """NaN follows the true branch."""
    value: F64
    """Leaf weight for the target (0 for internal nodes)."""
    base_value: float
    """Constant ONNX adds to the target (``base_values``)."""
    post_transform: str
    target: int
    """Column of the node's score output that the margin is."""

    @property
    def n_nodes(self) -> int:
        """Number of nodes, all trees together."""
        return int(self.tree.shape[0])

    @property
    def n_trees(self) -> int:
        """Number of trees."""
        return int(self.tree.max()) + 1 if self.n_nodes else 0

    @property
    def roots(self) -> I64:
        """Index of each tree's root (the node no other node points to)."""
        child = np.zeros(self.n_nodes, dtype=bool)
        for side in (self.true_child, self.false_child):
            child[side[side >= 0]] = True
        roots = np.flatnonzero(~child).astype(np.int64)
        if roots.shape[0] != self.n_trees or np.any(np.diff(self.tree[roots]) <= 0):
            raise UnsupportedModelError("every tree must have exactly one root")
        return roots

    def branch_true(self, x: npt.NDArray[np.floating[Any]], nodes: I64) -> B:
        """``[R, len(nodes)]``: does each row take the true branch at each internal node."""
        return self.splits(nodes).taken(x)

    def splits(self, nodes: I64) -> Splits:
        """The internal ``nodes`` prepared for repeated :meth:`Splits.taken` calls."""
        mode = self.mode[nodes]
        if np.any(mode == LEAF):
            raise ValueError("splits: a leaf has no branch")
        return Splits(
            feature=self.feature[nodes],
            threshold=self.threshold[nodes],
            missing_true=self.missing_true[nodes],
            groups=tuple((int(m), np.flatnonzero(mode == m)) for m in np.unique(mode).tolist()),
        )

    def leaves_of(self, x: npt.NDArray[np.floating[Any]]) -> I64:
        """``[R, T]``: the leaf each row reaches in each tree."""
        at = np.broadcast_to(self.roots, (x.shape[0], self.n_trees)).copy()
        rows = np.arange(x.shape[0])[:, None]
        xf = np.asarray(x, dtype=np.float32).astype(np.float64)  # as ONNX Runtime reads it
        while True:
            internal = self.mode[at] != LEAF
            if not internal.any():
                return at
            nodes = at[internal]
            values = xf[np.broadcast_to(rows, at.shape)[internal], self.feature[nodes]]
            go = self._compare(values, nodes)
            at[internal] = np.where(go, self.true_child[nodes], self.false_child[nodes])

    def _compare(self, values: F64, nodes: I64) -> B:
        mode = self.mode[nodes]
        threshold = self.threshold[nodes]
        with np.errstate(invalid="ignore"):
            result = np.select(
                [mode == 1, mode == 2, mode == 3, mode == 4, mode == 5],
                [
                    values <= threshold,
                    values < threshold,
                    values >= threshold,
                    values > threshold,
                    values == threshold,
                ],
                values != threshold,
            )
        return np.where(np.isnan(values), self.missing_true[nodes], result)

    def margin(self, x: npt.NDArray[np.floating[Any]]) -> F64:
        """Raw target output (before ``post_transform``) for each row, in float64."""
        margin: F64 = self.value[self.leaves_of(x)].sum(axis=1) + self.base_value
        return margin

    def to_arrays(self) -> dict[str, Any]:
        """JSON-ready contents (see :meth:`from_arrays`)."""
        return {
            "n_features": self.n_features,
            "tree": self.tree.tolist(),
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "mode": [MODES[m] for m in self.mode.tolist()],
            "true_child": self.true_child.tolist(),
            "false_child": self.false_child.tolist(),
            "missing_true": self.missing_true.astype(int).tolist(),
            "value": self.value.tolist(),
            "base_value": self.base_value,
            "post_transform": self.post_transform,
            "target": self.target,
        }

    @classmethod
    def from_arrays(cls, data: dict[str, Any]) -> TreeEnsemble:
        """Inverse of :meth:`to_arrays`; raises ``ValueError`` naming a bad field."""
        try:
            mode = np.array([MODES.index(m) for m in data["mode"]], dtype=np.int64)
            ensemble = cls(
                n_features=int(data["n_features"]),
                tree=np.asarray(data["tree"], dtype=np.int64),
                feature=np.asarray(data["feature"], dtype=np.int64),
                threshold=np.asarray(data["threshold"], dtype=np.float64),
                mode=mode,
                true_child=np.asarray(data["true_child"], dtype=np.int64),
                false_child=np.asarray(data["false_child"], dtype=np.int64),
                missing_true=np.asarray(data["missing_true"], dtype=bool),
                value=np.asarray(data["value"], dtype=np.float64),
                base_value=float(data["base_value"]),
                post_transform=str(data["post_transform"]),
                target=int(data["target"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tree arrays: {type(exc).__name__}: {exc}") from exc
        ensemble.validate()
        return ensemble

    def validate(self) -> None:
        """Shapes, child links and feature indices are consistent; raises ``ValueError``."""
        n = self.n_nodes
        for name in ("feature", "threshold", "mode", "true_child", "false_child"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"tree arrays: {name} has shape {getattr(self, name).shape}")
        for name in ("missing_true", "value"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"tree arrays: {name} has shape {getattr(self, name).shape}")
        leaf = self.mode == LEAF
        internal = ~leaf
        for name in ("true_child", "false_child"):
            child = getattr(self, name)[internal]
            if np.any((child < 0) | (child >= n)):
                raise ValueError(f"tree arrays: {name} points outside the nodes")
            if np.any(self.tree[child] != self.tree[internal]):
                raise ValueError(f"tree arrays: {name} crosses trees")
        if np.any((self.feature[internal] < 0) | (self.feature[internal] >= self.n_features)):
            raise ValueError(f"tree arrays: feature outside 0..{self.n_features - 1}")
        if self.post_transform not in POST_TRANSFORMS:
            raise ValueError(f"tree arrays: post_transform {self.post_transform!r} unsupported")
        self.roots  # noqa: B018 - raises if a tree has no single root


@dataclass(frozen=True, eq=False)
class Splits:
    """A fixed set of internal nodes, each row's branch at all of them in a few numpy calls."""

    feature: I64
    threshold: F64
    missing_true: B
    groups: tuple[tuple[int, I64], ...]
    """``(mode, positions)`` of each mode present."""

    def taken(self, x: npt.NDArray[np.floating[Any]]) -> B:
        """``[R, nodes]``: does each row of ``x`` take each node's true branch (``x`` as
        float32, as ONNX Runtime compares)."""
        x32 = np.asarray(x, dtype=np.float32)
        values: F64 = x32[:, self.feature].astype(np.float64)
        if len(self.groups) == 1:
            result = _COMPARE[self.groups[0][0]](values, self.threshold)
        else:
            result = np.empty(values.shape, dtype=bool)
            for mode, at in self.groups:
                result[:, at] = _COMPARE[mode](values[:, at], self.threshold[at])
        if np.isnan(x32).any():
            result = np.where(np.isnan(values), self.missing_true, result)
        return result


def _attr(node: Any, name: str) -> Any:
    from onnx import helper, numpy_helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
        if attribute.name == f"{name}_as_tensor":
            return numpy_helper.to_array(helper.get_attribute_value(attribute)).tolist()
    return None


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def find_tree_node(model: Any) -> Any:
    """The one tree-ensemble node of an ``onnx.ModelProto``; it must read the graph input."""
    nodes = [n for n in model.graph.node if n.op_type in TREE_OPS and n.domain == "ai.onnx.ml"]
    if len(nodes) != 1:
        raise UnsupportedModelError(
            f"expected one ai.onnx.ml TreeEnsembleClassifier/Regressor, found {len(nodes)}"
        )
    node = nodes[0]
    inputs = [i.name for i in model.graph.input]
    if list(node.input) != inputs[:1] or len(inputs) != 1:
        raise UnsupportedModelError(f"{node.op_type} must read the single graph input directly")
    return node


def read_tree_ensemble(model: Any, n_features: int, score_index: int) -> TreeEnsemble:
    """Read the ensemble of ``model`` (``onnx.ModelProto``) for output column ``score_index``.

    For a binary classifier exported with one weight per leaf (LightGBM, XGBoost via
    onnxmltools) column 1 is the positive class and its margin is that weight sum.
    """
    node = find_tree_node(model)
    classifier = node.op_type == "TreeEnsembleClassifier"
    prefix = "class" if classifier else "target"
    post = _decode(_attr(node, "post_transform") or "NONE")
    if post not in POST_TRANSFORMS:
        raise UnsupportedModelError(f"post_transform {post!r} is not explained")
    if not classifier and _decode(_attr(node, "aggregate_function") or "SUM") != "SUM":
        raise UnsupportedModelError("only aggregate_function SUM is explained")
    tree_ids = np.asarray(_attr(node, "nodes_treeids"), dtype=np.int64)
    node_ids = np.asarray(_attr(node, "nodes_nodeids"), dtype=np.int64)
    ids = np.asarray(_attr(node, f"{prefix}_ids"), dtype=np.int64)
    target = score_index
    if classifier:
        labels = _attr(node, "classlabels_int64s") or _attr(node, "classlabels_strings") or []
        if len(labels) == 2 and set(ids.tolist()) == {0}:
            if score_index != 1:
                raise UnsupportedModelError("a binary classifier is explained for column 1")
            target = 0  # ORT: column 1 = weight sum, column 0 its complement
    base_values = _attr(node, "base_values") or []
    key = {(int(t), int(n)): i for i, (t, n) in enumerate(zip(tree_ids, node_ids, strict=True))}
    if len(key) != len(tree_ids):
        raise UnsupportedModelError("duplicate (tree, node) ids")
    trees = {t: i for i, t in enumerate(sorted(set(tree_ids.tolist())))}

    def child(name: str) -> I64:
        raw = np.asarray(_attr(node, name), dtype=np.int64)
        return np.array([key.get((int(t), int(c)), -1) for t, c in zip(tree_ids, raw, strict=True)])

    modes = [MODES.index(_decode(m)) for m in _attr(node, "nodes_modes")]
    mode = np.asarray(modes, dtype=np.int64)
    value = np.zeros(len(tree_ids), dtype=np.float64)
    weight_trees = np.asarray(_attr(node, f"{prefix}_treeids"), dtype=np.int64)
    weight_nodes = np.asarray(_attr(node, f"{prefix}_nodeids"), dtype=np.int64)
    weights = np.asarray(_attr(node, f"{prefix}_weights"), dtype=np.float32).astype(np.float64)
    for t, n, c, w in zip(weight_trees, weight_nodes, ids, weights, strict=True):
        if c == target:
            value[key[(int(t), int(n))]] += w
    missing = _attr(node, "nodes_missing_value_tracks_true") or [0] * len(tree_ids)
    leaf = mode == LEAF
    ensemble = TreeEnsemble(
        n_features=n_features,
        tree=np.array([trees[int(t)] for t in tree_ids], dtype=np.int64),
        feature=np.where(leaf, -1, np.asarray(_attr(node, "nodes_featureids"), dtype=np.int64)),
        threshold=np.where(
            leaf, 0.0, np.asarray(_attr(node, "nodes_values"), dtype=np.float32).astype(np.float64)
        ),
        mode=mode,
        true_child=np.where(leaf, -1, child("nodes_truenodeids")),
        false_child=np.where(leaf, -1, child("nodes_falsenodeids")),
        missing_true=np.asarray(missing, dtype=bool),
        value=value,
        base_value=float(np.float32(base_values[target])) if len(base_values) > target else 0.0,
        post_transform=post,
        target=target,
    )
    ensemble.validate()
    return ensemble


def margin_model(model: Any) -> Any:
    """A copy of ``model`` that outputs only its tree node's scores with ``post_transform``
    NONE: ``[N, K]`` raw margins, ONNX Runtime's own arithmetic."""
    import copy

    from onnx import helper

    node = copy.deepcopy(find_tree_node(model))
    for attribute in node.attribute:
        if attribute.name == "post_transform":
            attribute.s = b"NONE"
    scores = node.output[-1] if node.op_type == "TreeEnsembleClassifier" else node.output[0]
    graph = helper.make_graph(
        [node],
        "margin",
        list(model.graph.input),
        [helper.make_tensor_value_info(scores, 1, None)],  # 1 = FLOAT
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out
