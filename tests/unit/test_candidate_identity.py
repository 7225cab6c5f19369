"""Config of the openai preset and of the candidate's own identity (`[candidate] model`, `headers`),
and the rewrite of the candidate's copy of a request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from shadowproxy.commands.cli import summary
from shadowproxy.config import Secret, parse_config
from shadowproxy.errors import ConfigError
from shadowproxy.shadow.rewrite import CandidateRewrite

URLS: dict[str, Any] = {
    "production": {"url": "http://127.0.0.1:8001"},
    "candidate": {"url": "http://127.0.0.1:8002"},
}


def with_urls(**sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {name: dict(table) for name, table in URLS.items()}
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    return excinfo.value.problems


# ---------------------------------------------------------------- [compare]


def test_openai_preset_and_thresholds_load() -> None:
    compare = parse_config(with_urls(compare={"preset": "openai", "min_similarity": 0.8, "min_cosine": 0})).compare
    assert (compare.preset, compare.min_similarity, compare.min_cosine) == ("openai", 0.8, 0.0)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("min_similarity", 1.5, "compare.min_similarity: must be between 0 and 1, got 1.5"),
        ("min_similarity", -0.1, "compare.min_similarity: must be between 0 and 1, got -0.1"),
        ("min_cosine", -2, "compare.min_cosine: must be between -1 and 1, got -2"),
        ("min_cosine", "high", 'compare.min_cosine: expected a number, got string "high"'),
    ],
)
def test_thresholds_out_of_range_are_reported(key: str, value: object, problem: str) -> None:
    assert problems_of(with_urls(compare={key: value})) == [problem]


def test_summary_says_what_openai_ignores() -> None:
    text = summary(parse_config(with_urls(compare={"preset": "openai", "kind": "numeric"})))
    notes = [line for line in text.splitlines() if "ignored" in line]
    assert notes == ["  note: compare.kind, compare.path and compare.output are ignored under preset openai"]
    assert "kind numeric" not in text
    assert "ignored" not in summary(parse_config(with_urls()))


# ---------------------------------------------------------------- [candidate] model, headers


def test_model_and_headers_default_to_no_change() -> None:
    candidate = parse_config(with_urls()).candidate
    assert (candidate.model, dict(candidate.headers)) == ("", {})
    assert CandidateRewrite.from_config(candidate) is None


def test_header_values_written_out_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAND_KEY", "Bearer sk-candidate")
    candidate = parse_config(
        with_urls(candidate={"model": "m-2", "headers": {"Authorization": "env:CAND_KEY", "X-Team": "ml ops"}})
    ).candidate
    assert candidate.model == "m-2"
    assert dict(candidate.headers) == {"Authorization": Secret("Bearer sk-candidate"), "X-Team": Secret("ml ops")}
    assert "sk-candidate" not in repr(candidate)


def test_header_value_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("Bearer from-file\n")
    candidate = parse_config(with_urls(candidate={"headers": {"Authorization": f"file:{secret}"}})).candidate
    assert candidate.headers["Authorization"].value == "Bearer from-file"


def test_missing_environment_variable_names_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("EMPTY_KEY", "")
    problems = problems_of(
        with_urls(candidate={"headers": {"Authorization": "env:OPENAI_API_KEY", "X-Other": "env:EMPTY_KEY"}})
    )
    assert problems == [
        "candidate.headers.Authorization: environment variable OPENAI_API_KEY is not set",
        "candidate.headers.X-Other: environment variable EMPTY_KEY is empty",
    ]


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Host": "x"}, "candidate.headers.Host: set by the proxy; cannot be configured"),
        ({"content-length": "1"}, "candidate.headers.content-length: set by the proxy; cannot be configured"),
        ({"Connection": "close"}, "candidate.headers.Connection: set by the proxy; cannot be configured"),
        ({"X-Shadow-Request": "no"}, "candidate.headers.X-Shadow-Request: set by the proxy; cannot be configured"),
        ({"Bad Name": "x"}, "candidate.headers.Bad Name: must be an HTTP header name (an RFC 9110 token)"),
        ({"X-A": "a\r\nX-Injected: 1"},
         "candidate.headers.X-A: must be visible ASCII characters, with spaces or tabs only between them"),
        ({"X-A": 1}, "candidate.headers.X-A: expected a string, got integer 1"),
        ({"X-A": "1", "x-a": "2"}, "candidate.headers.x-a: named twice (header names are case-insensitive)"),
    ],
)
def test_bad_headers_are_reported_by_name(headers: dict[str, object], problem: str) -> None:
    assert problems_of(with_urls(candidate={"headers": headers})) == [problem]


def test_headers_must_be_a_table() -> None:
    assert problems_of(with_urls(candidate={"headers": ["Authorization"]})) == [
        "candidate.headers: expected a table of header names to values, got array"
    ]


def test_environment_header_error_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[production]\nurl = "http://127.0.0.1:8001"\n[candidate]\nurl = "http://127.0.0.1:8002"\n'
        '[candidate.headers]\nAuthorization = "env:SHADOWPROXY_TEST_UNSET_KEY"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_TEST_UNSET_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: candidate.headers.Authorization: environment variable SHADOWPROXY_TEST_UNSET_KEY is not set"
    ]


# ---------------------------------------------------------------- the rewrite


FIELDS = b"Content-Type: application/json\r\nauthorization: Bearer client\r\nX-Request-ID: r1\r\n"


def test_headers_replace_the_clients_case_insensitively_and_are_added_when_absent() -> None:
    rewrite = CandidateRewrite("", {"Authorization": "Bearer cand", "X-Tenant": "t9"})
    assert rewrite.fields(FIELDS) == (
        b"Content-Type: application/json\r\nX-Request-ID: r1\r\nAuthorization: Bearer cand\r\nX-Tenant: t9\r\n"
    )
    assert rewrite.body(b'{"model": "a"}') == b'{"model": "a"}'  # no model set: body as it is


def test_model_replaces_the_json_model_and_keeps_the_rest() -> None:
    rewrite = CandidateRewrite("cand-model", {})
    body = b'{"model": "prod-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}'
    out = rewrite.body(body)
    assert orjson.loads(out) == {**orjson.loads(body), "model": "cand-model"}
    assert rewrite.fields(FIELDS) is FIELDS
    assert orjson.loads(rewrite.body(b'{"input": "x"}')) == {"input": "x", "model": "cand-model"}


@pytest.mark.parametrize(
    "body", [b"", b"not json", b'["model"]', b'"model"', b'{"model": NaN}', b'{"model": "cand-model"}']
)
def test_bodies_that_are_not_json_objects_or_already_right_stay_byte_identical(body: bytes) -> None:
    assert CandidateRewrite("cand-model", {}).body(body) is body
