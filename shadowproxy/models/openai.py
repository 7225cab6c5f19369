"""The OpenAI-compatible stand-in: a real aiohttp server answering like an LLM behind vLLM, TGI, KServe's
``/openai/v1`` routes or a hosted API, with answers a test can compute (``llm_answers``).

``python -m shadowproxy.models --protocol openai --role production|candidate`` serves it; production
starts its first token after 50 ms, the candidate after 80 ms, both 10 ms between tokens, and the
candidate answers 10% of prompts differently. Usage::

    async with await start_openai_model(OpenAIBehaviour.candidate(first_token_ms=120)) as llm:
        ...  # openai.AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="any")

Endpoints (under any path prefix, e.g. ``/openai/v1/...``):

- ``POST .../chat/completions`` and ``POST .../completions``: ``n`` choices per prompt (a completions
  ``prompt`` may be a batch: choice ``index`` is ``prompt_index * n + choice``), ``max_tokens`` (or
  ``max_completion_tokens``) cuts the text and makes the finish reason ``length``, ``tools`` with a
  prompt asking for one make a tool call (finish reason ``tool_calls``), ``usage`` counts
  whitespace-separated words. With ``"stream": true`` the answer is Server-Sent Events, one token
  per event per choice: the chat role event at once, the first token after ``first_token_ms`` (plus
  up to ``jitter_ms``), each next one ``inter_token_ms`` later (and never sooner than that after
  the one before, even when the server fell behind), then the finish reasons, a ``usage``
  event when ``stream_options.include_usage`` is true, and ``data: [DONE]``. Unstreamed, the answer
  comes when its last token would have.
- ``POST .../embeddings``: float32 unit vectors (``encoding_format`` ``float`` or ``base64``, the
  ``openai`` SDK's default), ``dimensions`` per request or the behaviour's, after ``first_token_ms``.
- ``GET .../models``, ``GET /healthz``, ``GET /``.

Answers are deterministic, ``id`` and ``created`` included (the id is a digest of the role and the
request body), so the same request gets the same bytes directly and through a proxy. A malformed
request gets 400 with an OpenAI error object; ``error_rate`` answers that share of bodies 500.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from shadowproxy.models.kserve import ReceivedRequest, RunningServer, request_fails, run_until_signalled, serve_app
from shadowproxy.models.llm_answers import (
    DEFAULT_DIMENSIONS,
    Choice,
    InvalidRequest,
    chat_prompt,
    count_tokens,
    int_field,
    openai_embedding,
    prompts_of,
    request_choices,
    usage_of,
)

__all__ = ["CREATED", "OpenAIBehaviour", "RunningOpenAIModel", "main", "make_openai_app", "start_openai_model"]

CREATED = 1_700_000_000  # every answer's `created`: a fixed time keeps answers byte-identical
MAX_DIMENSIONS = 8192
_MAX_BODY_BYTES = 64 * 1024 * 1024
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class OpenAIBehaviour:
    """How an OpenAI-compatible stand-in behaves.

    - ``role``: a free-form name, in ``system_fingerprint`` (``fp_ROLE``) and the answers' ids.
    - ``model``: the ``model`` answered when a request names none (a request's own is echoed).
    - ``differ_rate``: share of prompts answered differently (``openai_differs``); 0 is production.
    - ``first_token_ms`` (+ uniform ``[0, jitter_ms)``) and ``inter_token_ms``: generation timing.
    - ``error_rate``: share of request bodies answered 500.
    - ``dimensions``: embedding size when a request sets none.
    - ``seed``: seeds the jitter.
    """

    role: str = "production"
    model: str = "stand-in-llm"
    differ_rate: float = 0.0
    first_token_ms: float = 50.0
    inter_token_ms: float = 10.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    dimensions: int = DEFAULT_DIMENSIONS
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("differ_rate", "error_rate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: must be between 0 and 1, got {value}")
        for key in ("first_token_ms", "inter_token_ms", "jitter_ms"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{key}: must be a finite number >= 0, got {value}")
        if not 1 <= self.dimensions <= MAX_DIMENSIONS:
            raise ValueError(f"dimensions: must be between 1 and {MAX_DIMENSIONS}, got {self.dimensions}")
        if not self.role:
            raise ValueError("role: must not be empty")
        if not self.model:
            raise ValueError("model: must not be empty")

    @classmethod
    def production(cls, **overrides: Any) -> OpenAIBehaviour:
        """The reference LLM: first token after 50 ms, 10 ms between tokens."""
        return replace(cls(role="production"), **overrides)

    @classmethod
    def candidate(cls, **overrides: Any) -> OpenAIBehaviour:
        """The LLM to try: 10% of prompts answered differently, first token after 80 ms."""
        return replace(cls(role="candidate", differ_rate=0.1, first_token_ms=80.0), **overrides)


@dataclass(slots=True)
class _OpenAIState:
    behaviour: OpenAIBehaviour
    rng: random.Random
    received: collections.deque[ReceivedRequest] = field(default_factory=lambda: collections.deque(maxlen=10_000))
    requests: int = 0


_STATE = web.AppKey("shadowproxy_openai_model_state", _OpenAIState)


def _hex(data: str, size: int = 12) -> str:
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=size).hexdigest()


def _error(message: str, status: int = 400, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _chat_message(choice: Choice) -> dict[str, Any]:
    if choice.tool is not None:
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [choice.tool_call()]}
    return {"role": "assistant", "content": choice.text, "refusal": None}


def _chat_delta(choice: Choice, step: int) -> dict[str, Any]:
    if choice.tool is None:
        return {"content": choice.pieces[step]}
    call: dict[str, Any] = {"index": 0, "function": {"arguments": choice.pieces[step]}}
    if step == 0:
        call = {"index": 0, "id": choice.call_id, "type": "function",
                "function": {"name": choice.tool, "arguments": choice.pieces[0]}}
    return {"tool_calls": [call]}


class _Exchange:
    """One chat or completions request: its choices, and the answer streamed or whole."""

    def __init__(self, state: _OpenAIState, doc: dict[str, Any], body: bytes, chat: bool, started: float) -> None:
        behaviour = state.behaviour
        self.chat = chat
        self.started = started
        self.jitter_ms = state.rng.uniform(0.0, behaviour.jitter_ms) if behaviour.jitter_ms else 0.0
        self.behaviour = behaviour
        if chat:
            messages = doc.get("messages")
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
                raise InvalidRequest("messages: must be a non-empty list of message objects")
            self.prompts = [chat_prompt(messages)]
        else:
            if "prompt" not in doc:
                raise InvalidRequest("prompt: required")
            self.prompts = prompts_of(doc["prompt"], "prompt")
        self.choices = request_choices(doc, self.prompts, behaviour.differ_rate, tools=chat)
        self.usage = usage_of(self.prompts, self.choices)
        model = doc.get("model")
        prefix = "chatcmpl-" if chat else "cmpl-"
        self.head: dict[str, Any] = {
            "id": prefix + _hex(behaviour.role + "\x00" + body.decode("utf-8", "replace")),
            "object": "chat.completion" if chat else "text_completion",
            "created": CREATED,
            "model": model if isinstance(model, str) and model else behaviour.model,
            "system_fingerprint": f"fp_{behaviour.role}",
        }
        stream = doc.get("stream", False)
        options = doc.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise InvalidRequest("stream: must be true or false; stream_options: must be an object")
        self.stream = stream
        self.include_usage = bool(options.get("include_usage", False))

    def _due(self, step: int) -> float:
        b = self.behaviour
        return self.started + (b.first_token_ms + self.jitter_ms + step * b.inter_token_ms) / 1000.0

    async def _wait(self, step: int, not_before: float = 0.0) -> float:
        """Sleep until ``step`` is due, and not before ``not_before``; the loop's time when done."""
        loop = asyncio.get_running_loop()
        delay = max(self._due(step), not_before) - loop.time()
        if delay > 0.0:
            await asyncio.sleep(delay)
        return loop.time()

    def whole(self) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": c.index, "message": _chat_message(c), "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
        return {**self.head, "choices": choices, "usage": self.usage}

    async def answer(self, request: web.Request) -> web.StreamResponse:
        steps = max(len(c.pieces) for c in self.choices)
        if not self.stream:
            await self._wait(max(steps - 1, 0))
            return web.Response(body=orjson.dumps(self.whole()), content_type="application/json")
        head: dict[str, Any] = {**self.head, "object": "chat.completion.chunk"} if self.chat else dict(self.head)
        if self.include_usage:
            head["usage"] = None  # as OpenAI's streams: null on every chunk until the usage chunk

        def chunk(index: int, part: dict[str, Any], finish: str | None = None) -> bytes:
            return _event({**head, "choices": [{"index": index, **part, "logprobs": None, "finish_reason": finish}]})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            if self.chat:  # the role event leaves at once; time to first token runs to the first content
                await response.write(b"".join(
                    chunk(c.index, {"delta": {"role": "assistant", "content": "" if c.tool is None else None}})
                    for c in self.choices
                ))
            # A token is never sent sooner than inter_token_ms after the one before: a stand-in that
            # fell behind (a busy machine) catches up at its own pace, as a model generating does,
            # rather than in one burst that would read as zero gaps.
            gap = self.behaviour.inter_token_ms / 1000.0
            sent = -math.inf
            for step in range(steps):
                sent = await self._wait(step, sent + gap)
                await response.write(b"".join(
                    chunk(c.index, {"delta": _chat_delta(c, step)} if self.chat else {"text": c.pieces[step]})
                    for c in self.choices
                    if step < len(c.pieces)
                ))
            tail = [chunk(c.index, {"delta": {}} if self.chat else {"text": ""}, c.finish_reason) for c in self.choices]
            if self.include_usage:
                tail.append(_event({**head, "choices": [], "usage": self.usage}))
            await response.write(b"".join(tail) + _DONE)
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-stream: nothing left to send
            pass
        return response


def _embedding_inputs(doc: dict[str, Any]) -> list[str]:
    if "input" not in doc:
        raise InvalidRequest("input: required")
    return prompts_of(doc["input"], "input")


async def _embeddings(state: _OpenAIState, doc: dict[str, Any], started: float) -> web.Response:
    behaviour = state.behaviour
    inputs = _embedding_inputs(doc)
    dimensions = int_field(doc, "dimensions", behaviour.dimensions, 1, MAX_DIMENSIONS)
    assert dimensions is not None
    encoding = doc.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest('encoding_format: must be "float" or "base64"')
    data = []
    for i, text in enumerate(inputs):
        vector: list[float] | str = openai_embedding(text, behaviour.differ_rate, dimensions=dimensions)
        if encoding == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(count_tokens(t) for t in inputs)
    model = doc.get("model")
    answer = {
        "object": "list",
        "data": data,
        "model": model if isinstance(model, str) and model else behaviour.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    delay = started + behaviour.first_token_ms / 1000.0 - asyncio.get_running_loop().time()
    if delay > 0.0:
        await asyncio.sleep(delay)
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def _post(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    body = await request.read()
    started = asyncio.get_running_loop().time()
    state.requests += 1
    state.received.append(ReceivedRequest(
        method=request.method, path=request.path, query_string=request.query_string,
        headers=tuple(request.headers.items()), body=body,
    ))
    path = request.path.rstrip("/")
    endpoint = next((e for e in ("/chat/completions", "/completions", "/embeddings") if path.endswith(e)), None)
    if endpoint is None:
        return _error(f"no such endpoint: POST {request.path}", 404, "not_found_error")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(f"body is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return _error("body must be a JSON object")
    if request_fails(body, state.behaviour.error_rate):
        return _error("injected model failure", 500, "server_error")
    try:
        if endpoint == "/embeddings":
            return await _embeddings(state, doc, started)
        exchange = _Exchange(state, doc, body, endpoint == "/chat/completions", started)
    except InvalidRequest as exc:
        return _error(str(exc))
    return await exchange.answer(request)


async def _models(request: web.Request) -> web.Response:
    model = request.app[_STATE].behaviour.model
    entry = {"id": model, "object": "model", "created": CREATED, "owned_by": "shadowproxy"}
    listing = {"object": "list", "data": [entry]}
    return web.Response(body=orjson.dumps(listing), content_type="application/json")


async def _get(request: web.Request) -> web.Response:
    if request.path.rstrip("/").endswith("/models"):
        return await _models(request)
    behaviour = request.app[_STATE].behaviour
    if request.path == "/healthz":
        return web.json_response({"status": "ok"})
    if request.path == "/":
        return web.json_response({"status": "alive", "role": behaviour.role, "model": behaviour.model})
    return _error(f"no such endpoint: GET {request.path}", 404, "not_found_error")


def make_openai_app(behaviour: OpenAIBehaviour) -> web.Application:
    """An aiohttp application serving ``behaviour``'s LLM."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[_STATE] = _OpenAIState(behaviour=behaviour, rng=random.Random(behaviour.seed))
    app.router.add_get("/{tail:.*}", _get)
    app.router.add_post("/{tail:.*}", _post)
    return app


class RunningOpenAIModel(RunningServer[OpenAIBehaviour]):
    """An OpenAI-compatible stand-in listening on a real socket."""


async def start_openai_model(
    behaviour: OpenAIBehaviour, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 1.0
) -> RunningOpenAIModel:
    """Serve ``behaviour`` on ``host:port`` (0 = a free port, read back into ``.port``)."""
    app = make_openai_app(behaviour)
    runner, bound_port = await serve_app(app, host, port, shutdown_timeout)
    state = app[_STATE]
    return RunningOpenAIModel(runner, state, host, bound_port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shadowproxy.models --protocol openai",
        description="Serve a stand-in LLM (OpenAI-compatible chat, completions and embeddings) until SIGTERM/SIGINT.",
    )
    parser.add_argument("--protocol", choices=("kserve-v1", "openai"), default="openai")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--role",
        default="production",
        help="production (the reference) or candidate (defaults: --differ-rate 0.1 --first-token-ms 80)",
    )
    parser.add_argument("--model", default="stand-in-llm", help="model name answered when a request names none")
    parser.add_argument("--differ-rate", type=float, default=None, help="share of prompts answered differently")
    parser.add_argument("--first-token-ms", type=float, default=None, help="delay before the first token")
    parser.add_argument("--inter-token-ms", type=float, default=10.0, help="delay between tokens (default 10)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra delay before the first token")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--dimensions", type=int, default=DEFAULT_DIMENSIONS, help="default embedding size")
    parser.add_argument("--seed", type=int, default=0, help="seed for the jitter")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be between 0 and 65535, got {args.port}")
    base = OpenAIBehaviour.candidate() if args.role == "candidate" else OpenAIBehaviour.production()
    try:
        args.behaviour = replace(
            base,
            role=args.role,
            model=args.model,
            differ_rate=base.differ_rate if args.differ_rate is None else args.differ_rate,
            first_token_ms=base.first_token_ms if args.first_token_ms is None else args.first_token_ms,
            inter_token_ms=args.inter_token_ms,
            jitter_ms=args.jitter_ms,
            error_rate=args.error_rate,
            dimensions=args.dimensions,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 after SIGTERM/SIGINT, 1 when the port cannot be bound, 2 for bad arguments."""
    args = _parse_args(argv)
    behaviour: OpenAIBehaviour = args.behaviour
    label = f"{behaviour.role} model {behaviour.model} (openai)"
    return run_until_signalled(
        lambda: start_openai_model(behaviour, args.host, args.port), label, args.host, args.port
    )
