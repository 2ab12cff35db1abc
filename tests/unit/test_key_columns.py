"""``already_keys``: True only when the key rule leaves every id as it is."""

from __future__ import annotations

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
from hypothesis import given
from hypothesis import strategies as st

from feature_streams.entity_keys import EntityKeyError, entity_key
from feature_streams.key_columns import already_keys


def _own_key(value: str | None) -> bool:
    if value is None:
        return True
    try:
        return entity_key("str", value) == value
    except EntityKeyError:
        return False


@given(st.lists(st.one_of(st.none(), st.text(max_size=6)), max_size=8))
def test_true_only_when_every_id_is_its_own_key(values: list[str | None]) -> None:
    if already_keys(pa.array(values, pa.string()), "str"):
        assert all(_own_key(v) for v in values)


def test_plain_ids_are_keys_and_anything_doubtful_is_not() -> None:
    assert already_keys(pa.array(["card-1", "a b", None], pa.string()), "str")
    assert already_keys(pa.chunked_array([["x"], ["y"]]), "str")
    for doubtful in (" a", "a ", "", "\x1ca", "é", "a\t"):
        assert not already_keys(pa.array(["ok", doubtful]), "str"), repr(doubtful)
    assert not already_keys(pa.array(["1", "2"]), "int")  # int keys: "01" -> "1"
    assert not already_keys(pa.array([1, 2]), "str")  # not text
