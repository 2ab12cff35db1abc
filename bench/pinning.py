"""CPU pinning for benchmarks.

On the 2-core benchmark machine the server under test runs on core 0 and the load
generator on core 1, so they never steal each other's CPU and a result says which
side saturated::

    taskset -c 0 python -m bench.floor_server --port 50051
    taskset -c 1 python -m bench.loadgen --target 127.0.0.1:50051 --concurrency 16

Or from Python (e.g. a benchmark suite starting subprocesses)::

    cmd = [*taskset_prefix(SERVER_CPUS), sys.executable, "-m", "bench.floor_server", ...]

``taskset`` (util-linux) sets the affinity of the process it starts and all its
children, so ``--processes N`` servers share the CPUs given (pin N processes to N
cores, e.g. ``taskset -c 0,1``, only when nothing else runs there). Pinning does not
isolate: other processes may still run on those cores, and on a virtual machine the
host may take a core away (steal time, ``steal_seconds``), which a guest's load
average does not show.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

#: Benchmark convention on the 2-core machine.
SERVER_CPUS: tuple[int, ...] = (0,)
CLIENT_CPUS: tuple[int, ...] = (1,)


def cpu_list(cpus: Iterable[int] | str) -> str:
    """``taskset -c`` syntax for ``cpus`` (``"0"``, ``"0,1"``; a string is checked as is)."""
    if isinstance(cpus, str):
        text = cpus.strip()
        allowed = set("0123456789,-")
        if not text or not set(text) <= allowed:
            raise ValueError(f"not a CPU list: {cpus!r}")
        return text
    values = sorted(set(cpus))
    if not values or any(cpu < 0 for cpu in values):
        raise ValueError(f"not a CPU list: {values!r}")
    return ",".join(str(cpu) for cpu in values)


def taskset_prefix(cpus: Iterable[int] | str, *, taskset: str = "taskset") -> list[str]:
    """The argv prefix ``[taskset, "-c", "<cpus>"]`` pinning a command to ``cpus``."""
    return [taskset, "-c", cpu_list(cpus)]


def pinned(command: Iterable[str], cpus: Iterable[int] | str) -> list[str]:
    """``command`` prefixed with ``taskset -c cpus``."""
    return [*taskset_prefix(cpus), *command]


def taskset_available() -> bool:
    """True if ``taskset`` is on PATH."""
    return shutil.which("taskset") is not None


def usable_cpus() -> frozenset[int]:
    """CPUs this process may run on (pin only within these)."""
    return frozenset(os.sched_getaffinity(0))


def steal_seconds(cpus: Iterable[int], stat_text: str | None = None) -> float:
    """Steal time of ``cpus`` so far (seconds): time a virtual CPU was runnable but the
    host ran something else, counted by the guest as CPU time of whatever was running.
    ``stat_text``: the text of ``/proc/stat`` (read when None); 0.0 where not reported."""
    text = Path("/proc/stat").read_text() if stat_text is None else stat_text
    wanted = {f"cpu{cpu}" for cpu in cpus}
    ticks = 0
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted and len(fields) > 8:
            ticks += int(fields[8])  # user nice system idle iowait irq softirq steal
    return ticks / os.sysconf("SC_CLK_TCK")
