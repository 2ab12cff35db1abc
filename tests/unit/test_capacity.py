"""bench.capacity: the capacity table's arithmetic, on fixture bench JSON files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.capacity import GIB, Assumptions, Measured, load_measured, main, plan

REPO = Path(__file__).resolve().parents[2]


def write_results(directory: Path, *, server_us: float = 250.0, worker_us: float = 100.0) -> Path:
    """The four JSON files ``load_measured`` reads, with round numbers."""
    files: dict[str, Any] = {
        "features.json": {
            "score": {"score features fetched c64": {"server_cpu_us_per_request": server_us}}
        },
        "serving.json": [
            {"scenario": {"name": "floor c64"}, "server_cpu_us_per_request": 1.0},
            {"scenario": {"name": "streamscore inline c64"}, "server_cpu_us_per_request": 200.0},
        ],
        "freshness.json": {
            "background_rate_achieved": 5000.0,
            "cpu_cores_used": {"worker": 5000.0 * worker_us / 1e6},
        },
        "capacity_inputs.json": {
            "memory": {
                "card_tile_hash": {"mean_bytes": 3000.0},
                "merchant_tile_hash": {"mean_bytes": 20000.0},
                "card_profile_row": {"mean_bytes": 200.0},
                "customer_profile_row": {"mean_bytes": 500.0},
            },
            "redis_cpu": {
                "hgetall_card_tile": {"redis_cpu_us_per_op": 20.0},
                "hmget_snapshot_row": {"redis_cpu_us_per_op": 5.0},
                "evalsha_apply_one_event": {"redis_cpu_us_per_op": 50.0},
            },
        },
    }
    for name, body in files.items():
        (directory / name).write_text(json.dumps(body))
    return directory


def test_reads_every_input_from_the_bench_files(tmp_path: Path) -> None:
    m = load_measured(write_results(tmp_path))
    assert m == Measured(
        server_cpu_us_per_decision=250.0,
        server_cpu_us_per_decision_sent=200.0,
        worker_cpu_us_per_event=pytest.approx(100.0),  # type: ignore[arg-type]
        card_tile_bytes=3000.0,
        card_row_bytes=200.0,
        customer_row_bytes=500.0,
        merchant_tile_bytes=20000.0,
        redis_us_per_hgetall=20.0,
        redis_us_per_hmget=5.0,
        redis_us_per_evalsha=50.0,
    )


def test_arithmetic_of_one_plan(tmp_path: Path) -> None:
    m = load_measured(write_results(tmp_path))
    a = Assumptions(
        target_utilisation=0.5, cores_per_pod=2, min_pods=1, batch_rows=2.0, min_partitions=1
    )
    p = plan(10_000, 1_000_000, m, a)
    assert p.server_cores == pytest.approx(10_000 * 250e-6 / 0.5)  # 5 cores
    assert p.pods == 3  # ceil(5 / 2)
    assert p.worker_cores == pytest.approx(10_000 * 100e-6 / 0.5)  # 2 cores
    assert p.worker_replicas == 2
    assert p.partitions == 4  # 2 per replica
    # 2 HMGET + 2 HGETALL per decision, 2 registry HGETs per micro-batch of 2 rows
    assert p.redis_reads_per_s == pytest.approx(10_000 * (2 + 1 + 2))
    assert p.redis_writes_per_s == pytest.approx(20_000)  # card + merchant per event
    assert p.redis_cores == pytest.approx((30_000 * 5 + 20_000 * 20 + 20_000 * 50) / 1e6)
    per_card = 3000 + 2 * (200 + 500)  # tile hash + two snapshot copies of both rows
    expected = (1_000_000 * per_card + 1_000_000 * 20_000) * 1.3 / GIB
    assert p.memory_gib == pytest.approx(expected)
    assert p.shards_for_memory == -(-expected // 25)
    assert p.shards == max(3, p.shards_for_cpu, p.shards_for_memory)


def test_doubling_throughput_per_core_halves_pods(tmp_path: Path) -> None:
    a = Assumptions(min_pods=1, target_utilisation=0.5, cores_per_pod=2)
    slow = load_measured(write_results(tmp_path))
    fast = replace(slow, server_cpu_us_per_decision=slow.server_cpu_us_per_decision / 2)
    p_slow, p_fast = plan(48_000, 1, slow, a), plan(48_000, 1, fast, a)
    assert p_fast.server_cores == pytest.approx(p_slow.server_cores / 2)
    assert p_slow.pods == 12 and p_fast.pods == 6  # 24 cores -> 12 cores, 2 per pod


def test_doubling_cards_doubles_card_memory_and_load_does_not(tmp_path: Path) -> None:
    m = load_measured(write_results(tmp_path))
    a = Assumptions(merchants=0, shard_memory_gib=1.0, min_shards=1)
    one, two = plan(1000, 10_000_000, m, a), plan(1000, 20_000_000, m, a)
    assert two.memory_gib == pytest.approx(2 * one.memory_gib)
    assert plan(50_000, 10_000_000, m, a).memory_gib == pytest.approx(one.memory_gib)


def test_minimums_hold_at_low_load(tmp_path: Path) -> None:
    p = plan(1, 1, load_measured(write_results(tmp_path)), Assumptions())
    assert (p.pods, p.worker_replicas, p.partitions, p.shards) == (3, 1, 6, 3)


def test_cli_flags_change_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = write_results(tmp_path)
    out = tmp_path / "plans.json"
    argv = ["--results", str(results), "--rates", "16000", "--cards", "1000000"]
    argv += ["--min-pods", "1", "--target-utilisation", "0.5", "--json-out", str(out)]
    assert main([*argv, "--cores-per-pod", "2"]) == 0
    assert "| 16,000 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["plans"][0]["pods"] == 4  # 8 cores, 2 per pod
    assert main([*argv, "--cores-per-pod", "4"]) == 0
    assert json.loads(out.read_text())["plans"][0]["pods"] == 2


def test_the_committed_bench_files_load() -> None:
    """The table in docs/capacity.md comes from these files: they must stay readable."""
    m = load_measured(REPO / "bench" / "results")
    assert m.server_cpu_us_per_decision > 0 and m.card_tile_bytes > 0
