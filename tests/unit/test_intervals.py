"""The intervals the gates decide on: quantile bounds from order statistics, Newcombe's interval."""

from __future__ import annotations

import math
import random
import time
from statistics import NormalDist

import numpy as np
import orjson
import pytest

from shadowproxy.judging.intervals import newcombe_interval, quantile_rank_bounds
from shadowproxy.judging.stats import RELATIVE_ACCURACY, LogHistogram, ShadowStats

# ---------------------------------------------------------------- ranks of the order statistics


def exact_ranks(
    n: int, q_num: int, q_den: int, confidence_num: int, confidence_den: int
) -> tuple[int | None, int | None]:
    """The ranks by their definition, in exact rational arithmetic: l - 1 is the largest k with
    P(B <= k) <= tail, u - 1 the smallest with P(B <= k) >= 1 - tail, B ~ Binomial(n, q)."""
    # Scaled by q_den**n * 2 * confidence_den: term_j = C(n, j) q_num^j (q_den - q_num)^(n - j).
    total = q_den**n
    tail_scaled = (confidence_den - confidence_num) * total  # tail * total * 2 * confidence_den
    cdf = 0
    lower: int | None = None
    upper: int | None = None
    for j in range(n + 1):
        cdf += math.comb(n, j) * q_num**j * (q_den - q_num) ** (n - j)
        scaled = cdf * 2 * confidence_den
        if scaled <= tail_scaled:
            lower = j + 1
        if upper is None and scaled >= 2 * confidence_den * total - tail_scaled:
            upper = j + 1
    return lower, (upper if upper is not None and upper <= n else None)


@pytest.mark.parametrize("n", [1, 50, 436, 437, 500, 1000, 2345])
def test_p99_ranks_are_the_exact_binomial_ones(n: int) -> None:
    assert quantile_rank_bounds(n, 0.99, 0.975) == exact_ranks(n, 99, 100, 975, 1000)


def test_median_ranks_match_the_textbook_tables() -> None:
    # Distribution-free 95% intervals for a median: X(2)..X(9) of 10, X(6)..X(15) of 20.
    assert quantile_rank_bounds(10, 0.5, 0.95) == (2, 9)
    assert quantile_rank_bounds(20, 0.5, 0.95) == (6, 15)


def test_the_p99_has_an_upper_bound_from_437_values() -> None:
    # 0.99**n <= 0.0125 needs n >= 437: with fewer, even the largest value may lie below the p99
    # more often than the upper tail allows.
    assert quantile_rank_bounds(436, 0.99, 0.975)[1] is None
    assert quantile_rank_bounds(437, 0.99, 0.975) == (427, 437)
    assert 0.99**437 <= 0.0125 < 0.99**436


def test_ranks_for_ten_million_values_are_quick_and_near_the_normal_approximation() -> None:
    n = 10_000_000
    quantile_rank_bounds.cache_clear()
    started = time.perf_counter()
    lower, upper = quantile_rank_bounds(n, 0.99, 0.975)
    assert time.perf_counter() - started < 0.5
    assert lower is not None and upper is not None
    z = NormalDist().inv_cdf(0.9875)
    sd = math.sqrt(n * 0.99 * 0.01)
    assert abs(lower - (n * 0.99 - z * sd)) < 3
    assert abs(upper - (n * 0.99 + z * sd)) < 3


# ---------------------------------------------------------------- bounds read from a histogram


def lognormal_p99(mu: float, sigma: float) -> float:
    return math.exp(mu + sigma * NormalDist().inv_cdf(0.99))


@pytest.mark.parametrize("n", [500, 1000, 3000])
def test_p99_bounds_cover_the_true_p99_in_at_least_93_percent_of_1000_samples(n: int) -> None:
    mu, sigma = -4.0, 0.6
    truth = lognormal_p99(mu, sigma)
    rng = np.random.default_rng(n)
    lower_rank, upper_rank = quantile_rank_bounds(n, 0.99, 0.975)
    assert lower_rank is not None and upper_rank is not None
    gamma = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
    covered = 0
    for _ in range(1000):
        values = rng.lognormal(mu, sigma, n)
        h = LogHistogram()
        h.record_many(values)
        lo, hi = h.quantile_bounds(0.99)
        assert hi is not None
        # Outward: each bound is the order statistic moved to its bucket's edge, at most one
        # bucket (a factor gamma) away.
        ordered = np.sort(values)
        x_l, x_u = float(ordered[lower_rank - 1]), float(ordered[upper_rank - 1])
        assert x_l / gamma * (1 - 1e-9) <= lo <= x_l
        assert x_u <= hi <= x_u * gamma * (1 + 1e-9)
        covered += lo <= truth <= hi
    # 97.5% by construction (more, since the edges widen it); 93% leaves room for chance.
    assert covered >= 930, covered


