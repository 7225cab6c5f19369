"""Who may use the admin port. The bearer token guards request data and changes, never the
aggregates that probes and Prometheus read; it can come from the environment or a file, and a
rotated file is honoured without a restart. Without a token, an admin port off loopback refuses
data and changes with 403."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import RunningProxy, ServeProcess, Upstream, free_port, start_serve, write_config

TOKEN = "s3cret"
SSN = "123-45-6789"
# Each guarded endpoint with a request that succeeds once the guard lets it through.
DATA_AND_CHANGES = {
    "GET /shadow/requests/{id}": ("GET", "/shadow/requests/rq1", None),
    "POST /shadow/labels": ("POST", "/shadow/labels", b"[]"),
    "PUT /shadow/sample_rate": ("PUT", "/shadow/sample_rate", b'{"sample_rate": 0.5}'),
}
AGGREGATES = ("/metrics", "/healthz", "/readyz", "/shadow/stats", "/shadow/verdict", "/shadow/drift",
              "/shadow/sample_rate")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_url(proxy: RunningProxy) -> str:
    # An admin port bound to 0.0.0.0 is reached on loopback like any other.
    return f"http://127.0.0.1:{proxy.proxy.admin_address[1]}"


async def start(start_proxy: Any, upstream: Upstream, tmp_path: Path, **admin: str) -> RunningProxy:
    """A proxy with the store (bodies kept) and drift on, that has recorded request rq1."""
    proxy: RunningProxy = await start_proxy(
        upstream.url, upstream.url, admin=admin, drift={},
        store={"path": str(tmp_path / "audit.db"), "sample_rate": 1.0, "store_bodies": True},
    )
    async with aiohttp.ClientSession() as s, s.post(
        proxy.url + "/v1/models/m:predict", json={"instances": [{"ssn": SSN}]}, headers={"X-Request-ID": "rq1"}
    ) as r:
        assert r.status == 200
    return proxy


async def call(proxy: RunningProxy, endpoint: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    method, path, body = DATA_AND_CHANGES[endpoint]
    async with aiohttp.ClientSession() as s, s.request(
        method, admin_url(proxy) + path, data=body, headers=headers
    ) as r:
        return r.status, await r.text()


def kubernetes_secret(directory: Path, token: str, version: int) -> Path:
    """A token laid out as the kubelet mounts a Secret key: `token` -> `..data/token`, with
    `..data` a symlink to a versioned directory that an update replaces in one rename."""
    directory.mkdir(exist_ok=True)
    (directory / f"..v{version}").mkdir()
    (directory / f"..v{version}" / "token").write_text(token + "\n")
    (directory / "..data_tmp").symlink_to(f"..v{version}")
    os.replace(directory / "..data_tmp", directory / "..data")
    if not (directory / "token").is_symlink():
        (directory / "token").symlink_to("..data/token")
    return directory / "token"


# --- the token guards data and changes ---------------------------------------------------------------


@pytest.mark.parametrize("endpoint", DATA_AND_CHANGES)
async def test_data_and_changes_are_401_without_the_token(
    endpoint: str, upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, token=TOKEN)
    for headers in (None, bearer("wrong"), {"Authorization": TOKEN}):
        status, text = await call(proxy, endpoint, headers)
        assert status == 401, (headers, text)
        assert SSN not in text


@pytest.mark.parametrize("endpoint", DATA_AND_CHANGES)
async def test_data_and_changes_are_200_with_the_token(
    endpoint: str, upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, token=TOKEN)
    status, text = await call(proxy, endpoint, bearer(TOKEN))
    assert status == 200, text


async def test_the_stored_request_body_is_what_the_token_protects(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, token=TOKEN)
    status, text = await call(proxy, "GET /shadow/requests/{id}", bearer(TOKEN))
    assert status == 200
    assert SSN in text


async def test_aggregates_never_need_the_token(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, token=TOKEN)
    async with aiohttp.ClientSession() as s:
        for path in AGGREGATES:
            async with s.get(admin_url(proxy) + path) as r:
                assert r.status == 200, path
                assert SSN not in await r.text()


async def test_token_from_the_environment(
    upstream: Upstream, start_proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWPROXY_TEST_ADMIN_TOKEN", TOKEN)
    proxy = await start(start_proxy, upstream, tmp_path, token="env:SHADOWPROXY_TEST_ADMIN_TOKEN")
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint))[0] == 401
        assert (await call(proxy, endpoint, bearer("env:SHADOWPROXY_TEST_ADMIN_TOKEN")))[0] == 401
        assert (await call(proxy, endpoint, bearer(TOKEN)))[0] == 200


async def test_token_from_a_file(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    proxy = await start(start_proxy, upstream, tmp_path, token=f"file:{path}")
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint))[0] == 401
        assert (await call(proxy, endpoint, bearer(TOKEN)))[0] == 200


# --- rotation --------------------------------------------------------------------------------------


async def test_a_rotated_secret_file_is_honoured_without_a_restart(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    path = kubernetes_secret(tmp_path / "secret", "old-token", 1)
    proxy = await start(start_proxy, upstream, tmp_path, token=f"file:{path}")
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint, bearer("old-token")))[0] == 200
    kubernetes_secret(tmp_path / "secret", "new-token", 2)
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint, bearer("old-token")))[0] == 401
        assert (await call(proxy, endpoint, bearer("new-token")))[0] == 200


async def test_a_token_file_rewritten_in_place_is_honoured(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("old-token")
    proxy = await start(start_proxy, upstream, tmp_path, token=f"file:{path}")
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer("old-token")))[0] == 200
    path.write_text("a-longer-new-token\n")
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer("old-token")))[0] == 401
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer("a-longer-new-token")))[0] == 200


@pytest.mark.parametrize("damage", ["empty", "removed", "spaces"])
async def test_a_token_file_that_turns_unusable_keeps_the_token_in_force(
    damage: str, upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    proxy = await start(start_proxy, upstream, tmp_path, token=f"file:{path}")
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer(TOKEN)))[0] == 200
    if damage == "empty":
        path.write_text("")
    elif damage == "removed":
        path.unlink()
    else:
        path.write_text("not a token\n")
    # Never open: an unusable file leaves the last good token guarding the endpoints.
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint))[0] == 401
        assert (await call(proxy, endpoint, bearer(TOKEN)))[0] == 200
    path.write_text("the-next-token")
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer(TOKEN)))[0] == 401
    assert (await call(proxy, "PUT /shadow/sample_rate", bearer("the-next-token")))[0] == 200


# --- no token ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", DATA_AND_CHANGES)
async def test_off_loopback_without_a_token_data_and_changes_are_403(
    endpoint: str, upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, host="0.0.0.0")
    status, text = await call(proxy, endpoint, bearer("anything"))
    assert status == 403
    assert 'admin.token = \\"env:NAME\\" or \\"file:PATH\\"' in text
    assert SSN not in text


async def test_off_loopback_without_a_token_metrics_and_probes_answer(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, host="0.0.0.0")
    async with aiohttp.ClientSession() as s:
        for path in AGGREGATES:
            async with s.get(admin_url(proxy) + path) as r:
                assert r.status == 200, path


async def test_off_loopback_with_a_token_the_token_decides(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path, host="0.0.0.0", token=TOKEN)
    for endpoint in DATA_AND_CHANGES:
        assert (await call(proxy, endpoint))[0] == 401
        assert (await call(proxy, endpoint, bearer(TOKEN)))[0] == 200


@pytest.mark.parametrize("endpoint", DATA_AND_CHANGES)
async def test_on_loopback_without_a_token_everything_is_open(
    endpoint: str, upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream, tmp_path)
    assert (await call(proxy, endpoint))[0] == 200


# --- the processes: the start-up warning, SIGHUP, --workers -------------------------------------------


WARNING = "warning: admin.host"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("admin_host", "admin", "warns"),
    [("0.0.0.0", "", True), ("0.0.0.0", f'token = "{TOKEN}"', False), ("127.0.0.1", "", False)],
)
def test_check_config_warns_in_one_line_about_an_open_admin_port_off_loopback(
    tmp_path: Path, admin_host: str, admin: str, warns: bool
) -> None:
    path = write_config(tmp_path / "c.toml", "http://127.0.0.1:1", listen_port=8080, admin_port=9090,
                        admin_host=admin_host, admin=admin)
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    if warns:
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"shadowproxy: {WARNING}")
        assert 'admin.token = "env:NAME" or "file:PATH"' in line
    else:
        assert result.stderr == ""


async def serve(tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process], *args: str,
                admin_host: str = "127.0.0.1", admin: str = "", extra: str = "") -> ServeProcess:
    lp, ap = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", upstream.url, listen_port=lp, admin_port=ap,
                          admin_host=admin_host, admin=admin, extra=extra)
    serving = await start_serve(config, lp, ap, *args)
    processes.append(serving.proc)
    assert "listening" in serving.first_line
    return serving


async def stderr_until(serving: ServeProcess, text: str, count: int = 1, timeout: float = 20) -> list[str]:
    """Lines of the process's stderr read up to the `count`th one that holds `text`."""
    assert serving.proc.stderr is not None
    lines: list[str] = []
    while sum(text in line for line in lines) < count:
        line = (await asyncio.wait_for(serving.proc.stderr.readline(), timeout)).decode()
        assert line, f"stderr ended before {text!r}: {lines}"
        lines.append(line)
    return lines


