"""The stream job's settings (besides the feature definitions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs besides the feature definitions."""

    bootstrap_servers: str
    redis_url: str
    redis_mode: Literal["standalone", "cluster", "auto"] = "auto"
    """``redis.mode``: a set mode that disagrees with the server fails the start."""
    group_id: str = "streamscore-features"
    stream_groups: tuple[str, ...] = ()
    """Stream groups to maintain; empty = every group in the definitions."""
    client_id: str = "streamscore-stream-worker"
    commit_interval_s: float = 0.0
    """0 commits after every applied batch; more batches commits (applied work is
    never lost, only re-read after a crash)."""
    max_batch_records: int = 5000
    poll_timeout_ms: int = 100
    fetch_max_wait_ms: int = 10
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    trim_interval_s: float = 60.0
    """How often expired tiles of recently written keys are trimmed."""
    trim_batch_keys: int = 1000
    """Keys trimmed per loop iteration while a trim round is in progress."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port (0 = any free port); ``None`` = off."""
    metrics_host: str = "127.0.0.1"
    redis_retry_max_s: float = 2.0
    redis_timeout_s: float = 5.0
    """Socket connect and read timeout of every Redis call: a black-holed or frozen
    Redis fails the call (retried) instead of hanging the worker and its drain."""
    max_events_per_call: int = 500
    """Events of one key per apply-script call (a hot key's backlog is chunked)."""
    script_retries: int = 3
    """Attempts of a key batch whose script call failed (not a store-wide error)
    before its records go to the dead-letter topic with the error."""
    max_event_ahead_ms: int | None = 86_400_000
    """Events whose event time is more than this ahead of the worker's wall clock go
    to the dead-letter topic: one wrong timestamp (e.g. in microseconds) would raise
    its key's lateness mark and drop the key's real events as late until the hash
    expires. ``None`` = no check."""

    def __post_init__(self) -> None:
        if self.commit_interval_s < 0 or self.trim_interval_s < 0:
            raise ValueError("commit_interval_s and trim_interval_s must be >= 0")
        if self.redis_timeout_s <= 0 or self.max_events_per_call < 1 or self.script_retries < 1:
            raise ValueError(
                "redis_timeout_s must be > 0, max_events_per_call and script_retries >= 1"
            )
        if self.max_batch_records < 1 or self.trim_batch_keys < 1 or self.poll_timeout_ms < 0:
            raise ValueError(
                "max_batch_records and trim_batch_keys must be >= 1, poll_timeout_ms >= 0"
            )
