"""What the proxy does with one exchange: the hot path.

A request head arrives (`Proxy.handle`); its headers are rewritten (hop-by-hop fields dropped,
X-Forwarded-*, X-Request-ID), an `Exchange` ties the client's cycle to a pooled production
connection and streams both bodies with flow control, our own errors answer what production could
not (502, 504), and a sampled exchange is handed to the mirror through a `MirrorTicket`, which sees
finished bytes only, never transports or parsers.
"""

from __future__ import annotations

import asyncio
import binascii
import bisect
import logging
import os
import time
from typing import TYPE_CHECKING, Final

from shadowproxy.http.server import Cycle
from shadowproxy.http.upstream import ResponseSink, UpstreamConnection, UpstreamPool
from shadowproxy.judging.openai import openai_endpoint
from shadowproxy.shadow.llm import LlmMeter, LlmWatch, is_event_stream
from shadowproxy.shadow.metrics import Metrics
from shadowproxy.shadow.observers import ExchangeRecord, Observer

if TYPE_CHECKING:
    from collections.abc import Callable

    from shadowproxy.judging.stats import ShadowStats
    from shadowproxy.shadow.mirror import Mirror, MirrorGroup, MirrorTicket, TicketGroup
    from shadowproxy.shadow.slices import SliceMatcher

log = logging.getLogger("shadowproxy.shadow.proxy")

# The library functions a request calls, as `Final` names: compiled, a static read rather than a
# lookup in this module's dict on every call.
_perf_counter: Final = time.perf_counter
_wall_clock: Final = time.time
_hexlify: Final = binascii.hexlify
_bisect_left: Final = bisect.bisect_left

# RFC 9110 §7.6.1 (plus the RFC 2616 names still seen in the wild): meaningful for one connection
# only, never forwarded. Fields named in `Connection` join them per message.
HOP_BY_HOP: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
# Rewritten by us on the way up: framing is ours, Expect was answered by us, Host is the upstream's.
_REWRITTEN: Final = frozenset(
    (b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
     b"x-request-id")
)
# RFC 9110 §9.2.2: only these may be sent twice when a pooled connection turns out to be stale.
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))
# Bodies up to this size are kept until the answer starts, so a stale connection can be retried.
_RETRY_BODY_MAX: Final = 64 * 1024
_PENDING_HIGH: Final = 256 * 1024


_RANDOM_BLOCK: Final = 10 * 1024  # bytes of os.urandom at a time: 80 bits for each of 1024 ids


class _RequestIds:
    """Request ids: 32 hex digits, milliseconds since the epoch (48 bits) then 80 random bits.

    Time-ordered like UUIDv7, so the audit store's request-id index grows at its end instead of
    rewriting random pages, and ids close in time share a lookup key. The time's 12 digits are
    formatted once per millisecond, and the random digits are cut from a block of `os.urandom`
    made once per 1024 ids: no system call and no 128-bit arithmetic per request (an integer
    built, converted and hexlified for every id would cost more)."""

    __slots__ = ("ms", "prefix", "random", "offset")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the time and the random block (a forked child must not reuse its parent's)."""
        self.ms = -1
        self.prefix = b""
        self.random = b""
        self.offset = 0

    def next(self) -> bytes:
        ms = int(_wall_clock() * 1000)
        if ms != self.ms:
            self.ms = ms
            self.prefix = b"%012x" % (ms & 0xFFFFFFFFFFFF)
        offset = self.offset
        if offset >= len(self.random):
            self.random = _hexlify(os.urandom(_RANDOM_BLOCK))
            offset = 0
        self.offset = offset + 20
        return self.prefix + self.random[offset : offset + 20]


_request_ids: Final = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reset)


def new_request_id() -> bytes:
    """A new request id (see `_RequestIds`)."""
    return _request_ids.next()


