"""The compiled subset-table lookup equals the numpy engine it replaces on the hot path.

The numpy engine (:class:`~server.explain.subsets.SubsetPaths`) is the reference; the
compiled kernel (``server.explain._lookup``) must give the same attributions for every
split mode, NaN routing and rows on the thresholds, one row or a batch, from any
thread; refuse malformed arrays instead of reading out of bounds; and the server must
still explain, with the numpy engine and a warning, where the extension is not built.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from server.explain import compiled
from server.explain.compiled import CompiledSubsetPaths, lookup_engine
from server.explain.subsets import SubsetPaths
from server.explain.treeshap import PathTable
from tests.unit.test_treeshap_engines import (
    ALL_MODES,
    INTERVAL_MODES,
    random_ensemble,
    rows_on_the_grid,
)


def test_it_is_built() -> None:
    """A development tree (``make``: ``pip install -e .``) builds the extension; the
    tests here fail, rather than skip, where it was not, so a broken build is seen."""
    from server.explain import _lookup

    assert compiled.available() and _lookup.Kernel is not None


@pytest.mark.parametrize(
    ("seed", "modes"), [(1, INTERVAL_MODES), (2, INTERVAL_MODES), (4, ALL_MODES)]
)
def test_compiled_equals_numpy(seed: int, modes: tuple[int, ...]) -> None:
    ensemble, covers = random_ensemble(seed, modes, n_features=6)
    x = rows_on_the_grid(ensemble.n_features)
    fast = PathTable.build(ensemble, covers)
    reference = PathTable.build(ensemble, covers, compiled=False)
    assert isinstance(fast.engines[0], CompiledSubsetPaths)
    assert isinstance(reference.engines[0], SubsetPaths)
    phi = fast.shap_values(x)
    # the compiled tables are float32 (half the bytes a row's scattered reads touch):
    # each looked-up weight is rounded to float32, sums stay float64; the bar
    # is float32 tolerance on the margin, and the load check's bound is far wider
    expected = reference.shap_values(x)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(phi, expected, rtol=0, atol=1e-6 * scale)
    assert np.abs(phi - expected).max() > 0  # really float32 tables (fails on float64 ones)
    margin = ensemble.margin(x)
    np.testing.assert_allclose(phi.sum(1) + fast.base_value, margin, atol=1e-6 * scale)
    for i in (0, 5, 399):  # one row alone equals the row in a batch
        np.testing.assert_allclose(fast.shap_values(x[i : i + 1])[0], phi[i], rtol=0, atol=1e-14)


def test_threads_share_one_kernel() -> None:
    ensemble, covers = random_ensemble(3, INTERVAL_MODES)
    table = PathTable.build(ensemble, covers)
    x = rows_on_the_grid(ensemble.n_features, n=64)
    expected = table.shap_values(x)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: table.shap_values(x), range(16)))
    for phi in results:
        np.testing.assert_array_equal(phi, expected)


def test_the_kernel_owns_its_arrays() -> None:
    ensemble, covers = random_ensemble(1, INTERVAL_MODES)
    subsets = PathTable.build(ensemble, covers, compiled=False).engines[0]
    assert isinstance(subsets, SubsetPaths)
    engine = CompiledSubsetPaths.of(subsets, ensemble.n_features)
    x = rows_on_the_grid(ensemble.n_features, n=32).astype(np.float32)
    before = np.zeros((32, ensemble.n_features + 1))
    engine.add_to(x, before)
    subsets.table[:] = np.nan  # the source changed after the build: the kernel copied it
    after = np.zeros_like(before)
    engine.add_to(x, after)
    np.testing.assert_array_equal(after, before)


def _arrays() -> dict[str, Any]:
    """One path of two players on features 0 and 1, a table of 4 values."""
    return {
        "path_start": np.array([0, 2], dtype=np.int32),
        "feature": np.array([0, 1], dtype=np.int32),
        "lo": np.array([-1.0, -1.0], dtype=np.float32),
        "hi": np.array([1.0, 1.0], dtype=np.float32),
        "nan_ok": np.array([1, 0], dtype=np.uint8),
        "scale": np.array([2.0, 4.0]),
        "offset": np.array([0], dtype=np.int64),
        "table": np.array([1.0, 2.0, 3.0, 4.0]),
    }


def test_the_kernel_refuses_bad_layouts() -> None:
    from server.explain import _lookup

    assert _lookup.Kernel(3, **_arrays()).cells == 2
    bad = {
        "feature": np.array([0, 3], dtype=np.int32),  # past the row
        "path_start": np.array([0, 1], dtype=np.int32),  # does not cover the cells
        "offset": np.array([1], dtype=np.int64),  # table runs past the end
        "lo": np.array([-1.0], dtype=np.float32),  # one value short
    }
    for name, value in bad.items():
        with pytest.raises(ValueError):
            _lookup.Kernel(3, **{**_arrays(), name: value})


def test_the_kernel_refuses_bad_rows_and_outputs() -> None:
    from server.explain import _lookup

    kernel = _lookup.Kernel(3, **_arrays())
    x = np.zeros((2, 3), dtype=np.float32)
    kernel.add_to(x, np.zeros((2, 4)))
    cases: tuple[tuple[Any, Any], ...] = (
        (x.astype(np.float64), np.zeros((2, 4))),  # wrong dtype
        (x, np.zeros((2, 3))),  # no room for the bias column
        (x, np.zeros((2, 4), dtype=np.float32)),
        (np.zeros((2, 4), dtype=np.float32), np.zeros((2, 4))),  # a row of 4 features
    )
    for row, out in cases:
        with pytest.raises(ValueError):
            kernel.add_to(row, out)
    frozen = np.zeros((2, 4))
    frozen.setflags(write=False)
    with pytest.raises((ValueError, BufferError)):
        kernel.add_to(x, frozen)


def test_one_path_by_hand() -> None:
    """Players 0 (satisfied, 1/z = 2) and 1 (failed): A = 0b01, so player 0 gets
    (2 - 1) * K(A ^ 1) = K(0) = 1.0 and player 1 gets -K(A) = -2.0."""
    from server.explain import _lookup

    kernel = _lookup.Kernel(3, **_arrays())
    out = np.zeros((1, 4))
    kernel.add_to(np.array([[0.5, 7.0, 0.0]], dtype=np.float32), out)
    np.testing.assert_array_equal(out, [[1.0, -2.0, 0.0, 0.0]])
    out[:] = 0.0  # a NaN satisfies player 0 (nan_ok), not player 1
    kernel.add_to(np.array([[np.nan, np.nan, 0.0]], dtype=np.float32), out)
    np.testing.assert_array_equal(out, [[1.0, -2.0, 0.0, 0.0]])


def test_missing_extension_falls_back_to_numpy_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ensemble, covers = random_ensemble(2, INTERVAL_MODES)
    monkeypatch.setattr(compiled, "_lookup", None)
    with caplog.at_level(logging.WARNING, logger="server.explain.compiled"):
        table = PathTable.build(ensemble, covers)
    assert isinstance(table.engines[0], SubsetPaths)
    assert "numpy engine" in caplog.text
    subsets = table.engines[0]
    assert lookup_engine(subsets, ensemble.n_features, compiled=False) is subsets


def test_likely_players_take_the_low_bits() -> None:
    """Each path's players in decreasing ``z``; the renumbered tables are a permutation
    of the originals within each path (same values, moved)."""
    ensemble, covers = random_ensemble(2, INTERVAL_MODES, n_features=6)
    subsets = PathTable.build(ensemble, covers, compiled=False).engines[0]
    assert isinstance(subsets, SubsetPaths)
    order, start, table = compiled.likely_first(subsets)
    z = 1.0 / subsets.scale[order]
    for p in range(start.shape[0] - 1):
        assert np.all(np.diff(z[start[p] : start[p + 1]]) <= 0)
        size = 1 << int(start[p + 1] - start[p])
        at = int(subsets.path_offset[p])
        np.testing.assert_array_equal(
            np.sort(table[at : at + size]), np.sort(subsets.table[at : at + size])
        )
