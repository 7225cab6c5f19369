"""Configuration: a TOML file turned into frozen, typed dataclasses, validated up front.

The dataclasses below are the one place that holds every default (docs/configuration.md lists
them) and, in each field's metadata, the check its TOML value must pass. Field names are the TOML
keys.
Nothing else in shadowproxy reads the TOML::

    config = load_config("shadowproxy.toml")   # ConfigError lists every problem, one line each
    config.mirror.sample_rate                   # 0.1
    config.production.target.host_header        # "127.0.0.1:8001"
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shadowproxy.errors import ConfigError
from shadowproxy.http.urls import UpstreamURL, parse_upstream_url

__all__ = [
    "AdminConfig",
    "CandidateConfig",
    "CompareConfig",
    "Config",
    "DriftConfig",
    "GatesConfig",
    "JudgeConfig",
    "ListenConfig",
    "MirrorConfig",
    "NamedCandidateConfig",
    "Price",
    "ProductionConfig",
    "Secret",
    "SliceConfig",
    "UpstreamConfig",
    "RecordConfig",
    "StoreConfig",
    "UpstreamURL",
    "load_config",
    "parse_config",
    "parse_upstream_url",
    "read_token_file",
]

PRESETS = ("kserve-v1", "oip-v2", "tf-serving", "mlflow", "json", "openai")
KINDS = ("label", "numeric", "vector", "distribution", "text", "fields")

_T = TypeVar("_T")
_Check = Callable[[object], object]


# ---------------------------------------------------------------------------------------------------
# Checks: each takes the raw TOML value and returns the typed value or raises _Invalid.


class _Invalid(Exception):
    """A value failed its check; `lines` are (key path suffix, message) pairs."""

    def __init__(self, message: str = "", *, lines: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.lines = lines if lines is not None else [("", message)]


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _number_text(value: float) -> str:
    return repr(value)


def _describe(value: object) -> str:
    """The TOML type of a value, and the value when it is short, for "expected X, got Y"."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {_number_text(value)}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return f"date/time {value}"


def _integer(low: int, high: int | None = None) -> _Check:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_describe(value)}")
        if high is not None and not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        if value < low:
            raise _Invalid(f"must be at least {low}, got {value}")
        return value

    return check


def _number(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> _Check:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number, got {_describe(value)}")
        number = float(value)
        got = _number_text(value)
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number, got {got}")
        if ge is not None and le is not None and not ge <= number <= le:
            raise _Invalid(f"must be between {ge:g} and {le:g}, got {got}")
        if gt is not None and not number > gt:
            raise _Invalid(f"must be greater than {gt:g}, got {got}")
        if ge is not None and not number >= ge:
            raise _Invalid(f"must be at least {ge:g}, got {got}")
        return number

    return check


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise _Invalid(f"expected a boolean, got {_describe(value)}")
    return value


def _any_text(text: str) -> str:
    return text


def _string(validate: Callable[[str], str] = _any_text) -> _Check:
    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_describe(value)}")
        return validate(value)

    return check


def _strings(validate: Callable[[str], str] = _any_text) -> _Check:
    """An array of strings, each passed through `validate`; returned as a tuple."""

    def check(value: object) -> object:
        if not isinstance(value, list):
            raise _Invalid(f"expected an array of strings, got {_describe(value)}")
        items: list[str] = []
        lines: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            try:
                if not isinstance(item, str):
                    raise _Invalid(f"expected a string, got {_describe(item)}")
                items.append(validate(item))
            except _Invalid as exc:
                lines.extend((f"[{index}]{at}", message) for at, message in exc.lines)
        if lines:
            raise _Invalid(lines=lines)
        return tuple(items)

    return check


def _non_empty(text: str) -> str:
    if not text:
        raise _Invalid("must not be empty")
    return text


def _one_of(*choices: str) -> Callable[[str], str]:
    def validate(text: str) -> str:
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {_quote(text)}")
        return text

    return validate


# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _method(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise _Invalid(f"must be an HTTP method (an RFC 9110 token), got {_quote(text)}")
    return text.upper()


def _header_name_or_empty(text: str) -> str:
    if text and not _TOKEN.fullmatch(text):
        raise _Invalid(f"must be an HTTP header name (an RFC 9110 token), got {_quote(text)}")
    return text


def _bearer_token(text: str) -> str:
    # It travels in `Authorization: Bearer <token>`: visible ASCII only, no spaces.
    if not re.fullmatch(r"[\x21-\x7e]*", text):
        raise _Invalid("must be visible ASCII characters without spaces")
    return text


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret the config names rather than holds: `"env:NAME"` (read once, at load) or
    `"file:PATH"` (a mounted Kubernetes Secret, say); any other string is the secret itself.
    `path` stays set for a `file:` secret, so whoever uses it can read the file again when it
    changes (as `read_token_file` does for `admin.token`)."""

    value: str = field(default="", repr=False)
    path: str = ""


_SECRET_FILE_MAX_BYTES = 4096  # a token is short; this keeps a wrong path (a log, /dev/zero) cheap


def _read_secret_file(path: str, validate: Callable[[str], str]) -> str:
    """The secret in a file, trailing line breaks removed (`echo token > file` adds one);
    ValueError says what is wrong, naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(_SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if len(data) > _SECRET_FILE_MAX_BYTES:
        raise ValueError(f"file {path} is longer than {_SECRET_FILE_MAX_BYTES} bytes")
    try:
        text = data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"file {path} is not UTF-8") from None
    if not text:
        raise ValueError(f"file {path} is empty")
    try:
        return validate(text)
    except _Invalid as exc:
        raise ValueError(f"file {path}: {exc}") from None


def read_token_file(path: str) -> str:
    """`admin.token` from its `file:`, checked as at load; what a rotation reads."""
    return _read_secret_file(path, _bearer_token)


def _secret(validate: Callable[[str], str]) -> _Check:
    """A `Secret` from a string: `env:NAME`, `file:PATH` or the secret written out. A variable
    that is missing or empty, or a file that cannot be read or is empty, is a problem here, at
    load, not a secret that quietly turns out empty."""

    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_describe(value)}")
        if value.startswith("env:"):
            name = value[4:]
            if not name:
                raise _Invalid('"env:" must be followed by the name of an environment variable')
            text = os.environ.get(name)
            if text is None:
                raise _Invalid(f"environment variable {name} is not set")
            if not text:
                raise _Invalid(f"environment variable {name} is empty")
            try:
                return Secret(validate(text))
            except _Invalid as exc:
                raise _Invalid(f"environment variable {name}: {exc}") from None
        if value.startswith("file:"):
            path = value[5:]
            if not path:
                raise _Invalid('"file:" must be followed by the path of a file')
            try:
                return Secret(_read_secret_file(path, validate), path)
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        return Secret(validate(value))

    return check


# Set by the proxy on every shadow request, or hop-by-hop (RFC 9110 §7.6.1): not configurable.
_PROXY_HEADERS = frozenset((
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "expect", "x-shadow-request",
))


