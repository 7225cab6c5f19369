"""Lingering close: an answer sent before the request was read to its end reaches the client.

Closing a socket with unread bytes makes the kernel send a reset, which can destroy the answer
before the client reads it. Clients that send their whole body before reading (http.client,
urllib, requests) must get the 413 in every run; what they send after it is read and dropped
within `listen.lingering_time_s` / `listen.lingering_timeout_s`, and never reaches production.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import aiohttp
import pytest
import requests

from tests.helpers import RunningProxy, Upstream, raw_exchange

LIMIT = 1 << 20  # listen.max_body_bytes in these tests
BODY = 3 << 20  # what the clients post: a few MiB over the limit
RUNS = 5
PIECE = 64 * 1024


def pieces(size: int) -> Iterator[bytes]:
    """A body without a declared length: the clients send it chunked."""
    for start in range(0, size, PIECE):
        yield b"x" * min(PIECE, size - start)


def post_http_client(port: int, chunked: bool) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        if chunked:
            conn.request("POST", "/", body=pieces(BODY), encode_chunked=True)
        else:
            conn.request("POST", "/", body=b"x" * BODY)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_urllib(port: int, chunked: bool) -> tuple[int, bytes]:
    # urllib sends an iterable body without Content-Length chunked.
    data = pieces(BODY) if chunked else b"x" * BODY
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def post_requests(port: int, chunked: bool) -> tuple[int, bytes]:
    data = pieces(BODY) if chunked else b"x" * BODY
    response = requests.post(f"http://127.0.0.1:{port}/", data=data, timeout=20)
    return response.status_code, response.content


CLIENTS: dict[str, Callable[[int, bool], tuple[int, bytes]]] = {
    "http.client": post_http_client,
    "urllib": post_urllib,
    "requests": post_requests,
}


async def client_errors(proxy: RunningProxy, reason: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    line = f'shadowproxy_client_errors_total{{reason="{reason}"}} '
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


class SilentProduction:
    """A production that reads and counts every byte but never answers, and notes its EOFs."""

    def __init__(self) -> None:
        self.received = 0
        self.connections = 0
        self.closed_by_proxy = 0
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.received += len(chunk)
            self.closed_by_proxy += 1
        except ConnectionError:
            self.closed_by_proxy += 1
        finally:
            writer.close()

    async def start(self) -> SilentProduction:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` holds (checked every 10 ms); fails after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.01)
    return loop.time() - started


async def answer_then_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it shuts down its side."""
    return await asyncio.wait_for(reader.read(), 5)


# -- the clients people use -------------------------------------------------------------------------


@pytest.mark.both_loops
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("name", sorted(CLIENTS))
async def test_a_body_over_the_limit_gets_413_in_every_run(
    upstream: Upstream, start_proxy, name: str, chunked: bool
) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url, listen={"max_body_bytes": LIMIT})
    post = CLIENTS[name]
    answers = [await asyncio.to_thread(post, proxy.port, chunked) for _ in range(RUNS)]
    assert [status for status, _ in answers] == [413] * RUNS
    assert all(json.loads(body) == {"error": "request body too large"} for _, body in answers)
    assert await client_errors(proxy, "body_too_large") == RUNS
    assert upstream.requests == []  # no request reached production whole


# -- what the proxy does while lingering ------------------------------------------------------------


@pytest.mark.both_loops
async def test_bytes_after_an_early_504_never_reach_production_and_its_connection_is_closed(start_proxy) -> None:
    production = await SilentProduction().start()
    try:
        proxy: RunningProxy = await start_proxy(
            production.url, production={"timeout_s": 0.3}, listen={"lingering_timeout_s": 5.0}
        )
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000)
        answer = await answer_then_eof(reader)  # the upload stalls: production's time runs out
        assert answer.startswith(b"HTTP/1.1 504 ")
        assert b"connection: close" in answer.lower()
        await until(lambda: production.closed_by_proxy == 1, 2)  # the upstream connection is gone
        seen = production.received
        assert 1000 <= seen < 2000  # the head and the 1000 body bytes sent before the answer
        for _ in range(10):  # the client goes on uploading; the proxy keeps reading
            writer.write(b"b" * 10_000)
            await writer.drain()
            await asyncio.sleep(0.02)
        assert [conn.lingering for conn in proxy.proxy.server.connections] == [True]  # type: ignore[union-attr]
        assert production.received == seen
        assert production.connections == 1
        writer.close()
        await until(lambda: not proxy.proxy.server.connections, 2)  # type: ignore[union-attr]
    finally:
        production.close()


