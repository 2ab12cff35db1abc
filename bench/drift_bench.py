"""Drift monitoring on vs off at 64 callers and at 1 caller (issue 12's drift figure).

Both runs serve the demo models (with their ``reference_profile.json``) from a server
pinned to core 0, with the same Redis (routing state there, so drift has its merge
store; redis-server and the load generator on core 1); only ``drift.enabled`` differs.
Scenarios alternate off/on ``--repeats`` times; medians are compared. Targets:
throughput on >= 0.95 x off, p99 on <= 1.05 x off.

    python -m bench.drift_bench --repository /tmp/models --duration 15 --repeats 3 \\
        --json-out bench/results/drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.pinning import CLIENT_CPUS
from bench.serving_bench import Measurement, Scenario, format_table, run_scenario
from devstack.services import redis_server

TARGET_THROUGHPUT = 0.95
TARGET_P99 = 1.05


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_bench", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--callers", default="64,1", help="comma-separated caller counts")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    profiles = sorted((args.repository / args.model).glob("*/reference_profile.json"))
    if not profiles:
        parser.error(f"no reference_profile.json under {args.repository / args.model}")
    results: dict[str, dict[str, list[Measurement]]] = {}
    with redis_server() as redis:
        os.sched_setaffinity(redis.process.pid, set(CLIENT_CPUS))
        for callers in (int(c) for c in args.callers.split(",")):
            connections = 4 if callers >= 4 else 1
            runs = results.setdefault(f"c{callers}", {"off": [], "on": []})
            for repeat in range(args.repeats):
                for mode in ("off", "on"):
                    settings = (
                        "routing.store=redis",
                        f"redis.url={redis.url}",
                        f"drift.enabled={'true' if mode == 'on' else 'false'}",
                    )
                    scenario = Scenario(
                        f"drift {mode} c{callers} #{repeat + 1}",
                        "streamscore",
                        settings,
                        concurrency=callers,
                        connections=connections,
                    )
                    m = run_scenario(
                        scenario, args.repository, args.model, args.duration, args.warmup
                    )
                    runs[mode].append(m)
                    print(format_table([m]).splitlines()[1], file=sys.stderr, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        off, on = runs["off"], runs["on"]
        print(format_table([*off, *on]))
        tput = statistics.median(m.throughput_rps for m in on) / statistics.median(
            m.throughput_rps for m in off
        )
        p99 = statistics.median(m.latency_us["p99"] for m in on) / statistics.median(
            m.latency_us["p99"] for m in off
        )
        summary[name] = {"throughput_ratio": round(tput, 3), "p99_ratio": round(p99, 3)}
        verdict = "met" if tput >= TARGET_THROUGHPUT and p99 <= TARGET_P99 else "NOT met"
        print(f"{name}: drift on / off: throughput x{tput:.3f}, p99 x{p99:.3f} ({verdict})")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "runs": {
                name: {mode: [asdict(m) for m in ms] for mode, ms in runs.items()}
                for name, runs in results.items()
            },
            "summary": summary,
        }
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
