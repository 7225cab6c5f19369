"""The openai preset's reading and comparison of answers, against truths computed by hand."""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

import pytest

from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.openai import (
    OpenAIChoice,
    Unparsed,
    answer_endpoint,
    compare_openai,
    extract_openai,
    extract_usage,
    openai_endpoint,
    parse_arguments,
)
from shadowproxy.judging.presets import PresetError, extract_predictions
from shadowproxy.judging.stats import ShadowStats


@dataclass(frozen=True)
class Thresholds:
    min_similarity: float = 1.0
    min_cosine: float = 0.99


def chat(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": list(choices)}


def message(index: int, content: str | None, *calls: tuple[str, str], reason: str = "stop") -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(calls)
        ]
    return {"index": index, "message": msg, "finish_reason": reason}


def completions(*texts: str) -> dict[str, Any]:
    return {
        "object": "text_completion",
        "choices": [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)],
    }


# ---------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/serving/llama/v1/completions?api-version=2", "completions"),
        ("/v1/embeddings", "embeddings"),
        (b"/openai/v1/embeddings?x=1", "embeddings"),
        (b"/v1/chat/completions", "chat"),
        ("/v1/models", None),
        ("/v1/chat/completions/extra", None),
        ("/v2/completions", None),
        ("/", None),
        ("/predict?next=/v1/completions", None),
    ],
)
def test_endpoint_is_read_from_the_path_end_whatever_the_prefix(path: str | bytes, endpoint: str | None) -> None:
    assert openai_endpoint(path) == endpoint


# ---------------------------------------------------------------- reading answers


def test_chat_choice_gives_text_tool_calls_and_finish_reason() -> None:
    doc = chat(message(0, "Let me check.", ("get_weather", '{"city": "Oslo"}'), reason="tool_calls"))
    assert extract_openai(doc, "chat") == [
        OpenAIChoice(0, "Let me check.", (("get_weather", {"city": "Oslo"}),), "tool_calls")
    ]


