"""Shadow overhead on the answer, and replay throughput at max pace.

Overhead: the same open-loop rate against a server with no shadow and with one
shadow version (server pinned to core 0, load generator to core 1), compared at
p99 of the answer latency. Target: p99 with one shadow <= 1.1 x p99 without. The
shadow run also scrapes the server's /metrics to prove shadows really ran
(``streamscore_shadow_compared_total`` > 0) and reports what was shed.

Replay: records ``--replay-records`` answers (Score with ``echo_features``) as
traffic records, then runs ``python -m server.clients.replay --pace max`` on core 1 against
the server on core 0, pinned to the recorded version, and reports throughput,
latency and agreement (100 % expected: same version, frozen features).

    python -m bench.shadow_bench --duration 10 --rate 1000 --json-out bench/results/shadow.json

The shadow is set through the admin API once the server is up (``streamscore models
route <model> --shadow <version>``; each server gets a fresh routing state file and
admin token). Both scenarios get the same ``--setting KEY=VALUE`` list (repeatable;
``{kafka}`` and ``{topic}`` are filled in), by default the shadow-record sink keys
``shadow.records_topic`` and ``kafka.bootstrap_servers``, so both servers are
configured alike and only the routing differs. The overhead part needs the pipeline's
shadow hook (wired in ``server.app``); ``--parts replay`` needs nothing extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.payloads import PayloadSpec, feature_matrix
from bench.pinning import CLIENT_CPUS, SERVER_CPUS, cpu_list, taskset_prefix
from devstack.services import free_port, kafka_broker, wait_for_port, with_parent_death_signal
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.clients.replay import record_from_exchange

TARGET_RATIO = 1.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_SETTINGS = ("shadow.records_topic={topic}", "kafka.bootstrap_servers={kafka}")
ADMIN_TOKEN = secrets.token_hex(16)


@contextlib.contextmanager
def server(
    repository: Path,
    model: str,
    live: str,
    port: int,
    metrics_port: int,
    extra: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``streamscore serve`` on core 0 with ``live`` as champion and its own routing state
    file; always stopped. ``env``: added to this process's environment for the server."""
    state_dir = tempfile.TemporaryDirectory()
    overrides = [
        f"routing.file_path={state_dir.name}/routing.json",
        f"server.admin_token={ADMIN_TOKEN}",
        f"server.port={port}",
        f"server.metrics_port={metrics_port}",
        f"models.repository={repository}",
        f"models.per_model.{model}.champion={live}",
        "logging.level=WARNING",
        "features.definitions_path=null",
        *extra,
    ]
    # ends with the bench even if the bench is killed (a dead bench left servers behind)
    taskset = shutil.which("taskset") or "/usr/bin/taskset"
    serve = [sys.executable, "-m", "server.cli", "serve"]
    cmd = with_parent_death_signal([*taskset_prefix(SERVER_CPUS, taskset=taskset), *serve])
    for item in overrides:
        cmd += ["--set", item]
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        try:
            wait_for_port("127.0.0.1", port, 60.0, process)
        except RuntimeError:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"server did not start: {stderr[-2000:]}") from None
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
        state_dir.cleanup()


def set_shadow(port: int, model: str, shadow: str) -> None:
    """Make ``shadow`` a shadow of ``model`` through the admin API."""
    route(port, model, ["--shadow", shadow])


def set_canary(port: int, model: str, canary: str) -> None:
    """Make ``canary`` a 50% sticky canary of ``model`` through the admin API."""
    route(port, model, ["--canary", canary, "--share", "50"])


