"""Lock-free Prometheus counters and histograms for the event loop's request path.

prometheus_client takes a mutex per update (a histogram observation takes two), which
the before-profile of the hot path showed at ~9% of the serving loop. These children
are updated only from the event loop thread (plain int/float arithmetic, no lock) and
read when scraped (from the exposition thread: a scrape may see one update torn
between the count and the sum, never a lost update). Families register on a
``CollectorRegistry`` like any collector and expose the same sample names
(``_total``; ``_bucket``/``_count``/``_sum``) as prometheus_client's own classes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LoopCounter:
    """One counter child; ``inc`` from the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0)."""
        self.value += amount


class LoopHistogram:
    """One histogram child with fixed upper bounds; ``observe`` from the event loop only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is >= it."""
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        registry.register(self)

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")


class LoopCounterFamily(_Family):
    """A labelled counter whose children are ``LoopCounter``s (bind them once)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._children: dict[tuple[str, ...], LoopCounter] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> LoopCounter:
        """The child of these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = LoopCounter()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogramFamily(_Family):
    """A labelled histogram whose children are ``LoopHistogram``s (bind them once)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError(f"{name}: buckets must increase strictly")
        self._children: dict[tuple[str, ...], LoopHistogram] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> LoopHistogram:
        """The child of these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = LoopHistogram(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [_le(b) for b in self._bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for edge, count in zip(edges, counts, strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``0.005``, ``1.0``, ``64.0``)."""
    return repr(float(bound))
