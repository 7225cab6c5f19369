"""`shadowproxy demo`: two demo models, the proxy and a traffic generator in one process.

Everything runs on one event loop, on free loopback ports: the production model
(``ModelBehaviour.production()``), a candidate that answers differently on a known share of
instances (``--flip-rate``) and is a little slower (``--delay-ms``), the proxy mirroring every
request, and an aiohttp client sending batches of 1-4 instances. Then the report of
``shadowproxy report`` is printed on the proxy's own stats, with the disagreement the candidate was
built to show (``candidate_flips`` over the instances actually answered) next to the measured one.

Nothing is started outside this process, so nothing can be left behind; SIGINT or SIGTERM cancels
the run, everything is closed in order, and the exit code is 130 or 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import aiohttp
import orjson

from shadowproxy.commands.report import Report, make_report, render, to_json_text, use_color
from shadowproxy.config import Config, parse_config
from shadowproxy.control.app import ShadowProxy
from shadowproxy.models import ModelBehaviour, RunningModel, candidate_flips, generate_instances, start_model

__all__ = [
    "DemoOptions",
    "DemoResult",
    "Interrupted",
    "Progress",
    "address_url",
    "demo",
    "demo_config",
    "run_demo",
    "run_loop",
    "settle",
    "until_signalled",
]

R = TypeVar("R")

EXIT_USAGE = 2
MIN_SAMPLES = 500  # the [gates] default: the demo judges as a fresh deployment would
PREDICT_PATH = "/v1/models/demo:predict"
# Enough mirrored requests for each p99's 97.5% bounds to be tight enough that the latency gate
# decides on the demo candidate's added delay instead of waiting.
DEMO_REQUESTS = 10_000
_SETTLE_TIMEOUT_S = 10.0
_TICK_S = 0.1


@dataclass(frozen=True, slots=True)
class DemoOptions:
    requests: int = DEMO_REQUESTS
    flip_rate: float = 0.03
    delay_ms: float = 2.0
    concurrency: int = 16
    seed: int = 0
    as_json: bool = False
    min_samples: int = MIN_SAMPLES

    def problems(self) -> list[str]:
        found = []
        if self.requests < 1:
            found.append(f"--requests: must be at least 1, got {self.requests}")
        if not 0.0 <= self.flip_rate <= 1.0:
            found.append(f"--flip-rate: must be between 0 and 1, got {self.flip_rate}")
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0.0):
            found.append(f"--delay-ms: must be a finite number >= 0, got {self.delay_ms}")
        if self.concurrency < 1:
            found.append(f"--concurrency: must be at least 1, got {self.concurrency}")
        return found


@dataclass(slots=True)
class _Traffic:
    """What the client sent and got back."""

    done: int = 0
    ok: int = 0
    failed: int = 0
    answered_instances: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DemoResult:
    report: Report
    requests: int
    failed: int
    instances: int  # instances in requests production answered 200
    expected_disagree: int  # of those, the ones the candidate flips
    seconds: float
    options: DemoOptions

    @property
    def expected_rate(self) -> float:
        return self.expected_disagree / self.instances if self.instances else 0.0

    def to_json(self) -> dict[str, Any]:
        comparisons = self.report.stats["comparisons"]
        return {
            **self.report.to_json(),
            "demo": {
                "requests": self.requests,
                "failed": self.failed,
                "seconds": round(self.seconds, 3),
                "flip_rate": self.options.flip_rate,
                "delay_ms": self.options.delay_ms,
                "seed": self.options.seed,
                "instances": self.instances,
                "expected_disagree": self.expected_disagree,
                "expected_disagreement_rate": self.expected_rate,
                "measured_disagree": comparisons["disagree"],
                "measured_disagreement_rate": comparisons["disagreement_rate"],
            },
        }


def demo_config(production_url: str, candidate_url: str, min_samples: int = MIN_SAMPLES) -> Config:
    """The demo proxy's config: every request mirrored, listening on free loopback ports."""
    config = parse_config(
        {
            # Placeholder ports: validation rejects 0, which is what we want (any free port), so
            # it is set below; binding port 0 has no window in which another process takes it.
            "listen": {"host": "127.0.0.1", "port": 1, "drain_timeout_s": 2.0},
            "admin": {"host": "127.0.0.1", "port": 2},
            "production": {"url": production_url, "timeout_s": 5.0},
            "candidate": {"url": candidate_url, "timeout_s": 5.0},
            "mirror": {"sample_rate": 1.0},
            "gates": {"min_samples": min_samples},
        }
    )
    return dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, port=0),
        admin=dataclasses.replace(config.admin, port=0),
    )


