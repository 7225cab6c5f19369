"""listen.max_connections: beyond it a new client connection is closed at once and counted, so
established connections keep reaching production and the admin port keeps answering."""

from __future__ import annotations

import asyncio
import resource
import signal
import sys
from pathlib import Path

import aiohttp

from shadowproxy.config import parse_config
from shadowproxy.control.descriptors import RESERVED, client_connection_limit
from tests.helpers import RunningProxy, Upstream, free_port, write_config

REQUEST = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def closed_at_once(port: int, count: int) -> tuple[list[asyncio.StreamWriter], int]:
    """Open `count` idle connections one after another; return them and how many the server
    closed at once (end of stream before any byte was sent)."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 2.0) == b""
        except TimeoutError:
            return False  # still open: accepted, and waiting for a request head
        except ConnectionError:
            return True

    results = await asyncio.gather(*(closed(reader) for reader, _ in connections))
    return [writer for _, writer in connections], sum(results)


async def answer_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """A request on an established keep-alive connection; its status line, within 1 s."""
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    await asyncio.wait_for(reader.readexactly(length), 1.0)
    return head.split(b"\r\n", 1)[0]


async def admin_answers(admin_url: str) -> str:
    """/healthz and /metrics, each within 1 s; the exposition."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(admin_url + "/metrics") as r:
            assert r.status == 200
            return await r.text()


def refused(exposition: str) -> float:
    line = 'shadowproxy_client_errors_total{reason="max_connections"} '
    return float(next(row for row in exposition.splitlines() if row.startswith(line)).split()[-1])


def test_the_default_limit_leaves_room_for_the_pools_and_the_admin_port() -> None:
    config = parse_config({
        "production": {"url": "http://127.0.0.1:8001", "max_connections": 100},
        "candidate": {"url": "http://127.0.0.1:8002", "max_in_flight": 30},
    })
    assert client_connection_limit(config, 10_000) == 10_000 - 100 - 30 - RESERVED
    assert client_connection_limit(config, 200) == 64  # never fewer than 64
    assert client_connection_limit(config, resource.RLIM_INFINITY) is None
    capped = parse_config({
        "listen": {"max_connections": 7},
        "production": {"url": "http://127.0.0.1:8001"},
        "candidate": {"url": "http://127.0.0.1:8002"},
    })
    assert client_connection_limit(capped, 10_000) == 7


async def test_connections_beyond_the_limit_are_closed_at_once_and_counted(
    upstream: Upstream, start_proxy
) -> None:
    limit, flood = 20, 60
    proxy: RunningProxy = await start_proxy(upstream.url, listen={"max_connections": limit})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await answer_on(reader, writer) == b"HTTP/1.1 200 OK"
    idle, closed = await closed_at_once(proxy.port, flood)
    assert closed == flood - (limit - 1)  # the established connection holds one place
    assert await answer_on(reader, writer) == b"HTTP/1.1 200 OK"
    assert refused(await admin_answers(proxy.admin_url)) == closed
    assert len(upstream.requests) == 2
    for conn in idle:
        conn.close()
    writer.close()


async def test_a_closed_connection_frees_its_place(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url, listen={"max_connections": 3})
    held, closed = await closed_at_once(proxy.port, 4)
    assert closed == 1
    held[0].close()
    server = proxy.proxy.server
    assert server is not None
    for _ in range(100):
        if server.open_connections < 3:
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await answer_on(reader, writer) == b"HTTP/1.1 200 OK"
    for conn in (*held, writer):
        conn.close()


async def test_a_flood_of_idle_connections_under_a_low_descriptor_limit_leaves_serving_and_admin(
    tmp_path: Path, upstream: Upstream, processes: list
) -> None:
    # A real process whose descriptors run short: the soft limit starts below the hard one and is
    # raised to it; listen.max_connections follows from it, so the flood cannot use up the rest.
    soft, hard, pools = 200, 256, 16 + 8
    lp, ap = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", upstream.url, listen_port=lp, admin_port=ap)
    config.write_text(
        config.read_text()
        .replace("[production]", "[production]\nmax_connections = 16")
        .replace("[candidate]", "[candidate]\nmax_in_flight = 8")
    )

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=few_descriptors,
    )
    processes.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    await asyncio.wait_for(proc.stdout.readline(), 15)
    limit = hard - pools - RESERVED
    log = (await asyncio.wait_for(proc.stderr.readline(), 5)).decode()
    assert f"soft {hard}, hard {hard} (soft raised from {soft})" in log, log
    assert f"listen.max_connections {limit} " in log, log

    reader, writer = await asyncio.open_connection("127.0.0.1", lp)
    assert await answer_on(reader, writer) == b"HTTP/1.1 200 OK"
    flood = hard + 100  # more than the process has descriptors
    idle, closed = await closed_at_once(lp, flood)
    assert closed == flood - (limit - 1)
    assert await answer_on(reader, writer) == b"HTTP/1.1 200 OK"
    assert refused(await admin_answers(f"http://127.0.0.1:{ap}")) == closed
    for conn in idle:
        conn.close()
    writer.close()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert b"Traceback" not in await proc.stderr.read()
