"""Assembly and lifecycle: pools, proxy, mirror, admin app; start, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from typing import Any, cast

from aiohttp import web
from prometheus_client import generate_latest

from shadowproxy.admin import make_admin_app
from shadowproxy.config import Config, UpstreamURL
from shadowproxy.http.server import Server, ServerLimits
from shadowproxy.http.upstream import UpstreamPool
from shadowproxy.metrics import Metrics, ShadowCollector
from shadowproxy.mirror import Mirror
from shadowproxy.observers import Component, Observer
from shadowproxy.proxy import Proxy
from shadowproxy.stats import ShadowStats

log = logging.getLogger("shadowproxy")


def _ssl_context(target: UpstreamURL, ca_file: str, verify: bool) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        log.warning("TLS verification is off for %s", target)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def build_components(config: Config, metrics: Metrics) -> list[Component]:
    """The optional capabilities the config turns on, each behind the observer seam."""
    components: list[Component] = []
    return components


class ShadowProxy:
    """One proxy instance: listen port (lean engine) plus admin port (aiohttp), on one loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.stats = ShadowStats()
        self.metrics.registry.register(ShadowCollector(self.stats, config.gates))
        self.draining = False
        self.listen_address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        self.production_pool: UpstreamPool | None = None
        self.candidate_pool: UpstreamPool | None = None
        self.mirror: Mirror | None = None
        # Later capabilities (audit store, drift monitor) see traffic through this list only.
        self.observers: list[Observer] = []
        self.components: list[Component] = build_components(config, self.metrics)
        self.observers.extend(self.components)
        self.proxy: Proxy | None = None
        self.server: Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._ready_cache: tuple[float, bool] = (0.0, False)

    async def start(self) -> None:
        cfg = self.config
        prod = cfg.production
        cand = cfg.candidate
        self.production_pool = UpstreamPool(
            prod.target,
            max_connections=prod.max_connections,
            idle_timeout_s=prod.pool_idle_timeout_s,
            ssl=_ssl_context(prod.target, prod.ca_file, prod.tls_verify),
            connect_timeout_s=prod.timeout_s,
        )
        self.candidate_pool = UpstreamPool(
            cand.target,
            max_connections=cand.max_in_flight,
            idle_timeout_s=prod.pool_idle_timeout_s,
            ssl=_ssl_context(cand.target, cand.ca_file, cand.tls_verify),
            connect_timeout_s=cand.timeout_s,
        )
        self.mirror = Mirror(
            pool=self.candidate_pool,
            candidate=cand,
            mirror=cfg.mirror,
            compare=cfg.compare,
            production_timeout_s=prod.timeout_s,
            metrics=self.metrics,
            stats=self.stats,
            observers=self.observers,
        )
        self.proxy = Proxy(
            pool=self.production_pool,
            timeout_s=prod.timeout_s,
            metrics=self.metrics,
            stats=self.stats,
            mirror=self.mirror,
            observers=self.observers,
            capture_limit=cfg.compare.max_response_bytes,
        )
        for component in self.components:
            await component.start()
        listen = cfg.listen
        self.server = Server(
            self.proxy.handle,
            ServerLimits(
                max_header_bytes=listen.max_header_bytes,
                max_body_bytes=listen.max_body_bytes,
                header_timeout_s=listen.header_timeout_s,
                keepalive_timeout_s=listen.keepalive_timeout_s,
            ),
            on_client_error=lambda reason: self.metrics.client_errors.labels(reason).inc(),
        )
        self.listen_address = await self.server.listen(listen.host, listen.port)
        runner = web.AppRunner(make_admin_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, cfg.admin.host, cfg.admin.port)
        await site.start()
        self._admin_runner = runner
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

    async def set_sample_rate(self, rate: float) -> None:
        if self.mirror is not None:
            self.mirror.set_sample_rate(rate)

    def stats_snapshot(self, full: bool = False) -> dict[str, Any]:
        snapshot = self.stats.snapshot(full=full)
        for component in self.components:
            snapshot.update(component.stats_blocks())
        return snapshot

    async def production_reachable(self) -> bool:
        """Readiness: can a TCP (and TLS) connection to production be opened? Cached for 1 s."""
        loop = asyncio.get_running_loop()
        checked_at, ok = self._ready_cache
        if loop.time() - checked_at < 1.0:
            return ok
        pool = self.production_pool
        assert pool is not None
        target = pool.target
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port, ssl=pool.ssl), 2.0
            )
            writer.close()
            ok = True
        except (TimeoutError, OSError, ssl.SSLError):
            ok = False
        self._ready_cache = (loop.time(), ok)
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
        assert self.server is not None and self.mirror is not None
        drained, _ = await asyncio.gather(
            self.server.drain(listen.drain_timeout_s), self.mirror.drain(listen.drain_timeout_s)
        )
        if not drained:
            log.warning("drain timeout: closed connections still in flight")
        for pool in (self.production_pool, self.candidate_pool):
            if pool is not None:
                await pool.close()
        for component in self.components:
            await component.close()  # after the drain: every answered request is recorded
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()


async def serve(config: Config) -> int:
    proxy = ShadowProxy(config)
    try:
        await proxy.start()
    except OSError as exc:
        print(f"shadowproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lh, lp = proxy.listen_address
    ah, ap = proxy.admin_address
    print(
        f"shadowproxy listening on http://{lh}:{lp} (admin http://{ah}:{ap}); "
        f"production {config.production.target}, candidate {config.candidate.target}, "
        f"sample_rate {config.mirror.sample_rate}",
        flush=True,
    )
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await proxy.shutdown()
    return 0


def run(config: Config, workers: int = 1) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
