"""Collectors that build metric families at scrape time from a stats snapshot or a drift document.

The per-request metrics are declared in `shadowproxy.shadow.metrics`; these read aggregate state
(the judged stats, the verdict, drift) when Prometheus scrapes, for one proxy or the supervisor of
several workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shadowproxy.judging.verdict import GatesLike, evaluate_all

if TYPE_CHECKING:
    from shadowproxy.judging.stats import ShadowStats


class ShadowCollector(Collector):
    """Figures derived from the comparison stats, computed at scrape time (nothing on the hot path).

    Disagreement rate with its Wilson interval, the promotion verdict, and the summary figures of
    compared predictions (Jensen–Shannon divergence, cosine and text similarity, absolute numeric
    differences) as percentiles under a fixed, small label set.
    """

    FIGURES = ("abs_diff", "jsd", "cosine", "similarity")
    PERCENTILE_NAMES = ("p50", "p90", "p99")

    def __init__(
        self, stats: ShadowStats, gates: GatesLike, blocks: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self.stats = stats
        self.gates = gates
        # The components' blocks (ground truth): the verdict here must be the one /shadow/verdict gives.
        self.blocks = blocks

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        snapshot = self.stats.snapshot()
        if self.blocks is not None:
            snapshot.update(self.blocks())
        judged = evaluate_all(snapshot, self.gates)
        docs: dict[str, Any] = snapshot.get("candidates") or {self.stats.name: snapshot}
        verdicts = {name: v["verdict"] for name, v in judged.get("candidates", {}).items()}
        verdicts = verdicts or {self.stats.name: judged["verdict"]}
        rate = GaugeMetricFamily(
            "shadowproxy_disagreement_rate",
            "Share of compared predictions that disagree (0 when none compared), by candidate.",
            labels=["target"],
        )
        bounds = GaugeMetricFamily(
            "shadowproxy_disagreement_rate_ci95",
            "Wilson 95% interval of the disagreement rate, on which the verdict decides, by candidate.",
            labels=["target", "bound"],
        )
        family = GaugeMetricFamily(
            "shadowproxy_promotion_verdict", "1 for a candidate's current promotion verdict, 0 for the others.",
            labels=["target", "verdict"],
        )
        figures = GaugeMetricFamily(
            "shadowproxy_prediction_difference",
            "Percentiles of per-prediction figures: abs_diff (numeric/vector), jsd (distribution), "
            "cosine (vector), similarity (text), by candidate.",
            labels=["target", "figure", "percentile"],
        )
        for target, doc in docs.items():
            comparisons = doc["comparisons"]
            rate.add_metric([target], comparisons["disagreement_rate"])
            lower, upper = comparisons["disagreement_rate_ci95"]
            bounds.add_metric([target, "lower"], lower)
            bounds.add_metric([target, "upper"], upper)
            for name in ("pass", "fail", "insufficient_data"):
                family.add_metric([target, name], 1.0 if verdicts.get(target) == name else 0.0)
            differences = doc.get("differences", {})
            for figure in self.FIGURES:
                summary = differences.get(figure, {})
                for percentile in self.PERCENTILE_NAMES:
                    figures.add_metric([target, figure, percentile], float(summary.get(percentile, 0.0)))
        yield rate
        yield bounds
        yield family
        yield figures
        yield from self._noise(docs)
        yield from self._slices(snapshot.get("slices"))

    @staticmethod
    def _noise(docs: dict[str, Any]) -> Iterable[Metric]:
        """[secondary]: each candidate's noise and net disagreement rates, net's interval."""
        if not any("net" in doc["comparisons"] for doc in docs.values()):
            return
        noise = GaugeMetricFamily(
            "shadowproxy_noise_rate",
            "[secondary]: share of predictions on which the secondary differs from production, over the "
            "predictions production, the secondary and the candidate all answered, by candidate.",
            labels=["target"],
        )
        net = GaugeMetricFamily(
            "shadowproxy_net_disagreement_rate",
            "[secondary]: the candidate's disagreement rate less the noise rate, over the same predictions, "
            "by candidate; the disagreement gate decides on it.",
            labels=["target"],
        )
        bounds = GaugeMetricFamily(
            "shadowproxy_net_disagreement_rate_ci95",
            "[secondary]: the paired Newcombe 95% interval of the net disagreement rate, by candidate.",
            labels=["target", "bound"],
        )
        for target, doc in docs.items():
            comparisons = doc["comparisons"]
            if "net" not in comparisons:
                continue
            noise.add_metric([target], comparisons["noise"]["rate"])
            net.add_metric([target], comparisons["net"]["rate"])
            lower, upper = comparisons["net"]["ci95"]
            bounds.add_metric([target, "lower"], lower)
            bounds.add_metric([target, "upper"], upper)
        yield noise
        yield net
        yield bounds

    @staticmethod
    def _slices(slices: dict[str, Any] | None) -> Iterable[Metric]:
        """[[slices]]: requests per slice and upstream, compared outcomes per slice and candidate."""
        if not slices:
            return
        requests = CounterMetricFamily(
            "shadowproxy_slice_requests",
            "Requests by slice ([[slices]]) and upstream: production's answered, a candidate's copies sent.",
            labels=["target", "slice"],
        )
        comparisons = CounterMetricFamily(
            "shadowproxy_slice_comparisons",
            "Compared predictions by slice, candidate and outcome (candidate_error, unparseable and "
            "too_large count requests).",
            labels=["target", "slice", "outcome"],
        )
        for slice_name, targets in slices.items():
            for target, doc in targets.items():
                requests.add_metric([target, slice_name], float(doc["requests"]))
                if target == "production":
                    continue
                counts = doc["comparisons"]
                for outcome in ("agree", "disagree", "candidate_error", "unparseable", "too_large"):
                    comparisons.add_metric([target, slice_name, outcome], float(counts[outcome]))
        yield requests
        yield comparisons
