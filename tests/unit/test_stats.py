from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import orjson
import pytest

from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.stats import (
    RECORD_MANY_VECTORISE_MIN,
    LogHistogram,
    ShadowStats,
    SignedHistogram,
    wilson_interval,
)

QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def _rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- LogHistogram


def test_quantiles_match_numpy_inverted_cdf_within_one_percent_on_lognormal_latencies() -> None:
    values = np.random.default_rng(42).lognormal(mean=math.log(0.02), sigma=1.0, size=50_000)
    h = LogHistogram()
    for v in values:
        h.record(float(v))
    for q in QUANTILES:
        assert _rel_err(h.quantile(q), float(np.quantile(values, q, method="inverted_cdf"))) <= 0.01, q


def _record_many_like_record(values: Any, *bounds: float) -> LogHistogram:
    """record_many(values) into a fresh histogram, checked against record() value by value."""
    one, many = LogHistogram(*bounds), LogHistogram(*bounds)
    for v in values:
        one.record(float(v))
    many.record_many(values)
    a, b = one.to_state(), many.to_state()
    assert a.pop("sum") == pytest.approx(b.pop("sum"))
    assert a == b
    return many


def test_record_many_buckets_exactly_like_record() -> None:
    _record_many_like_record(np.random.default_rng(1).lognormal(-3, 3, size=20_000))  # spans past both ends


@pytest.mark.parametrize("size", [0, 1, 5, RECORD_MANY_VECTORISE_MIN - 1, RECORD_MANY_VECTORISE_MIN, 1000])
def test_record_many_of_a_list_matches_record_on_both_paths(size: int) -> None:
    # A comparison's abs_diffs: a short list of floats and ints, with odd values among them.
    odd: list[float] = [0, 3, 0.0, -1.5, math.inf, math.nan, 1e-9, 1e9]
    k = min(size, len(odd))
    values = [float(v) for v in np.random.default_rng(size).lognormal(-3, 3, size=size - k)] + odd[:k]
    many = _record_many_like_record(values, 1e-12, 1e12)
    assert many.count == len([v for v in values if not math.isnan(v)])


def test_empty_histogram_reports_zero() -> None:
    h = LogHistogram()
    assert (h.count, h.quantile(0.99)) == (0, 0.0)


def test_quantile_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError):
        LogHistogram().quantile(1.5)


def test_values_outside_the_range_are_clamped_to_the_end_buckets() -> None:
    h = LogHistogram()
    h.record(1e-9)
    h.record(5e3)
    h.record(math.inf)
    assert h.quantile(0.0) == pytest.approx(1e-6, rel=0.01)
    assert h.quantile(1.0) == pytest.approx(1e3, rel=0.01)
    assert h.count == 3 and math.isfinite(h.sum)


def test_zero_counts_in_the_zero_bucket_and_nan_is_ignored() -> None:
    h = LogHistogram()
    h.record(0.0)
    h.record(math.nan)
    h.record(0.5)
    assert h.count == 2
    assert h.quantile(0.5) == 0.0
    assert h.quantile(1.0) == pytest.approx(0.5, rel=0.01)


def test_count_and_sum_are_exact() -> None:
    h = LogHistogram()
    for v in (0.001, 0.002, 0.5):
        h.record(v)
    assert h.count == 3
    assert h.sum == pytest.approx(0.503)


def test_merged_histogram_equals_one_that_saw_everything() -> None:
    values = np.random.default_rng(5).lognormal(-4, 1.5, size=10_000)
    whole, a, b = LogHistogram(), LogHistogram(), LogHistogram()
    whole.record_many(values)
    a.record_many(values[:3000])
    b.record_many(values[3000:])
    a.merge(b)
    assert [a.quantile(q) for q in QUANTILES] == [whole.quantile(q) for q in QUANTILES]
    assert a.count == whole.count


def test_merging_different_layouts_is_rejected() -> None:
    with pytest.raises(ValueError):
        LogHistogram().merge(LogHistogram(1e-12, 1e12))


