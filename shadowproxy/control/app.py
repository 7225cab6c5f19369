"""Assembly and lifecycle: pools, proxy, mirror, admin app; start, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client import generate_latest

from shadowproxy.config import CandidateConfig, Config
from shadowproxy.control.admin import make_admin_app
from shadowproxy.control.collectors import ShadowCollector
from shadowproxy.control.descriptors import client_connection_limit, raise_open_files_limit
from shadowproxy.control.live import HistoryRecorder
from shadowproxy.control.readiness import Readiness, tls_context
from shadowproxy.http.server import Server, ServerLimits
from shadowproxy.http.upstream import UpstreamPool
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.judge import PairJudge
from shadowproxy.shadow.llm import LlmMeter
from shadowproxy.shadow.metrics import JudgeMetrics, Metrics
from shadowproxy.shadow.mirror import Mirror, MirrorGroup
from shadowproxy.shadow.observers import Component, Observer
from shadowproxy.shadow.proxy import Proxy
from shadowproxy.shadow.routes import TokenGuard
from shadowproxy.shadow.slices import SliceMatcher

if TYPE_CHECKING:
    from shadowproxy.grpcproxy.forward import GrpcProxy

log = logging.getLogger("shadowproxy")


def build_components(config: Config, metrics: Metrics, shared: bool = False) -> list[Component]:
    """The optional capabilities the config turns on, each behind the observer seam. `shared`:
    this process is one of several workers (their audit store is one file)."""
    components: list[Component] = []
    if config.store.path:
        from shadowproxy.store.writer import AuditStore

        components.append(AuditStore(config, metrics, shared))
    if config.drift is not None:
        from shadowproxy.drift.monitor import DriftMonitor  # numpy and the profile code load only with [drift]

        components.append(DriftMonitor(config.drift, config.compare, metrics))
    if config.record.path:
        from shadowproxy.record.recorder import Recorder

        components.append(Recorder(config, metrics))
    return components


class ShadowProxy:
    """One proxy instance: listen port (lean engine) plus admin port (aiohttp), on one loop."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.metrics = Metrics(candidates=config.candidate_names, secondary=config.secondary is not None)
        self.slices = SliceMatcher(config.slices) if config.slices else None
        self.stats = ShadowStats(config.candidate_names, self.slices.names if self.slices is not None else ())
        if config.secondary is not None:
            self.stats.enable_secondary()
        if config.compare.kind == "fields":
            self.stats.enable_fields(config.compare.noise_threshold)
        self.metrics.registry.register(ShadowCollector(self.stats, config.gates, self.component_blocks))
        self.draining = False
        self.listen_address: tuple[str, int] = ("", 0)
        self.grpc: GrpcProxy | None = None  # listen.grpc_port's listener
        self.grpc_port = 0  # the port it bound
        self.admin_address: tuple[str, int] = ("", 0)
        self.production_pool: UpstreamPool | None = None
        self.candidate_pool: UpstreamPool | None = None  # the first candidate's
        self.candidate_pools: list[UpstreamPool] = []
        self.mirror: Mirror | None = None  # the first candidate's
        self.mirrors: list[Mirror] = []  # one per candidate, in config order
        self.fanout: Mirror | MirrorGroup | None = None  # what the proxy hands sampled requests to
        self.secondary: Mirror | None = None  # [secondary]: production's twin
        self.secondary_pool: UpstreamPool | None = None
        # [judge]: a sample of the first candidate's compared LLM pairs judged blind, off the hot
        # path (shadow/judge.py).
        self.judge: PairJudge | None = (
            PairJudge(config.judge, self.stats.judge, JudgeMetrics(self.metrics.registry))
            if config.judge is not None else None
        )
        # Other capabilities (audit store, drift monitor) see traffic through this list only.
        self.observers: list[Observer] = []
        # A process sharing its port is one of several workers, and then shares the store's file.
        self.components: list[Component] = build_components(config, self.metrics, shared=reuse_port)
        self.observers.extend(self.components)
        self.proxy: Proxy | None = None
        self.server: Server | None = None
        self.max_client_connections: int | None = None  # listen.max_connections, or computed at start
        self._admin_runner: web.AppRunner | None = None
        self.readiness = Readiness(config.production)
        self.guard = TokenGuard(config.admin)
        self.history = HistoryRecorder(self._own_stats)

    async def _own_stats(self) -> ShadowStats:
        return self.stats

    async def start(self) -> None:
        cfg = self.config
        prod = cfg.production
        self.production_pool = UpstreamPool(
            prod.target,
            max_connections=prod.max_connections,
            idle_timeout_s=prod.pool_idle_timeout_s,
            ssl=tls_context("production", prod),
            connect_timeout_s=prod.timeout_s,
        )
        several = len(cfg.candidates) > 1
        for index, cand in enumerate(cfg.candidates):
            pool = UpstreamPool(
                cand.target,
                max_connections=cand.max_in_flight,
                idle_timeout_s=prod.pool_idle_timeout_s,
                ssl=tls_context(f"candidates[{index}]" if several else "candidate", cand),
                connect_timeout_s=cand.timeout_s,
            )
            self.candidate_pools.append(pool)
            self.mirrors.append(Mirror(
                pool=pool,
                candidate=cand,
                mirror=cfg.mirror,
                compare=cfg.compare,
                production_timeout_s=prod.timeout_s,
                metrics=self.metrics,
                stats=self.stats.for_candidate(cand.name),
                # The audit store keeps one candidate's answer per request: the first one's.
                observers=self.observers if not self.mirrors else [],
                name=cand.name,
            ))
        self.candidate_pool = self.candidate_pools[0]
        self.mirror = self.mirrors[0]
        sec = cfg.secondary
        if sec is not None:
            self.secondary_pool = UpstreamPool(
                sec.target,
                max_connections=sec.max_in_flight,
                idle_timeout_s=prod.pool_idle_timeout_s,
                ssl=tls_context("secondary", sec),
                connect_timeout_s=sec.timeout_s,
            )
            assert self.stats.secondary is not None
            self.secondary = Mirror(
                pool=self.secondary_pool,
                # The secondary's own exchange ends within its timeout_s, streamed or not.
                candidate=CandidateConfig(
                    url=sec.url, timeout_s=sec.timeout_s, ca_file=sec.ca_file, tls_verify=sec.tls_verify,
                    max_in_flight=sec.max_in_flight, backoff_after=sec.backoff_after,
                    stream_timeout_s=sec.timeout_s, stream_idle_timeout_s=sec.timeout_s,
                ),
                mirror=cfg.mirror,
                compare=cfg.compare,
                production_timeout_s=prod.timeout_s,
                metrics=self.metrics,
                stats=self.stats.secondary,
                name="secondary",
                secondary=True,
            )
        self.fanout = (
            MirrorGroup(self.mirrors, cfg.mirror, self.secondary)
            if several or self.secondary is not None else self.mirror
        )
        if self.judge is not None:
            await self.judge.start()
            self.mirror.judge = self.judge  # the first candidate's pairs
        self.proxy = Proxy(
            pool=self.production_pool,
            timeout_s=prod.timeout_s,
            metrics=self.metrics,
            stats=self.stats,
            mirror=self.fanout,
            observers=self.observers,
            capture_limit=cfg.compare.max_response_bytes,
            slices=self.slices,
            llm=(
                LlmMeter("production", self.stats.llm.production, self.metrics, prod.price,
                         cfg.compare.max_response_bytes)
                if cfg.compare.preset == "openai" else None
            ),
        )
        for component in self.components:
            await component.start()
        listen = cfg.listen
        self.max_client_connections = client_connection_limit(cfg)
        self.server = Server(
            self.proxy.handle,
            ServerLimits(
                max_header_bytes=listen.max_header_bytes,
                max_body_bytes=listen.max_body_bytes,
                header_timeout_s=listen.header_timeout_s,
                keepalive_timeout_s=listen.keepalive_timeout_s,
                lingering_time_s=listen.lingering_time_s,
                lingering_timeout_s=listen.lingering_timeout_s,
                max_connections=self.max_client_connections,
            ),
            on_client_error=lambda reason: self.metrics.client_errors.labels(reason).inc(),
        )
        self.listen_address = await self.server.listen(listen.host, listen.port, reuse_port=self.reuse_port)
        if listen.grpc_port is not None:
            # Imported here: grpcio is an optional extra, needed only with a gRPC listener.
            from shadowproxy.grpcproxy.forward import GrpcProxy

            self.grpc = GrpcProxy(cfg, self.metrics, self.stats, {m.name: m.sampler for m in self.mirrors})
            self.grpc_port = await self.grpc.start(listen.host, listen.grpc_port, reuse_port=self.reuse_port)
        runner = web.AppRunner(make_admin_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, cfg.admin.host, cfg.admin.port)
        await site.start()
        self._admin_runner = runner
        self.history.start()
        server = cast(asyncio.Server, site._server)
        sockname = server.sockets[0].getsockname()
        self.admin_address = (str(sockname[0]), int(sockname[1]))

    # -- AdminBackend ------------------------------------------------------------------------------
    async def snapshot(self, full: bool = False) -> dict[str, Any]:
        return self.stats_snapshot(full=full)

    async def metrics_exposition(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def current_sample_rate(self) -> float | None:
        return self.mirror.sample_rate if self.mirror is not None else None

    def sample_rates(self) -> dict[str, float]:
        """Each candidate's rate, by name, in config order."""
        if not self.mirrors:
            return {c.name: c.rate(self.config.mirror) for c in self.config.candidates}
        return {m.name: m.sample_rate for m in self.mirrors}

    async def set_sample_rate(self, rate: float, candidate: str | None = None) -> None:
        """Every candidate's rate, or the named one's (KeyError for an unknown name)."""
        if candidate is not None and candidate not in self.config.candidate_names:
            raise KeyError(candidate)
        for mirror in self.mirrors:
            if candidate is None or mirror.name == candidate:
                mirror.set_sample_rate(rate)

    def stats_snapshot(self, full: bool = False) -> dict[str, Any]:
        snapshot = self.stats.snapshot(full=full)
        snapshot["process"] = {
            "pid": os.getpid(), "sample_rate": self.current_sample_rate(), "sample_rates": self.sample_rates()
        }
        snapshot.update(self.component_blocks())
        return snapshot

    def component_blocks(self) -> dict[str, Any]:
        blocks: dict[str, Any] = {}
        for component in self.components:
            blocks.update(component.stats_blocks())
        return blocks

    async def production_reachable(self) -> bool:
        ok = await self.readiness.check()
        self.metrics.ready.set(1 if ok else 0)
        return ok

    async def shutdown(self) -> None:
        """Readiness off, keep serving `shutdown_delay_s`, stop accepting, drain, close."""
        listen = self.config.listen
        self.draining = True
        if listen.shutdown_delay_s > 0:
            await asyncio.sleep(listen.shutdown_delay_s)
        # Client requests and shadow exchanges drain side by side within one drain_timeout_s, so the
        # whole stop fits shutdown_delay_s + drain_timeout_s (a pod's grace period).
        assert self.server is not None and self.fanout is not None
        drained, *_ = await asyncio.gather(
            self.server.drain(listen.drain_timeout_s), self._drain_shadow(listen.drain_timeout_s),
            *([self.grpc.stop(listen.drain_timeout_s)] if self.grpc is not None else []),
        )
        if not drained:
            log.warning("drain timeout: closed connections still in flight")
        if self.proxy is not None:
            self.proxy.close()
        for pool in (self.production_pool, *self.candidate_pools, self.secondary_pool):
            if pool is not None:
                await pool.close()
        if self.judge is not None:
            await self.judge.close()  # what is still queued or being judged is counted as dropped
        for component in self.components:
            await component.close()  # after the drain: every answered request is recorded
        await self.history.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    async def _drain_shadow(self, timeout_s: float) -> None:
        """Shadow exchanges, then the judgements of the pairs they made, within one drain time."""
        assert self.fanout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self.fanout.drain(timeout_s)
        if self.judge is not None:
            await self.judge.drain(max(0.0, deadline - loop.time()))


def describe_candidates(config: Config) -> str:
    """`candidate URL`, or `candidates a URL, b URL (rate 0.5)` for the start-up line."""
    if len(config.candidates) == 1:
        return f"candidate {config.candidate.target}"
    items = [
        f"{c.name} {c.target}" + (f" (rate {c.sample_rate})" if c.sample_rate is not None else "")
        for c in config.candidates
    ]
    return "candidates " + ", ".join(items)


async def serve(config: Config, *, worker: bool = False) -> int:
    """One proxy process; with `worker`, one of several on a shared port (see workers.py)."""
    if worker:
        from shadowproxy.control.workers import WORKER_LINE, die_with_parent

        die_with_parent()
        # The configured admin port belongs to the supervisor; a worker's admin is private.
        config = dataclasses.replace(config, admin=dataclasses.replace(config.admin, host="127.0.0.1", port=0))
    open_files = raise_open_files_limit()  # before start: listen.max_connections may follow from it
    proxy = ShadowProxy(config, reuse_port=worker)
    try:
        await proxy.start()
    except OSError as exc:
        print(f"shadowproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    cap = proxy.max_client_connections
    how = "as set" if config.listen.max_connections is not None else "from the open-files limit"
    log.info("%s; listen.max_connections %s (%s)", open_files.describe(), "unlimited" if cap is None else cap, how)
    if proxy.grpc is not None:
        log.info("gRPC listening on %s:%d, production %s", config.listen.host, proxy.grpc_port,
                 config.production.grpc_url)
    # Everything loaded so far lives as long as the process: out of the collector's way, so the
    # full collections that per-request garbage triggers do not walk it again and again.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # kept: a second signal must not kill a draining proxy
    loop.add_signal_handler(signal.SIGHUP, proxy.guard.reload)
    lh, lp = proxy.listen_address
    ah, ap = proxy.admin_address
    if worker:
        print(f"{WORKER_LINE}http://{ah}:{ap} listening on http://{lh}:{lp}", flush=True)
    else:
        print(
            f"shadowproxy listening on http://{lh}:{lp} (admin http://{ah}:{ap}); "
            f"production {config.production.target}, {describe_candidates(config)}, "
            f"sample_rate {config.mirror.sample_rate}",
            flush=True,
        )
    await stop.wait()
    await proxy.shutdown()
    if worker:
        # A stop of the whole process group (systemd's KillMode=control-group, a terminal's Ctrl-C)
        # signals a worker twice: directly and through the supervisor. From here on any further
        # signal is ignored, so a clean exit cannot end as death by signal (and the supervisor
        # exit 1). Straight to SIG_IGN, without loop.remove_signal_handler first: that resets
        # the signal to SIG_DFL, and a signal landing between the two calls killed the worker (a
        # rare CI failure). uvloop leaves the disposition alone when the loop closes (its
        # remove_signal_handler returns early once the loop has stopped listening).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    return 0


def run(config: Config, workers: int = 1, *, config_path: str = "", worker: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if workers > 1 and not worker:
        from shadowproxy.control.workers import supervise

        main = supervise(config, config_path, workers)
    else:
        main = serve(config, worker=worker)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    return uvloop.run(main)
