"""The supervisor's restart policy, its shared counters, a crash loop (a log line per
crash, capped back-off, SIGTERM still drains) and a configuration error (not restarted).

The loops run the real ``Supervisor`` in a subprocess: it blocks signals and forks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.supervisor import RestartCounters, RestartPolicy

pytestmark = pytest.mark.integration  # starts real supervisor and child processes

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import os, signal, sys
from server.logs import configure_logging
from server.supervisor import RestartCounters, RestartPolicy, Supervisor

configure_logging("INFO", True)
mode = sys.argv[1]
counters = RestartCounters(2)

def child(index: int) -> int:
    if mode == "config":
        return 2
    if index == 0:
        return 3  # crashes at once, every time
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})  # a healthy process: drains on SIGTERM
    print("drained", counters.counts(0)[0], flush=True)
    return 0

code = Supervisor(2, child, RestartPolicy(0.01, 0.04, 60.0), counters).run()
print("parent exit", code, "counts", counters.counts(0), counters.counts(1), flush=True)
sys.exit(code)
"""


def _start(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), mode],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _records(line: str) -> dict[str, object] | None:
    try:
        record: dict[str, object] = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record


def test_backoff_doubles_from_initial_up_to_the_cap() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=30.0)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(10_000) == 30.0
    with pytest.raises(ValueError, match="backoff"):
        RestartPolicy(backoff_initial_s=2.0, backoff_max_s=1.0)


def test_restart_settings_name_both_keys_when_the_cap_is_below_the_start() -> None:
    from server.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="backoff_max_s") as error:
        load_settings(
            None,
            {},
            ["server.restarts.backoff_initial_s=5", "server.restarts.backoff_max_s=1"],
        )
    assert "backoff_initial_s" in str(error.value)


def test_counters_written_by_the_parent_are_read_by_a_forked_child() -> None:
    counters = RestartCounters(3)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: waits until the parent counted (after the fork), exits with it
        os.read(read_end, 1)
        crashes, restarts = counters.counts(2)
        os._exit(crashes * 10 + restarts)
    counters.crashed(2)
    counters.crashed(2)
    counters.restarted(2)
    os.write(write_end, b"x")
    os.close(write_end)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 21
    samples = {
        (s.name, s.labels["process_index"]): s.value
        for family in counters.collect()
        for s in family.samples
    }
    assert samples[("streamscore_server_process_crashes_total", "2")] == 2
    assert samples[("streamscore_server_process_restarts_total", "2")] == 1
    assert samples[("streamscore_server_process_restarts_total", "0")] == 0


@pytest.mark.timeout(60)
def test_a_crash_loop_is_logged_every_time_with_capped_backoff_and_sigterm_drains() -> None:
    process = _start("loop")
    assert process.stderr is not None
    crashes: list[dict[str, object]] = []
    try:
        for line in process.stderr:
            record = _records(line)
            if record and str(record.get("msg", "")).startswith("server process 0 crashed"):
                crashes.append(record)
                if len(crashes) == 8:
                    break
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert [c["consecutive"] for c in crashes] == list(range(1, 9))
    assert [c["restart_in_s"] for c in crashes] == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04]
    assert all(c["code"] == 3 and c["level"] == "ERROR" for c in crashes)
    assert "drained" in out  # the healthy process got SIGTERM and drained
    assert process.returncode == 3  # the crash-looping slot's last exit
    crashed, restarted = (int(x) for x in out.split("counts (")[1].split(")")[0].split(","))
    assert crashed >= 8 and restarted in (crashed - 1, crashed), out


@pytest.mark.timeout(60)
def test_a_configuration_error_is_not_restarted() -> None:
    process = _start("config")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2, err
    lines = [r for line in err.splitlines() if (r := _records(line))]
    refused = [r for r in lines if "configuration error" in str(r.get("msg"))]
    assert sorted(r["process_index"] for r in refused) == [0, 1]  # type: ignore[type-var]
    assert "counts (1, 0) (1, 0)" in out
