"""The LLM figures: what one answer adds, how states merge, the time-to-first-token gate, and the
report's block. No sockets: streams are assembled from hand-built events with chosen times."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest

from shadowproxy.commands.report import make_report, render
from shadowproxy.config import GatesConfig, Price
from shadowproxy.judging.sse import StreamAssembler
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate
from shadowproxy.shadow.llm import LlmMeter
from shadowproxy.shadow.metrics import Metrics

LIMIT = 1 << 20


def event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def word(text: str, index: int = 0, finish: str | None = None) -> bytes:
    return event({"choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}]})


def streamed(times: list[float], *, usage: dict[str, int] | None = None, finish: str = "stop") -> StreamAssembler:
    """A stream of one word per time in `times`, the last one finishing, then usage and [DONE]."""
    asm = StreamAssembler(LIMIT)
    for i, t in enumerate(times):
        asm.feed(word(f"w{i} ", finish=finish if i == len(times) - 1 else None), t)
    if usage is not None:
        asm.feed(event({"choices": [], "usage": usage}), times[-1])
    asm.feed(b"data: [DONE]\n\n", times[-1])
    asm.end()
    return asm


def meter(price: Price | None = None) -> tuple[LlmMeter, ShadowStats, Metrics]:
    stats, metrics = ShadowStats(), Metrics()
    return LlmMeter("production", stats.llm.production, metrics, price, LIMIT), stats, metrics


def test_a_whole_stream_adds_its_usage_rate_finish_reason_and_cost() -> None:
    m, stats, metrics = meter(Price(input=2.0, output=8.0))
    times = [1.0, 1.05, 1.10, 1.15, 1.20]
    m.stream_done(streamed(times, usage={"prompt_tokens": 12, "completion_tokens": 9}))
    llm = stats.snapshot()["llm"]["production"]
    assert (llm["answers"], llm["streams"], llm["errors"]) == (1, 1, 0)
    assert llm["output_tokens"] == {"total": 9, "estimated": 0}
    assert llm["finish_reasons"]["stop"] == 1
    cost = (12 * 2.0 + 9 * 8.0) / 1e6
    assert llm["cost_usd"]["total"] == pytest.approx(cost, rel=1e-12)
    assert llm["cost_usd"]["per_request"] == pytest.approx(cost, rel=1e-12)
    rate = (9 - 1) / (1.20 - 1.0)  # tokens after the first over the time from first to last output
    assert llm["tokens_per_s"]["p50"] == pytest.approx(rate, rel=0.01)  # the histogram's relative error
    assert metrics.output_tokens_by_target["production"].value == 9
    assert metrics.llm_cost_by_target["production"].value == pytest.approx(cost, rel=1e-12)
    assert metrics.finish_reasons_by_target["production"]["stop"]._value.get() == 1


def test_a_stream_without_usage_counts_its_output_events_as_estimated_tokens() -> None:
    m, stats, _ = meter()
    m.stream_done(streamed([0.0, 0.1, 0.2, 0.3], finish="length"))
    llm = stats.snapshot()["llm"]["production"]
    assert llm["output_tokens"] == {"total": 4, "estimated": 4}
    assert llm["finish_reasons"]["length"] == 1
    assert llm["cost_usd"] == {"total": 0.0, "per_request": None}  # no price: nothing counted


def test_a_broken_or_oversized_stream_counts_only_as_such() -> None:
    m, stats, _ = meter()
    broken = StreamAssembler(LIMIT)
    broken.feed(word("a"), 1.0)
    broken.end()  # no [DONE]
    m.stream_done(broken)
    big = StreamAssembler(10)
    big.feed(word("a"), 1.0)
    big.end()
    m.stream_done(big)
    llm = stats.snapshot()["llm"]["production"]
    assert (llm["answers"], llm["errors"], llm["too_large"]) == (0, 1, 1)
    assert llm["output_tokens"]["total"] == 0


def test_whole_answers_use_usage_else_an_estimate_from_their_length() -> None:
    m, stats, _ = meter(Price(input=1.0, output=3.0))
    with_usage = {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    text = "x" * 41  # 41 characters: 11 tokens at four characters a token, rounded up
    without = {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "tool_calls"}]}
    embeddings = {"data": [{"index": 0, "embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    m.answer_done("chat", json.dumps(with_usage).encode())
    m.answer_done("chat", json.dumps(without).encode())
    m.answer_done("embeddings", json.dumps(embeddings).encode())
    m.answer_done("chat", b"not json")
    m.answer_done("chat", None)
    llm = stats.snapshot()["llm"]["production"]
    assert (llm["answers"], llm["streams"], llm["errors"], llm["too_large"]) == (3, 0, 1, 1)
    assert llm["output_tokens"] == {"total": 7 + 11, "estimated": 11}
    assert llm["finish_reasons"]["stop"] == 1 and llm["finish_reasons"]["tool_calls"] == 1
    expected = ((5 * 1.0 + 7 * 3.0) + (0 + 11 * 3.0) + (4 * 1.0)) / 1e6
    assert llm["cost_usd"]["total"] == pytest.approx(expected, rel=1e-12)
    assert llm["cost_usd"]["per_request"] == pytest.approx(expected / 3, rel=1e-12)
    assert llm["ttft_ms"]["p50"] == 0.0  # whole answers have no time to first token


def _random_stats(seed: int, into: ShadowStats | None = None) -> ShadowStats:
    """Random LLM figures recorded into `into` (a new ShadowStats by default)."""
    rng = random.Random(seed)
    s = into if into is not None else ShadowStats()
    for figures in (s.llm.production, s.llm.candidate):
        for _ in range(200):
            figures.ttft.record(rng.lognormvariate(-2, 0.5))
            figures.inter_token.record(rng.choice([0.0, rng.lognormvariate(-4, 0.3)]))
            figures.record_answer(
                rng.random() < 0.7, rng.randint(1, 500), rng.random() < 0.3,
                [rng.choice(["stop", "length", "tool_calls"])], rng.random() / 1000, rng.uniform(5, 200),
            )
        figures.errors += rng.randint(0, 5)
        figures.too_large += rng.randint(0, 5)
    for _ in range(300):
        s.llm.record_ttft_pair(rng.lognormvariate(-2, 0.5), rng.lognormvariate(-1.8, 0.5))
    return s


def test_llm_state_merges_exactly_as_one_stats_that_saw_everything() -> None:
    merged = ShadowStats.from_states(_random_stats(seed).snapshot(full=True) for seed in range(3))
    direct = ShadowStats()
    for seed in range(3):
        _random_stats(seed, into=direct)
    got, want = merged.snapshot()["llm"], direct.snapshot()["llm"]
    for name in ("production", "candidate"):
        # Sums of floats in another order: equal up to rounding.
        assert got[name].pop("cost_usd") == pytest.approx(want[name].pop("cost_usd"), rel=1e-12)
    assert got == want
    assert got["candidate"]["pairs"]["streamed"] == 900
    assert got["production"]["answers"] == 600


@dataclass(frozen=True)
class Gates:
    min_samples: int = 500
    max_disagreement_rate: float = 0.02
    max_p99_latency_ratio: float = 1.25
    max_error_rate_delta: float = 0.01
    max_ttft_p99_ratio: float = 1.25


def _ttft_pairs(n: int, slowdown: float, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    s = ShadowStats()
    for _ in range(n):
        ttft = rng.lognormvariate(-3, 0.4)
        s.llm.record_ttft_pair(ttft, ttft * slowdown)
    return s.snapshot()


def _ttft_gate(result: dict[str, Any]) -> dict[str, Any] | None:
    gates = [g for g in result["gates"] if g["name"] == "max_ttft_p99_ratio"]
    return gates[0] if gates else None


def test_ttft_gate_is_left_out_until_min_samples_streamed_pairs() -> None:
    assert _ttft_gate(evaluate(_ttft_pairs(499, 3.0), Gates())) is None
    assert _ttft_gate(evaluate(_ttft_pairs(500, 3.0), Gates())) is not None
    assert _ttft_gate(evaluate(_ttft_pairs(5000, 3.0), Gates(max_ttft_p99_ratio=None))) is None  # type: ignore[arg-type]


def test_ttft_gate_passes_a_twin_and_fails_a_slow_first_token() -> None:
    twin = _ttft_gate(evaluate(_ttft_pairs(5000, 1.0), Gates()))
    assert twin is not None and twin["passed"] is True
    slow_snapshot = _ttft_pairs(2000, 1.5)
    slow_result = evaluate(slow_snapshot, Gates())
    slow = _ttft_gate(slow_result)
    assert slow is not None and slow["passed"] is False
    assert slow_result["verdict"] == "fail"
    assert 1.45 < slow["value"] < 1.55
    pairs = slow_snapshot["llm"]["candidate"]["pairs"]
    lo_p, hi_p = pairs["production_ttft_ms"]["p99_ci"]
    lo_c, hi_c = pairs["candidate_ttft_ms"]["p99_ci"]
    assert slow["interval"] == [lo_c / hi_p, hi_c / lo_p]
    assert slow["interval"][0] > 1.25
    assert slow["reason"].startswith("lower 95% bound of the ratio")


def test_ttft_gate_waits_while_its_interval_holds_the_limit() -> None:
    gate = _ttft_gate(evaluate(_ttft_pairs(1000, 1.3), Gates()))
    assert gate is not None and gate["passed"] is None
    lower, upper = gate["interval"]
    assert lower <= 1.25 < upper
    assert gate["reason"].startswith("time to first token not yet decided")


def test_report_prints_the_llm_block_per_upstream() -> None:
    m, stats, _ = meter(Price(input=1.0, output=1.0))
    m.first_token(0.25)
    m.stream_done(streamed([0.0, 0.5, 1.0], usage={"prompt_tokens": 3, "completion_tokens": 3}))
    stats.llm.record_ttft_pair(0.25, 0.5)
    text = render(make_report(stats.snapshot(), GatesConfig(), ["http://a"]))
    block = text[text.index("LLM"):]
    lines = {line.split("  ")[1].strip(): line.split() for line in block.splitlines()[2:] if line.startswith("  ")}
    reported = stats.snapshot()["llm"]["production"]["ttft_ms"]["p50"]
    assert reported == pytest.approx(250.0, rel=0.01)  # the histogram's relative error
    assert lines["time to first token p50 (ms)"][-2:] == [f"{reported:.2f}", "0.00"]
    assert lines["output tokens (estimated)"][-4:] == ["3", "(0)", "0", "(0)"]
    assert lines["cost (USD)"][-2:] == ["0.000006", "-"]
    assert "candidate vs production: 1 streamed pairs" in block


def test_report_leaves_the_llm_block_out_without_llm_answers() -> None:
    assert "LLM" not in render(make_report(ShadowStats().snapshot(), GatesConfig(), ["http://a"]))
