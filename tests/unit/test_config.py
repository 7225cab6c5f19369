from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shadowproxy.config import (
    CandidateConfig,
    Config,
    DriftConfig,
    GatesConfig,
    ProductionConfig,
    Secret,
    StoreConfig,
    UpstreamURL,
    load_config,
    parse_config,
    parse_upstream_url,
)
from shadowproxy.errors import ConfigError, ShadowProxyError
from tests.helpers import ROOT

EXAMPLE = ROOT / "config" / "shadowproxy.toml"
URLS: dict[str, Any] = {
    "production": {"url": "http://127.0.0.1:8001"},
    "candidate": {"url": "http://127.0.0.1:8002"},
}


def with_urls(**sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal valid config (the two URLs), with `sections` merged over it."""
    data: dict[str, Any] = {name: dict(table) for name, table in URLS.items()}
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    return excinfo.value.problems


def only_problem(data: dict[str, Any]) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def uncomment_all(text: str) -> str:
    """The example with its commented-out settings (`# key = value`, `# [table]`) switched on."""
    return re.sub(r"(?m)^# (\[\w+\]|\w+ = )", r"\1", text)


# --- defaults and the example file -----------------------------------------------------------------


def test_defaults_are_the_documented_values() -> None:
    config = parse_config(URLS)
    got = dataclasses.asdict(config)
    # The old [candidate] table is the one candidate named "candidate", at mirror.sample_rate.
    assert got.pop("candidates") == ({**got["candidate"], "name": "candidate", "sample_rate": None},)
    assert got.pop("slices") == ()
    assert got == {
        "listen": {
            "host": "0.0.0.0",
            "port": 8080,
            "max_body_bytes": 10485760,
            "drain_timeout_s": 15.0,
            "max_header_bytes": 65536,
            "header_timeout_s": 10.0,
            "keepalive_timeout_s": 75.0,
            "shutdown_delay_s": 0.0,
            "lingering_time_s": 30.0,
            "lingering_timeout_s": 5.0,
            "max_connections": None,
            "grpc_port": None,
            "grpc_cert_file": "",
            "grpc_key_file": "",
        },
        "admin": {"host": "127.0.0.1", "port": 9090, "token": {"value": "", "path": ""}},
        "production": {
            "url": "http://127.0.0.1:8001",
            "timeout_s": 10.0,
            "max_connections": 1024,
            "pool_idle_timeout_s": 4.0,
            "grpc_url": None,
            "ca_file": "",
            "tls_verify": True,
            "price": None,
        },
        "candidate": {
            "url": "http://127.0.0.1:8002",
            "timeout_s": 10.0,
            "max_in_flight": 256,
            "backoff_after": 5,
            "grpc_url": None,
            "ca_file": "",
            "tls_verify": True,
            "price": None,
            "stream_timeout_s": 600.0,
            "stream_idle_timeout_s": 60.0,
            "model": "",
            "headers": {},
        },
        "mirror": {"sample_rate": 0.1, "sticky_header": "", "methods": ("POST",), "max_body_bytes": 1048576},
        "compare": {
            "preset": "kserve-v1",
            "path": "",
            "kind": "label",
            "abs_tol": 1e-6,
            "rel_tol": 1e-3,
            "output": "",
            "min_similarity": 1.0,
            "min_cosine": 0.99,
            "noise_threshold": 0.01,
            "max_response_bytes": 1048576,
        },
        "gates": {
            "min_samples": 500,
            "max_disagreement_rate": 0.02,
            "max_p99_latency_ratio": 1.25,
            "max_error_rate_delta": 0.01,
            "max_ttft_p99_ratio": 1.25,
            "min_labels": 100,
            "min_accuracy_delta": None,
            "min_judge_non_loss_rate": None,
        },
        "store": {
            "path": "",
            "sample_rate": 0.05,
            "flush_interval_s": 0.2,
            "max_rows": 1000000,
            "max_age_days": 30,
            "store_bodies": False,
            "redact": (),
            "version_header": "X-Model-Version",
            "version_path": "",
        },
        "record": {
            "path": "",
            "sample_rate": 1.0,
            "max_file_bytes": 64 * 1024 * 1024,
            "max_total_bytes": 1024 * 1024 * 1024,
            "redact": (),
            "drop_headers": ("Authorization", "Cookie", "Proxy-Authorization", "X-Api-Key"),
            "max_body_bytes": 1024 * 1024,
            "version_header": "X-Model-Version",
        },
        "drift": None,
        "judge": None,
        "secondary": None,
    }


def test_drift_defaults_are_the_documented_values_when_table_present() -> None:
    config = parse_config(with_urls(drift={}))
    assert config.drift == DriftConfig(
        baseline="", warmup=5000, sample_rate=1.0, window=10000, features=(), max_features=100
    )


def test_config_defaults_every_section_but_the_urls() -> None:
    config = Config(production=ProductionConfig("http://a"), candidate=CandidateConfig("http://b"))
    assert config.store == StoreConfig()
    assert config.drift is None


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.production.url == "http://127.0.0.1:8001"
    assert config.candidate.url == "http://127.0.0.1:8002"
    assert (config.listen.port, config.admin.port) == (8080, 9090)
    assert config.drift is None


def test_example_file_holds_the_defaults() -> None:
    assert load_config(EXAMPLE) == parse_config(URLS)


def example_switched_on() -> dict[str, Any]:
    """The example with every commented-out setting on; [judge] judges LLM answers only."""
    data = tomllib.loads(uncomment_all(EXAMPLE.read_text()))
    data["compare"]["preset"] = "openai"
    return data


def test_example_file_documents_every_key() -> None:
    data = example_switched_on()
    config = parse_config(data)
    for section in dataclasses.fields(config):
        if isinstance(getattr(config, section.name), tuple):
            continue  # [[candidates]] and [[slices]]: test_example_arrays_of_tables_document_every_key
        keys = {f.name for f in dataclasses.fields(getattr(config, section.name))}
        assert set(data[section.name]) == keys, section.name


def test_example_commented_out_settings_load_when_switched_on() -> None:
    config = parse_config(example_switched_on())
    assert config.drift == DriftConfig()
    assert config.gates.min_accuracy_delta == -0.01
    assert config.gates.min_judge_non_loss_rate == 0.9
    assert config.judge is not None and config.judge.endpoint == "https://api.openai.com/v1/chat/completions"


# --- conversions -------------------------------------------------------------------------------------


def test_float_keys_accept_integers() -> None:
    config = parse_config(with_urls(listen={"drain_timeout_s": 5}))
    assert config.listen.drain_timeout_s == 5.0
    assert isinstance(config.listen.drain_timeout_s, float)


def test_mirror_methods_are_upper_cased_tuple() -> None:
    config = parse_config(with_urls(mirror={"methods": ["post", "Put"]}))
    assert config.mirror.methods == ("POST", "PUT")


def test_lists_become_tuples() -> None:
    config = parse_config(with_urls(store={"redact": ["/a", "/b/0"]}, drift={"features": ["f0"]}))
    assert config.store.redact == ("/a", "/b/0")
    assert config.drift is not None and config.drift.features == ("f0",)


def test_min_accuracy_delta_set_enables_value() -> None:
    assert parse_config(with_urls(gates={"min_accuracy_delta": -0.01})).gates == GatesConfig(
        min_accuracy_delta=-0.01
    )


def test_config_is_frozen() -> None:
    config = parse_config(URLS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mirror.sample_rate = 0.5  # type: ignore[misc]


def test_admin_token_is_not_in_repr() -> None:
    config = parse_config(with_urls(admin={"token": "s3cret"}))
    assert config.admin.token.value == "s3cret"
    assert "s3cret" not in repr(config)


def test_admin_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHADOWPROXY_TEST_TOKEN", "s3cret")
    config = parse_config(with_urls(admin={"token": "env:SHADOWPROXY_TEST_TOKEN"}))
    assert config.admin.token == Secret("s3cret")
    assert "s3cret" not in repr(config)


def test_admin_token_from_a_missing_environment_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHADOWPROXY_TEST_TOKEN", raising=False)
    assert only_problem(with_urls(admin={"token": "env:SHADOWPROXY_TEST_TOKEN"})) == (
        "admin.token: environment variable SHADOWPROXY_TEST_TOKEN is not set"
    )


def test_admin_token_from_an_empty_environment_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHADOWPROXY_TEST_TOKEN", "")
    assert only_problem(with_urls(admin={"token": "env:SHADOWPROXY_TEST_TOKEN"})) == (
        "admin.token: environment variable SHADOWPROXY_TEST_TOKEN is empty"
    )


def test_admin_token_from_a_file_drops_the_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    config = parse_config(with_urls(admin={"token": f"file:{path}"}))
    assert config.admin.token == Secret("s3cret", str(path))


def test_admin_token_from_a_file_that_cannot_be_read_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    assert only_problem(with_urls(admin={"token": f"file:{path}"})) == (
        f"admin.token: cannot read file {path}: No such file or directory"
    )


def test_admin_token_from_an_empty_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    assert only_problem(with_urls(admin={"token": f"file:{path}"})) == f"admin.token: file {path} is empty"


def test_admin_token_from_a_file_is_checked_as_a_written_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("two words\n")
    assert only_problem(with_urls(admin={"token": f"file:{path}"})) == (
        f"admin.token: file {path}: must be visible ASCII characters without spaces"
    )


@pytest.mark.parametrize("token", ["env:", "file:"])
def test_admin_token_source_without_a_name_is_reported(token: str) -> None:
    assert only_problem(with_urls(admin={"token": token})).startswith(f'admin.token: "{token}" must be followed by')


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True), ("LOCALHOST", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("proxy.internal", False)],
)
def test_admin_host_is_loopback_only_for_loopback_addresses_and_localhost(host: str, loopback: bool) -> None:
    config = parse_config(with_urls(admin={"host": host}))
    assert config.admin.loopback is loopback
    assert (config.admin.open_warning() is None) is loopback


def test_a_token_silences_the_open_admin_warning() -> None:
    assert parse_config(with_urls(admin={"host": "0.0.0.0", "token": "s3cret"})).admin.open_warning() is None


# --- problems, one line each, naming the key ---------------------------------------------------------


def test_unknown_key_is_reported() -> None:
    assert only_problem(with_urls(listen={"prot": 80})).startswith("listen.prot: unknown key")


def test_unknown_key_suggests_the_close_one() -> None:
    assert only_problem(with_urls(listen={"prot": 80})) == 'listen.prot: unknown key (did you mean "port"?)'


def test_unknown_section_is_reported() -> None:
    assert only_problem(with_urls(foo={"x": 1})) == "foo: unknown section"


def test_unknown_top_level_key_is_reported() -> None:
    assert only_problem(with_urls() | {"port": 80}) == "port: unknown key"


def test_section_that_is_not_a_table_is_reported() -> None:
    assert only_problem(with_urls() | {"mirror": 3}) == "mirror: expected a table, got integer 3"


def test_string_for_integer_is_reported() -> None:
    assert (
        only_problem(with_urls(listen={"port": "80"})) == 'listen.port: expected an integer, got string "80"'
    )


def test_bool_for_integer_is_reported() -> None:
    assert (
        only_problem(with_urls(listen={"port": True})) == "listen.port: expected an integer, got boolean true"
    )


def test_float_for_integer_is_reported() -> None:
    assert only_problem(with_urls(gates={"min_samples": 1.5})) == (
        "gates.min_samples: expected an integer, got float 1.5"
    )


def test_bool_for_float_is_reported() -> None:
    assert only_problem(with_urls(mirror={"sample_rate": False})) == (
        "mirror.sample_rate: expected a number, got boolean false"
    )


def test_wrong_type_for_string_is_reported() -> None:
    assert only_problem(with_urls(compare={"kind": 1})) == "compare.kind: expected a string, got integer 1"


def test_wrong_type_for_bool_is_reported() -> None:
    assert only_problem(with_urls(store={"store_bodies": "yes"})) == (
        'store.store_bodies: expected a boolean, got string "yes"'
    )


def test_wrong_type_for_list_is_reported() -> None:
    assert only_problem(with_urls(mirror={"methods": "POST"})) == (
        'mirror.methods: expected an array of strings, got string "POST"'
    )


def test_wrong_type_inside_list_names_the_index() -> None:
    assert only_problem(with_urls(mirror={"methods": ["POST", 3]})) == (
        "mirror.methods[1]: expected a string, got integer 3"
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("mirror", "sample_rate", 1.5, "must be between 0 and 1, got 1.5"),
        ("mirror", "sample_rate", -0.1, "must be between 0 and 1, got -0.1"),
        ("store", "sample_rate", 2, "must be between 0 and 1, got 2"),
        ("gates", "max_disagreement_rate", 1.01, "must be between 0 and 1, got 1.01"),
        ("gates", "max_error_rate_delta", -0.5, "must be between 0 and 1, got -0.5"),
        ("drift", "sample_rate", 1.1, "must be between 0 and 1, got 1.1"),
    ],
)
def test_fraction_out_of_range_is_reported(section: str, key: str, value: float, message: str) -> None:
    assert only_problem(with_urls(**{section: {key: value}})) == f"{section}.{key}: {message}"


@pytest.mark.parametrize("value", [0, 65536, -1])
@pytest.mark.parametrize("section", ["listen", "admin"])
def test_port_out_of_range_is_reported(section: str, value: int) -> None:
    assert only_problem(with_urls(**{section: {"port": value}})) == (
        f"{section}.port: must be between 1 and 65535, got {value}"
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("listen", "drain_timeout_s"),
        ("listen", "header_timeout_s"),
        ("listen", "keepalive_timeout_s"),
        ("production", "timeout_s"),
        ("production", "pool_idle_timeout_s"),
        ("candidate", "timeout_s"),
        ("candidate", "stream_timeout_s"),
        ("candidate", "stream_idle_timeout_s"),
        ("gates", "max_p99_latency_ratio"),
        ("gates", "max_ttft_p99_ratio"),
        ("store", "flush_interval_s"),
        ("store", "max_age_days"),
    ],
)
def test_zero_for_positive_number_is_reported(section: str, key: str) -> None:
    assert only_problem(with_urls(**{section: {key: 0}})) == f"{section}.{key}: must be greater than 0, got 0"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("listen", "shutdown_delay_s"),
        ("listen", "lingering_time_s"),
        ("listen", "lingering_timeout_s"),
        ("compare", "abs_tol"),
        ("compare", "rel_tol"),
    ],
)
def test_negative_for_non_negative_number_is_reported(section: str, key: str) -> None:
    assert (
        only_problem(with_urls(**{section: {key: -1.0}})) == f"{section}.{key}: must be at least 0, got -1.0"
    )


@pytest.mark.parametrize("key", ["shutdown_delay_s", "lingering_time_s", "lingering_timeout_s"])
def test_zero_for_non_negative_number_is_accepted(key: str) -> None:
    assert getattr(parse_config(with_urls(listen={key: 0})).listen, key) == 0.0


@pytest.mark.parametrize("section", ["production", "candidate"])
def test_price_is_an_inline_table_of_two_rates(section: str) -> None:
    config = parse_config(with_urls(**{section: {"price": {"input": 0.15, "output": 0}}}))
    price = getattr(config, section).price
    assert (price.input, price.output) == (0.15, 0.0)
    # USD per million tokens: a million prompt tokens and two million completion tokens
    assert price.cost_usd(1_000_000, 2_000_000) == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        (1.5, ["production.price: expected a table {input = X, output = Y} (USD per million tokens), got float 1.5"]),
        ({"input": 1}, ["production.price.output: required"]),
        ({"input": -1, "output": 2}, ["production.price.input: must be at least 0, got -1"]),
        ({"input": 1, "output": "2"}, ["production.price.output: expected a number, got string \"2\""]),
        (
            {"input": 1, "output": 2, "cached": 0.5},
            ['production.price.cached: unknown key (expected "input" and "output")'],
        ),
    ],
)
def test_bad_price_is_reported_naming_the_key(price: object, expected: list[str]) -> None:
    assert problems_of(with_urls(production={"price": price})) == expected


def test_listen_max_connections_is_unset_by_default_and_a_count_when_set() -> None:
    assert parse_config(URLS).listen.max_connections is None
    assert parse_config(with_urls(listen={"max_connections": 5000})).listen.max_connections == 5000


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("listen", "max_body_bytes"),
        ("listen", "max_header_bytes"),
        ("listen", "max_connections"),
        ("production", "max_connections"),
        ("candidate", "max_in_flight"),
        ("candidate", "backoff_after"),
        ("mirror", "max_body_bytes"),
        ("compare", "max_response_bytes"),
        ("gates", "min_samples"),
        ("gates", "min_labels"),
        ("store", "max_rows"),
        ("drift", "warmup"),
        ("drift", "window"),
        ("drift", "max_features"),
    ],
)
def test_zero_for_count_is_reported(section: str, key: str) -> None:
    assert only_problem(with_urls(**{section: {key: 0}})) == f"{section}.{key}: must be at least 1, got 0"


@pytest.mark.parametrize("value", [-1.5, 1.5])
def test_min_accuracy_delta_out_of_range_is_reported(value: float) -> None:
    assert only_problem(with_urls(gates={"min_accuracy_delta": value})) == (
        f"gates.min_accuracy_delta: must be between -1 and 1, got {value}"
    )


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_number_is_reported(value: float) -> None:
    assert only_problem(with_urls(listen={"drain_timeout_s": value})) == (
        f"listen.drain_timeout_s: must be a finite number, got {value!r}"
    )


@pytest.mark.parametrize(("key", "value"), [("preset", "kserve"), ("kind", "labels")])
def test_unknown_enumeration_value_is_reported(key: str, value: str) -> None:
    problem = only_problem(with_urls(compare={key: value}))
    assert problem.startswith(f"compare.{key}: must be one of ")
    assert problem.endswith(f', got "{value}"')


def test_bad_url_scheme_is_reported() -> None:
    assert only_problem(with_urls(candidate={"url": "ftp://x"})) == (
        'candidate.url: must be an http:// or https:// URL with a host, got "ftp://x"'
    )


@pytest.mark.parametrize("url", ["http://", "http:///path", "127.0.0.1:8001", ""])
def test_url_without_host_is_reported(url: str) -> None:
    assert only_problem(with_urls(production={"url": url})) == (
        f'production.url: must be an http:// or https:// URL with a host, got "{url}"'
    )


def test_url_with_bad_port_is_reported() -> None:
    assert only_problem(with_urls(production={"url": "http://h:99999"})).startswith("production.url: ")


def test_url_with_query_is_reported() -> None:
    assert only_problem(with_urls(production={"url": "http://h/v1?x=1"})).startswith(
        "production.url: must not have a query"
    )


def test_missing_required_urls_are_reported() -> None:
    assert problems_of({}) == ["production.url: required", "candidate.url: required"]


def test_json_preset_without_path_is_reported() -> None:
    assert only_problem(with_urls(compare={"preset": "json"})) == (
        'compare.path: required when compare.preset is "json"'
    )


def test_json_preset_with_path_is_accepted() -> None:
    assert parse_config(with_urls(compare={"preset": "json", "path": "/out"})).compare.path == "/out"


@pytest.mark.parametrize(("section", "key"), [("compare", "path"), ("store", "version_path")])
def test_pointer_without_leading_slash_is_reported(section: str, key: str) -> None:
    assert only_problem(with_urls(**{section: {key: "predictions"}})) == (
        f'{section}.{key}: must be a JSON pointer (RFC 6901) starting with "/", got "predictions"'
    )


def test_pointer_with_bad_escape_is_reported() -> None:
    assert only_problem(with_urls(compare={"path": "/a~2"})).startswith(
        "compare.path: must be a JSON pointer"
    )


def test_bad_redact_entry_names_the_index() -> None:
    assert only_problem(with_urls(store={"redact": ["/ok", "ssn"]})) == (
        'store.redact[1]: must be a JSON pointer (RFC 6901) starting with "/", got "ssn"'
    )


def test_method_that_is_not_a_token_is_reported() -> None:
    assert only_problem(with_urls(mirror={"methods": ["PO ST"]})).startswith(
        "mirror.methods[0]: must be an HTTP"
    )


def test_header_name_that_is_not_a_token_is_reported() -> None:
    assert only_problem(with_urls(mirror={"sticky_header": "X User"})).startswith(
        "mirror.sticky_header: must be an HTTP header name"
    )


def test_admin_port_equal_to_listen_port_is_reported() -> None:
    assert only_problem(with_urls(admin={"port": 8080})).startswith(
        "admin.port: must differ from listen.port"
    )


def test_more_drift_features_than_max_features_is_reported() -> None:
    data = with_urls(drift={"features": ["a", "b", "c"], "max_features": 2})
    assert only_problem(data).startswith("drift.features: ")


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "listen": {"prot": 1, "port": "80"},
            "mirror": {"sample_rate": 1.5},
            "candidate": {"url": "ftp://x"},
            "bogus": {},
        }
    )
    assert {p.split(":")[0] for p in problems} == {
        "bogus",
        "listen.prot",
        "listen.port",
        "mirror.sample_rate",
        "production.url",
        "candidate.url",
    }
    assert all("\n" not in p for p in problems)


def test_config_error_str_joins_problems_with_newlines() -> None:
    error = ConfigError(["a: x", "b: y"])
    assert str(error) == "a: x\nb: y"
    assert isinstance(error, ShadowProxyError)


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a: x", "b: y"])))
    assert error.problems == ["a: x", "b: y"]


# --- load_config -------------------------------------------------------------------------------------


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[listen]\nport = \n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    [problem] = excinfo.value.problems
    assert problem.startswith("invalid TOML: ")
    assert "line 2" in problem and "column" in problem


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "nope.toml")
    assert excinfo.value.problems == ["cannot read the config file: No such file or directory"]


def test_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[admin]\ntoken = "caf\xe9"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.problems[0].startswith("the config file is not UTF-8")


def test_load_config_reports_validation_problems(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[mirror]\nsample_rate = 1.5\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path))
    assert "mirror.sample_rate: must be between 0 and 1, got 1.5" in excinfo.value.problems


# --- upstream URLs -----------------------------------------------------------------------------------


def test_upstream_url_defaults_http_port_80() -> None:
    target = parse_upstream_url("http://model")
    assert target == UpstreamURL("http", "model", 80, "")
    assert not target.tls
    assert target.host_header == "model"


def test_upstream_url_defaults_https_port_443() -> None:
    target = parse_upstream_url("https://model.example")
    assert (target.port, target.tls, target.host_header) == (443, True, "model.example")


def test_upstream_url_keeps_path_prefix_without_trailing_slash() -> None:
    assert parse_upstream_url("http://h:8001/v1/models/").path_prefix == "/v1/models"


def test_upstream_url_root_path_is_empty_prefix() -> None:
    assert parse_upstream_url("http://h/").path_prefix == ""


def test_upstream_url_host_header_has_non_default_port() -> None:
    assert parse_upstream_url("https://h:8443").host_header == "h:8443"
    assert parse_upstream_url("http://h:443").host_header == "h:443"


def test_upstream_url_ipv6_host_is_bracketed_in_host_header() -> None:
    target = parse_upstream_url("http://[::1]:8002/p")
    assert (target.host, target.port, target.host_header) == ("::1", 8002, "[::1]:8002")
    assert parse_upstream_url("http://[::1]").host_header == "[::1]"


def test_upstream_url_rejects_bad_url_with_value_error() -> None:
    with pytest.raises(ValueError):
        parse_upstream_url("ftp://x")


def test_production_and_candidate_expose_target() -> None:
    config = parse_config(with_urls(candidate={"url": "https://c:9000/x"}))
    assert config.production.target == UpstreamURL("http", "127.0.0.1", 8001, "")
    assert config.candidate.target == UpstreamURL("https", "c", 9000, "/x")


# --- check-config ------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shadowproxy", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_accepts_example_with_summary() -> None:
    result = run_cli("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    for expected in (
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "0.0.0.0:8080",
        "127.0.0.1:9090",
        "0.1",
        "kserve-v1",
        "label",
    ):
        assert expected in result.stdout
    assert result.stderr == ""


def test_check_config_rejects_bad_file_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[listen]\nport = "80"\n[mirror]\nsample_rate = 1.5\n'
        '[production]\nurl = "http://127.0.0.1:8001"\n[candidate]\nurl = "ftp://x"\n'
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f'{path}: listen.port: expected an integer, got string "80"',
        f'{path}: candidate.url: must be an http:// or https:// URL with a host, got "ftp://x"',
        f"{path}: mirror.sample_rate: must be between 0 and 1, got 1.5",
    ]


def test_check_config_rejects_missing_file(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_serve_rejects_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[listen]\nport = 0\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: listen.port: must be between 1 and 65535, got 0" in result.stderr.splitlines()


def test_cli_usage_error_exits_2() -> None:
    result = run_cli("check-config")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
