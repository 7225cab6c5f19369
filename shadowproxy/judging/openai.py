"""OpenAI-compatible answers (`compare.preset = "openai"`): what each choice says, and whether
production's and the candidate's choices agree.

    endpoint = openai_endpoint(path)             # "chat" | "completions" | "embeddings" | None
    prod = extract_openai(prod_doc, endpoint)    # PresetError when the answer is not one
    cand = extract_openai(cand_doc, endpoint)
    result = compare_openai(prod, cand, config.compare)   # a compare.Comparison, one flag per index

A streamed answer is assembled into the same `OpenAIChoice`s (tool call arguments through
`parse_arguments`) and compared the same way.

| endpoint | one choice per | agree when |
|---|---|---|
| ``chat`` | ``choices[*]``: ``message.content``, ``.tool_calls`` | similarity >= ``min_similarity``, tool calls agree |
| ``completions`` | ``choices[*]``: ``text`` | similarity >= ``min_similarity`` |
| ``embeddings`` | ``data[*]``: ``embedding`` (floats, or base64 float32) | cosine >= ``min_cosine`` |

Choices pair by their ``index`` (a batched prompt with ``n`` choices each numbers them
``prompt * n + choice``); a choice only one side has is a disagreement. Text similarity is the
``text`` kind's (whitespace runs collapsed, then difflib's ratio); ``min_similarity`` = 1.0 means
equal text, exactly as ``kind = "text"``. Tool calls agree when both sides call the same functions
in the same order with equal arguments, compared as parsed JSON, or as the raw strings when they
do not parse.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import orjson

from shadowproxy.judging.compare import Comparison, normalise_text, text_similarity
from shadowproxy.judging.presets import PresetError

__all__ = [
    "ENDPOINTS",
    "OpenAIChoice",
    "answer_endpoint",
    "answer_predictions",
    "Thresholds",
    "Unparsed",
    "compare_openai",
    "extract_openai",
    "extract_usage",
    "openai_endpoint",
    "parse_arguments",
]

ENDPOINTS: tuple[str, ...] = ("chat", "completions", "embeddings")
# Longest first: "/v1/chat/completions" also ends in "/completions".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
)
_BSUFFIXES: tuple[tuple[bytes, str], ...] = tuple((s.encode(), e) for s, e in _SUFFIXES)


def openai_endpoint(path: str | bytes) -> str | None:
    """Which OpenAI endpoint a request path (any prefix, query string ignored) is, or None."""
    if isinstance(path, bytes):
        bpath = path.split(b"?", 1)[0]
        for bsuffix, bendpoint in _BSUFFIXES:
            if bpath.endswith(bsuffix):
                return bendpoint
        return None
    spath = path.split("?", 1)[0]
    for suffix, endpoint in _SUFFIXES:
        if spath.endswith(suffix):
            return endpoint
    return None


@dataclass(frozen=True, slots=True)
class Unparsed:
    """Tool call arguments that are not JSON: compared as the raw string, never equal to a
    parsed value."""

    text: str


def parse_arguments(raw: object) -> object:
    """A tool call's ``arguments`` as compared: the parsed JSON of a string, ``Unparsed`` when it
    does not parse; a value that is not a string (some servers send an object) as it is."""
    if not isinstance(raw, str):
        return raw
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Unparsed(raw)


@dataclass(frozen=True, slots=True)
class OpenAIChoice:
    """What one choice (chat, completions) or one embedding says.

    ``tool_calls`` holds ``(function name, parse_arguments(arguments))`` in the answer's order;
    ``vector`` is set for embeddings only."""

    index: int
    text: str = ""
    tool_calls: tuple[tuple[str, object], ...] = ()
    finish_reason: str | None = None
    vector: tuple[float, ...] | None = None

    def prediction(self) -> object:
        """The choice as a JSON value, as stored with the request: the text, the vector, or
        ``{"text", "tool_calls": [{"name", "arguments"}]}`` when there are tool calls."""
        if self.vector is not None:
            return list(self.vector)
        if not self.tool_calls:
            return self.text
        return {
            "text": self.text,
            "tool_calls": [
                {"name": name, "arguments": args.text if isinstance(args, Unparsed) else args}
                for name, args in self.tool_calls
            ],
        }


class Thresholds(Protocol):
    """What `compare_openai` reads from the config (`CompareConfig` has both)."""

    @property
    def min_similarity(self) -> float: ...

    @property
    def min_cosine(self) -> float: ...


# ---------------------------------------------------------------- reading answers


def extract_openai(doc: object, endpoint: str) -> list[OpenAIChoice]:
    """The choices (or embeddings) of a parsed, non-streamed answer; ``PresetError`` when the
    answer is not shaped as the endpoint's."""
    if not isinstance(doc, dict):
        raise PresetError("answer is not a JSON object")
    if endpoint == "embeddings":
        return _indexed(doc, "data", _embedding)
    if endpoint == "chat":
        return _indexed(doc, "choices", _chat_choice)
    if endpoint == "completions":
        return _indexed(doc, "choices", _completion_choice)
    raise PresetError(f"unknown OpenAI endpoint {endpoint!r}")


