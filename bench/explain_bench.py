"""Explanation engines compared on a demo-sized fraud model: exactness and cost per row.

Trains a LightGBM classifier shaped like demo version 2 (200 trees, 31 leaves), exports
it the demo way, writes ``explainer.json`` and times, for batches of 1 and 64 rows:

* ``server.explain`` (TreeSHAP over the ONNX trees + covers from the artifact: subset
  tables per path) with the compiled lookup (as served when built) and with the numpy
  lookup (its reference and fallback), and its polynomial engine alone (the engine
  before the subset tables),
* LightGBM ``Booster.predict(pred_contrib=True)`` (needs the LightGBM model, not ONNX),
* ``shap.TreeExplainer`` on the same trees given as arrays (if ``shap`` is installed).

Exactness is the largest |difference| to LightGBM's attributions and of
``sum + base`` to the ONNX margin. Besides the per-row cost in a loop (tables and
arrays hot in the cache), ``us_per_row_cold`` is the median cost of one row after
64 MiB of other memory was written: what a served explanation pays when a few % of the
answers are explained and the rest of the server's work has evicted the tables. The
process fixes glibc's mmap threshold as the server does (:mod:`server.allocator`), so
fresh large arrays cost what they cost there. Run pinned to one core::

    taskset -c 0 .venv/bin/python -m bench.explain_bench --rows 20000 --trees 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from demo import train
from demo.synthetic import generate_dataset
from server.allocator import fix_mmap_threshold
from server.explain.artifact import write_explainer
from server.explain.trees import LEAF, TreeEnsemble
from server.explain.treeshap import PathTable

F64 = npt.NDArray[np.float64]


def _per_row_us(fn: Callable[[], Any], rows: int, min_seconds: float) -> float:
    fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 3:
            return 1e6 * elapsed / (runs * rows)


def _timed(fn: Callable[[F64], Any], batch: Any, seconds: float) -> float:
    return round(_per_row_us(lambda: fn(batch), len(batch), seconds), 1)


def _cold_us(fn: Callable[[F64], Any], x: npt.NDArray[Any], rows: int = 200) -> float:
    """Median us of one row each of ``x[:rows]``, the caches flushed before each."""
    junk = np.zeros(8 << 20)  # 64 MiB: past the L3 of the benchmark machine (32 MiB)
    times = []
    for i in range(min(rows, len(x))):
        junk += 1.0
        start = time.perf_counter()
        fn(x[i : i + 1])
        times.append(time.perf_counter() - start)
    return round(1e6 * float(np.median(times)), 1)


def _shap_explainer(ensemble: TreeEnsemble, covers: F64) -> Any:
    import shap

    trees = []
    for root in ensemble.roots.tolist():
        nodes = np.flatnonzero(ensemble.tree == ensemble.tree[root])
        local = {int(n): i for i, n in enumerate(nodes.tolist())}
        leaf = ensemble.mode[nodes] == LEAF

        def index(children: npt.NDArray[np.int64], leaf: Any = leaf, local: Any = local) -> Any:
            return np.array(
                [
                    -1 if is_leaf else local[int(c)]
                    for c, is_leaf in zip(children, leaf, strict=True)
                ]
            )

        left = index(ensemble.true_child[nodes])
        right = index(ensemble.false_child[nodes])
        default = np.where(ensemble.missing_true[nodes], left, right)
        trees.append(
            {
                "children_left": left,
                "children_right": right,
                "children_default": default,
                "features": np.where(leaf, -2, ensemble.feature[nodes]),
                "thresholds": np.where(leaf, -2.0, ensemble.threshold[nodes]),
                "values": ensemble.value[nodes][:, None],
                "node_sample_weight": covers[nodes],
            }
        )
    return shap.TreeExplainer({"trees": trees, "base_offset": ensemble.base_value})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0, help="min time per measurement")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    fix_mmap_threshold()

    spec = train.DemoVersionSpec(version="b", seed=202, n_rows=args.rows, n_estimators=args.trees)
    trained = train.train_version(spec)
    booster = trained.classifier.booster_
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(trained.onnx_bytes)
        write_explainer(model_path, booster=booster)
        document = json.loads((Path(tmp) / "explainer.json").read_text())
        size = (Path(tmp) / "explainer.json").stat().st_size
    ensemble = TreeEnsemble.from_arrays(document["trees"])
    covers = np.asarray(document["covers"], dtype=np.float64)
    start = time.perf_counter()
    table = PathTable.build(ensemble, covers)
    build_ms = 1e3 * (time.perf_counter() - start)
    numpy_table = PathTable.build(ensemble, covers, compiled=False)
    polynomial = PathTable.build(ensemble, covers, subset_budget=0)
    x, _ = generate_dataset(2_000, seed=4242)
    margin = ensemble.margin(x)
    reference = booster.predict(x, pred_contrib=True)[:, :-1]
    ours = table.shap_values(x)
    served = type(table.engines[0]).__name__
    engines: dict[str, Callable[[F64], Any]] = {
        f"server.explain ({served})": lambda b: table.shap_values(b),
        "server.explain (numpy SubsetPaths)": lambda b: numpy_table.shap_values(b),
        "server.explain polynomial only (before)": lambda b: polynomial.shap_values(b),
        "lightgbm pred_contrib": lambda b: booster.predict(b, pred_contrib=True),
    }
    exact: dict[str, float] = {
        f"server.explain ({served})": float(np.abs(ours - reference).max()),
        "server.explain (numpy SubsetPaths)": float(
            np.abs(numpy_table.shap_values(x) - reference).max()
        ),
        "server.explain polynomial only (before)": float(
            np.abs(polynomial.shap_values(x) - reference).max()
        ),
        "lightgbm pred_contrib": 0.0,
    }
    try:
        explainer = _shap_explainer(ensemble, covers)
        values = np.asarray(explainer.shap_values(x.astype(np.float64)))
        exact["shap TreeExplainer"] = float(np.abs(values - reference).max())
        engines["shap TreeExplainer"] = lambda b: explainer.shap_values(b.astype(np.float64))
    except ImportError:
        pass
    result: dict[str, Any] = {
        "trees": ensemble.n_trees,
        "nodes": ensemble.n_nodes,
        "path_depth": table.depth,
        "explainer_json_bytes": size,
        "path_table_build_ms": round(build_ms, 1),
        "subset_paths": table.subset_paths,
        "subset_table_mib": round(
            sum(getattr(e, "table", np.zeros(0)).nbytes for e in numpy_table.engines) / 2**20, 1
        ),
        "sum_plus_base_vs_margin": float(np.abs(ours.sum(1) + table.base_value - margin).max()),
        "engines": {},
    }
    for name, fn in engines.items():
        timings = {f"us_per_row_batch_{n}": _timed(fn, x[:n], args.seconds) for n in (1, 64)}
        timings["us_per_row_cold"] = _cold_us(fn, x)
        result["engines"][name] = {"max_abs_diff_to_lightgbm": exact[name], **timings}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
