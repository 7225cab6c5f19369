"""The admin app (aiohttp): metrics, health, readiness and the shadow API.

It listens on its own port so no model path can collide with `/metrics`, and the port can stay off
the public network. State lives on the app under typed keys, so tests can run several proxies in one
process.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from shadowproxy.verdict import evaluate

if TYPE_CHECKING:
    from shadowproxy.config import Config
    from shadowproxy.observers import Component


class AdminBackend(Protocol):
    """What the admin app needs: one proxy (`ShadowProxy`) or the supervisor of several workers."""

    config: Config
    draining: bool
    components: list[Component]

    async def production_reachable(self) -> bool: ...

    async def snapshot(self, full: bool = False) -> dict[str, Any]: ...

    async def metrics_exposition(self) -> bytes: ...

    def current_sample_rate(self) -> float | None: ...

    async def set_sample_rate(self, rate: float) -> None: ...


PROXY_KEY: web.AppKey[AdminBackend] = web.AppKey("proxy")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _authorized(request: web.Request) -> bool:
    token = request.app[PROXY_KEY].config.admin.token
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def requires_token(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not _authorized(request):
            return web.Response(
                body=orjson.dumps({"error": "missing or wrong bearer token"}),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="shadowproxy"'},
            )
        return await handler(request)

    return guarded


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[PROXY_KEY].metrics_exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    if proxy.draining:
        return json_response({"status": "draining"}, status=503)
    if not await proxy.production_reachable():
        return json_response({"status": "production unreachable"}, status=503)
    return json_response({"status": "ready"})


async def stats(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    full = request.query.get("full", "") not in ("", "0", "false")
    return json_response(await proxy.snapshot(full=full))


async def verdict(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return json_response(evaluate(await proxy.snapshot(), proxy.config.gates))


@requires_token
async def put_sample_rate(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY_KEY]
    try:
        data = orjson.loads(await request.read())
        rate = data["sample_rate"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return json_response({"error": 'body must be {"sample_rate": <number between 0 and 1>}'}, 400)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        return json_response({"error": f"sample_rate: must be a number between 0 and 1, got {rate!r}"}, 400)
    await proxy.set_sample_rate(float(rate))
    return json_response({"sample_rate": float(rate)})


async def get_sample_rate(request: web.Request) -> web.Response:
    return json_response({"sample_rate": request.app[PROXY_KEY].current_sample_rate()})


def make_admin_app(proxy: AdminBackend) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[PROXY_KEY] = proxy
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/shadow/stats", stats)
    app.router.add_get("/shadow/verdict", verdict)
    app.router.add_get("/shadow/sample_rate", get_sample_rate)
    app.router.add_put("/shadow/sample_rate", put_sample_rate)
    for component in proxy.components:
        app.router.add_routes(component.routes())
    return app