def _indexed(doc: dict[str, object], key: str, read: _Reader) -> list[OpenAIChoice]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise PresetError(f"answer has no {key!r} list")
    out: list[OpenAIChoice] = []
    seen: set[int] = set()
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise PresetError(f"{key}[{position}] is not an object")
        index = item.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise PresetError(f"{key}[{position}].index is not a non-negative integer")
        if index in seen:
            raise PresetError(f"{key}: index {index} appears twice")
        seen.add(index)
        out.append(read(item, index))
    return out


class _Reader(Protocol):
    def __call__(self, item: dict[str, object], index: int, /) -> OpenAIChoice: ...


def _finish_reason(item: dict[str, object]) -> str | None:
    reason = item.get("finish_reason")
    return reason if isinstance(reason, str) else None


def _content_text(content: object) -> str:
    """A message's ``content``: a string, null, or a list of parts whose text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise PresetError(f"message content is a {type(content).__name__}")


def _tool_calls(message: dict[str, object]) -> tuple[tuple[str, object], ...]:
    calls: list[tuple[str, object]] = []
    raw = message.get("tool_calls")
    if isinstance(raw, list):
        for call in raw:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise PresetError("a tool call has no 'function' object")
            calls.append(_function(function))
    elif raw is not None:
        raise PresetError("'tool_calls' is not a list")
    legacy = message.get("function_call")  # the single call before tool_calls existed
    if isinstance(legacy, dict):
        calls.append(_function(legacy))
    return tuple(calls)


def _function(function: dict[str, object]) -> tuple[str, object]:
    name = function.get("name")
    return (name if isinstance(name, str) else "", parse_arguments(function.get("arguments", "")))


def _chat_choice(item: dict[str, object], index: int) -> OpenAIChoice:
    message = item.get("message")
    if not isinstance(message, dict):
        raise PresetError(f"choice {index} has no 'message' object")
    return OpenAIChoice(
        index, _content_text(message.get("content")), _tool_calls(message), _finish_reason(item)
    )


def _completion_choice(item: dict[str, object], index: int) -> OpenAIChoice:
    text = item.get("text")
    if not isinstance(text, str):
        raise PresetError(f"choice {index} has no 'text' string")
    return OpenAIChoice(index, text, (), _finish_reason(item))


def _embedding(item: dict[str, object], index: int) -> OpenAIChoice:
    raw = item.get("embedding")
    if isinstance(raw, str):
        # encoding_format "base64": little-endian float32 (the official SDKs ask for it by default)
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise PresetError(f"embedding {index} is not valid base64") from None
        if len(data) % 4:
            raise PresetError(f"embedding {index}: {len(data)} bytes is not a whole number of float32s")
        vector = tuple(np.frombuffer(data, dtype="<f4").astype(np.float64).tolist())
    elif isinstance(raw, list):
        if not all(type(x) in (int, float) for x in raw):
            raise PresetError(f"embedding {index} holds a value that is not a number")
        vector = tuple(float(x) for x in raw)
    else:
        raise PresetError(f"data[{index}] has no 'embedding'")
    return OpenAIChoice(index, vector=vector)


def answer_endpoint(doc: object) -> str | None:
    """The endpoint a parsed answer came from, by its ``object`` field (``chat.completion``,
    ``text_completion``, ``list``), else by its shape; for callers that do not have the path."""
    if not isinstance(doc, dict):
        return None
    kind = doc.get("object")
    if kind == "chat.completion":
        return "chat"
    if kind == "text_completion":
        return "completions"
    if isinstance(doc.get("data"), list):
        return "embeddings"
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return "chat" if "message" in choices[0] else "completions"
    return None


def answer_predictions(doc: object) -> list[object]:
    """One JSON value per choice (`OpenAIChoice.prediction`), the endpoint read off the answer:
    what the store keeps and `extract_predictions` gives for the ``openai`` preset."""
    endpoint = answer_endpoint(doc)
    if endpoint is None:
        raise PresetError("answer is not an OpenAI chat, completions or embeddings answer")
    return [choice.prediction() for choice in extract_openai(doc, endpoint)]


def extract_usage(doc: object) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` from an answer's ``usage``; None where absent."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if type(prompt) is int else None,
        completion if type(completion) is int else None,
    )


# ---------------------------------------------------------------- comparing


def compare_openai(
    prod: Sequence[OpenAIChoice], cand: Sequence[OpenAIChoice], thresholds: Thresholds
) -> Comparison:
    """Compare two answers choice by choice, paired by ``index``.

    The result is a `Comparison` with one flag per index either side has (sorted), ``similarity``
    for each text pair (not for pairs that only call tools), ``cosine`` for each embedding pair
    where it is defined, and ``tool_calls_compared`` / ``tool_calls_agree`` counting the pairs
    where either side called a tool."""
    out = Comparison()
    by_index = {c.index: c for c in cand}
    prod_index = {p.index: p for p in prod}
    for index in sorted(prod_index.keys() | by_index.keys()):
        p = prod_index.get(index)
        c = by_index.get(index)
        if p is None or c is None:
            out.flags.append(False)
        elif p.vector is not None or c.vector is not None:
            out.flags.append(_vectors_agree(p.vector, c.vector, thresholds.min_cosine, out))
        else:
            out.flags.append(_choices_agree(p, c, thresholds.min_similarity, out))
    out.agree = sum(out.flags)
    out.disagree = len(out.flags) - out.agree
    return out


def _choices_agree(p: OpenAIChoice, c: OpenAIChoice, min_similarity: float, out: Comparison) -> bool:
    text_ok = True
    if p.text or c.text or not (p.tool_calls or c.tool_calls):
        np_ = normalise_text(p.text)
        nc = normalise_text(c.text)
        similarity = text_similarity(np_, nc)
        out.similarity.append(similarity)
        # 1.0 means equal text; difflib's cheap bound for long texts can reach 1.0 without it.
        text_ok = np_ == nc if min_similarity >= 1.0 else similarity >= min_similarity
    if not (p.tool_calls or c.tool_calls):
        return text_ok
    out.tool_calls_compared += 1
    tools_ok = _tool_calls_equal(p.tool_calls, c.tool_calls)
    if tools_ok:
        out.tool_calls_agree += 1
    return text_ok and tools_ok


def _tool_calls_equal(a: tuple[tuple[str, object], ...], b: tuple[tuple[str, object], ...]) -> bool:
    if len(a) != len(b):
        return False
    return all(
        na == nb and _json_equal(xa, xb)
        for (na, xa), (nb, xb) in zip(a, b)  # noqa: B905  lengths checked
    )


def _json_equal(a: object, b: object) -> bool:
    """Parsed JSON equality: 1 == 1.0, but true is not 1 and key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))  # noqa: B905  lengths checked
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    return bool(a == b)


def _vectors_agree(
    p: tuple[float, ...] | None, c: tuple[float, ...] | None, min_cosine: float, out: Comparison
) -> bool:
    if p is None or c is None or len(p) != len(c):
        return False
    if p == c:
        if p and any(p):
            out.cosine.append(1.0)
        return True
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(c, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
        dot = float(np.dot(a, b))
    if not (math.isfinite(dot) and math.isfinite(norms)) or norms == 0:
        return False
    cosine = max(-1.0, min(1.0, dot / norms))
    out.cosine.append(cosine)
    return cosine >= min_cosine
