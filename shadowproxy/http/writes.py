"""Write coalescing: one send per connection per burst of parser callbacks.

Parsing one chunk of bytes fires several callbacks that each want to write: a request head
arrives and the upstream head goes out, then its body; a response head arrives and the client's
head goes out, then the body. uvloop sends on every `transport.write` (a syscall each), which was
the largest cost on the hot path. While a protocol's `data_received` runs, writes are held per
connection and sent as one buffer when it returns.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol, cast


class Flushable(Protocol):
    def flush(self) -> None: ...


class _Batch:
    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[Flushable] = []

    def flush_all(self) -> None:
        dirty = self.dirty
        while dirty:
            self.dirty = []
            for conn in dirty:
                conn.flush()
            dirty = self.dirty


# One event loop per process (DESIGN.md), so one batch; `depth` nests when callbacks of one
# protocol write to another protocol whose own data_received is not running.
batch: Final = _Batch()


class CoalescedWrites:
    """Base of our two protocols (client and upstream connection), which set `transport`,
    `closed` and `_out` and implement `_data_received`: `data_received` runs `_data_received`
    with writes held (`write` keeps data while any `data_received` runs, then every connection
    written to is flushed as one buffer each); a write outside one is sent at once.

    Not a subclass of `asyncio.Protocol`: the loop only calls the protocol's methods, and a class
    with a Python base could not be compiled to a native class (see `setup.py`). `as_protocol`
    tells the type checker what the loop is given."""

    __slots__ = ()
    transport: asyncio.Transport | None
    closed: bool
    _out: list[bytes]

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
            if batch.dirty and not batch.depth:
                batch.flush_all()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if batch.depth:
            out = self._out
            if not out:
                batch.dirty.append(self)
            out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []  # type: ignore[misc]  # the slot is the subclass's
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))


def as_protocol(conn: CoalescedWrites) -> asyncio.Protocol:
    """`conn` for `loop.create_connection` and friends, which call protocols by their methods."""
    return cast(asyncio.Protocol, conn)
