"""Lock-free loop metrics expose exactly what prometheus_client's own classes expose."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.features import Freshness
from server.loop_metrics import LoopCounter, LoopCounterFamily, LoopHistogram, LoopHistogramFamily
from server.metrics import _BATCH_BUCKETS, _LATENCY_BUCKETS, Metrics


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


def test_feature_metrics_per_answer_are_lock_free_with_the_same_samples() -> None:
    """Freshness and degraded reasons are observed per answer that read the store:
    loop children (no prometheus_client mutex), exposing prometheus_client's samples."""
    metrics = Metrics()
    reference = CollectorRegistry()
    ref_fresh = Histogram(
        "streamscore_feature_freshness_seconds",
        "Age of the newest applied stream event behind an answer, by stream group.",
        ["group"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        registry=reference,
    )
    ref_degraded = Counter(
        "streamscore_degraded_answers",
        "Answers given with default features because a dependency failed, by reason.",
        ["reason"],
        registry=reference,
    )
    answers = [
        ([Freshness("card", "c1", 7), Freshness("merchant", "m1", 90_000_000)], []),
        ([Freshness("card", "c2", 1_500)], ["store_key_error"]),
        ([], ["redis_unavailable", "store_key_error"]),
    ]
    for freshness, degraded in answers:
        metrics.observe_features(freshness, degraded)
        for item in freshness:
            ref_fresh.labels(item.group).observe(item.age_ms / 1000.0)
        for reason in degraded:
            ref_degraded.labels(reason).inc()
    assert isinstance(metrics.freshness.labels("card"), LoopHistogram)
    assert isinstance(metrics.degraded.labels("store_key_error"), LoopCounter)
    names = ("streamscore_feature_freshness_seconds", "streamscore_degraded_answers")
    ours = [line for line in exposition(metrics.registry) if line.split("{")[0].startswith(names)]
    ours = [line for line in ours if not line.startswith("# ")]
    assert ours and ours == [line for line in exposition(reference) if not line.startswith("# ")]


def test_queue_depth_is_a_plain_value_read_at_scrape() -> None:
    metrics = Metrics()
    observer = metrics.observer_for("fraud", "2")
    observer.queue_depth(7)
    labels = {"model": "fraud", "version": "2"}
    assert metrics.registry.get_sample_value("streamscore_queue_depth", labels) == 7
    observer.queue_depth(0)
    assert metrics.registry.get_sample_value("streamscore_queue_depth", labels) == 0
