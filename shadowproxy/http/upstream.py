"""Keep-alive connection pools to upstream HTTP/1.1 servers.

One piece of code serves production and the candidate. A pool hands out `UpstreamConnection`s
(asyncio protocols with an httptools response parser); a connection carries one exchange at a time
and reports the response to a `ResponseSink` through callbacks, so bodies stream without a task per
chunk. A connection goes back to the pool only after a clean, complete exchange.

`BufferedResponse` is what the mirror keeps of the candidate's answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl as ssl_module
import time
from dataclasses import dataclass
from typing import Final, Protocol, cast

import httptools

from shadowproxy.http.server import RequestSink, connection_tokens
from shadowproxy.http.urls import UpstreamURL
from shadowproxy.http.writes import CoalescedWrites, as_protocol

# Informational answers (RFC 9110 §15.2) are interim: the final answer follows on the same exchange.
_NO_BODY_STATUSES: Final = frozenset((204, 304))
_FRAMING: Final = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_monotonic: Final = time.monotonic  # a static read when compiled, not a module attribute lookup


class UpstreamError(Exception):
    """The exchange with an upstream failed before a complete answer arrived."""


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, unreachable, TLS handshake failed)."""


class ResponseSink(RequestSink):
    """What a connection tells about the exchange it carries.

    A native base class for the same reason as `RequestSink` (direct calls when compiled); it
    extends `RequestSink` because production's exchange is both and mypyc compiles single
    inheritance only. Subclasses implement every response-side method; the mirror's exchange
    is never a cycle's sink (it sends its copy of the body itself), so it leaves the request
    side unimplemented."""

    __slots__ = ()

    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes],
        tokens: frozenset[bytes],
        content_length: int | None,
    ) -> None:
        """`lnames`: the header names lower-cased, in order; `tokens`: fields named in Connection."""
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_complete(self) -> None:
        raise NotImplementedError

    def on_response_failed(self, exc: BaseException) -> None:
        raise NotImplementedError

    def pause_request_body(self) -> None:
        raise NotImplementedError

    def resume_request_body(self) -> None:
        raise NotImplementedError


class Acquirer(Protocol):
    """An exchange waiting for a connection (`UpstreamPool.connect_for`)."""

    done: bool  # finished meanwhile (answered, timed out, client gone): it takes no connection
    task: asyncio.Task[None] | None  # the waiting task; None once it has ended

    def attach(self, conn: UpstreamConnection) -> None: ...

    def acquire_failed(self) -> None: ...


