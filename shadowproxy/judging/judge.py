"""The blind LLM judge's words: the prompt it is given and how its reply is read (``[judge]``).

Pure functions, no I/O: ``shadow/judge.py`` calls the judge with what ``judge_request`` builds and
reads the answer with ``read_reply``.

- **Blind.** The judge sees the client's request and the two answers as ``Answer A`` and
  ``Answer B``, in an order drawn at random for each judgement; nothing says which model wrote
  which. The order is recorded (``candidate_first``), so position bias can be measured.
- **Three fixed tokens.** The judge must answer exactly ``A``, ``B`` or ``TIE``. The reply's
  ``content`` is read with surrounding whitespace and one trailing period removed; anything else
  is ``unparseable``, never a tie.
- **Errors are errors.** ``finish_reason = "length"`` is ``truncated`` (whatever the content), a
  non-empty ``message.refusal`` or ``finish_reason = "content_filter"`` is ``refusal``, an answer
  that is not a chat completion is ``malformed``. The HTTP failures (``timeout``, ``connection``,
  ``status``) are told apart by the caller.

``JUDGE_SYSTEM_PROMPT`` and ``judge_user_prompt`` are the whole prompt; docs/comparison.md shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = [
    "ERROR_KINDS",
    "JUDGE_SYSTEM_PROMPT",
    "RESULTS",
    "TOKENS",
    "JudgeReply",
    "judge_request",
    "judge_user_prompt",
    "read_reply",
    "render_answer",
    "render_request",
    "result_of",
]

RESULTS: tuple[str, ...] = ("candidate_better", "tie", "production_better")
ERROR_KINDS: tuple[str, ...] = ("timeout", "connection", "status", "refusal", "truncated", "unparseable", "malformed")
TOKENS: tuple[str, ...] = ("A", "B", "TIE")

JUDGE_SYSTEM_PROMPT = (
    "You are an impartial judge comparing two answers to the same request. Decide which answer "
    "serves the request better: correct, helpful, complete and following the request's instructions. "
    "Do not let the order of the answers, their length or their style sway you; a longer answer is "
    "not better for being longer. Reply with exactly one token and nothing else: A if Answer A is "
    "better, B if Answer B is better, TIE if they are equally good."
)


def render_request(body: bytes, endpoint: str) -> str:
    """The client's request as the judge reads it: a chat's messages as ``role: content`` lines,
    a completion's prompt as it is; a body that is neither is shown as its text."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")
    if not isinstance(doc, Mapping):
        return body.decode("utf-8", "replace")
    if endpoint == "chat" and isinstance(doc.get("messages"), list):
        lines = []
        for message in doc["messages"]:
            if not isinstance(message, Mapping):
                continue
            role = str(message.get("role", "user"))
            lines.append(f"{role}: {_content_text(message.get('content'))}")
        return "\n".join(lines)
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(f"prompt {i + 1}: {p}" for i, p in enumerate(prompt))
    return body.decode("utf-8", "replace")


def _content_text(content: object) -> str:
    """A message's content: a string, or the text of its parts (``[image]`` and the like for others)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(str(part["text"]))
            elif isinstance(part, Mapping):
                parts.append(f"[{part.get('type', 'part')}]")
        return " ".join(parts)
    return str(content)


def render_answer(predictions: Sequence[object]) -> str:
    """One side's answer from its choices' predictions (``OpenAIChoice.prediction()``): the text,
    each tool call as ``[tool call] name(arguments)``, several choices numbered."""
    rendered = []
    for prediction in predictions:
        if isinstance(prediction, Mapping):
            lines = [str(prediction.get("text", ""))] if prediction.get("text") else []
            for call in prediction.get("tool_calls", ()):
                args = call.get("arguments")
                text = args if isinstance(args, str) else orjson.dumps(args).decode()
                lines.append(f"[tool call] {call.get('name', '')}({text})")
            rendered.append("\n".join(lines))
        else:
            rendered.append(str(prediction))
    if len(rendered) == 1:
        return rendered[0]
    return "\n".join(f"[choice {i + 1}]\n{text}" for i, text in enumerate(rendered))


def judge_user_prompt(request: str, answer_a: str, answer_b: str) -> str:
    """The user message: the request and both answers between fixed markers."""
    return (
        f"[Request]\n{request}\n[End of Request]\n\n"
        f"[Answer A]\n{answer_a}\n[End of Answer A]\n\n"
        f"[Answer B]\n{answer_b}\n[End of Answer B]\n\n"
        "Which answer is better? Reply with exactly one of: A, B, TIE."
    )


def judge_request(
    model: str,
    max_tokens: int,
    request: str,
    production: str,
    candidate: str,
    candidate_first: bool,
    max_tokens_field: str = "max_tokens",
) -> dict[str, Any]:
    """The chat completion request sent to the judge; ``candidate_first`` puts the candidate's
    answer in position A; ``max_tokens`` goes in ``max_tokens_field``."""
    a, b = (candidate, production) if candidate_first else (production, candidate)
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": judge_user_prompt(request, a, b)},
        ],
        max_tokens_field: max_tokens,
    }


class JudgeReply:
    """What the judge's answer said: ``token`` (A, B or TIE), or ``error`` (a kind of ERROR_KINDS)."""

    __slots__ = ("error", "token")

    def __init__(self, token: str = "", error: str = "") -> None:
        self.token = token
        self.error = error


def read_reply(doc: object) -> JudgeReply:
    """A judge's chat completion (parsed JSON) read strictly; see the module's rules."""
    if not isinstance(doc, Mapping):
        return JudgeReply(error="malformed")
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return JudgeReply(error="malformed")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        return JudgeReply(error="malformed")
    finish = choice.get("finish_reason")
    if finish == "length":
        return JudgeReply(error="truncated")
    refusal = message.get("refusal")
    if finish == "content_filter" or (isinstance(refusal, str) and refusal.strip()):
        return JudgeReply(error="refusal")
    content = message.get("content")
    if not isinstance(content, str):
        return JudgeReply(error="unparseable")
    text = content.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if text not in TOKENS:
        return JudgeReply(error="unparseable")
    return JudgeReply(token=text)


def result_of(token: str, candidate_first: bool) -> str:
    """The judgement for the candidate: ``candidate_better``, ``tie`` or ``production_better``."""
    if token == "TIE":
        return "tie"
    candidate_won = (token == "A") == candidate_first
    return "candidate_better" if candidate_won else "production_better"