class Proxy:
    """The handler the client-facing server calls for every request head."""

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        timeout_s: float,
        metrics: Metrics,
        stats: ShadowStats,
        mirror: Mirror | MirrorGroup | None = None,
        observers: list[Observer] | None = None,
        capture_limit: int = 1 << 20,
        llm: LlmMeter | None = None,
        slices: SliceMatcher | None = None,
    ) -> None:
        self.pool = pool
        self.slices = slices  # [[slices]]: which slice each request is in, else None
        self.llm = llm  # compare.preset "openai": production's LLM figures, else None
        self.observers = observers if observers is not None else []  # shared: added to at run time
        self.capture_limit = capture_limit
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.stats = stats
        self.mirror = mirror
        self.loop = asyncio.get_running_loop()
        target = pool.target
        self.prefix = target.path_prefix.encode()
        self.host_header = target.host_header.encode()
        self.in_flight = 0
        # Exchanges waiting for production's answer; a sweep checks their deadlines, so no loop
        # timer is created and cancelled per request.
        self.waiting: set[Exchange] = set()
        self._every: tuple[bool, ...] = ()
        self._observe_every = False
        self._chunk_mask = 0  # bit i: observer i keeps chunk times (see every_exchange)
        self._wants: tuple[Callable[[], bool], ...] = ()
        self._tell: tuple[tuple[Observer, Callable[[ExchangeRecord, bool], None], bool], ...] = ()
        self.sweep_interval = min(0.5, max(0.01, timeout_s / 20))
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        self._by_hundred = [metrics.requests_by_class[Metrics.status_class(h * 100)] for h in range(6)]
        self._duration = metrics.duration_by_target["production"]

    def handle(self, cycle: Cycle) -> None:
        headers = cycle.headers
        drop = HOP_BY_HOP | cycle.connection_tokens if cycle.connection_tokens else HOP_BY_HOP
        # The head as pieces for one join: slot 0 takes the request line, then `name: value\r\n`
        # for each field kept, then the framing. No list of kept fields, no tuple per added one.
        parts: list[bytes] = [b""]
        request_id = b""
        forwarded_for = b""
        client_host = b""
        for (name, value), lname in zip(headers, cycle.lnames):  # noqa: B905  plain zip compiles to a loop; equal lengths, built together
            if lname in drop:
                continue
            if lname in _REWRITTEN:
                if lname == b"x-request-id":
                    request_id = value
                elif lname == b"x-forwarded-for":
                    forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
                elif lname == b"host":
                    client_host = value
                continue
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if not request_id:
            request_id = new_request_id()
        # Pieces rather than `%` formats: a list append is a C primitive, a bytes format parses
        # its template on every call.
        parts.append(b"X-Forwarded-For: ")
        if forwarded_for:
            parts.append(forwarded_for)
            parts.append(b", ")
        parts.append(cycle.client_ip)
        parts.append(b"\r\nX-Forwarded-Proto: http\r\n")
        if client_host:
            parts.append(b"X-Forwarded-Host: ")
            parts.append(client_host)
            parts.append(b"\r\n")
        parts.append(b"X-Request-ID: ")
        parts.append(request_id)
        parts.append(b"\r\n")
        fields_end = len(parts)

        path = cycle.target
        if not path.startswith(b"/") and b"://" in path:
            # absolute-form (RFC 9112 §3.2.2): the origin form is what the model server expects.
            rest = path.split(b"://", 1)[1]
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b"/"
        parts[0] = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n" % (cycle.method, self.prefix, path, self.host_header)
        if cycle.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif cycle.content_length is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % cycle.content_length)
        else:
            parts.append(b"\r\n")
        ticket = self.mirror.begin(cycle, path, request_id) if self.mirror is not None else None
        slices = self.slices
        slice_index = slices.match(path, headers, cycle.lnames) if slices is not None else -1
        if ticket is not None:
            ticket.fields = b"".join(parts[1:fields_end])  # the same fields go to the candidate
            ticket.slice = slice_index
        exchange = Exchange(self, cycle, b"".join(parts), request_id, ticket)
        exchange.slice = slice_index
        if self.observers:
            exchange.observe(path)
        cycle.attach(exchange)
        exchange.start()

    def every_exchange(self) -> tuple[bool, ...]:
        """Per observer: does it want a record of every exchange, sampled or not? Cached, and
        recomputed when an observer is added (the list is shared and may grow at run time)."""
        observers = self.observers
        if len(observers) != len(self._every):
            self._every = tuple(getattr(o, "every_exchange", True) for o in observers)
            self._observe_every = any(self._every)
            self._wants = tuple(o.wants_bodies for o in observers)
            self._tell = tuple(zip(observers, [o.on_exchange for o in observers], self._every, strict=True))
            self._chunk_mask = sum(1 << i for i, o in enumerate(observers) if getattr(o, "keeps_chunk_times", False))
        return self._every

    def _sweep(self) -> None:
        if self.waiting:
            now = self.loop.time()
            for exchange in list(self.waiting):
                exchange.check_deadline(now)
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def close(self) -> None:
        self._sweeper.cancel()

    def record(self, status: int, latency_s: float | None, slice_index: int = -1) -> None:
        # Inlined metric updates: this runs once per request (see hotmetrics.py).
        self._by_hundred[status // 100 if 100 <= status < 600 else 5].value += 1
        if latency_s is not None:
            duration = self._duration
            duration.counts[_bisect_left(duration.bounds, latency_s)] += 1
            duration.sum += latency_s
        if slice_index >= 0:
            self.stats.record_slice_production(slice_index, latency_s, status)  # the total adds slices up
        else:
            self.stats.record_production(latency_s, status)


class Exchange(ResponseSink):
    """One client request forwarded to production, its answer streamed back."""

    __slots__ = (
        "proxy", "cycle", "head", "request_id", "ticket", "conn", "task", "deadline", "pending",
        "pending_size", "retry_body", "retried", "t_sent", "status", "done", "request_sent",
        "capture", "capture_size", "t_body_done", "body_seen", "wants", "request_capture",
        "request_capture_size", "started_at", "path", "response_headers", "mirrored", "llm", "slice",
        "chunk_times",
    )

    def __init__(
        self, proxy: Proxy, cycle: Cycle, head: bytes, request_id: bytes, ticket: MirrorTicket | TicketGroup | None
    ) -> None:
        self.proxy = proxy
        self.cycle = cycle
        self.head = head
        self.request_id = request_id
        self.ticket = ticket
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # production must answer (headers) by then; 0 once it has
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.retry_body: list[bytes] | None = [] if cycle.method in IDEMPOTENT else None
        self.retried = False
        self.t_sent = 0.0
        self.status = 0
        self.done = False
        self.request_sent = False
        self.capture: list[bytes] | None = None
        self.capture_size = 0
        self.t_body_done = 0.0
        self.body_seen = 0
        # Observers (audit store, drift): -1 unless observers are configured, else a bit mask of
        # the observers that want this request's bodies (bit i = observer i); an int, not a list,
        # so asking costs no allocation.
        self.wants = -1
        self.request_capture: list[bytes] | None = None
        self.request_capture_size = 0
        self.started_at = 0.0
        self.path = b""
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.mirrored = False
        self.llm: LlmWatch | None = None  # an answer to an OpenAI-compatible request (preset openai)
        self.slice = -1  # [[slices]]: the request's slice, else -1
        # [record]: when each captured piece of the answer arrived and where it ended, flat
        # ([time, end offset, ...]); None unless an observer that keeps chunk times wants this request.
        self.chunk_times: list[float] | None = None

    def observe(self, path: bytes) -> None:
        """Ask each observer once whether it wants this request's bodies."""
        proxy = self.proxy
        if len(proxy.observers) != len(proxy._every):
            proxy.every_exchange()
        asks = proxy._wants
        if len(asks) == 1:  # the usual case
            wants = 1 if asks[0]() else 0
        else:
            wants = 0
            for i, wants_bodies in enumerate(asks):
                if wants_bodies():
                    wants |= 1 << i
        self.wants = wants
        if wants & proxy._chunk_mask:
            self.chunk_times = []
        self.started_at = _wall_clock()
        self.path = path
        if self.ticket is not None or wants:
            self.request_capture = []

    def start(self) -> None:
        proxy = self.proxy
        proxy.in_flight += 1
        self.deadline = proxy.loop.time() + proxy.timeout_s
        proxy.waiting.add(self)
        conn = proxy.pool.acquire_idle()
        if conn is not None:
            self.attach(conn)
        else:
            self.task = proxy.pool.connect_for(self)

    def acquire_failed(self) -> None:
        self.proxy.metrics.upstream_failures.labels("production", "connect").inc()
        self._fail(502, "production unreachable")

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.t_sent = _perf_counter()  # not loop.time(): uvloop's has millisecond resolution
        conn.start(self, self.head, head_request=self.cycle.method == b"HEAD")
        pending = self.pending
        if pending:
            self.pending = []
            self.pending_size = 0
            for chunk in pending:
                self._send_body(chunk)
            self.cycle.conn.resume_reading("upstream")
        if self.cycle.request_complete:
            self._end_body()

    def _send_body(self, data: bytes) -> None:
        assert self.conn is not None
        if self.cycle.chunked:
            self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.conn.write(data)

    def _end_body(self) -> None:
        if self.cycle.chunked and self.conn is not None:
            self.conn.write(b"0\r\n\r\n")
        self.request_sent = True

    # -- RequestSink (the client's side) ----------------------------------------------------------
    def on_request_body(self, data: bytes) -> None:
        if self.done:
            return  # answered (or failed) already: the rest of the body is not kept
        if self.ticket is not None:
            self.ticket.add_body(data)
        if self.request_capture is not None:
            self.request_capture.append(data)
            self.request_capture_size += len(data)
            if self.request_capture_size > self.proxy.capture_limit:
                self.request_capture = None
        retry = self.retry_body
        if retry is not None:
            if self.cycle.body_size > _RETRY_BODY_MAX:  # the cycle counts the body received so far
                self.retry_body = None
            else:
                retry.append(data)
        if self.conn is not None:
            self._send_body(data)
        else:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > _PENDING_HIGH:
                self.cycle.conn.pause_reading("upstream")

    def on_request_complete(self) -> None:
        self.t_body_done = self.proxy.loop.time()
        ticket = self.ticket
        if ticket is not None:
            ticket.request_complete()
            self.mirrored = ticket.dispatched and not ticket.cancelled
        if self.conn is not None:
            self._end_body()

    def on_client_lost(self) -> None:
        """The client went away: the upstream exchange is cancelled and its connection closed."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.detach()
        # 499 as nginx logs it: the client closed the connection before the answer was complete.
        self._finish(499, None)

    def on_rejected(self, status: int) -> None:
        """The engine answered the client itself (a body past `listen.max_body_bytes`): the
        upstream exchange is cancelled, and the status recorded is the one the client got."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.detach()
        self._finish(status, None)

    def pause_response(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_response(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- ResponseSink (production's side) ---------------------------------------------------------
    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes],
        tokens: frozenset[bytes],
        content_length: int | None,
    ) -> None:
        if self.done:
            return
        self.status = status
        if self.deadline:
            self.deadline = 0.0
            self.proxy.waiting.discard(self)
        self.retry_body = None
        drop = HOP_BY_HOP | tokens if tokens else HOP_BY_HOP
        # The answer's head as pieces for one join (slot 0: the status line, see start_response).
        parts: list[bytes] = [b""]
        has_request_id = False
        for (name, value), lname in zip(headers, lnames):  # noqa: B905  plain zip compiles to a loop; equal lengths, built together
            if lname in drop:
                continue
            if lname == b"x-request-id":
                has_request_id = True
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if not has_request_id:
            parts.append(b"X-Request-ID: ")
            parts.append(self.request_id)
            parts.append(b"\r\n")
        has_body = status not in (204, 304) and not (100 <= status < 200)
        if (
            (self.ticket is not None or self.request_capture is not None)
            and 200 <= status < 300
            and (content_length is None or content_length <= self.proxy.capture_limit)
        ):
            self.capture = []
        if self.wants >= 0:
            self.response_headers = headers
        llm = self.proxy.llm
        if llm is not None and 200 <= status < 300:
            self._watch_llm(llm, headers, lnames, content_length)
        self.cycle.start_response(status, reason, parts, content_length, has_body)

    def _watch_llm(
        self, llm: LlmMeter, headers: list[tuple[bytes, bytes]], lnames: list[bytes], content_length: int | None
    ) -> None:
        endpoint = openai_endpoint(self.cycle.target)
        if endpoint is None:
            return
        stream = is_event_stream(headers, lnames)
        if not stream and self.capture is None and (
            content_length is None or content_length <= self.proxy.capture_limit
        ):
            self.capture = []  # a whole answer is read for its usage once complete
        self.llm = llm.watch(endpoint, self.t_sent, stream)

    def on_response_body(self, data: bytes) -> None:
        if self.done:
            return
        self.cycle.write(data)
        capture = self.capture
        if capture is not None:
            capture.append(data)
            self.capture_size += len(data)
            times = self.chunk_times
            if times is not None:
                times.append(_perf_counter() - self.t_sent)
                times.append(self.capture_size)
            if self.capture_size > self.proxy.capture_limit:
                self.capture = None
        llm = self.llm
        if llm is not None:
            llm.feed(data)  # after the piece was handed on: it is never held for this

    def on_response_complete(self) -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        latency = _perf_counter() - self.t_sent
        if conn is not None:
            if self.request_sent:
                self.proxy.pool.release(conn)
            else:
                # Production answered before reading the whole body: that stream is out of step.
                conn.close()
        self.cycle.conn.resume_reading("upstream")
        self.cycle.end()
        body = b"".join(self.capture) if self.capture is not None else None
        llm = self.llm
        if llm is not None:
            llm.finish()
            self.proxy.loop.call_soon(llm.record, body)  # reading usage is no work for the hot path
        if self.ticket is not None:
            self.ticket.production_llm = llm
            self.ticket.production_done(self.status, body, latency)
            self.ticket = None
        self._finish(self.status, latency, body)

    def on_response_failed(self, exc: BaseException) -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        if self.cycle.response_started:
            if self.llm is not None:
                self.llm.fail("production broke off the answer")
            self.proxy.metrics.upstream_failures.labels("production", "reset").inc()
            self.cycle.abort()
            self._finish(502, None)
            return
        if (
            conn is not None
            and conn.reused
            and not self.retried
            and self.retry_body is not None
            and (self.cycle.request_complete or not self.cycle.has_body)
        ):
            # A pooled connection the server had closed while idle: send once more on a new one.
            self.retried = True
            self.pending = list(self.retry_body)
            self.request_sent = False
            self.task = self.proxy.pool.connect_for(self)
            return
        kind = "malformed" if "malformed" in str(exc) else "reset"
        self.proxy.metrics.upstream_failures.labels("production", kind).inc()
        self._fail(502, "production failed to answer")

    def pause_request_body(self) -> None:
        self.cycle.conn.pause_reading("upstream")

    def resume_request_body(self) -> None:
        self.cycle.conn.resume_reading("upstream")

    # -- endings ----------------------------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        """Called by the proxy's sweep while production has not answered."""
        if now < self.deadline or self.done or self.cycle.response_started:
            return
        proxy = self.proxy
        cycle = self.cycle
        if not cycle.request_complete and cycle.body_size > self.body_seen:
            # Still uploading, and progressing: a slow client is not production's delay.
            self.body_seen = cycle.body_size
            self.deadline = now + proxy.timeout_s
            return
        if self.t_body_done and self.t_body_done + proxy.timeout_s > self.deadline:
            # The wait for production's answer counts from the end of the upload.
            self.deadline = self.t_body_done + proxy.timeout_s
            return
        self.proxy.metrics.upstream_failures.labels("production", "timeout").inc()
        self._fail(504, "production timed out")

    def _fail(self, status: int, message: str) -> None:
        if self.done:
            return
        if self.conn is not None:
            self.conn.detach()
            self.conn = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.cycle.conn.resume_reading("upstream")
        self.cycle.respond(status, message)
        self._finish(status, None)

    def _finish(self, status: int, latency: float | None, response_body: bytes | None = None) -> None:
        self.done = True
        if self.deadline:
            self.deadline = 0.0
            self.proxy.waiting.discard(self)
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.ticket is not None:
            self.ticket.production_done(status, None, None)
            self.ticket = None
        self.proxy.in_flight -= 1
        self.proxy.record(status, latency, self.slice)
        wants = self.wants
        if wants >= 0 and (self.proxy._observe_every or self.mirrored or wants):
            self._tell_observers(wants, status, latency, response_body)

    def _tell_observers(
        self, wants: int, status: int, latency: float | None, response_body: bytes | None
    ) -> None:
        request_capture = self.request_capture
        mirrored = self.mirrored
        record = ExchangeRecord(  # positional: cheaper than keywords, once per request
            self.request_id.decode("latin-1"),
            self.started_at,
            self.cycle.method.decode("latin-1"),
            self.path.decode("latin-1"),
            status,
            self.response_headers,
            latency,
            mirrored,
            b"".join(request_capture) if request_capture is not None else None,
            response_body,
            self.cycle.headers,
            self.chunk_times,
        )
        for observer, on_exchange, every in self.proxy._tell:
            wanted = bool(wants & 1)
            wants >>= 1
            if not (wanted or every or mirrored):
                continue
            try:
                on_exchange(record, wanted)
            except Exception:  # an observer's bug must never break the proxy
                log.exception("observer %r failed", observer)
