r"""Reason codes inside the server: reasons on every answer, and ``above_threshold``, vs off.

Three servers (``streamscore serve``, demo ``fraud`` champion, every feature sent,
decision records off so only reasons differ), pinned to core 0, scenarios alternated
``--repeats`` times; the load runs in this process, pinned to core 1:

* ``off``: ``reasons.when=on_request`` and no request asks (no explanation runs);
* ``always``: ``reasons.when=always`` (every answer carries its top reasons);
* ``above_threshold``: reasons only for flagged decisions, on demo traffic (a lone
  caller's row explained at once on the loop, ``reasons.inline_max_ms`` default);
* ``above_batched``: the same with ``reasons.inline_max_ms=0`` (every explanation
  through the reasons batcher and a worker thread, as before the inline path);
* ``always_batched``: ``always`` with ``reasons.inline_max_ms=0``: at 1 caller,
  ``always`` - ``always_batched`` is what the inline path saves per explained answer,
  on medians (robust to a shared machine's tail noise).

Demo traffic is the demo's own synthetic transactions (``demo.synthetic``, the
population and fraud patterns the models were trained on), so the flagged share is
the demo's; it is measured (answers probed before each load) and reported. Each
scenario is loaded closed-loop at 1 and at 64 callers. Reported per run: p50/p99 of
the answer, throughput, server CPU per request; medians per scenario and concurrency,
ratios to ``off`` (target: ``above_threshold`` p99 <= 1.2x off) and the server CPU per
explained row (``always`` - ``off``, per request: every request explains one row).

    flock /work/wt/bench.lock .venv/bin/python -m bench.reasons_bench --duration 8 \
        --repeats 2 --json-out bench/results/reasons.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np

from bench.callers import SCORE_METHOD, UnaryCaller
from bench.drivers import Recorder, Window, closed_loop
from bench.payloads import PoolItem
from bench.pinning import CLIENT_CPUS
from bench.shadow_bench import cpu_seconds, server
from demo.synthetic import DEMO_FEATURES, generate_dataset
from devstack.services import free_port
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.manifest import ModelManifest

P99_TARGET = 1.2
SCENARIOS = ("off", "always", "always_batched", "above_threshold", "above_batched")
WHEN = {
    "off": "on_request",
    "always": "always",
    "always_batched": "always",
    "above_threshold": "above_threshold",
    "above_batched": "above_threshold",
}
EXTRA = {name: ["reasons.inline_max_ms=0"] for name in ("always_batched", "above_batched")}


def demo_pool(model: str, features: Sequence[str], size: int, seed: int) -> list[PoolItem]:
    """``size`` serialised Score requests of demo transactions (every feature sent)."""
    x, _ = generate_dataset(size, seed=seed)
    column = {name: i for i, name in enumerate(DEMO_FEATURES)}
    missing = [f for f in features if f not in column]
    if missing:
        raise ValueError(f"the model reads features the demo does not make: {missing}")
    values = x[:, [column[f] for f in features]].astype(np.float64).tolist()
    items = []
    for i, row in enumerate(values):
        request = pb.ScoreRequest(
            model=model, request_id=f"r{i}", features=dict(zip(features, row, strict=True))
        )
        items.append(PoolItem(request.SerializeToString(), f"r{i}"))
    return items


async def probe(target: str, items: Sequence[PoolItem], count: int) -> dict[str, float]:
    """Share of ``count`` answers flagged and carrying reasons (proves what ran)."""
    flagged = explained = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        for item in items[:count]:
            answer = await stub.Score(pb.ScoreRequest.FromString(item.payload), timeout=30)
            flagged += answer.decision
            explained += len(answer.reasons) > 0
    return {"flagged_share": flagged / count, "explained_share": explained / count}


async def closed(
    target: str, items: Sequence[PoolItem], callers: int, seconds: float, warmup: float, pid: int
) -> tuple[Recorder, float]:
    """A closed loop of ``callers`` for ``seconds`` after ``warmup``: its recorder and the
    server's CPU seconds over the measured part (every request of it awaited)."""
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        workers = [UnaryCaller(channel, SCORE_METHOD, 30.0)] * callers
        cycle = itertools.cycle(items)
        await closed_loop(workers, cycle, Recorder(False), Window.starting_now(0, warmup, 30))
        rec = Recorder(open_loop=False)
        cpu_before = cpu_seconds(pid)
        await closed_loop(workers, cycle, rec, Window.starting_now(0, seconds, 30))
        cpu = cpu_seconds(pid) - cpu_before
    return rec, cpu


