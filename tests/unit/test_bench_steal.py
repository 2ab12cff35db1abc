"""bench.pinning.steal_seconds: the host's steal time of the benchmark's cores."""

from __future__ import annotations

import os

from bench.pinning import steal_seconds

STAT = """cpu  340800 9 66290 122768 1705 0 7538 18650 0 0
cpu0 172996 4 34356 58811 400 0 3530 8801 0 0
cpu1 167927 5 31960 64069 1304 0 4007 9849 0 0
intr 123 0 0
cpu10 1 1 1 1 1 1 1 77 0 0
"""


def test_steal_is_the_eighth_value_of_each_named_core_in_seconds() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    assert steal_seconds([0], STAT) == 8801 / tick
    assert steal_seconds([1], STAT) == 9849 / tick
    assert steal_seconds([0, 1], STAT) == (8801 + 9849) / tick


def test_the_aggregate_line_and_other_cores_are_not_counted() -> None:
    assert steal_seconds([2], STAT) == 0.0  # not reported: no steal counted
    assert steal_seconds([1], STAT) != steal_seconds([10], STAT)  # "cpu1" is not "cpu10"


def test_this_machines_proc_stat_reads() -> None:
    assert steal_seconds([0]) >= 0.0
