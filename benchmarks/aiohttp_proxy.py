"""The thinnest reasonable aiohttp pass-through proxy with fire-and-forget mirroring: a reference row.

    python benchmarks/aiohttp_proxy.py --port 8087 --production http://127.0.0.1:9001 \\
        --candidate http://127.0.0.1:9002 --rate 0.1

What a typical Python proxy reaches, for `run.py` to put beside shadowproxy and nginx. An aiohttp web
app (access log off) forwards every request to production through one ClientSession (a TCPConnector
with keep-alive, no per-host limit beyond `--pool`, `auto_decompress=False` so bodies pass through
untouched) and answers with production's status, headers and body. A `--rate` share of requests is
also sent to the candidate by an asyncio task per mirrored request, bounded by a semaphore
(`--max-in-flight`): when it is full the mirror is skipped, never queued, so the candidate cannot
hold a client. The candidate's answer is read and dropped; nothing is compared. uvloop when
installed. It does nothing else: no timeouts beyond aiohttp's, no metrics, no stats.
"""

from __future__ import annotations

import argparse
import asyncio
import random

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself from the body it sends.
_SKIP_REQUEST = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                           "transfer-encoding", "upgrade", "content-length"})
_SKIP_RESPONSE = _SKIP_REQUEST | {"server", "date"}


def make_app(production: str, candidate: str | None, rate: float, pool: int,
             max_in_flight: int) -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    production = production.rstrip("/")
    candidate = candidate.rstrip("/") if candidate else None
    state: dict[str, object] = {}
    tasks: set[asyncio.Task[None]] = set()
    rand = random.random

    async def on_startup(_app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=pool, limit_per_host=0, ttl_dns_cache=None)
        state["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=30))
        state["sem"] = asyncio.Semaphore(max_in_flight)

    async def on_cleanup(_app: web.Application) -> None:
        for t in list(tasks):
            t.cancel()
        session = state.get("session")
        if isinstance(session, aiohttp.ClientSession):
            await session.close()

    async def mirror(method: str, path_qs: str, headers: dict[str, str], body: bytes) -> None:
        sem: asyncio.Semaphore = state["sem"]  # type: ignore[assignment]
        session: aiohttp.ClientSession = state["session"]  # type: ignore[assignment]
        try:
            async with session.request(method, candidate + path_qs, headers=headers, data=body) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # fire and forget: a failing candidate only loses its copy
        finally:
            sem.release()

    async def handle(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = state["session"]  # type: ignore[assignment]
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        method, path_qs = request.method, request.path_qs
        if candidate is not None and rate > 0.0 and (rate >= 1.0 or rand() < rate):
            sem: asyncio.Semaphore = state["sem"]  # type: ignore[assignment]
            if not sem.locked():
                await sem.acquire()  # free slot: returns at once
                t = asyncio.get_running_loop().create_task(mirror(method, path_qs, headers, body))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        try:
            async with session.request(method, production + path_qs, headers=headers, data=body,
                                       allow_redirects=False) as r:
                payload = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in _SKIP_RESPONSE}
                return web.Response(status=r.status, headers=out, body=payload)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text='{"error":"production unavailable"}',
                                content_type="application/json")

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="thin aiohttp pass-through proxy with fire-and-forget mirroring")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--production", required=True, metavar="URL")
    p.add_argument("--candidate", default=None, metavar="URL")
    p.add_argument("--rate", type=float, default=0.1, help="share of requests mirrored (default 0.1)")
    p.add_argument("--pool", type=int, default=256, help="upstream connections in total (default 256)")
    p.add_argument("--max-in-flight", type=int, default=256, help="mirrors in flight at most (default 256)")
    args = p.parse_args(argv)
    if not 0.0 <= args.rate <= 1.0:
        p.error("--rate must be within 0..1")
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = make_app(args.production, args.candidate, args.rate, args.pool, args.max_in_flight)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                handle_signals=True, backlog=4096, loop=loop)


if __name__ == "__main__":
    main()
