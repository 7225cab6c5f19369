"""Per-request Python cost of the hot path, without sockets (fake transports, one loop).

The saturated benchmarks (run.py) mix the proxy's Python with syscalls, the load generator and
the stand-in models on two shared cores; this isolates the part we can change in Python and is
steady enough (process CPU time, min of 5 rounds) to judge a micro-optimisation in seconds:

    python benchmarks/hotpath.py            # production only (sample_rate 0)
    python benchmarks/hotpath.py --mirror   # every request also mirrored and compared (sample_rate 1)
    python benchmarks/hotpath.py --profile  # cProfile of the same loop
    python benchmarks/hotpath.py --drift    # with [drift] sample_rate 1.0 (its processing included)
    python benchmarks/hotpath.py --store    # with [store] on a temp file (its writer thread's CPU included)
    python benchmarks/hotpath.py --record   # with [record] on a temp directory, every request recorded
    python benchmarks/hotpath.py --candidates 3   # every request mirrored to 3 candidates ([[candidates]])
    python benchmarks/hotpath.py --slices 32      # with 32 [[slices]] (by path prefix; none matches)
    python benchmarks/hotpath.py --cost           # 0, 1 and 3 candidates and 32 slices, interleaved:
                                                  # the cost of each extra candidate and of slices

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
from shadowproxy.shadow.mirror import Mirror, MirrorGroup  # noqa: E402
from shadowproxy.shadow.proxy import Proxy  # noqa: E402
from shadowproxy.shadow.slices import SliceMatcher  # noqa: E402

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


class Setup:
    """One proxy on fake transports: production, `candidates` candidates (at sample_rate 1.0 when
    any), `slices` slices, and the components the flags turn on."""

    def __init__(self, candidates: int, slices: int, drift: bool, store: str, record: str = "") -> None:
        raw: dict[str, Any] = {"production": {"url": "http://127.0.0.1:1"}, "mirror": {"sample_rate": 1.0}}
        if candidates:
            raw["candidates"] = [{"name": f"c{i}", "url": f"http://127.0.0.1:{i + 2}"} for i in range(candidates)]
        else:
            raw["candidate"] = {"url": "http://127.0.0.1:2"}
            raw["mirror"]["sample_rate"] = 0.0
        if slices:
            raw["slices"] = [{"name": f"s{i}", "path_prefix": f"/v2/models/s{i}"} for i in range(slices)]
        if drift:
            raw["drift"] = {"sample_rate": 1.0, "warmup": 1000, "window": 10000}
        if store:
            raw["store"] = {"path": store}
        if record:
            raw["record"] = {"path": record, "sample_rate": 1.0}
        self.candidates = candidates
        self.config = config = parse_config(raw)
        matcher = SliceMatcher(config.slices) if config.slices else None
        self.metrics = metrics = Metrics(candidates=config.candidate_names)
        self.stats = stats = ShadowStats(config.candidate_names, matcher.names if matcher is not None else ())
        self.components = build_components(config, metrics)
        self.pool = pool = UpstreamPool(config.production.target, max_connections=10, idle_timeout_s=4)
        self.mirrors = [
            Mirror(pool=UpstreamPool(c.target, max_connections=10, idle_timeout_s=4), candidate=c,
                   mirror=config.mirror, compare=config.compare, production_timeout_s=10, metrics=metrics,
                   stats=stats.for_candidate(c.name), name=c.name)
            for c in config.candidates
        ]
        fanout: Mirror | MirrorGroup = MirrorGroup(self.mirrors, config.mirror) if candidates > 1 else self.mirrors[0]
        self.fanout = fanout
        self.proxy = Proxy(pool=pool, timeout_s=10, metrics=metrics, stats=stats, mirror=fanout,
                           observers=list(self.components), slices=matcher)
        server = Server(self.proxy.handle, ServerLimits())
        self.upstream = pooled(pool)
        self.shadows = [pooled(m.pool) for m in self.mirrors] if candidates else []
        self.client = ClientConnection(server)
        self.client_transport = FakeTransport()
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]

    async def start(self) -> None:
        for component in self.components:
            await component.start()

    async def one(self) -> None:
        self.client.data_received(REQUEST)
        for shadow in self.shadows:
            while shadow.sink is None:  # the shadow exchange has been sent on the candidate connection
                await asyncio.sleep(0)
            shadow.data_received(RESPONSE)
        self.upstream.data_received(RESPONSE)
        await asyncio.sleep(0)  # the end of the loop's turn, where held writes are sent (http/writes.py)
        while self.fanout.busy:  # the pairs are judged in callbacks of their own
            await asyncio.sleep(0)

    async def run(self, n: int) -> None:
        components = self.components
        for i in range(n):
            await self.one()
            if components and i % 64 == 0:
                await asyncio.sleep(0)  # let the components' own tasks run, as a live loop would
        await settle(components)  # their queued work is part of the cost

    async def measure(self, n: int) -> float:
        """CPU seconds per request over `n` requests, each answered (and every shadow pair compared)."""
        self.client_transport.out.clear()
        compared = [s.agree + s.disagree for s in (self.stats.for_candidate(m.name) for m in self.mirrors)]
        started = time.process_time()
        await self.run(n)
        spent = time.process_time() - started
        assert len(self.client_transport.out) == n  # every request was answered
        if self.candidates:
            for m, before in zip(self.mirrors, compared, strict=True):
                after = self.stats.for_candidate(m.name)
                assert after.agree + after.disagree - before == n, m.name  # every pair was compared
        return spent / n

    async def close(self) -> None:
        self.proxy.close()
        for component in self.components:
            await component.close()


async def main(
    requests: int, profile: bool, candidates: int, slices: int, drift: bool, store: str, record: str = ""
) -> None:
    setup = Setup(candidates, slices, drift, store, record)
    await setup.start()
    await setup.run(2000)
    gc.collect()  # as app.py does once it serves: the start-up heap leaves the collector's walks
    gc.freeze()
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await setup.run(requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    else:
        rounds = 5
        best = min([await setup.measure(requests // rounds) for _ in range(rounds)])
        label = f"mirrored to {candidates} and compared" if candidates else "production only"
        if slices:
            label += f", {slices} slices"
        label += "".join(f", {type(c).__name__}" for c in setup.components)
        print(f"hot path ({label}): {best * 1e6:.2f} us of Python per request (min of {rounds})")
    await setup.close()


async def cost(requests: int, rounds: int = 5) -> None:
    """0, 1 and 3 candidates, and 1 candidate with 32 slices, measured interleaved (min per setup):
    each extra candidate should cost no more than the first, (c3 - c1) / 2 <= c1 - c0, and 32
    slices at most 0.5 us per request."""
    setups = {"c0": Setup(0, 0, False, ""), "c1": Setup(1, 0, False, ""), "c3": Setup(3, 0, False, ""),
              "c1+32 slices": Setup(1, 32, False, "")}
    for setup in setups.values():
        await setup.run(2000)
    gc.collect()
    gc.freeze()
    best = dict.fromkeys(setups, float("inf"))
    for r in range(rounds):
        names = list(setups)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
        for name in names:
            best[name] = min(best[name], await setups[name].measure(requests // rounds))
    us = {name: value * 1e6 for name, value in best.items()}
    for name, value in us.items():
        print(f"{name:>14}: {value:7.2f} us of Python per request (min of {rounds})")
    first, extra = us["c1"] - us["c0"], (us["c3"] - us["c1"]) / 2
    slices = us["c1+32 slices"] - us["c1"]
    print(f"first candidate {first:.2f} us; each extra candidate {extra:.2f} us "
          f"({'met' if extra <= first else 'NOT met'}: extra <= first)")
    print(f"32 slices {slices:+.2f} us per request ({'met' if slices <= 0.5 else 'NOT met'}: <= 0.5 us)")
    for setup in setups.values():
        await setup.close()


def _option(name: str, default: int) -> int:
    if name in sys.argv:
        return int(sys.argv[sys.argv.index(name) + 1])
    return default


if __name__ == "__main__":
    if "--cost" in sys.argv:
        uvloop.run(cost(_option("--requests", 20_000)))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        n_candidates = _option("--candidates", 1 if "--mirror" in sys.argv else 0)
        store = f"{tmp}/audit.db" if "--store" in sys.argv else ""
        record = f"{tmp}/recordings" if "--record" in sys.argv else ""
        uvloop.run(main(_option("--requests", 50_000), "--profile" in sys.argv, n_candidates,
                        _option("--slices", 0), "--drift" in sys.argv, store, record))
