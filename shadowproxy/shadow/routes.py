"""What components need to add routes to the admin app: JSON answers and the bearer-token guard.

The admin app (`shadowproxy.control.admin`) puts one `TokenGuard` on the app under `GUARD_KEY`;
every handler wrapped in `requires_token` asks it before running. Wrap every handler that returns
request or prediction data (records, field values, recordings) or changes state; aggregates stay
open. Components (the store, drift) register their routes through `Component.add_routes` and use
these helpers, so they never import the control layer above them.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from shadowproxy.config import TOKEN_HINT, AdminConfig, read_token_file

log = logging.getLogger("shadowproxy.shadow.routes")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class TokenGuard:
    """Decides whether a request may use a guarded admin endpoint: one that returns request or
    prediction data, or changes what the proxy does. Aggregates (metrics, stats, verdict) are
    never guarded, so probes and Prometheus need no token.

    Without a token, a loopback admin host lets every request through and any other host refuses
    guarded ones with 403. A `file:` token is read again when a guarded request finds the file's
    stat changed (a Kubernetes Secret update swaps the `..data` symlink, so the path, followed,
    names another inode), and on `reload` (SIGHUP).
    """

    def __init__(self, admin: AdminConfig) -> None:
        self.host = admin.host
        self.loopback = admin.loopback
        self.path = admin.token.path
        self._token = admin.token.value
        # None, so the first guarded request reads the file: it may have changed since the load.
        self._stamp: tuple[int, ...] | None = None

    def current(self) -> str:
        """The token in force ("" for none), after reading a `file:` token again if it changed."""
        if self.path:
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                self._read("the file changed", quiet=True)
        return self._token

    def reload(self) -> None:
        """Read a `file:` token again whatever its stat says (SIGHUP)."""
        if not self.path:
            log.info("SIGHUP: admin.token is not read from a file, nothing to read again")
            return
        self._stamp = _stamp(self.path)
        self._read("SIGHUP", quiet=False)

    def _read(self, why: str, *, quiet: bool) -> None:
        """`quiet`: say nothing when the token read is the one in force."""
        try:
            token = read_token_file(self.path)
        except ValueError as exc:
            # Never fall back to no token: a rotation caught half-way keeps the endpoints closed.
            log.warning("admin.token: %s; the token in force stays", exc)
            return
        if token != self._token or not quiet:
            changed = "a new token is in force" if token != self._token else "the token is unchanged"
            log.info("admin.token: read %s again (%s): %s", self.path, why, changed)
        self._token = token

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when the request may go on, else the answer that refuses it."""
        token = self.current()
        if not token:
            if self.loopback:
                return None
            return json_response(
                {"error": f'admin.token is not set and admin.host "{self.host}" is not loopback: '
                          f"{TOKEN_HINT} to use this endpoint"},
                403,
            )
        # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        # Constant time, so the answer's timing says nothing about how much of a guess was right.
        if hmac.compare_digest(given, f"Bearer {token}".encode()):
            return None
        return web.Response(
            body=orjson.dumps({"error": "missing or wrong bearer token"}),
            status=401,
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="shadowproxy"'},
        )


def _stamp(path: str) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten; None when it cannot be seen."""
    try:
        st = os.stat(path)  # follows symlinks: the file the path names now
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


GUARD_KEY: web.AppKey[TokenGuard] = web.AppKey("token_guard", TokenGuard)


def requires_token(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = request.app[GUARD_KEY].refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    return guarded
