"""Every Prometheus metric, declared once, in a registry owned by one proxy instance.

Label sets are small and fixed and pre-initialised, so every series exists at zero from the first
scrape (Prometheus' own advice) and the hot path uses ready label children, never `.labels()`.
What the hot path updates per request is a plain number read at scrape time (hotmetrics.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shadowproxy.judging.judge import ERROR_KINDS, RESULTS
from shadowproxy.shadow.hotmetrics import PlainCounter, PlainCounters, PlainGauges, PlainHistogram

if TYPE_CHECKING:
    pass

# Model latencies run from about a millisecond (a small tree model) to minutes (a long LLM
# answer, up to candidate.stream_timeout_s's default).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Time to first token: tens of milliseconds (a small model, a cached prefix) to tens of seconds
# (a long prompt queued behind others).
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# Gaps between streamed events: a few milliseconds per token on a fast GPU, seconds when stalled.
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "other")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
TARGETS = ("production", "candidate")  # with the old [candidate] table; else production and each name
MIRROR_RESULTS = ("sent", "dropped", "skipped", "error")
OUTCOMES = ("agree", "disagree", "candidate_error", "unparseable", "too_large")
# "accept": a connection the kernel queued that could not be accepted (out of file descriptors);
# "max_connections": a new connection closed at once, listen.max_connections being open
CLIENT_ERRORS = ("bad_request", "header_too_large", "body_too_large", "header_timeout", "accept", "max_connections")
UPSTREAM_FAILURES = ("connect", "timeout", "reset", "malformed")
# "path": preset openai, and not a chat, completions or embeddings path
SKIP_REASONS = ("method", "body_too_large", "path")
DROP_REASONS = ("in_flight_full", "backoff", "client_gone")


class Metrics:
    """`candidates`: the candidates' names, the `target` label values beside "production".
    `secondary`: a [secondary] runs, and the upstream and mirror families also carry
    target="secondary" (it compares nothing of its own, so not the comparison and LLM ones)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        candidates: tuple[str, ...] = ("candidate",),
        secondary: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.candidates = candidates
        self.targets = targets = ("production", *candidates)
        mirrored = (*candidates, "secondary") if secondary else candidates
        upstreams = ("production", *mirrored)
        # Updated per request or per mirrored request: plain numbers, read at scrape time.
        self.requests = PlainCounter(
            "shadowproxy_requests_total",
            "Client-facing answers by status class (our own 4xx/5xx included).",
            "status_class", STATUS_CLASSES, r,
        )
        self.requests_by_class = self.requests.children
        self.upstream_duration = PlainHistogram(
            "shadowproxy_upstream_request_duration_seconds",
            "Upstream exchange time, first byte sent to last byte of the answer.",
            "target", upstreams, LATENCY_BUCKETS, r,
        )
        self.duration_by_target = self.upstream_duration.children
        self.upstream_failures = Counter(
            "shadowproxy_upstream_failures_total",
            "Upstream exchanges that produced no complete answer, by target and kind.",
            ["target", "kind"],
            registry=r,
        )
        for t in upstreams:
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
        # Candidate-side families carry `target`: the candidate's name.
        self.mirror_requests = PlainCounters(
            "shadowproxy_mirror_requests_total",
            "Sampled requests by candidate and what became of their shadow copy.",
            ("target", "result"), [(c, x) for c in mirrored for x in MIRROR_RESULTS], r,
        )
        self.mirror_skipped = PlainCounters(
            "shadowproxy_mirror_skipped_total",
            "Sampled requests not mirrored because they were not eligible, by candidate and reason.",
            ("target", "reason"), [(c, x) for c in mirrored for x in SKIP_REASONS], r,
        )
        self.mirror_dropped = PlainCounters(
            "shadowproxy_mirror_dropped_total",
            "Sampled requests not mirrored for lack of capacity or a backed-off candidate, by candidate and reason.",
            ("target", "reason"), [(c, x) for c in mirrored for x in DROP_REASONS], r,
        )
        self.mirror_in_flight = PlainGauges(
            "shadowproxy_mirror_in_flight", "Shadow requests outstanding, by candidate.", "target", mirrored, r
        )
        self.mirror_sample_rate = PlainGauges(
            "shadowproxy_mirror_sample_rate", "The share of requests currently mirrored, by candidate.",
            "target", mirrored, r,
        )
        self.comparisons = PlainCounters(
            "shadowproxy_comparisons_total",
            "Compared predictions by candidate and outcome (candidate_error and unparseable count requests).",
            ("target", "outcome"), [(c, x) for c in candidates for x in OUTCOMES], r,
        )
        # LLM answers (compare.preset "openai"): production's over every answer, the candidate's
        # over its mirrored ones; updated per streamed event, so plain numbers too.
        self.time_to_first_token = PlainHistogram(
            "shadowproxy_time_to_first_token_seconds",
            "Streamed LLM answers: request sent upstream to the first event carrying output.",
            "target", targets, TTFT_BUCKETS, r,
        )
        self.ttft_by_target = self.time_to_first_token.children
        self.inter_token_latency = PlainHistogram(
            "shadowproxy_inter_token_latency_seconds",
            "Streamed LLM answers: the gap before each event carrying output after the first.",
            "target", targets, INTER_TOKEN_BUCKETS, r,
        )
        self.inter_token_by_target = self.inter_token_latency.children
        self.output_tokens = PlainCounter(
            "shadowproxy_output_tokens_total",
            "LLM output tokens: the answer's usage.completion_tokens, else an estimate.",
            "target", targets, r,
        )
        self.output_tokens_by_target = self.output_tokens.children
        self.llm_cost = PlainCounter(
            "shadowproxy_llm_cost_usd_total",
            "Cost of LLM answers in US dollars at the target's configured price (0 without one).",
            "target", targets, r,
        )
        self.llm_cost_by_target = self.llm_cost.children
        self.llm_finish_reasons = Counter(
            "shadowproxy_llm_finish_reasons_total",
            "Choices of LLM answers by why generation ended (normalised).",
            ["target", "reason"],
            registry=r,
        )
        self.finish_reasons_by_target = {
            t: {reason: self.llm_finish_reasons.labels(t, reason) for reason in FINISH_REASONS} for t in targets
        }
        self.ready = Gauge(
            "shadowproxy_production_ready", "1 while production accepts connections.", registry=r
        )
        # Drift figures come from the drift monitor at scrape time; without [drift] only the
        # per-status feature counts exist, at zero.
        self.drift = DriftCollector()
        r.register(self.drift)

    @staticmethod
    def status_class(status: int) -> str:
        return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]



