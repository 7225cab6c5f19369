"""Fixtures: real upstream servers and a real proxy on free loopback ports, in the test's loop.

- `upstream`: a scriptable aiohttp model server (echo, status, delay, gzip, chunked, hang...).
- `raw_upstream`: an asyncio server whose answer is exact bytes, for framing edge cases.
- `start_proxy`: a ShadowProxy in front of given URLs, with any config override.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import uvloop
from aiohttp import web

from shadowproxy.config import Config, parse_config
from shadowproxy.control.app import ShadowProxy


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs on uvloop in production; test it there. Tests marked `both_loops` also run
    # on asyncio's own loop, which calls protocol methods uvloop may not (`eof_received`).
    if item.get_closest_marker("both_loops") is not None:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    """A URL nobody listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


class Upstream:
    """A model server whose behaviour tests set per path or globally; it records what it saw."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status = 200
        self.hang = False
        self.url = ""
        self.runner: web.AppRunner | None = None
        self.answer: Callable[[dict[str, Any]], Any] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.path_qs,
            "raw_headers": list(request.raw_headers),
            "headers": dict(request.headers),
            "body": body,
        }
        self.requests.append(seen)
        if self.hang:
            await asyncio.sleep(3600)
        path = request.path
        if path.startswith("/delay/"):
            await asyncio.sleep(float(path.split("/")[2]))
        elif self.delay_s:
            await asyncio.sleep(self.delay_s)
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            return web.Response(status=code, body=orjson.dumps({"status": code}), content_type="application/json")
        if path == "/gzip":
            data = gzip.compress(b"hello compressed world" * 100)
            return web.Response(body=data, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        if path == "/hop":
            return web.Response(
                body=b"ok",
                headers={"Connection": "X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
                         "X-Kept": "yes"},
            )
        if path.startswith("/stream/"):
            size = int(path.split("/")[2])
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp
        if self.answer is not None:
            answer = self.answer(seen)
            body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
            return web.Response(body=body, content_type="application/json")
        if request.method == "HEAD":
            return web.Response(status=self.status, headers={"X-Echo-Length": str(len(body))})
        return web.Response(
            status=self.status,
            body=body or b"empty",
            headers={"X-Echo-Method": request.method, "X-Echo-Path": request.path_qs},
        )

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream().start()
    yield server
    await server.close()


@pytest.fixture
async def candidate_upstream() -> AsyncIterator[Upstream]:
    server = await Upstream().start()
    yield server
    await server.close()


class RawUpstream:
    """Answers every request with `response` bytes (a callable may build them from the request)."""

    def __init__(self, response: bytes | Callable[[bytes], bytes], close_after: bool = False) -> None:
        self.response = response
        self.close_after = close_after
        self.received: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.received.append(head + body)
                answer = self.response(head + body) if callable(self.response) else self.response
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    servers: list[RawUpstream] = []

    async def make(response: bytes | Callable[[bytes], bytes], close_after: bool = False) -> RawUpstream:
        server = await RawUpstream(response, close_after).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


def make_config(production_url: str, candidate_url: str, **sections: dict[str, Any]) -> Config:
    """A validated config with the given URLs and overrides, listening on free ports."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 1},
        "admin": {"host": "127.0.0.1", "port": 2},
        "production": {"url": production_url},
        "candidate": {"url": candidate_url},
        "mirror": {"sample_rate": 0.0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config = parse_config(data)
    # Port 0 (any free port) is not a valid config value, but is what tests want.
    return dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, port=0),
        admin=dataclasses.replace(config.admin, port=0),
    )


class RunningProxy:
    def __init__(self, proxy: ShadowProxy) -> None:
        self.proxy = proxy
        host, port = proxy.listen_address
        self.url = f"http://{host}:{port}"
        self.host = host
        self.port = port
        ahost, aport = proxy.admin_address
        self.admin_url = f"http://{ahost}:{aport}"

    def stats(self) -> dict[str, Any]:
        return self.proxy.stats_snapshot()

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every shadow exchange has finished and been recorded."""
        mirror = self.proxy.mirror
        assert mirror is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while mirror.busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    proxies: list[ShadowProxy] = []

    async def start(production_url: str, candidate_url: str | None = None, **sections: dict[str, Any]) -> RunningProxy:
        config = make_config(production_url, candidate_url or closed_port_url(), **sections)
        proxy = ShadowProxy(config)
        await proxy.start()
        proxies.append(proxy)
        return RunningProxy(proxy)

    yield start
    for proxy in proxies:
        await proxy.shutdown()


async def raw_exchange(host: str, port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send exact bytes, read until the server closes (or the timeout), return what came back."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)
