"""The transparent production proxy, against real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import ssl
import time
from collections.abc import Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web

from tests.helpers import RawUpstream, RunningProxy, Upstream, closed_port_url, raw_exchange


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_body_comes_back_byte_identical_for_every_method(upstream: Upstream, start_proxy, method: str) -> None:
    proxy = await start_proxy(upstream.url)
    payload = os.urandom(5000)
    async with client() as s, s.request(method, proxy.url + "/v1/models/m:predict?x=1", data=payload) as r:
        body = await r.read()
    assert r.status == 200
    assert body == payload
    assert r.headers["X-Echo-Method"] == method
    assert upstream.requests[-1]["path"] == "/v1/models/m:predict?x=1"


async def test_head_answer_has_headers_and_no_body(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s:
        for _ in range(3):  # the pooled connection stays usable after a bodiless answer
            async with s.head(proxy.url + "/x") as r:
                assert r.status == 200
                assert await r.read() == b""
                assert "X-Echo-Length" in r.headers


async def test_three_mib_upload_arrives_intact(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    payload = os.urandom(3 * 1024 * 1024)
    async with client() as s, s.post(proxy.url + "/upload", data=io.BytesIO(payload)) as r:
        body = await r.read()
    assert r.status == 200
    assert upstream.requests[-1]["body"] == payload
    assert body == payload


async def test_gzip_response_passes_compressed_and_untouched(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s:
        async with s.get(upstream.url + "/gzip") as r:
            direct = await r.read()
        async with s.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
            via_proxy = await r.read()
            assert r.headers["Content-Encoding"] == "gzip"
    assert via_proxy == direct
    assert gzip.decompress(via_proxy) == b"hello compressed world" * 100


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_error_statuses_pass_through(upstream: Upstream, start_proxy, status: int) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s, s.get(proxy.url + f"/status/{status}") as r:
        assert r.status == status
        assert await r.json() == {"status": status}


async def test_hop_by_hop_response_headers_are_dropped(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    raw = await raw_exchange(proxy.host, proxy.port, b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert b"x-kept: yes" in head
    assert b"x-private" not in head
    assert b"keep-alive" not in head


async def test_hop_by_hop_request_headers_are_dropped(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    headers = {"Connection": "X-Secret, keep-alive", "X-Secret": "s", "Keep-Alive": "timeout=5", "TE": "trailers",
               "Proxy-Connection": "keep-alive", "X-Normal": "n"}
    async with client() as s, s.get(proxy.url + "/", headers=headers) as r:
        assert r.status == 200
    seen = {k.lower() for k in upstream.requests[-1]["headers"]}
    assert "x-normal" in seen
    for name in ("x-secret", "keep-alive", "te", "proxy-connection"):
        assert name not in seen
    assert upstream.requests[-1]["headers"].get("Connection", "keep-alive").lower() == "keep-alive"


async def test_repeated_response_headers_keep_order(raw_upstream, start_proxy) -> None:
    up: RawUpstream = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-B: 2\r\nSet-Cookie: c=3\r\nContent-Length: 2\r\n\r\nok"
    )
    proxy = await start_proxy(up.url)
    raw = await raw_exchange(proxy.host, proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n")[0]
    assert head.index(b"Set-Cookie: a=1") < head.index(b"X-B: 2") < head.index(b"Set-Cookie: c=3")
    assert raw.endswith(b"\r\n\r\nok")


async def test_x_forwarded_for_is_appended_and_proto_set(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s, s.get(proxy.url + "/", headers={"X-Forwarded-For": "10.1.2.3",
                                                              "X-Forwarded-Proto": "https"}) as r:
        assert r.status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["Host"] == upstream.url.removeprefix("http://")


async def test_request_id_is_kept_and_returned(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s, s.get(proxy.url + "/", headers={"X-Request-ID": "abc-123"}) as r:
        assert r.headers["X-Request-ID"] == "abc-123"
    assert upstream.requests[-1]["headers"]["X-Request-ID"] == "abc-123"


async def test_request_id_is_generated_when_absent(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s:
        before_ms = int(time.time() * 1000)
        async with s.get(proxy.url + "/") as r:
            first = r.headers["X-Request-ID"]
        async with s.get(proxy.url + "/") as r:
            second = r.headers["X-Request-ID"]
        after_ms = int(time.time() * 1000)
    assert len(first) == 32 and first != second
    assert upstream.requests[0]["headers"]["X-Request-ID"] == first
    for made in (first, second):  # 12 hex digits of milliseconds, then 20 random ones (lower case)
        assert re.fullmatch("[0-9a-f]{32}", made)
        assert before_ms <= int(made[:12], 16) <= after_ms
    assert first[12:] != second[12:]


def test_request_ids_stay_unique_across_random_blocks_and_a_fork() -> None:
    from shadowproxy.shadow.proxy import new_request_id

    # 3000 ids cross two refills of the 1024-id random block; none repeats, all well formed.
    ids = [new_request_id() for _ in range(3000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rb"[0-9a-f]{32}", made) for made in ids)
    # A forked child must not hand out the ids its parent has yet to use: the random digits
    # after the fork differ (the time digits may well be equal within a millisecond).
    new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id to the parent, then out without pytest's teardown
        os.write(write, new_request_id())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = new_request_id()
    assert len(child) == 32 and child[12:] != parent[12:]


async def test_body_over_limit_gets_413(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, listen={"max_body_bytes": 1000})
    async with client() as s, s.post(proxy.url + "/", data=b"x" * 1001) as r:
        assert r.status == 413
        assert "error" in await r.json()
    assert upstream.requests == []


async def test_chunked_body_over_limit_gets_413(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, listen={"max_body_bytes": 1000})
    request = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
    raw = await raw_exchange(proxy.host, proxy.port, request)
    assert raw.startswith(b"HTTP/1.1 413 ")


async def test_production_down_gives_502(start_proxy) -> None:
    proxy = await start_proxy(closed_port_url())
    async with client() as s, s.post(proxy.url + "/", data=b"{}") as r:
        assert r.status == 502
        assert (await r.json())["error"]
    assert proxy.stats()["production"]["errors"] == 1


async def test_slow_production_gives_504(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, production={"timeout_s": 0.3})
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client() as s, s.get(proxy.url + "/delay/3") as r:
        assert r.status == 504
        assert (await r.json())["error"]
    assert loop.time() - started < 2.0


async def eventually(condition: Callable[[], bool], timeout: float = 1.0) -> bool:
    """Whether `condition` holds within `timeout` seconds (checked every 10 ms)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_client_disconnect_cancels_upstream_exchange(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /delay/5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    pool = proxy.proxy.production_pool
    assert pool is not None
    assert await eventually(lambda: pool.open_connections == 1)
    writer.close()
    assert await eventually(lambda: pool.open_connections == 0)
    assert proxy.proxy.proxy is not None and proxy.proxy.proxy.in_flight == 0


async def test_upstream_connections_are_reused(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with client() as s:
        for _ in range(20):
            async with s.post(proxy.url + "/", data=b"{}") as r:
                assert r.status == 200
    pool = proxy.proxy.production_pool
    assert pool is not None
    assert pool.stats.opened == 1
    assert pool.stats.reused == 19


async def test_large_streamed_response_arrives_complete(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    size = 20 * 1024 * 1024
    async with client() as s, s.get(proxy.url + f"/stream/{size}") as r:
        total = 0
        async for chunk in r.content.iter_chunked(1 << 16):
            total += len(chunk)
    assert total == size


# -- exact bytes: framing, smuggling, pipelining, timeouts --------------------------------------


async def test_content_length_with_transfer_encoding_is_rejected(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    raw = await raw_exchange(
        proxy.host, proxy.port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert raw.count(b"HTTP/1.1") == 1
    assert upstream.requests == []


async def test_conflicting_content_lengths_are_rejected(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    raw = await raw_exchange(
        proxy.host, proxy.port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert upstream.requests == []


async def test_malformed_request_line_is_rejected(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    raw = await raw_exchange(proxy.host, proxy.port, b"GARBAGE\x01 / NOT-HTTP\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in raw.lower()


@pytest.mark.both_loops
async def test_client_half_close_is_a_disconnect_without_errors(upstream: Upstream, start_proxy) -> None:
    # A client that shuts its sending side down (EOF) is treated as gone, as nginx does without
    # proxy_ignore_client_abort: the upstream exchange is cancelled, nothing is raised in the loop.
    proxy = await start_proxy(upstream.url)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /delay/5 HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
        pool = proxy.proxy.production_pool
        assert pool is not None
        assert await eventually(lambda: pool.open_connections == 0)
        async with client() as s, s.get(proxy.url + "/after") as r:
            assert r.status == 200
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_pipelined_requests_are_answered_in_order(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    request = (b"GET /delay/0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond"
               b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await raw_exchange(proxy.host, proxy.port, request)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    first = raw.index(b"X-Echo-Path: /delay/0.2")
    second = raw.index(b"X-Echo-Path: /second")
    third = raw.index(b"X-Echo-Path: /third")
    assert first < second < third
    assert b"\r\n\r\nsecond" in raw


async def test_many_connections_answered_in_one_turn_each_get_their_own_body(upstream: Upstream, start_proxy) -> None:
    # Writes are held per connection and sent at the end of the loop's turn (http/writes.py): with
    # 64 requests in flight, turns carry many of them, and each client must get its own answer.
    proxy = await start_proxy(upstream.url)
    payloads = [os.urandom(300 + i) for i in range(64)]

    async def one(session: aiohttp.ClientSession, payload: bytes) -> bytes:
        async with session.post(proxy.url + "/echo", data=payload) as r:
            assert r.status == 200
            return await r.read()

    connector = aiohttp.TCPConnector(limit=64)
    async with asyncio.timeout(30), aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
        for _ in range(3):
            assert await asyncio.gather(*(one(s, p) for p in payloads)) == payloads


async def test_a_flush_left_pending_by_a_closed_loop_does_not_stall_this_one(upstream: Upstream, start_proxy) -> None:
    # Tests run loop after loop in one process; a loop closed between a held write and the end of
    # its turn leaves its flush behind, and the next loop must still send.
    from shadowproxy.http.writes import batch

    old = uvloop.new_event_loop()
    old.close()
    batch.scheduled_on = old
    proxy = await start_proxy(upstream.url)
    async with asyncio.timeout(5), client() as s, s.post(proxy.url + "/echo", data=b"still sent") as r:
        assert await r.read() == b"still sent"
    assert batch.scheduled_on is None


async def test_chunked_request_body_is_forwarded_intact(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    request = (b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    raw = await raw_exchange(proxy.host, proxy.port, request)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests[-1]["body"] == b"hello world"


async def test_chunked_response_is_reframed_for_the_client(raw_upstream, start_proxy) -> None:
    up = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n7\r\npedia i\r\n0\r\n\r\n"
    )
    proxy = await start_proxy(up.url)
    async with client() as s, s.get(proxy.url + "/") as r:
        assert await r.read() == b"Wikipedia i"
        assert r.headers["Transfer-Encoding"] == "chunked"


async def test_close_delimited_response_reaches_client(raw_upstream, start_proxy) -> None:
    up = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close_after=True)
    proxy = await start_proxy(up.url)
    async with client() as s, s.get(proxy.url + "/") as r:
        assert await r.read() == b"until the end"


async def test_204_and_304_have_no_body(raw_upstream, start_proxy) -> None:
    for status in (b"204 No Content", b"304 Not Modified"):
        up = await raw_upstream(b"HTTP/1.1 " + status + b"\r\nX-A: 1\r\n\r\n")
        proxy = await start_proxy(up.url)
        raw = await raw_exchange(
            proxy.host, proxy.port,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert raw.count(b"HTTP/1.1 " + status) == 2
        assert b"transfer-encoding" not in raw.lower()


async def test_expect_100_continue_is_answered(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert rest.endswith(b"hello")
    assert "expect" not in {k.lower() for k in upstream.requests[-1]["headers"]}


async def test_oversized_headers_get_431(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, listen={"max_header_bytes": 1024})
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    raw = await raw_exchange(proxy.host, proxy.port, big)
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert upstream.requests == []


async def test_slow_request_head_is_cut_off(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, listen={"header_timeout_s": 0.3})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    loop = asyncio.get_running_loop()
    started = loop.time()
    data = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert loop.time() - started < 2
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_idle_keepalive_connection_is_closed(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, listen={"keepalive_timeout_s": 0.3})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"empty")
    data = await asyncio.wait_for(reader.read(), 3)  # EOF once the idle timeout passes
    writer.close()
    assert data == b""


async def test_stale_pooled_connection_is_retried_for_get(raw_upstream, start_proxy) -> None:
    answered: dict[str, int] = {}

    def respond(request: bytes) -> bytes:
        answered["n"] = answered.get("n", 0) + 1
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    up = await raw_upstream(respond, close_after=True)  # closes after each answer, without saying so
    proxy = await start_proxy(up.url)
    async with client() as s:
        for _ in range(5):
            async with s.get(proxy.url + "/") as r:
                assert r.status == 200
                assert await r.read() == b"ok"
    assert answered["n"] == 5


async def test_production_closing_without_answer_gives_502(raw_upstream, start_proxy) -> None:
    up = await raw_upstream(b"", close_after=True)
    proxy = await start_proxy(up.url)
    async with client() as s, s.post(proxy.url + "/", data=b"{}") as r:
        assert r.status == 502


async def test_path_prefix_of_production_url_is_prepended(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url + "/base")
    async with client() as s, s.get(proxy.url + "/v1/models/m?q=1") as r:
        assert r.status == 200
    assert upstream.requests[-1]["path"] == "/base/v1/models/m?q=1"


async def test_http10_client_gets_close_delimited_stream(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    raw = await raw_exchange(proxy.host, proxy.port, b"GET /stream/1000 HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"x" * 1000


@pytest.mark.parametrize(
    ("request_line", "connection", "kept", "head_has"),
    [
        # The version and the Connection field decide keep-alive and the answer's framing; the
        # first case is HTTP/1.1 as the proxy recognises it without asking the parser's version.
        (b"GET /stream/100 HTTP/1.1", b"", True, b"transfer-encoding: chunked"),
        (b"GET /stream/100 HTTP/1.1", b"Connection: keep-alive\r\n", True, b"transfer-encoding: chunked"),
        (b"GET /stream/100 HTTP/1.1", b"Connection: close\r\n", False, b"connection: close"),
        (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", True, b"connection: keep-alive"),
        (b"GET /stream/100 HTTP/1.0", b"Connection: keep-alive\r\n", False, b"connection: close"),
        (b"GET / HTTP/1.0", b"", False, b"connection: close"),
    ],
)
async def test_version_and_connection_field_decide_keep_alive_and_framing(
    upstream: Upstream, start_proxy, request_line: bytes, connection: bytes, kept: bool, head_has: bytes
) -> None:
    proxy = await start_proxy(upstream.url)
    first = request_line + b"\r\nHost: m\r\n" + connection + b"\r\n"
    second = b"GET / HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(proxy.host, proxy.port, first + second)
    answers = raw.count(b"HTTP/1.1 200 OK\r\n")
    assert answers == (2 if kept else 1), raw
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert head_has in head
    if b"HTTP/1.0" in request_line:
        assert b"transfer-encoding" not in head  # never chunked to an HTTP/1.0 client


async def test_proxy_keeps_serving_after_garbage(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url)
    for junk in (b"\x00\xff" * 100, b"GET / HTTP/9.9\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
        await raw_exchange(proxy.host, proxy.port, junk, read_timeout=1)
    async with client() as s, s.get(proxy.url + "/") as r:
        assert r.status == 200
    text = await _metrics(proxy)
    assert 'shadowproxy_client_errors_total{reason="bad_request"} 3.0' in text


async def _metrics(proxy: RunningProxy) -> str:
    async with client() as s, s.get(proxy.admin_url + "/metrics") as r:
        return await r.text()


# -- flow control and TLS -----------------------------------------------------------------------


async def test_response_to_a_client_not_reading_is_not_buffered(start_proxy) -> None:
    """Backpressure: with the client not reading, production is paused, not drained into memory."""
    total = 100 * 1024 * 1024
    written = 0

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse(headers={"Content-Length": str(total)})
        await response.prepare(request)
        chunk = b"y" * 65536
        while written < total:
            await response.write(chunk)  # waits while the proxy has stopped reading
            written += len(chunk)
        return response

    app = web.Application()
    app.router.add_get("/big", stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(1.0)
        stalled_at = written
        # Kernel socket buffers on both hops hold a few MiB; the rest must wait upstream.
        assert stalled_at < 32 * 1024 * 1024, stalled_at
        received = 0
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        while received < total:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert chunk
            received += len(chunk)
        writer.close()
        assert received == total
    finally:
        await runner.cleanup()


async def test_https_upstream_with_private_ca(tmp_path, start_proxy) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    assert await proc.wait() == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = await start_proxy(f"https://127.0.0.1:{port}", production={"ca_file": str(cert)})
        async with client() as s:
            for _ in range(3):
                async with s.post(proxy.url + "/tls", data=b"secret") as r:
                    assert r.status == 200
                    assert await r.read() == b"secret"
        untrusted = await start_proxy(f"https://127.0.0.1:{port}")
        async with client() as s, s.post(untrusted.url + "/tls", data=b"x") as r:
            assert r.status == 502  # the system CAs do not know our certificate
    finally:
        await runner.cleanup()


async def test_upload_to_a_production_not_reading_is_not_buffered(start_proxy) -> None:
    """Backpressure the other way: a client uploading faster than production reads is paused."""
    total = 100 * 1024 * 1024
    gate = asyncio.Event()
    received = 0

    async def slow_reader(request: web.Request) -> web.Response:
        nonlocal received
        await gate.wait()
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.Response(text=str(received))

    app = web.Application(client_max_size=total * 2)
    app.router.add_post("/up", slow_reader)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = await start_proxy(f"http://127.0.0.1:{port}", listen={"max_body_bytes": total * 2})
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        sent = 0
        chunk = b"z" * (1 << 20)

        async def upload() -> None:
            nonlocal sent
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)

        task = asyncio.create_task(upload())
        await asyncio.sleep(1.0)
        assert sent < 40 * 1024 * 1024, sent
        gate.set()
        await asyncio.wait_for(task, 20)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        body = await asyncio.wait_for(reader.read(64), 5)
        writer.close()
        assert body == str(total).encode()
    finally:
        await runner.cleanup()


async def test_slow_upload_is_not_mistaken_for_a_slow_production(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, production={"timeout_s": 0.3})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
    for part in (b"ab", b"cd", b"ef", b"gh"):  # 0.8 s of upload, longer than the 0.3 s timeout
        await asyncio.sleep(0.2)
        writer.write(part)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"abcdefgh")


async def test_answer_before_the_body_ends_keeps_the_client_connection(raw_upstream, start_proxy) -> None:
    """Production may answer before reading the whole body (RFC 9112 §9.3, e.g. 413 from the
    model server); the rest of the body is read and dropped and the connection serves on."""

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        status = b"413 Content Too Large" if head.startswith(b"POST") else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"a" * 1000)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nno"), 5)
        assert answer.startswith(b"HTTP/1.1 413 ")
        writer.write(b"a" * 199000)  # the rest of the first body, then a second request
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert rest.startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()


async def test_malformed_production_answer_gives_502_and_is_counted(raw_upstream, start_proxy) -> None:
    up = await raw_upstream(b"NOT HTTP AT ALL\r\n\r\n", close_after=True)
    proxy = await start_proxy(up.url)
    async with client() as s:
        for _ in range(2):
            async with s.post(proxy.url + "/", data=b"{}") as r:
                assert r.status == 502
                assert (await r.json())["error"]
        async with s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'shadowproxy_upstream_failures_total{kind="malformed",target="production"} 2.0' in text
