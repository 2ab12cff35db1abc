"""The two TreeSHAP engines agree with each other and with the trees, on every split mode.

Random ensembles with few features (so features repeat along a path), thresholds on a
small grid (so rows land exactly on them), every ONNX branch mode and NaN routing:
the subset-table engine (interval splits) and the polynomial engine must give the same
attributions, and attributions plus the base value must equal the ensemble's margin.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from server.explain.paths import decompose
from server.explain.subsets import MAX_DEPTH, intervals
from server.explain.trees import MODES, TreeEnsemble
from server.explain.treeshap import PathTable

F64 = npt.NDArray[np.float64]
GRID = np.array([-1.5, 0.0, 0.25, 1.0, 3.0], dtype=np.float32)
INTERVAL_MODES = tuple(
    MODES.index(m) for m in ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT")
)
ALL_MODES = tuple(range(1, len(MODES)))


def random_ensemble(
    seed: int,
    modes: tuple[int, ...],
    n_trees: int = 12,
    n_features: int = 4,
    depth: int = 7,
    chain: bool = False,
) -> tuple[TreeEnsemble, F64]:
    """An ensemble of random trees and additive node covers; a ``chain`` tree's false
    children are leaves and it splits on feature ``level`` at each level (long paths)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[float]] = {
        k: [] for k in ("tree", "feature", "threshold", "mode", "true", "false", "nan", "value")
    }
    covers: list[float] = []

    def grow(tree: int, level: int, cover: float, leaf: bool = False) -> int:
        node = len(covers)
        covers.append(cover)
        leaf = leaf or level == depth or (not chain and level > 1 and rng.random() < 0.15)
        feature = level % n_features if chain else int(rng.integers(n_features))
        for key, value in (
            ("tree", tree),
            ("feature", -1 if leaf else feature),
            ("threshold", 0.0 if leaf else float(rng.choice(GRID))),
            ("mode", 0 if leaf else int(rng.choice(modes))),
            ("true", -1),
            ("false", -1),
            ("nan", bool(rng.random() < 0.5)),
            ("value", float(rng.normal()) if leaf else 0.0),
        ):
            columns[key].append(value)
        if not leaf:
            share = cover * float(rng.uniform(0.05, 0.95))
            columns["true"][node] = grow(tree, level + 1, share)
            columns["false"][node] = grow(tree, level + 1, cover - share, leaf=chain)
        return node

    for tree in range(n_trees):
        grow(tree, 0, 1000.0)
    ensemble = TreeEnsemble(
        n_features=n_features,
        tree=np.array(columns["tree"], dtype=np.int64),
        feature=np.array(columns["feature"], dtype=np.int64),
        threshold=np.array(columns["threshold"], dtype=np.float64),
        mode=np.array(columns["mode"], dtype=np.int64),
        true_child=np.array(columns["true"], dtype=np.int64),
        false_child=np.array(columns["false"], dtype=np.int64),
        missing_true=np.array(columns["nan"], dtype=bool),
        value=np.array(columns["value"], dtype=np.float64),
        base_value=0.5,
        post_transform="NONE",
        target=0,
    )
    ensemble.validate()
    return ensemble, np.array(covers)


