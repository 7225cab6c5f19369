"""Write coalescing: one send per connection per turn of the event loop.

Parsing one chunk of bytes fires several callbacks that each want to write: a request head
arrives and the upstream head goes out, then its body; a response head arrives and the client's
head goes out, then the body. uvloop sends on every `transport.write` (a syscall each), which
would make syscalls the largest cost on the hot path. So writes made while a protocol's
`data_received` runs are held per connection, and every connection written to is sent as one
buffer once the loop has run all the callbacks of its current poll (one `call_soon` per turn,
not per request), or as soon as it holds `SEND_AT_BYTES`.

Why the end of the turn and not the end of each `data_received`: a send on loopback runs the
receiver's side in the sender's thread, waking the process that waits on that socket (the model
server, the client). Sent back to back, the sends of one turn mostly find it still awake,
while sends spread over the turn wake it again and again, and under load those wake-ups are a
large share of the proxy's CPU. A quiet loop pays a little latency for it: a turn then carries
one request, whose sends wait for the turn's end (docs/performance.md, row "one client
connection").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, cast

log = logging.getLogger("shadowproxy.http")


class _Batch:
    __slots__ = ("depth", "dirty", "scheduled_on")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[CoalescedWrites] = []  # a native class: conn.flush() is a C call
        self.scheduled_on: asyncio.AbstractEventLoop | None = None  # the loop a flush_all waits on

    def flush_all(self) -> None:
        self.scheduled_on = None
        dirty = self.dirty
        while dirty:
            self.dirty = []
            for conn in dirty:
                try:
                    conn.flush()
                except Exception as exc:  # one connection's failed send must not hold back the others'
                    log.warning("a held write failed: %s: %s", type(exc).__name__, exc)
            dirty = self.dirty

    def schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """flush_all once `loop` has run this turn's callbacks; called when none is pending, so
        once a turn. The loop is the connection's, not `asyncio.get_running_loop()`, which costs
        a getpid system call on every call in Python 3.11."""
        self.scheduled_on = loop
        loop.call_soon(self.flush_all)

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """A server starts on `loop`. Tests run one loop after another in a process, and a loop
        closed between a held write and the end of its turn leaves its flush pending for ever,
        which would stop this loop's flushes: drop it, with the writes of that loop's dead
        connections."""
        if self.scheduled_on is not None and self.scheduled_on is not loop:
            self.scheduled_on = None
            self.dirty = []


# A connection holding this much sends at once, mid-turn: one turn can read a socket up to 32
# times (libuv), so a streamed body held to the turn's end would grow to megabytes, copied
# once more by the join, and the transport's backpressure (pause_writing, which stops reading
# the other side) saw none of it until then. Requests and answers below this size still wait.
SEND_AT_BYTES: Final = 64 * 1024

# One event loop per process, so one batch; `depth` nests when callbacks of one
# protocol write to another protocol whose own data_received is not running.
batch: Final = _Batch()


class CoalescedWrites:
    """Base of our two protocols (client and upstream connection), which set `loop`, `transport`,
    `closed` and `_out` and implement `_data_received`: `data_received` runs `_data_received`
    with writes held (`write` keeps data while any `data_received` runs; every connection written
    to is flushed as one buffer each at the end of the loop's turn, or as soon as it holds
    `SEND_AT_BYTES`). A write outside one is sent at once, unless the connection still holds
    data, which must go first.

    Not a subclass of `asyncio.Protocol`: the loop only calls the protocol's methods, and a class
    with a Python base could not be compiled to a native class (see `setup.py`). `as_protocol`
    tells the type checker what the loop is given."""

    __slots__ = ()
    loop: asyncio.AbstractEventLoop  # the loop the connection runs on
    transport: asyncio.Transport | None
    closed: bool
    _out: list[bytes]
    _held: int  # bytes in _out

    def _data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool | None:
        """The peer closed its side: None lets the transport close (asyncio.Protocol's default)."""
        return None

    def data_received(self, data: bytes) -> None:
        batch.depth += 1
        try:
            self._data_received(data)
        finally:
            batch.depth -= 1
            if batch.dirty and not batch.depth and batch.scheduled_on is None:
                batch.schedule(self.loop)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        out = self._out
        if batch.depth or out:
            if not out:
                batch.dirty.append(self)
            out.append(data)
            self._held += len(data)  # type: ignore[misc]  # the slot is the subclass's
            if self._held >= SEND_AT_BYTES:
                self.flush()  # still in `batch.dirty`: its turn-end flush finds nothing, or what came since
        elif self.transport is not None:
            self.transport.write(data)

    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []  # type: ignore[misc]  # the slot is the subclass's
            self._held = 0  # type: ignore[misc]
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))


def as_protocol(conn: CoalescedWrites) -> asyncio.Protocol:
    """`conn` for `loop.create_connection` and friends, which call protocols by their methods."""
    return cast(asyncio.Protocol, conn)
