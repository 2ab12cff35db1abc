"""Measure the Redis inputs of the capacity model: bytes per key and CPU per command.

Starts a private ``redis-server`` on a free port, seeds it exactly as
``bench.feature_bench`` does (batch snapshots for every card and customer, ``N``
events per card over the last 24 h folded into tiles and trimmed), then records:

* ``MEMORY USAGE`` of every key, grouped by kind (card tile hash, merchant tile
  hash, card_profile row, customer_profile row), and ``used_memory`` per card;
* Redis CPU (``/proc/<pid>/stat`` of redis-server) per command for the commands
  the server and the worker send: pipelined ``HGETALL`` of card tile hashes,
  ``HMGET`` of snapshot rows, and the worker's apply ``EVALSHA`` with one event
  per key (the common case: a card appears once in a Kafka batch).

    python -m bench.capacity_inputs --json-out bench/results/capacity_inputs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.feature_bench import DEFINITIONS, NOW_MS, seed
from devstack.services import redis_server
from feature_streams.definitions import FeatureDefinitions, load_definitions
from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.keys import data_key, tile_key
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, updates_for_event

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _key_memory(client: Redis, pattern: str) -> dict[str, float]:
    sizes = []
    async for key in client.scan_iter(match=pattern, count=1000):
        sizes.append(int(await client.memory_usage(key, samples=0) or 0))
    if not sizes:
        raise RuntimeError(f"no key matches {pattern!r}: did the seed change?")
    fields = []
    async for key in client.scan_iter(match=pattern, count=1000):
        fields.append(int(await client.hlen(key)))
        if len(fields) >= 500:
            break
    return {
        "keys": len(sizes),
        "mean_bytes": statistics.fmean(sizes),
        "p50_bytes": statistics.median(sizes),
        "max_bytes": max(sizes),
        "mean_fields": statistics.fmean(fields),
    }


async def _redis_cpu_per_op(
    pid: int, ops_per_call: int, call: Callable[[], Awaitable[object]], seconds: float
) -> dict[str, float]:
    """Run ``call`` (one pipeline of ``ops_per_call`` commands) for ``seconds``."""
    await call()  # warm: connection, script cache
    ops = 0
    cpu0, t0 = process_cpu_s(pid), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await call()
        ops += ops_per_call
    cpu = process_cpu_s(pid) - cpu0
    return {"ops": ops, "redis_cpu_s": cpu, "redis_cpu_us_per_op": cpu / ops * 1e6}


async def measure(
    url: str, pid: int, defs: FeatureDefinitions, cards: int, events: int, seconds: float
) -> dict[str, Any]:
    """Seed, then measure memory per key kind and Redis CPU per command."""
    client = Redis.from_url(url)
    base = int((await client.info("memory"))["used_memory"])
    await seed(client, defs, cards, events)
    used = int((await client.info("memory"))["used_memory"])
    cache = BatchSnapshotCache(client, defs.batch_groups)
    snaps = await cache.refresh()
    card_snap, cust_snap = snaps["card_profile"] or "", snaps["customer_profile"] or ""
    memory = {
        "card_tile_hash": await _key_memory(client, tile_key("card_activity", "*")),
        "merchant_tile_hash": await _key_memory(client, tile_key("merchant_activity", "*")),
        "card_profile_row": await _key_memory(client, data_key("card_profile", card_snap, "*")),
        "customer_profile_row": await _key_memory(
            client, data_key("customer_profile", cust_snap, "*")
        ),
    }
    batch = 256  # one pipeline, as the fetcher sends per micro-batch group

    def cards_at(i: int) -> range:
        start = (i * batch) % max(cards - batch, 1)
        return range(start, start + batch)

    turn = [0]

    async def hgetall() -> None:
        turn[0] += 1
        async with client.pipeline(transaction=False) as pipe:
            for c in cards_at(turn[0]):
                pipe.hgetall(tile_key("card_activity", f"card_id-{c}"))
            await pipe.execute()

    fields = list(defs.batch_groups["customer_profile"].fields)

    async def hmget() -> None:
        turn[0] += 1
        async with client.pipeline(transaction=False) as pipe:
            for c in cards_at(turn[0]):
                pipe.hmget(data_key("customer_profile", cust_snap, f"customer_id-{c}"), fields)
            await pipe.execute()

    plan = GroupPlan.build(defs.stream_groups["card_activity"])
    store = TileStore(client)
    offset = [10**9]

    async def evalsha() -> None:  # one fresh event per card key, as a worker batch sends
        turn[0] += 1
        key_batches = []
        for c in cards_at(turn[0]):
            offset[0] += 1
            event = {"card_id": f"card_id-{c}", "event_time_ms": NOW_MS, "amount": 12.5}
            event["is_international"] = c % 2
            updates = EventUpdates(offset[0], NOW_MS, updates_for_event(plan, event))
            key_batches.append(
                KeyBatch(
                    tile_key("card_activity", f"card_id-{c}"),
                    "capacity",
                    0,
                    plan.retention_ms,
                    10**12,
                    [updates],
                )
            )
        await store.apply(key_batches)

    cpu = {
        "hgetall_card_tile": await _redis_cpu_per_op(pid, batch, hgetall, seconds),
        "hmget_snapshot_row": await _redis_cpu_per_op(pid, batch, hmget, seconds),
        "evalsha_apply_one_event": await _redis_cpu_per_op(pid, batch, evalsha, seconds),
    }
    version = (await client.info("server"))["redis_version"]
    await client.aclose()
    return {
        "cards": cards,
        "customers": cards,
        "merchants": 50,
        "events_per_card": events,
        "used_memory_bytes_per_card": (used - base) / cards,
        "memory": memory,
        "redis_cpu": cpu,
        "pipeline_commands": batch,
        "redis_version": version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity_inputs", description=__doc__)
    parser.add_argument("--cards", type=int, default=5000)
    parser.add_argument("--events-per-card", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0, help="per CPU measurement")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    defs = load_definitions(DEFINITIONS)
    with redis_server() as server:
        result = asyncio.run(
            measure(
                server.url,
                server.process.pid,
                defs,
                args.cards,
                args.events_per_card,
                args.seconds,
            )
        )
    result["command"] = " ".join(["python -m bench.capacity_inputs", *(argv or sys.argv[1:])])
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