def test_state_round_trips_through_json() -> None:
    h = LogHistogram()
    h.record_many([0.001, 0.01, 0.01, 2.0, 0.0])
    back = LogHistogram.from_state(orjson.loads(orjson.dumps(h.to_state())))
    assert back.to_state() == h.to_state()
    assert len(h.to_state()["counts"]) < 500  # only the non-zero stretch


def test_state_with_inconsistent_count_is_rejected() -> None:
    state = LogHistogram().to_state()
    state["count"] = 3
    with pytest.raises(ValueError):
        LogHistogram.from_state(state)


def test_record_costs_about_a_microsecond() -> None:
    import timeit

    h = LogHistogram()
    per_call = min(timeit.repeat(lambda: h.record(0.0123), number=20_000, repeat=3)) / 20_000
    assert per_call < 5e-6


# ---------------------------------------------------------------- SignedHistogram


def test_signed_quantiles_match_numpy_within_one_percent() -> None:
    rng = np.random.default_rng(9)
    values = np.concatenate([-rng.lognormal(-5, 1, 3000), np.zeros(500), rng.lognormal(-4, 1, 6500)])
    h = SignedHistogram()
    for v in values:
        h.record(float(v))
    for q in QUANTILES:
        expected = float(np.quantile(values, q, method="inverted_cdf"))
        got = h.quantile(q)
        assert got == expected == 0.0 or _rel_err(got, expected) <= 0.01, q


def test_signed_histogram_merges_and_round_trips() -> None:
    a, b, whole = SignedHistogram(), SignedHistogram(), SignedHistogram()
    for i, v in enumerate(np.random.default_rng(2).normal(0, 0.01, 2000)):
        (a if i % 2 else b).record(float(v))
        whole.record(float(v))
    a.merge(SignedHistogram.from_state(orjson.loads(orjson.dumps(b.to_state()))))
    assert [a.quantile(q) for q in QUANTILES] == [whole.quantile(q) for q in QUANTILES]


# ---------------------------------------------------------------- Wilson


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    # Wilson (1927) written as the roots of (p_hat - p)^2 = z^2 p (1 - p) / n in p.
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    disc = math.sqrt(b * b - 4 * a * c)
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (20, 100), (31, 1000), (1, 3)])
def test_wilson_matches_the_quadratic_roots(k: int, n: int) -> None:
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = _wilson_reference(k, n, 1.959963984540054)
    assert lo == pytest.approx(max(0.0, ref_lo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, ref_hi), abs=1e-12)


def test_wilson_known_value() -> None:
    # 20 of 100: 0.1334 .. 0.2888, as published Wilson calculators give it.
    lo, hi = wilson_interval(20, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.1334, 0.2888)


def test_wilson_with_no_trials_is_the_whole_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_ends_are_exact_at_the_extremes() -> None:
    assert wilson_interval(0, 50)[0] == 0.0
    assert wilson_interval(50, 50)[1] == 1.0


# ---------------------------------------------------------------- ShadowStats


def test_fresh_snapshot_has_the_documented_layout() -> None:
    snap = ShadowStats().snapshot()
    # No upper bound for the p99 before 437 values (see test_intervals.py).
    zeros = {"p50": 0, "p90": 0, "p95": 0, "p99": 0, "p999": 0, "p99_ci": [0.0, None]}
    assert snap["production"] == {"requests": 0, "errors": 0, "latency_ms": zeros}
    assert snap["candidate"] == {"requests": 0, "errors": 0, "latency_ms": zeros}
    assert snap["mirror"] == {
        "sampled": 0, "sent": 0, "dropped": 0, "skipped": 0, "error": 0, "in_flight": 0,
        "skipped_by_reason": {"method": 0, "body_too_large": 0, "path": 0},
        "dropped_by_reason": {"in_flight_full": 0, "backoff": 0, "client_gone": 0},
        "errors_by_kind": {"connect": 0, "timeout": 0, "reset": 0, "malformed": 0},
    }
    comparisons = snap["comparisons"]
    assert {
        k: comparisons[k] for k in ("total", "agree", "disagree", "candidate_error", "unparseable")
    } == dict.fromkeys(("total", "agree", "disagree", "candidate_error", "unparseable"), 0)
    assert comparisons["disagreement_rate"] == 0.0
    assert comparisons["disagreement_rate_ci95"] == [0.0, 1.0]
    orjson.dumps(ShadowStats().snapshot(full=True))  # JSON-serialisable


