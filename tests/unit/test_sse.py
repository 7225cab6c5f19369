"""The SSE parser and OpenAI stream assembler on hand-built event streams."""

from __future__ import annotations

import json

import pytest

from shadowproxy.judging.openai import OpenAIChoice, extract_openai
from shadowproxy.judging.sse import FINISH_REASONS, StreamAssembler, normalise_finish_reason

LIMIT = 1 << 20


def chunk(choices: list[dict[str, object]], **extra: object) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": choices, **extra}


def delta(content: str | None = None, index: int = 0, finish: str | None = None, **fields: object) -> dict[str, object]:
    d: dict[str, object] = dict(fields)
    if content is not None:
        d["content"] = content
    return {"index": index, "delta": d, "finish_reason": finish}


WORDS = ["Hello", ",", " wor", "ld", "!"]
CHAT_EVENTS: list[object] = [
    chunk([delta(role="assistant", content="")]),
    *(chunk([delta(w)]) for w in WORDS),
    chunk([delta(finish="stop")]),
    chunk([], usage={"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}),
]


def sse(events: list[object], newline: bytes = b"\n", done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + newline + newline for e in events)
    return out + (b"data: [DONE]" + newline + newline if done else b"")


def assemble(*pieces: bytes) -> StreamAssembler:
    asm = StreamAssembler(LIMIT)
    for i, piece in enumerate(pieces):
        asm.feed(piece, float(i + 1))
    asm.end()
    return asm


def summary(asm: StreamAssembler) -> tuple[object, ...]:
    return (
        [(c.index, c.text, c.finish_reason, c.calls()) for c in asm.ordered_choices()],
        asm.usage,
        asm.deltas,
        asm.error,
        asm.complete,
    )


EXPECTED = ([(0, "Hello, world!", "stop", [])], CHAT_EVENTS[-1]["usage"], 5, "", True)  # type: ignore[index]


def test_a_chat_stream_is_assembled() -> None:
    asm = assemble(sse(CHAT_EVENTS))
    assert summary(asm) == EXPECTED
    assert asm.usage_tokens("completion_tokens") == 5
    assert asm.usage_tokens("prompt_tokens") == 7
    assert asm.finish_reasons() == ["stop"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_split_point_gives_the_same_result(newline: bytes) -> None:
    body = sse(CHAT_EVENTS, newline)
    for offset in range(len(body) + 1):
        asm = assemble(body[:offset], body[offset:])
        assert summary(asm) == EXPECTED, (newline, offset)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_stream_fed_byte_by_byte_gives_the_same_result(newline: bytes) -> None:
    body = sse(CHAT_EVENTS, newline)
    asm = assemble(*(body[i : i + 1] for i in range(len(body))))
    assert summary(asm) == EXPECTED


def test_a_crlf_split_between_pieces_is_one_line_end() -> None:
    # "data: a\r" | "\ndata: b\r\n\r\n": one event whose data has two lines, not two events.
    asm = StreamAssembler(LIMIT)
    first = json.dumps(chunk([delta("x")]))
    head, tail = first[:20], first[20:]
    asm.feed(b"data: " + head.encode() + b"\r", 1.0)
    asm.feed(b"\ndata: " + tail.encode() + b"\r\n\r\n", 2.0)
    assert [c.text for c in asm.ordered_choices()] == ["x"]  # "\n" inside JSON is whitespace
    assert asm.error == ""


def test_comments_and_other_fields_are_ignored() -> None:
    body = b": keep-alive\n\n" + b"id: 1\nretry: 100\n" + sse(CHAT_EVENTS[:3], done=False)
    body += b":another comment\n" + sse(CHAT_EVENTS[3:])
    assert summary(assemble(body)) == EXPECTED


def test_multi_line_data_is_joined_with_line_feeds() -> None:
    text = json.dumps(chunk([delta("a b", finish="stop")]), indent=1)  # JSON across many lines
    body = b"".join(b"data: " + line.encode() + b"\n" for line in text.splitlines()) + b"\n"
    body += b"data:[DONE]\n\n"  # no space after the colon is allowed too
    asm = assemble(body)
    assert [c.text for c in asm.ordered_choices()] == ["a b"]
    assert asm.complete


def test_a_byte_order_mark_before_the_first_line_is_dropped() -> None:
    asm = assemble(b"\xef\xbb", b"\xbf" + sse(CHAT_EVENTS))
    assert summary(asm) == EXPECTED


def test_a_stream_without_its_final_event_fails() -> None:
    asm = assemble(sse(CHAT_EVENTS, done=False))
    assert asm.failed and not asm.complete
    assert "[DONE]" in asm.error


def test_an_event_cut_off_by_the_end_is_discarded() -> None:
    # The final event lacks its blank line: per the standard it never dispatches.
    asm = assemble(sse(CHAT_EVENTS, done=False) + b"data: [DONE]\n")
    assert asm.failed


def test_a_choice_without_a_finish_reason_fails() -> None:
    asm = assemble(sse([chunk([delta("hi")])]))
    assert asm.failed
    assert "finish_reason" in asm.error


@pytest.mark.parametrize(
    "event",
    [
        b'event: error\ndata: {"message": "overloaded"}\n\n',
        b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
        b'data: {"object": "error", "message": "overloaded", "code": 500}\n\n',
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
    ],
    ids=["event-type", "error-member", "object-error", "not-json", "not-object"],
)
def test_an_error_event_fails_the_stream(event: bytes) -> None:
    body = sse(CHAT_EVENTS[:3], done=False) + event + sse(CHAT_EVENTS[3:])
    asm = StreamAssembler(LIMIT)
    asm.feed(body, 1.0)
    asm.end()
    assert asm.failed and not asm.complete
    assert asm.error


def test_events_after_the_final_event_do_not_count() -> None:
    asm = assemble(sse(CHAT_EVENTS) + sse([chunk([delta("late")])], done=False))
    assert summary(asm) == EXPECTED


def test_tool_calls_are_merged_by_index() -> None:
    def call(index: int, **fields: object) -> dict[str, object]:
        return delta(tool_calls=[{"index": index, **fields}])

    events: list[object] = [
        chunk([call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""})]),
        chunk([call(0, function={"arguments": '{"city": '})]),
        chunk([call(1, id="call_b", type="function", function={"name": "get_time", "arguments": "{}"})]),
        chunk([call(0, function={"name": "get_weather", "arguments": '"Paris"}'})]),  # name repeated
        chunk([delta(finish="tool_calls")]),
    ]
    asm = assemble(sse(events))
    (choice,) = asm.ordered_choices()
    assert choice.calls() == [
        {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_b", "name": "get_time", "arguments": "{}"},
    ]
    assert choice.text == ""
    assert asm.deltas == 4
    assert asm.complete


def test_assembled_choices_equal_those_of_the_same_answer_whole() -> None:
    events: list[object] = [
        chunk([delta("It is ")]),
        chunk([delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a":'}}])]),
        chunk([delta("sunny", tool_calls=[{"index": 0, "function": {"arguments": " [1, 2]}"}}])]),
        chunk([delta(finish="tool_calls")]),
    ]
    whole = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "It is sunny",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}],
    }}]}
    assembled = assemble(sse(events)).openai_choices()
    assert assembled == extract_openai(whole, "chat")
    assert assembled == [OpenAIChoice(0, "It is sunny", (("f", {"a": [1, 2]}),), "tool_calls")]


