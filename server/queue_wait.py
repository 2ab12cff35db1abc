"""How long a job queued now will wait before its own batch runs (pure).

The batcher refuses a job whose expected wait exceeds ``max_queue_wait_ms`` and one whose
deadline comes first; both read the estimate here. It is built so that an accepted job's
latency stays within the budget plus its own batch:

* the wait is the **rest of the batch in progress** (its batch time less what it has
  already run) plus the **full batches ahead** of the one the job joins: rows are
  counted, so a job that fits into the batch being filled waits for none of them
  (counting the running batch whole and a partial batch as one more would refuse calls
  that would be served in one batch time, and leave the next batch short);
* a batch time is a **high quantile of recent batches** (``BatchTimes``) for the
  budget, so a slow batch does not let the queue grow past it, and their median for the
  deadline check (expected, not worst, wait);
* batches ahead are full, so they are timed by recent **full** batches, kept apart: a
  model whose time grows with rows runs small batches at light load, and timing the
  first full ones of an overload by those would admit several times too many until the
  window turned over;
* the **first batch** after a start or reload is not recorded: it carries one-time costs
  (ORT's first run allocates, caches are cold, a worker thread starts), and as the
  window's maximum it would be the p90 for the next ~10 batches, refusing calls on a
  cold estimate after every (re)load.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass

#: Batches remembered per window; at overload a window is a few seconds of batches.
DEFAULT_WINDOW = 64
#: Quantile of recent batch times that bounds the wait (``Quantiles.high``).
DEFAULT_QUANTILE = 0.9
#: A batch with at least this share of ``max_batch_size`` rows counts as full.
FULL_SHARE = 0.75


@dataclass(frozen=True, slots=True)
class Quantiles:
    """Two quantiles of recent batch times (s): ``high`` bounds, ``typical`` expects."""

    high: float = 0.0
    typical: float = 0.0


class _Window:
    """The last ``window`` values in arrival order and kept sorted (one insertion and
    one removal per value, not a sort: it runs once per batch, i.e. per lone request)."""

    def __init__(self, window: int, quantile: float) -> None:
        self._values: deque[float] = deque()
        self._window = window
        self._ordered: list[float] = []
        self._quantile = quantile
        self._quantiles: Quantiles | None = Quantiles()

    def __len__(self) -> int:
        return len(self._values)

    @property
    def quantiles(self) -> Quantiles:
        """Of the values now (computed on the first read after a change)."""
        quantiles = self._quantiles
        if quantiles is None:
            ordered = self._ordered
            n = len(ordered)
            quantiles = self._quantiles = Quantiles(
                high=ordered[math.ceil(self._quantile * n) - 1], typical=ordered[(n - 1) // 2]
            )
        return quantiles

    def add(self, seconds: float) -> None:
        value = max(0.0, seconds)
        values, ordered = self._values, self._ordered
        if len(values) == self._window:
            del ordered[bisect_left(ordered, values.popleft())]
        values.append(value)
        insort(ordered, value)
        self._quantiles = None


class BatchTimes:
    """Run times of recent batches, all of them and the full ones apart (0 until one ran).

    Quantiles are recomputed on the first read after a batch was added (an admission
    that checks a budget or a deadline), not per batch.
    """

    def __init__(
        self,
        max_batch_size: int,
        window: int = DEFAULT_WINDOW,
        quantile: float = DEFAULT_QUANTILE,
        *,
        skip_first: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        if not 0.5 <= quantile <= 1.0:
            raise ValueError("quantile must be in [0.5, 1]")
        self._full_rows = max(1, math.ceil(FULL_SHARE * max_batch_size))
        #: The batcher's first batch is cold (see the module docstring): not recorded.
        self._cold = skip_first
        self._all = _Window(window, quantile)
        self._full = _Window(window, quantile)

    def __len__(self) -> int:
        return len(self._all)

    def add(self, seconds: float, rows: int) -> None:
        """Record one batch of ``rows`` rows that ran ``seconds`` (the first one is not)."""
        if self._cold:
            self._cold = False  # one-time costs: not what the next batches will take
            return
        self._all.add(seconds)
        if rows >= self._full_rows:
            self._full.add(seconds)

    def of(self, rows: int) -> Quantiles:
        """Quantiles for a batch of ``rows`` rows: those of recent full batches when it
        is full (all recent batches until a full one ran), of all recent ones otherwise."""
        if rows >= self._full_rows and len(self._full):
            return self._full.quantiles
        return self._all.quantiles

    @property
    def full(self) -> Quantiles:
        """Quantiles of a full batch."""
        return self.of(self._full_rows)


def batches_ahead(rows_queued: int, rows: int, max_batch_size: int) -> int:
    """Full batches that run before the one a job of ``rows`` rows joins, with
    ``rows_queued`` rows queued ahead of it (whole jobs packed in arrival order)."""
    return (rows_queued + rows - 1) // max_batch_size


def expected_wait(
    rows_queued: int,
    rows: int,
    max_batch_size: int,
    full_batch_s: float,
    running: tuple[float, float] | None,
) -> float:
    """Seconds a job queued now waits before its batch starts.

    ``running``: (the running batch's expected time, how long it has run), ``None`` when
    no batch is running (one being gathered is made of the queued rows, which
    ``rows_queued`` counts). ``full_batch_s``: the time of each full batch ahead.
    """
    rest = 0.0 if running is None else max(0.0, running[0] - running[1])
    return rest + batches_ahead(rows_queued, rows, max_batch_size) * full_batch_s