def _batches(requests: int, seed: int) -> list[list[list[float]]]:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 4) for _ in range(requests)]
    instances = generate_instances(sum(sizes), seed)
    batches, start = [], 0
    for size in sizes:
        batches.append(instances[start : start + size])
        start += size
    return batches


class Progress:
    """One line rewritten in place on a terminal; a few plain lines (each quarter) otherwise."""

    def __init__(self, total: int, stream: TextIO, live: Callable[[], str]) -> None:
        self.total = total
        self.stream = stream
        self.live = live
        self.tty = bool(getattr(stream, "isatty", None) and stream.isatty())
        self.started = time.monotonic()
        self._quarters_shown = 0
        self._line_open = False

    def _text(self, done: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        share = done / self.total
        return (
            f"demo: {done}/{self.total} requests ({share:4.0%}), {done / elapsed:5.0f} req/s, "
            f"{self.live()}"
        )

    def update(self, done: int) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self._text(done)}")
            self._line_open = True
        else:
            quarter = done * 4 // self.total
            if quarter > self._quarters_shown:
                self._quarters_shown = quarter
                self.stream.write(self._text(done) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


async def _drive(
    url: str, batches: Sequence[list[list[float]]], concurrency: int, progress: Progress
) -> _Traffic:
    traffic = _Traffic()
    queue = iter(range(len(batches)))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in queue:  # one shared iterator: each batch is sent once
            batch = batches[index]
            body = orjson.dumps({"instances": batch})
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            traffic.done += 1
            if status == 200:
                traffic.ok += 1
                traffic.answered_instances.extend(batch)
            else:
                traffic.failed += 1

    async def ticker() -> None:
        while True:
            progress.update(traffic.done)
            await asyncio.sleep(_TICK_S)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(worker(session) for _ in range(min(concurrency, len(batches)))))
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
    progress.update(traffic.done)
    progress.close()
    return traffic


async def settle(proxy: ShadowProxy, timeout_s: float = _SETTLE_TIMEOUT_S) -> None:
    """Wait until every shadow exchange has finished and been counted."""
    mirror = proxy.mirror
    assert mirror is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while mirror.busy and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)


def address_url(address: tuple[str, int]) -> str:
    host, port = address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def demo(options: DemoOptions, progress_stream: TextIO) -> DemoResult:
    """Run the demo on the running loop; everything started is stopped before it returns."""
    batches = _batches(options.requests, options.seed)
    candidate_behaviour = ModelBehaviour.candidate(
        flip_rate=options.flip_rate, delay_ms=options.delay_ms, seed=options.seed
    )
    async with contextlib.AsyncExitStack() as stack:
        production: RunningModel = await stack.enter_async_context(
            await start_model(ModelBehaviour.production())
        )
        candidate: RunningModel = await stack.enter_async_context(await start_model(candidate_behaviour))
        config = demo_config(production.url, candidate.url, options.min_samples)
        proxy = ShadowProxy(config)
        stack.push_async_callback(proxy.shutdown)  # copes with a start that failed half-way
        await proxy.start()
        admin_url = address_url(proxy.admin_address)
        print(
            f"demo: production model {production.url}, candidate {candidate.url} "
            f"(flip_rate {options.flip_rate:g}, +{options.delay_ms:g} ms), "
            f"proxy {address_url(proxy.listen_address)} (admin {admin_url}), mirroring every request",
            file=progress_stream,
            flush=True,
        )
        stats = proxy.stats

        def live() -> str:
            compared = stats.agree + stats.disagree
            rate = f"{stats.disagree / compared:.2%}" if compared else "-"
            return f"mirrored {stats.mirror['sent']}, disagreement {rate}"

        progress = Progress(options.requests, progress_stream, live)
        started = time.monotonic()
        try:
            traffic = await _drive(
                address_url(proxy.listen_address) + PREDICT_PATH, batches, options.concurrency, progress
            )
        finally:
            progress.close()
        await settle(proxy)
        seconds = time.monotonic() - started
        snapshot = proxy.stats_snapshot()
        report = make_report(snapshot, config.gates, [admin_url])
    flips = sum(candidate_flips(row, options.flip_rate) for row in traffic.answered_instances)
    return DemoResult(
        report=report,
        requests=traffic.done,
        failed=traffic.failed,
        instances=len(traffic.answered_instances),
        expected_disagree=flips,
        seconds=seconds,
        options=options,
    )


