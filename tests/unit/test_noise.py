"""[secondary]: the paired Newcombe interval, the noise and net figures, their merge, and the gate on net."""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Any

import pytest

from shadowproxy.config import ConfigError, SecondaryConfig, parse_config
from shadowproxy.judging.intervals import paired_newcombe_interval
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate
from tests.helpers import make_config

Z = NormalDist().inv_cdf(0.975)


def wilson_roots(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval as the two roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    x = k / n
    a = 1 + Z * Z / n
    b = -(2 * x + Z * Z / n)
    c = x * x
    disc = math.sqrt(b * b - 4 * a * c)
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


def reference(table: tuple[int, int, int, int]) -> tuple[float, float]:
    """Newcombe (1998, paired, method 10) written from the paper's cells e, f, g, h."""
    e, f, g, h = table
    n = e + f + g + h
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_roots(e + f, n)
    l2, u2 = wilson_roots(e + g, n)
    product = (e + f) * (g + h) * (e + g) * (f + h)
    cross = e * h - f * g
    if product == 0:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(product)
    elif cross < 0:
        phi = cross / math.sqrt(product)
    else:
        phi = 0.0
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    epsilon = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return (max(-1.0, p1 - p2 - delta), min(1.0, p1 - p2 + epsilon))


@pytest.mark.parametrize("table", [
    (5, 20, 10, 65), (40, 3, 3, 54), (0, 0, 0, 10), (0, 7, 0, 3), (12, 0, 9, 200), (300, 41, 17, 642), (1, 1, 1, 1),
])
def test_paired_interval_matches_the_papers_formula(table: tuple[int, int, int, int]) -> None:
    lower, upper = paired_newcombe_interval(*table)
    ref_lower, ref_upper = reference(table)
    assert lower == pytest.approx(ref_lower, abs=1e-12)
    assert upper == pytest.approx(ref_upper, abs=1e-12)
    n = sum(table)
    assert lower <= (table[1] - table[2]) / n <= upper


def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    n, runs, s, extra = 400, 2000, 0.2, 0.1
    # Correlated sides: the second differs with probability s; the first copies it and differs on
    # a further `extra` share of the items where the second does not.
    p_second = s
    p_first = s + (1 - s) * extra
    truth = p_first - p_second
    covered = 0
    for _ in range(runs):
        cells = [0, 0, 0, 0]
        for _ in range(n):
            second = rng.random() < s
            first = second or rng.random() < extra
            cells[(0 if first else 2) + (0 if second else 1)] += 1
        lower, upper = paired_newcombe_interval(cells[0], cells[1], cells[2], cells[3])
        covered += lower <= truth <= upper
    # Binomial(2000, 0.95) sd is about 0.005: the interval's documented near-nominal coverage.
    assert 0.93 <= covered / runs <= 0.975


def test_paired_interval_edges() -> None:
    assert paired_newcombe_interval(0, 0, 0, 0) == (-1.0, 1.0)
    with pytest.raises(ValueError):
        paired_newcombe_interval(-1, 0, 0, 1)


def noisy_stats(table: tuple[int, int, int, int], missing: int = 0) -> ShadowStats:
    stats = ShadowStats(("a", "b"))
    stats.enable_secondary()
    both, cand, sec, neither = table
    flags_c = [False] * both + [False] * cand + [True] * sec + [True] * neither
    flags_s = [False] * both + [True] * cand + [False] * sec + [True] * neither
    stats.record_noise(flags_c, flags_s)
    stats.record_noise([True] * missing, None)
    return stats


def test_noise_and_net_follow_the_paired_table() -> None:
    table = (30, 50, 20, 900)
    doc = noisy_stats(table, missing=7).snapshot()["comparisons"]
    n = 1000
    assert doc["noise"]["rate"] == pytest.approx(50 / n)
    assert doc["noise"]["compared"] == n
    assert doc["noise"]["missing"] == 7
    assert doc["net"]["rate"] == pytest.approx((80 - 50) / n)
    assert doc["net"]["raw_rate"] == pytest.approx(80 / n)
    assert doc["net"]["ci95"] == pytest.approx(list(reference(table)))


def test_a_length_mismatch_leaves_the_predictions_out_as_missing() -> None:
    stats = ShadowStats()
    stats.enable_secondary()
    stats.record_noise([True, False], [True])
    assert stats.noise == [0, 0, 0, 0]
    assert stats.noise_missing == 2


def test_without_a_secondary_there_are_no_noise_figures() -> None:
    doc = ShadowStats().snapshot()
    assert "noise" not in doc["comparisons"] and "net" not in doc["comparisons"]
    assert "secondary" not in doc


def test_noise_merges_exactly_across_workers() -> None:
    one = noisy_stats((1, 2, 3, 4), missing=5)
    two = noisy_stats((10, 20, 30, 40), missing=1)
    two.others["b"].record_noise([False], [False])
    two.secondary.record_mirror("sent")  # type: ignore[union-attr]
    merged = ShadowStats.from_states([one.snapshot(full=True), two.snapshot(full=True)])
    assert merged.noise == [11, 22, 33, 44]
    assert merged.noise_missing == 6
    assert merged.others["b"].noise == [1, 0, 0, 0]
    assert merged.snapshot()["secondary"]["mirror"]["sent"] == 1
    whole = noisy_stats((11, 22, 33, 44), missing=6).snapshot()["comparisons"]
    assert merged.snapshot()["comparisons"]["net"] == whole["net"]


class Gates:
    min_samples = 100
    max_disagreement_rate = 0.05
    max_p99_latency_ratio = 100.0
    max_error_rate_delta = 1.0
    min_accuracy_delta = None
    max_ttft_p99_ratio = None
    min_judge_non_loss_rate = None


def gate(snapshot: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in evaluate(snapshot, Gates())["gates"] if g["name"] == "max_disagreement_rate")


def raw_counts(stats: ShadowStats, table: tuple[int, int, int, int]) -> None:
    stats.agree = table[2] + table[3]
    stats.disagree = table[0] + table[1]


def test_the_gate_judges_net_not_raw_disagreement() -> None:
    # Raw 32% (well above the 5% limit), all of it production's own noise: net passes.
    table = (2880, 320, 320, 6480)  # both noisy 28.8%, either alone 3.2%: raw = noise = 32%
    stats = noisy_stats(table)
    raw_counts(stats, table)
    result = gate(stats.snapshot())
    assert result["passed"] is True, result["reason"]
    assert "net" in result["reason"]
    # A real extra 20% on top of the same noise: net fails.
    table = (2880, 2320, 320, 4480)
    stats = noisy_stats(table)
    raw_counts(stats, table)
    result = gate(stats.snapshot())
    assert result["passed"] is False, result["reason"]


def test_the_net_gate_waits_for_predictions_all_three_answered() -> None:
    stats = noisy_stats((0, 0, 0, 0), missing=5000)
    stats.agree = 5000
    result = gate(stats.snapshot())
    assert result["passed"] is None
    assert "secondary" in result["reason"]


def test_secondary_section_is_optional_and_checked() -> None:
    config = make_config("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert config.secondary is None
    config = make_config("http://127.0.0.1:1", "http://127.0.0.1:2", secondary={"url": "http://127.0.0.1:3"})
    assert config.secondary == SecondaryConfig(url="http://127.0.0.1:3")
    with pytest.raises(ConfigError) as err:
        parse_config({
            "production": {"url": "http://a"}, "candidate": {"url": "http://b"},
            "secondary": {"url": "http://c", "max_in_flight": 0, "model": "x"},
        })
    text = "\n".join(err.value.problems)
    assert "secondary.max_in_flight" in text
    assert "secondary.model" in text


def test_check_config_names_the_secondary() -> None:
    from shadowproxy.commands.cli import summary

    config = make_config("http://127.0.0.1:1", "http://127.0.0.1:2", secondary={"url": "http://127.0.0.1:3"})
    assert "secondary" in summary(config) and "127.0.0.1:3" in summary(config)
    assert "secondary" not in summary(make_config("http://127.0.0.1:1", "http://127.0.0.1:2"))
