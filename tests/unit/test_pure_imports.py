"""The modules meant to be pure must not drag in I/O, event loops or the gRPC layer.

Each is imported alone in a fresh interpreter (so one module's imports cannot hide
another's) and the loaded modules are checked: no asyncio, redis, aiokafka or grpc;
the feature modules also load no server code (the worker and backfill share them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
IO = ("asyncio", "redis", "aiokafka", "grpc")

#: module -> top-level packages it must not load
PURE_MODULES: dict[str, tuple[str, ...]] = {
    "feature_streams.definitions": (*IO, "server"),
    "feature_streams.windows": (*IO, "server"),
    "feature_streams.hash_reader": (*IO, "server"),
    "feature_streams.entity_keys": (*IO, "server"),
    "feature_streams.keys": (*IO, "server"),
    "feature_streams.read_plan": (*IO, "server"),
    "feature_streams.batch_cache": (*IO, "server"),
    "feature_streams.tile_cache": (*IO, "server"),
    "feature_streams.sized_lru": (*IO, "server"),
    "feature_streams.point_in_time": (*IO, "server"),
    "server.features": IO,
    "server.errors": IO,
    "server.router": IO,
    "server.routing.state": IO,
    "server.rollout.policy": IO,
}

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", sorted(PURE_MODULES))
def test_pure_module_imports_no_io(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = json.loads(result.stdout)
    assert module in loaded
    forbidden = PURE_MODULES[module]
    offending = [m for m in loaded if m.split(".")[0] in forbidden]
    assert offending == []
