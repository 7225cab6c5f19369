"""TLS client contexts for https upstreams."""

from __future__ import annotations

import logging
import ssl

from shadowproxy.http.urls import UpstreamURL

log = logging.getLogger("shadowproxy")


def client_context(target: UpstreamURL, ca_file: str, verify: bool) -> ssl.SSLContext | None:
    """None for http; the system CAs (or `ca_file`) for https; no verification only when asked."""
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        log.warning("TLS verification is off for %s", target)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