def test_completions_text_and_several_choices() -> None:
    def piece(index: int, text: str, finish: str | None = None) -> dict[str, object]:
        return {"object": "text_completion", "choices": [{"index": index, "text": text, "finish_reason": finish}]}

    events: list[object] = [
        piece(1, "B1"), piece(0, "A1"), piece(0, "A2"), piece(1, "B2", "length"), piece(0, "", "stop")
    ]
    asm = assemble(sse(events))
    assembled = [(c.index, c.text, c.finish_reason) for c in asm.ordered_choices()]
    assert assembled == [(0, "A1A2", "stop"), (1, "B1B2", "length")]
    assert asm.deltas == 4
    assert asm.usage is None and asm.usage_tokens("completion_tokens") is None
    assert asm.complete


def test_reasoning_deltas_are_output_but_not_text() -> None:
    events: list[object] = [chunk([delta(reasoning_content="think")]), chunk([delta("answer", finish="stop")])]
    asm = assemble(sse(events))
    assert asm.deltas == 2
    assert asm.ordered_choices()[0].text == "answer"


def test_timing_of_the_first_and_last_output() -> None:
    asm = StreamAssembler(LIMIT)
    body = sse(CHAT_EVENTS)
    events = body.split(b"\n\n")
    counts = [asm.feed(e + b"\n\n", float(10 + i)) for i, e in enumerate(events[:-1])]
    asm.end()
    # the role-only first chunk carries no output; the five words do; finish and usage do not
    assert counts == [0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert (asm.first_at, asm.last_at) == (11.0, 15.0)


def test_beyond_the_limit_the_stream_is_too_large_and_assembly_stops() -> None:
    body = sse(CHAT_EVENTS)
    asm = StreamAssembler(len(body) - 1)
    asm.feed(body[:100], 1.0)
    asm.feed(body[100:], 2.0)
    asm.end()
    assert asm.too_large and not asm.complete and not asm.failed
    assert asm.choices == {}
    exact = StreamAssembler(len(body))
    exact.feed(body, 1.0)
    exact.end()
    assert exact.complete


def test_a_broken_exchange_fails_the_stream() -> None:
    asm = StreamAssembler(LIMIT)
    asm.feed(sse(CHAT_EVENTS[:3], done=False), 1.0)
    asm.fail("timeout")
    assert asm.error == "timeout" and not asm.complete


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("stop", "stop"), ("eos_token", "stop"), ("length", "length"), ("max_tokens", "length"),
     ("tool_calls", "tool_calls"), ("function_call", "tool_calls"), ("content_filter", "content_filter"),
     ("abort", "other"), ("", "other")],
)
def test_finish_reasons_are_normalised(reason: str, expected: str) -> None:
    assert normalise_finish_reason(reason) == expected
    assert expected in FINISH_REASONS
