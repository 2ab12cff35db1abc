"""Lock-free loop metrics expose exactly what prometheus_client's own classes expose."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.loop_metrics import LoopCounterFamily, LoopHistogramFamily
from server.metrics import _BATCH_BUCKETS, _LATENCY_BUCKETS


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@pytest.mark.parametrize("buckets", [_LATENCY_BUCKETS, _BATCH_BUCKETS])
def test_same_samples_as_prometheus_client(buckets: tuple[float, ...]) -> None:
    reference, ours = CollectorRegistry(), CollectorRegistry()
    ref_hist = Histogram("h_seconds", "doc", ["api", "model"], buckets=buckets, registry=reference)
    ref_count = Counter("requests", "doc", ["api", "code"], registry=reference)
    hist = LoopHistogramFamily("h_seconds", "doc", ["api", "model"], buckets, ours)
    count = LoopCounterFamily("requests", "doc", ["api", "code"], ours)
    values = [0.0, buckets[0], buckets[0] * 1.5, buckets[-1], buckets[-1] * 2, 3e-5, 7.0]
    for i, value in enumerate(values):
        labels = ("v2", "fraud" if i % 2 else "_unknown")
        ref_hist.labels(*labels).observe(value)
        hist.labels(*labels).observe(value)
        ref_count.labels("v2", "OK").inc()
        count.labels("v2", "OK").inc()
    assert exposition(ours) == exposition(reference)
    assert ours.get_sample_value("requests_total", {"api": "v2", "code": "OK"}) == len(values)


def test_wrong_label_count_is_refused() -> None:
    family = LoopCounterFamily("c", "doc", ["a", "b"], CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        family.labels("only-one")
