"""Capacity on paper: pods, worker replicas, partitions and Redis shards per load.

Reads the measured inputs from the bench JSON files and prints the table of
``docs/capacity.md`` for the given decision rates and card count. Every input that
is not measured is a flag with its default; change one and the table follows.

Measured inputs (``bench/results/``, all on the noisy 2-core bench machine):

* ``features.json`` ``score."score features fetched c64".server_cpu_us_per_request``:
  server CPU per decision with features fetched from Redis (``bench.feature_bench``);
* ``serving.json`` scenario ``streamscore inline c64``: the same with features sent
  (shown for comparison, not used in the sizing);
* ``freshness.json``: the stream worker's CPU per event with a real broker
  (``cpu_cores_used.worker / background_rate_achieved``);
* ``capacity_inputs.json`` (``bench.capacity_inputs``): ``MEMORY USAGE`` per key kind
  and Redis CPU per ``HGETALL`` / ``HMGET`` / apply ``EVALSHA``.

Redis commands per decision are counted from the code, not measured:
``feature_streams/fetcher.py`` sends one ``HMGET`` per (batch group, entity) and one
``HGETALL`` per (stream group, entity) per micro-batch, plus one ``HGET`` of the
snapshot registry per batch group per micro-batch (``read_plan.queue_reads``); the
worker one ``EVALSHA`` per key per Kafka batch (``TileStore.apply``).

    python -m bench.capacity                       # the table in docs/capacity.md
    python -m bench.capacity --rates 1000 20000 --cards 100000000 --json-out -
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path("bench/results")
GIB = 1024**3


@dataclass(frozen=True)
class Measured:
    """Inputs read from the bench JSON files."""

    server_cpu_us_per_decision: float  # features fetched from Redis
    server_cpu_us_per_decision_sent: float  # features sent in the request
    worker_cpu_us_per_event: float
    card_tile_bytes: float
    card_row_bytes: float
    customer_row_bytes: float
    merchant_tile_bytes: float
    redis_us_per_hgetall: float
    redis_us_per_hmget: float
    redis_us_per_evalsha: float


@dataclass(frozen=True)
class Assumptions:
    """Not measured: deployment choices and traffic shape (each one a flag)."""

    target_utilisation: float = 0.6  # of a core, server and worker: headroom for peaks
    cores_per_pod: int = 1  # deploy/k8s: one server process per pod, 1 CPU
    min_pods: int = 3  # one per zone
    events_per_decision: float = 1.0  # each authorisation is one transaction event
    tile_keys_per_event: float = 2.0  # card + merchant hash (merchant coalesced: <= 2)
    worker_cores_per_replica: float = 1.0  # one Python process
    partitions_per_replica: float = 2.0  # room to double replicas without repartitioning
    min_partitions: int = 6
    customers_per_card: float = 1.0  # demo population: ~0.77
    merchants: int = 1_000_000
    snapshot_copies: float = 2.0  # a batch load writes a new snapshot beside the active
    redis_overhead: float = 1.3  # fragmentation, replication and client buffers
    shard_memory_gib: float = 25.0  # usable maxmemory per primary
    redis_utilisation: float = 0.5  # of the one Redis main thread
    min_shards: int = 3  # smallest Redis Cluster
    batch_rows: float = 8.0  # requests per micro-batch (for the per-batch HGETs)


def _scenario(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for row in rows:
        if row["scenario"]["name"] == name:
            return row
    raise KeyError(f"serving.json has no scenario {name!r}")


def load_measured(results: Path) -> Measured:
    """Read every measured input from ``results`` (the ``bench/results`` directory)."""
    features = json.loads((results / "features.json").read_text())
    serving = json.loads((results / "serving.json").read_text())
    fresh = json.loads((results / "freshness.json").read_text())
    inputs = json.loads((results / "capacity_inputs.json").read_text())
    memory, cpu = inputs["memory"], inputs["redis_cpu"]
    return Measured(
        server_cpu_us_per_decision=features["score"]["score features fetched c64"][
            "server_cpu_us_per_request"
        ],
        server_cpu_us_per_decision_sent=_scenario(serving, "streamscore inline c64")[
            "server_cpu_us_per_request"
        ],
        worker_cpu_us_per_event=fresh["cpu_cores_used"]["worker"]
        / fresh["background_rate_achieved"]
        * 1e6,
        card_tile_bytes=memory["card_tile_hash"]["mean_bytes"],
        card_row_bytes=memory["card_profile_row"]["mean_bytes"],
        customer_row_bytes=memory["customer_profile_row"]["mean_bytes"],
        merchant_tile_bytes=memory["merchant_tile_hash"]["mean_bytes"],
        redis_us_per_hgetall=cpu["hgetall_card_tile"]["redis_cpu_us_per_op"],
        redis_us_per_hmget=cpu["hmget_snapshot_row"]["redis_cpu_us_per_op"],
        redis_us_per_evalsha=cpu["evalsha_apply_one_event"]["redis_cpu_us_per_op"],
    )


@dataclass(frozen=True)
class Plan:
    """Sizing for one decision rate."""

    decisions_per_s: float
    server_cores: float
    pods: int
    events_per_s: float
    worker_cores: float
    worker_replicas: int
    partitions: int
    redis_reads_per_s: float
    redis_writes_per_s: float
    redis_cores: float
    memory_gib: float
    shards_for_cpu: int
    shards_for_memory: int
    shards: int
    bottleneck: str


def _ceil(x: float) -> int:
    """``ceil`` that ignores float noise: 2.0000000000000004 -> 2."""
    return math.ceil(x - 1e-9)


def plan(rate: float, cards: int, m: Measured, a: Assumptions) -> Plan:
    """Size one deployment for ``rate`` decisions/s over ``cards`` cards."""
    server_cores = rate * m.server_cpu_us_per_decision / 1e6 / a.target_utilisation
    pods = max(a.min_pods, _ceil(server_cores / a.cores_per_pod))
    events = rate * a.events_per_decision
    worker_cores = events * m.worker_cpu_us_per_event / 1e6 / a.target_utilisation
    replicas = max(1, _ceil(worker_cores / a.worker_cores_per_replica))
    partitions = max(a.min_partitions, _ceil(replicas * a.partitions_per_replica))
    # per decision: HMGET customer + HMGET card + HGETALL card tiles + HGETALL merchant
    # tiles, and one registry HGET per batch group per micro-batch (priced as an HMGET)
    hmgets = rate * (2.0 + 2.0 / a.batch_rows)
    hgetalls = rate * 2.0
    writes = events * a.tile_keys_per_event
    redis_cores = (
        hmgets * m.redis_us_per_hmget
        + hgetalls * m.redis_us_per_hgetall
        + writes * m.redis_us_per_evalsha
    ) / 1e6
    card_bytes = m.card_tile_bytes + a.snapshot_copies * (
        m.card_row_bytes + a.customers_per_card * m.customer_row_bytes
    )
    memory = (cards * card_bytes + a.merchants * m.merchant_tile_bytes) * a.redis_overhead / GIB
    for_cpu = _ceil(redis_cores / a.redis_utilisation)
    for_memory = _ceil(memory / a.shard_memory_gib)
    shards = max(a.min_shards, for_cpu, for_memory)
    # what runs out first if the load grows: the resource with the least slack
    slack = {
        "server pods (CPU)": pods * a.cores_per_pod / max(server_cores, 1e-9),
        "stream worker (CPU)": replicas * a.worker_cores_per_replica / max(worker_cores, 1e-9),
        "Kafka partitions (max worker replicas)": partitions / replicas,
        "Redis shard CPU": shards * a.redis_utilisation / max(redis_cores, 1e-9),
    }
    return Plan(
        decisions_per_s=rate,
        server_cores=server_cores,
        pods=pods,
        events_per_s=events,
        worker_cores=worker_cores,
        worker_replicas=replicas,
        partitions=partitions,
        redis_reads_per_s=hmgets + hgetalls,
        redis_writes_per_s=writes,
        redis_cores=redis_cores,
        memory_gib=memory,
        shards_for_cpu=for_cpu,
        shards_for_memory=for_memory,
        shards=shards,
        bottleneck=min(slack, key=lambda k: slack[k]),
    )


def markdown(plans: Sequence[Plan], cards: int) -> str:
    """The table of ``docs/capacity.md``."""
    lines = [
        f"| decisions/s ({cards / 1e6:g} M cards) | server cores | pods | worker cores"
        " | worker replicas | partitions | Redis reads/s | Redis writes/s | Redis cores"
        " | memory GiB | shards (CPU / memory) | primaries | tightest |",
        "| " + " | ".join(["---:"] * 12 + ["---"]) + " |",
    ]
    for p in plans:
        lines.append(
            f"| {p.decisions_per_s:,.0f} | {p.server_cores:.1f} | {p.pods} | {p.worker_cores:.1f}"
            f" | {p.worker_replicas} | {p.partitions} | {p.redis_reads_per_s:,.0f}"
            f" | {p.redis_writes_per_s:,.0f} | {p.redis_cores:.2f} | {p.memory_gib:,.0f}"
            f" | {p.shards_for_cpu} / {p.shards_for_memory} | {p.shards} | {p.bottleneck} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--results", type=Path, default=RESULTS, help="bench JSON directory")
    parser.add_argument("--rates", type=float, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--cards", type=int, default=50_000_000)
    parser.add_argument("--json-out", default=None, help="write plans as JSON ('-': stdout)")
    defaults = Assumptions()
    for name, value in asdict(defaults).items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=value, help=f"{value}"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    assumptions = Assumptions(**{k: getattr(args, k) for k in asdict(Assumptions())})
    measured = load_measured(args.results)
    plans = [plan(rate, args.cards, measured, assumptions) for rate in args.rates]
    if args.json_out is not None:
        text = json.dumps(
            {
                "measured": asdict(measured),
                "assumptions": asdict(assumptions),
                "cards": args.cards,
                "plans": [asdict(p) for p in plans],
            },
            indent=2,
        )
        if args.json_out == "-":
            sys.stdout.write(text + "\n")
            return 0
        Path(args.json_out).write_text(text + "\n")
    sys.stdout.write(markdown(plans, args.cards) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
