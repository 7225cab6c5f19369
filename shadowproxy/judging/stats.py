"""Mergeable statistics: log-bucket histograms, Wilson intervals and the ``ShadowStats`` aggregator.

Histograms follow DDSketch (Masson et al., VLDB 2019): a value ``v > 0`` goes to bucket
``ceil(log(v) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)``, and a bucket reports
``2 * gamma**i / (gamma + 1)``, which is within relative error ``a`` (1%) of every value in it.
Counts live in a fixed-length list of ints (from compiled code, an increment of a list item is
much cheaper than one of a numpy array's item, and `record` runs for every request), so memory is
bounded and merging two histograms (other workers, other replicas) is adding them bucket by
bucket; the merged quantiles are exactly those of one histogram that saw all the values. The
reads (quantiles, state) go through numpy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np

from shadowproxy.judging.compare import Comparison
from shadowproxy.judging.fields import FieldTable
from shadowproxy.judging.intervals import (
    newcombe_interval,
    paired_newcombe_interval,
    quantile_rank_bounds,
    wilson_interval,
)
from shadowproxy.judging.judgestats import JudgeStats

__all__ = [
    "LogHistogram",
    "ShadowStats",
    "SignedHistogram",
    "Summary",
    "wilson_interval",
]

RELATIVE_ACCURACY = 0.01
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.5),
    ("p90", 0.9),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p999", 0.999),
)
MIRROR_RESULTS: tuple[str, ...] = ("sampled", "sent", "dropped", "skipped", "error")
# Why a sampled copy never reached a comparison: the labels of shadowproxy_mirror_skipped_total,
# shadowproxy_mirror_dropped_total and (target="candidate") shadowproxy_upstream_failures_total,
# in the same order (shadow/metrics.py declares those; a unit test keeps the two in step).
# "path": preset openai, and not a chat, completions or embeddings path.
MIRROR_SKIP_REASONS: tuple[str, ...] = ("method", "body_too_large", "path")
MIRROR_DROP_REASONS: tuple[str, ...] = ("in_flight_full", "backoff", "client_gone")
MIRROR_ERROR_KINDS: tuple[str, ...] = ("connect", "timeout", "reset", "malformed")
# The by-reason dicts of the mirror block, and the result each one splits.
MIRROR_REASONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("skipped_by_reason", "skipped", MIRROR_SKIP_REASONS),
    ("dropped_by_reason", "dropped", MIRROR_DROP_REASONS),
    ("errors_by_kind", "error", MIRROR_ERROR_KINDS),
)
OUTCOMES: tuple[str, ...] = ("candidate_error", "unparseable", "too_large")
# Each target's p99 bounds hold with 97.5%, so both hold together, and with them the interval of
# the ratio of the two p99s the latency gate decides on, with at least 95% (Bonferroni).
QUANTILE_CONFIDENCE = 0.975
# Relative widening of a bucket's edges: well above the rounding of math.log (about 1e-15 in the
# bucket index), far below anything a latency resolves.
EDGE_SLACK = 1e-12
CONFUSION_MAX_PAIRS = 1000
CONFUSION_TOP_LABELS = 10
OTHER = "other"
STATE_VERSION = 1
# The cell of the paired noise table for (candidate agrees, secondary agrees): both differ from
# production, the candidate only, the secondary only, neither.
_NOISE_CELL: Final = ((0, 1), (2, 3))


def _rank(q: float, n: int) -> int:
    """1-based rank of the q-quantile: ceil(q * n), at least 1 (numpy's ``inverted_cdf``)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    return max(1, math.ceil(q * n))


# record_many's crossover: below this many values (a list), one compiled record() each is cheaper
# than the numpy path, whose fixed cost per call outweighs its per-value saving on short lists.
RECORD_MANY_VECTORISE_MIN: Final = 512


class LogHistogram:
    """Histogram of non-negative values with relative error <= 1% on quantiles.

    Values in ``(0, min_value)`` count in the first bucket, values above ``max_value`` (and
    ``inf``) in the last; zero and negative values count in a separate zero bucket reported as 0;
    NaN is ignored. The defaults cover latencies from 1 µs to 1000 s in about 1040 buckets.

    >>> h = LogHistogram()
    >>> h.record(0.010); h.record(0.020)
    >>> round(h.quantile(0.5), 4)
    0.01
    """

    __slots__ = (
        "_counts",
        "_inv_log_gamma",
        "_offset",
        "count",
        "gamma",
        "max_value",
        "min_value",
        "sum",
        "zero",
    )

    def __init__(
        self, min_value: float = 1e-6, max_value: float = 1e3, relative_accuracy: float = RELATIVE_ACCURACY
    ) -> None:
        if not 0 < min_value < max_value or not 0 < relative_accuracy < 1:
            raise ValueError("need 0 < min_value < max_value and 0 < relative_accuracy < 1")
        self.min_value = min_value
        self.max_value = max_value
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self._offset = math.ceil(math.log(min_value) * self._inv_log_gamma)
        top = math.ceil(math.log(max_value) * self._inv_log_gamma)
        self._counts: list[int] = [0] * (top - self._offset + 1)
        self.zero = 0
        self.count = 0
        self.sum = 0.0

    def _same_layout(self, other: LogHistogram) -> bool:
        return (
            self.gamma == other.gamma
            and self._offset == other._offset
            and len(self._counts) == len(other._counts)
        )

    def record(self, v: float) -> None:
        # Hot path (once per request, a few times per mirrored one): one math.log and one list
        # increment (a list, not a numpy array, whose item increment costs several times more).
        if v > 0:
            if v >= self.max_value:
                self._counts[-1] += 1
                self.sum += v if v < math.inf else self.max_value
            else:
                i = math.ceil(math.log(v) * self._inv_log_gamma) - self._offset if v > self.min_value else 0
                self._counts[i if i > 0 else 0] += 1
                self.sum += v
        elif v <= 0:
            self.zero += 1
        else:
            return  # NaN
        self.count += 1

    def record_many(self, values: Iterable[float] | np.ndarray[Any, Any]) -> None:
        """Record many values at once, bucketed as ``record`` would. A short list goes value by
        value: the vectorised path has a fixed cost per call whatever the size, and the comparison
        of a mirrored request brings one value per instance."""
        if not isinstance(values, np.ndarray):
            values = values if isinstance(values, list) else list(values)
            if len(values) < RECORD_MANY_VECTORISE_MIN:
                for v in values:
                    self.record(float(v))
                return
        arr = np.asarray(values, dtype=np.float64).ravel()
        arr = arr[~np.isnan(arr)]
        positive = arr[arr > 0]
        last = len(self._counts) - 1
        clamped = np.clip(positive, self.min_value, self.max_value)
        idx = np.ceil(np.log(clamped) * self._inv_log_gamma).astype(np.int64) - self._offset
        idx = np.where(positive >= self.max_value, last, np.where(positive <= self.min_value, 0, idx))
        idx = np.clip(idx, 0, last)
        if idx.size:
            low = int(idx.min())
            self._add_counts(low, np.bincount(idx - low).tolist())  # only the stretch the values span
        self.zero += int(arr.size - positive.size)
        self.sum += float(np.where(np.isinf(positive), self.max_value, positive).sum())
        self.count += int(arr.size)

    def merge(self, other: LogHistogram) -> None:
        if not self._same_layout(other):
            raise ValueError("cannot merge histograms with different bucket layouts")
        self._add_counts(0, other._counts)
        self.zero += other.zero
        self.count += other.count
        self.sum += other.sum

    def _add_counts(self, first: int, counts: list[int]) -> None:
        """Add counts[k] to bucket first + k."""
        mine = self._counts
        for k, n in enumerate(counts):
            if n:
                mine[first + k] += n

    def bucket_value(self, index: int) -> float:
        """The value reported for bucket ``index`` (relative to the first bucket)."""
        return 2 * self.gamma ** (index + self._offset) / (self.gamma + 1)

    def value_at_rank(self, rank: int, cumulative: np.ndarray[Any, Any] | None = None) -> float:
        """The value of the ``rank``-th smallest recorded value (1-based), within 1%. A caller
        reading several ranks passes ``cumulative_counts()`` once."""
        if self.count == 0:
            return 0.0
        rank = min(max(rank, 1), self.count)
        if rank <= self.zero:
            return 0.0
        if cumulative is None:
            cumulative = self.cumulative_counts()
        index = int(np.searchsorted(cumulative, rank - self.zero, side="left"))
        return self.bucket_value(index)

    def cumulative_counts(self) -> np.ndarray[Any, Any]:
        return np.cumsum(np.array(self._counts, dtype=np.int64))

    def bucket_edges(self, index: int) -> tuple[float, float]:
        """The range of values bucket ``index`` can hold: ``(gamma**(i-1), gamma**i]``, the first
        bucket reaching down to 0 (it also holds the values below ``min_value``) and the last up to
        infinity. Widened by ``EDGE_SLACK`` so that a value the rounding of ``log`` put one
        bucket off still lies within."""
        i = index + self._offset
        lower = 0.0 if index <= 0 else self.gamma ** (i - 1) * (1.0 - EDGE_SLACK)
        upper = math.inf if index >= len(self._counts) - 1 else self.gamma**i * (1.0 + EDGE_SLACK)
        return (lower, upper)

    def quantile_bounds(self, q: float, confidence: float = QUANTILE_CONFIDENCE) -> tuple[float, float | None]:
        """Distribution-free confidence bounds for the ``q``-quantile of the distribution the values
        came from: the order statistics of ``intervals.quantile_rank_bounds``, read outward (the
        lower edge of the bucket holding rank ``l``, the upper edge of the one holding rank
        ``u``), so the bucketing widens the interval and never moves it. The lower bound is 0 and
        the upper None (unbounded) while there are too few values for that side."""
        lower_rank, upper_rank = quantile_rank_bounds(self.count, q, confidence)
        cumulative = self.cumulative_counts()
        lower = 0.0
        if lower_rank is not None and lower_rank > self.zero:
            index = int(np.searchsorted(cumulative, lower_rank - self.zero, side="left"))
            lower = self.bucket_edges(index)[0]
        upper: float | None = None
        if upper_rank is not None:
            upper = 0.0
            if upper_rank > self.zero:
                index = int(np.searchsorted(cumulative, upper_rank - self.zero, side="left"))
                edge = self.bucket_edges(index)[1]
                upper = edge if edge < math.inf else None
        return (lower, upper)

    def p99_ci_ms(self) -> list[float | None]:
        """``[lower, upper]`` of the p99 in milliseconds (``quantile_bounds`` at 97.5%), rounded
        outward to the 6 decimals of ``percentiles_ms``; upper None while unbounded."""
        lower, upper = self.quantile_bounds(0.99)
        return [
            math.floor(lower * 1e9) / 1e6,
            None if upper is None else math.ceil(upper * 1e9) / 1e6,
        ]

    def quantile(self, q: float) -> float:
        """The value at rank ``ceil(q * count)`` (like ``numpy.quantile(method="inverted_cdf")``),
        within 1% relative error; 0.0 when empty."""
        return self.value_at_rank(_rank(q, self.count))

    def percentiles_ms(self) -> dict[str, float]:
        cumulative = self.cumulative_counts()
        return {name: round(self.value_at_rank(_rank(q, self.count), cumulative) * 1000, 6) for name, q in PERCENTILES}

    def to_state(self) -> dict[str, Any]:
        """Compact JSON-friendly state: the non-zero stretch of buckets and where it starts."""
        nonzero = np.flatnonzero(np.array(self._counts, dtype=np.int64))
        first = int(nonzero[0]) if nonzero.size else 0
        last = int(nonzero[-1]) + 1 if nonzero.size else 0
        return {
            "gamma": self.gamma,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "offset": first + self._offset,
            "counts": self._counts[first:last],
            "zero": self.zero,
            "count": self.count,
            "sum": self.sum,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LogHistogram:
        h = cls(float(state["min_value"]), float(state["max_value"]))
        if not math.isclose(float(state["gamma"]), h.gamma, rel_tol=1e-12):
            raise ValueError(f"histogram state has gamma {state['gamma']}, expected {h.gamma}")
        counts = [int(c) for c in state["counts"]]
        start = int(state["offset"]) - h._offset
        if counts and (start < 0 or start + len(counts) > len(h._counts)):
            raise ValueError("histogram state buckets fall outside the layout")
        if any(c < 0 for c in counts):
            raise ValueError("histogram state has negative counts")
        h._counts[start : start + len(counts)] = counts
        h.zero = int(state["zero"])
        h.count = int(state["count"])
        h.sum = float(state["sum"])
        if h.count != h.zero + sum(h._counts):
            raise ValueError("histogram state count does not match its buckets")
        return h


class SignedHistogram:
    """Histogram of values of either sign (e.g. candidate minus production latency): negative
    magnitudes and positive values in two ``LogHistogram``s, exact zeros counted apart."""

    __slots__ = ("neg", "pos", "zero")

    def __init__(self, min_value: float = 1e-6, max_value: float = 1e3) -> None:
        self.neg = LogHistogram(min_value, max_value)
        self.pos = LogHistogram(min_value, max_value)
        self.zero = 0

    @property
    def count(self) -> int:
        return self.neg.count + self.zero + self.pos.count

    @property
    def sum(self) -> float:
        return self.pos.sum - self.neg.sum

    def record(self, v: float) -> None:
        if v > 0:
            self.pos.record(v)
        elif v < 0:
            self.neg.record(-v)
        elif v == 0:
            self.zero += 1

    def merge(self, other: SignedHistogram) -> None:
        self.neg.merge(other.neg)
        self.pos.merge(other.pos)
        self.zero += other.zero

    def quantile(self, q: float) -> float:
        """Value at rank ``ceil(q * count)`` within 1% relative error; 0.0 when empty."""
        n = self.count
        if n == 0:
            return 0.0
        rank = _rank(q, n)
        if rank <= self.neg.count:
            # The rank-th smallest signed value is the (count - rank + 1)-th largest magnitude.
            return -self.neg.value_at_rank(self.neg.count - rank + 1)
        rank -= self.neg.count
        if rank <= self.zero:
            return 0.0
        return self.pos.value_at_rank(rank - self.zero)

    def percentiles_ms(self) -> dict[str, float]:
        return {name: round(self.quantile(q) * 1000, 6) for name, q in PERCENTILES}

    def to_state(self) -> dict[str, Any]:
        return {"neg": self.neg.to_state(), "pos": self.pos.to_state(), "zero": self.zero}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SignedHistogram:
        h = cls()
        h.neg = LogHistogram.from_state(state["neg"])
        h.pos = LogHistogram.from_state(state["pos"])
        h.zero = int(state["zero"])
        return h


class Summary:
    """Count, mean and quantiles of a figure such as Jensen–Shannon divergence or cosine."""

    __slots__ = ("hist",)

    def __init__(self) -> None:
        self.hist = SignedHistogram(1e-12, 1e12)

    def record_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.hist.record(v)

    def merge(self, other: Summary) -> None:
        self.hist.merge(other.hist)

    def snapshot(self) -> dict[str, float | int]:
        n = self.hist.count
        out: dict[str, float | int] = {"count": n, "mean": self.hist.sum / n if n else 0.0}
        for name, q in PERCENTILES:
            out[name] = self.hist.quantile(q)
        return out

    def to_state(self) -> dict[str, Any]:
        return self.hist.to_state()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Summary:
        s = cls()
        s.hist = SignedHistogram.from_state(state)
        return s


def _latency_ms(h: LogHistogram) -> dict[str, Any]:
    """A latency block of ``/shadow/stats``: the percentiles, and ``p99_ci`` beside them."""
    out: dict[str, Any] = dict(h.percentiles_ms())
    out["p99_ci"] = h.p99_ci_ms()
    return out


class _Target:
    __slots__ = ("errors", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = LogHistogram()

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latency_ms": _latency_ms(self.latency)}

    def to_state(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latency": self.latency.to_state()}

    def merge_state(self, state: Mapping[str, Any]) -> None:
        self.requests += int(state["requests"])
        self.errors += int(state["errors"])
        self.latency.merge(LogHistogram.from_state(state["latency"]))


class ShadowStats:
    """Everything the proxy and the mirror report, in one place; ``snapshot()`` is ``/shadow/stats``.

    Not thread-safe: one per event loop (worker); workers and replicas merge with ``from_states``.

    With several candidates, this object holds the first one's figures (and production's), and
    ``others`` one ``ShadowStats`` per further candidate, whose production block stays unused:
    the snapshot's top level describes the first candidate, and ``"candidates"`` each of them.
    """

    def __init__(self, names: Iterable[str] = ("candidate",), slices: Iterable[str] = ()) -> None:
        names = tuple(names)
        self.name = names[0] if names else "candidate"
        self.others: dict[str, ShadowStats] = {name: ShadowStats((name,), slices) for name in names[1:]}
        # [[slices]]: the slices' names ("other" last), production's and this candidate's figures
        # in each (index = the slice's position); empty without [[slices]].
        from shadowproxy.judging.slicestats import SliceCandidate, SliceTarget

        self.slice_names: tuple[str, ...] = tuple(slices)
        self.slice_production = [SliceTarget() for _ in self.slice_names]
        self.slice_candidate = [SliceCandidate() for _ in self.slice_names]
        self.production = _Target()
        self.candidate = _Target()
        self.mirror: dict[str, int] = dict.fromkeys(MIRROR_RESULTS, 0)
        self.mirror_in_flight = 0
        # skipped / dropped / error split by reason, every known reason present from zero.
        self.mirror_reasons: dict[str, dict[str, int]] = {
            block: dict.fromkeys(reasons, 0) for block, _, reasons in MIRROR_REASONS
        }
        self.agree = 0
        self.disagree = 0
        self.tool_calls_compared = 0  # openai pairs where either side called a tool
        self.tool_calls_agree = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.mirrored_production = LogHistogram()
        self.mirrored_candidate = LogHistogram()
        self.latency_diff = SignedHistogram()
        self.production_errors_on_mirrored = 0
        self.confusion: Counter[tuple[str, str]] = Counter()
        self._confusion_labels: set[str] = set()
        self.abs_diff = LogHistogram(1e-12, 1e12)
        self.summaries: dict[str, Summary] = {name: Summary() for name in ("jsd", "cosine", "similarity")}
        # Imported here, not at the top: llmstats builds on this module's histograms.
        from shadowproxy.judging.llmstats import LlmStats

        self.llm = LlmStats()  # the "llm" block: figures of OpenAI-compatible answers
        self.judge = JudgeStats()  # the "judge" block, shown once [judge] enables it
        # [secondary]: predictions that production, the secondary and this candidate all answered,
        # as a paired table of (candidate differs from production, secondary differs from
        # production): both, the candidate only, the secondary only, neither; and predictions
        # left out because the secondary's answer was missing or unreadable.
        self.noise: list[int] | None = None
        self.noise_missing = 0
        # [secondary]: the secondary's own figures (requests, errors, latency, mirror counts); on
        # the first candidate's object only.
        self.secondary: ShadowStats | None = None
        # compare.kind "fields": this candidate's per-field counts (judging/fields.py); else None.
        self.fields: FieldTable | None = None

    def enable_fields(self, noise_threshold: float) -> None:
        """compare.kind is "fields": every candidate counts differences per field."""
        for stats in (self, *self.others.values()):
            if stats.fields is None:
                stats.fields = FieldTable(noise_threshold)

    def enable_secondary(self) -> None:
        """A [secondary] runs: every candidate gets noise and net figures."""
        if self.secondary is None:
            self.secondary = ShadowStats(("secondary",))
        for stats in (self, *self.others.values()):
            if stats.noise is None:
                stats.noise = [0, 0, 0, 0]

    def record_noise(self, candidate_agrees: list[bool], secondary_agrees: list[bool] | None) -> None:
        """One request's predictions with a secondary: each candidate flag beside the secondary's
        flag for the same prediction (True: agrees with production); None, or flags of another
        length, leave the predictions out and count them as missing."""
        table = self.noise
        if table is None:
            return
        if secondary_agrees is None or len(secondary_agrees) != len(candidate_agrees):
            self.noise_missing += len(candidate_agrees)
            return
        for cand, sec in zip(candidate_agrees, secondary_agrees, strict=True):
            table[_NOISE_CELL[cand][sec]] += 1

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.others)

    def for_candidate(self, name: str) -> ShadowStats:
        """The stats a candidate's mirror records into."""
        return self if name == self.name else self.others[name]

    # -- recording ---------------------------------------------------------------------------

    def record_production(self, latency_s: float | None, status: int) -> None:
        """A client-facing exchange; status 0 (no answer) or >= 500 is an error."""
        self.production.requests += 1
        if status == 0 or status >= 500:
            self.production.errors += 1
        if latency_s is not None:
            self.production.latency.record(latency_s)

    # With [[slices]], a request's production and candidate figures are recorded in its slice only
    # (instead of, not besides, `record_production` / `record_candidate`): the totals are the sums
    # of the slices, added up when read, so slices cost the hot path no second histogram.

    def record_slice_production(self, index: int, latency_s: float | None, status: int) -> None:
        self.slice_production[index].record(latency_s, status == 0 or status >= 500)

    def record_slice_candidate(self, index: int, latency_s: float | None, error: bool) -> None:
        self.slice_candidate[index].record(latency_s, error)

    def _total(self, base: _Target, parts: list[Any]) -> _Target:
        """`base` plus the slices' figures of the same upstream."""
        if not parts:
            return base
        total = _Target()
        for part in (base, *parts):
            total.requests += part.requests
            total.errors += part.errors
            total.latency.merge(part.latency)
        return total

    def record_slice_outcome(self, index: int, outcome: str, agree: int = 0, disagree: int = 0) -> None:
        """A judged pair in slice `index`: agree/disagree predictions, or another outcome."""
        target = self.slice_candidate[index]
        if outcome in ("agree", "disagree"):
            target.agree += agree
            target.disagree += disagree
        elif outcome in target.outcomes:
            target.outcomes[outcome] += 1

    def record_candidate(self, latency_s: float | None, error: bool) -> None:
        """A shadow request that was sent, whatever became of it."""
        self.candidate.requests += 1
        if error:
            self.candidate.errors += 1
        if latency_s is not None:
            self.candidate.latency.record(latency_s)

    def record_pair_latency(self, prod_s: float, cand_s: float) -> None:
        """Both latencies of one mirrored request: the latency gate compares only these."""
        self.mirrored_production.record(prod_s)
        self.mirrored_candidate.record(cand_s)
        self.latency_diff.record(cand_s - prod_s)

    def record_production_error_on_mirrored(self) -> None:
        """Production answered a mirrored request with 5xx, or we answered 502/504 for it."""
        self.production_errors_on_mirrored += 1

    def record_mirror(self, result: str) -> None:
        if result not in self.mirror:
            raise ValueError(f"unknown mirror result {result!r}; expected one of {', '.join(MIRROR_RESULTS)}")
        self.mirror[result] += 1

    def record_mirror_reason(self, block: str, reason: str) -> None:
        """One more copy skipped, dropped or in error (`block`: a MIRROR_REASONS name) for `reason`;
        the caller counts the result itself (`record_mirror`)."""
        counts = self.mirror_reasons[block]
        counts[reason] = counts.get(reason, 0) + 1

    def record_outcome(self, outcome: str, n: int = 1) -> None:
        if outcome not in self.outcomes:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        self.outcomes[outcome] += n

    def record_comparison(self, cmp: Comparison, kind: str) -> None:
        self.agree += cmp.agree
        self.disagree += cmp.disagree
        if cmp.tool_calls_compared:
            self.tool_calls_compared += cmp.tool_calls_compared
            self.tool_calls_agree += cmp.tool_calls_agree
        if kind == "label":
            pairs = cmp.pairs
            if len(pairs) == 1:
                self._count_pair(pairs[0], 1)
            else:
                # Counted per distinct pair first: a batch's pairs repeat, and an update of the
                # bounded table (a Counter, a set) costs more than one of a plain dict. Pairs reach
                # the table in the order they first appear, so what it tracks and folds is what
                # counting them one by one would give. Keyed by production's label, then the
                # candidate's: str keys take the interpreter's fast path, a tuple key is hashed
                # and compared item by item.
                counted: dict[str, dict[str, int]] = {}
                order: list[tuple[str, str]] = []
                for pair in pairs:
                    p, c = pair
                    row = counted.get(p)
                    if row is None:
                        row = counted[p] = {}
                    n = row.get(c)
                    if n is None:
                        row[c] = 1
                        order.append(pair)
                    else:
                        row[c] = n + 1
                for pair in order:
                    self._count_pair(pair, counted[pair[0]][pair[1]])
        if cmp.abs_diffs:
            self.abs_diff.record_many(cmp.abs_diffs)
        self.summaries["jsd"].record_many(cmp.jsd)
        self.summaries["cosine"].record_many(cmp.cosine)
        self.summaries["similarity"].record_many(cmp.similarity)

    def _count_pair(self, pair: tuple[str, str], n: int) -> None:
        confusion = self.confusion
        if pair in confusion or len(confusion) < CONFUSION_MAX_PAIRS:
            confusion[pair] += n
            self._confusion_labels.update(pair)
            return
        # Bounded memory under label explosions (free text mistaken for labels): once full, labels
        # not seen in a tracked pair become "other"; such folded pairs may take up to as many
        # entries again, and anything beyond counts as ("other", "other").
        known = self._confusion_labels
        folded = (pair[0] if pair[0] in known else OTHER, pair[1] if pair[1] in known else OTHER)
        if folded not in confusion and len(confusion) >= 2 * CONFUSION_MAX_PAIRS:
            folded = (OTHER, OTHER)
        confusion[folded] += n

    # -- reading -----------------------------------------------------------------------------

    def _confusion_matrix(self) -> dict[str, Any]:
        freq: Counter[str] = Counter()
        for (p, c), n in self.confusion.items():
            freq[p] += n
            freq[c] += n
        ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
        labels = [label for label, _ in ranked[:CONFUSION_TOP_LABELS]]
        if len(ranked) > CONFUSION_TOP_LABELS and OTHER not in labels:
            labels.append(OTHER)
        position = {label: i for i, label in enumerate(labels)}
        fallback = position.get(OTHER, -1)
        matrix = [[0] * len(labels) for _ in labels]
        for (p, c), n in self.confusion.items():
            i = position.get(p, fallback)
            j = position.get(c, fallback)
            matrix[i][j] += n
        return {"labels": labels, "matrix": matrix}

    def snapshot(self, full: bool = False) -> dict[str, Any]:
        out = self._single()
        if self.others:
            candidates = {self.name: dict(out)}
            production = out["production"]
            for name, other in self.others.items():
                doc = other._single()
                doc["production"] = production
                doc["llm"]["production"] = out["llm"]["production"]
                candidates[name] = doc
            out["candidates"] = candidates
            # The "llm" block is keyed by upstream: production, "candidate" (the first, as with
            # one candidate) and each candidate by name.
            out["llm"] = {**out["llm"], **{name: doc["llm"]["candidate"] for name, doc in candidates.items()}}
        if self.secondary is not None:
            out["secondary"] = self._secondary_block()
        if self.slice_names:
            out["slices"] = {
                name: {
                    "production": self.slice_production[i].snapshot(),
                    self.name: self.slice_candidate[i].snapshot(),
                    **{other: o.slice_candidate[i].snapshot() for other, o in self.others.items()},
                }
                for i, name in enumerate(self.slice_names)
            }
        if full:
            out["state"] = self.to_state()
        return out

    def _single(self) -> dict[str, Any]:
        """One candidate's document: the fields ``/shadow/stats`` has with one candidate."""
        total = self.agree + self.disagree
        sent = self.mirror["sent"]
        cand_err = self.outcomes["candidate_error"]
        prod_err = self.production_errors_on_mirrored
        cand_rate = cand_err / sent if sent else 0.0
        prod_rate = prod_err / sent if sent else 0.0
        lo, hi = wilson_interval(self.disagree, total)
        abs_n = self.abs_diff.count
        differences: dict[str, Any] = {
            "abs_diff": {
                "count": abs_n,
                "mean": self.abs_diff.sum / abs_n if abs_n else 0.0,
                **{name: self.abs_diff.quantile(q) for name, q in PERCENTILES},
            },
            **{name: s.snapshot() for name, s in self.summaries.items()},
        }
        out: dict[str, Any] = {
            "production": self._total(self.production, self.slice_production).snapshot(),
            "candidate": self._total(self.candidate, self.slice_candidate).snapshot(),
            "mirror": {
                **self.mirror,
                "in_flight": self.mirror_in_flight,
                **{block: dict(counts) for block, counts in self.mirror_reasons.items()},
            },
            "comparisons": {
                "total": total,
                "agree": self.agree,
                "disagree": self.disagree,
                **self.outcomes,
                "disagreement_rate": self.disagree / total if total else 0.0,
                "disagreement_rate_ci95": [lo, hi],
                "tool_calls": {"compared": self.tool_calls_compared, "agree": self.tool_calls_agree},
                **self._noise_blocks(),
            },
            "mirrored": {
                "pairs": self.mirrored_production.count,
                "production_latency_ms": _latency_ms(self.mirrored_production),
                "candidate_latency_ms": _latency_ms(self.mirrored_candidate),
            },
            "latency_diff_ms": self.latency_diff.percentiles_ms(),
            "confusion": self._confusion_matrix(),
            "differences": differences,
            "errors": {
                "sent": sent,
                "candidate_error": cand_err,
                "production_error": prod_err,
                "candidate_error_rate": cand_rate,
                "production_error_rate": prod_rate,
                "error_rate_delta": cand_rate - prod_rate,
                "error_rate_delta_ci95": list(newcombe_interval(min(cand_err, sent), sent, min(prod_err, sent), sent)),
            },
        }
        if self.fields is not None:
            out["fields"] = self.fields.snapshot()
            out["fields_overflow"] = self.fields.overflow
        out["llm"] = self.llm.snapshot(self.summaries["similarity"], self.tool_calls_compared, self.tool_calls_agree)
        if self.judge.enabled:
            out["judge"] = self.judge.snapshot()
        return out

    def _noise_blocks(self) -> dict[str, Any]:
        """With a [secondary]: ``noise`` (production vs secondary) and ``net`` (candidate vs
        production, less the noise) over the predictions all three answered, ``net`` with the
        paired Newcombe interval; empty without one."""
        table = self.noise
        if table is None:
            return {}
        both, cand_only, sec_only, neither = table
        n = both + cand_only + sec_only + neither
        noisy = both + sec_only
        differ = both + cand_only
        return {
            "noise": {
                "rate": noisy / n if n else 0.0,
                "ci95": list(wilson_interval(noisy, n)),
                "compared": n,
                "missing": self.noise_missing,
            },
            "net": {
                "rate": (differ - noisy) / n if n else 0.0,
                "ci95": list(paired_newcombe_interval(both, cand_only, sec_only, neither)),
                "raw_rate": differ / n if n else 0.0,
                "table": {"both": both, "candidate_only": cand_only, "secondary_only": sec_only, "neither": neither},
            },
        }

    def _secondary_block(self) -> dict[str, Any]:
        sec = self.secondary
        assert sec is not None
        return {
            **sec._total(sec.candidate, []).snapshot(),
            "mirror": {
                **sec.mirror,
                "in_flight": sec.mirror_in_flight,
                **{block: dict(counts) for block, counts in sec.mirror_reasons.items()},
            },
        }

    # -- merging -----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything mergeable, JSON-friendly (served under ``"state"`` by ``/shadow/stats?full=1``).
        With slices, ``production`` and ``candidate`` hold what no slice holds (see
        ``record_slice_production``)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "name": self.name,
            "production": self.production.to_state(),
            "candidate": self.candidate.to_state(),
            "mirror": dict(self.mirror),
            "mirror_in_flight": self.mirror_in_flight,
            "mirror_reasons": {block: dict(counts) for block, counts in self.mirror_reasons.items()},
            "agree": self.agree,
            "disagree": self.disagree,
            "tool_calls": [self.tool_calls_compared, self.tool_calls_agree],
            "outcomes": dict(self.outcomes),
            "mirrored_production": self.mirrored_production.to_state(),
            "mirrored_candidate": self.mirrored_candidate.to_state(),
            "latency_diff": self.latency_diff.to_state(),
            "production_errors_on_mirrored": self.production_errors_on_mirrored,
            "confusion": [[p, c, n] for (p, c), n in self.confusion.items()],
            "abs_diff": self.abs_diff.to_state(),
            "summaries": {name: s.to_state() for name, s in self.summaries.items()},
            "llm": self.llm.to_state(),
            **({"judge": self.judge.to_state()} if self.judge.enabled else {}),
        }
        if self.noise is not None:
            state["noise"] = [*self.noise, self.noise_missing]
        if self.fields is not None:
            state["fields"] = self.fields.to_state()
        if self.secondary is not None:
            state["secondary"] = self.secondary.to_state()
        if self.others:
            state["candidates"] = {name: other.to_state() for name, other in self.others.items()}
        if self.slice_names:
            state["slices"] = {
                "names": list(self.slice_names),
                "production": [t.to_state() for t in self.slice_production],
                "candidate": [t.to_state() for t in self.slice_candidate],
            }
        return state

    def merge_state(self, state: Mapping[str, Any]) -> None:
        """Add a state from ``to_state`` (or a full snapshot holding one under ``"state"``)."""
        if "state" in state:
            state = state["state"]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported stats state version {state.get('version')!r}")
        self.production.merge_state(state["production"])
        self.candidate.merge_state(state["candidate"])
        for key in MIRROR_RESULTS:
            self.mirror[key] += int(state["mirror"].get(key, 0))
        self.mirror_in_flight += int(state["mirror_in_flight"])
        for block, counts in state.get("mirror_reasons", {}).items():  # absent from an older proxy
            mine = self.mirror_reasons.get(block)
            if mine is not None:
                for reason, n in counts.items():
                    mine[str(reason)] = mine.get(str(reason), 0) + int(n)
        self.agree += int(state["agree"])
        self.disagree += int(state["disagree"])
        compared, agree = state.get("tool_calls", (0, 0))
        self.tool_calls_compared += int(compared)
        self.tool_calls_agree += int(agree)
        for key in OUTCOMES:
            self.outcomes[key] += int(state["outcomes"].get(key, 0))
        self.mirrored_production.merge(LogHistogram.from_state(state["mirrored_production"]))
        self.mirrored_candidate.merge(LogHistogram.from_state(state["mirrored_candidate"]))
        self.latency_diff.merge(SignedHistogram.from_state(state["latency_diff"]))
        self.production_errors_on_mirrored += int(state["production_errors_on_mirrored"])
        # Most frequent pairs first, so the cap keeps what matters when replicas disagree on labels.
        for p, c, n in sorted(state["confusion"], key=lambda t: -int(t[2])):
            self._count_pair((str(p), str(c)), int(n))
        self.abs_diff.merge(LogHistogram.from_state(state["abs_diff"]))
        for name, s in self.summaries.items():
            s.merge(Summary.from_state(state["summaries"][name]))
        if "llm" in state:  # absent from a proxy that predates the block
            self.llm.merge_state(state["llm"])
        if "judge" in state:  # only from a proxy with a [judge]
            self.judge.merge_state(state["judge"])
        if "name" in state:
            self.name = str(state["name"])
        if "slices" in state:
            self._merge_slices(state["slices"])
        if "noise" in state:  # only from a proxy with a [secondary]
            if self.noise is None:
                self.noise = [0, 0, 0, 0]
            *cells, missing = (int(x) for x in state["noise"])
            for i, n in enumerate(cells):
                self.noise[i] += n
            self.noise_missing += missing
        if "fields" in state:  # only from a proxy with compare.kind "fields"
            if self.fields is None:
                self.fields = FieldTable()
            self.fields.merge_state(state["fields"])
        if "secondary" in state:
            if self.secondary is None:
                self.secondary = ShadowStats(("secondary",))
            self.secondary.merge_state(state["secondary"])
        for name, other in state.get("candidates", {}).items():
            if name not in self.others:
                self.others[name] = ShadowStats((name,), self.slice_names)
            self.others[name].merge_state(other)

    def _merge_slices(self, state: Mapping[str, Any]) -> None:
        """Slices are matched by name; a name this side lacks joins at the end."""
        from shadowproxy.judging.slicestats import SliceCandidate, SliceTarget

        for i, name in enumerate(state["names"]):
            if name not in self.slice_names:
                self.slice_names = (*self.slice_names, str(name))
                self.slice_production.append(SliceTarget())
                self.slice_candidate.append(SliceCandidate())
            j = self.slice_names.index(name)
            self.slice_production[j].merge_state(state["production"][i])
            self.slice_candidate[j].merge_state(state["candidate"][i])

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, Any]]) -> ShadowStats:
        """Merge full snapshots (or bare states) of several workers or replicas into one."""
        merged = cls()
        for state in states:
            merged.merge_state(state)
        return merged
