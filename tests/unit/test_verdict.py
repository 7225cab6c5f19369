from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate


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
        assert set(g) == {"name", "value", "threshold", "passed", "reason"}
        assert isinstance(g["reason"], str) and "\n" not in g["reason"]


def test_twin_candidate_passes() -> None:
    result = evaluate(_drive(1000), Gates())
    assert result["verdict"] == "pass", result
    assert all(g["passed"] is True for g in result["gates"])


def test_twenty_percent_flips_fail_on_disagreement() -> None:
    result = evaluate(_drive(1000, flip=0.2), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_disagreement_rate")
    assert gate["passed"] is False
    assert gate["value"] > 0.02
    assert gate["reason"].startswith("upper 95% bound")


def test_disagreement_is_judged_on_the_upper_bound_not_the_point_estimate() -> None:
    # 1.5% observed over 1000 is below 2%, but its upper 95% bound is not.
    snap = _drive(1000, flip=0.015, seed=4)
    assert snap["comparisons"]["disagreement_rate"] < 0.02 < snap["comparisons"]["disagreement_rate_ci95"][1]
    assert _gate(evaluate(snap, Gates()), "max_disagreement_rate")["passed"] is False


def test_slow_candidate_fails_on_latency() -> None:
    result = evaluate(_drive(1000, slowdown=1.5), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_p99_latency_ratio")
    assert gate["passed"] is False
    assert 1.45 < gate["value"] < 1.55


def test_always_failing_candidate_fails_on_error_rate_not_insufficient_data() -> None:
    result = evaluate(_drive(600, candidate_fails=True), Gates())
    assert result["verdict"] == "fail"
    gate = _gate(result, "max_error_rate_delta")
    assert gate["passed"] is False
    assert gate["value"] == 1.0
    # Nothing was compared, so the disagreement gate still waits.
    assert _gate(result, "max_disagreement_rate")["passed"] is None


def test_production_errors_offset_candidate_errors() -> None:
    snap = _drive(1000, production_5xx=0.1)
    gate = _gate(evaluate(snap, Gates()), "max_error_rate_delta")
    assert gate["value"] < 0
    assert gate["passed"] is True


def test_error_and_latency_gates_wait_for_min_samples_sent() -> None:
    result = evaluate(_drive(100, slowdown=3.0), Gates())
    assert result["verdict"] == "insufficient_data"
    assert _gate(result, "max_p99_latency_ratio")["passed"] is None
    assert _gate(result, "max_error_rate_delta")["passed"] is None


def test_a_failing_gate_fails_even_while_another_waits() -> None:
    # Enough sent to judge latency, too few compared to judge disagreement.
    result = evaluate(_drive(500, slowdown=2.0, production_5xx=0.3), Gates(min_samples=400))
    assert _gate(result, "max_disagreement_rate")["passed"] is None
    assert result["verdict"] == "fail"


def test_threshold_exactly_met_passes() -> None:
    snap = _drive(1000)
    ratio = _gate(evaluate(snap, Gates()), "max_p99_latency_ratio")["value"]
    assert (
        _gate(evaluate(snap, Gates(max_p99_latency_ratio=ratio)), "max_p99_latency_ratio")["passed"] is True
    )