def _field_value(text: str) -> str:
    # RFC 9110 §5.5: visible characters, spaces and tabs inside; no line breaks (header injection).
    if not re.fullmatch(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?", text):
        raise _Invalid("must be visible ASCII characters, with spaces or tabs only between them")
    return text


def _header_table(value: object) -> object:
    """`[candidate] headers`: name -> value (or `env:NAME` / `file:PATH`, read now) as a mapping
    of name -> Secret; names are tokens, unique regardless of case, and not ones the proxy sets."""
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table of header names to values, got {_describe(value)}")
    secret = _secret(_field_value)
    items: dict[str, Secret] = {}
    seen: set[str] = set()
    lines: list[tuple[str, str]] = []
    for name, raw in value.items():
        at = f".{name}"
        lname = name.lower()
        if not _TOKEN.fullmatch(name):
            lines.append((at, "must be an HTTP header name (an RFC 9110 token)"))
        elif lname in _PROXY_HEADERS:
            lines.append((at, "set by the proxy; cannot be configured"))
        elif lname in seen:
            lines.append((at, "named twice (header names are case-insensitive)"))
        else:
            seen.add(lname)
            try:
                checked = secret(raw)
            except _Invalid as exc:
                lines.extend((at + sub, message) for sub, message in exc.lines)
                continue
            assert isinstance(checked, Secret)
            items[name] = checked
    if lines:
        raise _Invalid(lines=lines)
    return items


@dataclass(frozen=True, slots=True)
class Price:
    """`price = {input = X, output = Y}`: US dollars per million prompt (input) and completion
    (output) tokens, as providers publish them."""

    input: float
    output: float

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


def _price(value: object) -> object:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table {{input = X, output = Y}} (USD per million tokens), got {_describe(value)}")
    rates: dict[str, float] = {}
    lines: list[tuple[str, str]] = []
    for key, raw in value.items():
        if key not in ("input", "output"):
            lines.append((f".{key}", 'unknown key (expected "input" and "output")'))
            continue
        try:
            rates[key] = float(_NON_NEGATIVE(raw))  # type: ignore[arg-type]
        except _Invalid as exc:
            lines.extend((f".{key}{at}", message) for at, message in exc.lines)
    for key in ("input", "output"):
        if key not in value:
            lines.append((f".{key}", "required"))
    if lines:
        raise _Invalid(lines=lines)
    return Price(rates["input"], rates["output"])


def _pointer(text: str) -> str:
    if not text.startswith("/"):
        raise _Invalid(f'must be a JSON pointer (RFC 6901) starting with "/", got {_quote(text)}')
    if re.search(r"~(?![01])", text):
        raise _Invalid(
            f'must be a JSON pointer (RFC 6901) where "~" is followed by 0 or 1, got {_quote(text)}'
        )
    return text


def _pointer_or_empty(text: str) -> str:
    return _pointer(text) if text else text


def _grpc_url(text: str) -> str:
    """`grpc://host:port` (cleartext HTTP/2) or `grpcs://host:port` (TLS)."""
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in ("grpc", "grpcs") or not colon or not host or "/" in rest:
        raise _Invalid(f"must be grpc://host:port or grpcs://host:port, got {_quote(text)}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Invalid(f"port must be between 1 and 65535, got {_quote(port)}")
    return text


def _url(text: str) -> str:
    try:
        parse_upstream_url(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


_PORT = _integer(1, 65535)
_COUNT = _integer(1)  # counts and sizes
_POSITIVE = _number(gt=0)  # timeouts, intervals, ratios
_NON_NEGATIVE = _number(ge=0)
_FRACTION = _number(ge=0, le=1)


def _key(default: _T, check: _Check) -> _T:
    """A field with its default and the check its TOML value must pass."""
    return field(default=default, metadata={"check": check})


# ---------------------------------------------------------------------------------------------------
# The configuration; docs/configuration.md documents every key and its default.


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """[listen]: the client-facing port."""

    host: str = _key("0.0.0.0", _string(_non_empty))
    port: int = _key(8080, _PORT)
    max_body_bytes: int = _key(10_485_760, _COUNT)
    drain_timeout_s: float = _key(15.0, _POSITIVE)
    max_header_bytes: int = _key(65_536, _COUNT)
    header_timeout_s: float = _key(10.0, _POSITIVE)
    keepalive_timeout_s: float = _key(75.0, _POSITIVE)
    shutdown_delay_s: float = _key(0.0, _NON_NEGATIVE)
    # Reading and dropping what a client still sends after an answer that closes the connection
    # before its request was read (like nginx's lingering_time / lingering_timeout); 0 is allowed,
    # and lingering_time_s = 0 turns it off.
    lingering_time_s: float = _key(30.0, _NON_NEGATIVE)
    lingering_timeout_s: float = _key(5.0, _NON_NEGATIVE)
    # Client connections per process; None: computed from the open-files limit at start.
    max_connections: int | None = _key(None, _COUNT)
    # The gRPC listener (grpcproxy/): None keeps it off; with both files set it speaks TLS.
    grpc_port: int | None = _key(None, _PORT)
    grpc_cert_file: str = _key("", _string())
    grpc_key_file: str = _key("", _string())


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: metrics and the shadow API."""

    host: str = _key("127.0.0.1", _string(_non_empty))
    port: int = _key(9090, _PORT)
    token: Secret = _key(Secret(), _secret(_bearer_token))

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the admin port: `host` is a loopback address or
        `localhost`. A name that merely resolves to one does not count."""
        return is_loopback(self.host)

    def open_warning(self) -> str | None:
        """The one-line warning for an admin port reachable from other machines without a
        token, or None."""
        if self.token.value or self.loopback:
            return None
        return (
            f"admin.host {_quote(self.host)} is not loopback and admin.token is not set: request data "
            f"and changes on the admin port answer 403 until it is ({TOKEN_HINT})"
        )


TOKEN_HINT = 'set admin.token = "env:NAME" or "file:PATH"'


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """What [production] and [candidate] share: where the model is, how long it may take, and
    the trust for an https URL (`ca_file` and `tls_verify` in [candidate] too: an https candidate
    needs them as much as production)."""

    url: str = field(metadata={"check": _string(_url)})
    timeout_s: float = _key(10.0, _POSITIVE)
    ca_file: str = _key("", _string())
    tls_verify: bool = _key(True, _boolean)
    # LLM answers (compare.preset "openai"): what a token costs, for the cost figures; None: not counted.
    price: Price | None = _key(None, _price)

    @property
    def target(self) -> UpstreamURL:
        return parse_upstream_url(self.url)


@dataclass(frozen=True, slots=True)
class ProductionConfig(UpstreamConfig):
    """[production]: the model whose answers clients get."""

    max_connections: int = _key(1024, _COUNT)
    pool_idle_timeout_s: float = _key(4.0, _POSITIVE)
    # Where the gRPC listener's calls go; required with listen.grpc_port.
    grpc_url: str | None = _key(None, _string(_grpc_url))


@dataclass(frozen=True, slots=True)
class CandidateConfig(UpstreamConfig):
    """[candidate]: the model under test; its answers never reach clients."""

    max_in_flight: int = _key(256, _COUNT)
    backoff_after: int = _key(5, _COUNT)
    # Where sampled gRPC ModelInfer calls are mirrored; None: gRPC calls are not mirrored to it.
    grpc_url: str | None = _key(None, _string(_grpc_url))
    # A streamed answer (text/event-stream) may take this long in all; timeout_s then bounds its first byte.
    stream_timeout_s: float = _key(600.0, _POSITIVE)
    # A streamed answer that sends nothing for this long is given up, its in-flight slot freed.
    stream_idle_timeout_s: float = _key(60.0, _POSITIVE)
    # The candidate's own identity on its copy of a request: the JSON body's "model" ("" keeps
    # the client's), and header fields replacing the client's of the same name.
    model: str = _key("", _string())
    # A dict (copyable, picklable, as `dataclasses.asdict` needs), typed read-only.
    headers: Mapping[str, Secret] = field(default_factory=dict, metadata={"check": _header_table})


@dataclass(frozen=True, slots=True)
class SecondaryConfig(UpstreamConfig):
    """[secondary]: a second copy of production, sent every request mirrored to any candidate, so
    that production's own disagreement with itself (the noise) can be told apart from the
    candidate's (docs/comparison.md, "Noise and net disagreement"). Its answers never reach
    clients and it has no gates."""

    max_in_flight: int = _key(256, _COUNT)
    backoff_after: int = _key(5, _COUNT)


# Names the stats, verdict and metrics already use for something else.
_RESERVED_CANDIDATE_NAMES = frozenset(("production", "secondary", "judge"))
MAX_CANDIDATES = 8
MAX_SLICES = 32


def _label_name(text: str) -> str:
    # One label value and one JSON key each: short, and no character a query would have to escape.
    if not re.fullmatch(r"[a-z0-9_-]{1,32}", text):
        raise _Invalid(f"must be 1 to 32 of a-z, 0-9, _ and -, got {_quote(text)}")
    return text


def _candidate_name(text: str) -> str:
    _label_name(text)
    if text in _RESERVED_CANDIDATE_NAMES:
        raise _Invalid(f"{_quote(text)} is reserved (production, secondary and judge name other things)")
    return text


@dataclass(frozen=True, slots=True)
class NamedCandidateConfig(CandidateConfig):
    """One `[[candidates]]` entry: a candidate's keys, its name, and its own share of requests.
    The old `[candidate]` table becomes one of these named `candidate`."""

    name: str = field(default="candidate", metadata={"check": _string(_candidate_name), "required": True})
    # None: mirror.sample_rate.
    sample_rate: float | None = _key(None, _FRACTION)

    def rate(self, mirror: MirrorConfig) -> float:
        return mirror.sample_rate if self.sample_rate is None else self.sample_rate

    @classmethod
    def from_table(cls, candidate: CandidateConfig, name: str = "candidate") -> NamedCandidateConfig:
        values = {f.name: getattr(candidate, f.name) for f in dataclasses.fields(CandidateConfig)}
        return cls(name=name, **values)


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """[mirror]: which requests are also sent to the candidate."""

    sample_rate: float = _key(0.1, _FRACTION)
    sticky_header: str = _key("", _string(_header_name_or_empty))
    methods: tuple[str, ...] = _key(("POST",), _strings(_method))
    max_body_bytes: int = _key(1_048_576, _COUNT)


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """[compare]: where predictions are in the answers and how two are compared."""

    preset: str = _key("kserve-v1", _string(_one_of(*PRESETS)))
    path: str = _key("", _string(_pointer_or_empty))
    kind: str = _key("label", _string(_one_of(*KINDS)))
    abs_tol: float = _key(1e-6, _NON_NEGATIVE)
    rel_tol: float = _key(1e-3, _NON_NEGATIVE)
    output: str = _key("", _string())
    max_response_bytes: int = _key(1_048_576, _COUNT)
    # A text pair agrees at this similarity or above (1.0: equal text); kind "text" and "openai".
    min_similarity: float = _key(1.0, _FRACTION)
    # An openai embeddings pair agrees at this cosine or above.
    min_cosine: float = _key(0.99, _number(ge=-1, le=1))
    # kind "fields" with a [secondary]: a field on which the secondary differs from production in
    # more than this share of answers is noisy, left out of agreement.
    noise_threshold: float = _key(0.01, _FRACTION)


@dataclass(frozen=True, slots=True)
class GatesConfig:
    """[gates]: thresholds of the promotion verdict."""

    min_samples: int = _key(500, _COUNT)
    max_disagreement_rate: float = _key(0.02, _FRACTION)
    max_p99_latency_ratio: float = _key(1.25, _POSITIVE)
    max_error_rate_delta: float = _key(0.01, _FRACTION)
    max_ttft_p99_ratio: float = _key(1.25, _POSITIVE)  # streamed LLM answers: candidate p99 / production p99
    min_labels: int = _key(100, _COUNT)
    min_accuracy_delta: float | None = _key(None, _number(ge=-1, le=1))  # None: no accuracy gate
    # The LLM judge's non-loss rate (candidate better or tie); None: no judge gate. Needs [judge].
    min_judge_non_loss_rate: float | None = _key(None, _FRACTION)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """[store]: the SQLite audit store; off while `path` is ""."""

    path: str = _key("", _string())
    sample_rate: float = _key(0.05, _FRACTION)
    flush_interval_s: float = _key(0.2, _POSITIVE)
    max_rows: int = _key(1_000_000, _COUNT)
    max_age_days: float = _key(30.0, _POSITIVE)
    store_bodies: bool = _key(False, _boolean)
    redact: tuple[str, ...] = _key((), _strings(_pointer))
    version_header: str = _key("X-Model-Version", _string(_header_name_or_empty))
    version_path: str = _key("", _string(_pointer_or_empty))


@dataclass(frozen=True, slots=True)
class RecordConfig:
    """[record]: production's traffic written to compressed files for `replay`; off while `path` is ""."""

    path: str = _key("", _string())  # a directory
    sample_rate: float = _key(1.0, _FRACTION)
    max_file_bytes: int = _key(64 * 1024 * 1024, _integer(4096))
    max_total_bytes: int = _key(1024 * 1024 * 1024, _integer(4096))
    redact: tuple[str, ...] = _key((), _strings(_pointer))
    drop_headers: tuple[str, ...] = _key(
        ("Authorization", "Cookie", "Proxy-Authorization", "X-Api-Key"), _strings(_non_empty)
    )
    max_body_bytes: int = _key(1024 * 1024, _integer(0))
    version_header: str = _key("X-Model-Version", _string(_header_name_or_empty))


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """[drift]: feature and prediction drift; runs only when the table is present."""

    baseline: str = _key("", _string())
    warmup: int = _key(5000, _COUNT)
    sample_rate: float = _key(1.0, _FRACTION)
    window: int = _key(10_000, _COUNT)
    features: tuple[str, ...] = _key((), _strings(_non_empty))
    max_features: int = _key(100, _COUNT)


@dataclass(frozen=True, slots=True)
class JudgeConfig:
    """[judge]: a blind LLM judge of a sample of compared chat and completions pairs; on only
    when the table is present (docs/comparison.md, "The LLM judge")."""

    # The base URL of an OpenAI-compatible API, as the openai SDK's base_url takes it: the judge
    # is called at {url}/chat/completions.
    url: str = field(metadata={"check": _string(_url)})
    model: str = field(metadata={"check": _string(_non_empty)})
    headers: Mapping[str, Secret] = field(default_factory=dict, metadata={"check": _header_table})
    sample_rate: float = _key(0.05, _FRACTION)
    max_in_flight: int = _key(4, _COUNT)
    timeout_s: float = _key(60.0, _POSITIVE)
    max_tokens: int = _key(16, _COUNT)
    # The request field max_tokens is sent in: OpenAI's reasoning models take only max_completion_tokens.
    max_tokens_field: str = _key("max_tokens", _string(_one_of("max_tokens", "max_completion_tokens")))
    min_judgements: int = _key(100, _COUNT)

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True, slots=True)
class SliceConfig:
    """One `[[slices]]` entry: a named part of the traffic, matched by path prefix and/or a header."""

    name: str = field(default="", metadata={"check": _string(_label_name), "required": True})
    path_prefix: str = _key("", _string())
    header: str = _key("", _string(_header_name_or_empty))
    value: str = _key("", _string(_field_value))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. Build it with `load_config` or `parse_config`."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    production: ProductionConfig
    candidate: CandidateConfig
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    drift: DriftConfig | None = None
    judge: JudgeConfig | None = None
    secondary: SecondaryConfig | None = None
    # Every candidate, in config order; `candidate` is the first of them (the old `[candidate]`
    # table is the one candidate named "candidate").
    candidates: tuple[NamedCandidateConfig, ...] = ()
    slices: tuple[SliceConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.candidates:
            object.__setattr__(self, "candidates", (NamedCandidateConfig.from_table(self.candidate),))

    @property
    def candidate_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)


_SECTIONS: dict[str, type[Any]] = {
    "listen": ListenConfig,
    "admin": AdminConfig,
    "production": ProductionConfig,
    "candidate": CandidateConfig,
    "mirror": MirrorConfig,
    "compare": CompareConfig,
    "gates": GatesConfig,
    "store": StoreConfig,
    "record": RecordConfig,
    "drift": DriftConfig,
    "judge": JudgeConfig,
    "secondary": SecondaryConfig,
}
_OPTIONAL_SECTIONS = frozenset({"drift", "judge", "secondary"})
# Arrays of tables (`[[candidates]]`), each entry checked as a section of its own.
_ARRAY_SECTIONS: dict[str, type[Any]] = {"candidates": NamedCandidateConfig, "slices": SliceConfig}


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; ConfigError lists every problem found."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"cannot read the config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"the config file is not UTF-8: {exc.reason} at byte {exc.start}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"]) from None
    return parse_config(data)


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate already-parsed TOML; ConfigError lists every problem, one line each."""
    problems: list[str] = []
    known = {**_SECTIONS, **_ARRAY_SECTIONS}
    for name, value in data.items():
        if name not in known:
            what = "unknown section" if isinstance(value, dict) else "unknown key"
            problems.append(f"{name}: {what}{_did_you_mean(name, known)}")

    sections: dict[str, Any] = {}
    arrays = {name: _parse_array(name, cls, data.get(name), problems) for name, cls in _ARRAY_SECTIONS.items()}
    if "candidates" in data and "candidate" in data:
        problems.append("candidates: [candidate] and [[candidates]] cannot both be set; use one")
    for name, cls in _SECTIONS.items():
        if name == "candidate" and "candidates" in data:
            continue
        table = data.get(name)
        if table is None and name in _OPTIONAL_SECTIONS:
            sections[name] = None
            continue
        if table is None:
            table = {}
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {_describe(table)}")
            continue
        section = _parse_section(name, cls, table, problems)
        if section is not None:
            sections[name] = section

    candidates: tuple[NamedCandidateConfig, ...] = arrays["candidates"] or ()
    if candidates:
        sections["candidate"] = candidates[0]
    elif isinstance(sections.get("candidate"), CandidateConfig):
        candidates = (NamedCandidateConfig.from_table(sections["candidate"]),)
    sections["candidates"] = candidates
    sections["slices"] = arrays["slices"] or ()
    _check_across_sections(sections, problems)
    _check_names(data, problems)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def _parse_array(name: str, cls: type[_T], value: object, problems: list[str]) -> tuple[_T, ...] | None:
    """`[[name]]` entries, each checked as a section named `name[i]`; None when absent or wrong."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.append(f"{name}: expected an array of tables ([[{name}]]), got {_describe(value)}")
        return None
    if not value:
        problems.append(f"{name}: must hold at least one entry")
        return None
    entries: list[_T] = []
    for index, table in enumerate(value):
        entry = _parse_section(f"{name}[{index}]", cls, table, problems)
        if entry is not None:
            entries.append(entry)
    return tuple(entries) if len(entries) == len(value) else None


