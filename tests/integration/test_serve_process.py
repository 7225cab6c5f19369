"""What only a real process shows: start-up line, exit codes, SIGTERM drain, readiness."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from shadowproxy.http.server import Server, ServerLimits
from tests.helpers import RunningProxy, ServeProcess, Upstream, closed_port_url, free_port, start_serve, write_config


async def serve_example(
    tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process]
) -> ServeProcess:
    """`serve` on free ports in front of `upstream`, killed at the end of the test if still running."""
    lp, ap = free_port(), free_port()
    serving = await start_serve(write_config(tmp_path / "c.toml", upstream.url, listen_port=lp, admin_port=ap), lp, ap)
    processes.append(serving.proc)
    return serving


async def test_serve_exits_2_on_missing_config(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(tmp_path / "nope.toml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"Traceback" not in err
    assert len(err.decode().strip().splitlines()) == 1


async def test_serve_exits_2_naming_the_key_when_a_ca_file_cannot_be_loaded(tmp_path: Path) -> None:
    lp, ap = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", "https://127.0.0.1:1", listen_port=lp, admin_port=ap)
    config.write_text(config.read_text().replace(
        'url = "https://127.0.0.1:1"', f'url = "https://127.0.0.1:1"\nca_file = "{tmp_path / "missing.pem"}"'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert b"Traceback" not in err
    assert len(lines) == 1 and "production.ca_file: cannot load" in lines[0], lines


async def test_serve_exits_2_on_bad_config_naming_each_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[listen]\nport = 70000\n[mirror]\nsample_rate = 1.5\n[production]\nurl = "ftp://x"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(bad),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 2
    assert "Traceback" not in text
    for key in ("listen.port", "mirror.sample_rate", "production.url", "candidate.url"):
        assert key in text


async def test_startup_line_names_both_addresses(tmp_path: Path, upstream: Upstream, processes: list) -> None:
    serving = await serve_example(tmp_path, upstream, processes)
    assert f"127.0.0.1:{serving.listen_port}" in serving.first_line
    assert f"127.0.0.1:{serving.admin_port}" in serving.first_line


async def test_sigterm_lets_slow_request_finish_then_exits_0(
    tmp_path: Path, upstream: Upstream, processes: list
) -> None:
    serving = await serve_example(tmp_path, upstream, processes)
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(s.get(serving.url + "/delay/1.0"))
        while not upstream.requests:
            await asyncio.sleep(0.01)
        serving.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):  # draining: no longer accepting
            await asyncio.open_connection("127.0.0.1", serving.listen_port)
        response = await asyncio.wait_for(slow, 10)
        assert response.status == 200
        assert response.headers.get("Connection", "").lower() == "close"
        response.release()
    assert await asyncio.wait_for(serving.proc.wait(), 10) == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(serving.url + "/"):
            pass


async def test_sigterm_turns_readyz_503_while_still_serving(
    tmp_path: Path, upstream: Upstream, processes: list
) -> None:
    lp, ap = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", upstream.url, listen_port=lp, admin_port=ap)
    config.write_text(config.read_text().replace("shutdown_delay_s = 0.0", "shutdown_delay_s = 1.5"))
    serving = await start_serve(config, lp, ap)
    processes.append(serving.proc)
    async with aiohttp.ClientSession() as s:
        async with s.get(serving.admin_url + "/readyz") as r:
            assert r.status == 200
        serving.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with s.get(serving.admin_url + "/readyz") as r:
            assert r.status == 503
        async with s.post(serving.url + "/", data=b"{}") as r:  # still accepting during the delay
            assert r.status == 200
    assert await asyncio.wait_for(serving.proc.wait(), 10) == 0


async def test_sigint_also_drains_and_exits_0(tmp_path: Path, upstream: Upstream, processes: list) -> None:
    serving = await serve_example(tmp_path, upstream, processes)
    os.kill(serving.proc.pid, signal.SIGINT)
    assert await asyncio.wait_for(serving.proc.wait(), 10) == 0
    assert serving.proc.stderr is not None
    assert b"Traceback" not in await serving.proc.stderr.read()


async def _request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    answer = await reader.read()
    writer.close()
    return answer.split(b"\r\n", 1)[0]


async def test_a_burst_of_new_connections_is_accepted_and_answered(
    tmp_path: Path, upstream: Upstream, processes: list
) -> None:
    serving = await serve_example(tmp_path, upstream, processes)
    lines = await asyncio.wait_for(asyncio.gather(*(_request(serving.listen_port) for _ in range(300))), 20)
    assert lines == [b"HTTP/1.1 200 OK"] * 300


async def test_out_of_file_descriptors_is_counted_and_serving_resumes(
    tmp_path: Path, upstream: Upstream, processes: list
) -> None:
    # The kernel completes handshakes the proxy cannot accept (no descriptor left): it counts them,
    # backs off instead of spinning, and accepts again once descriptors are free. A
    # listen.max_connections set above the descriptors there are is what lets it run out.
    lp, ap = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", upstream.url, listen_port=lp, admin_port=ap)
    config.write_text(config.read_text().replace("[admin]", "max_connections = 1000\n\n[admin]"))

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=few_descriptors,
    )
    processes.append(proc)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 15)
    held = [(await asyncio.open_connection("127.0.0.1", lp))[1] for _ in range(200)]
    await asyncio.sleep(0.5)
    for writer in held:
        writer.close()
    for _ in range(50):  # the proxy closes what it accepted, then accepts the rest and serves
        await asyncio.sleep(0.1)
        try:
            if await asyncio.wait_for(_request(lp), 2) == b"HTTP/1.1 200 OK":
                break
        except (OSError, TimeoutError):
            continue
    else:
        raise AssertionError("the proxy did not serve again after descriptors were freed")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{ap}/metrics") as r:
        text = await r.text()
    counter = 'shadowproxy_client_errors_total{reason="accept"}'
    accept_errors = [line for line in text.splitlines() if line.startswith(counter)]
    assert accept_errors and float(accept_errors[0].split()[-1]) >= 1, accept_errors
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    log = await proc.stderr.read()
    assert b"Traceback" not in log
    assert 1 <= log.count(b"cannot accept connections") <= 5  # once per outage, not per retry (0.1 s)
    assert b"accepting connections again" in log


# -- admin endpoints, in process --------------------------------------------------------------


async def test_healthz_answers_ok(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/healthz") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok"}


async def test_readyz_follows_production_reachability(start_proxy) -> None:
    down: RunningProxy = await start_proxy(closed_port_url())
    up_server = Upstream()
    await up_server.start()
    try:
        up: RunningProxy = await start_proxy(up_server.url)
        async with aiohttp.ClientSession() as s:
            async with s.get(down.admin_url + "/readyz") as r:
                assert r.status == 503
            async with s.get(up.admin_url + "/readyz") as r:
                assert r.status == 200
    finally:
        await up_server.close()


async def test_metrics_count_answers_by_status_class(upstream: Upstream, start_proxy) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/", "/status/404", "/status/503"):
            async with s.get(proxy.url + path) as r:
                await r.read()
        async with s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'shadowproxy_requests_total{status_class="2xx"} 2.0' in text
    assert 'shadowproxy_requests_total{status_class="4xx"} 1.0' in text
    assert 'shadowproxy_requests_total{status_class="5xx"} 1.0' in text
    assert 'shadowproxy_upstream_request_duration_seconds_count{target="production"} 4.0' in text
    assert 'shadowproxy_upstream_request_duration_seconds_bucket{le="30.0",target="production"} 4.0' in text


async def test_listening_on_every_address_uses_one_port_for_all() -> None:
    server = Server(lambda cycle: cycle.respond(200, "ok"), ServerLimits())
    host, port = await server.listen("", 0)
    try:
        assert {sock.getsockname()[1] for sock in server._listener.sockets} == {port}  # type: ignore[union-attr]
        assert (await _request(port)).startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop_accepting()
