"""LLM answers as they pass (``compare.preset = "openai"``): each upstream's figures for the
``"llm"`` block of ``/shadow/stats`` (judging/llmstats.py) and the metrics.

An ``LlmMeter`` per upstream; an ``LlmWatch`` per answer to a chat, completions or embeddings
request. A streamed answer (``text/event-stream``) is fed to a ``StreamAssembler`` piece by piece
after the piece has been handed on, so nothing is held back: the time to first token is taken
when the first event with output arrives (from the moment the request was sent upstream), and
the gap before every later one. The rest (output tokens, finish reasons, tokens per second,
cost), and the reading of a whole JSON answer, wait for a callback of their own once the answer
is complete (``LlmWatch.record``), as a mirrored pair's judgement does.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import orjson

from shadowproxy.config import Price
from shadowproxy.judging.llmstats import LlmFigures, estimate_tokens
from shadowproxy.judging.openai import Unparsed, extract_openai, extract_usage
from shadowproxy.judging.presets import PresetError
from shadowproxy.judging.sse import StreamAssembler, normalise_finish_reason
from shadowproxy.shadow.hotmetrics import PlainCount, PlainHistogramChild
from shadowproxy.shadow.metrics import Metrics

log = logging.getLogger("shadowproxy.shadow.llm")
_perf_counter: Final = time.perf_counter

EVENT_STREAM: Final = b"text/event-stream"


def is_event_stream(headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> bool:
    """Whether an answer's Content-Type is ``text/event-stream`` (parameters allowed)."""
    for (_, value), lname in zip(headers, lnames):  # noqa: B905  plain zip compiles to a loop; equal lengths
        if lname == b"content-type":
            return value.lstrip().lower().startswith(EVENT_STREAM)
    return False


class LlmMeter:
    """One upstream's LLM accounting: its figures in the stats and its metric children."""

    __slots__ = ("target", "figures", "price", "limit", "ttft", "gaps", "tokens", "cost", "finish")

    def __init__(self, target: str, figures: LlmFigures, metrics: Metrics, price: Price | None, limit: int) -> None:
        self.target = target
        self.figures = figures
        self.price = price
        self.limit = limit  # compare.max_response_bytes: a stream beyond it is too_large
        self.ttft: PlainHistogramChild = metrics.ttft_by_target[target]
        self.gaps: PlainHistogramChild = metrics.inter_token_by_target[target]
        self.tokens: PlainCount = metrics.output_tokens_by_target[target]
        self.cost: PlainCount = metrics.llm_cost_by_target[target]
        self.finish = metrics.finish_reasons_by_target[target]

    def watch(self, endpoint: str, t_sent: float, stream: bool) -> LlmWatch:
        """An answer's watch; ``t_sent``: ``perf_counter()`` when its request went upstream."""
        return LlmWatch(self, endpoint, t_sent, StreamAssembler(self.limit) if stream else None)

    def first_token(self, seconds: float) -> None:
        self.figures.ttft.record(seconds)
        self.ttft.observe(seconds)

    def gap(self, seconds: float) -> None:
        self.figures.inter_token.record(seconds)
        self.gaps.observe(seconds)

    def _record(
        self,
        streamed: bool,
        output_tokens: int,
        estimated: bool,
        prompt_tokens: int | None,
        reasons: list[str],
        tokens_per_s: float | None,
    ) -> None:
        price = self.price
        cost = price.cost_usd(prompt_tokens or 0, output_tokens) if price is not None else None
        self.figures.record_answer(streamed, output_tokens, estimated, reasons, cost, tokens_per_s)
        self.tokens.inc(output_tokens)
        if cost is not None:
            self.cost.inc(cost)
        finish = self.finish
        for reason in reasons:
            finish[reason].inc()

    def stream_done(self, asm: StreamAssembler) -> None:
        """A stream ended (``asm.end()`` or ``asm.fail()`` called)."""
        figures = self.figures
        if asm.too_large:
            figures.too_large += 1
            return
        if not asm.complete:
            figures.errors += 1
            return
        tokens = asm.usage_tokens("completion_tokens")
        estimated = tokens is None
        output = asm.deltas if tokens is None else tokens
        span = asm.last_at - asm.first_at
        rate = (output - 1) / span if output >= 2 and span > 0 else None
        reasons = [normalise_finish_reason(r) for r in asm.finish_reasons()]
        self._record(True, output, estimated, asm.usage_tokens("prompt_tokens"), reasons, rate)

    def answer_done(self, endpoint: str, body: bytes | None) -> None:
        """A whole (not streamed) 2xx answer; ``body`` None when it was past the size limit."""
        if body is None:
            self.figures.too_large += 1
            return
        try:
            doc = orjson.loads(body)
            choices = extract_openai(doc, endpoint)
        except (orjson.JSONDecodeError, PresetError, ValueError, TypeError, RecursionError):
            self.figures.errors += 1
            return
        prompt, completion = extract_usage(doc)
        reasons: list[str] = []
        chars = 0
        for choice in choices:
            if choice.finish_reason:
                reasons.append(normalise_finish_reason(choice.finish_reason))
            chars += len(choice.text)
            for name, arguments in choice.tool_calls:
                chars += len(name) + len(
                    arguments.text if isinstance(arguments, Unparsed) else orjson.dumps(arguments)
                )
        estimated = completion is None and endpoint != "embeddings"
        if completion is None:
            # Embeddings produce no tokens; a text answer without usage is estimated from its length.
            completion = estimate_tokens(chars) if estimated else 0
        self._record(False, completion, estimated, prompt, reasons, None)


