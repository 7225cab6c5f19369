"""The live page on the admin port (`GET /`) and the history behind its charts (`/shadow/history`).

The page is three static files shipped in the package (`control/page/`), read once when the admin
app is built. It draws everything from the same JSON the API serves (`/shadow/stats`,
`/shadow/verdict`, `/shadow/history`, `/shadow/sample_rate`, `/shadow/drift`), polled by its own
script; it is read-only unless the admin token is given in the page. Its answers carry a
Content-Security-Policy that allows scripts, styles, images and requests from the admin origin
only, and no inline script: the script renders every value with `textContent`, never as HTML.

`HistoryRecorder` keeps `judging.history.History` fed every `HISTORY_INTERVAL_S` from a source of
cumulative stats: the proxy's own, or the `--workers` supervisor's merge of its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources

import orjson
from aiohttp import web

from shadowproxy.judging.history import HISTORY_INTERVAL_S, History
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.routes import json_response

log = logging.getLogger("shadowproxy.control.live")

# name -> content type; nothing else is served from the page's folder.
PAGE_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

StatsSource = Callable[[], Awaitable[ShadowStats | None]]


class HistoryRecorder:
    """Records a point of `history` now and every `interval_s` after, from `source` (None: no
    point this time, e.g. no worker answered)."""

    def __init__(self, source: StatsSource, interval_s: float = HISTORY_INTERVAL_S) -> None:
        self.source = source
        self.history = History(interval_s=interval_s)
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        try:
            stats = await self.source()
        except Exception:  # the page's history must never take the admin side down
            log.exception("history: reading the stats failed")
            return
        if stats is not None:
            self.history.record(stats, time.time())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.history.interval_s
        start = loop.time()
        while True:
            await self.tick()
            # On a fixed grid, so a slow merge does not make the points drift apart.
            elapsed = loop.time() - start
            await asyncio.sleep(interval * (math.floor(elapsed / interval) + 1) - elapsed)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _page_files() -> dict[str, bytes]:
    folder = resources.files("shadowproxy.control").joinpath("page")
    return {name: folder.joinpath(name).read_bytes() for name in PAGE_FILES}


def live_routes(recorder: HistoryRecorder, *, drift: bool) -> list[web.RouteDef]:
    """`drift`: the app serves `/shadow/drift` (the page asks for it only then)."""
    files = _page_files()
    features = orjson.dumps({"drift": drift, "history_interval_s": recorder.history.interval_s})

    def serve(name: str) -> web.Response:
        return web.Response(body=files[name], headers={**PAGE_HEADERS, "Content-Type": PAGE_FILES[name]})

    async def index(request: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound()
        return serve(name)

    async def page_features(request: web.Request) -> web.Response:
        return web.Response(body=features, headers={**PAGE_HEADERS, "Content-Type": "application/json"})

    async def history(request: web.Request) -> web.Response:
        raw = request.query.get("since", "")
        since: float | None = None
        if raw:
            try:
                since = float(raw)
            except ValueError:
                return json_response({"error": f"since: must be a number of seconds since the epoch, got {raw!r}"}, 400)
            if not math.isfinite(since):
                return json_response({"error": f"since: must be finite, got {raw!r}"}, 400)
        return json_response(recorder.history.document(since))

    return [
        web.get("/", index),
        web.get("/page/features.json", page_features),
        web.get("/page/{name}", asset),
        web.get("/shadow/history", history),
    ]
