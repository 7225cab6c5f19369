"""The OpenAI-compatible stand-in LLM, checked over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from shadowproxy.models import (
    AGREE_COSINE,
    DIFFER_COSINE,
    VOCABULARY,
    OpenAIBehaviour,
    openai_differs,
    openai_embedding,
    openai_text,
    start_openai_model,
)
from tests.helpers import start_model_process

CHAT = "/v1/chat/completions"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
        return r.status, orjson.loads(await r.read())


async def timed_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[tuple[float, Any]]:
    """Each SSE event's data (parsed, or the raw `[DONE]`) with its arrival time after the request."""
    started = time.monotonic()
    events: list[tuple[float, Any]] = []
    async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append((time.monotonic() - started, data.decode() if data == b"[DONE]" else orjson.loads(data)))
    return events


def reference_text(prompt: str, index: int = 0) -> str:
    """The documented derivation, computed independently: a blake2b share sets the length (4-19
    words), one byte of a 64-byte digest picks each word."""
    data = f"{index}\x00{prompt}".encode()
    share = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"sp-llm-length").digest(), "big") / 2**64
    length = 4 + int(share * 16)
    digest = hashlib.blake2b(data, digest_size=64, person=b"sp-llm-words").digest()
    return " ".join(VOCABULARY[b % 64] for b in digest[:length])


async def test_production_answers_the_documented_text_with_usage_in_words(session: aiohttp.ClientSession) -> None:
    async with await start_openai_model(OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=0)) as llm:
        for i in range(20):
            prompt = f"tell me something, number {i}"
            status, answer = await post(session, llm.url + CHAT, {"messages": [{"role": "user", "content": prompt}]})
            assert status == 200
            text = answer["choices"][0]["message"]["content"]
            assert text == reference_text(prompt)
            assert answer["usage"] == {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(text.split()),
                "total_tokens": len(prompt.split()) + len(text.split()),
            }
            assert answer["model"] == "stand-in-llm"  # none asked for: the behaviour's


async def test_candidate_differs_exactly_on_the_hash_chosen_share(session: aiohttp.ClientSession) -> None:
    behaviour = OpenAIBehaviour.candidate(first_token_ms=0, inter_token_ms=0, differ_rate=0.25)
    prompts = [f"prompt {i}" for i in range(200)]
    async with await start_openai_model(behaviour) as llm:
        answers = await asyncio.gather(*(
            post(session, llm.url + "/v1/completions", {"model": "x", "prompt": p}) for p in prompts
        ))
    for prompt, (status, answer) in zip(prompts, answers, strict=True):
        text = answer["choices"][0]["text"]
        production = reference_text(prompt)
        assert status == 200 and (text != production) == openai_differs(prompt, 0.25)
        assert len(text.split()) == len(production.split())  # same length: only words change
    differing = sum(openai_differs(p, 0.25) for p in prompts)
    assert 30 <= differing <= 70  # 25% of 200, well within binomial bounds


async def test_streams_send_the_role_at_once_and_tokens_on_the_documented_schedule(
    session: aiohttp.ClientSession,
) -> None:
    behaviour = OpenAIBehaviour.candidate(first_token_ms=150, inter_token_ms=30)
    async with await start_openai_model(behaviour) as llm:
        prompt = "a prompt long enough"
        body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "stream": True}
        events = await timed_events(session, llm.url + CHAT, body)
    assert events[-1][1] == "[DONE]"
    chunks = [data for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [(t, c) for t, c in events[:-1] if c["choices"][0]["delta"].get("content")]
    text = openai_text(prompt, behaviour.differ_rate)
    assert "".join(c["choices"][0]["delta"]["content"] for _, c in content) == text
    assert len(content) == len(text.split())  # one token per event
    assert events[0][0] < 0.1  # the role event does not wait for the first token
    assert content[0][0] >= 0.15
    # Token k is due 150 + 30 k ms after the request; a busy machine only delays.
    for k, (t, _) in enumerate(content):
        assert t >= 0.15 + 0.03 * k - 0.002
    assert content[-1][0] < 0.15 + 0.03 * len(content) + 1.0
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]  # not asked for