class LlmWatch:
    """One answer on its way: ``feed`` each piece of its body after handing it on; when the
    answer is complete, ``finish`` at once and ``record`` in a callback of its own (or ``fail``
    when the exchange broke off)."""

    __slots__ = ("meter", "endpoint", "asm", "t_sent", "ttft", "ended")

    def __init__(self, meter: LlmMeter, endpoint: str, t_sent: float, asm: StreamAssembler | None) -> None:
        self.meter = meter
        self.endpoint = endpoint
        self.asm = asm  # None: a whole JSON answer, read at the end
        self.t_sent = t_sent
        self.ttft = 0.0  # seconds to the first event with output; 0.0 while none came
        self.ended = False

    @property
    def streamed(self) -> bool:
        return self.asm is not None

    def feed(self, data: bytes) -> None:
        asm = self.asm
        if asm is None:
            return
        last = asm.last_at
        now = _perf_counter()
        try:
            new = asm.feed(data, now)
        except Exception:  # a bug in the parser must never break the answer passing through
            log.exception("reading an event stream failed")
            asm.fail("the stream could not be read")
            return
        if not new:
            return
        meter = self.meter
        if last == 0.0:
            self.ttft = now - self.t_sent
            meter.first_token(self.ttft)
        else:
            meter.gap(now - last)
        # Several events in one piece arrived together: no time passed between them here.
        for _ in range(new - 1):
            meter.gap(0.0)

    def finish(self) -> None:
        """The answer is complete: a stream is whole or in error from here on (cheap: no figures)."""
        if self.ended:
            return
        self.ended = True
        if self.asm is not None:
            self.asm.end()

    def record(self, body: bytes | None) -> None:
        """After ``finish``: the answer's figures; ``body`` (a whole JSON answer) None when past
        the size limit."""
        try:
            asm = self.asm
            if asm is not None:
                self.meter.stream_done(asm)
            else:
                self.meter.answer_done(self.endpoint, body)
        except Exception:  # a bug in the accounting must never break the proxy
            log.exception("LLM accounting failed")

    def fail(self, reason: str) -> None:
        """The exchange broke off before the answer was whole."""
        if self.ended:
            return
        self.ended = True
        if self.asm is not None:
            self.asm.fail(reason)
        self.meter.figures.errors += 1
