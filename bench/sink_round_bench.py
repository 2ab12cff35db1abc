"""Durable sink CPU per record vs its round wait (``max_wait_ms``), real Tansu broker.

The sink alone (no server): keyed 4 kB records offered at a fixed rate on this process
(pinned to core 0, the broker to core 1), CPU time of the process per record, each
``--waits`` value run twice, alternated. What it isolates: the sender's per-round cost
(a record batch per partition, acks=all), paid on the serving loop in the server.

    flock /work/wt/bench.lock .venv/bin/python -m bench.sink_round_bench --waits 20 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.pinning import CLIENT_CPUS, SERVER_CPUS, cpu_list
from devstack.services import kafka_broker
from server.records.durable_sink import DurableSink, DurableSinkConfig

TOPIC = "streamscore.decisions"


async def cpu_per_record(bootstrap: str, wait_ms: int, rate: float, seconds: float) -> float:
    """CPU microseconds of this process per record offered and acknowledged."""
    with tempfile.TemporaryDirectory() as spill:
        sink = DurableSink(DurableSinkConfig(bootstrap, Path(spill), max_wait_ms=wait_ms))
        sink.start()
        value = b"x" * 4000
        for i in range(50):  # connect and learn the partitions first
            sink.offer(TOPIC, value, f"warm-{wait_ms}-{i}".encode())
        await sink.flush(20)
        count = int(rate * seconds)
        cpu_before, start = time.process_time(), time.perf_counter()
        for i in range(count):
            sink.offer(TOPIC, value, f"r-{wait_ms}-{i}".encode())
            delay = start + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await sink.flush(30)
        cpu = time.process_time() - cpu_before
        await sink.close(2)
    return cpu / count * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink_round_bench", description=__doc__)
    parser.add_argument("--waits", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--rate", type=float, default=500.0, help="records/s")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, set(SERVER_CPUS))
    with tempfile.TemporaryDirectory() as tmp, kafka_broker(log_file=Path(tmp) / "b.log") as b:
        pin = ["taskset", "-a", "-p", "-c", cpu_list(CLIENT_CPUS), str(b.process.pid)]
        subprocess.run(pin, check=True, capture_output=True)
        for _ in range(2):
            for wait in args.waits:
                us = asyncio.run(cpu_per_record(b.bootstrap_servers, wait, args.rate, args.seconds))
                print(f"max_wait_ms={wait}: {us:.1f} us CPU/record", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
