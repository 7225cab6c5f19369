"""Promotion gates: a ``/shadow/stats`` snapshot and the ``[gates]`` config -> pass / fail / wait.

Each gate answers ``passed`` True, False, or None while it waits for data, and carries the 95%
``interval`` it decided on (None for ``min_samples``). Past ``min_samples``, every other gate
decides three ways on its interval: it passes when the whole interval is on the good side of the
threshold, fails when the whole interval is on the bad side, and otherwise keeps waiting, so that
``fail`` means "confidently worse" and ``insufficient_data`` "not yet known". The verdict is
``fail`` when any gate failed (a failing gate is final even while others wait), else
``insufficient_data`` when any gate waits, else ``pass``.

| gate | value | interval | judged once |
|---|---|---|---|
| ``min_samples`` | compared predictions | None | always (waits below ``min_samples``) |
| ``max_disagreement_rate`` | upper end of the Wilson interval; with a secondary, of the net rate's \
interval | Wilson; with a secondary, paired Newcombe on ``comparisons.net`` | ``min_samples`` predictions \
compared (with a secondary: by all three) |
| ``max_p99_latency_ratio`` | candidate p99 / production p99 on mirrored requests | \
``[lo_c / hi_p, hi_c / lo_p]`` from each p99's ``p99_ci`` | ``min_samples`` sent |
| ``max_error_rate_delta`` | candidate_error / sent - production errors / sent | Newcombe | ``min_samples`` sent |
| ``min_accuracy_delta`` | ``ground_truth.accuracy_delta`` | ``ground_truth.accuracy_delta_ci95`` \
| only when set, and left out until ``min_labels`` labelled pairs exist |
| ``max_ttft_p99_ratio`` | candidate p99 / production p99 of the time to first token on mirrored \
streams | as ``max_p99_latency_ratio``, from ``llm.candidate.pairs`` | left out until ``min_samples`` \
streamed pairs exist |
| ``min_judge_non_loss_rate`` | the LLM judge's ``judge.non_loss_rate`` (candidate better or tie) \
| ``judge.non_loss_ci95`` (Wilson) | only when set; waits until ``[judge] min_judgements`` judgements |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from shadowproxy.judging.intervals import newcombe_interval

__all__ = ["GatesLike", "evaluate", "evaluate_all", "worst"]


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
    name: str,
    value: float | None,
    threshold: float,
    passed: bool | None,
    reason: str,
    interval: list[float | None] | None,
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "passed": passed,
        "reason": reason,
        "interval": interval,
    }


def _get(snapshot: Mapping[str, Any], *keys: str, default: Any = 0) -> Any:
    node: Any = snapshot
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _interval(value: Any) -> list[float | None] | None:
    """A ``[lower, upper]`` pair from the snapshot (upper may be null: unbounded), else None."""
    if not isinstance(value, list | tuple) or len(value) != 2 or value[0] is None:
        return None
    return [float(value[0]), None if value[1] is None else float(value[1])]


def _three_way(lower: float, upper: float | None, limit: float, higher_is_worse: bool) -> bool | None:
    """Pass when the whole interval is on the good side of the limit (the limit itself is good),
    fail when the whole interval is on the bad side, else None: not decided yet."""
    if higher_is_worse:
        if upper is not None and upper <= limit:
            return True
        return False if lower > limit else None
    if lower >= limit:
        return True
    return False if upper is not None and upper < limit else None


def _decide(
    what: str,
    lower: float,
    upper: float | None,
    limit: float,
    point: str,
    *,
    fmt: Callable[[Any], str] = _pct,
    limit_fmt: Callable[[float], str] = _pct,
    of: str = "",
    higher_is_worse: bool = True,
) -> tuple[bool | None, str]:
    """A gate's three-way decision on its interval, and the reason that says which bound decided."""
    passed = _three_way(lower, upper, limit, higher_is_worse)
    bound = f"95% bound{of}"
    if passed is True:
        side, value, op = ("upper", upper, "<=") if higher_is_worse else ("lower", lower, ">=")
    elif passed is False:
        side, value, op = ("lower", lower, ">") if higher_is_worse else ("upper", upper, "<")
    else:
        interval = f"95% interval{of} {fmt(lower)} - {fmt(upper)}"
        return None, f"{what} not yet decided: {interval} holds {limit_fmt(limit)} {point}"
    return passed, f"{side} {bound} {fmt(value)} {op} {limit_fmt(limit)} {point}"


