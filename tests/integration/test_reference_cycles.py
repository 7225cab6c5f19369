"""Per-request objects go by reference counting, not by the garbage collector.

A reference cycle left behind by every request (the cycle and its handler pointing at each other)
would make the collector run every few hundred allocations, a cost every request shares. These
tests keep every request's own objects out of the collector's hands.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.helpers import Upstream

OURS = {"Cycle", "Exchange", "MirrorTicket", "ShadowExchange", "BufferedResponse", "ExchangeRecord", "PairRecord"}


@pytest.fixture
def garbage() -> Iterator[list[object]]:
    """What the collector finds unreachable (kept, not freed) from here on."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def ours(found: list[object]) -> Counter[str]:
    return Counter(type(o).__name__ for o in found if type(o).__name__ in OURS
                   and type(o).__module__.startswith("shadowproxy"))


async def test_requests_plain_and_mirrored_leave_no_cyclic_garbage(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy: Any, garbage: list[object]
) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 2]}
    candidate_upstream.answer = lambda seen: {"predictions": [1, 3]}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 0.5},
                              drift={"sample_rate": 1.0, "warmup": 5})
    async with aiohttp.ClientSession() as s:
        for _ in range(40):
            async with s.post(proxy.url + "/v1/models/m:predict", data=b'{"instances": [[1, 2], [3, 4]]}') as r:
                assert r.status == 200
                await r.read()
    await proxy.settle()
    sent = proxy.stats()["mirror"]["sent"]
    assert 0 < sent < 40  # both kinds of request were served
    gc.collect()
    assert ours(garbage) == Counter()


def test_the_check_sees_a_cycle_of_ours(garbage: list[object]) -> None:
    from shadowproxy.http.upstream import BufferedResponse

    response = BufferedResponse(200, [], b"")
    response.headers.append(response)  # type: ignore[arg-type]  # a cycle through our own object
    del response
    gc.collect()
    assert ours(garbage) == Counter({"BufferedResponse": 1})
