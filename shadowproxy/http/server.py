"""The client-facing HTTP/1.1 engine: an asyncio protocol over httptools (llhttp).

It owns framing, keep-alive, pipelining (answers in request order), flow control, limits and
timeouts. What to do with a request is not its business: for every request head it creates a
`Cycle` and calls the handler, which attaches a `RequestSink` for the body and answers through the
cycle's `start_response` / `write` / `end`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import httptools
import orjson

from shadowproxy.http.writes import CoalescedWrites, as_protocol, batch

log = logging.getLogger("shadowproxy.http")

_STATUS_LINES: dict[int, bytes] = {}
_REASONS = {
    100: b"Continue", 400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large",
    431: b"Request Header Fields Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_FRAMING: Final = frozenset((b"content-length", b"transfer-encoding", b"expect", b"connection"))
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# Connection values that name no other field (by far the most common ones).
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Field names a Connection header lists besides keep-alive/close (RFC 9110 §7.6.1)."""
    lowered = value.lower()
    if lowered in _PLAIN_CONNECTION:
        return _NO_TOKENS
    return frozenset(t for t in (part.strip() for part in lowered.split(b",")) if t and t not in _PLAIN_CONNECTION)


_OK_LINE: Final = b"HTTP/1.1 200 OK\r\n"  # most answers' status line, not formatted per request

# Above this much request body held for a handler that is not yet connected, stop reading.
_BODY_BUFFER_HIGH: Final = 256 * 1024


class RequestSink:
    """Where a cycle's request body goes, and who hears about the client side.

    A base class, not a `typing.Protocol`: compiled, a call through a native base class is a C
    call through its vtable, while a call through a Protocol looks the method up by name and
    boxes its arguments. Subclasses implement every method."""

    __slots__ = ()

    def on_request_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_request_complete(self) -> None:
        raise NotImplementedError

    def on_client_lost(self) -> None:
        raise NotImplementedError

    def on_rejected(self, status: int) -> None:
        """The engine answered the request itself with `status` (413 for a chunked body that grew
        past `max_body_bytes`) and closes the connection: the exchange ends with that status."""
        raise NotImplementedError

    def pause_response(self) -> None:
        raise NotImplementedError

    def resume_response(self) -> None:
        raise NotImplementedError


