"""Prometheus metrics the hot path updates: plain Python numbers, exposed at scrape time.

prometheus-client's own children take a lock and do a label lookup per update; on a path that
serves tens of thousands of requests a second in one event loop (one thread), a plain integer
add is enough. These families keep the same `.inc()` / `.observe()` / `.set()` calls and are
collected into the registry like any other collector; names, help, labels and buckets are the
ones a `Counter` / `Histogram` / `Gauge` would expose.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

_bisect_left: Final = bisect.bisect_left  # a static read when compiled, not a dict lookup


class PlainCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class PlainHistogramChild:
    """Counts per bucket; Prometheus' `le` means value <= bound, which is `bisect_left`."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bisect_left(self.bounds, value)] += 1
        self.sum += value


class PlainCounter(Collector):
    def __init__(
        self, name: str, documentation: str, label: str, values: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.label = label
        self.children = {v: PlainCount() for v in values}
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in self.children.items():
            family.add_metric([value], child.value)
        yield family


class PlainHistogram(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: Sequence[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.buckets = buckets
        self.children = {v: PlainHistogramChild(buckets) for v in values}
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        edges = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        for value, child in self.children.items():
            cumulative, running = [], 0
            for edge, count in zip(edges, child.counts, strict=True):
                running += count
                cumulative.append((edge, running))
            family.add_metric([value], cumulative, child.sum)
        yield family


class PlainGauge(Collector):
    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = value

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


class PlainCounters(Collector):
    """A counter family over several labels; `children[(v1, v2, ...)]`, every series at zero."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        keys: Iterable[tuple[str, ...]],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labels = labels
        self.children = {key: PlainCount() for key in keys}
        registry.register(self)

    def by_first(self, first: str) -> dict[str, PlainCount]:
        """The children whose first label is `first`, keyed by the second (two labels only)."""
        return {key[1]: child for key, child in self.children.items() if key[0] == first}

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for key, child in self.children.items():
            family.add_metric(list(key), child.value)
        yield family


class PlainGauges(Collector):
    """A gauge family with one label; `children[value]` each hold a plain number."""

    def __init__(
        self, name: str, documentation: str, label: str, values: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.children = {v: PlainCount() for v in values}
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in self.children.items():
            family.add_metric([value], child.value)
        yield family
