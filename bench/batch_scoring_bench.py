"""score-batch throughput: the local engine (N workers) vs a bare Parquet + ORT loop.

Generates (vectorised, seeded) an event log of ``--cards`` cards' history (Parquet),
a spine of ``--rows`` rows at times after each card's history, batch snapshots for
customers and cards, and a linear ONNX model over the demo features. Then, each one
subprocess, timed from outside:

* ``streamscore score-batch`` (local engine, ``--workers``): point-in-time features
  from the log and snapshots + scoring, written to Parquet;
* the floor: the same rows' features precomputed (the score-batch output with
  ``--with-features``) read from Parquet and scored by a bare ORT loop;
* optionally ``--engine spark`` (``--spark``), for reference.

With ``--key-partitions K`` (K > 1) the local engine runs a second time with
``--key-partitions K``; its output must equal the unpartitioned one.

Peak RSS, two ways: ``ru_maxrss`` from ``wait4`` of the run's process (covers the
workers it waited for, but a fork-exec'd worker may be charged its parent's pages at
the fork), and the largest ``VmHWM`` of the run's process tree, read every 20 ms from
/proc (misses growth in a process's last 20 ms).

    .venv/bin/python -m bench.batch_scoring_bench --rows 200000 --cards 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from demo.synthetic import CARD_BATCH_FEATURES, CUSTOMER_BATCH_FEATURES, DEMO_FEATURES
from tests.support.model_factory import write_linear_model

T0 = 1_700_000_000_000
HOUR = 3_600_000

FLOOR = """
import sys, time
import numpy as np, onnxruntime as ort, pyarrow.parquet as pq
path, model, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
rows = 0
started = time.monotonic()
for batch in pq.ParquetFile(path).iter_batches(batch_size=100_000, columns=names):
    x = np.column_stack([batch.column(n).to_numpy(zero_copy_only=False) for n in names])
    session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})
    rows += batch.num_rows
