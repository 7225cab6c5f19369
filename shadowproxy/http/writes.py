"""Write coalescing: one send per connection per burst of parser callbacks.

Parsing one chunk of bytes fires several callbacks that each want to write: a request head
arrives and the upstream head goes out, then its body; a response head arrives and the client's
head goes out, then the body. uvloop sends on every `transport.write` (a syscall each), which was
the largest cost on the hot path. While a protocol's `data_received` runs, writes are held per
connection and sent as one buffer when it returns.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


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
batch = _Batch()


class CoalescedWrites:
    """Mixin for a protocol with `transport`, `closed` and `_out`: `write` holds data while a
    `data_received` runs (then `flush` sends it as one buffer) and sends at once otherwise."""

    __slots__ = ()
    transport: asyncio.Transport | None
    closed: bool
    _out: list[bytes]

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
