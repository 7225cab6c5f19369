"""The judge's words (judging/judge.py), its counts (judging/judgestats.py) and its gate
(judging/verdict.py): strict reading of replies, exact merging, three-way decisions."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import orjson
import pytest

from shadowproxy.config import GatesConfig
from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.judge import (
    JUDGE_SYSTEM_PROMPT,
    judge_request,
    read_reply,
    render_answer,
    render_request,
    result_of,
)
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate


def reply(content: object = "A", finish: str | None = "stop", refusal: object = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal},
                         "finish_reason": finish}]}


@pytest.mark.parametrize(
    ("content", "token"),
    [("A", "A"), ("B", "B"), ("TIE", "TIE"), (" A\n", "A"), ("TIE.", "TIE"), ("\n\nB . ", "B")],
)
def test_the_three_tokens_are_read_with_whitespace_and_one_period_around(content: str, token: str) -> None:
    read = read_reply(reply(content))
    assert (read.token, read.error) == (token, "")


@pytest.mark.parametrize(
    "content",
    ["a", "tie", "Tie", "A or B", "Answer A", "A.." , "**A**", "", "AB", "A\nB", None, 1, "B is better."],
)
def test_anything_else_is_unparseable_never_a_tie(content: object) -> None:
    read = read_reply(reply(content))
    assert (read.token, read.error) == ("", "unparseable")


def test_a_cut_off_reply_is_truncated_even_when_its_text_is_a_token() -> None:
    assert read_reply(reply("A", finish="length")).error == "truncated"


def test_refusals_are_refusals() -> None:
    assert read_reply(reply(None, refusal="I can't help with that.")).error == "refusal"
    assert read_reply(reply("A", finish="content_filter")).error == "refusal"
    assert read_reply(reply("A", refusal="")).token == "A"  # an empty refusal field is no refusal


@pytest.mark.parametrize("doc", [[], {}, {"choices": []}, {"choices": ["x"]}, {"choices": [{"message": "A"}]}, "A"])
def test_an_answer_that_is_not_a_chat_completion_is_malformed(doc: object) -> None:
    assert read_reply(doc).error == "malformed"


@pytest.mark.parametrize(
    ("token", "candidate_first", "result"),
    [("A", True, "candidate_better"), ("B", True, "production_better"), ("A", False, "production_better"),
     ("B", False, "candidate_better"), ("TIE", True, "tie"), ("TIE", False, "tie")],
)
def test_a_token_means_the_answer_in_that_position(token: str, candidate_first: bool, result: str) -> None:
    assert result_of(token, candidate_first) == result


def test_the_request_names_neither_model_and_puts_the_candidate_where_drawn() -> None:
    for candidate_first in (True, False):
        doc = judge_request("j", 16, "user: hi", "PROD ANSWER", "CAND ANSWER", candidate_first)
        assert doc["model"] == "j" and doc["max_tokens"] == 16
        assert doc["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
        user = doc["messages"][1]["content"]
        first, second = ("CAND", "PROD") if candidate_first else ("PROD", "CAND")
        assert f"[Answer A]\n{first} ANSWER\n[End of Answer A]" in user
        assert f"[Answer B]\n{second} ANSWER\n[End of Answer B]" in user
        assert "candidate" not in user.lower() and "production" not in user.lower()
        assert "candidate" not in JUDGE_SYSTEM_PROMPT.lower() and "production" not in JUDGE_SYSTEM_PROMPT.lower()


def test_requests_are_rendered_as_the_judge_reads_them() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image_url"}]}]}
    assert render_request(orjson.dumps(chat), "chat") == "system: be brief\nuser: what is [image_url]"
    assert render_request(orjson.dumps({"prompt": "once upon"}), "completions") == "once upon"
    assert render_request(orjson.dumps({"prompt": ["a", "b"]}), "completions") == "prompt 1: a\nprompt 2: b"
    assert render_request(b"not json", "chat") == "not json"


def test_answers_are_rendered_with_tool_calls_and_choices() -> None:
    assert render_answer(["hello"]) == "hello"
    call = {"text": "", "tool_calls": [{"name": "lookup", "arguments": {"q": 1}}]}
    assert render_answer([call]) == '[tool call] lookup({"q":1})'
    assert render_answer(["x", "y"]) == "[choice 1]\nx\n[choice 2]\ny"


# -- counts -------------------------------------------------------------------------------------


def judgements(seed: int, n: int) -> list[tuple[str, bool, int, int]]:
    rng = random.Random(seed)
    return [
        (rng.choice(["candidate_better", "tie", "production_better"]), rng.random() < 0.5, rng.randint(0, 50),
         rng.randint(0, 50))
        for _ in range(n)
    ]


def stats_with(items: list[tuple[str, bool, int, int]], errors: tuple[str, ...] = (), dropped: int = 0) -> ShadowStats:
    stats = ShadowStats()
    stats.judge.enable(100)
    for item in items:
        stats.judge.record_judgement(*item)
    for kind in errors:
        stats.judge.record_error(kind)
    stats.judge.dropped = dropped
    stats.judge.sampled = len(items) + len(errors) + dropped
    return stats


def test_the_block_counts_from_its_definition() -> None:
    items = judgements(3, 200)
    block = stats_with(items, ("timeout", "timeout", "refusal"), dropped=4).snapshot()["judge"]
    wins = sum(r == "candidate_better" for r, *_ in items)
    ties = sum(r == "tie" for r, *_ in items)
    assert block["judged"] == 200 and block["sampled"] == 207 and block["dropped"] == 4
    assert (block["candidate_better"], block["tie"]) == (wins, ties)
    assert block["errors"]["timeout"] == 2 and block["errors"]["refusal"] == 1
    assert block["non_loss_rate"] == pytest.approx((wins + ties) / 200)
    assert block["non_loss_ci95"] == list(wilson_interval(wins + ties, 200))
    a = [item for item in items if item[1]]
    assert block["by_position"]["candidate_a"]["judged"] == len(a)
    assert block["by_position"]["candidate_a"]["candidate_better"] == sum(r == "candidate_better" for r, *_ in a)
    picked_a = sum((r == "candidate_better") == first for r, first, *_ in items if r != "tie")
    assert block["by_position"]["a_preferred"]["a"] == picked_a
    assert block["by_position"]["a_preferred"]["decisive"] == 200 - ties
    longer = sum(
        (c > p) == (r == "candidate_better") for r, _, c, p in items if r != "tie" and c != p
    )
    assert block["length"]["longer_preferred"] == longer
    assert block["length"]["candidate_chars"] == sum(c for *_, c, _ in items)


def test_no_judge_no_block() -> None:
    stats = ShadowStats()
    assert "judge" not in stats.snapshot() and "judge" not in stats.to_state()


def test_workers_and_replicas_merge_exactly() -> None:
    items = judgements(5, 300)
    whole = stats_with(items, ("status",) * 3, dropped=2).snapshot(full=True)
    parts = [stats_with(items[:100], ("status",), dropped=2), stats_with(items[100:250]),
             stats_with(items[250:], ("status", "status"))]
    merged = ShadowStats.from_states(orjson.loads(orjson.dumps(p.snapshot(full=True))) for p in parts)
    assert merged.snapshot()["judge"] == whole["judge"]


def test_a_state_without_a_judge_merges_with_one_that_has_it() -> None:
    states = [ShadowStats().snapshot(full=True), stats_with(judgements(1, 10)).snapshot(full=True)]
    merged = ShadowStats.from_states(states)
    assert merged.snapshot()["judge"]["judged"] == 10


# -- the gate -----------------------------------------------------------------------------------


def gate_of(snapshot: dict[str, Any], threshold: float | None) -> dict[str, Any] | None:
    gates = dataclasses.replace(GatesConfig(), min_samples=1, min_judge_non_loss_rate=threshold)
    found = [g for g in evaluate(snapshot, gates)["gates"] if g["name"] == "min_judge_non_loss_rate"]
    return found[0] if found else None


def fixed(wins: int, ties: int, losses: int, min_judgements: int = 100) -> dict[str, Any]:
    stats = ShadowStats()
    stats.judge.enable(min_judgements)
    for result, n in (("candidate_better", wins), ("tie", ties), ("production_better", losses)):
        for i in range(n):
            stats.judge.record_judgement(result, i % 2 == 0, 10, 10)
    return stats.snapshot()


def test_unset_gate_is_absent() -> None:
    assert gate_of(fixed(10, 10, 10), None) is None


def test_the_gate_waits_for_min_judgements() -> None:
    gate = gate_of(fixed(0, 0, 99), 0.5)
    assert gate is not None and gate["passed"] is None and gate["reason"] == "waiting: 99 of 100 judgements"


@pytest.mark.parametrize(
    ("wins", "ties", "losses", "passed"),
    [(150, 40, 10, True),   # 95% non-loss, lower bound about 91%: above 0.9
     (100, 30, 70, False),  # 65%, upper bound about 71%: below 0.9
     (120, 60, 20, None)],  # 90%: the interval holds 0.9
)
def test_the_gate_decides_three_ways_on_the_wilson_interval(
    wins: int, ties: int, losses: int, passed: bool | None
) -> None:
    gate = gate_of(fixed(wins, ties, losses), 0.9)
    assert gate is not None and gate["passed"] is passed
    lo, hi = wilson_interval(wins + ties, wins + ties + losses)
    assert gate["interval"] == [lo, hi]
    assert gate["value"] == pytest.approx((wins + ties) / (wins + ties + losses))


def test_a_failing_judge_gate_fails_the_verdict() -> None:
    gates = dataclasses.replace(GatesConfig(), min_samples=1, min_judge_non_loss_rate=0.9)
    assert evaluate(fixed(10, 10, 80), gates)["verdict"] == "fail"