class DriftSource(Protocol):
    def snapshot(self) -> dict[str, Any] | None: ...


class DriftCollector(Collector):
    """Drift figures from the drift monitor's `/shadow/drift` document, at scrape time.

    Label values are feature names fixed by the baseline profile (or the first warm-up instances),
    at most `drift.max_features`: request content cannot grow the label set.
    """

    STATUSES = ("ok", "warn", "alert")
    PROBLEMS = ("missing", "invalid")
    FAMILIES = frozenset((
        "shadowproxy_drift_features", "shadowproxy_drift_window_instances", "shadowproxy_feature_drift_psi",
        "shadowproxy_feature_drift_ks", "shadowproxy_drift_values", "shadowproxy_prediction_drift_psi",
        "shadowproxy_drift_dropped", "shadowproxy_drift_unparseable",
    ))

    def __init__(self) -> None:
        self.source: DriftSource | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        doc = self.source.snapshot() if self.source is not None else None
        features: dict[str, dict[str, object]] = doc["features"] if doc else {}
        by_status = GaugeMetricFamily(
            "shadowproxy_drift_features",
            "Watched features by drift status (warn at PSI >= 0.1, alert at >= 0.25).",
            labels=["status"],
        )
        for name in self.STATUSES:
            by_status.add_metric([name], float(sum(1 for f in features.values() if f["status"] == name)))
        yield by_status
        window = GaugeMetricFamily("shadowproxy_drift_window_instances", "Instances in the live drift window.")
        window.add_metric([], float(doc["window"]) if doc else 0.0)
        yield window
        if doc is None:
            return
        psi = GaugeMetricFamily(
            "shadowproxy_feature_drift_psi",
            "Population Stability Index of each feature's live window against the baseline.",
            labels=["feature"],
        )
        ks = GaugeMetricFamily(
            "shadowproxy_feature_drift_ks",
            "Kolmogorov-Smirnov statistic of each numeric feature's live window against the baseline bins.",
            labels=["feature"],
        )
        problems = CounterMetricFamily(
            "shadowproxy_drift_values",
            "Watched feature values that were missing (absent or null) or invalid (wrong type).",
            labels=["feature", "problem"],
        )
        for name, figures in features.items():
            if isinstance(figures["psi"], float):
                psi.add_metric([name], figures["psi"])
            if isinstance(figures["ks"], float):
                ks.add_metric([name], figures["ks"])
            for problem in self.PROBLEMS:
                problems.add_metric([name, problem], float(figures[problem]))  # type: ignore[arg-type]
        yield psi
        yield ks
        yield problems
        prediction = GaugeMetricFamily(
            "shadowproxy_prediction_drift_psi",
            "Population Stability Index of production predictions in the live window against the baseline.",
        )
        predictions = doc["predictions"]
        if predictions is not None and isinstance(predictions["psi"], float):
            prediction.add_metric([], predictions["psi"])
        yield prediction
        dropped = CounterMetricFamily(
            "shadowproxy_drift_dropped", "Sampled requests not watched because the drift queue was full."
        )
        dropped.add_metric([], float(doc["dropped"]))
        yield dropped
        unparseable = CounterMetricFamily(
            "shadowproxy_drift_unparseable", "Watched requests whose instances could not be read."
        )
        unparseable.add_metric([], float(doc["unparseable"]))
        yield unparseable


