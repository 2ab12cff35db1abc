r"""Decision record overhead: every decision recorded vs recording off.

The same open-loop rate (near half the server's capacity) against a server with
``traffic_log.sample_rate=0`` and one with every decision recorded (``sample_rate=1``,
``delivery=durable``: acks=all, spill directory), server pinned to core 0, load
generator and the Tansu broker on core 1, scenarios alternated ``--repeats`` times.
Reported: p99 of the answer and server CPU per request (whole run over requests sent),
medians per scenario and their ratios (targets: p99 <= 1.1x, CPU <= 1.15x), plus the
record sink's counters (records sent to Kafka, spilled, dropped) proving the records
were really written.

    python -m bench.decision_bench --rate 1500 --duration 8 --repeats 3 \
        --json-out bench/results/decision_record.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.pinning import CLIENT_CPUS, cpu_list
from bench.shadow_bench import cpu_seconds, load, server, shadow_counters
from devstack.services import free_port, kafka_broker

P99_TARGET = 1.1
CPU_TARGET = 1.15
SCENARIOS = ("off", "every decision")


def _settings(name: str, kafka: str, spill: Path) -> list[str]:
    common = [f"kafka.bootstrap_servers={kafka}", "shadow.records_topic=null"]
    if name == "off":
        return [*common, "traffic_log.sample_rate=0"]
    return [
        *common,
        "traffic_log.sample_rate=1",
        "traffic_log.delivery=durable",
        f"records.durable.spill_dir={spill}",
        "traffic_log.topic=streamscore.decisions",
    ]


def overhead(args: argparse.Namespace, kafka: str) -> dict[str, Any]:
    """p99 and CPU per request with and without the decision record."""
    manifest = args.repository / args.model / args.live
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in SCENARIOS:
            port, metrics_port = free_port(), free_port()
            with tempfile.TemporaryDirectory() as spill:
                settings = _settings(name, kafka, Path(spill))
                with server(
                    args.repository, args.model, args.live, port, metrics_port, settings
                ) as process:
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
                "sink_counters": {k: v for k, v in counters.items() if v},
                "server_cpu_us_per_request": round(cpu / sent * 1e6, 1) if sent else None,
            }
            runs.append(run)
            lat = result["latency_us"]
            print(
                f"{name:14} #{repeat} p50={lat['p50']} p99={lat['p99']} "
                f"rps={result['throughput_rps']:.0f} cpu/req={run['server_cpu_us_per_request']}us "
                f"sink={run['sink_counters']}",
                file=sys.stderr,
                flush=True,
            )

    def median(name: str, pick: Any) -> float:
        return float(np.median([pick(r) for r in runs if r["scenario"] == name]))

    p99 = {n: median(n, lambda r: r["latency_us"]["p99"]) for n in SCENARIOS}
    cpu_us = {n: median(n, lambda r: r["server_cpu_us_per_request"]) for n in SCENARIOS}
    recorded = sum(
        v
        for r in runs
        if r["scenario"] == "every decision"
        for k, v in r["sink_counters"].items()
        if k.startswith("streamscore_record_sink_sent_total")
    )
    p99_ratio = p99["every decision"] / p99["off"]
    cpu_ratio = cpu_us["every decision"] / cpu_us["off"]
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "runs": runs,
        "p99_us": p99,
        "cpu_us_per_request": cpu_us,
        "p99_ratio": p99_ratio,
        "cpu_ratio": cpu_ratio,
        "records_sent": recorded,
        "meets_target": bool(recorded > 0 and p99_ratio <= P99_TARGET and cpu_ratio <= CPU_TARGET),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decision_bench", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--live", default="2", help="champion version")
    parser.add_argument("--rate", type=float, default=1500.0, help="open-loop requests/s")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (alternated)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        kafka_broker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        # All broker threads off the server's core (in production it is remote).
        pin = ["taskset", "-a", "-p", "-c", cpu_list(CLIENT_CPUS), str(broker.process.pid)]
        subprocess.run(pin, check=True, capture_output=True)
        document: dict[str, Any] = {"schema": "streamscore.bench.decision_record/1"}
        document |= overhead(args, broker.bootstrap_servers)
    print(
        f"decision record: p99 off={document['p99_us']['off']:.0f}us every decision="
        f"{document['p99_us']['every decision']:.0f}us ratio={document['p99_ratio']:.2f} "
        f"(target <= {P99_TARGET}); cpu/req ratio {document['cpu_ratio']:.2f} (target <= "
        f"{CPU_TARGET}); records sent {document['records_sent']:.0f}"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
