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