def _limit_text(x: float) -> str:
    return f"{x:g}"


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
    ttft = _ttft_gate(snapshot, gates, min_samples)
    if ttft is not None:
        results.append(ttft)
    judge = _judge_gate(snapshot, gates)
    if judge is not None:
        results.append(judge)
    outcomes = [g["passed"] for g in results]
    if any(p is False for p in outcomes):
        verdict = "fail"
    elif any(p is None for p in outcomes):
        verdict = "insufficient_data"
    else:
        verdict = "pass"
    return {"verdict": verdict, "gates": results}


_SEVERITY = {"pass": 0, "insufficient_data": 1, "fail": 2}


def worst(verdicts: list[str]) -> str:
    """The worst of several verdicts: fail, else insufficient_data, else pass."""
    return max(verdicts, key=lambda v: _SEVERITY.get(v, 1), default="insufficient_data")


def evaluate_all(snapshot: Mapping[str, Any], gates: GatesLike) -> dict[str, Any]:
    """``/shadow/verdict``: ``evaluate`` on the snapshot; with several candidates (a
    ``"candidates"`` block) also each candidate's verdict and gates under ``"candidates"``, the
    top-level gates those of the first candidate and the top-level verdict the worst of all."""
    result = evaluate(snapshot, gates)
    if getattr(gates, "min_accuracy_delta", None) is not None:
        # Not a threshold of any listed gate, yet it decides when the accuracy gate joins: a
        # report that judges merged stats again reads it here.
        result["min_labels"] = int(getattr(gates, "min_labels", 100))
    candidates = snapshot.get("candidates")
    if not isinstance(candidates, Mapping) or not candidates:
        return result
    # Blocks outside the candidates' own documents (ground truth, from the store, which keeps the
    # first candidate's answers) join the first candidate's judgement only.
    own = set(next(iter(candidates.values())).keys())
    shared = {k: v for k, v in snapshot.items() if k not in own and k != "candidates"}
    per: dict[str, Any] = {}
    for index, (name, doc) in enumerate(candidates.items()):
        per[name] = evaluate({**shared, **doc} if index == 0 else doc, gates)
    result["verdict"] = worst([v["verdict"] for v in per.values()])
    result["candidates"] = per
    return result


def _min_samples_gate(total: int, min_samples: int) -> dict[str, Any]:
    if total >= min_samples:
        reason = f"{total} predictions compared >= {min_samples}"
        return _gate("min_samples", total, min_samples, True, reason, None)
    return _gate("min_samples", total, min_samples, None, f"{total} of {min_samples} predictions compared", None)


def _disagreement_gate(
    snapshot: Mapping[str, Any], total: int, min_samples: int, limit: float
) -> dict[str, Any]:
    name = "max_disagreement_rate"
    net = _get(snapshot, "comparisons", "net", default=None)
    if isinstance(net, Mapping):
        return _net_disagreement_gate(snapshot, net, min_samples, limit)
    ci = _interval(_get(snapshot, "comparisons", "disagreement_rate_ci95", default=None)) or [0.0, 1.0]
    lower, upper = float(ci[0] or 0.0), float(1.0 if ci[1] is None else ci[1])
    rate = float(_get(snapshot, "comparisons", "disagreement_rate", default=0.0))
    if total < min_samples:
        return _gate(name, upper, limit, None, f"waiting: {total} of {min_samples} predictions compared", ci)
    passed, reason = _decide("disagreement", lower, upper, limit, f"(observed {_pct(rate)} of {total})")
    return _gate(name, upper, limit, passed, reason, ci)


def _net_disagreement_gate(
    snapshot: Mapping[str, Any], net: Mapping[str, Any], min_samples: int, limit: float
) -> dict[str, Any]:
    """With a secondary: the candidate's disagreement less production's own (the noise), over the
    predictions production, secondary and candidate all answered, judged on its paired interval."""
    name = "max_disagreement_rate"
    ci = _interval(net.get("ci95")) or [-1.0, 1.0]
    lower, upper = float(-1.0 if ci[0] is None else ci[0]), float(1.0 if ci[1] is None else ci[1])
    rate = float(net.get("rate", 0.0))
    raw = float(net.get("raw_rate", 0.0))
    noise = float(_get(snapshot, "comparisons", "noise", "rate", default=0.0))
    n = int(_get(snapshot, "comparisons", "noise", "compared", default=0))
    if n < min_samples:
        waiting = f"waiting: {n} of {min_samples} predictions compared with the secondary"
        return _gate(name, upper, limit, None, waiting, ci)
    point = f"(net {_pct(rate)}: raw {_pct(raw)} less noise {_pct(noise)}, of {n})"
    passed, reason = _decide("net disagreement", lower, upper, limit, point)
    return _gate(name, upper, limit, passed, reason, ci)