async def test_a_stand_in_that_fell_behind_catches_up_one_gap_at_a_time(session: aiohttp.ClientSession) -> None:
    behaviour = OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=30)
    prompt = "a prompt whose answer is long enough to stall in"
    assert len(openai_text(prompt).split()) >= 6
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "stream": True}
    arrivals: list[float] = []
    async with await start_openai_model(behaviour) as llm, session.post(llm.url + CHAT, data=orjson.dumps(body)) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.monotonic())
                if len(arrivals) == 1:
                    time.sleep(0.2)  # the whole loop, the stand-in's too, stalls past several due tokens
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == len(openai_text(prompt).split()) - 1
    assert gaps[0] >= 0.2
    # No burst of overdue tokens: each later one still leaves its inter-token gap.
    assert min(gaps[1:]) >= 0.03 - 0.005, gaps


async def test_stream_usage_event_comes_last_when_asked(session: aiohttp.ClientSession) -> None:
    async with await start_openai_model(OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=0)) as llm:
        body = {"prompt": ["one", "two"], "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        events = await timed_events(session, llm.url + "/v1/completions", body)
    chunks = [data for _, data in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    texts = {i: "" for i in range(4)}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
    prompts = enumerate(["one", "two"])
    assert texts == {p * 2 + i: openai_text(prompt, index=i) for p, prompt in prompts for i in range(2)}
    completion = sum(len(t.split()) for t in texts.values())
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": completion, "total_tokens": 2 + completion}


async def test_unstreamed_answer_comes_when_its_last_token_would(session: aiohttp.ClientSession) -> None:
    behaviour = OpenAIBehaviour.production(first_token_ms=100, inter_token_ms=20)
    async with await start_openai_model(behaviour) as llm:
        started = time.monotonic()
        status, answer = await post(session, llm.url + "/v1/completions", {"prompt": "how long"})
        elapsed = time.monotonic() - started
    tokens = answer["usage"]["completion_tokens"]
    assert status == 200 and tokens == len(openai_text("how long").split())
    assert elapsed >= 0.1 + 0.02 * (tokens - 1) - 0.002


async def test_max_tokens_cuts_the_text_and_finishes_with_length(session: aiohttp.ClientSession) -> None:
    async with await start_openai_model(OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=0)) as llm:
        prompt = next(f"p{i}" for i in range(100) if len(openai_text(f"p{i}").split()) > 6)
        status, answer = await post(session, llm.url + CHAT, {
            "messages": [{"role": "user", "content": prompt}], "max_completion_tokens": 3,
        })
    choice = answer["choices"][0]
    assert status == 200 and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == " ".join(openai_text(prompt).split()[:3])
    assert answer["usage"]["completion_tokens"] == 3


async def test_tool_is_called_only_when_offered_and_asked_for(session: aiohttp.ClientSession) -> None:
    tools = [{"type": "function", "function": {"name": "first"}}, {"type": "function", "function": {"name": "second"}}]
    async with await start_openai_model(OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=0)) as llm:
        url = llm.url + CHAT

        async def ask(content: str, **extra: Any) -> dict[str, Any]:
            status, answer = await post(session, url, {"messages": [{"role": "user", "content": content}], **extra})
            assert status == 200
            choice: dict[str, Any] = answer["choices"][0]
            return choice

        asked = await ask("Use a tool, please.", tools=tools)
        assert asked["finish_reason"] == "tool_calls"
        (call,) = asked["message"]["tool_calls"]
        assert call["function"]["name"] == "first"
        query = " ".join(openai_text("Use a tool, please.").split()[:4])
        assert orjson.loads(call["function"]["arguments"]) == {"query": query, "words": 4}
        assert (await ask("No tools offered here", tools=tools, tool_choice="none"))["finish_reason"] == "stop"
        assert (await ask("just chat", tools=tools))["finish_reason"] == "stop"
        assert (await ask("Use a tool"))["finish_reason"] == "stop"  # none offered
        named = await ask("just chat", tools=tools, tool_choice={"type": "function", "function": {"name": "second"}})
        assert named["message"]["tool_calls"][0]["function"]["name"] == "second"


