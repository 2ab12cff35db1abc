"""Latency recording on an HDR histogram (microsecond resolution, 3 significant digits).

``hdrh`` records integers; we record microseconds and clamp anything beyond the
trackable range (one hour) to its top so no sample is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one histogram, in microseconds (0 everywhere when ``count`` is 0)."""

    count: int
    min_us: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int

    def to_json(self) -> dict[str, float | int]:
        """Plain dict with the keys ``count min mean p50 p90 p99 p99.9 max``."""
        return {
            "count": self.count,
            "min": self.min_us,
            "mean": round(self.mean_us, 1),
            "p50": self.p50_us,
            "p90": self.p90_us,
            "p99": self.p99_us,
            "p99.9": self.p999_us,
            "max": self.max_us,
        }


class LatencyHistogram:
    """An HDR histogram of latencies recorded in nanoseconds, stored in microseconds."""

    __slots__ = ("_hist",)

    def __init__(self) -> None:
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)

    def record_ns(self, latency_ns: int) -> None:
        """Record one latency given in nanoseconds (sub-microsecond values count as 1 us)."""
        us = latency_ns // 1000
        if us < LOWEST_US:
            us = LOWEST_US
        elif us > HIGHEST_US:
            us = HIGHEST_US
        self._hist.record_value(us)

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return int(self._hist.get_total_count())

    def add(self, other: LatencyHistogram) -> None:
        """Merge ``other``'s counts into this histogram."""
        self._hist.add(other._hist)

    def encode(self) -> str:
        """Base64 HdrHistogram encoding (mergeable with ``hdrh`` tools); empty if no values."""
        if self.count == 0:
            return ""
        encoded = self._hist.encode()
        return encoded.decode("ascii") if isinstance(encoded, bytes) else str(encoded)

    def summary(self) -> LatencySummary:
        """Percentiles, min, max and mean of what was recorded."""
        if self.count == 0:
            return LatencySummary(0, 0, 0.0, 0, 0, 0, 0, 0)
        values = self._hist.get_percentile_to_value_dict(list(PERCENTILES))
        return LatencySummary(
            count=self.count,
            min_us=int(self._hist.get_min_value()),
            mean_us=float(self._hist.get_mean_value()),
            p50_us=int(values[50.0]),
            p90_us=int(values[90.0]),
            p99_us=int(values[99.0]),
            p999_us=int(values[99.9]),
            max_us=int(self._hist.get_max_value()),
        )
