"""The in-process tile hash cache: kept by version, bounded, least recently used out."""

from __future__ import annotations

import pytest

from feature_streams.keys import VERSION_FIELD, VERSION_FIELD_BYTES
from feature_streams.tile_cache import TileHashCache, hash_version


def _hash(version: bytes | None, n: int = 3) -> dict[bytes, bytes]:
    fields = {f"{1000 * i}:c".encode(): b"1" for i in range(n)}
    if version is not None:
        fields[VERSION_FIELD_BYTES] = version
    return fields


def test_a_hash_is_kept_with_its_version_and_counted() -> None:
    cache = TileHashCache(10, 1 << 20)
    entry = cache.store("k", _hash(b"7"))
    assert entry is not None and entry.version == b"7"
    assert cache.get("k") is entry
    assert cache.hit(entry) is entry.fields
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)
    assert stats.bytes > 0


def test_a_hash_without_version_is_not_kept_and_drops_the_held_one() -> None:
    cache = TileHashCache(10, 1 << 20)
    cache.store("k", _hash(b"7"))
    assert cache.store("k", _hash(None)) is None
    assert cache.get("k") is None
    assert cache.stats().bytes == 0
    assert cache.store("empty", {}) is None  # a missing key reads as an empty hash


def test_str_replies_are_kept_by_their_str_version() -> None:
    assert hash_version({VERSION_FIELD: "9", "0:c": "1"}) == "9"
    assert hash_version({b"0:c": b"1"}) is None


def test_bounded_in_entries_and_bytes_least_recently_used_out() -> None:
    cache = TileHashCache(2, 1 << 20)
    cache.store("a", _hash(b"1"))
    cache.store("b", _hash(b"1"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.store("c", _hash(b"1"))
    assert cache.get("b") is None and cache.get("a") is not None
    assert cache.stats().evictions == 1
    one = cache.stats().bytes // 2
    small = TileHashCache(100, one + one // 2)  # room for one such hash
    small.store("a", _hash(b"1"))
    assert small.store("b", _hash(b"1")) is not None
    assert small.get("a") is None and small.stats().entries == 1
    assert small.store("huge", _hash(b"1", 500)) is None  # larger than the bound
    assert small.stats().entries == 0 and small.stats().bytes == 0


def test_replacing_and_discarding_keep_the_byte_count() -> None:
    cache = TileHashCache(10, 1 << 20)
    cache.store("a", _hash(b"1"))
    size = cache.stats().bytes
    cache.store("a", _hash(b"2"))
    assert cache.stats().bytes == size and cache.stats().entries == 1
    cache.discard("a")
    cache.discard("never")
    assert cache.stats().bytes == 0 and cache.stats().entries == 0


def test_zero_bounds_disable_it_and_negative_ones_are_refused() -> None:
    assert not TileHashCache(0, 1 << 20).enabled
    assert TileHashCache(0, 1 << 20).store("a", _hash(b"1")) is None
    with pytest.raises(ValueError):
        TileHashCache(-1, 10)


def test_merges_memo_is_bounded_per_hash() -> None:
    entry = TileHashCache(10, 1 << 20).store("a", _hash(b"1"))
    assert entry is not None
    for n in range(10):
        entry.merge_memo()[n] = [n]
    assert len(entry.merges) <= 4


def test_a_kept_hash_is_checked_by_its_version_and_every_offset_field() -> None:
    from feature_streams.tile_cache import check_fields

    raw = {b"_v": b"9", b"_off:tx:3": b"4", b"_off:tx:0": b"7", b"_last_ts": b"1", b"60000:n": b"2"}
    assert check_fields(raw) == (b"_v", b"_off:tx:0", b"_off:tx:3")
    assert check_fields({"_v": "9", "_off:tx:1": "2", "0:s": "1.5"}) == ("_v", "_off:tx:1")
    cache = TileHashCache()
    entry = cache.store("k", raw)
    assert entry is not None and entry.expected == [b"9", b"7", b"4"]
