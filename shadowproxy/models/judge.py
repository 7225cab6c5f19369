"""A stand-in LLM judge: an OpenAI-compatible ``POST .../chat/completions`` that reads the two
answers a judging prompt shows (between ``[Answer A]`` / ``[End of Answer A]`` and the same for
B) and answers as its ``mode`` says, so a test knows every judgement in advance.

| mode | answer |
|---|---|
| ``correct`` | ``A`` or ``B`` for the longer answer in characters, ``TIE`` when both are as long |
| ``always_a`` | ``A`` whatever the answers (a judge with total position bias) |
| ``wrong_format`` | ``"Answer A is better."``: a judgement, but not one of the three tokens |
| ``truncated`` | the ``correct`` token with ``finish_reason = "length"`` |
| ``refusal`` | ``message.refusal`` set, ``content`` null |
| ``error`` | HTTP 500 with an OpenAI error object |
| ``malformed`` | HTTP 200 whose body is not JSON |
| ``hang`` | never answers (the connection stays open) |

``delay_ms`` delays every answer (a slow judge). A prompt without both answers gets 400.

    async with await start_judge_model(JudgeBehaviour("correct")) as judge:
        ...  # [judge] url = f"{judge.url}/v1"
        judge.set_behaviour(JudgeBehaviour("always_a"))

``python -m shadowproxy.models --protocol judge --mode correct`` serves it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from shadowproxy.models.kserve import ReceivedRequest, RunningServer, run_until_signalled, serve_app

__all__ = ["MODES", "JudgeBehaviour", "RunningJudgeModel", "correct_token", "main", "make_judge_app",
           "start_judge_model"]

MODES = ("correct", "always_a", "wrong_format", "truncated", "refusal", "error", "malformed", "hang")
_ANSWER = {side: re.compile(rf"\[Answer {side}\]\n(.*?)\n\[End of Answer {side}\]", re.DOTALL) for side in "AB"}


@dataclass(frozen=True)
class JudgeBehaviour:
    mode: str = "correct"
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.delay_ms >= 0.0:
            raise ValueError(f"delay_ms: must be >= 0, got {self.delay_ms}")


def correct_token(answer_a: str, answer_b: str) -> str:
    """The ``correct`` judge's token: the longer answer wins, equal lengths tie."""
    if len(answer_a) == len(answer_b):
        return "TIE"
    return "A" if len(answer_a) > len(answer_b) else "B"


@dataclass(slots=True)
class _JudgeState:
    behaviour: JudgeBehaviour
    received: collections.deque[ReceivedRequest] = field(default_factory=lambda: collections.deque(maxlen=10_000))
    requests: int = 0
    answered: collections.Counter[str] = field(default_factory=collections.Counter)


_STATE = web.AppKey("shadowproxy_judge_model_state", _JudgeState)


def _error(message: str, status: int, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _completion(model: str, content: str | None, finish: str, refusal: str | None = None) -> web.Response:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    doc = {
        "id": "chatcmpl-judge", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def _post(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    body = await request.read()
    state.requests += 1
    state.received.append(ReceivedRequest(
        method=request.method, path=request.path, query_string=request.query_string,
        headers=tuple(request.headers.items()), body=body,
    ))
    behaviour = state.behaviour
    if not request.path.rstrip("/").endswith("/chat/completions"):
        return _error(f"no such endpoint: POST {request.path}", 404, "not_found_error")
    try:
        doc = orjson.loads(body)
        prompt = str(doc["messages"][-1]["content"])
        model = str(doc.get("model", "stand-in-judge"))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return _error("body must be a chat completion request", 400, "invalid_request_error")
    a, b = (_ANSWER[side].search(prompt) for side in "AB")
    if a is None or b is None:
        return _error("the prompt shows no [Answer A] and [Answer B]", 400, "invalid_request_error")
    if behaviour.delay_ms:
        await asyncio.sleep(behaviour.delay_ms / 1000)
    mode = behaviour.mode
    state.answered[mode] += 1
    token = correct_token(a.group(1), b.group(1))
    if mode == "hang":
        await asyncio.Event().wait()
    if mode == "error":
        return _error("injected judge failure", 500, "server_error")
    if mode == "malformed":
        return web.Response(body=b"<html>busy</html>", content_type="text/html")
    if mode == "always_a":
        return _completion(model, "A", "stop")
    if mode == "wrong_format":
        return _completion(model, "Answer A is better.", "stop")
    if mode == "truncated":
        return _completion(model, token, "length")
    if mode == "refusal":
        return _completion(model, None, "stop", "I cannot judge these answers.")
    return _completion(model, token, "stop")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_judge_app(behaviour: JudgeBehaviour) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_STATE] = _JudgeState(behaviour=behaviour)
    app.router.add_post("/{tail:.*}", _post)
    app.router.add_get("/healthz", _healthz)
    return app


class RunningJudgeModel(RunningServer[JudgeBehaviour]):
    """The stand-in judge on a real socket; ``set_behaviour`` changes its mode at once."""

    def set_behaviour(self, behaviour: JudgeBehaviour) -> None:
        self._state.behaviour = behaviour

    @property
    def answered(self) -> dict[str, int]:
        """Judging prompts read so far, by the mode in force (``hang`` ones never answered)."""
        state = self._state
        assert isinstance(state, _JudgeState)
        return dict(state.answered)


async def start_judge_model(
    behaviour: JudgeBehaviour, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 0.2
) -> RunningJudgeModel:
    app = make_judge_app(behaviour)
    runner, bound_port = await serve_app(app, host, port, shutdown_timeout)
    state = app[_STATE]
    return RunningJudgeModel(runner, state, host, bound_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shadowproxy.models --protocol judge",
        description="Serve a stand-in LLM judge (OpenAI-compatible chat completions) until SIGTERM/SIGINT.",
    )
    parser.add_argument("--protocol", choices=("judge",), default="judge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--mode", choices=MODES, default="correct")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    behaviour = JudgeBehaviour(args.mode, args.delay_ms)
    label = f"judge model ({behaviour.mode})"
    return run_until_signalled(lambda: start_judge_model(behaviour, args.host, args.port), label, args.host, args.port)
