"""What the OpenAI-compatible stand-in answers: text, tool calls and embeddings derived from the prompt.

Pure functions, so a test computes the answer a stand-in will give without asking it. Everything is
derived from blake2b digests of the prompt (and the choice's index), never from a process's random
state, so every process and every run answers alike.

- **Tokens** are whitespace-separated words (``count_tokens``): that is what ``usage`` counts and what
  a streamed answer sends per event.
- **Text**: ``MIN_WORDS`` to ``MAX_WORDS`` words of ``VOCABULARY``, one digest byte per word. The
  candidate answers the same text except on a share ``differ_rate`` of prompts (``openai_differs``),
  where every fourth word (positions 3, 7, ...) is replaced by the next word of the vocabulary: same
  length, different text.
- **Tool calls**: when the request offers tools and the prompt asks for one (the word ``tool`` or
  ``tools``), the first tool (or the one ``tool_choice`` names) is called with
  ``{"query": <the answer's first four words>, "words": <the prompt's token count>}`` as compact
  JSON, so a differing prompt's arguments differ too.
- **Requests**: ``request_choices`` turns a request's prompts into its choices (``n`` per prompt,
  ``max_tokens`` or ``max_completion_tokens``, ``tools`` and ``tool_choice``); a request the
  stand-in cannot answer raises ``InvalidRequest``.
- **Embeddings**: a unit vector of normal draws seeded by the text's digest, as float32. A candidate
  (``differ_rate`` > 0) is a retrained model whose vectors are never bit-identical: its cosine to
  production's is ``AGREE_COSINE`` on most texts and ``DIFFER_COSINE`` on the differing share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

__all__ = [
    "AGREE_COSINE",
    "DEFAULT_DIMENSIONS",
    "DIFFER_COSINE",
    "MAX_N",
    "MAX_WORDS",
    "MIN_WORDS",
    "VOCABULARY",
    "Choice",
    "InvalidRequest",
    "asks_for_tool",
    "chat_prompt",
    "count_tokens",
    "int_field",
    "openai_choice",
    "openai_cosine",
    "openai_differs",
    "openai_embedding",
    "openai_text",
    "openai_tool_arguments",
    "prompts_of",
    "request_choices",
    "usage_of",
]

# 64 words: one digest byte modulo 64 picks each uniformly (256 is a multiple of 64).
VOCABULARY = (
    "the", "model", "answers", "every", "prompt", "with", "a", "short", "reply", "that", "tells",
    "nothing", "new", "but", "stays", "just", "same", "for", "each", "request", "shadow", "traffic",
    "mirrors", "live", "calls", "to", "another", "server", "while", "users", "wait", "only", "on",
    "production", "tokens", "stream", "one", "by", "as", "they", "arrive", "and", "latency", "is",
    "measured", "from", "first", "byte", "last", "candidate", "differs", "sometimes", "so", "we",
    "count", "how", "often", "it", "agrees", "under", "real", "load", "today", "quietly",
)
assert len(VOCABULARY) == 64
MIN_WORDS = 4
MAX_WORDS = 19
DEFAULT_DIMENSIONS = 64
MAX_N = 16
AGREE_COSINE = 0.9995
DIFFER_COSINE = 0.95

_HASH_SPAN = float(2**64)


def _digest(text: str, person: bytes, size: int = 8, index: int = 0) -> bytes:
    data = f"{index}\x00{text}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=size, person=person).digest()


def _share(text: str, person: bytes, index: int = 0) -> float:
    return int.from_bytes(_digest(text, person, 8, index), "big") / _HASH_SPAN


def count_tokens(text: str) -> int:
    """The stand-in's tokens: whitespace-separated words."""
    return len(text.split())


def chat_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """A chat request's prompt: each message's text (a string, or its ``text`` parts), one per line."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            lines.append(content)
        elif isinstance(content, list):
            lines.append(" ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            ))
        else:
            lines.append("")
    return "\n".join(lines)


def asks_for_tool(prompt: str) -> bool:
    """Whether the prompt asks for a tool: it holds the word ``tool`` or ``tools`` (any case)."""
    return any(word.strip(".,;:!?\"'()").lower() in ("tool", "tools") for word in prompt.split())


def openai_differs(prompt: str, differ_rate: float) -> bool:
    """Whether a candidate with ``differ_rate`` answers this prompt (or embeds this text) differently."""
    return _share(prompt, b"sp-llm-differ") < differ_rate


def _next_word(word: str) -> str:
    return VOCABULARY[(VOCABULARY.index(word) + 1) % len(VOCABULARY)]


def openai_text(prompt: str, differ_rate: float = 0.0, *, index: int = 0) -> str:
    """The whole text of choice ``index`` for ``prompt`` (before any ``max_tokens`` cut).

    ``differ_rate`` 0 is production; a candidate passes its own rate."""
    length = MIN_WORDS + int(_share(prompt, b"sp-llm-length", index) * (MAX_WORDS - MIN_WORDS + 1))
    words = [VOCABULARY[b % len(VOCABULARY)] for b in _digest(prompt, b"sp-llm-words", 64, index)[:length]]
    if openai_differs(prompt, differ_rate):
        words = [_next_word(w) if i % 4 == 3 else w for i, w in enumerate(words)]
    return " ".join(words)


def openai_choice(
    prompt: str, differ_rate: float = 0.0, *, index: int = 0, max_tokens: int | None = None
) -> tuple[str, str]:
    """Choice ``index``'s text and finish reason: ``"length"`` when ``max_tokens`` cut it, else ``"stop"``."""
    words = openai_text(prompt, differ_rate, index=index).split()
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return " ".join(words), "stop"


