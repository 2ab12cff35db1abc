"""How long a job queued now will wait before its own batch runs (pure).

The batcher refuses a job whose expected wait exceeds ``max_queue_wait_ms`` and one whose
deadline comes first; both read the estimate here. It is built so that an accepted job's
latency stays within the budget plus its own batch:

* the wait is the **rest of the batch in progress** (a batch time less what has already
  run) plus the **full batches ahead** of the one the job joins: rows are counted, so a
  job that fits into the batch being filled waits for none of them (counting the running
  batch whole and a partial batch as one more would refuse calls that would be served in
  one batch time, and leave the next batch short);
* a batch time is a **high quantile of recent batches** (``BatchTimes.high``) for the
  budget, so a slow batch does not let the queue grow past it, and their median
  (``BatchTimes.typical``) for the deadline check (expected, not worst, wait).
"""

from __future__ import annotations

import math
from collections import deque

#: Batches remembered; at overload a window is a few seconds of batches.
DEFAULT_WINDOW = 64
#: Quantile of recent batch times that bounds the wait (``BatchTimes.high``).
DEFAULT_QUANTILE = 0.9


class BatchTimes:
    """Run times of the most recent batches and two quantiles of them (0 until one ran).

    The quantiles are recomputed when a batch is added (once per batch), so reading them
    on every admission costs nothing.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, quantile: float = DEFAULT_QUANTILE) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if not 0.5 <= quantile <= 1.0:
            raise ValueError("quantile must be in [0.5, 1]")
        self._recent: deque[float] = deque(maxlen=window)
        self._quantile = quantile
        self.high = 0.0
        self.typical = 0.0

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, seconds: float) -> None:
        """Record one batch's run time."""
        self._recent.append(max(0.0, seconds))
        ordered = sorted(self._recent)
        self.high = ordered[math.ceil(self._quantile * len(ordered)) - 1]
        self.typical = ordered[(len(ordered) - 1) // 2]


def batches_ahead(rows_queued: int, rows: int, max_batch_size: int) -> int:
    """Full batches that run before the one a job of ``rows`` rows joins, with
    ``rows_queued`` rows queued ahead of it (whole jobs packed in arrival order)."""
    return (rows_queued + rows - 1) // max_batch_size


def expected_wait(
    rows_queued: int,
    rows: int,
    max_batch_size: int,
    batch_seconds: float,
    running_for: float | None,
) -> float:
    """Seconds a job queued now waits before its batch starts.

    ``running_for``: how long the batch in progress has run (``None``: none is running;
    one being gathered is made of the queued rows, which ``rows_queued`` counts).
    """
    rest = 0.0 if running_for is None else max(0.0, batch_seconds - running_for)
    return rest + batches_ahead(rows_queued, rows, max_batch_size) * batch_seconds
