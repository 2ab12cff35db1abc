"""The dev stack's status line: built-in load said beside the rate, drift per version."""

from __future__ import annotations

from devstack.status import (
    Scrape,
    Status,
    compute_status,
    format_status,
    parse_metrics,
    score_drift,
)

PROCESS_A = """\
streamscore_drift_score_psi{model="fraud",version="1"} 0.25
streamscore_drift_score_psi{model="fraud",version="2"} 0.0
"""
PROCESS_B = """\
streamscore_drift_score_psi{model="fraud",version="1"} 0.5
"""


def test_drift_of_several_processes_is_their_largest_value_not_their_sum() -> None:
    drift = score_drift([parse_metrics(PROCESS_A), parse_metrics(PROCESS_B)])
    assert drift == {"fraud/1": 0.5, "fraud/2": 0.0}


def test_the_line_names_the_built_in_load_and_each_versions_drift() -> None:
    before = Scrape(0.0, 0.0, None, None)
    after = Scrape(1.0, 1.0, None, None, {"fraud/2": 0.0123, "fraud/1": 0.5})
    line = format_status(compute_status(before, after), built_in_per_s=20)
    assert "score - req/s (built-in 20/s) p99" in line
    assert line.endswith("| drift psi fraud/1 0.500 fraud/2 0.012")


def test_without_built_in_load_or_drift_the_line_says_neither() -> None:
    line = format_status(Status(1.0, 3.0, 0.0, None, None, None, None))
    assert "score 3.0 req/s p99" in line and "built-in" not in line
    assert line.endswith("| drift psi -")
