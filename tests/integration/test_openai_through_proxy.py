"""The openai preset through a real proxy, with real upstreams answering OpenAI-shaped JSON:
outcomes and figures against what the test computes from the answers it scripted."""

from __future__ import annotations

import base64
import difflib
import math
import struct
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import RunningProxy, Upstream

OPENAI: dict[str, Any] = {"preset": "openai"}
MIRROR_ALL: dict[str, Any] = {"sample_rate": 1.0, "methods": ["POST", "GET"]}


def similarity(a: str, b: str) -> float:
    """The text kind's similarity, from its definition: difflib's ratio of whitespace-normalised texts."""
    return difflib.SequenceMatcher(None, " ".join(a.split()), " ".join(b.split()), autojunk=False).ratio()


def chat_answer(texts: list[str], calls: list[list[tuple[str, str]]] | None = None) -> dict[str, Any]:
    choices = []
    for i, text in enumerate(texts):
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if calls is not None and calls[i]:
            msg["tool_calls"] = [
                {"id": f"c{j}", "type": "function", "function": {"name": name, "arguments": args}}
                for j, (name, args) in enumerate(calls[i])
            ]
        choices.append({"index": i, "message": msg, "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"})
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def question(seen: dict[str, Any]) -> str:
    return str(orjson.loads(seen["body"])["messages"][-1]["content"])