def _check_names(data: Mapping[str, Any], problems: list[str]) -> None:
    """How many `[[candidates]]` and `[[slices]]`, names unique; a slice says what it matches."""
    for array, limit, reserved in (("candidates", MAX_CANDIDATES, ()), ("slices", MAX_SLICES, ("other",))):
        entries = data.get(array)
        if not isinstance(entries, list):
            continue
        if len(entries) > limit:
            problems.append(f"{array}: at most {limit} entries, got {len(entries)}")
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            entry_name = entry.get("name")
            if isinstance(entry_name, str):
                if entry_name in reserved:
                    problems.append(f'{array}[{index}].name: "{entry_name}" is reserved (unmatched requests)')
                elif entry_name in seen:
                    problems.append(f'{array}[{index}].name: "{entry_name}" is used twice')
                seen.add(entry_name)
            if array == "slices":
                has_prefix = bool(entry.get("path_prefix"))
                has_header = bool(entry.get("header"))
                if not has_prefix and not has_header:
                    problems.append(f"{array}[{index}]: needs path_prefix, or header and value, or both")
                if has_header and "value" not in entry:
                    problems.append(f"{array}[{index}].value: required when header is set")
                if "value" in entry and not has_header:
                    problems.append(f"{array}[{index}].header: required when value is set")


