"""The official `openai` SDK through the proxy (`compare.preset = "openai"`, every request mirrored):
what it gets is what it gets from production directly, and the proxy counts the differences the
candidate stand-in was built to make."""

from __future__ import annotations

import asyncio
import difflib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from shadowproxy.models import (
    RunningOpenAIModel,
    chat_prompt,
    openai_choice,
    openai_cosine,
    openai_differs,
    openai_embedding,
    openai_text,
    openai_tool_arguments,
)
from tests.helpers import OPENAI_PROXY, RunningProxy

TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}},
]


@dataclass
class Setup:
    production: RunningOpenAIModel
    candidate: RunningOpenAIModel
    proxy: RunningProxy
    via_proxy: openai.AsyncOpenAI
    direct: openai.AsyncOpenAI

    @property
    def differ_rate(self) -> float:
        return self.candidate.behaviour.differ_rate


@pytest.fixture
async def llm(
    openai_pair: tuple[RunningOpenAIModel, RunningOpenAIModel],
    start_proxy: Callable[..., Awaitable[RunningProxy]],
) -> AsyncIterator[Setup]:
    production, candidate = openai_pair
    proxy = await start_proxy(production.url, candidate.url, **OPENAI_PROXY)
    # No retries: a failed request must fail the test, not be sent twice and counted twice.
    async with (
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="test", max_retries=0, timeout=30.0) as via_proxy,
        openai.AsyncOpenAI(base_url=production.url + "/v1", api_key="test", max_retries=0, timeout=30.0) as direct,
    ):
        yield Setup(production, candidate, proxy, via_proxy, direct)


async def chunks(stream: Any) -> list[dict[str, Any]]:
    return [chunk.model_dump() async for chunk in stream]


def messages(text: str) -> list[Any]:
    return [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": text}]


async def test_chat_answer_through_proxy_equals_production_direct(llm: Setup) -> None:
    request: dict[str, Any] = {"model": "m", "messages": messages("What does a shadow proxy do?"), "n": 2}
    via_proxy = await llm.via_proxy.chat.completions.create(**request)
    direct = await llm.direct.chat.completions.create(**request)
    assert via_proxy.model_dump() == direct.model_dump()
    prompt = chat_prompt(request["messages"])
    texts = [openai_text(prompt, index=i) for i in range(2)]
    assert [c.message.content for c in via_proxy.choices] == texts
    assert [c.finish_reason for c in via_proxy.choices] == ["stop", "stop"]
    assert via_proxy.usage is not None
    assert via_proxy.usage.prompt_tokens == len(prompt.split())
    assert via_proxy.usage.completion_tokens == sum(len(t.split()) for t in texts)


async def test_streamed_chat_events_through_proxy_equal_production_direct(llm: Setup) -> None:
    request: dict[str, Any] = {
        "model": "m", "messages": messages("Stream me a reply"), "stream": True,
        "stream_options": {"include_usage": True},
    }
    via_proxy = await chunks(await llm.via_proxy.chat.completions.create(**request))
    direct = await chunks(await llm.direct.chat.completions.create(**request))
    assert via_proxy == direct
    text = openai_text(chat_prompt(request["messages"]))
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in via_proxy if c["choices"]) == text
    assert [c["choices"][0]["finish_reason"] for c in via_proxy if c["choices"]][-1] == "stop"
    assert via_proxy[-1]["choices"] == []
    assert via_proxy[-1]["usage"]["completion_tokens"] == len(text.split())


async def test_batched_completions_with_n_and_max_tokens_equal_production_direct(llm: Setup) -> None:
    prompts = ["The first prompt", "A second one", "and a third prompt here"]
    request: dict[str, Any] = {"model": "m", "prompt": prompts, "n": 2, "max_tokens": 8}
    via_proxy = await llm.via_proxy.completions.create(**request)
    direct = await llm.direct.completions.create(**request)
    assert via_proxy.model_dump() == direct.model_dump()
    expected = [openai_choice(p, index=i, max_tokens=8) for p in prompts for i in range(2)]
    assert [(c.text, c.finish_reason) for c in sorted(via_proxy.choices, key=lambda c: c.index)] == expected
    assert "length" in {finish for _, finish in expected}  # the cut is exercised