def test_production_errors_are_status_zero_or_5xx() -> None:
    s = ShadowStats()
    for status in (200, 404, 500, 502, 0):
        s.record_production(0.01, status)
    s.record_production(None, 0)
    snap = s.snapshot()["production"]
    assert (snap["requests"], snap["errors"]) == (6, 4)


def test_latency_percentiles_are_in_milliseconds() -> None:
    s = ShadowStats()
    for _ in range(100):
        s.record_production(0.050, 200)
    assert s.snapshot()["production"]["latency_ms"]["p99"] == pytest.approx(50.0, rel=0.01)


def test_candidate_requests_and_errors() -> None:
    s = ShadowStats()
    s.record_candidate(0.02, error=False)
    s.record_candidate(None, error=True)
    assert s.snapshot()["candidate"]["requests"] == 2
    assert s.snapshot()["candidate"]["errors"] == 1


def test_comparisons_count_predictions_with_wilson_interval() -> None:
    s = ShadowStats()
    s.record_comparison(compare_predictions("label", ["a"] * 100, ["a"] * 80 + ["b"] * 20, 0, 0), "label")
    c = s.snapshot()["comparisons"]
    assert (c["total"], c["agree"], c["disagree"]) == (100, 80, 20)
    assert c["disagreement_rate"] == 0.2
    assert c["disagreement_rate_ci95"] == list(wilson_interval(20, 100))


def test_outcomes_and_mirror_counters() -> None:
    s = ShadowStats()
    s.record_outcome("candidate_error")
    s.record_outcome("unparseable", 3)
    s.record_outcome("too_large")
    for result in ("sampled", "sampled", "sent", "dropped"):
        s.record_mirror(result)
    s.record_mirror_reason("dropped_by_reason", "backoff")
    s.mirror_in_flight = 4
    snap = s.snapshot()
    assert (snap["comparisons"]["candidate_error"], snap["comparisons"]["unparseable"]) == (1, 3)
    assert snap["comparisons"]["too_large"] == 1
    counts = {k: v for k, v in snap["mirror"].items() if not isinstance(v, dict)}
    assert counts == {"sampled": 2, "sent": 1, "dropped": 1, "skipped": 0, "error": 0, "in_flight": 4}
    assert snap["mirror"]["dropped_by_reason"] == {"in_flight_full": 0, "backoff": 1, "client_gone": 0}


def test_mirror_reasons_are_the_metrics_labels() -> None:
    from shadowproxy.judging.stats import MIRROR_DROP_REASONS, MIRROR_ERROR_KINDS, MIRROR_SKIP_REASONS
    from shadowproxy.shadow.metrics import DROP_REASONS, SKIP_REASONS, UPSTREAM_FAILURES

    assert (MIRROR_SKIP_REASONS, MIRROR_DROP_REASONS, MIRROR_ERROR_KINDS) == (
        SKIP_REASONS, DROP_REASONS, UPSTREAM_FAILURES
    )


def test_mirror_reasons_merge_across_states_by_adding() -> None:
    a, b = ShadowStats(), ShadowStats()
    for _ in range(3):
        a.record_mirror_reason("errors_by_kind", "timeout")
    b.record_mirror_reason("errors_by_kind", "timeout")
    b.record_mirror_reason("skipped_by_reason", "method")
    merged = ShadowStats.from_states([a.snapshot(full=True), b.snapshot(full=True)]).snapshot()["mirror"]
    assert merged["errors_by_kind"] == {"connect": 0, "timeout": 4, "reset": 0, "malformed": 0}
    assert merged["skipped_by_reason"] == {"method": 1, "body_too_large": 0, "path": 0}


