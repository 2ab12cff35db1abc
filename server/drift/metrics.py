"""Prometheus gauges of drift monitoring (on the process's registry)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.drift.views import WindowView
from server.governance.profile import SCORE


class DriftMetrics:
    """Drift gauges over the short window, merged across processes (every process
    exports the same merged value: aggregate with ``max``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.psi = Gauge(
            "streamscore_drift_psi",
            "PSI of a feature's served distribution vs its reference, over the short window.",
            ["model", "version", "feature"],
            registry=registry,
        )
        self.score_psi = Gauge(
            "streamscore_drift_score_psi",
            "PSI of the score's served distribution vs its reference, over the short window.",
            ["model", "version"],
            registry=registry,
        )
        self.js = Gauge(
            "streamscore_drift_js",
            "Jensen-Shannon divergence (base 2) of a categorical feature vs its reference.",
            ["model", "version", "feature"],
            registry=registry,
        )
        self.defaulted = Gauge(
            "streamscore_drift_defaulted_share",
            "Share of answers whose feature was served as its default, over the short window.",
            ["model", "version", "feature"],
            registry=registry,
        )
        self.rows = Gauge(
            "streamscore_drift_window_rows",
            "Rows in the short drift window (all processes).",
            ["model", "version"],
            registry=registry,
        )
        self.events = Counter(
            "streamscore_drift_events",
            "Drift breach episodes this process reported (one event each).",
            ["model", "version"],
            registry=registry,
        )
        self.flush_failures = Counter(
            "streamscore_drift_flush_failures",
            "Drift count flushes to Redis that failed (retried next flush).",
            registry=registry,
        )

    def export(self, model: str, version: str, view: WindowView) -> None:
        """Set every gauge of one version from its short window."""
        self.rows.labels(model, version).set(view.rows)
        for column in view.columns:
            if column.name == SCORE:
                self.score_psi.labels(model, version).set(column.psi)
                continue
            self.psi.labels(model, version, column.name).set(column.psi)
            if column.js is not None:
                self.js.labels(model, version, column.name).set(column.js)
            self.defaulted.labels(model, version, column.name).set(
                view.defaulted_share.get(column.name, 0.0)
            )

    def remove(self, model: str, version: str, features: Sequence[str]) -> None:
        """Drop the children of an unloaded version."""
        for gauge in (self.score_psi, self.rows):
            _remove(gauge, model, version)
        for feature in features:
            for gauge in (self.psi, self.js, self.defaulted):
                _remove(gauge, model, version, feature)

    def event(self, model: str, version: str) -> None:
        """One breach episode reported."""
        self.events.labels(model, version).inc()

    def flush_failed(self) -> None:
        """One failed flush."""
        self.flush_failures.inc()


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
