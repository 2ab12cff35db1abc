r"""Interleaved A/B: two warm servers on one core, short alternating blocks, the idle one stopped.

A "feature on vs off" comparison made of whole runs one after the other is at the mercy
of what the machine does between them: on this VM the host takes 6-10% of the cores at
times (steal, invisible to the guest's load average) and moved p99 "off" alone 6.9-32.5 ms
between repeats. Here both servers (baseline arm A, treatment arm B) start once, pinned
to core 0, and the load generator (this process, core 1) alternates between them in
blocks of a few seconds in ABBA order, so slow changes of the machine fall on both arms
alike. The arm not under load is frozen (SIGSTOP) so its timers and background work
cannot take core 0 from the other; each block starts with an unmeasured lead-in (the
woken server's timers catch up there).

Reported per arm, pooled over its blocks: OK throughput, latency percentiles (histograms
merged), server CPU per answer, host steal; the B / A ratios; and the same ratios per
ABBA cycle (their median and how many cycles meet the target), so one can see whether a
verdict rests on every cycle or on a few. ``--code-a/--code-b`` run each arm's server from
its own source tree (a code change A/B'd at one setting, e.g. with ``--control B``); an
arm runs ``--settle`` seconds unloaded before it is stopped, so work its answers started
(a Kafka round in flight) is not frozen mid-request.

    python -m bench.interleave --experiment drift --load c1 --load c64 --cycles 6 \
        --repository /tmp/drift-models --json-out bench/results/interleave_drift.json
    python -m bench.interleave --experiment record --load rate500 --cycles 6 \
        --json-out bench/results/interleave_record.json
    python -m bench.interleave --experiment record --control B --code-a /tmp/main-tree \
        --code-b . --load rate500 --cycles 8 --json-out bench/results/record_code_ab.json
    python -m bench.interleave --experiment reasons --load c1 --load c64 --cycles 6 \
        --json-out bench/results/interleave_reasons.json
    python -m bench.interleave --experiment fetch --load c64 --write-rate 1000 --cycles 6 \
        --json-out bench/results/interleave_fetch.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.callers import SCORE_METHOD, UnaryCaller
from bench.config import LoadConfig
from bench.drivers import Recorder, Window, closed_loop, open_loop
from bench.feature_bench import DEFINITIONS, LiveWrites, seed
from bench.loadgen import build_pool, channel_options, payload_spec
from bench.payloads import PoolItem
from bench.pinning import CLIENT_CPUS, SERVER_CPUS, cpu_list, steal_seconds
from bench.reasons_bench import demo_pool
from bench.shadow_bench import cpu_seconds, server, shadow_counters
from demo.synthetic import REQUEST_FEATURES
from devstack.services import free_port, kafka_broker, redis_server
from feature_streams.definitions import load_definitions
from server.clients.channels import aio_channel
from server.clients.histogram import LatencyHistogram
from server.manifest import ModelManifest


@dataclass(frozen=True)
class Experiment:
    """Two server configurations (A = baseline, B = treatment) and what B must meet."""

    name: str
    common: tuple[str, ...]
    arm_a: tuple[str, ...]
    arm_b: tuple[str, ...]
    #: ``payload`` (loadgen's pool from the manifest) or ``demo`` (demo transactions)
    pool: str = "payload"
    #: ``payload`` pools: LoadConfig fields per arm (e.g. which features are sent)
    payload_a: dict[str, Any] = field(default_factory=dict)
    payload_b: dict[str, Any] = field(default_factory=dict)
    #: environment added for each arm's server (e.g. a gRPC core experiment)
    env_a: dict[str, str] = field(default_factory=dict)
    env_b: dict[str, str] = field(default_factory=dict)
    #: store features seeded into Redis (and, with ``--write-rate``, a live stream)
    seeds_features: bool = False
    #: B / A bounds: ``throughput`` (minimum), ``p99`` and ``cpu`` (maximum)
    targets: dict[str, float] = field(default_factory=dict)


def experiments(
    model: str, redis_url: str, kafka: str, spill: str, cards: int
) -> dict[str, Experiment]:
    """The issue figures this harness measures, on the services given."""
    quiet = ("traffic_log.sample_rate=0", "shadow.records_topic=null")
    entities = {
        "entities": ("card_id", "customer_id", "merchant_id"),
        "entity_cardinality": cards,
    }
    return {
        "fetch": Experiment(
            "fetch",
            (*quiet, f"features.definitions_path={DEFINITIONS}", f"redis.url={redis_url}"),
            ("server.overrides.allow_all=true",),  # A: every store feature sent
            (),  # B: only the request features sent, the rest fetched
            payload_a=entities,
            payload_b={**entities, "request_features": tuple(REQUEST_FEATURES)},
            seeds_features=True,
            targets={"throughput": 0.8},
        ),
        "drift": Experiment(
            "drift",
            # drift events go to a real broker, as in production (with none reachable
            # the "on" server would retry a dead bootstrap address in the background)
            (
                *quiet,
                "routing.store=redis",
                f"redis.url={redis_url}",
                f"kafka.bootstrap_servers={kafka}",
            ),
            ("drift.enabled=false",),
            ("drift.enabled=true",),
            targets={"throughput": 0.95, "p99": 1.05},
        ),
        "record": Experiment(
            "record",
            (f"kafka.bootstrap_servers={kafka}", "shadow.records_topic=null"),
            ("traffic_log.sample_rate=0",),
            (
                "traffic_log.sample_rate=1",
                "traffic_log.delivery=durable",
                f"records.durable.spill_dir={spill}",
                "traffic_log.topic=streamscore.decisions",
            ),
            targets={"p99": 1.1, "cpu": 1.15},
        ),
        "transport": Experiment(
            "transport",
            quiet,
            (),
            (),
            env_b={"GRPC_EXPERIMENTS": "ph2_server"},  # gRPC core's promise-based HTTP/2
        ),
        "reasons": Experiment(
            "reasons",
            quiet,
            (f"models.per_model.{model}.reasons.when=on_request",),
            (f"models.per_model.{model}.reasons.when=above_threshold",),
            pool="demo",
            targets={"p99": 1.2},
        ),
    }


@dataclass(frozen=True)
class Load:
    """Closed loop with ``callers`` or open loop at ``rate`` requests/s."""

    label: str
    callers: int = 1
    rate: float | None = None

    @classmethod
    def parse(cls, text: str) -> Load:
        """``c64`` (closed loop, 64 callers) or ``rate500`` (open loop, 500/s)."""
        if text.startswith("rate"):
            return cls(text, callers=1, rate=float(text[4:]))
        if text.startswith("c"):
            return cls(text, callers=int(text[1:]))
        raise ValueError(f"load must be cN or rateN, got {text!r}")

    @property
    def connections(self) -> int:
        return 2 if self.rate is not None else (4 if self.callers >= 4 else 1)


@dataclass
class Block:
    """What one block measured on one arm."""

    arm: str
    cycle: int
    seconds: float
    ok: int
    errors: dict[str, int]
    cpu_s: float
    steal_server_s: float
    histogram: LatencyHistogram

    def to_json(self) -> dict[str, Any]:
        latency = self.histogram.summary()
        return {
            "arm": self.arm,
            "cycle": self.cycle,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_rps": round(self.ok / self.seconds, 1),
            "p50_us": latency.p50_us,
            "p99_us": latency.p99_us,
            "cpu_us_per_answer": round(self.cpu_s / self.ok * 1e6, 1) if self.ok else None,
            "steal_server_share": round(self.steal_server_s / self.seconds, 4),
        }


@dataclass
class Pooled:
    """An arm's blocks merged."""

    seconds: float = 0.0
    ok: int = 0
    cpu_s: float = 0.0
    steal_s: float = 0.0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, block: Block) -> None:
        self.seconds += block.seconds
        self.ok += block.ok
        self.cpu_s += block.cpu_s
        self.steal_s += block.steal_server_s
        self.histogram.add(block.histogram)

    def figures(self) -> dict[str, float]:
        latency = self.histogram.summary()
        return {
            "throughput": self.ok / self.seconds if self.seconds else 0.0,
            "p50": float(latency.p50_us),
            "p99": float(latency.p99_us),
            "p999": float(latency.p999_us),
            "cpu": self.cpu_s / self.ok * 1e6 if self.ok else float("nan"),
            "steal": self.steal_s / self.seconds if self.seconds else 0.0,
        }


def ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """B / A for throughput, p50, p99, p99.9 and CPU per answer."""
    keys = ("throughput", "p50", "p99", "p999", "cpu")
    return {k: round(b[k] / a[k], 4) if a[k] else float("nan") for k in keys}


def meets(ratio: dict[str, float], targets: dict[str, float]) -> bool:
    """Whether B / A is within every target (throughput a floor, the rest ceilings)."""
    return all(
        ratio[name] >= bound if name == "throughput" else ratio[name] <= bound
        for name, bound in targets.items()
    )


@contextlib.contextmanager
def _resumed_on_exit(pids: Sequence[int]) -> Iterator[None]:
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def _block(
    load: Load,
    callers: Sequence[UnaryCaller],
    items: Iterator[PoolItem],
    pid: int,
    lead_in_s: float,
    block_s: float,
) -> tuple[Recorder, float, float, float]:
    """One block against one server: (recorder, measured seconds, CPU s, steal s)."""
    rec = Recorder(open_loop=load.rate is not None)
    window = Window.starting_now(lead_in_s, block_s, drain_s=10.0)
    if load.rate is None:
        workers = [callers[i % len(callers)] for i in range(load.callers)]
        driver = asyncio.ensure_future(closed_loop(workers, items, rec, window))
    else:
        driver = asyncio.ensure_future(
            open_loop(
                callers, items, rec, window, rate=load.rate, max_outstanding=1000,
                late_threshold_ms=2.0,
            )
        )  # fmt: skip
    await asyncio.sleep(max(0.0, (window.measure_from - time.perf_counter_ns()) / 1e9))
    cpu0, steal0, t0 = cpu_seconds(pid), steal_seconds(SERVER_CPUS), time.perf_counter()
    await asyncio.sleep(max(0.0, (window.end - time.perf_counter_ns()) / 1e9))
    cpu1, steal1, t1 = cpu_seconds(pid), steal_seconds(SERVER_CPUS), time.perf_counter()
    await driver
    return rec, t1 - t0, cpu1 - cpu0, steal1 - steal0