Handler = Callable[["Cycle"], None]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 65536
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    # After an answer sent before the request was read to its end: how long to keep reading and
    # dropping what the client still sends, in all and since its last bytes (see close_lingering).
    # 0 for lingering_time_s: close at once.
    lingering_time_s: float = 30.0
    lingering_timeout_s: float = 5.0
    max_connections: int | None = None  # client connections open at once; None: no cap


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def simple_response(
    status: int, message: str, *, close: bool, extra: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete small JSON answer `{"error": message}` (our own, never production's)."""
    body = orjson.dumps({"error": message})
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    lines.extend(b"%s: %s\r\n" % (name, value) for name, value in extra)
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


class _Discard(RequestSink):
    """The sink of a request body nobody needs any more (its answer has already been sent)."""

    def on_request_body(self, data: bytes) -> None:
        pass

    def on_request_complete(self) -> None:
        pass

    def on_client_lost(self) -> None:
        pass

    def on_rejected(self, status: int) -> None:
        pass

    def pause_response(self) -> None:
        pass

    def resume_response(self) -> None:
        pass


_DISCARD: Final = _Discard()


class Cycle:
    """One request and its answer on a client connection."""

    __slots__ = (
        "conn", "method", "target", "http_version", "headers", "lnames", "connection_tokens", "keep_alive",
        "content_length",
        "chunked", "expect_continue", "client_ip", "sink", "request_complete", "response_started",
        "response_complete", "body_size", "_buffer", "_buffered", "_chunked_response", "_no_body",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        target: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes],
        connection_tokens: frozenset[bytes],
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.lnames = lnames  # the header names lower-cased once, in the same order
        self.connection_tokens = connection_tokens  # field names listed in Connection (RFC 9110 §7.6.1)
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.client_ip = conn.client_ip
        self.sink: RequestSink | None = None
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.body_size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._chunked_response = False
        self._no_body = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    # -- request side (called by the connection) --------------------------------------------------
    def attach(self, sink: RequestSink) -> None:
        """Route the request body to `sink`, starting with whatever arrived before."""
        self.sink = sink
        buffered = self._buffer
        if buffered:
            self._buffer = []
            self._buffered = 0
            for chunk in buffered:
                sink.on_request_body(chunk)
            self.conn.resume_reading("buffer")
        if self.request_complete:
            sink.on_request_complete()

    def _receive_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.conn.limits.max_body_bytes:
            raise _Reject(413, "request body too large")
        sink = self.sink
        if sink is not None:
            sink.on_request_body(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > _BODY_BUFFER_HIGH:
                self.conn.pause_reading("buffer")

    def _receive_complete(self) -> None:
        self.request_complete = True
        if self.sink is not None:
            self.sink.on_request_complete()

    # -- response side (called by the handler) ----------------------------------------------------
    def start_response(
        self,
        status: int,
        reason: bytes,
        parts: list[bytes],
        content_length: int | None,
        has_body: bool,
    ) -> None:
        """Send the status line and the header fields (already free of hop-by-hop ones).

        `parts` holds the fields as pieces of `name: value\r\n` after a first slot that this
        fills with the status line; the framing lines are appended and the head is sent as one
        join. Framing: with `content_length` the body passes as is; otherwise it is chunked for an
        HTTP/1.1 client, or delimited by closing the connection for an HTTP/1.0 one.
        """
        conn = self.conn
        if (conn.closing and not conn.pending_rejection) or conn.server.draining:
            self.keep_alive = False
        self.response_started = True
        self._no_body = not has_body or self.method == b"HEAD"
        parts[0] = _OK_LINE if status == 200 and reason == b"OK" else b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if has_body and content_length is None:
            if self.http_version == "1.1":
                self._chunked_response = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        conn.write(b"".join(parts))

    def write(self, data: bytes) -> None:
        if self._no_body or not data:
            return
        if self._chunked_response:
            self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.conn.write(data)

    def end(self) -> None:
        if self.response_complete:
            return
        self.response_complete = True
        if self._chunked_response and not self._no_body:
            self.conn.write(b"0\r\n\r\n")
        self.conn.cycle_done(self)

    def respond(self, status: int, message: str, *, close: bool = False) -> None:
        """Answer with our own small JSON error (502, 504, ...) when nothing was sent yet."""
        if self.response_started:
            self.abort()
            return
        self.response_started = True
        self.response_complete = True
        conn = self.conn
        if close or (conn.closing and not conn.pending_rejection) or not self.request_complete:
            self.keep_alive = False
        conn.write(simple_response(status, message, close=not self.keep_alive))
        conn.cycle_done(self)

    def abort(self) -> None:
        """Give up mid-answer: the only honest signal left is closing the connection."""
        self.response_complete = True
        self.keep_alive = False
        self.conn.abort()


class ClientConnection(CoalescedWrites):
    """One client connection: parses requests, answers them in order."""

    # Slots, as UpstreamConnection has: run as Python, CPython stops sharing an instance dict's
    # keys with the class's other instances at about 30 attributes, and every attribute access
    # on the request path then gets slower.
    __slots__ = (
        "server", "limits", "loop", "transport", "parser", "client_ip", "closing", "closed", "active",
        "parsing", "queue", "_read_pauses", "_out", "_held", "_deadline", "_on_deadline", "_url", "_headers",
        "_lnames", "_head_size", "_content_length", "_chunked", "_expect_continue", "_connection_tokens",
        "_saw_connection", "_last_closes", "_head_bytes", "_in_head", "pending_rejection", "_linger_until",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.closing = False
        self.closed = False
        self.active: Cycle | None = None  # the cycle whose answer is being written
        self.parsing: Cycle | None = None  # the cycle whose request is being read
        self.queue: collections.deque[Cycle] = collections.deque()
        self._read_pauses: set[str] = set()
        self._out: list[bytes] = []  # writes held to the end of the loop's turn (see writes.py)
        self._held = 0  # bytes in _out
        # One deadline at a time (head, or idle keep-alive), checked by the server's sweep: a
        # float per request instead of a loop timer created and cancelled per request.
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] = self.close
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._lnames: list[bytes] = []
        self._head_size = 0
        self._content_length: int | None = None
        self._chunked = False
        self._expect_continue = False
        self._connection_tokens: frozenset[bytes] = _NO_TOKENS
        self._saw_connection = False  # the request has a Connection field
        self._last_closes = False  # the last request read asked to close the connection
        self._head_bytes = 0
        self._in_head = False
        self.pending_rejection = b""  # the error answer of a bad pipelined request, sent after the answers before it
        self._linger_until = 0.0  # while lingering (see close_lingering): when it ends, whatever the client does

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()
        self.server.connections.add(self)
        self._set_timer(self.limits.header_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        cycles = [self.active, *self.queue]
        if self.parsing is not None and self.parsing not in cycles:
            cycles.append(self.parsing)
        self.active = None
        self.queue.clear()
        for cycle in cycles:
            if cycle is not None and not cycle.response_complete and cycle.sink is not None:
                cycle.sink.on_client_lost()
        self.server.connection_closed()

    def _data_received(self, data: bytes) -> None:  # under CoalescedWrites.data_received
        if self.closing:
            if self._linger_until:  # dropped, never parsed: none of it reaches a handler
                self._deadline = min(self.loop.time() + self.limits.lingering_timeout_s, self._linger_until)
            return
        if self._in_head or self.parsing is None:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An upgrade (h2c, websocket) we do not offer: answer it as plain HTTP/1.1; the Upgrade
            # and Connection fields are hop-by-hop and never reach production.
            offset = int(exc.args[0]) if exc.args else len(data)
            if offset < len(data):
                self._data_received(data[offset:])
            return
        except httptools.HttpParserError as exc:
            reject = exc.__context__ if isinstance(exc.__context__, _Reject) else None
            if reject is None and self._last_closes and self.parsing is None:
                # Bytes after a request that asked to close (llhttp refuses them): ignored, as
                # nginx does; that request is still answered, then the connection closes, by
                # lingering (the client is still sending).
                self.closing = True
                return
            if reject is None:
                self.server.count_client_error("bad_request")
                self._reject(400, "malformed request")
            else:
                self.server.count_client_error(
                    {413: "body_too_large", 431: "header_too_large"}.get(reject.status, "bad_request")
                )
                self._reject(reject.status, reject.message)
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self.server.count_client_error("header_too_large")
            self._reject(431, "request header fields too large")

    def pause_writing(self) -> None:
        cycle = self.active
        if cycle is not None and cycle.sink is not None:
            cycle.sink.pause_response()

    def resume_writing(self) -> None:
        cycle = self.active
        if cycle is not None and cycle.sink is not None:
            cycle.sink.resume_response()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._lnames = []
        self._head_size = 16
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._connection_tokens = _NO_TOKENS
        self._saw_connection = False
        if self.active is None:
            self._set_timer(self.limits.header_timeout_s, self._on_header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Each name is lower-cased once, here; framing fields are judged as they arrive.
        lname = name.lower()
        self._headers.append((name, value))
        self._lnames.append(lname)
        self._head_size += len(name) + len(value) + 4
        if lname in _FRAMING:
            if lname == b"content-length":
                # RFC 9112 §6.3: differing Content-Length values are unrecoverable framing errors.
                if self._content_length is not None or not value.strip().isdigit():
                    raise _Reject(400, "invalid or repeated content-length")
                self._content_length = int(value)
            elif lname == b"transfer-encoding":
                self._chunked = True
            elif lname == b"expect":
                self._expect_continue = value.lower() == b"100-continue"
            else:  # connection
                self._saw_connection = True
                tokens = connection_tokens(value)
                if tokens:
                    self._connection_tokens = self._connection_tokens | tokens

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        parser = self.parser
        if self._head_size > self.limits.max_header_bytes:
            raise _Reject(431, "request header fields too large")
        content_length = self._content_length
        chunked = self._chunked
        if chunked and content_length is not None:
            # RFC 9112 §6.1: both framings at once is how requests are smuggled.
            raise _Reject(400, "both content-length and transfer-encoding")
        if content_length is not None and content_length > self.limits.max_body_bytes:
            raise _Reject(413, "request body too large")
        keep_alive = parser.should_keep_alive()
        self._last_closes = not keep_alive
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0 only, and keeps a connection alive without a
        # Connection field for 1.1 alone: such a request is HTTP/1.1, and its version need not be
        # asked for (httptools formats a new str on every get_http_version).
        version = "1.1" if keep_alive and not self._saw_connection else parser.get_http_version()
        cycle = Cycle(
            self,
            parser.get_method(),
            self._url,
            version,
            self._headers,
            self._lnames,
            self._connection_tokens,
            keep_alive,
            content_length,
            chunked,
            self._expect_continue and version == "1.1",
        )
        self.parsing = cycle
        if self.active is None:
            self._start(cycle)
        else:
            # Pipelined: answered after the ones before it; stop reading until it is its turn.
            self.queue.append(cycle)
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is not None:
            cycle._receive_body(body)

    def on_message_complete(self) -> None:
        cycle = self.parsing
        self.parsing = None
        if cycle is not None:
            cycle._receive_complete()

    # -- cycles -----------------------------------------------------------------------------------
    def _start(self, cycle: Cycle) -> None:
        self._cancel_timer()
        self.active = cycle
        if cycle.expect_continue and not cycle.request_complete:
            # We read the body ourselves, so the client may send it now (RFC 9110 §10.1.1).
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.server.handler(cycle)

    def cycle_done(self, cycle: Cycle) -> None:
        if cycle is not self.active:
            return
        self.active = None
        if cycle.request_complete:
            # The handler (sink) and the cycle point at each other: break the loop here, so both
            # go by reference counting when the handler lets go, not by the garbage collector
            # (cycles left for it would make its collections frequent, a cost every request shares).
            cycle.sink = None
        if not cycle.keep_alive or self.closing:
            if self.pending_rejection and cycle.keep_alive:
                self._answer_rejected()
            elif cycle.request_complete and not self.closing:
                self.close()
            else:  # the client may still be sending: it must get the answer, not a reset
                self.close_lingering()
            return
        if not cycle.request_complete:
            # Answered before the whole body arrived (RFC 9112 §9.3 allows it): read the rest and
            # drop it, as nginx does, so the connection stays usable; the parser keeps the framing.
            cycle.sink = _DISCARD
            cycle.conn.resume_reading("upstream")
            cycle.conn.resume_reading("buffer")
        if self.queue:
            self.resume_reading("pipeline")
            self._start(self.queue.popleft())
            return
        self.resume_reading("pipeline")
        self._set_timer(self.limits.keepalive_timeout_s, self.close)
        if self.server.draining:
            self.close()

    # -- transport helpers ------------------------------------------------------------------------
    def pause_reading(self, reason: str) -> None:
        if not self._read_pauses and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._read_pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_pauses:
            return
        self._read_pauses.discard(reason)
        if not self._read_pauses and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        return self.active is None and not self._in_head

    @property
    def lingering(self) -> bool:
        return self._linger_until > 0.0

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we will not serve and close (the stream cannot be trusted after it)."""
        cycle = self.active
        if cycle is not None and cycle is not self.parsing and not self.closing:
            # A pipelined request is bad: the ones before it are still answered, and this answer
            # follows theirs (RFC 9112 §9.3.2); nothing after it is read.
            if self.parsing is not None and self.parsing in self.queue:
                self.queue.remove(self.parsing)
            self.parsing = None
            self.pending_rejection = simple_response(status, message, close=True)
            self.closing = True  # from here on, what the client sends is dropped
            return
        if cycle is not None and cycle.response_started:
            self.abort()
            return
        if cycle is not None and cycle.sink is not None:
            cycle.response_complete = True
            cycle.sink.on_rejected(status)
        self.write(simple_response(status, message, close=True))
        self.close_lingering()

    def _answer_rejected(self) -> None:
        """The next pipelined request before the rejected one, or the rejection and the close."""
        if self.queue:
            self._start(self.queue.popleft())
            return
        self.write(self.pending_rejection)
        self.pending_rejection = b""
        self.close_lingering()

    def _on_header_timeout(self) -> None:
        if self.active is not None:
            return
        if self._in_head:
            self.server.count_client_error("header_timeout")
            self._reject(408, "request header timeout")
        else:
            self.close()

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._deadline = self.loop.time() + delay
        self._on_deadline = callback

    def _cancel_timer(self) -> None:
        self._deadline = 0.0

    def check_deadline(self, now: float) -> None:
        if self._deadline and now >= self._deadline:
            self._deadline = 0.0
            self._on_deadline()

    def close(self) -> None:
        self.closing = True
        self._cancel_timer()
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def close_lingering(self) -> None:
        """Close after an answer sent before the client's request was read to its end.

        Closed with unread bytes in its receive queue, a socket sends a reset (RFC 9112 §9.6), and
        a reset can destroy the answer before the client reads it: a client that sends its whole
        body before reading (http.client, urllib, requests) then sees ECONNRESET instead of the
        413. So, as nginx's lingering close does: the answer, then a shutdown of our write side,
        then whatever the client still sends is read and dropped, never parsed, until the client
        closes, falls silent for `lingering_timeout_s`, or `lingering_time_s` have passed.
        Draining does not wait for it."""
        if self._linger_until:
            return
        limits = self.limits
        transport = self.transport
        if (
            self.closed or transport is None or transport.is_closing() or self.server.draining
            or limits.lingering_time_s <= 0 or not transport.can_write_eof()
        ):
            self.close()
            return
        self.closing = True
        self.flush()  # the answer goes to the transport whole, ahead of the end of stream
        transport.write_eof()
        if self._read_pauses:
            self._read_pauses.clear()
            transport.resume_reading()
        now = self.loop.time()
        self._linger_until = now + limits.lingering_time_s
        self._set_timer(min(limits.lingering_timeout_s, limits.lingering_time_s), self.close)

    def abort(self) -> None:
        self.closing = True
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Server:
    """The listening side: connections, limits, the handler, and graceful draining."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        *,
        on_client_error: Callable[[str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        batch.adopt(self.loop)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._on_client_error = on_client_error
        self._listener: _Listener | None = None
        self._all_closed: asyncio.Event | None = None
        # Client connections accepted and not yet closed, those being set up included: beyond
        # `max_connections`, new ones are closed at once, so the process keeps the descriptors its
        # upstream pools and admin port need.
        self.open_connections = 0
        self.max_connections = limits.max_connections if limits.max_connections is not None else sys.maxsize
        # Timeouts are checked this often, so they fire at most this late.
        shortest = min(limits.header_timeout_s, limits.keepalive_timeout_s)
        if limits.lingering_timeout_s > 0:
            shortest = min(shortest, limits.lingering_timeout_s)
        self.sweep_interval = min(1.0, max(0.02, shortest / 5))
        self._sweeper: asyncio.TimerHandle | None = None

    def count_client_error(self, reason: str) -> None:
        if self._on_client_error is not None:
            self._on_client_error(reason)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._listener = _Listener(self, await _listening_sockets(self.loop, host, port, reuse_port))
        sockname = self._listener.sockets[0].getsockname()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        return str(sockname[0]), int(sockname[1])

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_deadline(now)
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def stop_accepting(self) -> None:
        if self._listener is not None:
            self._listener.close()

    async def drain(self, timeout_s: float) -> bool:
        """Stop new requests, let in-flight ones finish; True when all finished in time."""
        self.draining = True
        self.stop_accepting()
        for conn in list(self.connections):
            if conn.idle or conn.lingering:
                conn.close()
        self._all_closed = asyncio.Event()
        if not self.connections:
            self._all_closed.set()
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout_s)
            return True
        except TimeoutError:
            for conn in list(self.connections):
                conn.abort()
            return False

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None


# -- accepting ---------------------------------------------------------------------------------------

ACCEPT_BATCH = 512  # connections accepted per readiness of a listening socket, so requests still run
_ACCEPT_RETRY_S = 0.1  # after running out of file descriptors, try again this much later
# accept(2), Linux: errors already pending on the new connection, "treated like EAGAIN by retrying"
_ACCEPT_PASS = frozenset(
    getattr(errno, name) for name in (
        "ENETDOWN", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    ) if hasattr(errno, name)
)


async def _listening_sockets(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for `host` (every address it resolves to, as
    `create_server` binds them; "" or "0.0.0.0" as given)."""
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio's create_server (and nginx) do: IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets[0] is not sock:  # one port for every address, like a fixed one
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(4096)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Listener:
    """Accepts on our own listening sockets: `add_reader` and `accept()` until the queue is empty.

    uvloop's `create_server` accepts new connections seconds late while the loop is busy serving
    established ones, which with hundreds of client connections puts seconds on the p99; accepting
    until the queue is empty takes every waiting connection at once (docs/performance.md, row
    "512 client connections").
    """

    def __init__(self, server: Server, sockets: list[socket.socket]) -> None:
        self.server = server
        self.loop = server.loop
        self.sockets = sockets
        self.closed = False
        self.starved = False  # accept() failed for want of descriptors or memory; logged once
        self.full = False  # new connections are being closed at `max_connections`; logged once
        self._adopting: set[asyncio.Task[None]] = set()
        for sock in sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listening: socket.socket) -> None:
        loop = self.loop
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_PASS:  # accept(2): network errors pending on that connection
                    continue
                self.server.count_client_error("accept")
                if not self.starved:  # once per outage, not once per retry
                    self.starved = True
                    log.warning("cannot accept connections (%s): trying again every %.1f s", exc, _ACCEPT_RETRY_S)
                # Out of file descriptors or memory (or worse): let some close before trying again.
                loop.remove_reader(listening.fileno())
                loop.call_later(_ACCEPT_RETRY_S, self._resume, listening)
                return
            if self.starved:
                self.starved = False
                log.warning("accepting connections again")
            server = self.server
            if server.open_connections >= server.max_connections:
                # Closed before any byte is read: established connections keep their requests,
                # and the descriptors left serve the upstream pools and the admin port.
                sock.close()
                server.count_client_error("max_connections")
                if not self.full:
                    self.full = True
                    log.warning("%d client connections open, the most allowed: closing new ones at once",
                                server.open_connections)
                continue
            if self.full:
                self.full = False
                log.warning("below the client connection limit again: accepting")
            server.open_connections += 1
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._adopt(sock))
            self._adopting.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, sock: socket.socket) -> None:
        if self.closed:
            sock.close()
            self.server.open_connections -= 1
            return
        try:
            await self.loop.connect_accepted_socket(lambda: as_protocol(ClientConnection(self.server)), sock)
        except OSError:  # the client left before its transport was made
            sock.close()
            self.server.open_connections -= 1

    def _resume(self, listening: socket.socket) -> None:
        if not self.closed:
            self.loop.add_reader(listening.fileno(), self._accept, listening)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