def test_unknown_outcome_and_mirror_result_are_rejected() -> None:
    with pytest.raises(ValueError):
        ShadowStats().record_outcome("agree")
    with pytest.raises(ValueError):
        ShadowStats().record_mirror("lost")


def test_pair_latencies_feed_mirrored_percentiles_and_the_signed_difference() -> None:
    s = ShadowStats()
    for _ in range(10):
        s.record_pair_latency(0.010, 0.030)
    s.record_pair_latency(0.050, 0.020)
    snap = s.snapshot()
    assert snap["mirrored"]["pairs"] == 11
    assert snap["mirrored"]["candidate_latency_ms"]["p50"] == pytest.approx(30.0, rel=0.01)
    assert snap["latency_diff_ms"]["p50"] == pytest.approx(20.0, rel=0.01)
    assert (
        snap["latency_diff_ms"]["p50"]
        > 0
        > ShadowStats.from_states([s.to_state()]).latency_diff.quantile(0.0)
    )


def test_error_figures_for_the_gate() -> None:
    s = ShadowStats()
    for _ in range(10):
        s.record_mirror("sent")
    s.record_outcome("candidate_error", 3)
    s.record_production_error_on_mirrored()
    e = s.snapshot()["errors"]
    assert (e["sent"], e["candidate_error"], e["production_error"]) == (10, 3, 1)
    assert e["error_rate_delta"] == pytest.approx(0.2)


def test_confusion_matrix_rows_are_production_columns_candidate() -> None:
    s = ShadowStats()
    s.record_comparison(
        compare_predictions("label", ["cat", "cat", "dog", 1], ["cat", "dog", "dog", 1.0], 0, 0), "label"
    )
    conf = s.snapshot()["confusion"]
    i = {label: n for n, label in enumerate(conf["labels"])}
    assert set(conf["labels"]) == {"cat", "dog", "1"}
    assert conf["matrix"][i["cat"]][i["dog"]] == 1
    assert conf["matrix"][i["cat"]][i["cat"]] == 1
    assert conf["matrix"][i["1"]][i["1"]] == 1


def test_confusion_shows_top_ten_labels_and_folds_the_rest_into_other() -> None:
    s = ShadowStats()
    labels = [f"l{i:02d}" for i in range(30) for _ in range(30 - i)]
    s.record_comparison(compare_predictions("label", labels, labels, 0, 0), "label")
    conf = s.snapshot()["confusion"]
    assert conf["labels"] == [f"l{i:02d}" for i in range(10)] + ["other"]
    assert sum(map(sum, conf["matrix"])) == len(labels)


def test_confusion_tracks_a_bounded_number_of_pairs() -> None:
    s = ShadowStats()
    prod = [f"p{i}" for i in range(3000)]
    s.record_comparison(compare_predictions("label", prod, ["x"] * 3000, 0, 0), "label")
    assert len(s.confusion) <= 2001
    assert sum(s.confusion.values()) == 3000
    assert s.confusion[("other", "x")] == 2000


def test_confusion_beyond_the_folded_pairs_counts_as_other_other() -> None:
    s = ShadowStats()
    prod = [f"p{i}" for i in range(3000)]
    cand = [f"c{i}" for i in range(3000)]
    s.record_comparison(compare_predictions("label", prod + prod[:1500], prod + cand[:1500], 0, 0), "label")
    assert len(s.confusion) <= 2001
    assert sum(s.confusion.values()) == 4500


