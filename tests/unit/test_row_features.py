"""A v2 row's features as a Score call's mapping, built only when read."""

from __future__ import annotations

import numpy as np

from server.records.traffic_log import _plain
from server.scoring_types import RowFeatures


def test_row_features_read_like_the_dict_they_stand_for() -> None:
    names = ("a", "b", "c")
    row = np.array([1.5, float("nan"), -2.0], dtype=np.float32)
    features = RowFeatures(names, row)
    expected = dict(zip(names, row.tolist(), strict=True))
    assert len(features) == 3 and list(features) == list(names)
    assert features["a"] == 1.5 and features["c"] == -2.0
    assert dict(features.items())["b"] != dict(features.items())["b"]  # NaN kept as NaN
    plain = _plain(features)
    assert type(plain) is dict and list(plain) == list(names)
    assert plain is features.as_dict()  # built once
    assert {k: v for k, v in plain.items() if k != "b"} == {"a": 1.5, "c": -2.0}
    assert features == {**expected, "b": plain["b"]}  # Mapping equality with a dict
    assert all(type(v) is float for v in plain.values())  # JSON-ready Python floats
