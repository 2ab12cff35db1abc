"""Hot-path bench: streamscore vs the empty floor and the bare ``session.run`` handler.

One command measures the three servers with the same clients and prints the ratios
the hot-path issue's goals name:

* NVIDIA perf_analyzer (external C++ client) over v2 ModelInfer, one row per request,
  1 and 16 concurrent requests;
* the project's load generator (``bench.loadgen``) over Score (all features sent),
  1 and 64 callers, and ScoreStream with one stream holding 64 requests in flight.

Every server (``streamscore serve`` with the demo ``fraud`` model, ``bench.floor_server
--handler empty`` and ``--handler bare``) runs pinned to core 0, every client to core 1
(``taskset``). The servers alternate within a round (the order rotates each round), a
ratio is computed per round from measurements made minutes apart at most, and the
medians over rounds are reported: the machine may be shared, so absolute numbers move.

    python -m bench.perf_bench --rounds 3 --json-out bench/results/perf.json

perf_analyzer is fetched into ``.cache/perf_analyzer`` on first use (see
``bench.perf_analyzer``); the demo models are trained into ``--repository`` when missing.

A/B of a change: ``--base DIR`` adds the server ``base``, ``streamscore serve`` run from
another source tree (e.g. a ``git archive`` of main) with this interpreter, alternated
with the others in every round; each goal's ratio is then also reported for ``base``
(the same run, the same reference servers):

    git -C /work/main archive HEAD | tar -x -C /tmp/main-src
    python -m bench.perf_bench --base /tmp/main-src --servers streamscore,base,bare,empty
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bench import perf_analyzer
from bench.pinning import CLIENT_CPUS, SERVER_CPUS, steal_seconds, taskset_prefix
from devstack.services import free_port, wait_for_port

SERVERS = ("streamscore", "empty", "bare")
#: ``streamscore serve`` from the ``--base`` source tree (A/B against another revision).
BASE = "base"
Client = Literal["perf_analyzer", "loadgen"]
CLIENTS: tuple[Client, ...] = ("perf_analyzer", "loadgen")


@dataclass(frozen=True)
class Workload:
    """One client load against one server."""

    name: str
    client: Client
    api: str  # "v2", "score" or "stream"
    concurrency: int
    connections: int = 1
    stream_window: int = 1


#: Run in this order against every server (the first one warms the server up).
WORKLOADS: tuple[Workload, ...] = (
    Workload("score c64", "loadgen", "score", 64, connections=4),
    Workload("v2 c1", "perf_analyzer", "v2", 1),
    Workload("v2 c16", "perf_analyzer", "v2", 16),
    Workload("score c1", "loadgen", "score", 1),
    Workload("stream 1x64", "loadgen", "stream", 1, stream_window=64),
)


@dataclass(frozen=True)
class Goal:
    """``numerator / denominator`` of one metric, with the issue's target."""

    name: str
    metric: Literal["throughput", "p50"]
    numerator: tuple[str, str]  # (server, workload)
    denominator: tuple[str, str]
    target: float
    at_most: bool  # True: ratio <= target; False: ratio >= target


GOALS: tuple[Goal, ...] = (
    Goal("v2 c1 p50 streamscore/bare", "p50", ("streamscore", "v2 c1"), ("bare", "v2 c1"),
         1.1, True),
    Goal("v2 c16 throughput streamscore/empty", "throughput", ("streamscore", "v2 c16"),
         ("empty", "v2 c16"), 0.9, False),
    Goal("score c1 p50 streamscore/bare", "p50", ("streamscore", "score c1"), ("bare", "score c1"),
         1.1, True),
    Goal("score c64 throughput streamscore/empty", "throughput", ("streamscore", "score c64"),
         ("empty", "score c64"), 0.9, False),
    Goal("stream 1x64 / unary c64 throughput, streamscore", "throughput",
         ("streamscore", "stream 1x64"), ("streamscore", "score c64"), 2.5, False),
)  # fmt: skip

#: Context ratios (no target): what the bare model costs over the floor.
CONTEXT: tuple[Goal, ...] = (
    Goal("v2 c1 p50 bare/empty", "p50", ("bare", "v2 c1"), ("empty", "v2 c1"), 0.0, True),
    Goal("v2 c16 throughput bare/empty", "throughput", ("bare", "v2 c16"), ("empty", "v2 c16"),
         0.0, False),
    Goal("v2 c16 throughput streamscore/bare", "throughput", ("streamscore", "v2 c16"),
         ("bare", "v2 c16"), 0.0, False),
    Goal("score c64 throughput streamscore/bare", "throughput", ("streamscore", "score c64"),
         ("bare", "score c64"), 0.0, False),
)  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    """What one workload measured on one server in one round (latencies in us)."""

    round: int
    server: str
    workload: str
    throughput: float
    p50_us: float
    p99_us: float
    errors: int = 0

    def metric(self, name: str) -> float:
        """``"throughput"`` or ``"p50"``."""
        return self.throughput if name == "throughput" else self.p50_us


