"""Promotion gates: a ``/shadow/stats`` snapshot and the ``[gates]`` config -> pass / fail / wait.

Each gate answers ``passed`` True, False, or None while it waits for data. The verdict is
``fail`` when any gate failed (a failing gate is final even while others wait), else
``insufficient_data`` when any gate waits, else ``pass``.

| gate | value | judged once |
|---|---|---|
| ``min_samples`` | compared predictions | always (waits below ``min_samples``) |
| ``max_disagreement_rate`` | upper end of the Wilson 95% interval | ``min_samples`` predictions compared |
| ``max_p99_latency_ratio`` | candidate p99 / production p99 on mirrored requests | ``min_samples`` sent |
| ``max_error_rate_delta`` | candidate_error / sent - production errors / sent | ``min_samples`` sent |
| ``min_accuracy_delta`` | ``ground_truth.accuracy_delta`` (candidate - production accuracy on the \
labelled pairs) >= threshold | only when set, and left out until ``min_labels`` labelled pairs exist |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["GatesLike", "evaluate"]


class GatesLike(Protocol):
    """Anything with the ``[gates]`` thresholds, e.g. ``config.GatesConfig``."""

    @property
    def min_samples(self) -> int: ...
    @property
    def max_disagreement_rate(self) -> float: ...
    @property
    def max_p99_latency_ratio(self) -> float: ...
    @property
    def max_error_rate_delta(self) -> float: ...


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def _gate(
    name: str, value: float | None, threshold: float, passed: bool | None, reason: str
) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "passed": passed, "reason": reason}


def _get(snapshot: Mapping[str, Any], *keys: str, default: Any = 0) -> Any:
    node: Any = snapshot
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def evaluate(snapshot: Mapping[str, Any], gates: GatesLike) -> dict[str, Any]:
    """The ``/shadow/verdict`` answer for a ``ShadowStats.snapshot()``."""
    min_samples = int(gates.min_samples)
    total = int(_get(snapshot, "comparisons", "total"))
    sent = int(_get(snapshot, "mirror", "sent"))
    results = [
        _min_samples_gate(total, min_samples),
        _disagreement_gate(snapshot, total, min_samples, float(gates.max_disagreement_rate)),
        _latency_gate(snapshot, sent, min_samples, float(gates.max_p99_latency_ratio)),
        _error_gate(snapshot, sent, min_samples, float(gates.max_error_rate_delta)),
    ]
    accuracy = _accuracy_gate(snapshot, gates)
    if accuracy is not None:
        results.append(accuracy)
    outcomes = [g["passed"] for g in results]
    if any(p is False for p in outcomes):
        verdict = "fail"
    elif any(p is None for p in outcomes):
        verdict = "insufficient_data"
    else:
        verdict = "pass"
    return {"verdict": verdict, "gates": results}


def _min_samples_gate(total: int, min_samples: int) -> dict[str, Any]:
    if total >= min_samples:
        return _gate(
            "min_samples", total, min_samples, True, f"{total} predictions compared >= {min_samples}"
        )
    return _gate("min_samples", total, min_samples, None, f"{total} of {min_samples} predictions compared")


def _disagreement_gate(
    snapshot: Mapping[str, Any], total: int, min_samples: int, limit: float
) -> dict[str, Any]:
    name = "max_disagreement_rate"
    ci = _get(snapshot, "comparisons", "disagreement_rate_ci95", default=[0.0, 1.0])
    upper = float(ci[1])
    rate = float(_get(snapshot, "comparisons", "disagreement_rate", default=0.0))
    if total < min_samples:
        return _gate(name, upper, limit, None, f"waiting: {total} of {min_samples} predictions compared")
    passed = upper <= limit
    op = "<=" if passed else ">"
    reason = f"upper 95% bound {_pct(upper)} {op} {_pct(limit)} (observed {_pct(rate)} of {total})"
    return _gate(name, upper, limit, passed, reason)


def _latency_gate(snapshot: Mapping[str, Any], sent: int, min_samples: int, limit: float) -> dict[str, Any]:
    name = "max_p99_latency_ratio"
    pairs = int(_get(snapshot, "mirrored", "pairs"))
    prod_p99 = float(_get(snapshot, "mirrored", "production_latency_ms", "p99"))
    cand_p99 = float(_get(snapshot, "mirrored", "candidate_latency_ms", "p99"))
    ratio = cand_p99 / prod_p99 if prod_p99 > 0 else None
    if sent < min_samples:
        return _gate(name, ratio, limit, None, f"waiting: {sent} of {min_samples} mirrored requests sent")
    if pairs == 0 or ratio is None:
        # Every mirrored request failed on one side: there is no latency to compare; the error
        # gate is the one that speaks then.
        return _gate(name, None, limit, None, "no mirrored request answered by both models yet")
    passed = ratio <= limit
    op = "<=" if passed else ">"
    reason = (
        f"candidate p99 {cand_p99:.1f} ms / production p99 {prod_p99:.1f} ms = {ratio:.2f} {op} {limit:g}"
    )
    return _gate(name, ratio, limit, passed, reason)


def _error_gate(snapshot: Mapping[str, Any], sent: int, min_samples: int, limit: float) -> dict[str, Any]:
    name = "max_error_rate_delta"
    cand_err = int(
        _get(snapshot, "errors", "candidate_error", default=_get(snapshot, "comparisons", "candidate_error"))
    )
    prod_err = int(_get(snapshot, "errors", "production_error"))
    cand_rate = cand_err / sent if sent else 0.0
    prod_rate = prod_err / sent if sent else 0.0
    delta = cand_rate - prod_rate
    if sent < min_samples:
        return _gate(name, delta, limit, None, f"waiting: {sent} of {min_samples} mirrored requests sent")
    passed = delta <= limit
    op = "<=" if passed else ">"
    rates = f"candidate errors {_pct(cand_rate)} - production {_pct(prod_rate)}"
    reason = f"{rates} = {_pct(delta)} {op} {_pct(limit)}"
    return _gate(name, delta, limit, passed, reason)


def _accuracy_gate(snapshot: Mapping[str, Any], gates: GatesLike) -> dict[str, Any] | None:
    """Ground truth: absent unless ``min_accuracy_delta`` is set and ``min_labels``
    labelled pairs exist, so a proxy without labels is not held at insufficient_data by it."""
    threshold = getattr(gates, "min_accuracy_delta", None)
    if threshold is None:
        return None
    min_labels = int(getattr(gates, "min_labels", 100))
    labeled = int(_get(snapshot, "ground_truth", "candidate_labeled"))
    if labeled < min_labels:
        return None
    delta = float(_get(snapshot, "ground_truth", "accuracy_delta", default=0.0))
    cand = float(_get(snapshot, "ground_truth", "candidate_accuracy", default=0.0))
    prod = float(_get(snapshot, "ground_truth", "production_accuracy_paired",
                      default=_get(snapshot, "ground_truth", "production_accuracy", default=0.0)))
    passed = delta >= float(threshold)
    op = ">=" if passed else "<"
    reason = (
        f"candidate accuracy {_pct(cand)} - production {_pct(prod)} = {_pct(delta)} {op} "
        f"{_pct(float(threshold))} on {labeled} labelled predictions"
    )
    return _gate("min_accuracy_delta", delta, float(threshold), passed, reason)
