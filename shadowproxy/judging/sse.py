"""Streamed answers of OpenAI-compatible APIs: an incremental server-sent-events parser and the
assembler that turns the events of a chat or completions stream back into whole choices.

The parser follows the WHATWG HTML standard, "Interpreting an event stream" (§9.2.6): lines end
with CRLF, LF or CR (a CRLF may be split across two chunks), a line starting with ``:`` is a
comment, ``data`` lines of one event are joined with LF, a blank line dispatches the event, and an
event still incomplete when the stream ends is discarded. It takes the body in whatever pieces the
connection delivers and keeps only the line in progress, so the caller can hand each piece on
first and feed it here after.

The assembler reads each event as one ``chat.completion.chunk`` or ``text_completion`` JSON
object: ``delta.content`` (chat) or ``text`` (completions) concatenated per choice index,
``delta.tool_calls`` merged by their own index (the name once, the arguments concatenated),
``finish_reason`` per choice, and the last non-null ``usage`` (sent in a final chunk when the
request asked for ``stream_options.include_usage``). ``data: [DONE]`` ends the stream. A stream
that ends without it, or with a choice lacking a finish reason, or that carries an error event
(``event: error``, or a JSON object with an ``error`` member, as vLLM and OpenAI send mid-stream),
is ``failed``. Past ``limit`` bytes it stops assembling (``too_large``).
"""

from __future__ import annotations

from typing import Final

import orjson

from shadowproxy.judging.openai import OpenAIChoice, parse_arguments

__all__ = [
    "FINISH_REASONS",
    "AssembledChoice",
    "StreamAssembler",
    "ToolCallParts",
    "normalise_finish_reason",
]

FINISH_REASONS: Final = ("stop", "length", "tool_calls", "content_filter", "other")
# Spellings other servers use for the same endings: TGI ("eos_token", "stop_sequence"), the
# deprecated OpenAI "function_call", Anthropic-style gateways ("end_turn", "max_tokens").
_FINISH_ALIASES: Final = {
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
    "length": "length",
    "max_tokens": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
    "content_filter": "content_filter",
}
_BOM: Final = b"\xef\xbb\xbf"
_DONE: Final = b"[DONE]"
_ERROR_TEXT_MAX: Final = 200


def normalise_finish_reason(reason: str) -> str:
    """One of ``FINISH_REASONS``."""
    return _FINISH_ALIASES.get(reason, "other")


class ToolCallParts:
    __slots__ = ("id", "name", "arguments")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []  # joined once, at the end


class AssembledChoice:
    """One choice of a stream, put back together."""

    __slots__ = ("index", "parts", "tool_calls", "finish_reason")

    def __init__(self, index: int) -> None:
        self.index = index
        self.parts: list[str] = []
        self.tool_calls: dict[int, ToolCallParts] = {}  # by the tool call's own index
        self.finish_reason = ""  # as the server sent it; "" while none came

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def calls(self) -> list[dict[str, str]]:
        """The tool calls in their index order: ``{"id", "name", "arguments"}`` (arguments as the
        JSON text the model wrote)."""
        return [
            {"id": call.id, "name": call.name, "arguments": "".join(call.arguments)}
            for _, call in sorted(self.tool_calls.items())
        ]