def rows_on_the_grid(n_features: int, n: int = 400, seed: int = 7) -> F64:
    """Rows on, just above and just below the thresholds (float32 steps and a float64
    step that float32 rounds away), a few NaNs."""
    rng = np.random.default_rng(seed)
    up = np.nextafter(GRID, np.float32(np.inf))
    down = np.nextafter(GRID, np.float32(-np.inf))
    candidates = np.concatenate([GRID, up, down]).astype(np.float64)
    candidates = np.concatenate([candidates, GRID.astype(np.float64) + 1e-12, [-9.0, 9.0]])
    x = rng.choice(candidates, size=(n, n_features))
    x[rng.random(x.shape) < 0.08] = np.nan
    return x


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_subset_tables_equal_the_polynomial_and_the_margin(seed: int) -> None:
    ensemble, covers = random_ensemble(seed, INTERVAL_MODES)
    x = rows_on_the_grid(ensemble.n_features)
    # the numpy engine: exact float64 (the compiled one, float32 tables, is checked
    # against it in test_compiled_lookup.py)
    tables = PathTable.build(ensemble, covers, compiled=False)
    polynomial = PathTable.build(ensemble, covers, subset_budget=0)
    paths, _ = decompose(ensemble, covers)
    assert tables.subset_paths == sum(1 for p in paths if p.depth) > 0
    assert polynomial.subset_paths == 0
    phi = tables.shap_values(x)
    np.testing.assert_allclose(phi, polynomial.shap_values(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi.sum(1) + tables.base_value, ensemble.margin(x), atol=1e-12)


def test_equality_splits_go_to_the_polynomial_and_a_budget_splits_the_paths() -> None:
    ensemble, covers = random_ensemble(4, ALL_MODES)
    x = rows_on_the_grid(ensemble.n_features)
    reference = PathTable.build(ensemble, covers, subset_budget=0).shap_values(x)
    everything = PathTable.build(ensemble, covers, compiled=False)
    some = PathTable.build(ensemble, covers, subset_budget=64, compiled=False)
    paths, _ = decompose(ensemble, covers)
    players = sum(1 for p in paths if p.depth)
    assert 0 < some.subset_paths < everything.subset_paths < players
    for table in (everything, some):
        assert len(table.engines) == 2
        np.testing.assert_allclose(table.shap_values(x), reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        reference.sum(1) + everything.base_value, ensemble.margin(x), atol=1e-12
    )


def test_intervals_match_the_branch_tests() -> None:
    ensemble, _ = random_ensemble(5, INTERVAL_MODES, n_trees=3)
    x = rows_on_the_grid(ensemble.n_features).astype(np.float32)
    internal = np.flatnonzero(ensemble.mode != 0)
    taken = ensemble.branch_true(x, internal)
    for column, node in enumerate(internal.tolist()):
        for went_true in (True, False):
            bounds = intervals(ensemble, [(node, went_true)])
            assert bounds is not None
            lo, hi, nan_ok = bounds
            values = x[:, ensemble.feature[node]]
            inside = ((values >= lo) & (values <= hi)) | (np.isnan(values) & nan_ok)
            np.testing.assert_array_equal(inside, taken[:, column] == went_true)


def test_a_path_too_long_for_a_table_goes_to_the_polynomial() -> None:
    ensemble, covers = random_ensemble(
        6, INTERVAL_MODES, n_trees=2, n_features=24, depth=20, chain=True
    )
    paths, _ = decompose(ensemble, covers)
    long = sum(1 for p in paths if p.depth > MAX_DEPTH)
    assert long > 0
    table = PathTable.build(ensemble, covers, compiled=False)
    assert table.subset_paths == sum(1 for p in paths if 0 < p.depth <= MAX_DEPTH)
    x = rows_on_the_grid(ensemble.n_features, n=50)
    np.testing.assert_allclose(
        table.shap_values(x).sum(1) + table.base_value, ensemble.margin(x), atol=1e-12
    )


def test_the_served_engine_with_long_paths_sums_to_the_margin() -> None:
    """The default build (compiled float32 tables where built, the polynomial for paths
    too long for a table) still sums to the margin, to float32 tolerance."""
    ensemble, covers = random_ensemble(
        6, INTERVAL_MODES, n_trees=2, n_features=24, depth=20, chain=True
    )
    table = PathTable.build(ensemble, covers)
    assert len(table.engines) == 2
    x = rows_on_the_grid(ensemble.n_features, n=50)
    margin = ensemble.margin(x)
    scale = max(1.0, float(np.abs(margin).max()))
    np.testing.assert_allclose(
        table.shap_values(x).sum(1) + table.base_value, margin, atol=1e-6 * scale
    )
