"""Every process busy? Per-process request counts under ONE client channel, N=1 vs N=2.

``server.processes: N`` shares the port through SO_REUSEPORT, which spreads
*connections*. A client with one channel holds one connection at a time, so it
lands on one process until ``server.connections.max_connection_age_s`` sends GOAWAY
and it reconnects (SO_REUSEPORT hashes the new 4-tuple: any process). Each scenario
starts ``streamscore serve`` pinned with taskset, drives it with ``bench.loadgen``
(closed loop, ``--connections`` channels), then reads every process's
``streamscore_requests_total`` from its own metrics port (``metrics_port + i``) and
the server's CPU time (all processes) from /proc.

    python -m bench.process_spread --duration 20 --json-out bench/results/process_spread.json

The machine is shared and has 2 cores: compare ratios within one run, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.pinning import taskset_prefix
from bench.serving_bench import CLOCK_TICKS
from devstack.services import free_port, wait_for_port


@dataclass(frozen=True)
class SpreadScenario:
    """One server layout under one client."""

    name: str
    processes: int
    server_cpus: tuple[int, ...]
    max_connection_age_s: float | None = 30.0
    connections: int = 1
    concurrency: int = 64
    settings: tuple[str, ...] = ()
    loadgen_args: tuple[str, ...] = ()


@dataclass
class SpreadMeasurement:
    """Per-process counts, throughput and server CPU of one scenario."""

    scenario: SpreadScenario
    throughput_rps: float
    per_process: list[int]
    spread_min_over_max: float
    errors: dict[str, int]
    server_cpu_s: float
    server_cpu_us_per_request: float
    latency_us: dict[str, Any] = field(default_factory=dict)


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return pids


def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def scrape_requests(metrics_port: int) -> int:
    """Sum of ``streamscore_requests_total`` of the process behind ``metrics_port``."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("streamscore_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _free_port_pair(count: int) -> int:
    """A port whose next ``count - 1`` ports are free too (metrics of N processes)."""
    for _ in range(50):
        base = free_port()
        if all(_is_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError("no run of free ports for the metrics endpoints")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def spread_server(
    repository: Path,
    processes: int,
    *,
    cpus: Sequence[int] | None = None,
    settings: Sequence[str] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``streamscore serve`` with ``processes`` processes: (process, port, metrics base)."""
    port = free_port()
    metrics = _free_port_pair(processes)
    overrides = [
        f"server.port={port}",
        f"server.metrics_port={metrics}",
        f"server.processes={processes}",
        f"models.repository={repository}",
        "logging.level=WARNING",
        "features.definitions_path=null",
        f"routing.file_path={tempfile.gettempdir()}/streamscore-spread-routing-{port}.json",
        *settings,
    ]
    cmd = [*(taskset_prefix(cpus) if cpus else []), sys.executable, "-m", "server.cli", "serve"]
    for item in overrides:
        cmd += ["--set", item]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 60.0, process)
        for index in range(processes):
            wait_for_port("127.0.0.1", metrics + index, 60.0, process)
        yield process, port, metrics
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def age_settings(age_s: float | None, grace_s: float = 10.0) -> tuple[str, ...]:
    """Overrides setting the connection age (None = never)."""
    if age_s is None:
        return ("server.connections.max_connection_age_s=null",)
    return (
        f"server.connections.max_connection_age_s={age_s}",
        f"server.connections.max_connection_age_grace_s={grace_s}",
    )


def run_scenario(
    scenario: SpreadScenario,
    repository: Path,
    model: str,
    duration_s: float,
    warmup_s: float,
    client_cpus: Sequence[int],
) -> SpreadMeasurement:
    """Run one scenario; the demo models are trained into ``repository`` if missing."""
    if not (repository / model).is_dir():
        from demo.train import build_demo_repository  # training deps

        build_demo_repository(repository)
    manifest_dir = sorted((repository / model).iterdir())[-1]
    settings = (*age_settings(scenario.max_connection_age_s), *scenario.settings)
    with spread_server(
        repository, scenario.processes, cpus=scenario.server_cpus, settings=settings
    ) as (server, port, metrics):
        pids = _process_tree(server.pid)
        cmd = [
            *taskset_prefix(client_cpus), sys.executable, "-m", "bench.loadgen",
            "--target", f"127.0.0.1:{port}", "--model", model, "--manifest", str(manifest_dir),
            "--connections", str(scenario.connections), "--concurrency",
            str(scenario.concurrency), "--duration", str(duration_s), "--warmup", str(warmup_s),
            *scenario.loadgen_args,
        ]  # fmt: skip
        loadgen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(warmup_s + 1.0)  # client start-up (~1 s) plus warmup
        cpu0 = _cpu_seconds(pids)
        counts0 = [scrape_requests(metrics + i) for i in range(scenario.processes)]
        time.sleep(max(duration_s - 0.5, 0.1))
        cpu1 = _cpu_seconds(pids)
        counts1 = [scrape_requests(metrics + i) for i in range(scenario.processes)]
        out, err = loadgen.communicate()
        if loadgen.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
    load = json.loads(out)
    per_process = [b - a for a, b in zip(counts0, counts1, strict=True)]
    served = sum(per_process)
    cpu_s = cpu1 - cpu0
    return SpreadMeasurement(
        scenario=scenario,
        throughput_rps=float(load["throughput_rps"]),
        per_process=per_process,
        spread_min_over_max=min(per_process) / max(per_process) if max(per_process) else 0.0,
        errors=load["errors"],
        server_cpu_s=round(cpu_s, 3),
        server_cpu_us_per_request=round(cpu_s / served * 1e6, 1) if served else float("nan"),
        latency_us={k: load["latency_us"][k] for k in ("p50", "p99")},
    )


def default_scenarios() -> list[SpreadScenario]:
    """N=1 vs N=2 with one channel: default age, short ages, and two channels for reference."""
    return [
        SpreadScenario("N=1 1ch age=30s", 1, (0,)),
        SpreadScenario("N=2 1ch age=30s", 2, (0, 1)),
        SpreadScenario("N=2 1ch age=1s", 2, (0, 1), max_connection_age_s=1.0),
        SpreadScenario("N=2 1ch age=0.1s", 2, (0, 1), max_connection_age_s=0.1),
        SpreadScenario("N=2 1ch age=0.02s", 2, (0, 1), max_connection_age_s=0.02),
        SpreadScenario("N=2 4ch age=30s", 2, (0, 1), connections=4),
    ]


def format_table(measurements: Sequence[SpreadMeasurement]) -> str:
    """Plain-text table."""
    lines = [
        f"{'scenario':22} {'req/s':>8} {'per process':>18} {'min/max':>8} "
        f"{'cpu us/req':>10} {'p99 us':>8} {'errors':>7}"
    ]
    for m in measurements:
        counts = "/".join(str(c) for c in m.per_process)
        lines.append(
            f"{m.scenario.name:22} {m.throughput_rps:8.0f} {counts:>18} "
            f"{m.spread_min_over_max:8.2f} {m.server_cpu_us_per_request:10.1f} "
            f"{m.latency_us.get('p99', 0):8.0f} {sum(m.errors.values()):7d}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.process_spread", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--client-cpus", default="1", help="taskset list of the load generator")
    parser.add_argument("--only", default=None, help="substring filter on scenario names")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    client_cpus = [int(c) for c in args.client_cpus.split(",")]
    measurements = []
    for scenario in default_scenarios():
        if args.only and args.only not in scenario.name:
            continue
        measurement = run_scenario(
            scenario, args.repository, args.model, args.duration, args.warmup, client_cpus
        )
        measurements.append(measurement)
        print(format_table([measurement]).splitlines()[1], file=sys.stderr, flush=True)
    print(format_table(measurements))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps([asdict(m) for m in measurements], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