async def test_a_client_that_keeps_sending_is_cut_off_at_lingering_time(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(
        upstream.url, listen={"max_body_bytes": 1000, "lingering_time_s": 3.0, "lingering_timeout_s": 1.5}
    )
    server = proxy.proxy.server
    assert server is not None
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert (await answer_then_eof(reader)).startswith(b"HTTP/1.1 413 ")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while server.connections and loop.time() - started < 10:
            writer.write(b"x" * 100)  # every 0.1 s: never silent for lingering_timeout_s
            await asyncio.sleep(0.1)
    except ConnectionError:
        pass
    elapsed = loop.time() - started
    assert not server.connections
    assert 2.2 < elapsed < 5.0, elapsed  # lingering_time_s, well past lingering_timeout_s
    writer.close()


async def test_a_silent_client_is_cut_off_after_lingering_timeout(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(
        upstream.url, listen={"max_body_bytes": 1000, "lingering_time_s": 30.0, "lingering_timeout_s": 0.5}
    )
    server = proxy.proxy.server
    assert server is not None
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 5000)
    assert (await answer_then_eof(reader)).startswith(b"HTTP/1.1 413 ")
    elapsed = await until(lambda: not server.connections, 5)
    assert 0.3 < elapsed < 2.5, elapsed
    writer.close()


async def test_lingering_time_zero_closes_at_once(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(
        upstream.url, listen={"max_body_bytes": 1000, "lingering_time_s": 0, "lingering_timeout_s": 5.0}
    )
    server = proxy.proxy.server
    assert server is not None
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert (await answer_then_eof(reader)).startswith(b"HTTP/1.1 413 ")
    assert await until(lambda: not server.connections, 0.5) < 0.5
    writer.close()


async def test_draining_closes_lingering_connections_at_once(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(
        upstream.url, listen={"max_body_bytes": 1000, "lingering_time_s": 30.0, "lingering_timeout_s": 30.0}
    )
    server = proxy.proxy.server
    assert server is not None
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert (await answer_then_eof(reader)).startswith(b"HTTP/1.1 413 ")
    assert [conn.lingering for conn in server.connections] == [True]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await server.drain(10.0)
    assert loop.time() - started < 1.0
    writer.close()


def send_all_then_read(port: int, data: bytes) -> bytes:
    """As http.client does: send everything, then read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.both_loops
async def test_bytes_after_a_request_that_asked_to_close_do_not_destroy_its_answer(
    upstream: Upstream, start_proxy
) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url)
    request = b"POST /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    for _ in range(3):
        answer = await asyncio.to_thread(send_all_then_read, proxy.port, request + b"x" * BODY)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\n{}")
    assert [r["path"] for r in upstream.requests] == ["/first"] * 3


# -- pipelining ---------------------------------------------------------------------------------------


@pytest.mark.both_loops
@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 50_000, b"413"),
    ],
    ids=["malformed", "too-large"],
)
async def test_a_bad_pipelined_request_is_answered_after_the_ones_before_it(
    upstream: Upstream, start_proxy, bad: bytes, status: bytes
) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url, listen={"max_body_bytes": 1000})
    good = (b"GET /delay/0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond")
    raw = await raw_exchange(proxy.host, proxy.port, good + bad)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"200", status], raw
    assert raw.index(b"X-Echo-Path: /delay/0.2") < raw.index(b"X-Echo-Path: /second")
    first_two = raw[: raw.index(b"HTTP/1.1 " + status)].lower()
    assert b"connection: close" not in first_two  # the close comes with the last answer only
    assert [r["path"] for r in upstream.requests] == ["/delay/0.2", "/second"]
