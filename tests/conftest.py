"""Fixtures: real upstream servers and a real proxy on free loopback ports, in the test's loop.

- `upstream`: a scriptable aiohttp model server (echo, status, delay, gzip, chunked, hang...).
- `raw_upstream`: an asyncio server whose answer is exact bytes, for framing edge cases.
- `start_proxy`: a ShadowProxy in front of given URLs, with any config override.
- `openai_pair`: the OpenAI-compatible stand-ins (production, candidate) with their defaults.
- `frozen_heap`: the heap collected and frozen, as `serve` leaves it, for tests that judge latency.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from shadowproxy.control.app import ShadowProxy
from shadowproxy.models import RunningOpenAIModel
from tests.helpers import RawUpstream, RunningProxy, Upstream, closed_port_url, make_config, openai_models


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs on uvloop in production; test it there. Tests marked `both_loops` also run
    # on asyncio's own loop, which calls protocol methods uvloop may not (`eof_received`).
    if item.get_closest_marker("both_loops") is not None:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


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


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    proxies: list[ShadowProxy] = []

    async def start(production_url: str, candidate_url: str | None = None, **sections: Any) -> RunningProxy:
        config = make_config(production_url, candidate_url or closed_port_url(), **sections)
        proxy = ShadowProxy(config)
        await proxy.start()
        proxies.append(proxy)
        return RunningProxy(proxy)

    yield start
    for proxy in proxies:
        await proxy.shutdown()


@pytest.fixture
async def openai_pair() -> AsyncIterator[tuple[RunningOpenAIModel, RunningOpenAIModel]]:
    async with openai_models() as pair:
        yield pair


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Subprocesses a test starts, killed at its end if still running."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The heap as `serve` leaves it after start-up (collected, then frozen): otherwise a full
    collection over what earlier tests left behind, tens of milliseconds late in a long run,
    lands in the latencies a test judges."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