def test_confusion_of_a_batch_equals_its_pairs_counted_one_by_one() -> None:
    # A batch's pairs are counted per distinct pair before they reach the bounded table; the
    # table must end as if each instance had been recorded alone, in order, also once full
    # (repeats, pairs admitted before and after the bound, folded ones, a real label "other").
    rng = random.Random(7)
    labels = [f"l{i}" for i in range(1500)] + ["other"]
    batches = [
        [(rng.choice(labels[:40]), rng.choice(labels[:40])) for _ in range(256)],
        [(rng.choice(labels), rng.choice(labels)) for _ in range(3000)],
        [(rng.choice(labels[:60] + ["other"]), rng.choice(labels)) for _ in range(2000)],
    ]
    batched, one_by_one = ShadowStats(), ShadowStats()
    for batch in batches:
        prod, cand = [p for p, _ in batch], [c for _, c in batch]
        batched.record_comparison(compare_predictions("label", prod, cand, 0, 0), "label")
        for p, c in batch:
            one_by_one.record_comparison(compare_predictions("label", [p], [c], 0, 0), "label")
    assert len(batched.confusion) > 1000  # the bound was reached and folding happened
    assert dict(batched.confusion) == dict(one_by_one.confusion)
    assert batched.snapshot()["confusion"] == one_by_one.snapshot()["confusion"]
    assert (batched.agree, batched.disagree) == (one_by_one.agree, one_by_one.disagree)


def test_differences_summaries() -> None:
    s = ShadowStats()
    s.record_comparison(compare_predictions("numeric", [1.0, 2.0], [1.5, 2.0], 0, 0), "numeric")
    s.record_comparison(compare_predictions("distribution", [[1.0, 0.0]], [[0.0, 1.0]], 0, 0), "distribution")
    d = s.snapshot()["differences"]
    assert d["abs_diff"]["count"] == 2
    assert d["abs_diff"]["mean"] == pytest.approx(0.25)
    assert d["abs_diff"]["p99"] == pytest.approx(0.5, rel=0.01)
    assert d["jsd"]["count"] == 1 and d["jsd"]["mean"] == pytest.approx(1.0)


def _feed(s: ShadowStats, rng: random.Random, n: int) -> None:
    for _ in range(n):
        p = rng.lognormvariate(-4, 1)
        c = rng.lognormvariate(-3.8, 1)
        s.record_production(p, rng.choice((200, 200, 200, 503)))
        s.record_mirror("sampled")
        s.record_mirror("sent")
        fails = rng.random() < 0.05
        s.record_candidate(None if fails else c, fails)
        if fails:
            s.record_outcome("candidate_error")
            continue
        s.record_pair_latency(p, c)
        labels = [rng.choice("abcdefghijklm") for _ in range(3)]
        other = [x if rng.random() < 0.9 else rng.choice("abc") for x in labels]
        s.record_comparison(compare_predictions("label", labels, other, 0, 0), "label")
        s.record_comparison(compare_predictions("vector", [[p, c]], [[c, p]], 1e-3, 0), "vector")


def _without_means(snap: dict[str, object]) -> dict[str, object]:
    # Float sums are added in another order after a merge; everything else must be identical.
    out = orjson.loads(orjson.dumps(snap))
    for summary in out["differences"].values():
        summary.pop("mean")
    out.pop("state", None)
    return out  # type: ignore[no-any-return]


def test_merged_states_equal_one_aggregator_that_saw_everything() -> None:
    whole = ShadowStats()
    parts = [ShadowStats() for _ in range(3)]
    for i, part in enumerate(parts):
        _feed(part, random.Random(i), 400)
        _feed(whole, random.Random(i), 400)
    snapshots = [orjson.loads(orjson.dumps(p.snapshot(full=True))) for p in parts]
    merged = ShadowStats.from_states(snapshots)
    assert _without_means(merged.snapshot()) == _without_means(whole.snapshot())
    assert merged.snapshot()["differences"]["abs_diff"]["mean"] == pytest.approx(
        whole.snapshot()["differences"]["abs_diff"]["mean"]
    )


def test_unknown_state_version_is_rejected() -> None:
    state = ShadowStats().to_state()
    state["version"] = 99
    with pytest.raises(ValueError):
        ShadowStats.from_states([state])
