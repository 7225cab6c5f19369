"""The gRPC listener's keys: grpc_port, grpc_cert_file/grpc_key_file and the grpc_url of
production and candidates."""

from __future__ import annotations

from shadowproxy.config import parse_config
from tests.unit.test_config import problems_of, with_urls


def test_grpc_listener_is_off_by_default() -> None:
    config = parse_config(with_urls())
    assert config.listen.grpc_port is None
    assert config.production.grpc_url is None
    assert config.candidates[0].grpc_url is None


def test_grpc_port_needs_production_grpc_url() -> None:
    assert problems_of(with_urls(listen={"grpc_port": 8081})) == [
        "production.grpc_url: required when listen.grpc_port is set"
    ]


def test_grpc_urls_are_grpc_or_grpcs_host_and_port() -> None:
    config = parse_config(with_urls(listen={"grpc_port": 8081}, production={"grpc_url": "grpcs://model:8443"},
                                    candidate={"grpc_url": "grpc://127.0.0.1:9000"}))
    assert config.production.grpc_url == "grpcs://model:8443"
    assert config.candidates[0].grpc_url == "grpc://127.0.0.1:9000"
    problems = problems_of(with_urls(production={"grpc_url": "http://model:8001"},
                                     candidate={"grpc_url": "grpc://model:70000"}))
    assert problems == [
        'production.grpc_url: must be grpc://host:port or grpcs://host:port, got "http://model:8001"',
        'candidate.grpc_url: port must be between 1 and 65535, got "70000"',
    ]


def test_grpc_tls_files_go_together_and_port_differs_from_listen_port() -> None:
    problems = problems_of(with_urls(listen={"grpc_port": 8080, "grpc_cert_file": "cert.pem"},
                                     production={"grpc_url": "grpc://model:8001"}))
    assert problems == [
        "listen.grpc_port: must differ from listen.port, got 8080",
        "listen.grpc_key_file: required when the other of grpc_cert_file and grpc_key_file is set",
    ]