async def post_json(proxy: RunningProxy, path: str, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(proxy.url + path, data=orjson.dumps(body), headers=headers) as r:
        return r.status, await r.read()


async def skipped_metric(proxy: RunningProxy, reason: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    prefix = f'shadowproxy_mirror_skipped_total{{reason="{reason}",target="candidate"}} '
    return float(next(line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)))


# ---------------------------------------------------------------- chat and completions


async def test_chat_answers_compare_as_text_and_the_client_gets_productions_bytes(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: chat_answer([f"The answer to {question(seen)} is 42."])
    # The candidate words every third answer differently.
    candidate_upstream.answer = lambda seen: chat_answer(
        [f"I think {question(seen)} gives 42." if int(question(seen).split()[-1]) % 3 == 0
         else f"The answer to {question(seen)} is 42."]
    )
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    sims = []
    for i in range(30):
        q = f"question {i}"
        body = {"model": "m", "messages": [{"role": "user", "content": q}]}
        status, answer = await post_json(proxy, "/v1/chat/completions", body)
        assert status == 200
        assert answer == orjson.dumps(chat_answer([f"The answer to {q} is 42."]))
        sims.append(similarity(f"The answer to {q} is 42.", f"I think {q} gives 42.") if i % 3 == 0 else 1.0)
    await proxy.settle()
    stats = proxy.stats()
    comparisons = stats["comparisons"]
    assert (comparisons["total"], comparisons["disagree"], comparisons["agree"]) == (30, 10, 20)
    assert comparisons["candidate_error"] == comparisons["unparseable"] == 0
    figure = stats["differences"]["similarity"]
    assert figure["count"] == 30
    assert figure["mean"] == pytest.approx(sum(sims) / 30, abs=1e-9)
    assert comparisons["tool_calls"] == {"compared": 0, "agree": 0}


async def test_min_similarity_lets_close_texts_agree(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    prod_text, cand_text = "The capital of France is Paris.", "The capital of France is Paris!"
    close = similarity(prod_text, cand_text)
    assert 0.9 < close < 1.0
    upstream.answer = lambda seen: chat_answer([prod_text])
    candidate_upstream.answer = lambda seen: chat_answer([cand_text])
    strict = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    lenient = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                                compare={**OPENAI, "min_similarity": close})
    for proxy in (strict, lenient):
        await post_json(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q 1"}]})
        await proxy.settle()
    assert strict.stats()["comparisons"]["disagree"] == 1
    assert lenient.stats()["comparisons"]["agree"] == 1


async def test_completions_with_batched_prompts_and_n_compare_choice_by_choice(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    def answer(seen: dict[str, Any], differ: set[int]) -> dict[str, Any]:
        req = orjson.loads(seen["body"])
        n = req.get("n", 1)
        choices = [
            {"index": p * n + j, "text": f"{prompt} / {j}" + (" (other)" if p * n + j in differ else ""),
             "finish_reason": "length"}
            for p, prompt in enumerate(req["prompt"]) for j in range(n)
        ]
        return {"object": "text_completion", "choices": choices}

    upstream.answer = lambda seen: answer(seen, set())
    candidate_upstream.answer = lambda seen: answer(seen, {1, 4})
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    status, _ = await post_json(proxy, "/v1/completions", {"model": "m", "prompt": ["a", "b", "c"], "n": 2})
    assert status == 200
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["total"], comparisons["agree"], comparisons["disagree"]) == (6, 4, 2)


async def test_a_choice_the_candidate_leaves_out_is_a_disagreement(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: chat_answer(["a", "b", "c"])
    candidate_upstream.answer = lambda seen: chat_answer(["a", "b"])
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    await post_json(proxy, "/openai/v1/chat/completions", {"messages": [{"role": "user", "content": "q 0"}], "n": 3})
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["agree"], comparisons["disagree"], comparisons["candidate_error"]) == (2, 1, 0)


# ---------------------------------------------------------------- tool calls


async def test_tool_calls_agreeing_and_disagreeing_are_counted(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    def prod(seen: dict[str, Any]) -> dict[str, Any]:
        city = question(seen)
        return chat_answer([""], [[("get_weather", orjson.dumps({"city": city, "unit": "C"}).decode())]])

    def cand(seen: dict[str, Any]) -> dict[str, Any]:
        city = question(seen)
        if city == "Oslo":  # same call, arguments spaced and ordered differently: agrees
            return chat_answer([""], [[("get_weather", '{ "unit": "C",  "city": "Oslo" }')]])
        if city == "Rome":  # another function
            return chat_answer([""], [[("get_time", '{"city": "Rome", "unit": "C"}')]])
        if city == "Lima":  # arguments that do not parse
            return chat_answer([""], [[("get_weather", '{"city": "Lima", "unit": ')]])
        return chat_answer(["It is sunny."])  # Kyiv: answers in text, calls nothing

    upstream.answer = prod
    candidate_upstream.answer = cand
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    for city in ("Oslo", "Rome", "Lima", "Kyiv"):
        body = {"messages": [{"role": "user", "content": city}], "tools": [{"type": "function"}]}
        assert (await post_json(proxy, "/v1/chat/completions", body))[0] == 200
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["agree"], comparisons["disagree"]) == (1, 3)
    assert comparisons["tool_calls"] == {"compared": 4, "agree": 1}


# ---------------------------------------------------------------- embeddings


async def test_embeddings_agree_by_cosine_whatever_their_encoding(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    prod_vectors = [[1.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.5, 0.5]]
    cand_vectors = [[1.0, 0.0, 0.0], [4.0, 3.0, 0.0], [0.0, 0.5, 0.25]]
    upstream.answer = lambda seen: {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(prod_vectors)],
    }
    # The candidate answers in base64 (little-endian float32), as asked by encoding_format.
    candidate_upstream.answer = lambda seen: {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": base64.b64encode(struct.pack("<3f", *v)).decode()}
                 for i, v in enumerate(cand_vectors)],
    }
    cosines = [
        sum(a * b for a, b in zip(p, c, strict=True)) / (math.hypot(*p) * math.hypot(*c))
        for p, c in zip(prod_vectors, cand_vectors, strict=True)
    ]  # 1, 24/25, 0.375 / sqrt(0.5 * 0.3125)
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              compare={**OPENAI, "min_cosine": 0.95})
    assert (await post_json(proxy, "/v1/embeddings", {"model": "e", "input": ["a", "b", "c"]}))[0] == 200
    await proxy.settle()
    stats = proxy.stats()
    expected_agree = sum(c >= 0.95 for c in cosines)
    assert (stats["comparisons"]["agree"], stats["comparisons"]["disagree"]) == (expected_agree, 3 - expected_agree)
    assert expected_agree == 2
    assert stats["differences"]["cosine"]["count"] == 3
    assert stats["differences"]["cosine"]["mean"] == pytest.approx(sum(cosines) / 3, abs=1e-9)
    assert stats["differences"]["similarity"]["count"] == 0


# ---------------------------------------------------------------- errors and paths


async def test_candidate_non_2xx_or_unreadable_is_candidate_error_and_production_errors_are_not_compared(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: chat_answer(["ok"])
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    candidate_upstream.answer = lambda seen: {"error": {"message": "no such model"}}  # 200, not an answer
    await post_json(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q 1"}]})
    await proxy.settle()
    candidate_upstream.answer = None
    candidate_upstream.status = 404  # echoes the body with this status
    await post_json(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q 2"}]})
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["candidate_error"], comparisons["total"]) == (2, 0)
    upstream.answer = None
    upstream.status = 400  # production's own error: not compared, and the candidate's 404 is no error
    status, _ = await post_json(proxy, "/v1/chat/completions", {"messages": []})
    assert status == 400
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["candidate_error"], comparisons["total"], comparisons["unparseable"]) == (2, 0, 0)


async def test_other_paths_pass_through_unmirrored_and_count_as_skipped_path(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: chat_answer(["fine"]) if "/completions?" in seen["path"] else {"data": []}
    candidate_upstream.answer = lambda seen: chat_answer(["fine"])
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models", "/health", "/v1/chat/completions/x"):
            async with s.get(proxy.url + path) as r:
                assert (r.status, await r.read()) == (200, b'{"data":[]}')
        async with s.post(proxy.url + "/v1/models/m:predict", data=b"{}") as r:
            assert r.status == 200
        async with s.post(proxy.url + "/v1/chat/completions?api-version=1", data=b'{"messages": []}') as r:
            assert r.status == 200
    await proxy.settle()
    mirror = proxy.stats()["mirror"]
    assert {k: v for k, v in mirror.items() if not isinstance(v, dict)} == {
        "sampled": 5, "sent": 1, "dropped": 0, "skipped": 4, "error": 0, "in_flight": 0
    }
    assert await skipped_metric(proxy, "path") == mirror["skipped_by_reason"]["path"] == 4
    assert [r["path"] for r in candidate_upstream.requests] == ["/v1/chat/completions?api-version=1"]
    assert len(upstream.requests) == 5
    assert proxy.stats()["comparisons"]["agree"] == 1


async def test_paths_are_not_checked_without_the_openai_preset(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 1.0})
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/models", data=b"{}") as r:
        assert r.status == 200
    await proxy.settle()
    assert proxy.stats()["mirror"]["sent"] == 1
    assert await skipped_metric(proxy, "path") == 0


# ---------------------------------------------------------------- the candidate's identity


def header(seen: dict[str, Any], name: str) -> list[str]:
    """Every value of a header field the upstream received, names matched case-insensitively."""
    return [v.decode() for k, v in seen["raw_headers"] if k.lower() == name.lower().encode()]


async def test_candidate_model_and_headers_change_its_copy_only(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWPROXY_TEST_CANDIDATE_KEY", "Bearer sk-candidate")
    upstream.answer = lambda seen: chat_answer(["x"])
    candidate_upstream.answer = lambda seen: chat_answer(["x"])
    plain = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI)
    rewriting = await start_proxy(
        upstream.url, candidate_upstream.url, mirror=MIRROR_ALL, compare=OPENAI,
        candidate={"model": "candidate-model",
                   "headers": {"Authorization": "env:SHADOWPROXY_TEST_CANDIDATE_KEY", "X-Candidate-Only": "yes"}},
    )
    body = b'{"model":"prod-model","messages":[{"role":"user","content":"q 1"}],"temperature":0.25}'
    headers = {"authorization": "Bearer sk-client", "X-Request-ID": "fixed-id", "Content-Type": "application/json",
               "Host": "models.example"}
    for proxy in (plain, rewriting):
        async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/chat/completions", data=body,
                                                        headers=headers) as r:
            assert r.status == 200
        await proxy.settle()
    (prod_plain, prod_rewriting), (cand_plain, cand_rewriting) = upstream.requests, candidate_upstream.requests

    # Production gets the same bytes through either proxy: headers in order, and the body.
    assert prod_rewriting["raw_headers"] == prod_plain["raw_headers"]
    assert prod_rewriting["body"] == prod_plain["body"] == body
    assert header(prod_rewriting, "Authorization") == ["Bearer sk-client"]

    # Without the keys the candidate's copy is the client's request.
    assert cand_plain["body"] == body
    assert header(cand_plain, "Authorization") == ["Bearer sk-client"]

    # With them: one Authorization, the configured one, the model replaced, the rest kept.
    assert header(cand_rewriting, "Authorization") == ["Bearer sk-candidate"]
    assert header(cand_rewriting, "X-Candidate-Only") == ["yes"]
    assert header(cand_rewriting, "X-Request-ID") == ["fixed-id"]
    assert header(cand_rewriting, "Content-Type") == ["application/json"]
    assert header(cand_rewriting, "X-Shadow-Request") == ["true"]
    sent = cand_rewriting["body"]
    assert orjson.loads(sent) == {**orjson.loads(body), "model": "candidate-model"}
    assert header(cand_rewriting, "Content-Length") == [str(len(sent))]
    assert rewriting.stats()["comparisons"]["agree"] == 1


async def test_a_body_that_is_not_json_reaches_the_candidate_unchanged(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              candidate={"model": "candidate-model"})
    body = b"model=prod&x=1"
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/predict", data=body) as r:
        assert await r.read() == body
    await proxy.settle()
    assert candidate_upstream.requests[0]["body"] == body
    assert header(candidate_upstream.requests[0], "Content-Length") == [str(len(body))]


# ---------------------------------------------------------------- kind "text"


async def test_text_kind_min_similarity_through_the_proxy(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: {"out": ["abcd", "hello  world", "abcd"]}
    candidate_upstream.answer = lambda seen: {"out": ["abce", "hello world", "wxyz"]}
    exact = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              compare={"preset": "json", "path": "/out", "kind": "text"})
    close = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              compare={"preset": "json", "path": "/out", "kind": "text", "min_similarity": 0.75})
    for proxy in (exact, close):
        await post_json(proxy, "/predict", {})
        await proxy.settle()
    # "abcd" / "abce": 2 * 3 / 8 = 0.75; whitespace runs do not count; "wxyz" shares nothing.
    assert (exact.stats()["comparisons"]["agree"], exact.stats()["comparisons"]["disagree"]) == (1, 2)
    assert (close.stats()["comparisons"]["agree"], close.stats()["comparisons"]["disagree"]) == (2, 1)