class UpstreamConnection(CoalescedWrites):
    """One keep-alive connection to an upstream, carrying one exchange at a time."""

    __slots__ = (
        "pool", "loop", "transport", "parser", "sink", "reused", "closed", "idle_since",
        "_status", "_reason", "_headers", "_lnames", "_tokens", "_chunked", "_content_length",
        "_head_request", "_head_sent", "_close_delimited", "_keep_alive", "_complete", "_got_bytes", "_out",
        "_held",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self._out: list[bytes] = []  # writes held to the end of the loop's turn (see writes.py)
        self._held = 0  # bytes in _out
        self._reset_exchange()

    def _reset_head(self) -> None:
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []
        self._tokens: frozenset[bytes] = _NO_TOKENS
        self._content_length: int | None = None
        self._chunked = False

    def _reset_exchange(self) -> None:
        self._status = 0
        self._reset_head()
        self._head_request = False
        self._head_sent = False
        self._close_delimited = False
        self._keep_alive = True
        self._complete = False
        self._got_bytes = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        sink = self.sink
        if sink is None or self._complete:
            return
        if self._close_delimited and self._head_sent:
            # A response without Content-Length or chunked framing ends when the server closes.
            self._finish()
            return
        self.sink = None
        failure = UpstreamError(f"upstream closed the connection: {exc}" if exc else "upstream closed the connection")
        sink.on_response_failed(failure)

    def _data_received(self, data: bytes) -> None:  # under CoalescedWrites.data_received
        self._got_bytes = True
        if self.sink is None:
            # Bytes nobody asked for (an idle connection): the stream is out of step, drop it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed upstream response: {exc}"))
            return
        if self._head_request and self._head_sent and not self._complete:
            # httptools cannot be told that an answer to HEAD has no body (llhttp would wait for
            # Content-Length bytes), so the exchange ends with the head and the parser starts anew.
            self.parser = httptools.HttpResponseParser(self)
            self._finish()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_request_body()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_request_body()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        self._headers.append((name, value))
        self._lnames.append(lname)
        if lname in _FRAMING:
            if lname == b"content-length":
                try:
                    self._content_length = int(value)
                except ValueError:
                    self._content_length = None
            elif lname == b"transfer-encoding":
                self._chunked = True
            else:
                tokens = connection_tokens(value)
                if tokens:
                    self._tokens = self._tokens | tokens

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Interim answer (100 Continue, 103 Early Hints): not forwarded; the final one follows.
            self._reset_head()
            return
        self._status = status
        self._keep_alive = self.parser.should_keep_alive()
        chunked = self._chunked
        content_length = None if chunked else self._content_length
        self._content_length = content_length
        has_body = not (self._head_request or status in _NO_BODY_STATUSES)
        self._close_delimited = has_body and content_length is None and not chunked
        if self._close_delimited:
            self._keep_alive = False
        self._head_sent = True
        assert self.sink is not None
        self.sink.on_response_head(status, self._reason, self._headers, self._lnames, self._tokens, content_length)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._head_sent and not self._complete:
            self._finish()

    # -- exchange ---------------------------------------------------------------------------------
    def start(self, sink: ResponseSink, head: bytes, *, head_request: bool) -> None:
        """Send a request head (and whatever body follows through `write`) for `sink`."""
        self._reset_exchange()
        self.sink = sink
        self._head_request = head_request
        self.write(head)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _finish(self) -> None:
        self._complete = True
        sink = self.sink
        self.sink = None
        if sink is not None:
            sink.on_response_complete()

    def _fail(self, exc: BaseException) -> None:
        sink = self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.on_response_failed(exc)

    @property
    def reusable(self) -> bool:
        """True after a clean, complete exchange that both sides allow to be kept alive."""
        return self._complete and self._keep_alive and not self.closed and self.sink is None

    def detach(self) -> None:
        """Stop reporting to the current sink (its client went away); the connection is closed."""
        self.sink = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()


@dataclass(slots=True)
class PoolStats:
    opened: int = 0
    connect_failures: int = 0
    reused: int = 0


class UpstreamPool:
    """Keep-alive connections to one upstream, at most `max_connections` open at once.

    When all are busy an acquirer waits (FIFO) until one is released or closed; the caller bounds
    the wait. Idle connections are reused newest first and closed after `idle_timeout_s`.
    """

    def __init__(
        self,
        target: UpstreamURL,
        *,
        max_connections: int,
        idle_timeout_s: float,
        ssl: ssl_module.SSLContext | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.target = target
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ssl = ssl
        self.stats = PoolStats()
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._open: set[UpstreamConnection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def acquire_idle(self) -> UpstreamConnection | None:
        """An idle pooled connection, or None (never waits)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                self.stats.reused += 1
                return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        while True:
            conn = self.acquire_idle()
            if conn is not None:
                return conn
            if self._closed:
                raise ConnectFailed("pool is closed")
            if len(self._open) < self.max_connections:
                return await self._connect()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def connect_for(self, exchange: Acquirer) -> asyncio.Task[None]:
        """A task that waits for a connection (opening one when the pool allows) and attaches it to
        `exchange`, or tells it `acquire_failed` when none could be opened. An exchange that is done
        by then gets none: the connection is closed, not pooled (its state is unknown)."""
        return asyncio.get_running_loop().create_task(self._connect_for(exchange))

    async def _connect_for(self, exchange: Acquirer) -> None:
        try:
            conn = await self.acquire()
        except ConnectFailed:
            exchange.task = None
            exchange.acquire_failed()
            return
        except asyncio.CancelledError:
            return
        exchange.task = None
        if exchange.done:
            conn.close()
            return
        exchange.attach(conn)

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self)
        self._open.add(conn)
        target = self.target
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: as_protocol(conn),
                    target.host,
                    target.port,
                    ssl=self.ssl,
                    server_hostname=target.host if self.ssl is not None else None,
                ),
                self.connect_timeout_s,
            )
        except (TimeoutError, OSError, ssl_module.SSLError) as exc:
            self._open.discard(conn)
            conn.closed = True
            self.stats.connect_failures += 1
            self._wake_one()
            raise ConnectFailed(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        except BaseException:
            self._open.discard(conn)
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            self._wake_one()
            raise
        self.stats.opened += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back: pooled when its exchange was clean, closed otherwise."""
        if not conn.reusable or self._closed:
            conn.close()
            return
        conn.idle_since = _monotonic()
        self._idle.append(conn)
        self._wake_one()
        if self._sweeper is None:
            self._schedule_sweep()

    def _forget(self, conn: UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(min(1.0, self.idle_timeout_s), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.idle_timeout_s
        idle = self._idle
        # Oldest first: the deque is appended on release, so stale connections sit on the left.
        while idle and (idle[0].closed or idle[0].idle_since <= deadline):
            idle.popleft().close()
        if idle:
            self._schedule_sweep()

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()


# -- buffered exchanges (the mirror's) ----------------------------------------------------------


class BufferedResponse:
    """A plain class, not a dataclass: mypyc compiles an explicit __init__ (see ExchangeRecord)."""

    __slots__ = ("status", "headers", "body", "truncated", "latency_s")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, truncated: bool = False,
                 latency_s: float = 0.0) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.truncated = truncated  # the body passed max_body_bytes and was not kept
        self.latency_s = latency_s  # first byte sent to last byte received
