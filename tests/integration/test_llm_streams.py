"""Streamed LLM answers through a real proxy (`compare.preset = "openai"`) from real streaming
upstreams: the client gets production's events unchanged and as they are sent, the candidate's
stream is read to its end beside it, and the llm figures equal what the known delays and token
counts give.

Timing tolerances: the proxy reads times when an event arrives, which is after the upstream wrote
it and before the client read it, so each figure is bracketed by what the upstream and the client
saw; the stats report a histogram bucket within 1% of the value; and a busy machine adds jitter
to every turn of the event loop, allowed for by `JITTER`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.commands.report import collect, render
from shadowproxy.judging.stats import ShadowStats
from tests.helpers import RunningProxy, SSEUpstream

JITTER = 0.05  # seconds a busy event loop may add between a write and its read
REL = 0.01  # the log-bucket histograms' relative error
WORDS = ["The", " proxy", " mirrors", " every", " token", "."]
USAGE = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
PRICE = {"input": 3.0, "output": 15.0}
CHAT = "/v1/chat/completions"


def event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def chat_events(
    ttft: float, gap: float, words: list[str] = WORDS, *, usage: dict[str, int] | None = USAGE, done: bool = True
) -> list[tuple[float, bytes]]:
    """A chat stream: a role-only chunk at once, the first word after `ttft`, one word per `gap`,
    the finish reason, usage when given, then [DONE]."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return event({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [(0.0, chunk({"role": "assistant", "content": ""}))]
    events += [(ttft if i == 0 else gap, chunk({"content": w})) for i, w in enumerate(words)]
    events.append((0.0, chunk({}, "stop")))
    if usage is not None:
        events.append((0.0, event({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage})))
    if done:
        events.append((0.0, b"data: [DONE]\n\n"))
    return events


FIRST_WORD = 1  # index of the first event with output in chat_events


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[list[tuple[float, bytes]]], Awaitable[SSEUpstream]]]:
    started: list[SSEUpstream] = []

    async def start(events: list[tuple[float, bytes]]) -> SSEUpstream:
        server = await SSEUpstream(events).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def openai_proxy(
    start_proxy: Callable[..., Awaitable[RunningProxy]], prod: SSEUpstream, cand: SSEUpstream, **sections: Any
) -> RunningProxy:
    config: dict[str, dict[str, Any]] = {
        "compare": {"preset": "openai"},
        "mirror": {"sample_rate": 1.0},
        "production": {"price": PRICE},
        "candidate": {"price": PRICE},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return await start_proxy(prod.url, cand.url, **config)


class Received:
    """What a client read of a streamed answer, and when."""

    def __init__(self) -> None:
        self.body = b""
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes received so far)
        self.started = 0.0

    def time_of(self, size: int) -> float:
        """When the client had received the first `size` bytes."""
        return next(t for t, n in self.arrivals if n >= size)


async def stream(proxy: RunningProxy, path: str = CHAT) -> Received:
    got = Received()
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
               "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        got.started = time.perf_counter()
        async with session.post(proxy.url + path, json=request) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            async for data in response.content.iter_any():
                got.body += data
                got.arrivals.append((time.perf_counter(), len(got.body)))
    return got


def event_ends(upstream: SSEUpstream) -> list[int]:
    """The byte offset at which each event is complete."""
    ends, total = [], 0
    for _, data in upstream.events:
        total += len(data)
        ends.append(total)
    return ends


def within(reported: float, low: float, high: float) -> bool:
    """A value the histogram reports for a true value known to lie in [low, high]."""
    return low * (1 - REL) <= reported <= high * (1 + REL)


def metric_samples(proxy: RunningProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(proxy.proxy.metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def settled(proxy: RunningProxy) -> dict[str, Any]:
    await proxy.settle(timeout=10.0)
    return proxy.stats()


# --- production's events pass through ----------------------------------------------------------------


async def test_client_gets_production_events_unchanged_as_production_sends_them(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.2, gap=0.3))
    cand = await upstreams(chat_events(ttft=0.2, gap=0.3))
    proxy = await openai_proxy(start_proxy, prod, cand)
    got = await stream(proxy)
    assert got.body == prod.body  # byte-identical
    sent = prod.sent[0]
    ends = event_ends(prod)
    # Event 1 was with the client before production wrote event 2: nothing was held back.
    assert got.time_of(ends[FIRST_WORD]) < sent[FIRST_WORD + 1]
    for i, end in enumerate(ends):
        assert got.time_of(end) - sent[i] < JITTER, f"event {i} arrived late"
    stats = await settled(proxy)
    assert stats["comparisons"]["agree"] == 1


async def test_non_openai_paths_stream_through_uncounted(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0))
    proxy = await openai_proxy(start_proxy, prod, await upstreams(chat_events(ttft=0.0, gap=0.0)))
    got = await stream(proxy, "/v1/responses")
    assert got.body == prod.body
    stats = await settled(proxy)
    assert stats["llm"]["production"]["answers"] == 0
    assert stats["llm"]["production"]["ttft_ms"]["p50"] == 0.0
    assert stats["mirror"]["skipped"] == 1