async def interleave(
    load: Load,
    items: Mapping[str, Sequence[PoolItem]],
    ports: dict[str, int],
    pids: dict[str, int],
    cycles: int,
    block_s: float,
    lead_in_s: float,
    settle_s: float = 0.5,
) -> list[Block]:
    """Warm both arms, then ``cycles`` x ABBA blocks; the arm not under load is stopped
    (``settle_s`` after its last answer)."""
    channels = {
        arm: [aio_channel(f"127.0.0.1:{port}", None, channel_options(i)) for i in range(n)]
        for arm, port in ports.items()
        for n in [load.connections]
    }
    pools = {arm: itertools.cycle(pool) for arm, pool in items.items()}
    blocks: list[Block] = []
    try:
        callers = {
            arm: [UnaryCaller(c, SCORE_METHOD, 30.0) for c in chans]
            for arm, chans in channels.items()
        }
        order = [("A", -1), ("B", -1)] + [
            (arm, cycle) for cycle in range(cycles) for arm in ("A", "B", "B", "A")
        ]
        active: str | None = None
        for arm, cycle in order:
            if arm != active:
                if active is not None:
                    # let the last arm finish what its answers started (a record sink's
                    # round in flight): stopped mid-request, its Kafka request would time
                    # out on resume, and the failure's reconnect and spill land in its
                    # next measured block
                    await asyncio.sleep(settle_s)
                os.kill(pids[arm], signal.SIGCONT)
                for other in pids.keys() - {arm}:
                    os.kill(pids[other], signal.SIGSTOP)
                active = arm
            warm = cycle < 0
            rec, seconds, cpu, steal = await _block(
                load, callers[arm], pools[arm], pids[arm], lead_in_s, 3.0 if warm else block_s
            )
            if warm:
                continue
            blocks.append(
                Block(arm, cycle, seconds, rec.window_ok, dict(rec.errors), cpu, steal, rec.latency)
            )
            b = blocks[-1].to_json()
            print(
                f"{load.label} cycle {cycle} {arm}: {b['throughput_rps']:.0f}/s "
                f"p50={b['p50_us']} p99={b['p99_us']} cpu/answer={b['cpu_us_per_answer']}us "
                f"steal={b['steal_server_share']:.3f} errors={b['errors'] or 0}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for chans in channels.values():
            await asyncio.gather(*(c.close(None) for c in chans))
    return blocks


def summarise(blocks: Sequence[Block], targets: dict[str, float]) -> dict[str, Any]:
    """Pooled figures per arm, B / A pooled and per cycle, and the verdict."""
    pooled = {"A": Pooled(), "B": Pooled()}
    per_cycle: dict[int, dict[str, Pooled]] = {}
    for block in blocks:
        pooled[block.arm].add(block)
        per_cycle.setdefault(block.cycle, {"A": Pooled(), "B": Pooled()})[block.arm].add(block)
    figures = {arm: p.figures() for arm, p in pooled.items()}
    overall = ratios(figures["A"], figures["B"])
    cycle_ratios = [ratios(c["A"].figures(), c["B"].figures()) for c in per_cycle.values()]
    return {
        "arms": {arm: {k: round(v, 4) for k, v in f.items()} for arm, f in figures.items()},
        "ratio": overall,
        "cycle_ratios": cycle_ratios,
        "cycle_median": {
            k: round(statistics.median(r[k] for r in cycle_ratios), 4) for k in overall
        },
        "cycles_meeting": sum(meets(r, targets) for r in cycle_ratios),
        "cycles": len(cycle_ratios),
        "targets": targets,
        "met": meets(overall, targets),
    }


def _items(experiment: Experiment, arm: str, model: str, manifest_dir: Path) -> list[PoolItem]:
    if experiment.pool == "demo":
        manifest = ModelManifest.read(manifest_dir)
        return demo_pool(model, manifest.features, 4096, seed=7)
    fields = experiment.payload_a if arm == "A" else experiment.payload_b
    config = LoadConfig(api="score", model=model, manifest=str(manifest_dir), **fields)
    return build_pool(config, payload_spec(config))


@contextlib.contextmanager
def _feature_data(url: str, cards: int, write_rate: float) -> Iterator[dict[str, float]]:
    """Seed batch snapshots and a day of events per card; with ``write_rate`` > 0, apply
    that many new events per second to the tile hashes for the whole run (both arms)."""
    defs = load_definitions(DEFINITIONS)

    async def seeded() -> None:
        client = Redis.from_url(url)
        try:
            await seed(client, defs, cards, events_per_card=20)
        finally:
            await client.aclose()

    asyncio.run(seeded())
    writes: dict[str, float] = {}
    if write_rate <= 0:
        yield writes
        return
    with LiveWrites(url, defs, cards, write_rate) as live:
        yield writes
    writes |= {"events": live.events, "events_per_s": live.events / max(live.seconds, 1e-9)}


def _code_env(tree: Path | None) -> dict[str, str]:
    """Server environment that imports the project from ``tree`` instead of the cwd
    (``PYTHONSAFEPATH``: ``python -m`` does not put the cwd first on ``sys.path``)."""
    if tree is None:
        return {}
    return {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(tree.resolve())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the services and both servers, then interleave every requested load."""
    os.sched_setaffinity(0, set(CLIENT_CPUS))
    manifest_dir = args.repository / args.model / args.live
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis = stack.enter_context(redis_server())
        os.sched_setaffinity(redis.process.pid, set(CLIENT_CPUS))
        broker = stack.enter_context(kafka_broker(log_file=tmp / "broker.log"))
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpu_list(CLIENT_CPUS), str(broker.process.pid)],
            check=True,
            capture_output=True,
        )
        spill = str(tmp / "spill")
        experiment = experiments(
            args.model, redis.url, broker.bootstrap_servers, spill, args.cards
        )[args.experiment]
        if args.control:  # A/A: both arms run one arm's settings and payload
            same, payload, env = (
                (experiment.arm_a, experiment.payload_a, experiment.env_a)
                if args.control == "A"
                else (experiment.arm_b, experiment.payload_b, experiment.env_b)
            )
            experiment = dataclasses.replace(
                experiment,
                name=f"{experiment.name} {args.control}/{args.control} control",
                arm_a=same,
                arm_b=same,
                payload_a=payload,
                payload_b=payload,
                env_a=env,
                env_b=env,
            )
        if args.code_a or args.code_b:  # a code A/B: each arm's server from its own tree
            experiment = dataclasses.replace(
                experiment,
                name=f"{experiment.name} code {args.code_a or '.'} vs {args.code_b or '.'}",
                env_a={**(experiment.env_a or {}), **_code_env(args.code_a)},
                env_b={**(experiment.env_b or {}), **_code_env(args.code_b)},
            )
        items = {arm: _items(experiment, arm, args.model, manifest_dir) for arm in ("A", "B")}
        writes: dict[str, float] = {}
        if experiment.seeds_features:
            writes = stack.enter_context(_feature_data(redis.url, args.cards, args.write_rate))
        ports = {"A": free_port(), "B": free_port()}
        metrics_ports = {"A": free_port(), "B": free_port()}
        pids = {}
        arms = (
            ("A", experiment.arm_a, experiment.env_a),
            ("B", experiment.arm_b, experiment.env_b),
        )
        for arm, own, env in arms:
            # each server its own spill directory (a spill is locked by its process)
            settings = [
                item.replace(spill, f"{spill}-{arm}")
                for item in (*experiment.common, *own, *args.set)
            ]
            process = stack.enter_context(
                server(
                    args.repository, args.model, args.live, ports[arm], metrics_ports[arm],
                    settings, env or None,
                )
            )  # fmt: skip
            pids[arm] = process.pid
        stack.enter_context(_resumed_on_exit(list(pids.values())))
        loads: dict[str, Any] = {}
        for load in args.load:
            blocks = asyncio.run(
                interleave(
                    load, items, ports, pids, args.cycles, args.block, args.lead_in, args.settle
                )
            )
            summary = summarise(blocks, experiment.targets)
            loads[load.label] = {"blocks": [b.to_json() for b in blocks], "summary": summary}
            r, m = summary["ratio"], summary["cycle_median"]
            print(
                f"{experiment.name} {load.label}: B/A pooled throughput x{r['throughput']:.3f} "
                f"p50 x{r['p50']:.3f} p99 x{r['p99']:.3f} cpu x{r['cpu']:.3f}; per-cycle median "
                f"throughput x{m['throughput']:.3f} p99 x{m['p99']:.3f} cpu x{m['cpu']:.3f}; "
                f"{summary['cycles_meeting']}/{summary['cycles']} cycles meet "
                f"{experiment.targets}: {'met' if summary['met'] else 'NOT met'} (pooled)",
                flush=True,
            )
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
        counters = {arm: shadow_counters(port) for arm, port in metrics_ports.items()}
    return {
        "schema": "streamscore.bench.interleave/1",
        "experiment": asdict(experiment),
        "block_s": args.block,
        "lead_in_s": args.lead_in,
        "loads": loads,
        "sink_counters": {arm: {k: v for k, v in c.items() if v} for arm, c in counters.items()},
        "live_writes": writes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interleave", description=__doc__)
    parser.add_argument(
        "--experiment", choices=("drift", "record", "reasons", "fetch", "transport"), required=True
    )
    parser.add_argument("--load", type=Load.parse, action="append", required=True)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--live", default="2", help="champion version")
    parser.add_argument("--cycles", type=int, default=6, help="ABBA cycles per load")
    parser.add_argument("--block", type=float, default=4.0, help="measured seconds per block")
    parser.add_argument("--lead-in", type=float, default=1.0, help="unmeasured s per block")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="s an arm runs unloaded before it is stopped"
    )
    parser.add_argument("--cards", type=int, default=5000, help="fetch: entities seeded")
    parser.add_argument(
        "--write-rate", type=float, default=0.0, help="fetch: live events/s during the run"
    )
    parser.add_argument(
        "--control",
        nargs="?",
        const="A",
        choices=("A", "B"),
        default=None,
        help="A/A (or B/B): both arms get that arm's settings (what the method reads when "
        "nothing differs; with --code-a/--code-b, a code A/B at one setting)",
    )
    parser.add_argument(
        "--code-a", type=Path, default=None, help="source tree arm A's server runs (default: cwd)"
    )
    parser.add_argument(
        "--code-b", type=Path, default=None, help="source tree arm B's server runs (default: cwd)"
    )
    parser.add_argument("--set", action="append", default=[], help="extra override, both arms")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so both servers (one may be stopped) are ended too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    document = run(args)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