def run_scenario(
    args: argparse.Namespace, name: str, items: Sequence[PoolItem], repeat: int
) -> list[dict[str, Any]]:
    """One server of scenario ``name``, loaded at each concurrency."""
    port, metrics_port = free_port(), free_port()
    settings = [
        "traffic_log.sample_rate=0",
        "shadow.records_topic=null",
        f"models.per_model.{args.model}.reasons.when={WHEN[name]}",
        *(f"models.per_model.{args.model}.{extra}" for extra in EXTRA.get(name, [])),
    ]
    runs = []
    with server(args.repository, args.model, args.live, port, metrics_port, settings) as process:
        target = f"127.0.0.1:{port}"
        shares = asyncio.run(probe(target, items, args.probe))
        for callers in args.callers:
            seconds = args.duration
            rec, cpu = asyncio.run(
                closed(target, items, callers, seconds, args.warmup, process.pid)
            )
            answered = rec.ok + sum(rec.errors.values())
            latency = rec.latency.summary()
            run = {
                "scenario": name,
                "repeat": repeat,
                "callers": callers,
                **shares,
                "ok": rec.ok,
                "errors": dict(rec.errors),
                "throughput_rps": round(rec.ok / seconds, 1),
                "p50_us": latency.p50_us,
                "p99_us": latency.p99_us,
                "server_cpu_us_per_request": round(cpu / max(1, answered) * 1e6, 1),
            }
            print(
                f"{name:15} #{repeat} c{callers:<3} p50={run['p50_us']} p99={run['p99_us']} "
                f"rps={run['throughput_rps']} cpu/req={run['server_cpu_us_per_request']}us "
                f"flagged={shares['flagged_share']:.3f} explained={shares['explained_share']:.3f}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run)
    return runs


def summarise(runs: list[dict[str, Any]], callers: Sequence[int]) -> dict[str, Any]:
    """Medians per scenario and concurrency, ratios to ``off``, CPU per explained row."""
    out: dict[str, Any] = {}
    for c in callers:

        def median(name: str, key: str, c: int = c) -> float:
            picked = [r[key] for r in runs if r["scenario"] == name and r["callers"] == c]
            return float(np.median(picked))

        row: dict[str, Any] = {}
        for name in SCENARIOS:
            row[name] = {
                k: median(name, k)
                for k in ("p50_us", "p99_us", "throughput_rps", "server_cpu_us_per_request")
            }
        off = row["off"]
        for name in SCENARIOS[1:]:
            row[name]["p99_ratio"] = round(row[name]["p99_us"] / off["p99_us"], 2)
            row[name]["cpu_ratio"] = round(
                row[name]["server_cpu_us_per_request"] / off["server_cpu_us_per_request"], 2
            )
            row[name]["throughput_ratio"] = round(
                row[name]["throughput_rps"] / off["throughput_rps"], 2
            )
        row["explain_cpu_us_per_row"] = round(
            row["always"]["server_cpu_us_per_request"] - off["server_cpu_us_per_request"], 1
        )
        out[f"c{c}"] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reasons_bench", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--live", default="2", help="champion version (with an explainer)")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per scenario (alternated)")
    parser.add_argument("--pool", type=int, default=4096, help="distinct demo transactions")
    parser.add_argument("--probe", type=int, default=400, help="answers probed per server")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, CLIENT_CPUS)  # the load generator: core 1 (server on core 0)
    manifest = ModelManifest.read(args.repository / args.model / args.live)
    if manifest.explainer is None:
        raise SystemExit(f"{args.model}/{args.live} has no explainer")
    items = demo_pool(args.model, manifest.features, args.pool, args.seed)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in SCENARIOS:
            runs.extend(run_scenario(args, name, items, repeat))
    summary = summarise(runs, args.callers)
    document = {
        "schema": "streamscore.bench.reasons/1",
        "model": f"{args.model}/{args.live}",
        "duration_s": args.duration,
        "load_average": os.getloadavg(),
        "runs": runs,
        "summary": summary,
    }
    for key, row in summary.items():
        above, batched = row["above_threshold"], row["above_batched"]
        print(
            f"{key}: always p99 x{row['always']['p99_ratio']} rps x"
            f"{row['always']['throughput_ratio']} (explain {row['explain_cpu_us_per_row']} us "
            f"CPU/row); above_threshold p99 x{above['p99_ratio']} (target <= {P99_TARGET}), "
            f"batched only x{batched['p99_ratio']}"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