def route(port: int, model: str, flags: list[str]) -> None:
    """``streamscore models route`` against the bench server."""
    cmd = [
        sys.executable, "-m", "server.cli", "models", "route", model, *flags,
        "--reason", "shadow bench", "--target", f"127.0.0.1:{port}",
        "--set", f"server.admin_token={ADMIN_TOKEN}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"setting the shadow failed: {result.stderr.decode()[-2000:]}")


def load(port: int, model: str, manifest: Path, rate: float, duration: float, warmup: float) -> Any:
    """One open-loop run of ``bench.loadgen`` on core 1; its JSON result."""
    cmd = [
        *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "bench.loadgen",
        "--target", f"127.0.0.1:{port}", "--api", "score", "--model", model,
        "--manifest", str(manifest), "--rate", str(rate), "--connections", "2",
        "--duration", str(duration), "--warmup", str(warmup),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr.decode()[-2000:]}")
    return json.loads(result.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def shadow_counters(metrics_port: int) -> dict[str, float]:
    """Sums of the shadow families on the server's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(("streamscore_shadow", "streamscore_record_sink")):
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                key = s.name + "".join(
                    f"|{k}={v}" for k, v in sorted(s.labels.items()) if k == "reason"
                )
                totals[key] = totals.get(key, 0.0) + s.value
    return totals


def canary_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The answer with champion-only routing vs a 50% sticky canary (same load)."""
    manifest = args.repository / args.model / args.live
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in ("champion only", "canary 50%"):
            port, metrics_port = free_port(), free_port()
            with server(args.repository, args.model, args.live, port, metrics_port, []) as proc:
                if name == "canary 50%":
                    set_canary(port, args.model, args.shadow)
                cpu_before = cpu_seconds(proc.pid)
                result = load(port, args.model, manifest, args.rate, args.duration, args.warmup)
                cpu = cpu_seconds(proc.pid) - cpu_before
            sent = result["sent"] * (args.duration + args.warmup) / args.duration
            runs.append(
                {
                    "scenario": name,
                    "repeat": repeat,
                    "latency_us": result["latency_us"],
                    "throughput_rps": result["throughput_rps"],
                    "errors": result["errors"],
                    "server_cpu_us_per_request": round(cpu / sent * 1e6, 1) if sent else None,
                }
            )
            lat = result["latency_us"]
            print(f"{name:13} #{repeat} p50={lat['p50']} p99={lat['p99']}", file=sys.stderr)
    medians = {
        name: {
            key: float(np.median([r["latency_us"][key] for r in runs if r["scenario"] == name]))
            for key in ("p50", "p99")
        }
        | {
            "cpu_us_per_request": float(
                np.median([r["server_cpu_us_per_request"] for r in runs if r["scenario"] == name])
            )
        }
        for name in ("champion only", "canary 50%")
    }
    return {
        "rate": args.rate,
        "runs": runs,
        "medians": medians,
        "p99_ratio": medians["canary 50%"]["p99"] / medians["champion only"]["p99"],
        "cpu_ratio": medians["canary 50%"]["cpu_us_per_request"]
        / medians["champion only"]["cpu_us_per_request"],
    }


def overhead(args: argparse.Namespace, kafka: str | None) -> dict[str, Any]:
    """p99 of the answer with and without one shadow, ``args.repeats`` times each."""
    manifest = args.repository / args.model / args.live
    topic = "shadow-records"
    defaults = DEFAULT_SETTINGS if kafka else ("shadow.records_topic=null",)
    settings = [s.format(kafka=kafka or "", topic=topic) for s in (args.setting or defaults)]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in ("none", "one shadow"):
            port, metrics_port = free_port(), free_port()
            with server(
                args.repository, args.model, args.live, port, metrics_port, settings
            ) as process:
                if name == "one shadow":
                    set_shadow(port, args.model, args.shadow)
                cpu_before = cpu_seconds(process.pid)
                result = load(port, args.model, manifest, args.rate, args.duration, args.warmup)
                cpu = cpu_seconds(process.pid) - cpu_before
                counters = shadow_counters(metrics_port)
            sent = result["sent"] * (args.duration + args.warmup) / args.duration
            run = {
                "scenario": name,
                "repeat": repeat,
                "latency_us": result["latency_us"],
                "throughput_rps": result["throughput_rps"],
                "errors": result["errors"],
                "skipped": result["skipped"],
                "shadow_counters": counters,
                # whole run (warmup included) over requests sent in it, approximately
                "server_cpu_us_per_request": round(cpu / sent * 1e6, 1) if sent else None,
            }
            runs.append(run)
            lat = result["latency_us"]
            print(
                f"{name:11} #{repeat} p50={lat['p50']} p99={lat['p99']} p99.9={lat['p99.9']} "
                f"rps={result['throughput_rps']:.0f} "
                f"cpu/req={run['server_cpu_us_per_request']}us "
                f"shadow={ {k: v for k, v in counters.items() if v} }",
                file=sys.stderr,
                flush=True,
            )
    base = [r["latency_us"]["p99"] for r in runs if r["scenario"] == "none"]
    shadow = [r["latency_us"]["p99"] for r in runs if r["scenario"] == "one shadow"]
    compared = sum(
        v
        for r in runs
        if r["scenario"] == "one shadow"
        for k, v in r["shadow_counters"].items()
        if k.startswith("streamscore_shadow_compared_total")
    )
    ratio = float(np.median(shadow)) / float(np.median(base)) if base and shadow else None
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "settings": settings,
        "shadow_version": args.shadow,
        "runs": runs,
        "p99_none_us": float(np.median(base)),
        "p99_shadow_us": float(np.median(shadow)),
        "p99_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "shadows_ran": compared > 0,
        "meets_target": bool(compared > 0 and ratio is not None and ratio <= TARGET_RATIO),
    }


async def record_traffic(target: str, model: str, live: str, manifest: Path, n: int) -> list[str]:
    """Score ``n`` requests pinned to ``live`` with echo_features; traffic records as lines."""
    spec = PayloadSpec.from_manifest(manifest)
    threshold = json.loads((manifest / "manifest.json").read_text())["threshold"]
    values = feature_matrix(spec.features, np.random.default_rng(5), n).tolist()
    lines: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        base = time.time()
        for i, row in enumerate(values):
            request = pb.ScoreRequest(
                model=model,
                model_version=live,
                request_id=f"bench-{i}",
                features=dict(zip(spec.features, row, strict=True)),
                echo_features=True,
            )
            response = await stub.Score(request)
            record = record_from_exchange(request, response, threshold=threshold, ts=base + i / 1e3)
            lines.append(json.dumps(record))
    return lines


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """Replay throughput at max pace, same version, frozen features."""
    manifest = args.repository / args.model / args.live
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "traffic.jsonl", Path(tmp) / "replay.json"
        with server(args.repository, args.model, args.live, port, 0, []):
            lines = asyncio.run(
                record_traffic(
                    f"127.0.0.1:{port}", args.model, args.live, manifest, args.replay_records
                )
            )
            path.write_text("\n".join(lines) + "\n")
            cmd = [
                *taskset_prefix(CLIENT_CPUS), sys.executable, "-m", "server.clients.replay",
                "--file", str(path), "--target", f"127.0.0.1:{port}", "--pace", "max",
                "--version", args.live, "--concurrency", str(args.replay_concurrency),
                "--connections", "2", "--json-out", str(out),
            ]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"replay failed: {result.stderr.decode()[-2000:]}")
            print(result.stderr.decode(), file=sys.stderr, flush=True)
            report = json.loads(out.read_text())
    return {
        "records": report["records"],
        "ok": report["ok"],
        "errors": report["errors"],
        "throughput_rps": report["throughput_rps"],
        "agreement_rate": report["agreement_rate"],
        "identical": report["identical"],
        "latency_us": report["latency_us"],
        "concurrency": args.replay_concurrency,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow_bench", description=__doc__)
    defaults = ", ".join(DEFAULT_SETTINGS)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--live", default="1", help="champion version (answers)")
    parser.add_argument("--shadow", default="2", help="shadow version")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per scenario (alternated)")
    parser.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=f"server setting of both scenarios (repeatable); default: {defaults}",
    )
    parser.add_argument("--no-kafka", action="store_true", help="no broker: shadow metrics only")
    parser.add_argument("--replay-records", type=int, default=5000)
    parser.add_argument("--replay-concurrency", type=int, default=64)
    parser.add_argument("--parts", default="overhead,canary,replay", help="overhead,canary,replay")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    document: dict[str, Any] = {"schema": "streamscore.bench.shadow/1"}
    if "overhead" in parts:
        if args.no_kafka:
            document["overhead"] = overhead(args, None)
        else:
            with (
                tempfile.TemporaryDirectory() as tmp,
                kafka_broker(log_file=Path(tmp) / "broker.log") as broker,
            ):
                # All broker threads off the server's core (in production it is remote).
                cpus = cpu_list(CLIENT_CPUS)
                pin = ["taskset", "-a", "-p", "-c", cpus, str(broker.process.pid)]
                subprocess.run(pin, check=True, capture_output=True)
                document["overhead"] = overhead(args, broker.bootstrap_servers)
        o = document["overhead"]
        print(
            f"shadow overhead: p99 none={o['p99_none_us']:.0f}us one shadow="
            f"{o['p99_shadow_us']:.0f}us ratio={o['p99_ratio']} (target <= {TARGET_RATIO}; "
            f"shadows ran: {o['shadows_ran']})"
        )
    if "canary" in parts:
        document["canary"] = c = canary_overhead(args)
        print(
            f"canary routing: p99 champion-only={c['medians']['champion only']['p99']:.0f}us "
            f"canary 50%={c['medians']['canary 50%']['p99']:.0f}us ratio={c['p99_ratio']:.2f}, "
            f"cpu/req ratio {c['cpu_ratio']:.2f}"
        )
    if "replay" in parts:
        document["replay"] = r = replay(args)
        print(
            f"replay at max pace: {r['throughput_rps']:.0f} req/s, agreement "
            f"{r['agreement_rate']}, p99 {r['latency_us']['p99']}us, errors {r['errors'] or 0}"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