def _ratio_interval(snapshot: Mapping[str, Any]) -> list[float | None] | None:
    """``[lo_c / hi_p, hi_c / lo_p]`` from the two p99 intervals: both hold with 97.5% each, so
    both together, and with them this interval, with at least 95% (Bonferroni)."""
    return _p99_ratio_interval(
        _get(snapshot, "mirrored", "production_latency_ms", "p99_ci", default=None),
        _get(snapshot, "mirrored", "candidate_latency_ms", "p99_ci", default=None),
    )


def _p99_ratio_interval(prod_ci: Any, cand_ci: Any) -> list[float | None] | None:
    prod = _interval(prod_ci)
    cand = _interval(cand_ci)
    if prod is None or cand is None:
        return None
    lo_p, hi_p = prod
    lo_c, hi_c = cand
    assert lo_p is not None and lo_c is not None
    lower = lo_c / hi_p if hi_p is not None and hi_p > 0 else 0.0
    upper = hi_c / lo_p if hi_c is not None and lo_p > 0 else None
    return [lower, upper]


def _ratio_text(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:.2f}"


def _latency_gate(snapshot: Mapping[str, Any], sent: int, min_samples: int, limit: float) -> dict[str, Any]:
    name = "max_p99_latency_ratio"
    pairs = int(_get(snapshot, "mirrored", "pairs"))
    prod_p99 = float(_get(snapshot, "mirrored", "production_latency_ms", "p99"))
    cand_p99 = float(_get(snapshot, "mirrored", "candidate_latency_ms", "p99"))
    ratio = cand_p99 / prod_p99 if prod_p99 > 0 else None
    interval = _ratio_interval(snapshot) if pairs else None
    if sent < min_samples:
        reason = f"waiting: {sent} of {min_samples} mirrored requests sent"
        return _gate(name, ratio, limit, None, reason, interval)
    if pairs == 0 or ratio is None:
        # Every mirrored request failed on one side: there is no latency to compare; the error
        # gate is the one that speaks then.
        return _gate(name, None, limit, None, "no mirrored request answered by both models yet", interval)
    point = f"(candidate p99 {cand_p99:.1f} ms / production p99 {prod_p99:.1f} ms = {ratio:.2f} on {pairs} pairs)"
    if interval is None:
        return _gate(name, ratio, limit, None, f"latency not yet decided: no p99 interval {point}", None)
    lower, upper = interval
    assert lower is not None
    passed, reason = _decide(
        "latency", lower, upper, limit, point, fmt=_ratio_text, limit_fmt=_limit_text, of=" of the ratio"
    )
    return _gate(name, ratio, limit, passed, reason, interval)


def _error_gate(snapshot: Mapping[str, Any], sent: int, min_samples: int, limit: float) -> dict[str, Any]:
    name = "max_error_rate_delta"
    cand_err = int(
        _get(snapshot, "errors", "candidate_error", default=_get(snapshot, "comparisons", "candidate_error"))
    )
    prod_err = int(_get(snapshot, "errors", "production_error"))
    cand_rate = cand_err / sent if sent else 0.0
    prod_rate = prod_err / sent if sent else 0.0
    delta = cand_rate - prod_rate
    lower, upper = newcombe_interval(min(cand_err, sent), sent, min(prod_err, sent), sent)
    interval: list[float | None] = [lower, upper]
    if sent < min_samples:
        reason = f"waiting: {sent} of {min_samples} mirrored requests sent"
        return _gate(name, delta, limit, None, reason, interval)
    rates = f"(candidate errors {_pct(cand_rate)} - production {_pct(prod_rate)} = {_pct(delta)} of {sent})"
    passed, reason = _decide("error rate", lower, upper, limit, rates)
    return _gate(name, delta, limit, passed, reason, interval)


