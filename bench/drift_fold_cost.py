"""CPU cost of drift monitoring per scored row, in process (robust on a noisy machine).

Feeds 4,096 rows of the demo model's width through ``VersionDrift.observe`` (the
executor's hook) in batches of 1 and of 64, then one ``fold``; reports CPU
microseconds per row (best of 5). Then the wall time of one fold of a full pending
block and of 1,024 rows (the event-loop stall a fold is). Pin it like the server::

    taskset -c 0 .venv/bin/python -m bench.drift_fold_cost --version-dir /tmp/models/fraud/2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.drift.metrics import DriftMetrics
from server.drift.monitor import PENDING_ROWS, DriftMonitor
from server.features import Prepared
from server.manifest import ModelManifest
from server.settings import DriftSettings

ROWS = 4096


class _Job:
    __slots__ = ("prepared",)

    def __init__(self, prepared: Prepared | None) -> None:
        self.prepared = prepared


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_fold_cost", description=__doc__)
    parser.add_argument("--version-dir", type=Path, default=Path("models/fraud/2"))
    args = parser.parse_args(argv)
    manifest = ModelManifest.read(args.version_dir)
    metrics = DriftMetrics(CollectorRegistry())
    monitor = DriftMonitor(DriftSettings(), Redis(), metrics, clock=time.time)
    drift = monitor.attach(args.version_dir, manifest, manifest.features)
    if drift is None:
        parser.error(f"no usable reference profile in {args.version_dir}")
    width = len(manifest.features)
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        count = ROWS // batch
        matrices = [rng.normal(size=(batch, width)).astype(np.float32) for _ in range(count)]
        outputs = [
            {manifest.score_output: rng.random((batch, 2)).astype(np.float32)} for _ in range(count)
        ]
        row = Prepared(matrices[0][:1], np.ones(width, bool), {}, 0)
        jobs = [[_Job(row) for _ in range(batch)] for _ in range(count)]
        observe_us = total_us = float("inf")
        for _ in range(5):
            started = time.process_time()
            for i in range(count):
                drift.observe(matrices[i], outputs[i], jobs[i])
            observed = time.process_time()
            drift.fold()
            done = time.process_time()
            observe_us = min(observe_us, (observed - started) / ROWS * 1e6)
            total_us = min(total_us, (done - started) / ROWS * 1e6)
        print(
            f"batch {batch:>2}, {width} features: observe {observe_us:.2f} us/row, "
            f"observe + fold {total_us:.2f} us/row (CPU)"
        )
    for rows in (PENDING_ROWS, 1024):
        block = rng.normal(size=(rows, len(drift.layout.features) + 1)).astype(np.float32)
        best = float("inf")
        for _ in range(200):
            started = time.perf_counter()
            drift.layout.fold_values(block)
            best = min(best, time.perf_counter() - started)
        print(f"fold of {rows} rows: {best * 1e6:.0f} us (best of 200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
