from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.intervals import newcombe_interval
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate
from shadowproxy.store.database import Totals
from shadowproxy.store.writer import ground_truth


@dataclass(frozen=True)
class Gates:
    min_samples: int = 500
    max_disagreement_rate: float = 0.02
    max_p99_latency_ratio: float = 1.25
    max_error_rate_delta: float = 0.01


def _drive(
    n: int,
    *,
    flip: float = 0.0,
    slowdown: float = 1.0,
    candidate_fails: bool = False,
    production_5xx: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """What the mirror would record for n mirrored requests of one prediction each."""
    rng = random.Random(seed)
    s = ShadowStats()
    for _ in range(n):
        prod_latency = rng.lognormvariate(-4, 0.5)
        prod_status = 503 if rng.random() < production_5xx else 200
        s.record_production(prod_latency, prod_status)
        s.record_mirror("sampled")
        s.record_mirror("sent")
        if prod_status >= 500:
            s.record_production_error_on_mirrored()
        if candidate_fails:
            s.record_candidate(None, error=True)
            s.record_outcome("candidate_error")
            continue
        cand_latency = prod_latency * slowdown
        s.record_candidate(cand_latency, error=False)
        s.record_pair_latency(prod_latency, cand_latency)
        if prod_status >= 500:
            continue
        label = rng.choice(["cat", "dog", "bird"])
        other = "fish" if rng.random() < flip else label
        s.record_comparison(compare_predictions("label", [label], [other], 0, 0), "label")
    return s.snapshot()


def _gate(result: dict[str, Any], name: str) -> dict[str, Any]:
    gates: list[dict[str, Any]] = [g for g in result["gates"] if g["name"] == name]
    assert len(gates) == 1
    return gates[0]


def test_fresh_proxy_has_insufficient_data() -> None:
    result = evaluate(ShadowStats().snapshot(), Gates())
    assert result["verdict"] == "insufficient_data"
    assert all(g["passed"] is None for g in result["gates"])


def test_every_gate_names_value_threshold_passed_and_reason() -> None:
    result = evaluate(_drive(10), Gates())
    assert [g["name"] for g in result["gates"]] == [
        "min_samples",
        "max_disagreement_rate",
        "max_p99_latency_ratio",
        "max_error_rate_delta",
    ]
    for g in result["gates"]:
        assert set(g) == {"name", "value", "threshold", "passed", "reason", "interval"}
        assert isinstance(g["reason"], str) and "\n" not in g["reason"]
    intervals = {g["name"]: g["interval"] for g in result["gates"]}
    assert intervals.pop("min_samples") is None
    for interval in intervals.values():
        assert isinstance(interval, list) and len(interval) == 2


def test_twin_candidate_passes() -> None:
    # 5000 pairs: each p99 is then known within about 7%, so the ratio's interval fits under 1.25.
    result = evaluate(_drive(5000), Gates())
    assert result["verdict"] == "pass", result
    assert all(g["passed"] is True for g in result["gates"])


def test_twenty_percent_flips_fail_on_disagreement() -> None:
    result = evaluate(_drive(1000, flip=0.2), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_disagreement_rate")
    assert gate["passed"] is False
    assert gate["value"] > 0.02
    assert gate["interval"][0] > 0.02
    assert gate["reason"].startswith("lower 95% bound")


def test_disagreement_whose_interval_holds_the_threshold_waits() -> None:
    # 1.5% observed over 1000 is below 2%, but its upper 95% bound is not: not yet known.
    snap = _drive(1000, flip=0.015, seed=4)
    lower, upper = snap["comparisons"]["disagreement_rate_ci95"]
    assert lower < snap["comparisons"]["disagreement_rate"] < 0.02 < upper
    result = evaluate(snap, Gates())
    gate = _gate(result, "max_disagreement_rate")
    assert gate["passed"] is None
    assert gate["value"] == upper and gate["interval"] == [lower, upper]
    assert gate["reason"].startswith("disagreement not yet decided")
    assert result["verdict"] == "insufficient_data"


def test_disagreement_fails_only_when_its_lower_bound_is_above_the_threshold() -> None:
    snap = _drive(1000, flip=0.05, seed=4)
    lower, upper = snap["comparisons"]["disagreement_rate_ci95"]
    assert _gate(evaluate(snap, Gates(max_disagreement_rate=lower * 0.99)), "max_disagreement_rate")["passed"] is False
    assert _gate(evaluate(snap, Gates(max_disagreement_rate=lower * 1.01)), "max_disagreement_rate")["passed"] is None
    assert _gate(evaluate(snap, Gates(max_disagreement_rate=upper)), "max_disagreement_rate")["passed"] is True


def test_slow_candidate_fails_on_latency() -> None:
    result = evaluate(_drive(1000, slowdown=1.5), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_p99_latency_ratio")
    assert gate["passed"] is False
    assert 1.45 < gate["value"] < 1.55
    lower, upper = gate["interval"]
    assert 1.25 < lower < gate["value"] < upper
    assert gate["reason"].startswith("lower 95% bound of the ratio")


def test_latency_ratio_interval_is_built_from_the_two_p99_intervals() -> None:
    snap = _drive(1000, slowdown=1.5)
    lo_p, hi_p = snap["mirrored"]["production_latency_ms"]["p99_ci"]
    lo_c, hi_c = snap["mirrored"]["candidate_latency_ms"]["p99_ci"]
    gate = _gate(evaluate(snap, Gates()), "max_p99_latency_ratio")
    assert gate["interval"] == [lo_c / hi_p, hi_c / lo_p]


def test_latency_whose_ratio_interval_holds_the_threshold_waits() -> None:
    # The point ratio 1.3 is above 1.25, but 1000 pairs cannot tell 1.3 from 1.25 yet.
    result = evaluate(_drive(1000, slowdown=1.3), Gates())
    gate = _gate(result, "max_p99_latency_ratio")
    assert gate["value"] > 1.25
    lower, upper = gate["interval"]
    assert lower <= 1.25 < upper
    assert gate["passed"] is None
    assert gate["reason"].startswith("latency not yet decided")
    assert result["verdict"] == "insufficient_data"


def test_latency_waits_while_too_few_pairs_bound_a_p99_from_above() -> None:
    # Past min_samples, but a p99 has no upper bound before 437 values.
    result = evaluate(_drive(400), Gates(min_samples=300))
    gate = _gate(result, "max_p99_latency_ratio")
    assert gate["interval"][1] is None
    assert gate["passed"] is None
    assert "unbounded" in gate["reason"]


def test_always_failing_candidate_fails_on_error_rate_not_insufficient_data() -> None:
    result = evaluate(_drive(600, candidate_fails=True), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_error_rate_delta")
    assert gate["passed"] is False
    assert gate["value"] == 1.0
    assert gate["interval"][0] > 0.99
    # Nothing was compared, so the disagreement gate still waits.
    assert _gate(result, "max_disagreement_rate")["passed"] is None


def test_production_errors_offset_candidate_errors() -> None:
    snap = _drive(1000, production_5xx=0.1)
    gate = _gate(evaluate(snap, Gates()), "max_error_rate_delta")
    assert gate["value"] < 0
    assert gate["interval"][1] < 0.01
    assert gate["passed"] is True


def test_error_rate_delta_decides_on_newcombes_interval() -> None:
    # 15 of 1000 candidate errors against none: 1.5% > 1%, but the interval holds 1%; 60 do not.
    gates = Gates(min_samples=100)
    for errors, passed in ((0, True), (15, None), (60, False)):
        s = ShadowStats()
        for _ in range(1000):
            s.record_mirror("sent")
        s.record_outcome("candidate_error", errors) if errors else None
        snap = s.snapshot()
        gate = _gate(evaluate(snap, gates), "max_error_rate_delta")
        assert gate["interval"] == list(newcombe_interval(errors, 1000, 0, 1000))
        assert gate["interval"] == snap["errors"]["error_rate_delta_ci95"]
        assert gate["passed"] is passed, gate


def test_error_and_latency_gates_wait_for_min_samples_sent() -> None:
    result = evaluate(_drive(100, slowdown=3.0), Gates())
    assert result["verdict"] == "insufficient_data"
    assert _gate(result, "max_p99_latency_ratio")["passed"] is None
    assert _gate(result, "max_error_rate_delta")["passed"] is None


def test_a_failing_gate_fails_even_while_another_waits() -> None:
    # Enough sent to judge latency, too few compared to judge disagreement.
    result = evaluate(_drive(500, slowdown=3.0, production_5xx=0.3), Gates(min_samples=400))
    assert _gate(result, "max_disagreement_rate")["passed"] is None
    assert result["verdict"] == "fail"


def test_threshold_exactly_met_by_the_upper_bound_passes() -> None:
    snap = _drive(1000)
    upper = _gate(evaluate(snap, Gates()), "max_p99_latency_ratio")["interval"][1]
    assert _gate(evaluate(snap, Gates(max_p99_latency_ratio=upper)), "max_p99_latency_ratio")["passed"] is True
    below = Gates(max_p99_latency_ratio=upper * 0.999)
    assert _gate(evaluate(snap, below), "max_p99_latency_ratio")["passed"] is None


@dataclass(frozen=True)
class AccuracyGates(Gates):
    min_accuracy_delta: float = -0.01
    min_labels: int = 100


def _with_ground_truth(candidate_correct: int, production_correct: int, labeled: int) -> dict[str, Any]:
    snap = _drive(1000)
    totals = Totals(labeled, production_correct, labeled, candidate_correct, production_correct)
    snap["ground_truth"] = ground_truth(totals)
    return snap


def test_accuracy_gate_decides_on_the_interval_of_the_delta() -> None:
    # Candidate minus production accuracy, judged against min_accuracy_delta = -1%.
    cases = [
        ((4000, 3900, 5000), True),  # +2%: the whole interval is above -1%
        ((3960, 4000, 5000), None),  # -0.8%: the interval holds -1%
        ((3500, 4000, 5000), False),  # -10%: the whole interval is below -1%
    ]
    for (cand, prod, labeled), passed in cases:
        snap = _with_ground_truth(cand, prod, labeled)
        result = evaluate(snap, AccuracyGates())
        gate = _gate(result, "min_accuracy_delta")
        assert gate["value"] == pytest.approx((cand - prod) / labeled)
        assert gate["interval"] == list(newcombe_interval(cand, labeled, prod, labeled))
        assert gate["passed"] is passed, gate
        expected = {True: "pass", None: "insufficient_data", False: "fail"}[passed]
        assert result["verdict"] == expected
    waiting = _gate(evaluate(_with_ground_truth(3960, 4000, 5000), AccuracyGates()), "min_accuracy_delta")
    assert waiting["reason"].startswith("accuracy not yet decided")


def test_accuracy_gate_is_left_out_below_min_labels() -> None:
    snap = _with_ground_truth(10, 50, 99)
    assert "min_accuracy_delta" not in [g["name"] for g in evaluate(snap, AccuracyGates())["gates"]]