async def test_streamed_completions_through_proxy_equal_production_direct(llm: Setup) -> None:
    request: dict[str, Any] = {"model": "m", "prompt": "Complete this", "stream": True, "max_tokens": 5}
    via_proxy = await chunks(await llm.via_proxy.completions.create(**request))
    direct = await chunks(await llm.direct.completions.create(**request))
    assert via_proxy == direct
    assert "".join(c["choices"][0]["text"] for c in via_proxy) == openai_choice("Complete this", max_tokens=5)[0]


@pytest.mark.parametrize("encoding", ["base64", "float"])
async def test_embeddings_through_proxy_equal_production_direct(llm: Setup, encoding: str) -> None:
    inputs = ["embed me", "and me too", "third"]
    # The SDK asks for base64 unless told otherwise, and decodes it to floats either way.
    extra: dict[str, Any] = {"encoding_format": "float"} if encoding == "float" else {}
    via_proxy = await llm.via_proxy.embeddings.create(model="e", input=inputs, **extra)
    direct = await llm.direct.embeddings.create(model="e", input=inputs, **extra)
    assert via_proxy.model_dump() == direct.model_dump()
    assert [d.embedding for d in via_proxy.data] == [openai_embedding(text) for text in inputs]
    assert via_proxy.usage.prompt_tokens == sum(len(text.split()) for text in inputs)


async def test_tool_calls_through_proxy_equal_production_direct_streamed_and_not(llm: Setup) -> None:
    request: dict[str, Any] = {"model": "m", "messages": messages("Please use a tool for this"), "tools": TOOLS}
    via_proxy = await llm.via_proxy.chat.completions.create(**request)
    direct = await llm.direct.chat.completions.create(**request)
    assert via_proxy.model_dump() == direct.model_dump()
    arguments = openai_tool_arguments(chat_prompt(request["messages"]))
    (call,) = via_proxy.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("lookup", arguments)
    assert via_proxy.choices[0].finish_reason == "tool_calls"

    streamed = await chunks(await llm.via_proxy.chat.completions.create(**request, stream=True))
    assert streamed == await chunks(await llm.direct.chat.completions.create(**request, stream=True))
    deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"]]
    calls = [call for delta in deltas for call in delta["tool_calls"] or []]
    assert calls[0]["function"]["name"] == "lookup"
    assert "".join(call["function"]["arguments"] for call in calls) == arguments