@dataclass
class Ratio:
    """One goal's ratio per round and its median."""

    name: str
    per_round: list[float]
    median: float | None
    target: float | None
    at_most: bool
    met: bool | None = None


def compute_ratios(
    measurements: Sequence[Measurement], goals: Sequence[Goal] = GOALS
) -> list[Ratio]:
    """Per-round ratios of each goal (rounds missing either side are skipped) and medians."""
    by_key = {(m.round, m.server, m.workload): m for m in measurements}
    rounds = sorted({m.round for m in measurements})
    ratios = []
    for goal in goals:
        values = []
        for r in rounds:
            top, bottom = by_key.get((r, *goal.numerator)), by_key.get((r, *goal.denominator))
            if top is None or bottom is None or bottom.metric(goal.metric) <= 0:
                continue
            values.append(top.metric(goal.metric) / bottom.metric(goal.metric))
        median = statistics.median(values) if values else None
        target = goal.target or None
        met = None
        if median is not None and target is not None:
            met = median <= target if goal.at_most else median >= target
        ratios.append(Ratio(goal.name, values, median, target, goal.at_most, met))
    return ratios


def medians(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    """Median throughput/p50/p99 per (server, workload) over the rounds."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.server, m.workload), []).append(m)
    return [
        {
            "server": server,
            "workload": workload,
            "rounds": len(ms),
            "throughput": statistics.median(m.throughput for m in ms),
            "p50_us": statistics.median(m.p50_us for m in ms),
            "p99_us": statistics.median(m.p99_us for m in ms),
        }
        for (server, workload), ms in groups.items()
    ]


def server_order(round_index: int, servers: Sequence[str] = SERVERS) -> list[str]:
    """Servers of round ``round_index``, rotated so that none is always first."""
    shift = round_index % len(servers)
    return [*servers[shift:], *servers[:shift]]


@dataclass(frozen=True)
class BenchConfig:
    """One bench run."""

    repository: Path = Path("models")
    model: str = "fraud"
    version: str | None = None  # default: the highest version in the repository
    rounds: int = 3
    servers: tuple[str, ...] = SERVERS
    workloads: tuple[str, ...] = tuple(w.name for w in WORKLOADS)
    pa_window_ms: int = 2000
    pa_trials: int = 3
    pa_async: bool = True
    loadgen_duration_s: float = 5.0
    loadgen_warmup_s: float = 1.0
    pa_cache: Path = perf_analyzer.DEFAULT_CACHE
    server_settings: tuple[str, ...] = field(default_factory=tuple)
    #: Source tree the ``base`` server runs from (``None``: no ``base`` server).
    base: Path | None = None


def _version_dir(config: BenchConfig) -> Path:
    from server.router import version_sort_key

    model_dir = config.repository / config.model
    if not model_dir.is_dir():
        from demo.train import build_demo_repository  # training deps

        print(f"training the demo models into {config.repository}/ ...", file=sys.stderr)
        build_demo_repository(config.repository)
    if config.version is not None:
        return model_dir / config.version
    versions = [p.name for p in model_dir.iterdir() if (p / "manifest.json").is_file()]
    return model_dir / max(versions, key=version_sort_key)


def server_command(server: str, config: BenchConfig, version_dir: Path, port: int) -> list[str]:
    """argv (pinned to the server core) starting ``server`` on ``port``."""
    pin = taskset_prefix(SERVER_CPUS)
    if server in ("empty", "bare"):
        return [
            *pin, sys.executable, "-m", "bench.floor_server", "--host", "127.0.0.1",
            "--port", str(port), "--handler", server, "--model-dir", str(version_dir),
        ]  # fmt: skip
    if server not in ("streamscore", BASE):
        raise ValueError(f"unknown server {server!r}; expected one of {SERVERS} or {BASE!r}")
    overrides = [
        f"server.port={port}",
        "server.metrics_port=0",
        f"models.repository={config.repository}",
        f"models.per_model.{config.model}.champion={version_dir.name}",
        "logging.level=WARNING",
        "features.definitions_path=null",  # features sent: no store
        f"routing.file_path={tempfile.gettempdir()}/streamscore-perfbench-routing-{port}.json",
        *config.server_settings,
    ]
    cmd = [*pin, sys.executable, "-m", "server.cli", "serve"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def server_source(server: str, config: BenchConfig) -> Path | None:
    """The source tree ``server`` runs from (cwd and ``PYTHONPATH``); None: this one."""
    if server != BASE:
        return None
    if config.base is None:
        raise ValueError("server 'base' needs --base DIR")
    return config.base.resolve()


@contextlib.contextmanager
def running_server(
    argv: Sequence[str], port: int, source: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` (from ``source`` when given: its cwd and ``PYTHONPATH``), wait
    until ``port`` accepts connections, stop it on exit."""
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=source, env=env)
    try:
        wait_for_port("127.0.0.1", port, 120.0, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_loadgen(
    workload: Workload, config: BenchConfig, version_dir: Path, port: int
) -> tuple[float, float, float, int]:
    cmd = [
        *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.loadgen",
        "--target", f"127.0.0.1:{port}", "--api", workload.api, "--model", config.model,
        "--manifest", str(version_dir), "--connections", str(workload.connections),
        "--concurrency", str(workload.concurrency), "--stream-window", str(workload.stream_window),
        "--duration", str(config.loadgen_duration_s), "--warmup", str(config.loadgen_warmup_s),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen {workload.name} failed: {done.stderr.decode()[-2000:]}")
    result = json.loads(done.stdout)
    latency = result["latency_us"]
    errors = sum(result["errors"].values())
    return float(result["throughput_rps"]), latency["p50"], latency["p99"], errors


def _run_pa(
    workload: Workload, config: BenchConfig, pa: perf_analyzer.PerfAnalyzer, port: int, tmp: Path
) -> tuple[float, float, float, int]:
    csv_path = tmp / "pa.csv"
    argv = perf_analyzer.command(
        pa,
        target=f"127.0.0.1:{port}",
        model=config.model,
        concurrency=workload.concurrency,
        csv_path=csv_path,
        window_ms=config.pa_window_ms,
        trials=config.pa_trials,
        use_async=config.pa_async,
    )
    result = perf_analyzer.run(argv, pa, csv_path, prefix=taskset_prefix(CLIENT_CPUS))
    return result.infer_per_s, result.p50_us, result.p99_us, 0


def _absolute_paths(argv: list[str], version_dir: Path, config: BenchConfig) -> list[str]:
    repository = f"models.repository={config.repository}"
    return [
        f"models.repository={config.repository.resolve()}" if item == repository else item
        for item in argv
    ]


def base_goals(goals: Sequence[Goal]) -> list[Goal]:
    """``goals`` with ``streamscore`` replaced by ``base`` (named ``[base] ...``)."""

    def swap(side: tuple[str, str]) -> tuple[str, str]:
        return (BASE, side[1]) if side[0] == "streamscore" else side

    return [
        Goal(f"[base] {g.name}", g.metric, swap(g.numerator), swap(g.denominator), g.target,
             g.at_most)
        for g in goals
    ]  # fmt: skip


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run every round and return the JSON document (measurements, medians, ratios)."""
    workloads = [w for w in WORKLOADS if w.name in config.workloads]
    unknown = set(config.workloads) - {w.name for w in WORKLOADS}
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}")
    version_dir = _version_dir(config)
    pa = None
    if any(w.client == "perf_analyzer" for w in workloads):
        pa = perf_analyzer.ensure_perf_analyzer(config.pa_cache)
    measurements: list[Measurement] = []
    started = datetime.now(UTC)
    steal_before = steal_seconds((*SERVER_CPUS, *CLIENT_CPUS))
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="perfbench-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(config.rounds):
            for server in server_order(r, config.servers):
                port = free_port()
                argv = server_command(server, config, version_dir, port)
                if server == BASE:  # its paths must not depend on the cwd it runs in
                    argv = _absolute_paths(argv, version_dir, config)
                with running_server(argv, port, server_source(server, config)):
                    for workload in workloads:
                        if workload.client == "loadgen":
                            values = _run_loadgen(workload, config, version_dir, port)
                        else:
                            assert pa is not None
                            values = _run_pa(workload, config, pa, port, tmp)
                        m = Measurement(r, server, workload.name, *values)
                        measurements.append(m)
                        print(
                            f"round {r} {server:11} {workload.name:11} {m.throughput:9.0f}/s "
                            f"p50 {m.p50_us:7.0f} us p99 {m.p99_us:7.0f} us"
                            + (f" errors {m.errors}" if m.errors else ""),
                            file=sys.stderr,
                            flush=True,
                        )
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": {
            **json.loads(json.dumps(asdict(config), default=str)),
            "version_dir": str(version_dir),
        },
        "load_average_at_end": list(os.getloadavg()),
        "cpus": sorted(os.sched_getaffinity(0)),
        "measurements": [asdict(m) for m in measurements],
        "medians": medians(measurements),
        "ratios": [asdict(r) for r in compute_ratios(measurements)],
        "context_ratios": [asdict(r) for r in compute_ratios(measurements, CONTEXT)],
        "base_ratios": [asdict(r) for r in compute_ratios(measurements, base_goals(GOALS))]
        if BASE in config.servers
        else [],
        "load_average_at_start": load_before,
        "steal_s": round(steal_seconds((*SERVER_CPUS, *CLIENT_CPUS)) - steal_before, 2),
    }


def format_report(document: dict[str, Any]) -> str:
    """Median table and ratio lines of a ``run_bench`` document."""
    lines = [f"{'server':12} {'workload':12} {'req/s':>9} {'p50 us':>8} {'p99 us':>8}"]
    for row in sorted(document["medians"], key=lambda d: (d["workload"], d["server"])):
        lines.append(
            f"{row['server']:12} {row['workload']:12} {row['throughput']:9.0f} "
            f"{row['p50_us']:8.0f} {row['p99_us']:8.0f}"
        )
    lines.append("")
    for ratio in [
        *document["ratios"],
        *document.get("base_ratios", []),
        *document["context_ratios"],
    ]:
        rounds = ", ".join(f"{v:.2f}" for v in ratio["per_round"])
        median = "n/a" if ratio["median"] is None else f"{ratio['median']:.2f}x"
        goal = ""
        if ratio["target"] is not None:
            sign = "<=" if ratio["at_most"] else ">="
            goal = f"  (goal {sign} {ratio['target']}: {'met' if ratio['met'] else 'NOT met'})"
        lines.append(f"{ratio['name']:48} median {median} [{rounds}]{goal}")
    return "\n".join(lines)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.perf_bench``."""
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.perf_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--repository", type=Path, default=d.repository)
    p.add_argument("--model", default=d.model)
    p.add_argument("--version", default=None, help="model version (default: the highest)")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument(
        "--servers", type=_csv, default=d.servers, help="comma list of " + ",".join(SERVERS)
    )
    p.add_argument("--workloads", type=_csv, default=d.workloads,
                   help="comma list of: " + ", ".join(w.name for w in WORKLOADS))  # fmt: skip
    p.add_argument("--pa-window-ms", type=int, default=d.pa_window_ms)
    p.add_argument("--pa-trials", type=int, default=d.pa_trials, help="windows (at least 3)")
    p.add_argument("--pa-sync", action="store_true", help="perf_analyzer without --async")
    p.add_argument("--duration", type=float, default=d.loadgen_duration_s, help="loadgen seconds")
    p.add_argument("--warmup", type=float, default=d.loadgen_warmup_s, help="loadgen warmup")
    p.add_argument("--pa-cache", type=Path, default=d.pa_cache)
    p.add_argument("--set", dest="settings", action="append", default=[],
                   help="streamscore setting key.path=value (repeatable)")  # fmt: skip
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="source tree of the extra server 'base' (A/B against another revision)",
    )
    p.add_argument("--json-out", type=Path, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Map parsed arguments onto a ``BenchConfig`` (raises ``ValueError`` if invalid)."""
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    unknown = set(args.servers) - {*SERVERS, BASE}
    if unknown or not args.servers:
        raise ValueError(f"--servers: unknown {sorted(unknown)}; expected some of {SERVERS}")
    if (BASE in args.servers) != (args.base is not None):
        raise ValueError("--base DIR and the server 'base' go together")
    known = {w.name for w in WORKLOADS}
    if set(args.workloads) - known or not args.workloads:
        raise ValueError(f"--workloads: unknown {sorted(set(args.workloads) - known)}")
    return BenchConfig(
        repository=args.repository,
        model=args.model,
        version=args.version,
        rounds=args.rounds,
        servers=args.servers,
        workloads=args.workloads,
        pa_window_ms=args.pa_window_ms,
        pa_trials=args.pa_trials,
        pa_async=not args.pa_sync,
        loadgen_duration_s=args.duration,
        loadgen_warmup_s=args.warmup,
        pa_cache=args.pa_cache,
        server_settings=tuple(args.settings),
        base=args.base,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    t0 = time.monotonic()
    document = run_bench(config)
    document["wall_s"] = round(time.monotonic() - t0, 1)
    print(format_report(document))
    out = args.json_out
    if out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = Path(__file__).resolve().parent / "results" / f"perf-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
