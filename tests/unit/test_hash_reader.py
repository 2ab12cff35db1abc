"""HashWindowReader (the server's read path) against brute force and the generic parser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_streams import hash_reader, windows
from feature_streams.hash_reader import HashWindowReader
from feature_streams.windows import read_hash, updates_for_event
from tests.unit.test_windows import (
    BASE,
    HOUR,
    MIN,
    PLAN,
    Ev,
    apply_updates,
    arrivals,
    brute_all,
    request_times,
)

STORE_FIELDS = {"_last_ts": "1700000000000", "_off:transactions:0": "41"}


def stored_hash(events: list[Ev]) -> dict[bytes, bytes]:
    """The tile hash the apply script leaves for ``events``, as the server fetches it."""
    flat: dict[str, str] = dict(STORE_FIELDS)
    for e in events:
        apply_updates(flat, updates_for_event(PLAN, e.as_event()))
    return {k.encode(): v.encode() for k, v in flat.items()}


def as_dict(values: list[float]) -> dict[str, float]:
    return {o.name: v for o, v in zip(PLAN.outputs, values, strict=True)}


@pytest.fixture(params=["lookup", "parse", "too_many_names"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> HashWindowReader:
    """A reader forced onto one of its paths."""
    ratio = 0.0 if request.param == "parse" else float("inf")
    monkeypatch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
    if request.param == "too_many_names":
        monkeypatch.setattr(hash_reader, "MAX_LOOKUPS", 10)
    return HashWindowReader(PLAN)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), events=arrivals())
def test_both_paths_equal_brute_force_and_read_hash(data: st.DataObject, events: list[Ev]) -> None:
    fetched = stored_hash(data.draw(st.permutations(events)))
    readers = {}
    for ratio in (float("inf"), 0.0, hash_reader.NAMES_PER_FIELD):  # lookup, parse, chosen
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
            readers[ratio] = HashWindowReader(PLAN)
    for t in data.draw(request_times(events)):
        want = brute_all(events, t, online=True)
        assert read_hash(PLAN, fetched, t) == want
        for ratio, reader in readers.items():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
                assert as_dict(reader.read(fetched, t)) == want, ratio


def test_empty_hash_reads_defaults(reader: HashWindowReader) -> None:
    assert reader.read({}, BASE) == [o.default for o in PLAN.outputs]


def test_store_fields_unknown_slots_and_half_written_last_are_ignored(
    reader: HashWindowReader,
) -> None:
    t = BASE + 10 * MIN
    events = [Ev(BASE, 5.0, 1), Ev(BASE + 2 * MIN, 7.0, 0)]
    fetched = stored_hash(events)
    noisy = dict(fetched)
    start = (BASE + 3 * MIN) // MIN * MIN
    noisy[f"{start}:count@2m".encode()] = b"9"  # a slot no longer defined
    noisy[b"_note"] = b"not a tile"
    noisy[f"{start}:last(amount)@1m".encode()] = b"99.0"  # its ":ts" half never written
    assert reader.read(noisy, t) == reader.read(fetched, t)
    assert as_dict(reader.read(fetched, t)) == brute_all(events, t, online=True)


def test_a_count_decays_as_its_tile_leaves_the_window(reader: HashWindowReader) -> None:
    fetched = stored_hash([Ev(BASE, 1.0, 0)])
    tile = BASE // MIN * MIN
    counts = {
        t: as_dict(reader.read(fetched, t))["count_5m"]
        for t in (tile, tile + 1, tile + 5 * MIN, tile + 6 * MIN - 1, tile + 6 * MIN)
    }
    # [floor(t - 5m, 1m), t): the tile is read from just after its start for 6 minutes
    assert counts == {
        tile: 0.0,
        tile + 1: 1.0,
        tile + 5 * MIN: 1.0,
        tile + 6 * MIN - 1: 1.0,
        tile + 6 * MIN: 0.0,
    }


def test_layouts_are_shared_within_a_tile_and_bounded() -> None:
    reader = HashWindowReader(PLAN)
    tile = BASE // MIN * MIN
    inside = reader.layout_at(tile + 1)
    assert reader.layout_at(tile + MIN - 1) is inside
    assert reader.layout_at(tile) is not inside  # on the boundary the head tile is not read
    assert reader.layout_at(tile + MIN + 1) is not inside
    for i in range(3 * hash_reader._MAX_CACHED_TIMES):
        reader.layout_at(tile + i * MIN + 1)
    assert len(reader._layouts) <= hash_reader._MAX_CACHED_TIMES


def test_sparse_hash_falls_back_to_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    real = windows.tiles_from_hash

    def spy(plan: Any, fields: Mapping[bytes, bytes], *args: Any) -> Any:
        parsed.append(len(fields))
        return real(plan, fields, *args)

    monkeypatch.setattr("feature_streams.hash_reader.tiles_from_hash", spy)
    reader = HashWindowReader(PLAN)
    t = BASE + HOUR
    lookups = reader.layout_at(t).lookups
    sparse = stored_hash([Ev(BASE, 1.0, 0)])  # a handful of fields, hundreds of names
    assert lookups > hash_reader.NAMES_PER_FIELD * len(sparse)
    assert as_dict(reader.read(sparse, t)) == brute_all([Ev(BASE, 1.0, 0)], t, online=True)
    assert parsed == [len(sparse)]

    parsed.clear()
    dense = {f"{BASE + i}:x".encode(): b"0" for i in range(lookups)} | sparse
    assert as_dict(reader.read(dense, t)) == brute_all([Ev(BASE, 1.0, 0)], t, online=True)
    assert parsed == []


def test_read_many_merges_once_per_tile_range(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [Ev(BASE, 2.0, 1), Ev(BASE + 3 * MIN, 4.0, 0), Ev(BASE + 2 * HOUR, 8.0, 1)]
    fetched = stored_hash(events)
    tile = (BASE + 2 * HOUR) // MIN * MIN
    times = [tile + 1, tile + 30_000, tile + MIN - 1, tile + MIN + 5, tile + 2]
    merges: list[int] = []
    real = hash_reader._merge

    def spy(layout: Any, fields: Mapping[bytes, bytes]) -> Any:
        merges.append(1)
        return real(layout, fields)

    monkeypatch.setattr(hash_reader, "NAMES_PER_FIELD", float("inf"))
    monkeypatch.setattr("feature_streams.hash_reader._merge", spy)
    reader = HashWindowReader(PLAN)
    got = reader.read_many(fetched, times)
    assert len(merges) == 2  # two distinct tile ranges among the five times
    assert [as_dict(v) for v in got] == [brute_all(events, t, online=True) for t in times]
    # time_since_last still follows each request's own time within a shared range
    assert len({as_dict(v)["since_30m"] for v in got[:3]}) == 3
    assert reader.read_many({}, times) == [[o.default for o in PLAN.outputs]] * len(times)


def test_windows_with_too_many_tiles_never_build_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hash_reader, "MAX_LOOKUPS", 10)
    layout = HashWindowReader(PLAN).layout_at(BASE)
    assert layout.ranges == () and layout.lookups > 10


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    events=arrivals(),
    amounts=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=40, max_size=40
    ),
)
def test_any_amounts_in_any_field_order_read_the_same(
    data: st.DataObject, events: list[Ev], amounts: list[float]
) -> None:
    """Non-dyadic amounts, so float sums depend on order unless rounded correctly:
    the lookup path (tile order) and parsing (hash order) must still agree exactly."""
    events = [Ev(e.ts, a, e.flag) for e, a in zip(events, amounts, strict=False)]
    fetched = stored_hash(events)
    shuffled = dict(data.draw(st.permutations(list(fetched.items()))))
    as_text = {k.decode(): v.decode() for k, v in shuffled.items()}
    readers = {}
    for ratio in (float("inf"), 0.0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
            readers[ratio] = HashWindowReader(PLAN)
    for t in data.draw(request_times(events)):
        want = read_hash(PLAN, fetched, t)
        assert read_hash(PLAN, shuffled, t) == want
        for ratio, reader in readers.items():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
                assert as_dict(reader.read(shuffled, t)) == want
                # a client that decodes replies (str keys) is parsed, never misread
                assert as_dict(reader.read(as_text, t)) == want


def test_cancelling_sums_do_not_depend_on_tile_order() -> None:
    t = BASE + 3 * MIN
    events = [Ev(BASE, 1.0, 0), Ev(BASE + MIN, 1e16, 0), Ev(BASE + 2 * MIN, -1e16, 0)]
    fetched = stored_hash(events)
    backwards = dict(reversed(list(fetched.items())))
    for ratio in (float("inf"), 0.0):  # lookup, parse
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hash_reader, "NAMES_PER_FIELD", ratio)
            reader = HashWindowReader(PLAN)
            assert as_dict(reader.read(fetched, t))["sum_5m"] == 1.0
            assert as_dict(reader.read(backwards, t))["sum_5m"] == 1.0
    assert read_hash(PLAN, backwards, t)["sum_5m"] == 1.0