async def stop(serving: ServeProcess) -> str:
    """SIGTERM; the exit code must be 0. The rest of stderr."""
    serving.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(serving.proc.wait(), 30) == 0
    assert serving.proc.stderr is not None
    return (await serving.proc.stderr.read()).decode()


async def admin_status(serving: ServeProcess, method: str, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.request(
        method, serving.admin_url + path, data=body, headers=headers
    ) as r:
        return r.status


async def test_serve_warns_once_at_start_about_an_open_admin_port_off_loopback(
    tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process]
) -> None:
    serving = await serve(tmp_path, upstream, processes, admin_host="0.0.0.0")
    assert await admin_status(serving, "PUT", "/shadow/sample_rate", b'{"sample_rate": 0.5}') == 403
    assert await admin_status(serving, "GET", "/healthz") == 200
    err = await stop(serving)
    assert sum(WARNING in line for line in err.splitlines()) == 1
    assert "Traceback" not in err


async def test_sighup_reads_the_token_file_again(
    tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process]
) -> None:
    path = tmp_path / "token"
    path.write_text("old-token\n")
    serving = await serve(tmp_path, upstream, processes, admin=f'token = "file:{path}"')
    rate = b'{"sample_rate": 0.5}'
    assert await admin_status(serving, "PUT", "/shadow/sample_rate", rate, bearer("old-token")) == 200
    path.write_text("new-token\n")
    serving.proc.send_signal(signal.SIGHUP)
    lines = await stderr_until(serving, "(SIGHUP)")
    assert "a new token is in force" in lines[-1]
    assert "new-token" not in "".join(lines)  # the token itself is never logged
    assert serving.proc.returncode is None
    assert await admin_status(serving, "PUT", "/shadow/sample_rate", rate, bearer("old-token")) == 401
    assert await admin_status(serving, "PUT", "/shadow/sample_rate", rate, bearer("new-token")) == 200
    assert "Traceback" not in await stop(serving)