# --- the figures ---------------------------------------------------------------------------------------


async def test_llm_figures_equal_the_known_delays_and_token_counts(start_proxy, upstreams) -> None:
    gap = 0.15
    prod = await upstreams(chat_events(ttft=0.2, gap=gap))
    cand = await upstreams(chat_events(ttft=0.45, gap=gap))
    proxy = await openai_proxy(start_proxy, prod, cand)
    got = await stream(proxy)
    stats = await settled(proxy)
    llm = stats["llm"]
    for name, upstream in (("production", prod), ("candidate", cand)):
        figures = llm[name]
        assert (figures["answers"], figures["streams"], figures["errors"]) == (1, 1, 0), name
        sent = upstream.sent[0]
        words = sent[FIRST_WORD : FIRST_WORD + len(WORDS)]
        # Time to first token: the proxy sent the request before the model got it, and read the
        # first word after the model wrote it (production's: before the client read it; the
        # candidate's: within the jitter), and the client had sent its request before all that.
        low = words[0] - upstream.arrived[0]
        read = got.time_of(event_ends(prod)[FIRST_WORD]) if name == "production" else words[0] + JITTER
        high = read - got.started
        assert within(figures["ttft_ms"]["p50"] / 1000, low, high), (name, figures["ttft_ms"], low, high)
        # Five gaps between the six words, each what the model waited, give or take the jitter.
        gaps = [b - a for a, b in zip(words, words[1:], strict=False)]
        assert within(figures["inter_token_ms"]["p50"] / 1000, min(gaps) - JITTER, max(gaps) + JITTER)
        # (tokens - 1) / (last - first output): the span as the model wrote it, give or take the jitter.
        span = words[-1] - words[0]
        tokens = USAGE["completion_tokens"] - 1
        assert within(figures["tokens_per_s"]["p50"], tokens / (span + JITTER), tokens / (span - JITTER))
        assert figures["output_tokens"] == {"total": USAGE["completion_tokens"], "estimated": 0}
        assert figures["finish_reasons"] == {"stop": 1, "length": 0, "tool_calls": 0, "content_filter": 0, "other": 0}
        cost = (USAGE["prompt_tokens"] * PRICE["input"] + USAGE["completion_tokens"] * PRICE["output"]) / 1e6
        assert figures["cost_usd"]["total"] == pytest.approx(cost, rel=1e-12)
        assert figures["cost_usd"]["per_request"] == pytest.approx(cost, rel=1e-12)
    pairs = llm["candidate"]["pairs"]
    assert pairs["streamed"] == 1
    assert pairs["production_ttft_ms"]["p50"] == llm["production"]["ttft_ms"]["p50"]
    assert pairs["candidate_ttft_ms"]["p50"] == llm["candidate"]["ttft_ms"]["p50"]
    assert pairs["similarity"]["count"] == 1 and pairs["similarity"]["mean"] == 1.0
    samples = metric_samples(proxy)
    for target in ("production", "candidate"):
        label = (("target", target),)
        assert samples[("shadowproxy_time_to_first_token_seconds_count", label)] == 1
        assert samples[("shadowproxy_inter_token_latency_seconds_count", label)] == len(WORDS) - 1
        assert samples[("shadowproxy_output_tokens_total", label)] == USAGE["completion_tokens"]
        assert samples[("shadowproxy_llm_finish_reasons_total", (("reason", "stop"), ("target", target)))] == 1
        assert samples[("shadowproxy_llm_cost_usd_total", label)] == pytest.approx(cost, rel=1e-12)


async def test_production_figures_cover_answers_that_were_not_mirrored(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.05, gap=0.01, usage=None))
    cand = await upstreams(chat_events(ttft=0.05, gap=0.01))
    proxy = await openai_proxy(start_proxy, prod, cand, mirror={"sample_rate": 0.0})
    for _ in range(3):
        assert (await stream(proxy)).body == prod.body
    stats = await settled(proxy)
    assert stats["llm"]["production"]["answers"] == 3
    # No usage in the stream: the words are counted, and marked as estimated.
    assert stats["llm"]["production"]["output_tokens"] == {"total": 3 * len(WORDS), "estimated": 3 * len(WORDS)}
    assert stats["llm"]["candidate"]["answers"] == 0
    assert stats["llm"]["candidate"]["pairs"]["streamed"] == 0
    assert not cand.bodies


# --- ends that are errors ------------------------------------------------------------------------------


