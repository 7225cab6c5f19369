"""The gRPC listener: every call forwarded to production on one pooled HTTP/2 channel.

Built on grpcio's asyncio API with one generic handler: no method is known in advance and no
message is decoded, requests and answers cross as the bytes they arrived as. ModelInfer is
handled as a unary call (so that it can be mirrored, grpcproxy/mirror.py); every other method as
a bidirectional stream, which carries unary and streaming calls alike, since gRPC frames them
the same way on the wire. Metadata goes through both ways (but `user-agent`, which grpcio sets
for its own side of each hop), and so do the client's deadline, production's status code,
details and trailing metadata.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import grpc
from prometheus_client import Counter

from shadowproxy.config import Config
from shadowproxy.grpcproxy.mirror import MODEL_INFER, GrpcMirror, Metadata, is_server_error
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.metrics import Metrics
from shadowproxy.shadow.sampling import Sampler

_perf_counter: Final = time.perf_counter
# Set by grpcio on each hop itself; forwarding the client's would only be appended to ours.
_NOT_FORWARDED: Final = frozenset(("user-agent",))
_UNLIMITED: Final = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
CODES: Final = tuple(code.name for code in grpc.StatusCode)


def open_channel(url: str, ca_file: str = "") -> Any:
    """A channel to `grpc://host:port` (cleartext HTTP/2) or `grpcs://host:port` (TLS, trusting
    `ca_file` or the system's roots); it keeps its connections open and reconnects by itself."""
    scheme, _, address = url.partition("://")
    if scheme == "grpcs":
        roots = Path(ca_file).read_bytes() if ca_file else None
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots), options=_UNLIMITED)
    return grpc.aio.insecure_channel(address, options=_UNLIMITED)


def _metadata(received: Any) -> Metadata:
    if not received:
        return ()
    return tuple((m.key, m.value) for m in received if m.key not in _NOT_FORWARDED)


def _status(code: grpc.StatusCode) -> int:
    """The HTTP status class production's figures count a call under: OK as 200, the server's
    failures (is_server_error) as 502, the request's own errors as 400."""
    if code == grpc.StatusCode.OK:
        return 200
    return 502 if is_server_error(code) else 400


class GrpcProxy:
    """The listener, production's channel, and a `GrpcMirror` per candidate with a `grpc_url`."""

    def __init__(self, config: Config, metrics: Metrics, stats: ShadowStats, samplers: dict[str, Sampler]) -> None:
        self.config = config
        self.stats = stats
        self.metrics = metrics
        prod = config.production
        assert prod.grpc_url is not None  # config: required with listen.grpc_port
        self.channel = open_channel(prod.grpc_url, prod.ca_file)
        self._infer = self.channel.unary_unary(MODEL_INFER)
        self._streams: dict[str, Any] = {}
        self.mirrors: list[GrpcMirror] = []
        for cand in config.candidates:
            if cand.grpc_url and cand.name in samplers:
                self.mirrors.append(GrpcMirror(
                    channel=open_channel(cand.grpc_url, cand.ca_file), candidate=cand, compare=config.compare,
                    sampler=samplers[cand.name], metrics=metrics, stats=stats.for_candidate(cand.name),
                    name=cand.name,
                ))
        self.calls = Counter(
            "shadowproxy_grpc_calls_total",
            "gRPC calls through the listener by kind (model_infer: compared when mirrored; other: passed "
            "through, never mirrored) and production's status code.",
            ("method", "code"), registry=metrics.registry,
        )
        for kind in ("model_infer", "other"):
            for name in CODES:
                self.calls.labels(kind, name)
        self._unary_handler = grpc.unary_unary_rpc_method_handler(self._unary)
        self.server: Any = None
        self.port = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; the port bound (for port 0, the one the system chose). `reuse_port`: several
        processes share the port (serve --workers); otherwise a port in use is an error."""
        listen = self.config.listen
        proxy = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: Any) -> Any:
                return proxy._handler(details.method)

        self.server = grpc.aio.server(options=[*_UNLIMITED, ("grpc.so_reuseport", int(reuse_port))])
        self.server.add_generic_rpc_handlers((Handler(),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if listen.grpc_cert_file:
                credentials = grpc.ssl_server_credentials(
                    [(Path(listen.grpc_key_file).read_bytes(), Path(listen.grpc_cert_file).read_bytes())]
                )
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio's "Failed to bind"
            raise OSError(f"gRPC listener on {address}: {exc}") from None
        if not self.port:
            raise OSError(f"gRPC listener: cannot bind {address}")
        await self.server.start()
        return self.port

    def _handler(self, method: str) -> Any:
        if method == MODEL_INFER:
            return self._unary_handler
        handler = self._streams.get(method)
        if handler is None:
            call = self.channel.stream_stream(method)

            async def forward(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
                async for message in self._stream(call, requests, context):
                    yield message

            handler = grpc.stream_stream_rpc_method_handler(forward)
            if len(self._streams) < 1024:  # method names come from clients: bound the cache
                self._streams[method] = handler
        return handler

    def _finished(self, kind: str, code: grpc.StatusCode, latency_s: float) -> None:
        self.stats.record_production(latency_s, _status(code))
        self.calls.labels(kind, code.name).inc()

    async def _unary(self, request: bytes, context: Any) -> bytes:
        start = _perf_counter()
        metadata = _metadata(context.invocation_metadata())
        call = self._infer(request, metadata=metadata, timeout=context.time_remaining())
        mirrored = [m.begin(request, metadata) for m in self.mirrors] if self.mirrors else []
        code = grpc.StatusCode.UNKNOWN
        answer: bytes | None = None
        try:
            try:
                answer = await call
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                initial = exc.initial_metadata()
                if initial:
                    await context.send_initial_metadata(tuple(initial))
                await context.abort(code, exc.details() or "", tuple(exc.trailing_metadata() or ()))
            code = grpc.StatusCode.OK
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(tuple(initial))
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
            assert answer is not None
            return answer
        except asyncio.CancelledError:
            call.cancel()
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            latency = _perf_counter() - start
            self._finished("model_infer", code, latency)
            for future in mirrored:
                if future is not None and not future.done():
                    future.set_result((code, latency, answer))

    async def _stream(self, multicallable: Any, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        start = _perf_counter()
        call = multicallable(requests, metadata=_metadata(context.invocation_metadata()),
                             timeout=context.time_remaining())
        code = grpc.StatusCode.UNKNOWN
        try:
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(tuple(initial))
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await context.abort(code, exc.details() or "", tuple(exc.trailing_metadata() or ()))
            code = await call.code()
            trailing = tuple(await call.trailing_metadata() or ())
            if code != grpc.StatusCode.OK:
                await context.abort(code, await call.details() or "", trailing)
            context.set_trailing_metadata(trailing)
        except asyncio.CancelledError:
            call.cancel()
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._finished("other", code, _perf_counter() - start)

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting, give calls in flight and mirrored copies `drain_timeout_s`, close."""
        if self.server is not None:
            await asyncio.gather(
                self.server.stop(drain_timeout_s), *(m.drain(drain_timeout_s) for m in self.mirrors)
            )
        await self.channel.close()
        for mirror in self.mirrors:
            await mirror.channel.close()

