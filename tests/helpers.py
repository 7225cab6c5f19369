"""Helpers the tests share: real upstream servers, a real proxy, a `serve` process, the ops assets.

Fixtures that wrap these are in conftest.py; test modules import from here, never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from shadowproxy.config import Config, parse_config
from shadowproxy.control.app import ShadowProxy
from shadowproxy.models import OpenAIBehaviour, RunningOpenAIModel, start_openai_model


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


class SSEUpstream:
    """A streaming model: every request is answered with `events` (exact bytes, each written after
    its delay) as `text/event-stream`. It records each request's body, when it arrived and when
    each event was written (`time.perf_counter()`, just before the write), so a test can tell
    what the proxy could have seen when. From event `stall_after` on it sends nothing more."""

    def __init__(self, events: list[tuple[float, bytes]]) -> None:
        self.events = events
        self.stall_after: int | None = None
        self.content_type = "text/event-stream"
        self.bodies: list[bytes] = []
        self.arrived: list[float] = []
        self.sent: list[list[float]] = []
        self.url = ""
        self.runner: web.AppRunner | None = None

    @property
    def body(self) -> bytes:
        """Every event, as the client must receive them."""
        return b"".join(data for _, data in self.events)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(time.perf_counter())
        self.bodies.append(await request.read())
        times: list[float] = []
        self.sent.append(times)
        response = web.StreamResponse(headers={"Content-Type": self.content_type, "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i, (delay, data) in enumerate(self.events):
            if self.stall_after is not None and i >= self.stall_after:
                await asyncio.sleep(3600)
            if delay:
                await asyncio.sleep(delay)
            times.append(time.perf_counter())
            await response.write(data)
        await response.write_eof()
        return response

    async def start(self) -> SSEUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def make_config(production_url: str, candidate_url: str, **sections: Any) -> Config:
    """A validated config with the given URLs and overrides, listening on free ports."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 1},
        "admin": {"host": "127.0.0.1", "port": 2},
        "production": {"url": production_url},
        "candidate": {"url": candidate_url},
        "mirror": {"sample_rate": 0.0},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # an array of tables: [[candidates]], [[slices]]
            data[name] = values
            if name == "candidates":
                del data["candidate"]
            continue
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
        mirror = self.proxy.fanout  # every candidate's mirror
        assert mirror is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while mirror.busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)


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


def write_config(
    path: Path, production: str, *, listen_port: int, admin_port: int, extra: str = "",
    admin_host: str = "127.0.0.1", admin: str = "", candidate: str = "",
) -> Path:
    """A config for `serve` on the given ports; `admin` is more lines for that table, `extra`
    more tables; the candidate is `candidate`, or a closed port."""
    path.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {listen_port}
shutdown_delay_s = 0.0
drain_timeout_s = 5.0

[admin]
host = "{admin_host}"
port = {admin_port}
{admin}

[production]
url = "{production}"

[candidate]
url = "{candidate or closed_port_url()}"
{extra}
"""
    )
    return path


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, listen_port: int, admin_port: int) -> None:
        self.proc = proc
        self.listen_port, self.admin_port = listen_port, admin_port
        self.url = f"http://127.0.0.1:{listen_port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.first_line = ""


async def start_serve(config: Path, listen_port: int, admin_port: int, *args: str) -> ServeProcess:
    """`serve --config CONFIG [args]`, once it has printed its first line (it listens then)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    serving = ServeProcess(proc, listen_port, admin_port)
    assert proc.stdout is not None
    serving.first_line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    return serving


ROOT = Path(__file__).resolve().parents[1]  # the repository


PROMETHEUS_DIR = ROOT / "config" / "prometheus"


DASHBOARD = ROOT / "config" / "grafana" / "shadowproxy-dashboard.json"


async def start_model_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m shadowproxy.models --port 0 ARGS...` in a process of its own, and its URL once it
    serves (the line it prints then names the port it bound)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy.models", "--port", "0", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
    if " serving on " not in line:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"stand-in model did not start: {line!r}")
    return proc, line.rsplit(" serving on ", 1)[1].strip()


@contextlib.asynccontextmanager
async def openai_models(
    production: OpenAIBehaviour | None = None, candidate: OpenAIBehaviour | None = None
) -> AsyncIterator[tuple[RunningOpenAIModel, RunningOpenAIModel]]:
    """The OpenAI-compatible stand-ins in the running loop on free loopback ports: production and
    candidate (their defaults unless given), stopped on exit."""
    async with contextlib.AsyncExitStack() as stack:
        prod = await stack.enter_async_context(await start_openai_model(production or OpenAIBehaviour.production()))
        cand = await stack.enter_async_context(await start_openai_model(candidate or OpenAIBehaviour.candidate()))
        yield prod, cand


# A proxy judging OpenAI-compatible traffic, every request mirrored: `start_proxy(url, url, **OPENAI_PROXY)`.
OPENAI_PROXY: dict[str, dict[str, Any]] = {"compare": {"preset": "openai"}, "mirror": {"sample_rate": 1.0}}


def require_binary(name: str) -> str:
    """The binary's path; a missing one skips locally but fails in CI, where it must be installed."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return path


def dashboard_panels() -> list[dict[str, Any]]:
    with DASHBOARD.open() as file:
        dashboard = json.load(file)
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels folded into a collapsed row
    return [panel for panel in panels if panel.get("type") != "row"]
