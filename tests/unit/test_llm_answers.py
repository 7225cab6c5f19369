"""The OpenAI stand-in's answers as pure functions: what a test may rely on without a server."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from shadowproxy.models import (
    AGREE_COSINE,
    DIFFER_COSINE,
    OpenAIBehaviour,
    asks_for_tool,
    chat_prompt,
    count_tokens,
    openai_choice,
    openai_cosine,
    openai_differs,
    openai_embedding,
    openai_text,
    openai_tool_arguments,
)


def test_candidate_replaces_every_fourth_word_of_a_differing_prompt_and_keeps_the_rest() -> None:
    prompt = next(f"p{i}" for i in range(1000) if openai_differs(f"p{i}", 0.1))
    production, candidate = openai_text(prompt).split(), openai_text(prompt, 0.1).split()
    assert len(production) == len(candidate) >= 4
    assert [i for i, (a, b) in enumerate(zip(production, candidate, strict=True)) if a != b] == list(
        range(3, len(production), 4)
    )


def test_differing_share_is_the_rate() -> None:
    shares = [sum(openai_differs(f"prompt {i}", rate) for i in range(20_000)) / 20_000 for rate in (0.0, 0.1, 1.0)]
    assert shares[0] == 0.0 and shares[2] == 1.0
    assert abs(shares[1] - 0.1) < 0.01  # 4.7 standard deviations of a binomial share


def test_choice_is_cut_at_max_tokens_with_finish_reason_length() -> None:
    text = openai_text("cut me", index=1)
    words = text.split()
    assert openai_choice("cut me", index=1) == (text, "stop")
    assert openai_choice("cut me", index=1, max_tokens=len(words)) == (text, "stop")
    assert openai_choice("cut me", index=1, max_tokens=2) == (" ".join(words[:2]), "length")


def test_choices_of_one_prompt_differ_by_index() -> None:
    assert len({openai_text("same prompt", index=i) for i in range(8)}) > 1


def test_tokens_are_whitespace_separated_words() -> None:
    assert count_tokens("  one two\tthree\nfour ") == 4
    assert count_tokens("") == 0


def test_chat_prompt_joins_message_texts_one_per_line() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None},
    ]
    assert chat_prompt(messages) == "be brief\nlook at\n"


@pytest.mark.parametrize(
    ("prompt", "asks"),
    [("Use a tool.", True), ("which TOOLS exist?", True), ("a toolbox", False), ("no", False)],
)
def test_a_prompt_asks_for_a_tool_with_the_word_tool(prompt: str, asks: bool) -> None:
    assert asks_for_tool(prompt) is asks


def test_tool_arguments_hold_the_answers_first_four_words_and_the_prompt_length() -> None:
    arguments = orjson.loads(openai_tool_arguments("find the tool now", index=2))
    assert arguments == {"query": " ".join(openai_text("find the tool now", index=2).split()[:4]), "words": 4}


def test_embeddings_are_float32_unit_vectors_at_the_designed_cosine() -> None:
    for i in range(200):
        text = f"text {i}"
        production = np.asarray(openai_embedding(text, dimensions=16))
        candidate = np.asarray(openai_embedding(text, 0.1, dimensions=16))
        assert production.shape == (16,)
        assert np.array_equal(production, production.astype(np.float32))
        assert abs(np.linalg.norm(production) - 1.0) < 1e-6
        designed = DIFFER_COSINE if openai_differs(text, 0.1) else AGREE_COSINE
        assert openai_cosine(text, 0.1) == designed
        assert abs(float(production @ candidate) - designed) < 1e-5
    assert openai_embedding("twin", 0.0) == openai_embedding("twin")
    assert openai_cosine("twin", 0.0) == 1.0


def test_behaviour_defaults_and_validation() -> None:
    production, candidate = OpenAIBehaviour.production(), OpenAIBehaviour.candidate()
    assert (production.first_token_ms, production.inter_token_ms, production.differ_rate) == (50.0, 10.0, 0.0)
    assert (candidate.first_token_ms, candidate.inter_token_ms, candidate.differ_rate) == (80.0, 10.0, 0.1)
    with pytest.raises(ValueError, match="first_token_ms: must be a finite number >= 0, got -1"):
        OpenAIBehaviour(first_token_ms=-1)
    with pytest.raises(ValueError, match="differ_rate: must be between 0 and 1, got 1.5"):
        OpenAIBehaviour(differ_rate=1.5)
