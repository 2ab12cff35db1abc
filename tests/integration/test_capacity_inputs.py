"""bench.capacity_inputs against a real redis-server: every input the capacity model reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.capacity import load_measured
from bench.capacity_inputs import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_measures_memory_and_redis_cpu_per_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # features.yaml, as the bench command runs
    out = tmp_path / "capacity_inputs.json"
    assert main(["--cards", "300", "--seconds", "0.3", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    memory = result["memory"]
    assert memory["card_tile_hash"]["keys"] == 300
    assert memory["customer_profile_row"]["mean_fields"] == 9  # features.yaml
    assert all(kind["mean_bytes"] > 0 for kind in memory.values())
    for name in ("hgetall_card_tile", "hmget_snapshot_row", "evalsha_apply_one_event"):
        assert result["redis_cpu"][name]["ops"] > 0
    # the file is what bench.capacity reads beside the committed ones
    for name in ("features.json", "serving.json", "freshness.json"):
        (tmp_path / name).write_text((REPO / "bench" / "results" / name).read_text())
    assert load_measured(tmp_path).card_tile_bytes == memory["card_tile_hash"]["mean_bytes"]
