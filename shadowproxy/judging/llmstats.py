"""What LLM users measure, per upstream, as mergeable state: the ``"llm"`` block of ``/shadow/stats``.

| figure | of | unit |
|---|---|---|
| ``ttft_ms`` | streamed answers: request sent upstream -> the first event with output | ms |
| ``inter_token_ms`` | streamed answers: the gap before each later event with output | ms |
| ``tokens_per_s`` | streamed answers with at least 2 output tokens: ``(tokens - 1) / (last - first output)`` | 1/s |
| ``output_tokens`` | every answer: ``usage.completion_tokens``, else estimated (``estimated`` counts those) | tokens |
| ``finish_reasons`` | every choice: stop, length, tool_calls, content_filter, other | choices |
| ``cost_usd`` | answers of an upstream with a ``price``: prompt and completion tokens at its rates | USD |

The times are ``LogHistogram``s (1% relative error) and everything else is a count or a sum, so
workers and replicas merge by adding, exactly. The candidate's block carries ``pairs``: the time
to first token of production and of the candidate on the same mirrored streamed requests (what
the ``max_ttft_p99_ratio`` gate compares, with each p99's ``p99_ci``), and the similarity and
tool-call agreement of the compared pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.sse import FINISH_REASONS
from shadowproxy.judging.stats import PERCENTILES, LogHistogram, Summary

__all__ = ["LlmFigures", "LlmStats", "estimate_tokens"]

# Tokens per second from 0.001 (a stalled stream) to a million (a cached answer in a burst).
_RATE_MIN = 1e-3
_RATE_MAX = 1e6
# OpenAI's rule of thumb for English text: a token is about four characters.
CHARS_PER_TOKEN = 4


def estimate_tokens(text_length: int) -> int:
    """Output tokens of a whole answer without ``usage``, from its length in characters."""
    return -(-text_length // CHARS_PER_TOKEN)


def _latency_ms(h: LogHistogram) -> dict[str, Any]:
    out: dict[str, Any] = dict(h.percentiles_ms())
    out["p99_ci"] = h.p99_ci_ms()
    return out


def _rates(h: LogHistogram) -> dict[str, float]:
    return {name: round(h.quantile(q), 6) for name, q in PERCENTILES}


class LlmFigures:
    """One upstream's figures (see the module's table)."""

    __slots__ = (
        "answers", "streams", "errors", "too_large", "ttft", "inter_token", "tokens_per_s",
        "output_tokens", "estimated_tokens", "finish_reasons", "cost_usd", "priced",
    )

    def __init__(self) -> None:
        self.answers = 0  # answers whose figures were recorded (whole, readable)
        self.streams = 0  # of which streamed
        self.errors = 0  # streams that broke off or carried an error, answers that could not be read
        self.too_large = 0  # past compare.max_response_bytes: only the time to first token counts
        self.ttft = LogHistogram()
        self.inter_token = LogHistogram()
        self.tokens_per_s = LogHistogram(_RATE_MIN, _RATE_MAX)
        self.output_tokens = 0
        self.estimated_tokens = 0  # of output_tokens, counted without the server's usage
        self.finish_reasons: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.cost_usd = 0.0
        self.priced = 0  # answers whose cost was counted

    def record_answer(
        self,
        streamed: bool,
        output_tokens: int,
        estimated: bool,
        finish_reasons: list[str],
        cost_usd: float | None,
        tokens_per_s: float | None,
    ) -> None:
        """A whole answer; ``finish_reasons`` normalised (``sse.normalise_finish_reason``)."""
        self.answers += 1
        if streamed:
            self.streams += 1
        self.output_tokens += output_tokens
        if estimated:
            self.estimated_tokens += output_tokens
        counts = self.finish_reasons
        for reason in finish_reasons:
            counts[reason] = counts.get(reason, 0) + 1
        if cost_usd is not None:
            self.cost_usd += cost_usd
            self.priced += 1
        if tokens_per_s is not None:
            self.tokens_per_s.record(tokens_per_s)

    def snapshot(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "streams": self.streams,
            "errors": self.errors,
            "too_large": self.too_large,
            "ttft_ms": _latency_ms(self.ttft),
            "inter_token_ms": _latency_ms(self.inter_token),
            "tokens_per_s": _rates(self.tokens_per_s),
            "output_tokens": {"total": self.output_tokens, "estimated": self.estimated_tokens},
            "finish_reasons": dict(self.finish_reasons),
            "cost_usd": {
                "total": self.cost_usd,
                "per_request": self.cost_usd / self.priced if self.priced else None,
            },
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "streams": self.streams,
            "errors": self.errors,
            "too_large": self.too_large,
            "ttft": self.ttft.to_state(),
            "inter_token": self.inter_token.to_state(),
            "tokens_per_s": self.tokens_per_s.to_state(),
            "output_tokens": self.output_tokens,
            "estimated_tokens": self.estimated_tokens,
            "finish_reasons": dict(self.finish_reasons),
            "cost_usd": self.cost_usd,
            "priced": self.priced,
        }

    def merge_state(self, state: Mapping[str, Any]) -> None:
        self.answers += int(state["answers"])
        self.streams += int(state["streams"])
        self.errors += int(state["errors"])
        self.too_large += int(state["too_large"])
        self.ttft.merge(LogHistogram.from_state(state["ttft"]))
        self.inter_token.merge(LogHistogram.from_state(state["inter_token"]))
        self.tokens_per_s.merge(LogHistogram.from_state(state["tokens_per_s"]))
        self.output_tokens += int(state["output_tokens"])
        self.estimated_tokens += int(state["estimated_tokens"])
        for reason, n in state["finish_reasons"].items():
            self.finish_reasons[str(reason)] = self.finish_reasons.get(str(reason), 0) + int(n)
        self.cost_usd += float(state["cost_usd"])
        self.priced += int(state["priced"])


class LlmStats:
    """The ``"llm"`` block: production's and the candidate's figures, and the streamed pairs'
    times to first token."""

    __slots__ = ("production", "candidate", "pair_production_ttft", "pair_candidate_ttft")

    def __init__(self) -> None:
        self.production = LlmFigures()
        self.candidate = LlmFigures()
        self.pair_production_ttft = LogHistogram()
        self.pair_candidate_ttft = LogHistogram()

    def record_ttft_pair(self, production_s: float, candidate_s: float) -> None:
        """Both times to first token of one mirrored streamed request (the TTFT gate's data)."""
        self.pair_production_ttft.record(production_s)
        self.pair_candidate_ttft.record(candidate_s)

    @property
    def any(self) -> bool:
        """Whether any LLM answer was seen (the block is worth printing)."""
        p, c = self.production, self.candidate
        return bool(p.answers or p.errors or p.too_large or c.answers or c.errors or c.too_large)

    def snapshot(self, similarity: Summary, tool_calls_compared: int, tool_calls_agree: int) -> dict[str, Any]:
        """With the compared pairs' text ``similarity`` and tool-call counts (kept by ShadowStats)."""
        lo, hi = wilson_interval(tool_calls_agree, tool_calls_compared)
        candidate = self.candidate.snapshot()
        candidate["pairs"] = {
            "streamed": self.pair_production_ttft.count,
            "production_ttft_ms": _latency_ms(self.pair_production_ttft),
            "candidate_ttft_ms": _latency_ms(self.pair_candidate_ttft),
            "similarity": similarity.snapshot(),
            "tool_calls": {
                "compared": tool_calls_compared,
                "agree": tool_calls_agree,
                "agreement_rate": tool_calls_agree / tool_calls_compared if tool_calls_compared else None,
                "agreement_rate_ci95": [lo, hi],
            },
        }
        return {"production": self.production.snapshot(), "candidate": candidate}

    def to_state(self) -> dict[str, Any]:
        return {
            "production": self.production.to_state(),
            "candidate": self.candidate.to_state(),
            "pair_production_ttft": self.pair_production_ttft.to_state(),
            "pair_candidate_ttft": self.pair_candidate_ttft.to_state(),
        }

    def merge_state(self, state: Mapping[str, Any]) -> None:
        self.production.merge_state(state["production"])
        self.candidate.merge_state(state["candidate"])
        self.pair_production_ttft.merge(LogHistogram.from_state(state["pair_production_ttft"]))
        self.pair_candidate_ttft.merge(LogHistogram.from_state(state["pair_candidate_ttft"]))