async def test_proxy_counts_as_disagreeing_exactly_the_prompts_the_candidate_answers_differently(llm: Setup) -> None:
    prompts = [f"Question {i}: how is the weather in city {i}?" for i in range(60)]
    differing = [p for p in prompts if openai_differs(p, llm.differ_rate)]
    assert 0 < len(differing) < len(prompts)  # both outcomes occur

    async def ask(prompt: str) -> None:
        await llm.via_proxy.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}])

    await asyncio.gather(*(ask(p) for p in prompts))
    await llm.proxy.settle()
    stats = llm.proxy.stats()
    comparisons = stats["comparisons"]
    assert (comparisons["total"], comparisons["disagree"]) == (len(prompts), len(differing))
    # Similarity as the text kind documents it: difflib's ratio of the two texts.
    ratios = [
        difflib.SequenceMatcher(None, openai_text(p), openai_text(p, llm.differ_rate), autojunk=False).ratio()
        for p in prompts
    ]
    similarity = stats["differences"]["similarity"]
    assert similarity["count"] == len(prompts)
    assert similarity["mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9)


async def test_embeddings_disagree_exactly_where_the_candidate_tilts_them_beyond_min_cosine(llm: Setup) -> None:
    inputs = [f"sentence number {i}" for i in range(80)]
    expected = [openai_cosine(text, llm.differ_rate) for text in inputs]
    assert 0.0 < sum(c < 0.99 for c in expected) < len(inputs)
    await llm.via_proxy.embeddings.create(model="e", input=inputs)
    await llm.proxy.settle()
    stats = llm.proxy.stats()
    assert stats["comparisons"]["total"] == len(inputs)
    assert stats["comparisons"]["disagree"] == sum(c < 0.99 for c in expected)  # min_cosine's default
    cosine = stats["differences"]["cosine"]
    assert cosine["count"] == len(inputs)
    # float32 vectors: their cosine is the designed one to about 1e-7.
    assert math.isclose(cosine["mean"], sum(expected) / len(expected), abs_tol=1e-5)


async def test_tool_calls_agree_exactly_where_the_candidates_arguments_are_production_s(llm: Setup) -> None:
    prompts = [f"Call the tool for order {i}" for i in range(40)]
    same = [p for p in prompts if openai_tool_arguments(p) == openai_tool_arguments(p, llm.differ_rate)]
    assert 0 < len(same) < len(prompts)

    async def ask(prompt: str) -> None:
        await llm.via_proxy.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], tools=TOOLS
        )

    await asyncio.gather(*(ask(p) for p in prompts))
    await llm.proxy.settle()
    comparisons = llm.proxy.stats()["comparisons"]
    assert comparisons["tool_calls"] == {"compared": len(prompts), "agree": len(same)}
    assert comparisons["disagree"] == len(prompts) - len(same)


async def test_streamed_answers_are_compared_choice_by_choice_like_whole_ones(llm: Setup) -> None:
    prompts = [f"Stream question {i} about tail latency" for i in range(30)]
    batch = [f"Batched prompt {i}" for i in range(6)]

    async def ask(prompt: str) -> None:
        stream = await llm.via_proxy.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for _ in stream:
            pass

    await asyncio.gather(*(ask(p) for p in prompts))
    stream = await llm.via_proxy.completions.create(model="m", prompt=batch, n=2, stream=True)
    async for _ in stream:
        pass
    await llm.proxy.settle()
    comparisons = llm.proxy.stats()["comparisons"]
    differing = sum(openai_differs(p, llm.differ_rate) for p in prompts) + 2 * sum(
        openai_differs(p, llm.differ_rate) for p in batch
    )
    assert differing > 0
    assert comparisons["unparseable"] == 0
    assert (comparisons["total"], comparisons["disagree"]) == (len(prompts) + 2 * len(batch), differing)


async def test_streamed_tool_calls_agree_where_the_arguments_are_the_same(llm: Setup) -> None:
    prompts = [f"Use the tool on ticket {i}" for i in range(30)]
    same = sum(openai_tool_arguments(p) == openai_tool_arguments(p, llm.differ_rate) for p in prompts)
    assert 0 < same < len(prompts)

    async def ask(prompt: str) -> None:
        stream = await llm.via_proxy.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], tools=TOOLS, stream=True
        )
        async for _ in stream:
            pass

    await asyncio.gather(*(ask(p) for p in prompts))
    await llm.proxy.settle()
    assert llm.proxy.stats()["comparisons"]["tool_calls"] == {"compared": len(prompts), "agree": same}


