"""Upstream URLs: `production.url` / `candidate.url` parsed into what a connection needs."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class UpstreamURL:
    """An upstream model server, parsed from `production.url` / `candidate.url`.

    >>> parse_upstream_url("http://[::1]:8002/v1/")
    UpstreamURL(scheme='http', host='::1', port=8002, path_prefix='/v1')
    """

    scheme: str
    host: str  # without brackets, ready for connecting
    port: int
    path_prefix: str = ""  # put before every request path; "" or "/..." without a trailing slash

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        # RFC 9110 §7.2 / RFC 3986 §3.2.2: IPv6 literals are bracketed, the default port is omitted.
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.path_prefix}"


@functools.lru_cache(maxsize=64)
def parse_upstream_url(url: str) -> UpstreamURL:
    """Parse an http(s) URL; ValueError (worded to follow a key path) when it is not usable."""
    bad = f"must be an http:// or https:// URL with a host, got {_quote(url)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"has an invalid host or port, got {_quote(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(bad)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError(f"must not contain spaces or control characters, got {_quote(url)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"must not have a query or fragment, got {_quote(url)}")
    if port == 0:
        raise ValueError(f"port must be between 1 and 65535, got {_quote(url)}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return UpstreamURL(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))
