"""`serve --workers N`: N proxy processes on one listen port, one admin port for all of them.

Each worker is a full proxy (`shadowproxy serve --worker`) listening with SO_REUSEPORT, so the
kernel spreads connections across them, with a private admin listener on 127.0.0.1. The parent
(the supervisor) binds only the configured admin port and answers it by asking the workers:
`/shadow/stats` and the verdict merge their mergeable state (histograms add up), `/metrics` sums
their samples, `PUT /shadow/sample_rate` reaches every worker, a worker that dies is restarted,
and SIGTERM to the parent drains them all. The hot path pays nothing for any of this: workers
keep their own in-process registries, and the parent reads them only when it is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from shadowproxy.config import Config
from shadowproxy.control.admin import make_admin_app
from shadowproxy.control.app import describe_candidates
from shadowproxy.control.collectors import ShadowCollector
from shadowproxy.control.descriptors import raise_open_files_limit
from shadowproxy.control.live import HistoryRecorder
from shadowproxy.control.readiness import Readiness, tls_context
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.metrics import DriftCollector
from shadowproxy.shadow.observers import Component
from shadowproxy.shadow.routes import TokenGuard, json_response, requires_token

if TYPE_CHECKING:
    from shadowproxy.drift.profile import Profile

log = logging.getLogger("shadowproxy.control.workers")

WORKER_LINE = "shadowproxy worker admin "
# Computed from merged stats by the parent itself: never summed across workers.
_DERIVED = frozenset(
    ("shadowproxy_disagreement_rate", "shadowproxy_disagreement_rate_ci95", "shadowproxy_promotion_verdict",
     "shadowproxy_prediction_difference", "shadowproxy_slice_requests", "shadowproxy_slice_comparisons",
     "shadowproxy_noise_rate", "shadowproxy_net_disagreement_rate", "shadowproxy_net_disagreement_rate_ci95")
)
# Gauges that add up across workers; any other gauge is a per-process reading (take the largest).
_SUMMED_GAUGES = frozenset(("shadowproxy_mirror_in_flight",))
_RESTART_DELAY_S = 0.5
EXIT_CONFIG = 2  # `serve`: the config cannot be used


class WorkerRefused(OSError):
    """A worker exited with EXIT_CONFIG during start-up."""


def die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when its supervisor dies, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


class _Summed(Collector):
    """Re-exposes metric families parsed from the workers, samples with equal labels added up."""

    def __init__(self, expositions: list[str], skip: frozenset[str] = frozenset()) -> None:
        self.expositions = expositions
        self.skip = _DERIVED | skip

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.expositions:
            for family in text_string_to_metric_families(text):
                if family.name in self.skip:
                    continue
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                summed = values[family.name]
                add = family.type != "gauge" or family.name in _SUMMED_GAUGES
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in summed:
                        summed[key] = sample.value
                    elif add:
                        summed[key] += sample.value
                    else:
                        summed[key] = max(summed[key], sample.value)
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family


class _Fixed:
    """A drift document already computed, for a DriftCollector."""

    def __init__(self, doc: dict[str, Any] | None) -> None:
        self.doc = doc

    def snapshot(self) -> dict[str, Any] | None:
        return self.doc


class _Families(Collector):
    """Metric families already built."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class _Forward:
    """The component endpoints of the workers on the supervisor's admin port. `/shadow/requests/{id}`
    and `/shadow/labels` are answered by the first live worker: the audit store is one file all
    workers write, so any worker can answer for any request. The supervisor guards them itself:
    a worker's private admin is on loopback, where no token is needed. `/shadow/drift` is merged
    from every worker when they share a baseline file, else answered by the first."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def routes(self) -> list[web.RouteDef]:
        data = web.route("*", r"/shadow/{tail:(requests/.+|labels)}", requires_token(self.forward))
        if self.supervisor.drift_baseline is not None:  # merged from every worker (see drift_snapshot)
            async def drift(request: web.Request) -> web.StreamResponse:
                doc = await self.supervisor.drift_snapshot()
                if doc is None:
                    return json_response({"error": "no worker is running"}, 503)
                return json_response(doc)

            return [data, web.get("/shadow/drift", drift)]
        return [data, web.route("*", "/shadow/drift", self.forward)]

    async def forward(self, request: web.Request) -> web.StreamResponse:
        live = [w for w in self.supervisor.workers if w.ready.is_set()]
        if not live or self.supervisor._session is None:
            return web.json_response({"error": "no worker is running"}, status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with self.supervisor._session.request(
                request.method, live[0].admin_url + request.path_qs, data=await request.read(), headers=headers
            ) as answer:
                body = await answer.read()
                return web.Response(body=body, status=answer.status, content_type=answer.content_type)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"worker unreachable: {exc}"}, status=502)

    # An admin-only component: it observes no traffic and adds no stats.
    def wants_bodies(self) -> bool:
        return False

    def on_exchange(self, record: Any, wanted: bool) -> None:
        pass

    def on_pair(self, record: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def stats_blocks(self) -> dict[str, Any]:
        return {}


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_url = ""
        self.ready = asyncio.Event()


class Supervisor:
    """The parent process of `serve --workers N`; an AdminBackend over all workers."""

    def __init__(self, config: Config, config_path: str, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(workers)]
        self.draining = False
        self.components: list[Component] = []
        # With a baseline file every worker bins against the same edges, so their drift windows
        # add up; baselines learned in warm-up differ per worker, and the first worker speaks.
        self.drift_baseline: Profile | None = None
        if config.drift is not None:
            from shadowproxy.drift.monitor import DriftMonitor  # numpy: only with [drift]
            from shadowproxy.drift.profile import load_profile

            # What every worker would refuse at start-up (ConfigError), refused once, here.
            DriftMonitor(config.drift, config.compare)
            if config.drift.baseline:
                self.drift_baseline = load_profile(config.drift.baseline)
        for index, cand in enumerate(config.candidates):
            tls_context("candidate" if len(config.candidates) == 1 else f"candidates[{index}]", cand)
        self.refused = asyncio.Event()  # a worker exited 2 during start-up: its config cannot run
        if config.store.path or config.drift is not None:
            self.components.append(_Forward(self))
        self.readiness = Readiness(config.production)
        self._configured_rates = {c.name: c.rate(config.mirror) for c in config.candidates}
        self._sample_rates = dict(self._configured_rates)
        self._session: aiohttp.ClientSession | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.guard = TokenGuard(config.admin)
        self.history = HistoryRecorder(self._merged_stats)

    # -- processes --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for worker in self.workers:
            self._watchers.append(asyncio.create_task(self._keep_running(worker)))
        ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in self.workers)))
        refused: asyncio.Future[Any] = asyncio.ensure_future(self.refused.wait())
        done, _ = await asyncio.wait((ready, refused), timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        refused.cancel()
        if refused in done:
            raise WorkerRefused("a worker could not start with this config (its problems are above)")
        if ready not in done:
            raise OSError("workers did not start within 30 s")
        self._runner = web.AppRunner(make_admin_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.admin.host, self.config.admin.port).start()
        self.history.start()

    async def _spawn(self, worker: Worker) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "serve", "--config", self.config_path, "--worker",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "SHADOWPROXY_WORKERS": str(len(self.workers))},  # [record]: each keeps 1/N
        )
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                code = await proc.wait()
                if code == EXIT_CONFIG:
                    self.refused.set()
                raise OSError(f"worker {worker.index} exited during start-up (code {code})")
            if line.startswith(WORKER_LINE):
                worker.admin_url = line[len(WORKER_LINE):].split()[0]
                break
        worker.proc = proc
        for name, rate in self._sample_rates.items():
            if rate != self._configured_rates[name]:
                await self._put_rate(worker, rate, name)  # a restarted worker joins the current rates
        worker.ready.set()
        return proc

    async def _keep_running(self, worker: Worker) -> None:
        while not self.draining:
            try:
                proc = await self._spawn(worker)
            except OSError as exc:
                if self.refused.is_set():
                    return  # restarting would only print the same problems again
                log.error("%s", exc)
                await asyncio.sleep(_RESTART_DELAY_S)
                continue
            code = await proc.wait()
            worker.ready.clear()
            if not self.draining:
                log.error("worker %d (pid %d) exited with %s; restarting", worker.index, proc.pid, code)
                await asyncio.sleep(_RESTART_DELAY_S)

    async def shutdown(self) -> int:
        """Forward SIGTERM; each worker keeps accepting for shutdown_delay_s, then drains."""
        self.draining = True
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGTERM)
        listen = self.config.listen
        limit = listen.shutdown_delay_s + listen.drain_timeout_s + 5
        codes = []
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                code = await asyncio.wait_for(worker.proc.wait(), limit)
            except TimeoutError:
                worker.proc.kill()
                code = await worker.proc.wait()
            if code != 0:
                log.error("worker %d (pid %d) exited with %s during shutdown", worker.index, worker.proc.pid, code)
            codes.append(code)
        for task in self._watchers:
            task.cancel()
        await self.history.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        return 0 if all(code == 0 for code in codes) else 1

    def hangup(self) -> None:
        """SIGHUP: read a `file:` admin.token again, here and in every worker."""
        self.guard.reload()
        for worker in self.workers:
            # Only a ready worker: it handles SIGHUP before it reports its admin address.
            if worker.ready.is_set() and worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it exited a moment ago
                    worker.proc.send_signal(signal.SIGHUP)

    # -- talking to workers -----------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        # The workers read the same token (and the same `file:`), so the one in force here is theirs.
        token = self.guard.current()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _get(self, worker: Worker, path: str) -> bytes:
        assert self._session is not None
        async with self._session.get(worker.admin_url + path, headers=self._auth()) as response:
            response.raise_for_status()
            return await response.read()

    async def _put_rate(self, worker: Worker, rate: float, candidate: str | None = None) -> None:
        assert self._session is not None
        body: dict[str, Any] = {"sample_rate": rate}
        if candidate is not None:
            body["candidate"] = candidate
        async with self._session.put(
            worker.admin_url + "/shadow/sample_rate", data=orjson.dumps(body), headers=self._auth()
        ) as response:
            response.raise_for_status()

    async def _from_all(self, path: str) -> list[bytes]:
        live = [w for w in self.workers if w.ready.is_set()]
        answers = await asyncio.gather(*(self._get(w, path) for w in live), return_exceptions=True)
        return [a for a in answers if isinstance(a, bytes)]

    # -- AdminBackend -----------------------------------------------------------------------------
    async def production_reachable(self) -> bool:
        return await self.readiness.check()

    async def _merged(self) -> tuple[ShadowStats, dict[str, Any]]:
        states = [orjson.loads(body) for body in await self._from_all("/shadow/stats?full=1")]
        merged = ShadowStats.from_states(states)
        extras: dict[str, Any] = {}
        if states:
            # Blocks of components (ground truth, drift) are per worker; the first one speaks for all.
            own = merged.snapshot().keys()
            extras = {k: v for k, v in states[0].items() if k not in own and k not in ("state", "process")}
        extras["workers"] = [
            {**state.get("process", {}), "requests": state["production"]["requests"]} for state in states
        ]
        return merged, extras

    async def _merged_stats(self) -> ShadowStats | None:
        """The workers' merged stats for the history; None when no worker answered."""
        states = [orjson.loads(body) for body in await self._from_all("/shadow/stats?full=1")]
        return ShadowStats.from_states(states) if states else None

    async def snapshot(self, full: bool = False) -> dict[str, Any]:
        merged, extras = await self._merged()
        snapshot = merged.snapshot(full=full)
        snapshot.update(extras)
        return snapshot

    async def drift_snapshot(self) -> dict[str, Any] | None:
        """`/shadow/drift` over every worker (with a baseline file; see `drift.merge_snapshots`)."""
        from shadowproxy.drift.monitor import merge_snapshots

        assert self.drift_baseline is not None
        docs = [orjson.loads(body) for body in await self._from_all("/shadow/drift?full=1")]
        return merge_snapshots(docs, self.drift_baseline) if docs else None

    async def metrics_exposition(self) -> bytes:
        expositions = [body.decode() for body in await self._from_all("/metrics")]
        merged, extras = await self._merged()
        blocks = {k: v for k, v in extras.items() if k != "workers"}
        registry = CollectorRegistry(auto_describe=False)
        # Workers never answer /readyz (the supervisor does), so their readiness gauges say nothing.
        ready = GaugeMetricFamily("shadowproxy_production_ready", "1 while production accepts connections.")
        ready.add_metric([], 1.0 if await self.readiness.check() else 0.0)
        registry.register(_Families([ready]))
        skip: frozenset[str] = frozenset({"shadowproxy_production_ready"})
        if self.drift_baseline is not None:
            drift = DriftCollector()
            drift.source = _Fixed(await self.drift_snapshot())
            registry.register(drift)
            skip |= DriftCollector.FAMILIES
        registry.register(_Summed(expositions, skip))
        registry.register(ShadowCollector(merged, self.config.gates, lambda: blocks))
        return generate_latest(registry)

    def current_sample_rate(self) -> float | None:
        return self._sample_rates[self.config.candidates[0].name]

    def sample_rates(self) -> dict[str, float]:
        return dict(self._sample_rates)

    async def set_sample_rate(self, rate: float, candidate: str | None = None) -> None:
        for name in self._sample_rates:
            if candidate is None or name == candidate:
                self._sample_rates[name] = rate
        await asyncio.gather(*(self._put_rate(w, rate, candidate) for w in self.workers if w.ready.is_set()))


async def supervise(config: Config, config_path: str, workers: int) -> int:
    # The supervisor's admin port needs descriptors too; each worker raises its own limit, and
    # computes its own listen.max_connections from it (see control/descriptors.py).
    open_files = raise_open_files_limit()
    supervisor = Supervisor(config, config_path, workers)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.hangup)
    try:
        await supervisor.start()
    except WorkerRefused as exc:
        print(f"shadowproxy: {exc}", file=sys.stderr)
        await supervisor.shutdown()
        return EXIT_CONFIG
    except OSError as exc:
        print(f"shadowproxy: {exc}", file=sys.stderr)
        await supervisor.shutdown()
        return 1
    log.info("supervisor %s", open_files.describe())
    listen, admin = config.listen, config.admin
    print(
        f"shadowproxy listening on http://{listen.host}:{listen.port} with {workers} workers "
        f"(admin http://{admin.host}:{admin.port}); production {config.production.target}, "
        f"{describe_candidates(config)}, sample_rate {config.mirror.sample_rate}",
        flush=True,
    )
    await stop.wait()
    return await supervisor.shutdown()
