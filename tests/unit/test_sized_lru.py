"""``SizedLru``: both bounds hold, least recently used first out, sizes accounted."""

from __future__ import annotations

import pytest

from feature_streams.sized_lru import SizedLru


def test_entries_bound_evicts_the_least_recently_used() -> None:
    lru: SizedLru[str, int] = SizedLru(max_entries=2, max_bytes=1000)
    assert lru.put("a", 1, 10) and lru.put("b", 2, 10)
    assert lru.get("a") == 1  # "b" is now the oldest use
    assert lru.put("c", 3, 10)
    assert list(lru) == ["a", "c"] and lru.evictions == 1 and lru.bytes == 20


def test_bytes_bound_and_replacement_account_sizes() -> None:
    lru: SizedLru[str, int] = SizedLru(max_entries=100, max_bytes=25)
    lru.put("a", 1, 10)
    lru.put("a", 2, 12)  # replaced, not counted twice
    assert (len(lru), lru.bytes, lru.get("a")) == (1, 12, 2)
    lru.put("b", 3, 10)
    assert not lru.put("c", 4, 30)  # larger than the bound: not kept, and it evicts all
    assert (len(lru), lru.bytes, lru.evictions) == (0, 0, 3)
    lru.put("d", 5, 5)
    assert lru.pop("d") == 5 and lru.pop("d") is None and lru.bytes == 0


def test_a_zero_bound_keeps_nothing_and_negative_bounds_are_refused() -> None:
    lru: SizedLru[str, int] = SizedLru(max_entries=0, max_bytes=10)
    assert not lru.enabled and not lru.put("a", 1, 1) and "a" not in lru
    with pytest.raises(ValueError, match="max_entries"):
        SizedLru(max_entries=-1, max_bytes=1)
