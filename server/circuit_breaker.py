"""A circuit breaker for one dependency (the feature store's Redis). Pure: no I/O.

* ``closed``: every call goes through. A failed call costs only its own caller; the
  breaker opens after ``failure_threshold`` failures within ``failure_window_s``
  with no success in between (a success forgets earlier failures).
* ``open``: no call goes through for ``open_s`` (callers degrade at once, so an
  outage costs no timeout per request).
* ``half_open``: after ``open_s`` ONE call goes through as a probe while the others
  are still refused; its success closes the breaker, its failure opens it again.

The caller asks :meth:`CircuitBreaker.allow` before the call and reports the outcome
with :meth:`success` / :meth:`failure` (a probe that is neither, e.g. cancelled,
must report :meth:`abandon` so another probe can go). Time is ``clock()`` seconds
(the event loop's monotonic clock in the server).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["STATES", "BreakerOptions", "BreakerState", "CircuitBreaker", "NodeBreakers"]

BreakerState = Literal["closed", "open", "half_open"]
STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")


@dataclass(frozen=True, slots=True)
class BreakerOptions:
    """When the breaker opens and how long it stays open."""

    failure_threshold: int = 5
    failure_window_s: float = 1.0
    open_s: float = 0.5

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.failure_window_s <= 0 or self.open_s <= 0:
            raise ValueError("failure_window_s and open_s must be > 0")


class CircuitBreaker:
    """closed -> open after repeated failures -> half_open probe -> closed or open."""

    def __init__(
        self,
        options: BreakerOptions,
        clock: Callable[[], float],
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._options = options
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose time is up reads ``half_open``)."""
        if self._state == "open" and self._clock() - self._opened_at >= self._options.open_s:
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """True when a call may go through now (in half-open: the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """The call went through: close (a probe) and forget earlier failures."""
        self._failures.clear()
        self._probing = False
        if self._state != "closed":
            self._set("closed")

    def failure(self) -> None:
        """The call failed: open after a failed probe or the threshold's failure."""
        now = self._clock()
        if self._state == "half_open" or self._probing:
            self._open(now)
            return
        if self._state == "open":
            return  # a call let through before opening, failing late
        failures = self._failures
        failures.append(now)
        horizon = now - self._options.failure_window_s
        while failures and failures[0] < horizon:
            failures.popleft()
        if len(failures) >= self._options.failure_threshold:
            self._open(now)

    def abandon(self) -> None:
        """The call ended with no verdict (cancelled): let another probe go."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._failures.clear()
        self._probing = False
        self._opened_at = now
        self._set("open")

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)


class NodeBreakers:
    """One :class:`CircuitBreaker` per node name (a Redis Cluster's nodes), created on
    first use with the same options; ``on_change(node, state)`` reports transitions.

    Serves as the fetcher's ``NodeHealth``: a failing node opens only its own breaker,
    so its keys are degraded at once while the other nodes are read as usual.
    """

    def __init__(
        self,
        options: BreakerOptions,
        clock: Callable[[], float],
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self._options = options
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, node: str) -> CircuitBreaker:
        """The breaker of ``node`` (created closed on first use)."""
        found = self._breakers.get(node)
        if found is None:
            on_change = self._on_change
            report = None if on_change is None else (lambda s: on_change(node, s))
            found = self._breakers[node] = CircuitBreaker(self._options, self._clock, report)
        return found

    def states(self) -> dict[str, BreakerState]:
        """Every known node's breaker state now."""
        return {node: b.state for node, b in self._breakers.items()}

    def allow(self, node: str) -> bool:
        """Whether ``node`` may be read now."""
        return self.breaker(node).allow()

    def success(self, node: str) -> None:
        """``node`` answered."""
        self.breaker(node).success()

    def failure(self, node: str) -> None:
        """``node`` failed or was too slow."""
        self.breaker(node).failure()

    def abandon(self, node: str) -> None:
        """``node``'s read ended with no verdict (cancelled)."""
        self.breaker(node).abandon()
