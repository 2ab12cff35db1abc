"""``features.tile_cache_entries`` / ``tile_cache_bytes`` reach the fetcher's tile cache
(standalone Redis), 0 turns it off, and its counters are exported."""

from __future__ import annotations

from redis.asyncio import Redis

from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.keys import VERSION_FIELD_BYTES
from feature_streams.tile_cache import TileHashCache
from server.feature_store import FeatureStore, store_options
from server.metrics import Metrics
from server.settings import load_settings


def _store(*sets: str) -> FeatureStore:
    options = store_options(load_settings(None, {}, list(sets)).features)
    client = Redis(host="127.0.0.1", port=1)  # never connected: nothing is read
    return FeatureStore(client, BatchSnapshotCache(client, []), options)


def test_the_tile_cache_is_on_by_default_with_the_settings_bounds() -> None:
    tiles = _store("features.tile_cache_entries=3").fetcher.tile_cache
    assert tiles is not None and tiles.enabled
    for n in range(5):
        tiles.store(f"k{n}", {VERSION_FIELD_BYTES: b"1"})
    assert tiles.stats().entries == 3
    small = _store("features.tile_cache_bytes=1000").fetcher.tile_cache
    assert small is not None
    for n in range(5):
        small.store(f"k{n}", {VERSION_FIELD_BYTES: b"1"})
    assert small.stats().entries == 1 and small.stats().bytes <= 1000
    assert _store().fetcher.tile_cache is not None


def test_zero_entries_or_bytes_turn_it_off() -> None:
    assert _store("features.tile_cache_entries=0").fetcher.tile_cache is None
    assert _store("features.tile_cache_bytes=0").fetcher.tile_cache is None


def test_the_tile_cache_counters_are_exported_at_scrape() -> None:
    metrics = Metrics()
    tiles = TileHashCache(1, 1 << 20)
    metrics.track_tile_cache(tiles.stats)
    entry = tiles.store("a", {VERSION_FIELD_BYTES: b"1", b"0:n": b"2"})
    assert entry is not None
    tiles.hit(entry)
    tiles.store("b", {VERSION_FIELD_BYTES: b"1"})  # evicts a
    sample = metrics.registry.get_sample_value
    assert sample("streamscore_feature_tile_cache_hits_total") == 1.0
    assert sample("streamscore_feature_tile_cache_misses_total") == 2.0
    assert sample("streamscore_feature_tile_cache_evictions_total") == 1.0
    assert sample("streamscore_feature_tile_cache_entries") == 1.0
    assert (sample("streamscore_feature_tile_cache_bytes") or 0.0) > 0.0
