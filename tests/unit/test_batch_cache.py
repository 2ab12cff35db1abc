"""BatchValueCache: rows by snapshot id, invalidated by the flip, bounded, LRU."""

from __future__ import annotations

import pytest

from feature_streams.batch_cache import FIELD_BYTES, ROW_OVERHEAD_BYTES, BatchRow, BatchValueCache

FIELDS = ("limit", "score")


def _row(value: float) -> BatchRow:
    return BatchRow({"limit": value, "score": value}, missing=False)


def test_rows_stored_are_found_by_the_same_snapshot_id_only() -> None:
    cache = BatchValueCache()
    assert cache.lookup("profile", "s1", FIELDS, ["a", "b", "a"]) == ({}, ["a", "b"])
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    hits, missing = cache.lookup("profile", "s1", FIELDS, ["a", "b", "a"])
    assert hits == {"a": _row(1.0)} and missing == ["b"]
    # another field set (another model version) or group is another row
    assert cache.lookup("profile", "s1", ("limit",), ["a"]) == ({}, ["a"])
    assert cache.lookup("other", "s1", FIELDS, ["a"]) == ({}, ["a"])
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 5)


def test_the_pointer_flip_drops_the_old_snapshots_rows() -> None:
    cache = BatchValueCache()
    cache.lookup("profile", "s1", FIELDS, ["a"])
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    cache.lookup("card", "c1", ("age",), ["x"])
    cache.store("card", "c1", ("age",), {"x": BatchRow({"age": 3.0}, missing=False)})

    assert cache.lookup("profile", "s2", FIELDS, ["a"]) == ({}, ["a"])  # the flip
    assert cache.stats().entries == 1  # only the other group's row is left
    assert cache.stats().invalidations == 1
    # a micro-batch that read s1 before the flip answers after it: not kept
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    assert cache.lookup("profile", "s1", FIELDS, ["a"]) == ({}, ["a"])
    # a rollback back to s1 reads again (its rows were dropped at the flip)
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    assert cache.lookup("profile", "s2", FIELDS, ["a"]) == ({}, ["a"])
    assert cache.lookup("card", "c1", ("age",), ["x"])[1] == []


def test_invalidate_drops_a_group_and_refuses_rows_until_the_next_lookup() -> None:
    cache = BatchValueCache()
    cache.lookup("profile", "s1", FIELDS, ["a"])
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    cache.invalidate("profile")
    cache.store("profile", "s1", FIELDS, {"b": _row(2.0)})  # in flight across it
    assert cache.stats().entries == 0
    assert cache.lookup("profile", "s1", FIELDS, ["a", "b"]) == ({}, ["a", "b"])


def test_bounded_in_entries_least_recently_used_out() -> None:
    cache = BatchValueCache(max_entries=2)
    cache.lookup("profile", "s1", FIELDS, ["a", "b"])
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0), "b": _row(2.0)})
    cache.lookup("profile", "s1", FIELDS, ["a"])  # a is now the most recently used
    cache.store("profile", "s1", FIELDS, {"c": _row(3.0)})
    hits, missing = cache.lookup("profile", "s1", FIELDS, ["a", "b", "c"])
    assert sorted(hits) == ["a", "c"] and missing == ["b"]
    assert cache.stats().entries == 2 and cache.stats().evictions == 1


def test_bounded_in_bytes() -> None:
    per_row = ROW_OVERHEAD_BYTES + FIELD_BYTES * len(FIELDS) + 1
    cache = BatchValueCache(max_entries=1000, max_bytes=3 * per_row)
    cache.lookup("profile", "s1", FIELDS, [])
    cache.store("profile", "s1", FIELDS, {k: _row(1.0) for k in "abcdef"})
    stats = cache.stats()
    assert stats.entries == 3 and stats.bytes == 3 * per_row
    assert cache.lookup("profile", "s1", FIELDS, ["d", "e", "f"])[1] == []
    cache.store("profile", "s1", FIELDS, {"d": _row(9.0)})  # replaced, not counted twice
    assert cache.stats().bytes == 3 * per_row


def test_disabled_keeps_nothing() -> None:
    cache = BatchValueCache(max_entries=0)
    assert not cache.enabled
    cache.lookup("profile", "s1", FIELDS, ["a"])
    cache.store("profile", "s1", FIELDS, {"a": _row(1.0)})
    assert cache.stats().entries == 0
    with pytest.raises(ValueError, match="max_entries"):
        BatchValueCache(max_entries=-1)
