"""The parent of ``server.processes > 1``: forks the server processes and restarts crashed ones.

Policy (``server.restarts``):

* a child that exits without being asked to (a signal such as SIGKILL or OOM, a
  non-zero code, or even code 0) is forked again with the same ``process_index``
  (same metrics port), after a back-off of ``backoff_initial_s * 2**(n-1)`` capped at
  ``backoff_max_s``, where ``n`` counts the slot's consecutive short-lived crashes;
  a child that ran ``stable_after_s`` or longer resets ``n`` to 1;
* a child in a crash loop is therefore restarted at most once per ``backoff_max_s``,
  forever, and every crash is one ERROR log line (pid, index, exit code or signal,
  ``n``, next delay): nothing restarts silently;
* exit code 2 is a configuration error (e.g. ``redis.mode`` disagrees with the
  server): the slot is not restarted (it would fail the same way); when no child is
  left and none is due to restart, the parent exits with that code;
* SIGTERM/SIGINT: pending restarts are dropped, the signal is forwarded to every
  child (each drains), the parent waits for all of them; SIGHUP is forwarded.

Crash and restart counts live in a small anonymous shared memory map created before
the first fork, written only by the parent and read by every child's metrics
endpoint (``streamscore_server_process_crashes_total`` and
``streamscore_server_process_restarts_total`` by ``process_index``), so any one
child's scrape shows the whole process group. The parent runs no threads and no
event loop (it must stay safe to fork), so it serves no endpoint of its own.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: A child's exit code that means "the configuration is wrong": not restarted.
CONFIG_ERROR_EXIT_CODE = 2
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_SLOT = struct.Struct("=QQ")  # crashes, restarts


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a crashed server process is forked again."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")

    def delay(self, consecutive: int) -> float:
        """Back-off before restarting after the ``consecutive``-th short-lived crash."""
        exponent = min(max(consecutive, 1) - 1, 62)
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2.0**exponent))


class RestartCounters(Collector):
    """Per-slot crash and restart counts in shared memory (parent writes, children read)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, max(1, slots) * _SLOT.size)

    def _add(self, index: int, crashes: int, restarts: int) -> None:
        offset = index * _SLOT.size
        old_crashes, old_restarts = _SLOT.unpack_from(self._memory, offset)
        _SLOT.pack_into(self._memory, offset, old_crashes + crashes, old_restarts + restarts)

    def crashed(self, index: int) -> None:
        """Count one unrequested exit of slot ``index``."""
        self._add(index, 1, 0)

    def restarted(self, index: int) -> None:
        """Count one restart of slot ``index``."""
        self._add(index, 0, 1)

    def counts(self, index: int) -> tuple[int, int]:
        """``(crashes, restarts)`` of slot ``index``."""
        crashes, restarts = _SLOT.unpack_from(self._memory, index * _SLOT.size)
        return int(crashes), int(restarts)

    def collect(self) -> Iterator[CounterMetricFamily]:
        crashes = CounterMetricFamily(
            "streamscore_server_process_crashes",
            "Server processes that exited without being asked to, by process_index "
            "(kept by the parent; every process reports all of them).",
            labels=["process_index"],
        )
        restarts = CounterMetricFamily(
            "streamscore_server_process_restarts",
            "Server processes forked again by the parent after a crash, by process_index.",
            labels=["process_index"],
        )
        for index in range(self.slots):
            crashed, restarted = self.counts(index)
            crashes.add_metric([str(index)], crashed)
            restarts.add_metric([str(index)], restarted)
        yield crashes
        yield restarts


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    started: float = 0.0
    consecutive: int = 0
    restart_at: float | None = None
    last_code: int = 0


class Supervisor:
    """Forks ``count`` children running ``child(index)`` and keeps them running."""

    def __init__(
        self,
        count: int,
        child: Callable[[int], int],
        policy: RestartPolicy,
        counters: RestartCounters,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._child = child
        self._policy = policy
        self._counters = counters
        self._clock = clock
        self._slots = [_Slot(index) for index in range(count)]
        self._stopping = False
        self._mask: set[int | signal.Signals] = set()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT drained every child (or nothing is left to run);
        returns the worst exit code of the children's last exits."""
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for slot in self._slots:
                self._spawn(slot)
            while True:
                self._reap()
                alive = [s for s in self._slots if s.pid is not None]
                due = [s for s in self._slots if s.restart_at is not None]
                if not alive and (self._stopping or not due):
                    break
                now = self._clock()
                for slot in due:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        slot.restart_at = None
                        self._counters.restarted(slot.index)
                        self._spawn(slot)
                wait = min((s.restart_at - now for s in due if s.restart_at), default=1.0)
                received = signal.sigtimedwait(_SIGNALS, min(1.0, max(wait, 0.001)))
                if received is not None:
                    self._on_signal(signal.Signals(received.si_signo))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        return max((abs(s.last_code) for s in self._slots), default=0)

    def _spawn(self, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:  # child: its own signal handling, from a clean mask
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
                code = self._child(slot.index)
            finally:
                os._exit(code)
        slot.pid = pid
        slot.started = self._clock()
        logger.info("server process started", extra={"child_pid": pid, "process_index": slot.index})

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum is signal.SIGCHLD:
            return  # reaped on the next turn
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self._stopping:
                logger.info("signal received, draining every server process")
            self._stopping = True
            for slot in self._slots:
                slot.restart_at = None
        self._forward(signum)

    def _forward(self, signum: signal.Signals) -> None:
        for slot in self._slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: _Slot, code: int) -> None:
        pid, slot.pid, slot.last_code = slot.pid, None, code
        how = _describe(code)
        if self._stopping:
            log = logger.error if code != 0 else logger.info
            log(
                "server process stopped (%s)",
                how,
                extra={"child_pid": pid, "process_index": slot.index},
            )
            return
        self._counters.crashed(slot.index)
        ran = self._clock() - slot.started
        if code == CONFIG_ERROR_EXIT_CODE:
            logger.error(
                "server process %d exited with a configuration error (%s); not restarted",
                slot.index,
                how,
                extra={"child_pid": pid, "process_index": slot.index, "code": code},
            )
            return
        slot.consecutive = 1 if ran >= self._policy.stable_after_s else slot.consecutive + 1
        delay = self._policy.delay(slot.consecutive)
        slot.restart_at = self._clock() + delay
        logger.error(
            "server process %d crashed (%s) after %.1f s; restart in %.1f s (crash %d in a row)",
            slot.index,
            how,
            ran,
            delay,
            slot.consecutive,
            extra={
                "child_pid": pid,
                "process_index": slot.index,
                "code": code,
                "consecutive": slot.consecutive,
                "restart_in_s": delay,
            },
        )


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