VERSION_LABELS_MAX = 20  # distinct model versions per target before the rest count as "other"
STORE_ERROR_OPS = ("open", "write", "read", "prune")


class StoreMetrics:
    """The audit store's metrics, registered only when `[store] path` is set.

    `count_version` runs on the store's writer thread (prometheus_client's values are thread-safe);
    the cap keeps a model that stamps every answer with a new version from growing the label set.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.dropped = Counter(
            "shadowproxy_store_dropped_total",
            "Records not stored because the store's queue was full (the disk fell behind).",
            registry=r,
        )
        self.lost = Counter(
            "shadowproxy_store_lost_total",
            "Records not stored because the database could not be opened or written.",
            registry=r,
        )
        self.written = Counter(
            "shadowproxy_store_written_total", "Records (exchanges and pairs) written to the store.", registry=r
        )
        self.errors = Counter(
            "shadowproxy_store_errors_total",
            "Store operations that failed (a read-only path, a full disk...), by operation.",
            ["op"],
            registry=r,
        )
        self.errors_by_op = {op: self.errors.labels(op) for op in STORE_ERROR_OPS}
        self.queue = Gauge("shadowproxy_store_queue_records", "Records waiting for the store's writer.", registry=r)
        self.version_requests = Counter(
            "shadowproxy_model_version_requests_total",
            f"Answers by target and model version (at most {VERSION_LABELS_MAX} versions per target, "
            'then "other"; "unknown" when the answer names none).',
            ["target", "version"],
            registry=r,
        )
        self._versions: dict[tuple[str, str], Counter] = {}
        self._distinct: dict[str, int] = {}

    def count_version(self, target: str, version: str | None, n: int = 1) -> None:
        key = (target, version if version is not None else "unknown")
        child = self._versions.get(key)
        if child is None:
            if version is not None and self._distinct.get(target, 0) >= VERSION_LABELS_MAX:
                # Not remembered under its own name: a flood of versions must not grow this dict.
                self.version_requests.labels(target, "other").inc(n)
                return
            if version is not None:
                self._distinct[target] = self._distinct.get(target, 0) + 1
            child = self._versions[key] = self.version_requests.labels(*key)
        child.inc(n)


class RecordMetrics:
    """The recorder's metrics (`[record]`), registered only when its path is set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.dropped = Counter(
            "shadowproxy_record_dropped_total",
            "Requests not recorded because the recorder's queue was full (the disk fell behind).",
            registry=r,
        )
        self.written = Counter(
            "shadowproxy_record_written_total", "Records (exchanges and pairs) written to recording files.",
            registry=r,
        )
        self.lost = Counter(
            "shadowproxy_record_lost_total",
            "Records not written because a recording file could not be opened or written.",
            registry=r,
        )


# "queue_full": the judge's bounded queue was full; "shutdown": still queued or being judged at stop
JUDGE_DROP_REASONS = ("queue_full", "shutdown")


class JudgeMetrics:
    """The LLM judge's metrics, registered only with a `[judge]` table. Updated once per judged
    pair, off the hot path, so plain prometheus-client children."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sampled = Counter(
            "shadowproxy_judge_sampled_total", "Compared pairs drawn for the LLM judge ([judge] sample_rate).",
            registry=r,
        )
        results = Counter(
            "shadowproxy_judge_results_total",
            "LLM judge judgements of the candidate against production, by result.",
            ["result"],
            registry=r,
        )
        self.results = {result: results.labels(result) for result in RESULTS}
        errors = Counter(
            "shadowproxy_judge_errors_total",
            "LLM judge calls that gave no judgement, by kind (never counted as a tie).",
            ["kind"],
            registry=r,
        )
        self.errors = {kind: errors.labels(kind) for kind in ERROR_KINDS}
        dropped = Counter(
            "shadowproxy_judge_dropped_total",
            "Pairs drawn for the LLM judge but never judged: its queue was full, or the proxy stopped.",
            ["reason"],
            registry=r,
        )
        self.dropped = {reason: dropped.labels(reason) for reason in JUDGE_DROP_REASONS}
        self.duration = Histogram(
            "shadowproxy_judge_duration_seconds",
            "LLM judge calls, from the request sent to the answer read (errors included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