def test_chat_content_null_and_content_parts() -> None:
    doc = chat(
        message(0, None, ("f", "{}")),
        {"index": 1, "message": {"content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                             {"type": "text", "text": "b"}]}},
    )
    got = extract_openai(doc, "chat")
    assert [c.text for c in got] == ["", "ab"]
    assert got[1].finish_reason is None


def test_legacy_function_call_counts_as_a_tool_call() -> None:
    doc = chat({"index": 0, "message": {"content": None, "function_call": {"name": "f", "arguments": "[1]"}}})
    assert extract_openai(doc, "chat")[0].tool_calls == (("f", [1]),)


def test_unparseable_arguments_are_kept_raw() -> None:
    assert parse_arguments('{"a": 1') == Unparsed('{"a": 1')
    assert parse_arguments('"x"') == "x"
    assert parse_arguments({"a": 1}) == {"a": 1}


def test_choices_missing_their_index_take_their_position() -> None:
    doc = {"choices": [{"text": "a"}, {"text": "b"}]}
    assert [(c.index, c.text) for c in extract_openai(doc, "completions")] == [(0, "a"), (1, "b")]


@pytest.mark.parametrize(
    ("doc", "endpoint", "problem"),
    [
        ([], "chat", "not a JSON object"),
        ({"choices": {}}, "chat", "no 'choices' list"),
        ({"choices": [{"index": 0}]}, "chat", "no 'message'"),
        ({"choices": [{"index": 0, "text": 1}]}, "completions", "no 'text'"),
        ({"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]}, "completions", "twice"),
        ({"choices": [{"index": -1, "text": "a"}]}, "completions", "non-negative"),
        ({"choices": [{"index": True, "text": "a"}]}, "completions", "non-negative"),
        ({"data": [{"index": 0, "embedding": [1, "x"]}]}, "embeddings", "not a number"),
        ({"data": [{"index": 0, "embedding": [1, True]}]}, "embeddings", "not a number"),
        ({"data": [{"index": 0, "embedding": "%%%"}]}, "embeddings", "base64"),
        ({"data": [{"index": 0, "embedding": base64.b64encode(b"abcde").decode()}]}, "embeddings", "float32"),
        ({"data": [{"index": 0}]}, "embeddings", "no 'embedding'"),
        ({"choices": []}, "images", "unknown"),
    ],
)
def test_answers_of_the_wrong_shape_are_preset_errors(doc: object, endpoint: str, problem: str) -> None:
    with pytest.raises(PresetError, match=problem):
        extract_openai(doc, endpoint)


def test_batched_prompts_with_n_choices_each_keep_their_indexes() -> None:
    # Two prompts, n = 2: indexes 0, 1 belong to the first prompt, 2, 3 to the second.
    doc = completions("p0c0", "p0c1", "p1c0", "p1c1")
    got = extract_openai(doc, "completions")
    assert [(c.index, c.text) for c in got] == [(0, "p0c0"), (1, "p0c1"), (2, "p1c0"), (3, "p1c1")]


def test_embeddings_as_floats_and_as_base64_read_the_same() -> None:
    values = [0.5, -1.25, 3.0]  # exact in float32
    packed = base64.b64encode(struct.pack("<3f", *values)).decode()
    floats = extract_openai({"object": "list", "data": [{"index": 0, "embedding": values}]}, "embeddings")
    b64 = extract_openai({"object": "list", "data": [{"index": 0, "embedding": packed}]}, "embeddings")
    assert floats == b64 == [OpenAIChoice(0, vector=(0.5, -1.25, 3.0))]


def test_usage_gives_prompt_and_completion_tokens() -> None:
    assert extract_usage({"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}) == (7, 3)
    assert extract_usage({"usage": {"prompt_tokens": 7}}) == (7, None)
    assert extract_usage({"choices": []}) == (None, None)
    assert extract_usage([]) == (None, None)


def test_the_answer_says_which_endpoint_it_came_from() -> None:
    assert answer_endpoint(chat()) == "chat"
    assert answer_endpoint(completions()) == "completions"
    assert answer_endpoint({"object": "list", "data": []}) == "embeddings"
    assert answer_endpoint({"choices": [{"message": {}}]}) == "chat"
    assert answer_endpoint({"choices": [{"text": ""}]}) == "completions"
    assert answer_endpoint({"predictions": []}) is None


def test_the_openai_preset_gives_one_prediction_per_choice() -> None:
    doc = chat(message(0, "hi"), message(1, None, ("f", '{"a": 1}')))
    assert extract_predictions(doc, "openai", "/ignored", "ignored") == [
        "hi",
        {"text": "", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]},
    ]
    assert extract_predictions({"data": [{"embedding": [1, 2]}]}, "openai") == [[1.0, 2.0]]
    with pytest.raises(PresetError):
        extract_predictions({"predictions": [1]}, "openai")


# ---------------------------------------------------------------- comparing text


def compare_chat(prod: dict[str, Any], cand: dict[str, Any], **thresholds: float) -> Any:
    return compare_openai(extract_openai(prod, "chat"), extract_openai(cand, "chat"), Thresholds(**thresholds))


def test_equal_texts_agree_after_whitespace_normalisation() -> None:
    out = compare_chat(chat(message(0, " Hello\n world ")), chat(message(0, "Hello world")))
    assert (out.agree, out.disagree, out.flags, out.similarity) == (1, 0, [True], [1.0])


def test_similarity_is_difflibs_ratio_and_the_threshold_is_inclusive() -> None:
    # "abcd" / "abce": the longest match "abc" is 3 of 4 + 4 characters: 2 * 3 / 8 = 0.75.
    prod, cand = chat(message(0, "abcd")), chat(message(0, "abce"))
    assert compare_chat(prod, cand).similarity == [0.75]
    assert compare_chat(prod, cand, min_similarity=0.75).flags == [True]
    assert compare_chat(prod, cand, min_similarity=0.76).flags == [False]
    assert compare_chat(prod, cand, min_similarity=1.0).flags == [False]


def test_choices_pair_by_index_not_by_position() -> None:
    prod = completions("first", "second")
    cand = {"choices": [{"index": 1, "text": "second"}, {"index": 0, "text": "first"}]}
    out = compare_openai(extract_openai(prod, "completions"), extract_openai(cand, "completions"), Thresholds())
    assert out.flags == [True, True]


def test_batched_prompts_and_n_compare_choice_by_choice() -> None:
    prod = completions("a", "b", "c", "d", "e", "f")  # 3 prompts, n = 2
    cand = completions("a", "B", "c", "d", "x", "f")
    out = compare_openai(extract_openai(prod, "completions"), extract_openai(cand, "completions"), Thresholds())
    assert out.flags == [True, False, True, True, False, True]
    assert (out.agree, out.disagree) == (4, 2)
    assert len(out.similarity) == 6


def test_a_choice_only_one_side_has_is_a_disagreement() -> None:
    prod = extract_openai(completions("a", "b"), "completions")
    cand = extract_openai(completions("a"), "completions")
    out = compare_openai(prod, cand, Thresholds())
    assert out.flags == [True, False]
    out = compare_openai(cand, prod, Thresholds())
    assert out.flags == [True, False]
    assert out.similarity == [1.0]  # nothing to measure against a missing choice


def test_no_choices_on_either_side_is_no_comparison() -> None:
    out = compare_openai([], [], Thresholds())
    assert (out.agree, out.disagree, out.flags) == (0, 0, [])


# ---------------------------------------------------------------- tool calls


def test_tool_calls_agree_on_names_in_order_and_parsed_arguments() -> None:
    prod = chat(message(0, None, ("search", '{"q": "x", "limit": 5}'), ("open", '{"id": 1}')))
    cand = chat(message(0, None, ("search", '{ "limit": 5.0, "q": "x" }'), ("open", '{"id":1}')))
    out = compare_chat(prod, cand)
    assert out.flags == [True]
    assert (out.tool_calls_compared, out.tool_calls_agree) == (1, 1)
    assert out.similarity == []  # both only call tools: no text pair to measure


@pytest.mark.parametrize(
    ("cand_calls", "why"),
    [
        ((("open", '{"id": 1}'), ("search", '{"q": "x"}')), "order"),
        ((("search", '{"q": "y"}'), ("open", '{"id": 1}')), "argument value"),
        ((("search", '{"q": "x"}'),), "one call missing"),
        ((("search", '{"q": "x"}'), ("open", '{"id": true}')), "true is not 1"),
        ((("search", '{"q": "x"}'), ("Open", '{"id": 1}')), "name case"),
    ],
)
def test_tool_calls_that_differ_disagree(cand_calls: tuple[tuple[str, str], ...], why: str) -> None:
    prod = chat(message(0, None, ("search", '{"q": "x"}'), ("open", '{"id": 1}')))
    out = compare_chat(prod, chat(message(0, None, *cand_calls)))
    assert out.flags == [False], why
    assert (out.tool_calls_compared, out.tool_calls_agree) == (1, 0)


def test_tool_call_on_one_side_only_disagrees_even_with_equal_text() -> None:
    out = compare_chat(chat(message(0, "ok", ("f", "{}"))), chat(message(0, "ok")))
    assert out.flags == [False]
    assert out.similarity == [1.0]
    assert (out.tool_calls_compared, out.tool_calls_agree) == (1, 0)


def test_unparseable_arguments_compare_as_raw_strings() -> None:
    broken = '{"q": "x"'
    assert compare_chat(chat(message(0, None, ("f", broken))), chat(message(0, None, ("f", broken)))).flags == [True]
    assert compare_chat(chat(message(0, None, ("f", broken))), chat(message(0, None, ("f", broken + " ")))).flags == [
        False
    ]
    # '"{"' parses to the string "{", which is not the raw, unparseable "{".
    assert compare_chat(chat(message(0, None, ("f", '"{"'))), chat(message(0, None, ("f", "{")))).flags == [False]


def test_text_and_tool_calls_must_both_agree() -> None:
    prod = chat(message(0, "abcd", ("f", "{}")))
    out = compare_chat(prod, chat(message(0, "abce", ("f", "{}"))), min_similarity=0.7)
    assert out.flags == [True]
    out = compare_chat(prod, chat(message(0, "abce", ("g", "{}"))), min_similarity=0.7)
    assert out.flags == [False]
    assert out.similarity == [0.75]


# ---------------------------------------------------------------- embeddings


def embeddings(*vectors: list[float]) -> list[OpenAIChoice]:
    return extract_openai({"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}, "embeddings")


def test_embeddings_agree_at_or_above_min_cosine() -> None:
    # cos([1, 0], [1, 1]) = 1 / sqrt(2); cos([3, 4], [4, 3]) = 24 / 25.
    prod = embeddings([1, 0], [3, 4], [0.1, 0.2])
    cand = embeddings([1, 1], [4, 3], [0.1, 0.2])
    out = compare_openai(prod, cand, Thresholds(min_cosine=0.96))
    assert out.flags == [False, True, True]
    assert out.cosine == pytest.approx([1 / math.sqrt(2), 0.96, 1.0], abs=1e-12)
    assert compare_openai(prod, cand, Thresholds(min_cosine=0.7)).flags == [True, True, True]
    assert compare_openai(prod, cand, Thresholds(min_cosine=0.97)).flags == [False, False, True]


def test_embeddings_of_different_length_or_zero_disagree() -> None:
    out = compare_openai(embeddings([1, 2], [0, 0], [0, 0]), embeddings([1, 2, 3], [1, 0], [0, 0]), Thresholds())
    assert out.flags == [False, False, True]  # equal zero vectors are the same answer
    assert out.cosine == []


def test_embeddings_record_no_text_figures() -> None:
    out = compare_openai(embeddings([1, 2]), embeddings([1, 2]), Thresholds())
    assert (out.similarity, out.tool_calls_compared) == ([], 0)


# ---------------------------------------------------------------- kind "text" and min_similarity


def test_text_kind_at_one_is_equality_as_before() -> None:
    out = compare_predictions("text", ["a b", "abcd"], ["a  b", "abce"], 0, 0)
    assert out.flags == [True, False]
    assert out.flags == compare_predictions("text", ["a b", "abcd"], ["a  b", "abce"], 0, 0, 1.0).flags


def test_text_kind_below_one_agrees_at_that_similarity() -> None:
    out = compare_predictions("text", ["abcd", "abcd"], ["abce", "wxyz"], 0, 0, 0.75)
    assert out.flags == [True, False]
    assert out.similarity == [0.75, 0.0]


def test_long_rearranged_texts_never_agree_at_one() -> None:
    # Beyond 4096 characters similarity is difflib's quick_ratio, which is 1.0 for any
    # rearrangement of the same characters; at 1.0 agreement stays equality.
    a = "ab" * 3000
    b = "ba" * 3000
    out = compare_predictions("text", [a], [b], 0, 0)
    assert out.flags == [False]
    assert out.similarity == [1.0]
    assert compare_predictions("text", [a], [b], 0, 0, 0.99).flags == [True]


def test_tool_call_counts_reach_the_stats_and_merge_by_adding() -> None:
    prod = chat(message(0, None, ("f", "{}")), message(1, None, ("f", "{}")), message(2, "plain"))
    cand = chat(message(0, None, ("f", "{}")), message(1, None, ("g", "{}")), message(2, "plain"))
    result = compare_chat(prod, cand)
    one, two = ShadowStats(), ShadowStats()
    one.record_comparison(result, "text")
    two.record_comparison(result, "text")
    two.record_comparison(result, "text")
    assert one.snapshot()["comparisons"]["tool_calls"] == {"compared": 2, "agree": 1}
    merged = ShadowStats.from_states([one.snapshot(full=True), two.snapshot(full=True)])
    assert merged.snapshot()["comparisons"]["tool_calls"] == {"compared": 6, "agree": 3}
    assert (merged.agree, merged.disagree) == (6, 3)
