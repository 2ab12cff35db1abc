"""The stream job: Kafka events -> time tiles in Redis, applied once, offsets committed.

One module per job::

    worker.py        StreamWorker: lifecycle, the consume loop, apply with retry, rebalances
    records.py       one consumed batch -> per-key tile work + dead letters (no I/O)
    dead_letters.py  publishing malformed records to <topic>.dlq
    offsets.py       pending commits, commits, the lag gauge
    trim.py          trimming expired tiles of written keys
    metrics.py       its Prometheus metrics
    config.py        WorkerConfig
    serve.py         run one worker until SIGTERM (``streamscore stream``)
"""

from __future__ import annotations

from feature_streams.stream_job.config import WorkerConfig
from feature_streams.stream_job.metrics import WorkerMetrics
from feature_streams.stream_job.serve import serve
from feature_streams.stream_job.worker import BatchReport, StreamWorker

__all__ = ["BatchReport", "StreamWorker", "WorkerConfig", "WorkerMetrics", "serve"]
