"""Every Prometheus metric, declared once, in a registry owned by one proxy instance.

Label sets are small and fixed and pre-initialised, so every series exists at zero from the first
scrape (Prometheus' own advice) and the hot path uses ready label children, never `.labels()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shadowproxy.verdict import GatesLike, evaluate

if TYPE_CHECKING:
    from shadowproxy.stats import ShadowStats

# Model latencies run from about a millisecond (a small tree model) to tens of seconds (an LLM).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
TARGETS = ("production", "candidate")
MIRROR_RESULTS = ("sent", "dropped", "skipped", "error")
OUTCOMES = ("agree", "disagree", "candidate_error", "unparseable", "too_large")
CLIENT_ERRORS = ("bad_request", "header_too_large", "body_too_large", "header_timeout")
UPSTREAM_FAILURES = ("connect", "timeout", "reset", "malformed")
SKIP_REASONS = ("method", "body_too_large")
DROP_REASONS = ("in_flight_full", "backoff", "client_gone")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "shadowproxy_requests_total",
            "Client-facing answers by status class (our own 4xx/5xx included).",
            ["status_class"],
            registry=r,
        )
        self.requests_by_class = {c: self.requests.labels(c) for c in STATUS_CLASSES}
        self.upstream_duration = Histogram(
            "shadowproxy_upstream_request_duration_seconds",
            "Upstream exchange time, first byte sent to last byte of the answer.",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration_by_target = {t: self.upstream_duration.labels(t) for t in TARGETS}
        self.upstream_failures = Counter(
            "shadowproxy_upstream_failures_total",
            "Upstream exchanges that produced no complete answer, by target and kind.",
            ["target", "kind"],
            registry=r,
        )
        for t in TARGETS:
            for k in UPSTREAM_FAILURES:
                self.upstream_failures.labels(t, k)
        self.client_errors = Counter(
            "shadowproxy_client_errors_total",
            "Client requests refused before reaching production, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in CLIENT_ERRORS:
            self.client_errors.labels(reason)
        self.mirror_requests = Counter(
            "shadowproxy_mirror_requests_total",
            "Sampled requests by what became of their shadow copy.",
            ["result"],
            registry=r,
        )
        self.mirror_by_result = {res: self.mirror_requests.labels(res) for res in MIRROR_RESULTS}
        self.mirror_skipped = Counter(
            "shadowproxy_mirror_skipped_total",
            "Sampled requests not mirrored because they were not eligible, by reason.",
            ["reason"],
            registry=r,
        )
        self.mirror_dropped = Counter(
            "shadowproxy_mirror_dropped_total",
            "Sampled requests not mirrored for lack of capacity or a backed-off candidate, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in SKIP_REASONS:
            self.mirror_skipped.labels(reason)
        for reason in DROP_REASONS:
            self.mirror_dropped.labels(reason)
        self.mirror_in_flight = Gauge(
            "shadowproxy_mirror_in_flight", "Shadow requests outstanding.", registry=r
        )
        self.mirror_sample_rate = Gauge(
            "shadowproxy_mirror_sample_rate", "The share of requests currently mirrored.", registry=r
        )
        self.comparisons = Counter(
            "shadowproxy_comparisons_total",
            "Compared predictions by outcome (candidate_error and unparseable count requests).",
            ["outcome"],
            registry=r,
        )
        self.comparisons_by_outcome = {o: self.comparisons.labels(o) for o in OUTCOMES}
        self.ready = Gauge(
            "shadowproxy_production_ready", "1 while production accepts connections.", registry=r
        )

    @staticmethod
    def status_class(status: int) -> str:
        return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]



class ShadowCollector(Collector):
    """Figures derived from the comparison stats, computed at scrape time (nothing on the hot path).

    Disagreement rate with its Wilson interval, the promotion verdict, and the summary figures of
    compared predictions (Jensen–Shannon divergence, cosine and text similarity, absolute numeric
    differences) as percentiles under a fixed, small label set.
    """

    FIGURES = ("abs_diff", "jsd", "cosine", "similarity")
    PERCENTILE_NAMES = ("p50", "p90", "p99")

    def __init__(self, stats: ShadowStats, gates: GatesLike) -> None:
        self.stats = stats
        self.gates = gates

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        snapshot = self.stats.snapshot()
        comparisons = snapshot["comparisons"]
        rate = GaugeMetricFamily(
            "shadowproxy_disagreement_rate", "Share of compared predictions that disagree (0 when none compared)."
        )
        rate.add_metric([], comparisons["disagreement_rate"])
        yield rate
        bounds = GaugeMetricFamily(
            "shadowproxy_disagreement_rate_ci95",
            "Wilson 95% interval of the disagreement rate; the verdict judges the upper bound.",
            labels=["bound"],
        )
        lower, upper = comparisons["disagreement_rate_ci95"]
        bounds.add_metric(["lower"], lower)
        bounds.add_metric(["upper"], upper)
        yield bounds
        verdict = evaluate(snapshot, self.gates)["verdict"]
        family = GaugeMetricFamily(
            "shadowproxy_promotion_verdict", "1 for the current promotion verdict, 0 for the others.",
            labels=["verdict"],
        )
        for name in ("pass", "fail", "insufficient_data"):
            family.add_metric([name], 1.0 if verdict == name else 0.0)
        yield family
        differences = snapshot.get("differences", {})
        figures = GaugeMetricFamily(
            "shadowproxy_prediction_difference",
            "Percentiles of per-prediction figures: abs_diff (numeric/vector), jsd (distribution), "
            "cosine (vector), similarity (text).",
            labels=["figure", "percentile"],
        )
        for figure in self.FIGURES:
            summary = differences.get(figure, {})
            for percentile in self.PERCENTILE_NAMES:
                figures.add_metric([figure, percentile], float(summary.get(percentile, 0.0)))
        yield figures
