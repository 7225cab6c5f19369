"""Recording in a real `shadowproxy serve` process: SIGTERM writes everything queued; kill -9
leaves files whose whole records all read."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shadowproxy.models import ModelBehaviour, RunningModel, start_model
from shadowproxy.record.fileformat import read_paths
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


async def serve(tmp_path: Path, production: RunningModel, started: list[ServeProcess]) -> ServeProcess:
    lp, ap = free_port(), free_port()
    extra = f"""
[mirror]
sample_rate = 0.0

[record]
path = "{tmp_path / 'rec'}"
"""
    config = write_config(tmp_path / "c.toml", production.url, listen_port=lp, admin_port=ap, extra=extra)
    process = await start_serve(config, lp, ap)
    started.append(process)
    return process


async def send(process: ServeProcess, n: int, prefix: str) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            async with s.post(process.url + "/predict", data=BODY, headers={"X-Request-ID": f"{prefix}-{i}"}) as r:
                assert r.status == 200


async def test_sigterm_writes_every_answered_request_before_exit(
    tmp_path: Path, production: RunningModel, serving: list[ServeProcess]
) -> None:
    process = await serve(tmp_path, production, serving)
    await send(process, 40, "term")
    process.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.proc.wait(), 15) == 0
    torn: list[str] = []
    assert [r["id"] for r in read_paths([str(tmp_path / "rec")], torn)] == [f"term-{i}" for i in range(40)]
    assert torn == []


async def test_kill_9_leaves_files_whose_records_all_read(
    tmp_path: Path, production: RunningModel, serving: list[ServeProcess]
) -> None:
    process = await serve(tmp_path, production, serving)
    await send(process, 30, "kill")
    await asyncio.sleep(0.5)  # past a flush
    process.proc.kill()
    await process.proc.wait()
    ids = [r["id"] for r in read_paths([str(tmp_path / "rec")])]
    assert ids == [f"kill-{i}" for i in range(len(ids))]
    assert len(ids) == 30  # flushed before the kill
