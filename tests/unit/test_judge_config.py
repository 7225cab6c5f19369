"""[judge] and the judge gate in the config: defaults, the keys it requires, and the rules that
tie it to the rest."""

from __future__ import annotations

from typing import Any

import pytest

from shadowproxy.config import JudgeConfig, Secret, parse_config
from shadowproxy.errors import ConfigError

URLS: dict[str, Any] = {"production": {"url": "http://127.0.0.1:8001"}, "candidate": {"url": "http://127.0.0.1:8002"}}
OPENAI: dict[str, Any] = {"preset": "openai"}
JUDGE: dict[str, Any] = {"url": "http://127.0.0.1:8003/v1", "model": "judge"}


def config(**sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {name: dict(table) for name, table in URLS.items()}
    data.update(sections)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    return excinfo.value.problems


def test_no_judge_table_means_no_judge() -> None:
    loaded = parse_config(config())
    assert loaded.judge is None and loaded.gates.min_judge_non_loss_rate is None


def test_judge_defaults() -> None:
    judge = parse_config(config(compare=OPENAI, judge=JUDGE)).judge
    assert judge == JudgeConfig(
        url="http://127.0.0.1:8003/v1", model="judge", headers={}, sample_rate=0.05, max_in_flight=4,
        timeout_s=60.0, max_tokens=16, max_tokens_field="max_tokens", min_judgements=100,
    )
    assert judge.endpoint == "http://127.0.0.1:8003/v1/chat/completions"


def test_a_trailing_slash_on_the_base_url_is_not_doubled() -> None:
    judge = parse_config(config(compare=OPENAI, judge={**JUDGE, "url": "http://j/v1/"})).judge
    assert judge is not None and judge.endpoint == "http://j/v1/chat/completions"


def test_an_empty_judge_table_names_both_required_keys() -> None:
    assert problems(config(compare=OPENAI, judge={})) == ["judge.url: required", "judge.model: required"]


def test_judge_values_are_checked_and_every_problem_named() -> None:
    bad = {**JUDGE, "sample_rate": 1.5, "max_in_flight": 0, "timeout_s": 0, "max_tokens": 0, "min_judgements": 0,
           "url": "ftp://x", "model": ""}
    found = problems(config(compare=OPENAI, judge=bad))
    for key in ("url", "model", "sample_rate", "max_in_flight", "timeout_s", "max_tokens", "min_judgements"):
        assert any(line.startswith(f"judge.{key}: ") for line in found), (key, found)
    assert len(found) == 7


def test_judge_headers_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_AUTH", "Bearer k")
    judge = parse_config(
        config(compare=OPENAI, judge={**JUDGE, "headers": {"Authorization": "env:JUDGE_AUTH"}})
    ).judge
    assert judge is not None and judge.headers == {"Authorization": Secret("Bearer k")}
    monkeypatch.delenv("JUDGE_AUTH")
    found = problems(config(compare=OPENAI, judge={**JUDGE, "headers": {"Authorization": "env:JUDGE_AUTH"}}))
    assert found == ["judge.headers.Authorization: environment variable JUDGE_AUTH is not set"]


def test_the_judge_needs_the_openai_preset() -> None:
    [line] = problems(config(judge=JUDGE))
    assert line.startswith('judge: needs compare.preset = "openai"')


def test_the_judge_gate_needs_a_judge() -> None:
    assert problems(config(compare=OPENAI, gates={"min_judge_non_loss_rate": 0.9})) == [
        "gates.min_judge_non_loss_rate: needs a [judge] table (no judge, no judgements)"
    ]
    loaded = parse_config(config(compare=OPENAI, judge=JUDGE, gates={"min_judge_non_loss_rate": 0.9}))
    assert loaded.gates.min_judge_non_loss_rate == 0.9


def test_the_judge_gate_is_a_share() -> None:
    [line] = problems(config(compare=OPENAI, judge=JUDGE, gates={"min_judge_non_loss_rate": 1.2}))
    assert line == "gates.min_judge_non_loss_rate: must be between 0 and 1, got 1.2"


def test_max_tokens_goes_in_one_of_two_fields() -> None:
    judge = parse_config(config(compare=OPENAI, judge={**JUDGE, "max_tokens_field": "max_completion_tokens"})).judge
    assert judge is not None and judge.max_tokens_field == "max_completion_tokens"
    [line] = problems(config(compare=OPENAI, judge={**JUDGE, "max_tokens_field": "max_output_tokens"}))
    assert line == 'judge.max_tokens_field: must be one of max_tokens, max_completion_tokens, got "max_output_tokens"'
