"""Readiness: can a connection to production be opened? (Kubernetes readiness; never the candidate.)"""

from __future__ import annotations

import asyncio
import ssl

from shadowproxy.config import ProductionConfig, UpstreamConfig
from shadowproxy.errors import ConfigError
from shadowproxy.http.tls import client_context

_CACHE_S = 1.0


def tls_context(section: str, upstream: UpstreamConfig) -> ssl.SSLContext | None:
    """The upstream's TLS context; an unreadable or invalid `ca_file` is a config problem."""
    try:
        return client_context(upstream.target, upstream.ca_file, upstream.tls_verify)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{section}.ca_file: cannot load {upstream.ca_file!r}: {why}"]) from None


class Readiness:
    """A TCP (and TLS) connect to production, cached for a second so probes cost next to nothing."""

    def __init__(self, production: ProductionConfig) -> None:
        self.target = production.target
        self.ssl = tls_context("production", production)
        self._checked_at = -_CACHE_S
        self._ok = False

    async def check(self) -> bool:
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < _CACHE_S:
            return self._ok
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.host, self.target.port, ssl=self.ssl), 2.0
            )
            writer.close()
            ok = True
        except (OSError, TimeoutError, ssl.SSLError):
            ok = False
        self._checked_at, self._ok = loop.time(), ok
        return ok
