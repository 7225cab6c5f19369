"""The admin app (aiohttp): metrics, health, readiness and the shadow API.

It listens on its own port so no model path can collide with `/metrics`, and the port can stay off
the public network. State lives on the app under typed keys, so tests can run several proxies in one
process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from shadowproxy.control.live import HistoryRecorder, live_routes
from shadowproxy.judging.verdict import evaluate_all
from shadowproxy.shadow.routes import GUARD_KEY, TokenGuard, json_response, requires_token

if TYPE_CHECKING:
    from shadowproxy.config import Config
    from shadowproxy.shadow.observers import Component


class AdminBackend(Protocol):
    """What the admin app needs: one proxy (`ShadowProxy`) or the supervisor of several workers."""

    config: Config
    draining: bool
    components: list[Component]
    guard: TokenGuard  # one per process, so SIGHUP can make it read a `file:` token again
    history: HistoryRecorder  # the points of /shadow/history and the live page's charts

    async def production_reachable(self) -> bool: ...

    async def snapshot(self, full: bool = False) -> dict[str, Any]: ...

    async def metrics_exposition(self) -> bytes: ...

    def current_sample_rate(self) -> float | None: ...

    def sample_rates(self) -> dict[str, float]: ...

    async def set_sample_rate(self, rate: float, candidate: str | None = None) -> None: ...


PROXY_KEY: web.AppKey[AdminBackend] = web.AppKey("proxy")


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
    return json_response(evaluate_all(await proxy.snapshot(), proxy.config.gates))


@requires_token
async def put_sample_rate(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY_KEY]
    usage = 'body must be {"sample_rate": <number between 0 and 1>} with an optional "candidate": <name>'
    try:
        data = orjson.loads(await request.read())
        rate = data["sample_rate"]
        candidate = data.get("candidate")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return json_response({"error": usage}, 400)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        return json_response({"error": f"sample_rate: must be a number between 0 and 1, got {rate!r}"}, 400)
    if candidate is not None and not isinstance(candidate, str):
        return json_response({"error": f"candidate: must be a candidate's name, got {candidate!r}"}, 400)
    if candidate is not None and candidate not in proxy.config.candidate_names:
        return json_response({"error": f"candidate: no candidate named {candidate!r}"}, 404)
    await proxy.set_sample_rate(float(rate), candidate)
    return json_response(_rates_document(proxy))


def _rates_document(proxy: AdminBackend) -> dict[str, Any]:
    """`{"sample_rate": the first candidate's}`, with `"candidates": {name: rate}` when several."""
    doc: dict[str, Any] = {"sample_rate": proxy.current_sample_rate()}
    if len(proxy.config.candidates) > 1:
        doc["candidates"] = proxy.sample_rates()
    return doc


async def get_sample_rate(request: web.Request) -> web.Response:
    return json_response(_rates_document(request.app[PROXY_KEY]))


def make_admin_app(proxy: AdminBackend) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[PROXY_KEY] = proxy
    app[GUARD_KEY] = proxy.guard
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/shadow/stats", stats)
    app.router.add_get("/shadow/verdict", verdict)
    app.router.add_get("/shadow/sample_rate", get_sample_rate)
    app.router.add_put("/shadow/sample_rate", put_sample_rate)
    for component in proxy.components:
        app.router.add_routes(component.routes())
    drift = any(getattr(r, "canonical", "") == "/shadow/drift" for r in app.router.resources())
    app.router.add_routes(live_routes(proxy.history, drift=drift))
    return app