async def test_a_stalled_candidate_ends_as_candidate_error_after_stream_timeout(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.05, gap=0.1))
    cand = await upstreams(chat_events(ttft=0.05, gap=0.1))
    cand.stall_after = FIRST_WORD + 2  # two words, then nothing
    proxy = await openai_proxy(start_proxy, prod, cand, candidate={"stream_timeout_s": 1.0, "timeout_s": 0.5})
    started = time.perf_counter()
    got = await stream(proxy)
    # Production is unaffected: every event on time, the whole answer before the candidate gives up.
    assert got.body == prod.body
    for i, end in enumerate(event_ends(prod)):
        assert got.time_of(end) - prod.sent[0][i] < JITTER
    assert time.perf_counter() - started < 1.0
    stats = await settled(proxy)
    # Given up at stream_timeout_s (found by the mirror's deadline sweep), not at timeout_s.
    assert time.perf_counter() - started >= 1.0
    assert stats["comparisons"]["candidate_error"] == 1
    assert stats["mirror"]["error"] == 1
    assert stats["llm"]["candidate"]["errors"] == 1
    assert stats["llm"]["candidate"]["answers"] == 0
    assert stats["llm"]["production"]["answers"] == 1
    assert stats["llm"]["candidate"]["pairs"]["streamed"] == 0
    samples = metric_samples(proxy)
    assert samples[("shadowproxy_upstream_failures_total", (("kind", "timeout"), ("target", "candidate")))] == 1


async def test_a_candidate_stream_silent_for_its_idle_timeout_is_given_up_early(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.05, gap=0.05))
    cand = await upstreams(chat_events(ttft=0.05, gap=0.05))
    cand.stall_after = FIRST_WORD + 2
    proxy = await openai_proxy(
        start_proxy, prod, cand, candidate={"stream_timeout_s": 30.0, "stream_idle_timeout_s": 0.5}
    )
    started = time.perf_counter()
    assert (await stream(proxy)).body == prod.body
    stats = await settled(proxy)
    # Freed after half a second of silence, long before stream_timeout_s.
    assert 0.5 <= time.perf_counter() - started < 5.0
    assert stats["comparisons"]["candidate_error"] == 1
    assert stats["mirror"]["in_flight"] == 0
    samples = metric_samples(proxy)
    assert samples[("shadowproxy_upstream_failures_total", (("kind", "timeout"), ("target", "candidate")))] == 1


async def test_a_slow_candidate_stream_that_keeps_sending_outlives_its_idle_timeout(start_proxy, upstreams) -> None:
    # Over a second in all, an event every 0.2 s: never 0.5 s silent, so it is read to its end.
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0))
    cand = await upstreams(chat_events(ttft=0.1, gap=0.2))
    proxy = await openai_proxy(
        start_proxy, prod, cand, candidate={"stream_timeout_s": 30.0, "stream_idle_timeout_s": 0.5}
    )
    await stream(proxy)
    stats = await settled(proxy)
    assert stats["comparisons"]["agree"] == 1
    assert stats["mirror"]["error"] == 0


async def test_timeout_s_bounds_only_the_first_byte_of_a_candidate_stream(start_proxy, upstreams) -> None:
    # The candidate's stream takes about 1 s in all, twice timeout_s: it is read to its end.
    prod = await upstreams(chat_events(ttft=0.05, gap=0.02))
    cand = await upstreams(chat_events(ttft=0.1, gap=0.2))
    proxy = await openai_proxy(start_proxy, prod, cand, candidate={"timeout_s": 0.5, "stream_timeout_s": 30.0})
    await stream(proxy)
    stats = await settled(proxy)
    assert stats["comparisons"]["agree"] == 1
    assert stats["mirror"]["error"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        b'event: error\ndata: {"message": "overloaded"}\n\n',
        b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
    ],
    ids=["event-type", "error-member"],
)
async def test_a_candidate_error_event_is_candidate_error(start_proxy, upstreams, bad: bytes) -> None:
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0))
    events = chat_events(ttft=0.0, gap=0.0)
    cand = await upstreams([*events[:3], (0.0, bad)])
    proxy = await openai_proxy(start_proxy, prod, cand)
    await stream(proxy)
    stats = await settled(proxy)
    assert stats["comparisons"]["candidate_error"] == 1
    assert stats["llm"]["candidate"]["errors"] == 1
    assert stats["mirror"]["error"] == 0  # the exchange itself went fine


async def test_a_production_stream_without_its_final_event_is_not_compared(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0, done=False))
    cand = await upstreams(chat_events(ttft=0.0, gap=0.0))
    proxy = await openai_proxy(start_proxy, prod, cand)
    got = await stream(proxy)
    assert got.body == prod.body  # the client still gets exactly what production sent
    stats = await settled(proxy)
    assert stats["comparisons"]["unparseable"] == 1
    assert stats["comparisons"]["total"] == 0
    assert stats["llm"]["production"]["errors"] == 1
    assert stats["llm"]["candidate"]["answers"] == 1
    assert stats["llm"]["candidate"]["pairs"]["streamed"] == 0


