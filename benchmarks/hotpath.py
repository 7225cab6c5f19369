"""Per-request Python cost of the hot path, without sockets (fake transports, one loop).

The saturated benchmarks (run.py) mix the proxy's Python with syscalls, the load generator and
the stand-in models on two shared cores; this isolates the part we can change in Python and is
steady enough (process CPU time, min of 5 rounds) to judge a micro-optimisation in seconds:

    python benchmarks/hotpath.py            # production only (sample_rate 0)
    python benchmarks/hotpath.py --mirror   # every request also mirrored and compared (sample_rate 1)
    python benchmarks/hotpath.py --profile  # cProfile of the same loop
    python benchmarks/hotpath.py --drift    # with [drift] sample_rate 1.0 (its processing included)
    python benchmarks/hotpath.py --store    # with [store] on a temp file (its writer thread's CPU included)

Options combine. Process CPU time counts every thread, so the store's writer thread is in the figure.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shadowproxy.config import parse_config  # noqa: E402
from shadowproxy.control.app import build_components  # noqa: E402
from shadowproxy.http.server import ClientConnection, Server, ServerLimits  # noqa: E402
from shadowproxy.http.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from shadowproxy.judging.stats import ShadowStats  # noqa: E402
from shadowproxy.shadow.metrics import Metrics  # noqa: E402
from shadowproxy.shadow.mirror import Mirror  # noqa: E402
from shadowproxy.shadow.proxy import Proxy  # noqa: E402

REQUEST = (
    b"POST /v1/models/m:predict HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 33\r\n"
    b"Content-Type: application/json\r\n\r\n" + b'{"instances":[[1.0,2.0,3.0,4.0]]}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 13:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 41\r\nConnection: keep-alive\r\n\r\n"
    b'{"predictions":[1],"model_version":"v1"}\n'
)


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def settle(components: list[Any]) -> None:
    """Until the drift monitor's queue and the store writer's queue are empty."""
    for component in components:
        if hasattr(component, "process"):
            component.process()
        writer = getattr(component, "writer", None)
        while writer is not None and writer.records:
            writer.wake()
            await asyncio.sleep(0.001)


def pooled(pool: UpstreamPool) -> UpstreamConnection:
    """An idle keep-alive connection on a fake transport, ready in `pool`."""
    conn = UpstreamConnection(pool)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    pool._open.add(conn)
    conn._complete = True
    pool.release(conn)
    return conn


async def main(requests: int, profile: bool, mirror_all: bool, drift: bool, store: str) -> None:
    raw: dict[str, Any] = {
        "production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
        "mirror": {"sample_rate": 1.0 if mirror_all else 0.0},
    }
    if drift:
        raw["drift"] = {"sample_rate": 1.0, "warmup": 1000, "window": 10000}
    if store:
        raw["store"] = {"path": store}
    config = parse_config(raw)
    metrics, stats = Metrics(), ShadowStats()
    components = build_components(config, metrics)
    for component in components:
        await component.start()
    pool = UpstreamPool(config.production.target, max_connections=10, idle_timeout_s=4)
    candidate_pool = UpstreamPool(config.candidate.target, max_connections=10, idle_timeout_s=4)
    mirror = Mirror(pool=candidate_pool, candidate=config.candidate, mirror=config.mirror,
                    compare=config.compare, production_timeout_s=10, metrics=metrics, stats=stats)
    proxy = Proxy(pool=pool, timeout_s=10, metrics=metrics, stats=stats, mirror=mirror, observers=list(components))
    server = Server(proxy.handle, ServerLimits())
    upstream = pooled(pool)
    candidate = pooled(candidate_pool)
    client = ClientConnection(server)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]

    async def one() -> None:
        client.data_received(REQUEST)
        if mirror_all:
            while candidate.sink is None:  # the shadow exchange has been sent on the candidate connection
                await asyncio.sleep(0)
            candidate.data_received(RESPONSE)
        upstream.data_received(RESPONSE)
        await asyncio.sleep(0)  # the end of the loop's turn, where held writes are sent (http/writes.py)
        while mirror.busy:  # the pair is judged in a callback of its own
            await asyncio.sleep(0)

    async def run(n: int) -> None:
        for i in range(n):
            await one()
            if components and i % 64 == 0:
                await asyncio.sleep(0)  # let the components' own tasks run, as a live loop would
        await settle(components)  # their queued work is part of the cost

    await run(2000)
    gc.collect()  # as app.py does once it serves: the start-up heap leaves the collector's walks
    gc.freeze()
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await run(requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    else:
        rounds, best = 5, float("inf")
        for _ in range(rounds):
            client_transport.out.clear()
            started = time.process_time()
            await run(requests // rounds)
            best = min(best, time.process_time() - started)
            assert len(client_transport.out) == requests // rounds  # every request was answered
        compared = stats.agree + stats.disagree
        assert not mirror_all or compared >= requests, compared  # and every shadow pair was compared
        label = "mirrored and compared" if mirror_all else "production only"
        label += "".join(f", {type(c).__name__}" for c in components)
        print(f"hot path ({label}): {best / (requests // rounds) * 1e6:.2f} us of Python per request (min of {rounds})")
    proxy.close()
    for component in components:
        await component.close()

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        uvloop.run(main(50_000, "--profile" in sys.argv, "--mirror" in sys.argv, "--drift" in sys.argv,
                        f"{tmp}/audit.db" if "--store" in sys.argv else ""))