async def test_embeddings_are_unit_vectors_tilted_by_the_designed_cosine(session: aiohttp.ClientSession) -> None:
    texts = [f"text {i}" for i in range(100)]
    async with (
        await start_openai_model(OpenAIBehaviour.production(first_token_ms=0)) as production,
        await start_openai_model(OpenAIBehaviour.candidate(first_token_ms=0)) as candidate,
    ):
        _, prod = await post(session, production.url + "/v1/embeddings", {"input": texts, "dimensions": 32})
        _, cand = await post(session, candidate.url + "/v1/embeddings", {"input": texts, "dimensions": 32})
    assert prod["usage"] == {"prompt_tokens": 200, "total_tokens": 200}
    for text, p, c in zip(texts, prod["data"], cand["data"], strict=True):
        a, b = np.asarray(p["embedding"]), np.asarray(c["embedding"])
        assert a.shape == (32,) and abs(np.linalg.norm(a) - 1.0) < 1e-6
        cosine = float(a @ b / np.linalg.norm(b))
        designed = DIFFER_COSINE if openai_differs(text, 0.1) else AGREE_COSINE
        assert abs(cosine - designed) < 1e-5
        assert p["embedding"] == openai_embedding(text, dimensions=32)
    assert any(openai_differs(t, 0.1) for t in texts) and not all(openai_differs(t, 0.1) for t in texts)


async def test_answers_are_byte_identical_for_identical_requests_and_under_any_prefix(
    session: aiohttp.ClientSession,
) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "same"}]})
    async with await start_openai_model(OpenAIBehaviour.production(first_token_ms=0, inter_token_ms=0)) as llm:
        answers = []
        for path in (CHAT, CHAT, "/openai/v1/chat/completions"):
            async with session.post(llm.url + path, data=body) as r:
                answers.append(await r.read())
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (CHAT, b"not json", 400, "body is not valid JSON"),
        (CHAT, b'{"messages": []}', 400, "messages: must be a non-empty list"),
        ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n: must be an integer between 1 and 16"),
        ("/v1/embeddings", b'{"input": "x", "encoding_format": "hex"}', 400, "encoding_format"),
        ("/v1/unknown", b"{}", 404, "no such endpoint"),
    ],
)
async def test_bad_requests_get_an_openai_error_object(
    session: aiohttp.ClientSession, path: str, body: bytes, status: int, message: str
) -> None:
    async with (
        await start_openai_model(OpenAIBehaviour.production()) as llm,
        session.post(llm.url + path, data=body) as r,
    ):
        assert r.status == status
        error = orjson.loads(await r.read())["error"]
    assert message in error["message"] and error["type"]


async def test_error_rate_answers_that_share_of_bodies_500(session: aiohttp.ClientSession) -> None:
    async with await start_openai_model(OpenAIBehaviour.production(error_rate=1.0)) as llm:
        status, answer = await post(session, llm.url + "/v1/completions", {"prompt": "x"})
    assert status == 500 and answer["error"]["type"] == "server_error"


async def test_command_line_serves_the_candidate_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    proc, url = await start_model_process("--protocol", "openai", "--role", "candidate", "--first-token-ms", "0",
                                          "--differ-rate", "1")
    try:
        prompt = "always different"
        status, answer = await post(session, url + "/v1/completions", {"prompt": prompt})
        assert status == 200
        assert answer["choices"][0]["text"] == openai_text(prompt, 1.0) != openai_text(prompt)
        assert answer["system_fingerprint"] == "fp_candidate"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_command_line_rejects_a_bad_rate_with_exit_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy.models", "--protocol", "openai", "--differ-rate", "2",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "SHADOWPROXY_PURE_PYTHON": "1"},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert "differ_rate: must be between 0 and 1, got 2.0" in err.decode()

