"""The feature store's circuit breaker: opens after repeated failures, probes once."""

from __future__ import annotations

import pytest

from server.circuit_breaker import BreakerOptions, BreakerState, CircuitBreaker, NodeBreakers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(
    threshold: int = 3, window_s: float = 1.0, open_s: float = 0.5
) -> tuple[CircuitBreaker, Clock, list[BreakerState]]:
    clock = Clock()
    changes: list[BreakerState] = []
    options = BreakerOptions(threshold, window_s, open_s)
    return CircuitBreaker(options, clock, changes.append), clock, changes


def _state(breaker: CircuitBreaker) -> str:
    """The state now (a call, so mypy does not narrow it across calls)."""
    return breaker.state


def test_stays_closed_below_the_threshold_and_a_success_forgets_failures() -> None:
    breaker, _, changes = _breaker()
    breaker.failure()
    breaker.failure()
    assert _state(breaker) == "closed" and breaker.allow()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert _state(breaker) == "closed" and changes == []


def test_failures_older_than_the_window_do_not_count() -> None:
    breaker, clock, _ = _breaker(window_s=1.0)
    breaker.failure()
    breaker.failure()
    clock.now += 1.5
    breaker.failure()
    assert _state(breaker) == "closed"
    breaker.failure()
    breaker.failure()
    assert _state(breaker) == "open"


def test_opens_refuses_then_lets_one_probe_through() -> None:
    breaker, clock, changes = _breaker(open_s=0.5)
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert _state(breaker) == "open" and not breaker.allow()
    clock.now += 0.49
    assert not breaker.allow()
    clock.now += 0.02
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.success()
    assert _state(breaker) == "closed" and breaker.allow()
    assert changes == ["open", "half_open", "closed"]


def test_a_failed_probe_opens_again_and_an_abandoned_one_frees_the_slot() -> None:
    breaker, clock, changes = _breaker(threshold=1, open_s=0.5)
    breaker.failure()
    clock.now += 0.5
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()  # another probe may go
    breaker.failure()
    assert _state(breaker) == "open" and not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    assert changes == ["open", "half_open", "open", "half_open"]


def test_a_late_failure_while_open_does_not_extend_it() -> None:
    breaker, clock, _ = _breaker(threshold=1, open_s=0.5)
    breaker.failure()
    clock.now += 0.4
    breaker.failure()  # a call let through before the breaker opened
    clock.now += 0.1
    assert breaker.allow()


@pytest.mark.parametrize(
    "options",
    [{"failure_threshold": 0}, {"failure_window_s": 0.0}, {"open_s": -1.0}],
)
def test_options_are_checked(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerOptions(**options)  # type: ignore[arg-type]


def test_node_breakers_open_only_the_failing_node() -> None:
    clock = Clock()
    changes: list[tuple[str, BreakerState]] = []
    nodes = NodeBreakers(
        BreakerOptions(2, 1.0, 0.5), clock, lambda node, state: changes.append((node, state))
    )
    for _ in range(2):
        assert nodes.allow("a:1") and nodes.allow("b:2")
        nodes.failure("a:1")
        nodes.success("b:2")
    assert not nodes.allow("a:1")  # open: its keys degrade at once
    assert nodes.allow("b:2")
    assert nodes.states() == {"a:1": "open", "b:2": "closed"}
    clock.now += 0.5
    assert nodes.allow("a:1") and not nodes.allow("a:1")  # one probe
    nodes.abandon("a:1")  # cancelled: another probe may go
    assert nodes.allow("a:1")
    nodes.success("a:1")
    assert nodes.states()["a:1"] == "closed"
    assert changes == [("a:1", "open"), ("a:1", "half_open"), ("a:1", "closed")]