@pytest.mark.usefixtures("frozen_heap")
async def test_llm_figures_are_the_stand_ins_known_tokens_finish_reasons_and_delays(llm: Setup) -> None:
    with_usage = [f"Count my tokens {i}" for i in range(8)]
    without_usage = [f"Estimate my tokens {i}" for i in range(8)]
    whole = [f"Answer me whole {i}" for i in range(4)]
    cut = "Cut this answer short"
    tool = "Use a tool to find the answer"
    assert len(openai_text(cut).split()) > 4  # so max_tokens=4 does cut it

    async def stream(prompt: str, **extra: Any) -> None:
        answer = await llm.via_proxy.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True, **extra
        )
        async for _ in answer:
            pass

    async def ask(prompt: str, **extra: Any) -> None:
        await llm.via_proxy.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], **extra)

    await asyncio.gather(
        *(stream(p, stream_options={"include_usage": True}) for p in with_usage),
        *(stream(p) for p in without_usage),
        *(ask(p) for p in whole),
        ask(cut, max_tokens=4),
        ask(tool, tools=TOOLS),
    )
    await llm.proxy.settle()
    figures = llm.proxy.stats()["llm"]
    streamed = with_usage + without_usage
    answered = streamed + whole
    for side, rate, first_token_ms in (
        ("production", 0.0, llm.production.behaviour.first_token_ms),
        ("candidate", llm.differ_rate, llm.candidate.behaviour.first_token_ms),
    ):
        block = figures[side]
        assert (block["answers"], block["streams"], block["errors"]) == (len(answered) + 2, len(streamed), 0)
        tokens = sum(len(openai_text(p, rate).split()) for p in answered) + 4
        tokens += len(openai_tool_arguments(tool, rate).split())
        assert block["output_tokens"] == {
            "total": tokens,
            # A stream without a usage event is counted by its content events: one per word here.
            "estimated": sum(len(openai_text(p, rate).split()) for p in without_usage),
        }
        assert block["finish_reasons"] == {"stop": len(answered), "length": 1, "tool_calls": 1,
                                           "content_filter": 0, "other": 0}
        # Time to first token: the stand-in's delay, measured through real sockets on a busy
        # machine (later, never earlier, beyond the histogram's bucket width).
        ttft = block["ttft_ms"]
        assert first_token_ms * 0.97 <= ttft["p50"] <= first_token_ms + 150.0
        assert 10.0 * 0.97 <= block["inter_token_ms"]["p50"] <= 10.0 + 50.0
        assert 50.0 <= block["tokens_per_s"]["p50"] <= 100.0 * 1.05  # one token per 10 ms at most
    pairs = figures["candidate"]["pairs"]
    assert pairs["streamed"] == len(streamed)
    assert pairs["candidate_ttft_ms"]["p50"] >= pairs["production_ttft_ms"]["p50"] + 20.0  # 80 ms against 50


async def test_cost_per_request_is_the_priced_usage_of_the_answers(
    openai_pair: tuple[RunningOpenAIModel, RunningOpenAIModel],
    start_proxy: Callable[..., Awaitable[RunningProxy]],
) -> None:
    production, candidate = openai_pair
    proxy = await start_proxy(
        production.url, candidate.url, **OPENAI_PROXY,
        production={"price": {"input": 2.5, "output": 10.0}}, candidate={"price": {"input": 0.5, "output": 1.5}},
    )
    prompts = [f"Price this answer {i}" for i in range(10)]
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="test", max_retries=0) as client:
        for prompt in prompts[:5]:
            await client.completions.create(model="m", prompt=prompt)
        for prompt in prompts[5:]:
            answer = await client.completions.create(
                model="m", prompt=prompt, stream=True, stream_options={"include_usage": True}
            )
            async for _ in answer:
                pass
    await proxy.settle()
    figures = proxy.stats()["llm"]
    prompt_tokens = sum(len(p.split()) for p in prompts)
    for side, rate, (price_in, price_out) in (("production", 0.0, (2.5, 10.0)), ("candidate", 0.1, (0.5, 1.5))):
        completion_tokens = sum(len(openai_text(p, rate).split()) for p in prompts)
        total = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
        assert figures[side]["cost_usd"]["total"] == pytest.approx(total, rel=1e-9)
        assert figures[side]["cost_usd"]["per_request"] == pytest.approx(total / len(prompts), rel=1e-9)
        assert figures[side]["output_tokens"] == {"total": completion_tokens, "estimated": 0}
