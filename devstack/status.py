"""The embedded stack's status line, computed from two Prometheus scrapes.

Each round scrapes the server processes' and the stream worker's ``/metrics``; the
line compares it with the previous round: server requests per second and p99
latency (counter and histogram deltas, so it describes the last interval, not the
whole run), failed requests, stream events read per second, consumer lag,
freshness (now minus the newest event time the worker applied), and the score's
drift (PSI over the short window) of every monitored version.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Samples",
    "Scrape",
    "Status",
    "compute_status",
    "format_status",
    "histogram_quantile",
    "merge_samples",
    "parse_metrics",
    "score_drift",
    "scrape_metrics",
]

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]
"""Sample value by (sample name, sorted label pairs)."""

REQUESTS = "streamscore_requests_total"
LATENCY_BUCKETS = "streamscore_request_latency_seconds_bucket"
STREAM_EVENTS = "streamscore_stream_events_total"
STREAM_LAG = "streamscore_stream_consumer_lag"
STREAM_NEWEST = "streamscore_stream_newest_event_time_seconds"
SCORE_DRIFT = "streamscore_drift_score_psi"


def parse_metrics(text: str) -> dict[tuple[str, Labels], float]:
    """Parse Prometheus text exposition into samples."""
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def scrape_metrics(url: str, timeout_s: float = 1.0) -> dict[tuple[str, Labels], float] | None:
    """GET and parse ``url``; ``None`` when it cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return parse_metrics(response.read().decode("utf-8"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def merge_samples(parts: Iterable[Samples]) -> dict[tuple[str, Labels], float]:
    """Sum samples of several processes (counters and histograms add up)."""
    merged: dict[tuple[str, Labels], float] = {}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def score_drift(parts: Iterable[Samples]) -> dict[str, float]:
    """Score PSI per ``model/version``: every process exports the same merged window,
    so the largest value is taken (summing, as for counters, would be wrong)."""
    drift: dict[str, float] = {}
    for part in parts:
        for labels, value in _matching(part, SCORE_DRIFT):
            named = dict(labels)
            key = f"{named.get('model', '?')}/{named.get('version', '?')}"
            drift[key] = max(drift.get(key, value), value)
    return drift


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _matching(samples: Samples, name: str) -> list[tuple[Labels, float]]:
    return [(labels, v) for (n, labels), v in samples.items() if n == name]


def _buckets(samples: Samples, name: str) -> dict[float, float]:
    """Cumulative count per upper bound, summed over every other label."""
    out: dict[float, float] = {}
    for labels, value in _matching(samples, name):
        le = dict(labels).get("le")
        if le is not None:
            bound = float(le)
            out[bound] = out.get(bound, 0.0) + value
    return out


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """Prometheus-style quantile of cumulative bucket counts (upper bound -> count),
    interpolated linearly inside the bucket; ``None`` when there is no observation.
    A quantile in the ``+Inf`` bucket reports the highest finite bound."""
    bounds = sorted(cumulative)
    if not bounds:
        return None
    total = cumulative[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class Scrape:
    """One round: when, and the samples (``None`` = endpoint unreachable or disabled)."""

    monotonic: float
    wall: float
    server: Samples | None
    worker: Samples | None
    drift: Mapping[str, float] = field(default_factory=dict)
    """Score PSI per ``model/version`` (:func:`score_drift`)."""

    @classmethod
    def take(
        cls, server_urls: Sequence[str], worker_url: str | None, timeout_s: float = 1.0
    ) -> Scrape:
        """Scrape every server process and the worker now (blocking)."""
        parts = [scrape_metrics(url, timeout_s) for url in server_urls]
        reached = [p for p in parts if p is not None]
        server = merge_samples(reached) if reached else None
        worker = scrape_metrics(worker_url, timeout_s) if worker_url else None
        return cls(time.monotonic(), time.time(), server, worker, score_drift(reached))


@dataclass(frozen=True, slots=True)
class Status:
    """What one status line shows; ``None`` = unknown (endpoint down or no data)."""

    interval_s: float
    requests_per_s: float | None
    failed_per_s: float | None
    p99_s: float | None
    events_per_s: float | None
    lag: float | None
    freshness_s: float | None
    drift: Mapping[str, float] = field(default_factory=dict)
    """Score PSI per ``model/version`` at the second scrape."""


def _rate(now: float, before: float, seconds: float) -> float:
    return max(now - before, 0.0) / seconds  # a restarted process resets its counters


def compute_status(previous: Scrape, current: Scrape) -> Status:
    """The status of the interval between two scrapes."""
    seconds = max(current.monotonic - previous.monotonic, 1e-9)
    rps = failed = p99 = events = lag = freshness = None
    if current.server is not None and previous.server is not None:
        before, now = previous.server, current.server
        rps = _rate(_total(now, REQUESTS), _total(before, REQUESTS), seconds)
        failed_now = sum(
            v for labels, v in _matching(now, REQUESTS) if dict(labels)["code"] != "OK"
        )
        failed_before = sum(
            v for labels, v in _matching(before, REQUESTS) if dict(labels)["code"] != "OK"
        )
        failed = _rate(failed_now, failed_before, seconds)
        old = _buckets(before, LATENCY_BUCKETS)
        delta = {b: c - old.get(b, 0.0) for b, c in _buckets(now, LATENCY_BUCKETS).items()}
        p99 = histogram_quantile(0.99, delta)
    if current.worker is not None:
        lag = _total(current.worker, STREAM_LAG)
        newest = [v for _, v in _matching(current.worker, STREAM_NEWEST) if v > 0]
        if newest:
            freshness = max(current.wall - max(newest), 0.0)
        if previous.worker is not None:
            events = _rate(
                _total(current.worker, STREAM_EVENTS),
                _total(previous.worker, STREAM_EVENTS),
                seconds,
            )
    return Status(seconds, rps, failed, p99, events, lag, freshness, current.drift)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_status(status: Status, built_in_per_s: float = 0.0) -> str:
    """One line, e.g. ``status | score 120.0 req/s (built-in 20/s) p99 1.84 ms failed
    0.0/s | stream 200.0 ev/s lag 0 | freshness 0.08 s | drift psi fraud/1 0.012``.

    ``built_in_per_s``: the stack's own Score load, said beside the rate it is part of.
    """
    p99_ms = None if status.p99_s is None else status.p99_s * 1000.0
    built_in = f" (built-in {built_in_per_s:g}/s)" if built_in_per_s > 0 else ""
    drift = " ".join(f"{name} {psi:.3f}" for name, psi in sorted(status.drift.items())) or "-"
    return (
        f"status | score {_fmt(status.requests_per_s, '{:.1f}')} req/s{built_in}"
        f" p99 {_fmt(p99_ms, '{:.2f}')} ms failed {_fmt(status.failed_per_s, '{:.1f}')}/s"
        f" | stream {_fmt(status.events_per_s, '{:.1f}')} ev/s lag {_fmt(status.lag, '{:.0f}')}"
        f" | freshness {_fmt(status.freshness_s, '{:.2f}')} s"
        f" | drift psi {drift}"
    )
