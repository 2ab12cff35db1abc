"""The stream job's Prometheus metrics, on a registry each worker owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["WorkerMetrics"]

_APPLY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


class WorkerMetrics:
    """Prometheus metrics of one worker, on a registry it owns."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "streamscore_stream_events", "Records read from event topics.", ["topic"], registry=r
        )
        self.applied = Counter(
            "streamscore_stream_applied_events",
            "Events folded into a group's tiles.",
            ["group"],
            registry=r,
        )
        self.duplicates = Counter(
            "streamscore_stream_duplicate_events",
            "Re-read events skipped because their offset was already applied.",
            ["group"],
            registry=r,
        )
        self.late = Counter(
            "streamscore_stream_late_events",
            "Events dropped for arriving later than the allowed lateness (per key).",
            ["group"],
            registry=r,
        )
        self.malformed = Counter(
            "streamscore_stream_malformed_events",
            "Records that failed decoding/validation, sent to the dead-letter topic.",
            ["topic"],
            registry=r,
        )
        self.dead_letter_failures = Counter(
            "streamscore_stream_dead_letter_failures",
            "Dead letters the producer failed to publish.",
            ["topic"],
            registry=r,
        )
        self.lag = Gauge(
            "streamscore_stream_consumer_lag",
            "Highwater minus position, per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.newest_event = Gauge(
            "streamscore_stream_newest_event_time_seconds",
            "Newest event time (epoch s) applied to a group's tiles.",
            ["group"],
            registry=r,
        )
        self.apply_seconds = Histogram(
            "streamscore_stream_apply_seconds",
            "Latency of one pipelined tile apply (one Kafka batch).",
            buckets=_APPLY_BUCKETS,
            registry=r,
        )
        self.batch_records = Histogram(
            "streamscore_stream_batch_records",
            "Records per consumed batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commits = Counter(
            "streamscore_stream_commits", "Successful offset commits.", registry=r
        )
        self.commit_failures = Counter(
            "streamscore_stream_commit_failures", "Failed offset commits.", registry=r
        )
        self.redis_errors = Counter(
            "streamscore_stream_redis_errors", "Failed tile applies (retried).", registry=r
        )
        self.kafka_errors = Counter(
            "streamscore_stream_kafka_errors", "Errors raised by getmany.", registry=r
        )
        self.rejected_keys = Counter(
            "streamscore_stream_rejected_keys",
            "Key batches skipped because the key holds a non-hash value (WRONGTYPE).",
            ["group"],
            registry=r,
        )
        self.script_errors = Counter(
            "streamscore_stream_script_errors",
            "Apply-script calls that failed for their own key batch (retried, bounded).",
            ["group"],
            registry=r,
        )
        self.failed_batches = Counter(
            "streamscore_stream_failed_key_batches",
            "Key batches given up after their retries: their records went to the "
            "dead-letter topic with the error.",
            ["group"],
            registry=r,
        )
        self.trimmed = Counter(
            "streamscore_stream_trimmed_fields",
            "Expired tile fields deleted.",
            ["group"],
            registry=r,
        )