async def test_streams_beyond_max_response_bytes_are_too_large_and_pass_whole(start_proxy, upstreams) -> None:
    words = [f" word{i}" for i in range(40)]
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0, words=words))
    cand = await upstreams(chat_events(ttft=0.0, gap=0.0, words=words))
    limit = 1000
    assert len(prod.body) > 2 * limit
    proxy = await openai_proxy(start_proxy, prod, cand, compare={"max_response_bytes": limit})
    got = await stream(proxy)
    assert got.body == prod.body
    stats = await settled(proxy)
    assert stats["comparisons"]["too_large"] == 1
    assert stats["llm"]["production"]["too_large"] == 1
    assert stats["llm"]["candidate"]["too_large"] == 1
    assert stats["llm"]["production"]["answers"] == 0
    # The first token came well within the limit: its time still counts.
    assert stats["llm"]["production"]["ttft_ms"]["p50"] > 0


# --- comparing and the gate ----------------------------------------------------------------------------


async def test_streams_that_say_different_things_disagree_with_their_similarity(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.0, gap=0.0, words=["a b c d"]))
    cand = await upstreams(chat_events(ttft=0.0, gap=0.0, words=["a b c e"]))
    proxy = await openai_proxy(start_proxy, prod, cand, compare={"min_similarity": 0.9})
    await stream(proxy)
    stats = await settled(proxy)
    assert stats["comparisons"]["disagree"] == 1
    similarity = stats["llm"]["candidate"]["pairs"]["similarity"]
    assert similarity["count"] == 1
    assert similarity["mean"] == pytest.approx(6 / 7)  # difflib: 2 * 6 matching characters / 14


async def test_ttft_gate_enters_the_verdict_at_min_samples_streamed_pairs(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.02, gap=0.0))
    cand = await upstreams(chat_events(ttft=0.1, gap=0.0))
    proxy = await openai_proxy(start_proxy, prod, cand, gates={"min_samples": 3})

    async def ttft_gate() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/shadow/verdict") as r:
            gates = (await r.json())["gates"]
        found = [g for g in gates if g["name"] == "max_ttft_p99_ratio"]
        return found[0] if found else None

    for _ in range(2):
        await stream(proxy)
    await settled(proxy)
    assert await ttft_gate() is None
    await stream(proxy)
    stats = await settled(proxy)
    gate = await ttft_gate()
    assert gate is not None
    pairs = stats["llm"]["candidate"]["pairs"]
    assert pairs["streamed"] == 3
    assert gate["value"] == pytest.approx(pairs["candidate_ttft_ms"]["p99"] / pairs["production_ttft_ms"]["p99"])
    assert gate["value"] > 2  # the candidate's first token comes five times later
    assert gate["passed"] is None  # three pairs bound no p99 from above
    assert gate["threshold"] == 1.25


async def test_concurrent_streams_each_arrive_whole(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.05, gap=0.02))
    cand = await upstreams(chat_events(ttft=0.05, gap=0.02))
    proxy = await openai_proxy(start_proxy, prod, cand)
    results = await asyncio.gather(*(stream(proxy) for _ in range(20)))
    assert all(r.body == prod.body for r in results)
    stats = await settled(proxy)
    assert stats["llm"]["production"]["answers"] == 20
    assert stats["comparisons"]["agree"] == 20
    assert stats["llm"]["candidate"]["pairs"]["streamed"] == 20


async def test_report_merges_the_llm_figures_of_several_proxies(start_proxy, upstreams) -> None:
    prod = await upstreams(chat_events(ttft=0.02, gap=0.01))
    cand = await upstreams(chat_events(ttft=0.04, gap=0.01))
    proxies = [await openai_proxy(start_proxy, prod, cand) for _ in range(2)]
    for proxy, n in zip(proxies, (2, 3), strict=True):
        for _ in range(n):
            await stream(proxy)
        await settled(proxy)
    report = await collect([p.admin_url for p in proxies])
    merged = report.stats["llm"]
    assert merged["production"]["answers"] == 5
    assert merged["production"]["output_tokens"]["total"] == 5 * USAGE["completion_tokens"]
    assert merged["candidate"]["pairs"]["streamed"] == 5
    # What travelled as JSON through ?full=1 merges to what the in-memory states add up to.
    in_memory = ShadowStats()
    for proxy in proxies:
        in_memory.merge_state(proxy.proxy.stats.to_state())
    assert in_memory.llm.production.ttft.count == 5
    assert merged == in_memory.snapshot()["llm"]
    assert "LLM" in render(report)
