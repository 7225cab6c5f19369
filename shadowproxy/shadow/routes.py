"""What components need to add routes to the admin app: JSON answers and the bearer-token guard.

The admin app (`shadowproxy.control.admin`) puts one `TokenGuard` on the app under `GUARD_KEY`;
every handler wrapped in `requires_token` asks it before running. Components (the store, drift)
register their routes through `Component.add_routes` and use these helpers, so they never import
the control layer above them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class TokenGuard:
    """Decides whether a request may use a guarded admin endpoint."""

    def __init__(self, token: str) -> None:
        self.token = token

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when the request may go on, else the answer that refuses it."""
        if not self.token:
            return None
        given = request.headers.get("Authorization", "")
        # Constant time, so the answer's timing says nothing about how much of a guess was right.
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        return web.Response(
            body=orjson.dumps({"error": "missing or wrong bearer token"}),
            status=401,
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="shadowproxy"'},
        )


GUARD_KEY: web.AppKey[TokenGuard] = web.AppKey("token_guard", TokenGuard)


def requires_token(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = request.app[GUARD_KEY].refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    return guarded