class StreamAssembler:
    """Feed it the body of a ``text/event-stream`` answer piece by piece, then call ``end``.

    ``feed`` answers how many choice deltas with output (text, reasoning, tool-call name or
    arguments) the piece completed; ``first_at`` and ``last_at`` hold the ``now`` of the pieces
    that brought the first and the latest of them (0.0 while none came).
    """

    __slots__ = (
        "limit", "size", "_partial", "_skip_lf", "_data", "_event", "_started", "choices", "usage",
        "done", "ended", "error", "too_large", "deltas", "first_at", "last_at",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._partial = b""  # the line in progress (no terminator yet)
        self._skip_lf = False  # the last piece ended with CR: an LF opening the next one is its pair
        self._data: list[bytes] = []  # the data lines of the event in progress
        self._event = b""  # its event type ("" = message)
        self._started = False  # a first line was complete (a UTF-8 BOM before it is dropped)
        self.choices: dict[int, AssembledChoice] = {}
        self.usage: dict[str, object] | None = None
        self.done = False  # `data: [DONE]` came
        self.ended = False
        self.error = ""  # why the stream failed; "" while it has not
        self.too_large = False
        self.deltas = 0  # choice deltas with output
        self.first_at = 0.0
        self.last_at = 0.0

    # -- reading ------------------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def complete(self) -> bool:
        """Ended, with its final event and a finish reason for every choice, no error, not cut."""
        return self.ended and not self.error and not self.too_large

    def ordered_choices(self) -> list[AssembledChoice]:
        return [self.choices[i] for i in sorted(self.choices)]

    def openai_choices(self) -> list[OpenAIChoice]:
        """The choices as ``extract_openai`` reads them from a whole answer, to compare alike."""
        return [
            OpenAIChoice(
                choice.index,
                choice.text,
                tuple(
                    (call.name, parse_arguments("".join(call.arguments)))
                    for _, call in sorted(choice.tool_calls.items())
                ),
                choice.finish_reason or None,
            )
            for choice in self.ordered_choices()
        ]

    def finish_reasons(self) -> list[str]:
        return [choice.finish_reason for choice in self.ordered_choices()]

    def usage_tokens(self, name: str) -> int | None:
        """``usage[name]`` (``completion_tokens``, ``prompt_tokens``) when the server sent it."""
        usage = self.usage
        if usage is None:
            return None
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return None

    # -- the stream ---------------------------------------------------------------------------------
    def feed(self, data: bytes, now: float) -> int:
        """One piece of the body, received at ``now``; the number of output deltas it completed."""
        if self.too_large or self.error or self.ended:
            return 0
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self._partial = b""
            self._data = []
            self.choices = {}
            return 0
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            # CRLF and a lone CR end a line like LF does; a CR closing the piece may be the first
            # half of a CRLF, whose LF is then skipped.
            self._skip_lf = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.find(b"\n")
        if end < 0:
            self._partial += data
            return 0
        before = self.deltas
        start = 0
        if self._partial:
            line = self._partial + data[:end]
            self._partial = b""
            self._line(line)
            start = end + 1
            end = data.find(b"\n", start)
        while end >= 0 and not self.error:
            self._line(data[start:end])
            start = end + 1
            end = data.find(b"\n", start)
        if start < len(data) and not self.error:
            self._partial = data[start:]
        new = self.deltas - before
        if new:
            if not self.first_at:
                self.first_at = now
            self.last_at = now
        return new

    def end(self) -> None:
        """The body is complete (an event still open is discarded, as the standard says)."""
        if self.ended:
            return
        self.ended = True
        self._partial = b""
        self._data = []
        if self.error or self.too_large:
            return
        if not self.done:
            self.error = "the stream ended without its final event (data: [DONE])"
            return
        for choice in self.ordered_choices():
            if not choice.finish_reason:
                self.error = f"choice {choice.index} ended without a finish_reason"
                return

    def fail(self, reason: str) -> None:
        """The exchange broke off (reset, timeout): the stream is not whole."""
        if not self.error:
            self.error = reason
        self.ended = True

    # -- lines and events ---------------------------------------------------------------------------
    def _line(self, line: bytes) -> None:
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[3:]
        if not line:
            if self._data:
                data = self._data
                self._data = []
                event = self._event
                self._event = b""
                self._dispatch(event, data[0] if len(data) == 1 else b"\n".join(data))
            else:
                self._event = b""
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
            return
        if line.startswith(b":"):
            return  # a comment (servers send them as keep-alives)
        colon = line.find(b":")
        if colon < 0:
            field = line
            value = b""
        else:
            field = line[:colon]
            value = line[colon + 1 :]
            if value.startswith(b" "):
                value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value
        # `id` and `retry` matter to a reconnecting browser, not to an answer's content.

    def _dispatch(self, event: bytes, data: bytes) -> None:
        if self.done:
            return  # nothing counts after the final event
        if event == b"error":
            self.error = "error event: " + data[:_ERROR_TEXT_MAX].decode("utf-8", "replace")
            return
        if data == _DONE:
            self.done = True
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error = "an event is not JSON: " + data[:_ERROR_TEXT_MAX].decode("utf-8", "replace")
            return
        if not isinstance(doc, dict):
            self.error = "an event is not a JSON object"
            return
        problem = doc.get("error")
        if problem is not None or doc.get("object") == "error":
            text = orjson.dumps(problem if problem is not None else doc)[:_ERROR_TEXT_MAX]
            self.error = "error event: " + text.decode("utf-8", "replace")
            return
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = doc.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice)

    def _choice(self, choice: dict[str, object]) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            index = 0
        assembled = self.choices.get(index)
        if assembled is None:
            assembled = self.choices[index] = AssembledChoice(index)
        output = False
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                assembled.parts.append(content)
                output = True
            # Reasoning models stream their thinking first: it is output (tokens, time), not answer.
            reasoning = delta.get("reasoning_content")
            if reasoning is None:
                reasoning = delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                output = True
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict) and _tool_call(assembled, call):
                        output = True
            legacy = delta.get("function_call")
            if isinstance(legacy, dict) and _tool_call(assembled, {"index": 0, "function": legacy}):
                output = True
        else:
            text = choice.get("text")
            if isinstance(text, str) and text:
                assembled.parts.append(text)
                output = True
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            assembled.finish_reason = reason
        if output:
            self.deltas += 1


def _tool_call(choice: AssembledChoice, call: dict[str, object]) -> bool:
    """Merge one tool-call delta; True when it carried a name or arguments."""
    index = call.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        index = 0
    parts = choice.tool_calls.get(index)
    if parts is None:
        parts = choice.tool_calls[index] = ToolCallParts()
    ident = call.get("id")
    if isinstance(ident, str) and ident and not parts.id:
        parts.id = ident
    function = call.get("function")
    if not isinstance(function, dict):
        return False
    output = False
    name = function.get("name")
    if isinstance(name, str) and name:
        # Sent once by OpenAI and vLLM, in every delta by some servers: kept once either way.
        if not parts.name:
            parts.name = name
        output = True
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        parts.arguments.append(arguments)
        output = True
    return output
