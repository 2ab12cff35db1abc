"""bench.interleave: loads, ratios, verdicts and the per-cycle summary of ABBA blocks."""

from __future__ import annotations

import pytest

from bench.interleave import Block, Load, meets, ratios, summarise
from server.clients.histogram import LatencyHistogram


def _block(arm: str, cycle: int, ok: int, latency_us: int, cpu_s: float) -> Block:
    histogram = LatencyHistogram()
    for _ in range(ok):
        histogram.record_ns(latency_us * 1000)
    return Block(arm, cycle, 2.0, ok, {}, cpu_s, 0.01, histogram)


def test_loads_parse_closed_and_open() -> None:
    assert Load.parse("c64") == Load("c64", callers=64)
    assert Load.parse("c64").connections == 4
    assert Load.parse("c1").connections == 1
    assert Load.parse("rate500") == Load("rate500", callers=1, rate=500.0)
    with pytest.raises(ValueError, match="cN or rateN"):
        Load.parse("64")


def test_throughput_is_a_floor_and_the_rest_are_ceilings() -> None:
    targets = {"throughput": 0.95, "p99": 1.05}
    assert meets({"throughput": 0.95, "p99": 1.05}, targets)
    assert not meets({"throughput": 0.94, "p99": 1.0}, targets)
    assert not meets({"throughput": 1.0, "p99": 1.06}, targets)


def test_ratios_are_b_over_a() -> None:
    a = {"throughput": 100.0, "p50": 10.0, "p99": 20.0, "p999": 40.0, "cpu": 500.0}
    b = {"throughput": 90.0, "p50": 12.0, "p99": 30.0, "p999": 40.0, "cpu": 550.0}
    assert ratios(a, b) == {"throughput": 0.9, "p50": 1.2, "p99": 1.5, "p999": 1.0, "cpu": 1.1}


def test_summary_pools_each_arm_and_judges_every_cycle() -> None:
    # cycle 0: B as fast as A; cycle 1: B's p99 doubled. Pooled, B's p99 is the slower one.
    blocks = [
        _block("A", 0, 100, 1000, 0.05),
        _block("B", 0, 100, 1000, 0.05),
        _block("B", 0, 100, 1000, 0.05),
        _block("A", 0, 100, 1000, 0.05),
        _block("A", 1, 100, 1000, 0.05),
        _block("B", 1, 100, 2000, 0.06),
        _block("B", 1, 100, 2000, 0.06),
        _block("A", 1, 100, 1000, 0.05),
    ]
    summary = summarise(blocks, {"p99": 1.1, "cpu": 1.15})
    assert summary["cycles"] == 2
    assert summary["cycles_meeting"] == 1
    assert summary["arms"]["A"]["throughput"] == 50.0  # 400 answers over 8 s
    assert summary["arms"]["B"]["cpu"] == pytest.approx(550.0)  # 0.22 CPU s / 400 answers
    assert summary["ratio"]["p99"] == pytest.approx(2.0, rel=0.01)
    assert summary["ratio"]["cpu"] == pytest.approx(1.1)
    assert summary["met"] is False
    assert [r["p99"] for r in summary["cycle_ratios"]] == pytest.approx([1.0, 2.0], rel=0.01)
