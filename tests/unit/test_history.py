"""`/shadow/history`: points per window and cumulative, from cumulative stats."""

from __future__ import annotations

import numpy as np

from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.history import History
from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.stats import ShadowStats


def _quantile_ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q, method="inverted_cdf")) * 1000


def _close(measured: float, truth: float) -> bool:
    return abs(measured - truth) <= 0.0101 * truth  # the histograms' 1%


def test_a_window_holds_only_the_values_recorded_since_the_previous_point() -> None:
    rng = np.random.default_rng(7)
    stats, history = ShadowStats(), History()
    first = list(rng.uniform(0.001, 0.010, 400))
    second = list(rng.uniform(0.050, 0.200, 300))
    for v in first:
        stats.record_production(v, 200)
    history.record(stats, 100.0)
    for v in second:
        stats.record_production(v, 200)
    point = history.record(stats, 105.0)
    window = point["window"]["latency_ms"]["production"]
    cumulative = point["cumulative"]["latency_ms"]["production"]
    assert window["count"] == 300 and cumulative["count"] == 700
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        assert _close(window[name], _quantile_ms(second, q)), name
        assert _close(cumulative[name], _quantile_ms(first + second, q)), name
    assert point["window"]["latency_ms"]["candidate"] == {"count": 0, "p50": 0.0, "p99": 0.0}


def test_disagreement_per_window_and_cumulative_with_wilson_intervals() -> None:
    stats, history = ShadowStats(), History()
    stats.record_comparison(compare_predictions("label", [1] * 90 + [2] * 10, [1] * 100, 0.0, 0.0), "label")
    history.record(stats, 1.0)
    stats.record_comparison(compare_predictions("label", [1] * 20 + [2] * 30, [1] * 50, 0.0, 0.0), "label")
    for _ in range(3):
        stats.record_mirror("sampled")
    point = history.record(stats, 6.0)
    window, cumulative = point["window"], point["cumulative"]
    assert (window["agree"], window["disagree"]) == (20, 30)
    assert window["disagreement_rate"] == 0.6
    assert window["disagreement_rate_ci95"] == list(wilson_interval(30, 50))
    assert (cumulative["agree"], cumulative["disagree"]) == (110, 40)
    assert cumulative["disagreement_rate_ci95"] == list(wilson_interval(40, 150))
    assert window["mirror"]["sampled"] == cumulative["mirror"]["sampled"] == 3


def test_a_count_that_went_down_gives_an_empty_window_not_a_negative_one() -> None:
    history = History()
    before = ShadowStats()
    for _ in range(5):
        before.record_mirror("sampled")
        before.record_production(0.01, 200)
    history.record(before, 1.0)
    point = history.record(ShadowStats(), 6.0)  # a restarted worker: the merged totals dropped
    assert point["window"]["mirror"]["sampled"] == 0
    assert point["window"]["latency_ms"]["production"]["count"] == 0
    assert point["cumulative"]["mirror"]["sampled"] == 0


def test_the_ring_keeps_the_last_points_and_since_returns_the_newer_ones() -> None:
    history = History(capacity=3)
    stats = ShadowStats()
    for t in range(5):
        history.record(stats, float(t))
    doc = history.document()
    assert [p["t"] for p in doc["points"]] == [2.0, 3.0, 4.0]
    assert doc["capacity"] == 3 and doc["interval_s"] == 5.0
    assert [p["t"] for p in history.document(since=3.0)["points"]] == [4.0]