async def test_workers_sighup_reaches_every_worker_and_the_new_token_works_through_the_supervisor(
    tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process]
) -> None:
    path = kubernetes_secret(tmp_path / "secret", "old-token", 1)
    serving = await serve(tmp_path, upstream, processes, "--workers", "2", admin=f'token = "file:{path}"',
                          extra=f'[store]\npath = "{tmp_path / "audit.db"}"\n')
    kubernetes_secret(tmp_path / "secret", "new-token", 2)
    serving.proc.send_signal(signal.SIGHUP)
    lines = await stderr_until(serving, "(SIGHUP)", count=3)  # the supervisor and both workers
    assert "restarting" not in "".join(lines)
    rate = b'{"sample_rate": 0.5}'
    for token, status in (("old-token", 401), ("new-token", 200)):
        assert await admin_status(serving, "PUT", "/shadow/sample_rate", rate, bearer(token)) == status
        assert await admin_status(serving, "POST", "/shadow/labels", b"[]", bearer(token)) == status
        assert await admin_status(serving, "GET", "/shadow/requests/nope", None, bearer(token)) == (
            404 if status == 200 else 401
        )
    assert "Traceback" not in await stop(serving)


async def test_workers_off_loopback_without_a_token_refuse_data_at_the_supervisor(
    tmp_path: Path, upstream: Upstream, processes: list[asyncio.subprocess.Process]
) -> None:
    # The workers' own admin listeners are on loopback, where no token is needed: the supervisor,
    # which forwards to them, must refuse for them.
    serving = await serve(tmp_path, upstream, processes, "--workers", "2", admin_host="0.0.0.0",
                          extra=f'[store]\npath = "{tmp_path / "audit.db"}"\n')
    assert await admin_status(serving, "GET", "/shadow/requests/rq1") == 403
    assert await admin_status(serving, "POST", "/shadow/labels", b"[]") == 403
    assert await admin_status(serving, "PUT", "/shadow/sample_rate", b'{"sample_rate": 0.5}') == 403
    for path in ("/metrics", "/healthz", "/readyz", "/shadow/stats"):
        assert await admin_status(serving, "GET", path) == 200, path
    err = await stop(serving)
    assert sum(WARNING in line for line in err.splitlines()) == 1