def _parse_section(name: str, cls: type[_T], table: Mapping[str, object], problems: list[str]) -> _T | None:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    before = len(problems)
    values: dict[str, object] = {}
    for key, raw in table.items():
        spec = fields.get(key)
        if spec is None:
            problems.append(f"{name}.{key}: unknown key{_did_you_mean(key, fields)}")
            continue
        try:
            values[key] = spec.metadata["check"](raw)
        except _Invalid as exc:
            problems.extend(f"{name}.{key}{at}: {message}" for at, message in exc.lines)
    for key, spec in fields.items():
        required = spec.metadata.get("required", False) or (
            spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        )
        if required and key not in table:
            problems.append(f"{name}.{key}: required")
    if len(problems) > before:
        return None
    return cls(**values)


def _check_across_sections(sections: Mapping[str, Any], problems: list[str]) -> None:
    """Rules that involve more than one key; run on the sections that passed their own checks."""
    compare = sections.get("compare")
    if (
        isinstance(compare, CompareConfig) and compare.preset == "json" and not compare.path
        and compare.kind != "fields"  # whole answers: no path to predictions
    ):
        problems.append('compare.path: required when compare.preset is "json"')

    listen, admin = sections.get("listen"), sections.get("admin")
    if isinstance(listen, ListenConfig) and isinstance(admin, AdminConfig) and listen.port == admin.port:
        wildcard = {"0.0.0.0", "::", "*"}
        if listen.host == admin.host or listen.host in wildcard or admin.host in wildcard:
            problems.append(f"admin.port: must differ from listen.port on the same host, got {admin.port}")

    production = sections.get("production")
    if isinstance(listen, ListenConfig) and listen.grpc_port is not None:
        if isinstance(production, ProductionConfig) and not production.grpc_url:
            problems.append("production.grpc_url: required when listen.grpc_port is set")
        if listen.grpc_port == listen.port and listen.grpc_port is not None:
            problems.append(f"listen.grpc_port: must differ from listen.port, got {listen.grpc_port}")
    if isinstance(listen, ListenConfig) and bool(listen.grpc_cert_file) != bool(listen.grpc_key_file):
        missing = "grpc_key_file" if listen.grpc_cert_file else "grpc_cert_file"
        problems.append(f"listen.{missing}: required when the other of grpc_cert_file and grpc_key_file is set")

    drift = sections.get("drift")
    if isinstance(drift, DriftConfig) and len(drift.features) > drift.max_features:
        problems.append(
            f"drift.features: lists {len(drift.features)} features, more than drift.max_features "
            f"({drift.max_features})"
        )


    judge, gates = sections.get("judge"), sections.get("gates")
    if isinstance(judge, JudgeConfig) and isinstance(compare, CompareConfig) and compare.preset != "openai":
        problems.append(f'judge: needs compare.preset = "openai" (judged pairs are chat and completions answers), '
                        f"got {_quote(compare.preset)}")
    if (
        isinstance(gates, GatesConfig)
        and gates.min_judge_non_loss_rate is not None
        and "judge" in sections
        and sections["judge"] is None
    ):
        problems.append("gates.min_judge_non_loss_rate: needs a [judge] table (no judge, no judgements)")


def _did_you_mean(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f' (did you mean "{close[0]}"?)' if close else ""
