"""Serving-core benchmarks: streamscore vs the floor server, batching on/off, inline/thread.

Each scenario starts a server pinned to core 0 and the load generator pinned to
core 1 (this machine has 2 cores; they never share one), measures throughput and
latency with ``bench.loadgen``, and reads the server's CPU time over the
measurement window from ``/proc/<pid>/stat``. Because one Python gRPC client
core cannot always saturate one server core, the server's CPU microseconds per
request is reported beside throughput: it is the cost the server pays, whoever
is the bottleneck.

    python -m bench.serving_bench --duration 8 --json-out bench/results/serving.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, steal_seconds, taskset_prefix
from devstack.services import free_port, wait_for_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    """One server configuration under one load."""

    name: str
    server: str  # "streamscore" or "floor"
    settings: tuple[str, ...] = ()
    concurrency: int = 64
    connections: int = 4
    api: str = "score"
    v2_rows: int = 1
    rate: float | None = None
    loadgen_args: tuple[str, ...] = ()


@dataclass
class Measurement:
    """What one scenario measured."""

    scenario: Scenario
    throughput_rps: float
    latency_us: dict[str, Any]
    errors: dict[str, int]
    server_cpu_s: float
    server_cpu_us_per_request: float
    batch_rows_mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@contextlib.contextmanager
def _server(scenario: Scenario, repository: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    pin = taskset_prefix(SERVER_CPUS)
    if scenario.server == "floor":
        cmd = [*pin, sys.executable, "-m", "bench.floor_server", "--port", str(port)]
    else:
        overrides = [
            f"server.port={port}",
            "server.metrics_port=0",
            f"models.repository={repository}",
            "logging.level=WARNING",
            "features.definitions_path=null",
            # a fresh routing state per run: the repository's champion rule applies
            f"routing.file_path={tempfile.gettempdir()}/streamscore-bench-routing-{port}.json",
            *scenario.settings,
        ]
        cmd = [*pin, sys.executable, "-m", "server.cli", "serve"]
        for item in overrides:
            cmd += ["--set", item]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 60.0, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_scenario(
    scenario: Scenario, repository: Path, model: str, duration_s: float, warmup_s: float
) -> Measurement:
    """Run one scenario and return its measurement (the demo models are trained into
    ``repository`` first when it has none, as ``make run`` does)."""
    if not (repository / model).is_dir():
        from demo.train import build_demo_repository  # training deps

        print(f"training the demo models into {repository}/ ...", file=sys.stderr, flush=True)
        build_demo_repository(repository)
    port = free_port()
    manifest_dir = sorted((repository / model).iterdir())[-1]
    with _server(scenario, repository, port) as server:
        cmd = [
            *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.loadgen",
            "--target", f"127.0.0.1:{port}", "--api", scenario.api, "--model", model,
            "--manifest", str(manifest_dir), "--connections", str(scenario.connections),
            "--duration", str(duration_s), "--warmup", str(warmup_s),
            "--v2-rows", str(scenario.v2_rows),
        ]  # fmt: skip
        cmd += ["--rate", str(scenario.rate)] if scenario.rate else []
        cmd += ["--concurrency", str(scenario.concurrency), *scenario.loadgen_args]
        cpu: dict[str, float] = {}

        def sample_cpu() -> None:
            time.sleep(warmup_s + 1.0)  # client start-up (~1 s) plus warmup
            cpu["start"], cpu["t0"] = _cpu_seconds(server.pid), time.monotonic()
            cpu["steal_server0"] = steal_seconds(SERVER_CPUS)
            cpu["steal_client0"] = steal_seconds(CLIENT_CPUS)
            time.sleep(duration_s - 0.5)
            cpu["end"], cpu["t1"] = _cpu_seconds(server.pid), time.monotonic()
            cpu["steal_server1"] = steal_seconds(SERVER_CPUS)
            cpu["steal_client1"] = steal_seconds(CLIENT_CPUS)

        sampler = threading.Thread(target=sample_cpu)
        sampler.start()
        result = subprocess.run(cmd, capture_output=True, check=False)
        sampler.join()
        if result.returncode != 0:
            raise RuntimeError(f"loadgen failed: {result.stderr.decode()[-2000:]}")
        load = json.loads(result.stdout)
    throughput = float(load["throughput_rps"])
    cpu_s = cpu["end"] - cpu["start"]
    window_s = cpu["t1"] - cpu["t0"]
    cpu_rate = cpu_s / window_s  # cores busy
    return Measurement(
        scenario=scenario,
        throughput_rps=throughput,
        latency_us=load["latency_us"],
        errors=load["errors"],
        server_cpu_s=cpu_s,
        server_cpu_us_per_request=(cpu_rate / throughput * 1e6) if throughput else float("nan"),
        extra={
            "server_cores_busy": round(cpu_rate, 3),
            # share of the window the host took the server's / client's cores away
            "steal_server_cores": round(
                (cpu["steal_server1"] - cpu["steal_server0"]) / window_s, 4
            ),
            "steal_client_cores": round(
                (cpu["steal_client1"] - cpu["steal_client0"]) / window_s, 4
            ),
        },
    )


def default_scenarios() -> list[Scenario]:
    """The issue's targets: floor ratio, batching gain at 64 callers, idle latency at 1."""
    no_batch = ("models.defaults.max_batch_size=1",)
    thread = ("models.defaults.execution=thread",)
    inline = ("models.defaults.execution=inline",)
    return [
        Scenario("floor c64", "floor"),
        Scenario("streamscore inline c64", "streamscore", inline),
        Scenario("streamscore inline c64 bs1", "streamscore", inline + no_batch),
        Scenario("streamscore thread c64", "streamscore", thread),
        Scenario("streamscore thread c64 bs1", "streamscore", thread + no_batch),
        Scenario("floor c1", "floor", concurrency=1, connections=1),
        Scenario("streamscore inline c1", "streamscore", inline, concurrency=1, connections=1),
        Scenario("streamscore inline c1 bs1", "streamscore", inline + no_batch, 1, 1),
        Scenario("streamscore thread c1", "streamscore", thread, concurrency=1, connections=1),
        Scenario("streamscore thread c1 bs1", "streamscore", thread + no_batch, 1, 1),
        Scenario("floor v2x64 c16", "floor", concurrency=16, api="v2", v2_rows=64),
        Scenario(
            "streamscore v2x64 c16", "streamscore", inline, concurrency=16, api="v2", v2_rows=64
        ),
    ]


def format_table(measurements: Sequence[Measurement]) -> str:
    """A plain-text table of the measurements."""
    lines = [
        f"{'scenario':34} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'cpu us/req':>10} {'cores':>6}"
    ]
    for m in measurements:
        lines.append(
            f"{m.scenario.name:34} {m.throughput_rps:9.0f} {m.latency_us['p50']:8.0f} "
            f"{m.latency_us['p99']:8.0f} {m.server_cpu_us_per_request:10.1f} "
            f"{m.extra['server_cores_busy']:6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_bench", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", default=None, help="substring filter on scenario names")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    measurements = []
    for scenario in default_scenarios():
        if args.only and args.only not in scenario.name:
            continue
        measurement = run_scenario(
            scenario, args.repository, args.model, args.duration, args.warmup
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
