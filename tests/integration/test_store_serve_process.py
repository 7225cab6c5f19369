"""The audit store in a real `shadowproxy serve` process: SIGTERM writes everything queued, kill -9
leaves an intact file, and `shadowproxy audit` reads it (exit codes 0 / 1 / 2)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from shadowproxy.models import ModelBehaviour, RunningModel, start_model
from tests.helpers import ServeProcess, free_port, start_serve, write_config

BODY = b'{"instances": [[0.1, 0.2, 0.3, 0.4]]}'


@pytest.fixture
async def production() -> AsyncIterator[RunningModel]:
    model = await start_model(ModelBehaviour.production(version="prod-3"))
    yield model
    await model.close()


@pytest.fixture
async def serving() -> AsyncIterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for s in started:
        if s.proc.returncode is None:
            s.proc.kill()
            await s.proc.wait()


async def serve(tmp_path: Path, production: RunningModel, started: list[ServeProcess], flush_s: float) -> ServeProcess:
    lp, ap = free_port(), free_port()
    extra = f"""
[mirror]
sample_rate = 0.0

[store]
path = "{tmp_path / 'audit.db'}"
sample_rate = 1.0
flush_interval_s = {flush_s}
"""
    config = write_config(tmp_path / "c.toml", production.url, listen_port=lp, admin_port=ap, extra=extra)
    process = await start_serve(config, lp, ap)
    started.append(process)
    return process


def stored_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        ids = {r[0] for r in conn.execute("SELECT request_id FROM requests UNION SELECT request_id FROM batch_entries")}
    conn.close()
    return ids


async def test_sigterm_writes_every_answered_request_before_exit(
    tmp_path: Path, production: RunningModel, serving: list[ServeProcess]
) -> None:
    # A flush interval far longer than the test: only the shutdown flush can write these rows.
    process = await serve(tmp_path, production, serving, flush_s=60.0)
    async with aiohttp.ClientSession() as s:
        for i in range(40):
            async with s.post(process.url + "/predict", data=BODY, headers={"X-Request-ID": f"term-{i}"}) as r:
                assert r.status == 200
    process.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.proc.wait(), 15) == 0
    assert stored_ids(tmp_path / "audit.db") == {f"term-{i}" for i in range(40)}


async def test_kill_9_leaves_an_intact_file_missing_at_most_the_last_batch(
    tmp_path: Path, production: RunningModel, serving: list[ServeProcess]
) -> None:
    flush_s = 0.05
    process = await serve(tmp_path, production, serving, flush_s=flush_s)
    answered: list[tuple[str, float]] = []

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as s:
            i = 0
            while True:
                rid = f"k{n}-{i}"
                async with s.post(process.url + "/predict", data=BODY, headers={"X-Request-ID": rid}) as r:
                    await r.read()
                answered.append((rid, time.monotonic()))
                i += 1

    clients = [asyncio.create_task(client(n)) for n in range(4)]
    await asyncio.sleep(1.0)
    process.proc.kill()
    killed_at = time.monotonic()
    await process.proc.wait()
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    stored = stored_ids(tmp_path / "audit.db")
    # Everything answered well before the kill (one flush interval plus a scheduling margin) is there.
    settled = {rid for rid, at in answered if at < killed_at - flush_s - 0.25}
    assert len(settled) > 50
    assert settled <= stored


async def _audit(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "audit", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_audit_command_shows_a_request_and_the_versions_with_exit_codes(
    tmp_path: Path, production: RunningModel, serving: list[ServeProcess]
) -> None:
    process = await serve(tmp_path, production, serving, flush_s=0.05)
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(process.url + "/predict", data=BODY, headers={"X-Request-ID": f"cli-{i}"}) as r:
                assert r.status == 200
    process.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.proc.wait(), 15) == 0
    store = str(tmp_path / "audit.db")

    code, out, _ = await _audit("--store", store, "cli-1")
    record = orjson.loads(out)
    assert code == 0
    assert (record["request_id"], record["status"], record["production_version"]) == ("cli-1", 200, "prod-3")
    assert record["predictions"]["production"] is not None

    code, _, err = await _audit("--store", store, "nobody")
    assert code == 1 and "nobody" in err

    code, out, _ = await _audit("--store", store, "--versions")
    assert code == 0
    (row,) = [line.split() for line in out.splitlines() if line.startswith("production")]
    assert (row[1], row[-1]) == ("prod-3", "3")

    code, _, err = await _audit("--store", str(tmp_path / "missing.db"), "cli-1")
    assert code == 2 and "Traceback" not in err
    (tmp_path / "not-a-store.db").write_bytes(b"")
    assert (await _audit("--store", str(tmp_path / "not-a-store.db"), "--versions"))[0] == 2