print(rows, time.monotonic() - started)
"""


def generate(tmp: Path, rows: int, cards: int, events_per_card: int, seed: int) -> list[str]:
    """Write events, spine, snapshots and the model; return score-batch's input flags."""
    rng = np.random.default_rng(seed)
    card_ids = np.array([f"card-{i:07d}" for i in range(cards)])
    customer_of = np.array([f"cust-{i // 2:07d}" for i in range(cards)])
    merchants = np.array([f"merch-{i:05d}" for i in range(max(100, cards // 20))])
    n_events = cards * events_per_card
    card_idx = rng.integers(0, cards, n_events)
    span = 7 * 24 * HOUR
    times = np.sort(T0 + rng.integers(0, span, n_events))
    events = pa.table(
        {
            "card_id": card_ids[card_idx],
            "customer_id": customer_of[card_idx],
            "merchant_id": merchants[rng.integers(0, len(merchants), n_events)],
            "event_time_ms": times,
            "amount": np.round(rng.lognormal(3.5, 1.0, n_events), 2),
            "is_international": (rng.random(n_events) < 0.05).astype(np.int64),
        }
    )
    pq.write_table(events, tmp / "events.parquet")
    spine_cards = rng.integers(0, cards, rows)
    spine = {
        "card_id": card_ids[spine_cards],
        "customer_id": customer_of[spine_cards],
        "merchant_id": merchants[rng.integers(0, len(merchants), rows)],
        "ts_ms": T0 + rng.integers(0, span + 24 * HOUR, rows),
        "amount": np.round(rng.lognormal(3.5, 1.0, rows), 2),
        "mcc": rng.choice([5411, 5812, 5999, 7995], rows),
        "channel": rng.integers(0, 3, rows),
        "hour_of_day": rng.integers(0, 24, rows),
        "day_of_week": rng.integers(0, 7, rows),
        "is_international": (rng.random(rows) < 0.05).astype(np.int64),
        "card_present": rng.integers(0, 2, rows),
        "distance_from_home_km": np.round(rng.exponential(10.0, rows), 1),
    }
    table = pa.table(spine)
    order = np.argsort(table.column("card_id").to_numpy(zero_copy_only=False), kind="stable")
    pq.write_table(table.take(order), tmp / "spine.parquet")  # sorted by card: small key sets
    customers = np.unique(customer_of)
    profile = {"customer_id": customers}
    profile |= {f: rng.random(len(customers)) * 100 for f in CUSTOMER_BATCH_FEATURES}
    pq.write_table(pa.table(profile), tmp / "customer_profile.parquet")
    cprofile = {"card_id": card_ids} | {f: rng.random(cards) * 100 for f in CARD_BATCH_FEATURES}
    pq.write_table(pa.table(cprofile), tmp / "card_profile.parquet")
    write_linear_model(tmp / "models", "fraud", "1", list(DEMO_FEATURES), weight_scale=1e-3)
    return [
        *("--events", str(tmp / "events.parquet")),
        *("--batch", f"customer_profile={T0 - 86_400_000}:{tmp / 'customer_profile.parquet'}"),
        *("--batch", f"card_profile={T0 - 86_400_000}:{tmp / 'card_profile.parquet'}"),
        *("--definitions", "features.yaml", "--set", f"models.repository={tmp / 'models'}"),
        *("--model", "fraud", "--input", str(tmp / "spine.parquet"), "--no-progress"),
    ]


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def _hwm_mib(pid: int) -> float:
    """VmHWM (the process's own peak RSS) in MiB, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def timed(cmd: list[str]) -> tuple[float, float, float, str, float]:
    """(wall seconds, peak RSS MiB from wait4, largest VmHWM MiB sampled every 20 ms
    over the process tree, stdout, CPU seconds (user + system) of the process and the
    workers it waited for) of one subprocess."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        hwm: dict[int, float] = {}
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            for pid in _tree(proc.pid):
                hwm[pid] = max(hwm.get(pid, 0.0), _hwm_mib(pid))
            time.sleep(0.02)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, out.read(), err.read())
        cpu = usage.ru_utime + usage.ru_stime
        return wall, usage.ru_maxrss / 1024, max(hwm.values(), default=0.0), out.read(), cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--cards", type=int, default=100_000)
    p.add_argument("--events-per-card", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=50_000)
    p.add_argument(
        "--key-partitions",
        type=int,
        default=1,
        help="also run the local engine with --key-partitions K (K > 1)",
    )
    p.add_argument("--spark", action="store_true", help="also --engine spark (local[2])")
    p.add_argument("--dir", type=Path, default=Path("/tmp/streamscore-batch-bench"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    flags = generate(args.dir, args.rows, args.cards, args.events_per_card, seed=7)
    result: dict[str, Any] = {
        "rows": args.rows,
        "cards": args.cards,
        "events": args.cards * args.events_per_card,
        "generate_s": round(time.monotonic() - t, 1),
    }
    cli = [str(Path(sys.executable).with_name("streamscore")), "score-batch"]
    out = args.dir / "scored.parquet"
    common = [*flags, "--chunk-rows", str(args.chunk_rows), "--with-features"]
    wall, rss, hwm, _, cpu = timed(
        [*cli, *common, "--workers", str(args.workers), "--output", str(out)]
    )
    result["local"] = {
        "workers": args.workers,
        "s": round(wall, 1),
        "cpu_s": round(cpu, 2),
        "rows_per_s": round(args.rows / wall),
        "peak_rss_mib": round(rss),
        "largest_process_hwm_mib": round(hwm),
    }
    if args.key_partitions > 1:
        pout = args.dir / "scored-partitioned.parquet"
        parted = ["--workers", str(args.workers), "--key-partitions", str(args.key_partitions)]
        wall, rss, hwm, _, _ = timed([*cli, *common, *parted, "--output", str(pout)])
        result["partitioned"] = {
            "key_partitions": args.key_partitions,
            "s": round(wall, 1),
            "rows_per_s": round(args.rows / wall),
            "peak_rss_mib": round(rss),
            "largest_process_hwm_mib": round(hwm),
            "equal_to_local": bool(pq.read_table(out).equals(pq.read_table(pout))),
        }
        result["partitioned"]["rss_vs_local"] = round(rss / result["local"]["peak_rss_mib"], 3)
        result["partitioned"]["hwm_vs_local"] = round(
            hwm / result["local"]["largest_process_hwm_mib"], 3
        )
        result["partitioned"]["rows_per_s_vs_local"] = round(
            result["partitioned"]["rows_per_s"] / result["local"]["rows_per_s"], 3
        )
    model = next((args.dir / "models" / "fraud" / "1").glob("*.onnx"))
    names = ",".join(f"feature.{n}" for n in DEMO_FEATURES)
    wall, _, _, stdout, cpu = timed([sys.executable, "-c", FLOOR, str(out), str(model), names])
    loop_s = float(stdout.split()[1])
    result["floor"] = {
        "s": round(wall, 1),
        "cpu_s": round(cpu, 2),
        "loop_s": round(loop_s, 2),
        "rows_per_s": round(args.rows / wall),
    }
    result["ratio_local_vs_floor"] = round(
        result["local"]["rows_per_s"] / result["floor"]["rows_per_s"], 4
    )
    if args.spark:
        sout = args.dir / "scored-spark.parquet"
        spark = ["--engine", "spark", "--spark-master", "local[2]", "--output", str(sout)]
        wall, rss, _, _, _ = timed([*cli, *common, *spark])
        result["spark"] = {"s": round(wall, 1), "rows_per_s": round(args.rows / wall)}
        a, b = pq.read_table(out), pq.read_table(sout)
        result["spark"]["equal_to_local"] = bool(a.equals(b))
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