def render_demo(result: DemoResult, color: bool = False) -> str:
    """The report, then what the demo sent and the disagreement it was built to show."""
    comparisons = result.report.stats["comparisons"]
    lo, hi = comparisons["disagreement_rate_ci95"]
    rate = result.requests / result.seconds if result.seconds > 0 else 0.0
    lines = [
        render(result.report, color=color),
        "",
        "Demo",
        f"  sent {result.requests} requests ({result.instances} instances answered) in "
        f"{result.seconds:.1f} s ({rate:.0f} req/s), {result.failed} failed",
        f"  expected disagreement {result.expected_rate:.2%} ({result.expected_disagree} of "
        f"{result.instances} instances flipped by the candidate at flip_rate {result.options.flip_rate:g})",
        f"  measured disagreement {comparisons['disagreement_rate']:.2%} ({comparisons['disagree']} of "
        f"{comparisons['total']} compared; 95% interval {lo:.2%} - {hi:.2%})",
    ]
    return "\n".join(lines)


class Interrupted(Exception):
    """SIGINT or SIGTERM cancelled the demo; everything it started is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def report(self, err: TextIO) -> int:
        print(f"demo: interrupted ({signal.Signals(self.signum).name}); everything stopped", file=err)
        return 128 + self.signum


async def until_signalled(work: Coroutine[Any, Any, R]) -> R:
    """``work``'s result; the first SIGINT or SIGTERM cancels it and raises ``Interrupted``."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(work)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        # The first signal cancels the run, whose cleanup then closes everything in order; more
        # signals must not interrupt that cleanup.
        if not received:
            received.append(signum)
            task.cancel()

    handled: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        raise Interrupted(received[0]) from None
    finally:
        for handled_sig in handled:
            loop.remove_signal_handler(handled_sig)


async def _main(options: DemoOptions, out: TextIO, err: TextIO) -> int:
    try:
        result = await until_signalled(demo(options, err))
    except Interrupted as exc:
        return exc.report(err)
    if options.as_json:
        print(to_json_text(result.to_json()), file=out)
    else:
        print(render_demo(result, color=use_color(out)), file=out)
    return 0


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``main`` in a fresh event loop: uvloop, as the proxy runs in production."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    return uvloop.run(main)


def run_demo(
    *,
    requests: int = DEMO_REQUESTS,
    flip_rate: float = 0.03,
    delay_ms: float = 2.0,
    concurrency: int = 16,
    seed: int = 0,
    as_json: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`shadowproxy demo` in a fresh event loop (uvloop, as the proxy runs in production)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    options = DemoOptions(
        requests=requests,
        flip_rate=flip_rate,
        delay_ms=delay_ms,
        concurrency=concurrency,
        seed=seed,
        as_json=as_json,
    )
    problems = options.problems()
    if problems:
        for problem in problems:
            print(f"shadowproxy demo: {problem}", file=err)
        return EXIT_USAGE
    return run_loop(_main(options, out, err))