def _accuracy_gate(snapshot: Mapping[str, Any], gates: GatesLike) -> dict[str, Any] | None:
    """Ground truth: absent unless ``min_accuracy_delta`` is set and ``min_labels`` labelled
    pairs exist, so a proxy without labels is not held at insufficient_data by it."""
    threshold = getattr(gates, "min_accuracy_delta", None)
    if threshold is None:
        return None
    limit = float(threshold)
    min_labels = int(getattr(gates, "min_labels", 100))
    labeled = int(_get(snapshot, "ground_truth", "candidate_labeled"))
    if labeled < min_labels:
        return None
    delta = float(_get(snapshot, "ground_truth", "accuracy_delta", default=0.0))
    cand = float(_get(snapshot, "ground_truth", "candidate_accuracy", default=0.0))
    prod = float(_get(snapshot, "ground_truth", "production_accuracy_paired",
                      default=_get(snapshot, "ground_truth", "production_accuracy", default=0.0)))
    interval = _interval(_get(snapshot, "ground_truth", "accuracy_delta_ci95", default=None)) or [-1.0, 1.0]
    lower, upper = float(interval[0] or 0.0), float(1.0 if interval[1] is None else interval[1])
    point = f"(candidate accuracy {_pct(cand)} - production {_pct(prod)} = {_pct(delta)} on {labeled} labelled)"
    passed, reason = _decide("accuracy", lower, upper, limit, point, higher_is_worse=False)
    return _gate("min_accuracy_delta", delta, limit, passed, reason, interval)


def _ttft_gate(snapshot: Mapping[str, Any], gates: GatesLike, min_samples: int) -> dict[str, Any] | None:
    """Time to first token on mirrored streams, decided like the latency gate; absent until
    ``min_samples`` streamed pairs exist, so traffic without streams is not held back by it."""
    threshold = getattr(gates, "max_ttft_p99_ratio", None)
    if threshold is None:
        return None
    limit = float(threshold)
    pairs_block = _get(snapshot, "llm", "candidate", "pairs", default={})
    pairs = int(_get(pairs_block, "streamed"))
    if pairs < min_samples:
        return None
    name = "max_ttft_p99_ratio"
    prod_p99 = float(_get(pairs_block, "production_ttft_ms", "p99"))
    cand_p99 = float(_get(pairs_block, "candidate_ttft_ms", "p99"))
    ratio = cand_p99 / prod_p99 if prod_p99 > 0 else None
    interval = _p99_ratio_interval(
        _get(pairs_block, "production_ttft_ms", "p99_ci", default=None),
        _get(pairs_block, "candidate_ttft_ms", "p99_ci", default=None),
    )
    point = (
        f"(candidate p99 TTFT {cand_p99:.1f} ms / production p99 TTFT {prod_p99:.1f} ms = "
        f"{_ratio_text(ratio)} on {pairs} streamed pairs)"
    )
    if interval is None or ratio is None:
        return _gate(name, ratio, limit, None, f"time to first token not yet decided: no p99 interval {point}", None)
    lower, upper = interval
    assert lower is not None
    passed, reason = _decide(
        "time to first token", lower, upper, limit, point, fmt=_ratio_text, limit_fmt=_limit_text, of=" of the ratio"
    )
    return _gate(name, ratio, limit, passed, reason, interval)


def _judge_gate(snapshot: Mapping[str, Any], gates: GatesLike) -> dict[str, Any] | None:
    """The LLM judge: absent unless ``min_judge_non_loss_rate`` is set. Once set it is part of the
    verdict from the start, waiting until ``min_judgements`` judgements exist (the judge block
    carries ``[judge] min_judgements``): a gate asked for holds the verdict at insufficient_data
    until the judge has spoken, rather than letting the other gates pass without it."""
    threshold = getattr(gates, "min_judge_non_loss_rate", None)
    if threshold is None:
        return None
    name = "min_judge_non_loss_rate"
    limit = float(threshold)
    block = _get(snapshot, "judge", default=None)
    if not isinstance(block, Mapping):
        return _gate(name, None, limit, None, "waiting: no judge configured ([judge])", None)
    judged = int(_get(block, "judged"))
    needed = int(_get(block, "min_judgements", default=100)) or 100
    interval = _interval(_get(block, "non_loss_ci95", default=None)) or [0.0, 1.0]
    rate = _get(block, "non_loss_rate", default=None)
    value = None if rate is None else float(rate)
    if judged < needed:
        return _gate(name, value, limit, None, f"waiting: {judged} of {needed} judgements", interval)
    lower, upper = float(interval[0] or 0.0), float(1.0 if interval[1] is None else interval[1])
    point = (
        f"(candidate better {int(_get(block, 'candidate_better'))}, tie {int(_get(block, 'tie'))}, "
        f"production better {int(_get(block, 'production_better'))} of {judged} judged)"
    )
    passed, reason = _decide("judge non-loss rate", lower, upper, limit, point, higher_is_worse=False)
    return _gate(name, value, limit, passed, reason, interval)