def openai_tool_arguments(prompt: str, differ_rate: float = 0.0, *, index: int = 0) -> str:
    """The JSON arguments string of the tool call choice ``index`` makes for ``prompt``."""
    query = " ".join(openai_text(prompt, differ_rate, index=index).split()[:4])
    return orjson.dumps({"query": query, "words": count_tokens(prompt)}).decode()


def openai_cosine(text: str, differ_rate: float) -> float:
    """The cosine between production's embedding of ``text`` and that of a model with ``differ_rate``."""
    if differ_rate <= 0.0:
        return 1.0
    return DIFFER_COSINE if openai_differs(text, differ_rate) else AGREE_COSINE


def openai_embedding(text: str, differ_rate: float = 0.0, *, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The unit vector (float32 values) a model with ``differ_rate`` returns for ``text``."""
    rng = np.random.default_rng(int.from_bytes(_digest(text, b"sp-llm-embed", 16), "big"))
    vector = rng.standard_normal(dimensions)
    vector /= np.linalg.norm(vector)
    cosine = openai_cosine(text, differ_rate)
    if cosine < 1.0 and dimensions > 1:
        # Tilt towards a direction orthogonal to the vector (Gram-Schmidt): the result stays a unit
        # vector whose cosine to the original is exactly ``cosine``.
        other = rng.standard_normal(dimensions)
        other -= other.dot(vector) * vector
        other /= np.linalg.norm(other)
        vector = cosine * vector + float(np.sqrt(1.0 - cosine * cosine)) * other
    values: list[float] = vector.astype(np.float32).tolist()
    return values


# ---------------------------------------------------------------- requests


class InvalidRequest(ValueError):
    """A request the stand-in answers 400, with this message."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of an answer, as the tokens a stream sends."""

    index: int
    pieces: list[str]  # one per token: the first word, then " word" for each next one
    finish_reason: str
    tool: str | None = None  # the called function's name; then `pieces` build its arguments
    call_id: str = ""

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def tool_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.tool, "arguments": self.text}}


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])] if text else []


def int_field(doc: dict[str, Any], key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    """``doc[key]`` as an integer within ``[low, high]``, or ``default`` when absent or null."""
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"{key}: must be an integer {bound}")
    return value


def _prompt_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    # Token ids stand for words: ids are joined as they would be counted.
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return " ".join(str(v) for v in value)
    raise InvalidRequest(f"{where}: must be a string, a list of strings, or token ids")


def prompts_of(value: object, key: str) -> list[str]:
    """The prompts of a completions ``prompt`` or an embeddings ``input``: one, or a batch."""
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        return [_prompt_text(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return [_prompt_text(value, key)]


def _tool_to_call(doc: dict[str, Any], prompt: str) -> str | None:
    tools = doc.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be a list")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise InvalidRequest(f"tools[{i}]: must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        names.append(function["name"])
    choice = doc.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice == "required":
        return str(names[0])
    if choice == "auto":
        return str(names[0]) if asks_for_tool(prompt) else None
    function = choice.get("function") if isinstance(choice, dict) else None
    named = function.get("name") if isinstance(function, dict) else None
    if named not in names:
        raise InvalidRequest("tool_choice: must be none, auto, required or a function among tools")
    return str(named)


def request_choices(doc: dict[str, Any], prompts: list[str], differ_rate: float, *, tools: bool) -> list[Choice]:
    """The choices answering ``prompts`` (``n`` each, in order), as a model with ``differ_rate`` makes them."""
    n = int_field(doc, "n", 1, 1, MAX_N)
    max_tokens = int_field(doc, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = int_field(doc, "max_tokens", None, 1)
    assert n is not None
    choices = []
    for p, prompt in enumerate(prompts):
        tool = _tool_to_call(doc, prompt) if tools else None
        for i in range(n):
            if tool is not None:
                arguments = openai_tool_arguments(prompt, differ_rate, index=i)
                call_id = "call_" + _digest(prompt, b"sp-llm-call", 12, i).hex()
                choices.append(Choice(p * n + i, _pieces(arguments), "tool_calls", tool, call_id))
            else:
                text, finish = openai_choice(prompt, differ_rate, index=i, max_tokens=max_tokens)
                choices.append(Choice(p * n + i, _pieces(text), finish))
    return choices


def usage_of(prompts: list[str], choices: list[Choice]) -> dict[str, int]:
    """The ``usage`` of an answer: prompt and completion tokens (words) and their total."""
    prompt_tokens = sum(count_tokens(p) for p in prompts)
    completion_tokens = sum(len(c.pieces) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
