"""Offsets: what was applied and not yet committed, commits, and the lag gauge.

Only applied work is committed (``offset + 1`` per partition), at once or every
``commit_interval_s``; a failed commit keeps its offsets pending (the next owner
re-reads from the last commit, which the apply script makes harmless).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from feature_streams.stream_job.metrics import WorkerMetrics

__all__ = ["OffsetTracker"]

logger = logging.getLogger(__name__)


class OffsetTracker:
    """Pending commits and consumer positions of the partitions a worker owns."""

    def __init__(self, metrics: WorkerMetrics, commit_interval_s: float) -> None:
        self._metrics = metrics
        self._interval = commit_interval_s
        self._pending: dict[TopicPartition, int] = {}
        self._position: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()

    def applied(self, consumed: Mapping[TopicPartition, int]) -> None:
        """Mark next offsets whose records are applied: to commit, and positions."""
        self._pending.update(consumed)
        self._position.update(consumed)

    def positions(self, known: Mapping[TopicPartition, int]) -> None:
        """Record positions learned on assignment (for the lag gauge)."""
        self._position.update(known)

    async def commit(self, consumer: AIOKafkaConsumer | None, force: bool) -> None:
        """Commit pending offsets of assigned partitions (unless the interval has not
        passed and ``force`` is false)."""
        if consumer is None or not self._pending:
            return
        if (
            not force
            and self._interval > 0
            and time.monotonic() - self._last_commit < self._interval
        ):
            return
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in self._pending.items() if tp in assigned}
        self._pending.clear()
        self._last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # CommitFailedError, IllegalStateError included
            self._metrics.commit_failures.inc()
            logger.warning("offset commit failed (the next owner re-reads): %r", exc)
            for tp, off in offsets.items():
                self._pending.setdefault(tp, off)
        else:
            self._metrics.commits.inc()

    def update_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Set the lag gauge (highwater - position) of every assigned partition."""
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self._position.get(tp)
            if high is not None and position is not None:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(max(high - position, 0))

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        """Drop the state of revoked partitions (after the final commit)."""
        for tp in revoked:
            self._pending.pop(tp, None)
            self._position.pop(tp, None)
            with contextlib.suppress(KeyError):
                self._metrics.lag.remove(tp.topic, str(tp.partition))
