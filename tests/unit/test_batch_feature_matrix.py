"""score-batch's model input: the feature matrix built column by column is the one
``np.column_stack(...).astype(np.float32)`` gives, whatever the column types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
from hypothesis import given
from hypothesis import strategies as st

from server.batch_scoring.features import feature_columns, feature_matrix

_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
_INTS = st.integers(min_value=-(2**62), max_value=2**62)  # past 2**24 and 2**53


def _reference(table: pa.Table, names: list[str]) -> np.ndarray:
    columns = [table.column(n).to_numpy(zero_copy_only=False) for n in names]
    return np.ascontiguousarray(np.column_stack(columns).astype(np.float32))


@given(
    st.integers(min_value=0, max_value=40).flatmap(
        lambda n: st.lists(
            st.one_of(
                st.lists(_FLOATS, min_size=n, max_size=n), st.lists(_INTS, min_size=n, max_size=n)
            ),
            min_size=1,
            max_size=5,
        )
    )
)
def test_equals_column_stack_for_mixed_types(columns: list[list[float] | list[int]]) -> None:
    names = [f"f{j}" for j in range(len(columns))]
    table = pa.table(
        {
            n: pa.array(c, pa.float64() if any(isinstance(v, float) for v in c) else pa.int64())
            for n, c in zip(names, columns, strict=True)
        }
    )
    with np.errstate(over="ignore"):  # beyond float32: inf, both ways
        expected = _reference(table, names)
        got = feature_matrix(table, names)
        by_feature = feature_columns(table, names)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # bit for bit
    assert by_feature.flags.c_contiguous
    np.testing.assert_array_equal(by_feature.T.view(np.uint32), expected.view(np.uint32))


def test_int_and_float_columns_cast_through_float64_as_column_stack_does() -> None:
    # 2**53 + 1 as int64 -> float32 directly and through float64 can round differently;
    # column_stack of an int and a float column goes through float64.
    big = 2**53 + 2**29 + 1  # direct: 2**53 + 2**30; via float64 (a tie): 2**53
    table = pa.table({"a": pa.array([big], pa.int64()), "b": pa.array([0.5])})
    np.testing.assert_array_equal(
        feature_matrix(table, ["a", "b"]).view(np.uint32),
        _reference(table, ["a", "b"]).view(np.uint32),
    )


def test_columns_in_the_order_asked() -> None:
    table = pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    assert feature_matrix(table, ["b", "a"]).tolist() == [[3.0, 1.0], [4.0, 2.0]]
    assert feature_columns(table, ["b", "a"]).tolist() == [[3.0, 4.0], [1.0, 2.0]]