def test_p99_bounds_of_merged_histograms_are_those_of_one_that_saw_every_value() -> None:
    rng = np.random.default_rng(5)
    values = rng.lognormal(-5.0, 0.8, 4000)
    whole = LogHistogram()
    whole.record_many(values)
    merged = LogHistogram()
    for part in np.array_split(values, 3):
        h = LogHistogram()
        h.record_many(part)
        merged.merge(LogHistogram.from_state(orjson.loads(orjson.dumps(h.to_state()))))
    assert merged.quantile_bounds(0.99) == whole.quantile_bounds(0.99)
    lo, hi = whole.quantile_bounds(0.99)
    assert hi is not None and lo < whole.quantile(0.99) < hi


def test_p99_bounds_without_values_are_zero_and_unbounded() -> None:
    assert LogHistogram().quantile_bounds(0.99) == (0.0, None)
    h = LogHistogram()
    for _ in range(100):
        h.record(0.01)
    lo, hi = h.quantile_bounds(0.99)
    assert 0.0 < lo <= 0.01 and hi is None


def test_stats_publish_p99_ci_in_milliseconds_beside_each_p99() -> None:
    s = ShadowStats()
    rng = random.Random(3)
    for _ in range(1000):
        prod = rng.lognormvariate(-5, 0.5)
        s.record_production(prod, 200)
        s.record_candidate(prod * 2, error=False)
        s.record_pair_latency(prod, prod * 2)
    snap = s.snapshot()
    blocks = [
        (snap["production"]["latency_ms"], s.production.latency),
        (snap["candidate"]["latency_ms"], s.candidate.latency),
        (snap["mirrored"]["production_latency_ms"], s.mirrored_production),
        (snap["mirrored"]["candidate_latency_ms"], s.mirrored_candidate),
    ]
    for block, histogram in blocks:
        lo_s, hi_s = histogram.quantile_bounds(0.99)
        assert hi_s is not None
        lo, hi = block["p99_ci"]
        # Milliseconds, rounded outward to 6 decimals.
        assert lo <= lo_s * 1000 < lo + 1e-6 and hi - 1e-6 < hi_s * 1000 <= hi
        assert lo <= block["p99"] <= hi


# ---------------------------------------------------------------- Newcombe's hybrid score interval


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval as the roots of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


def newcombe_reference(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    z = NormalDist().inv_cdf(0.975)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_by_quadratic(k1, n1, z)
    l2, u2 = wilson_by_quadratic(k2, n2, z)
    return (
        p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        p1 - p2 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def test_newcombe_equals_the_formula_on_random_counts() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        n1, n2 = rng.randint(1, 5000), rng.randint(1, 5000)
        k1, k2 = rng.randint(0, n1), rng.randint(0, n2)
        assert newcombe_interval(k1, n1, k2, n2) == pytest.approx(newcombe_reference(k1, n1, k2, n2), abs=1e-12)


@pytest.mark.parametrize(
    ("counts", "published"),
    [
        # Newcombe (1998), Table II, method 10, to the 4 decimals printed there.
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((6, 7, 2, 7), (0.0582, 0.8062)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
        ((0, 10, 0, 20), (-0.1611, 0.2775)),
        ((0, 10, 0, 10), (-0.2775, 0.2775)),
        ((10, 10, 0, 20), (0.6791, 1.0000)),
        ((10, 10, 0, 10), (0.6075, 1.0000)),
    ],
)
def test_newcombe_matches_the_published_examples(
    counts: tuple[int, int, int, int], published: tuple[float, float]
) -> None:
    assert newcombe_interval(*counts) == pytest.approx(published, abs=5e-5)


@pytest.mark.parametrize(
    ("counts", "reference"),
    [
        # statsmodels: confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff").
        ((56, 70, 48, 80), (0.05243147240236498, 0.33387265403690614)),
        ((5, 56, 0, 29), (-0.038137147903536936, 0.19256001385511165)),
        ((3, 1000, 0, 1000), (-0.001308291651214999, 0.008783014053503176)),
        ((12, 1000, 5, 1000), (-0.0013948614862825453, 0.016308324645412046)),
        ((0, 500, 7, 500), (-0.028613069137785295, -0.0035117971334198087)),
        ((250, 600, 230, 600), (-0.022052800707258395, 0.08843204663754614)),
        ((1, 3, 2, 5), (-0.5252103363450596, 0.4722447487427825)),
    ],
)
def test_newcombe_matches_statsmodels(counts: tuple[int, int, int, int], reference: tuple[float, float]) -> None:
    assert newcombe_interval(*counts) == pytest.approx(reference, abs=1e-12)


def test_newcombe_without_trials_is_the_whole_range() -> None:
    assert newcombe_interval(0, 0, 3, 10) == (-1.0, 1.0)
    assert newcombe_interval(3, 10, 0, 0) == (-1.0, 1.0)
