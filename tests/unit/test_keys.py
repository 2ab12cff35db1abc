"""The one Redis key layout: its names, the scripts built from them, and its purity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from feature_streams import batch_store, keys, tile_store

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_key_layout() -> None:
    assert keys.tile_key("card_activity", "c:1") == "st:card_activity:c:1"
    assert keys.offset_field("tx", 3) == "_off:tx:3"
    assert keys.data_key("profile", "s1", "c1") == "bf:profile:s1:c1"
    assert keys.data_key_pattern("profile", "s1") == "bf:profile:s1:*"
    assert keys.meta_keys("profile") == [
        "bf:{profile}:active",
        "bf:{profile}:previous",
        "bf:{profile}:snapshots",
    ]
    with pytest.raises(ValueError, match="'bad group'"):
        keys.meta_keys("bad group")
    with pytest.raises(ValueError, match="'a/b'"):
        keys.check_snapshot_id("a/b")


def test_scripts_are_built_from_the_named_constants() -> None:
    assert tile_store.APPLY_SCRIPT.count(keys.lua_string(keys.LAST_TS_FIELD)) == 2
    scripts = (batch_store._ACTIVATE_LUA, batch_store._MARK_DELETING_LUA)
    for script in (tile_store.APPLY_SCRIPT, *scripts):
        assert "$" not in script  # every placeholder substituted
    assert keys.lua_string(keys.DELETING) in batch_store._MARK_DELETING_LUA
    for state in (keys.LOADING, keys.ACTIVE, keys.PREVIOUS, keys.RETIRED):
        assert keys.lua_string(state) in batch_store._ACTIVATE_LUA
    with pytest.raises(ValueError):
        keys.lua_string("it's")


def test_key_layout_and_read_plan_are_pure() -> None:
    probe = (
        "import json, sys\n"
        "import feature_streams.keys, feature_streams.read_plan\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = json.loads(result.stdout)
    forbidden = ("asyncio", "redis", "aiokafka", "grpc", "server")
    assert [m for m in loaded if m.split(".")[0] in forbidden] == []
