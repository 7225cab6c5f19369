"""A stand-in LLM that streams OpenAI chat-completions chunks as server-sent events, for llm.py.

    python benchmarks/sse_standin.py --port 9001 [--events 100] [--gap-ms 20] [--first-ms 0]
    python benchmarks/sse_standin.py --port 9002 --stall-after 5     # a few events, then silence
    python benchmarks/sse_standin.py --port 9002 --stats stats.json  # counts written on SIGUSR1

Every request, whatever its path and body, gets a `200 text/event-stream` answer in chunked
transfer coding: `--events` chunks `data: {..."choices":[{"index":0,"delta":{"content":"tok "},
"finish_reason":null}]}`, `--gap-ms` apart, the first `--first-ms` after the request (0: with the
response head), then a chunk with `finish_reason` "stop" and `usage`, then `data: [DONE]`, then
the last chunk; the connection stays open for the next request. With `--stall-after N` the answer
stops after N content events and the connection is left open, as a model server that hangs
mid-stream. One event per chunk and per write, as vLLM and OpenAI send them. A request's
`X-Standin-Events` and `X-Standin-Gap-Ms` headers override `--events` and `--gap-ms` for its
answer (a quick warm-up through a proxy in front of a slow stand-in).

A plain asyncio Protocol on uvloop with httptools, the events prebuilt and each stream's next one
set on a timer, so thousands of open streams cost little CPU. `--stats FILE` writes
`{"requests", "open", "max_open", "events", "completed"}` as JSON on SIGUSR1 and at exit (open:
streams started, not yet finished or closed). The soft open-files limit is raised to the hard one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal

import httptools

MODEL = "standin"


def chunk(payload: bytes) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n" % len(payload) + payload + b"\r\n"


def event(doc: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


class Stream:
    """The answer's bytes, built once: every stream sends the same events."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.id = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        delta = {**self.id, "choices": [{"index": 0, "delta": {"content": args.content}, "finish_reason": None}]}
        self.head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        self.content = chunk(event(delta))
        self.tails: dict[int, bytes] = {}
        self.events = args.events
        self.gap = args.gap_ms / 1000.0
        self.first = args.first_ms / 1000.0
        self.stall_after = args.stall_after

    def tail(self, events: int) -> bytes:
        """The final chunk (finish reason, usage), `data: [DONE]` and the last chunk."""
        tail = self.tails.get(events)
        if tail is None:
            final = {**self.id, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 8, "completion_tokens": events, "total_tokens": events + 8}}
            tail = self.tails[events] = chunk(event(final)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        return tail


class Counts:
    def __init__(self) -> None:
        self.requests = 0
        self.open = 0
        self.max_open = 0
        self.events = 0
        self.completed = 0

    def write(self, path: str | None) -> None:
        if not path:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"requests": self.requests, "open": self.open, "max_open": self.max_open,
                       "events": self.events, "completed": self.completed}, f)
        os.replace(tmp, path)  # a reader never sees half a file


class SSEProtocol(asyncio.Protocol):
    __slots__ = ("stream", "counts", "loop", "parser", "transport", "timer", "sent", "t0", "streaming",
                 "events", "gap")

    def __init__(self, stream: Stream, counts: Counts, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.counts = counts
        self.loop = loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent = 0
        self.t0 = 0.0
        self.streaming = False
        self.events = stream.events
        self.gap = stream.gap

    def on_message_begin(self) -> None:
        self.events = self.stream.events
        self.gap = self.stream.gap

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-standin-events":
            self.events = int(value)
        elif name == b"x-standin-gap-ms":
            self.gap = float(value) / 1000.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_message_complete(self) -> None:
        t = self.transport
        if t is None or self.streaming:
            return  # a pipelined request behind a stream: not something a streaming client sends
        c = self.counts
        c.requests += 1
        c.open += 1
        c.max_open = max(c.max_open, c.open)
        self.streaming = True
        self.sent = 0
        s = self.stream
        self.t0 = self.loop.time()
        if s.first <= 0 and s.stall_after != 0:
            t.write(s.head + s.content)
            self.sent = 1
            c.events += 1
            self._schedule()
        else:
            t.write(s.head)
            self._schedule()

    def _schedule(self) -> None:
        s = self.stream
        if 0 <= s.stall_after <= self.sent:
            self.timer = None  # stalled: nothing more, the connection stays open
            return
        if self.sent >= self.events:
            self._finish()
            return
        # Due times from the stream's start, so a late timer does not push every later event.
        self.timer = self.loop.call_at(self.t0 + s.first + self.sent * self.gap, self._next)

    def _next(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(self.stream.content)
        self.sent += 1
        self.counts.events += 1
        self._schedule()

    def _finish(self) -> None:
        self.timer = None
        self.streaming = False
        self.counts.open -= 1
        self.counts.completed += 1
        assert self.transport is not None
        self.transport.write(self.stream.tail(self.events))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.streaming:
            self.streaming = False
            self.counts.open -= 1
        self.transport = None


def raise_nofile() -> None:
    """As many open files as the hard limit allows: a thousand streams are a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stream, counts = Stream(args), Counts()
    server = await loop.create_server(lambda: SSEProtocol(stream, counts, loop), args.host, args.port,
                                      backlog=args.backlog, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, counts.write, args.stats)
    try:
        await stop.wait()
    finally:
        server.close()
        counts.write(args.stats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--events", type=int, default=100, help="content events per answer (default 100)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="between content events (default 20)")
    p.add_argument("--first-ms", type=float, default=0.0,
                   help="request to first event (default 0: sent with the response head)")
    p.add_argument("--stall-after", type=int, default=-1,
                   help="send this many content events, then nothing (default -1: never stall)")
    p.add_argument("--content", default="tok ", help="each event's delta.content (default 'tok ')")
    p.add_argument("--stats", default=None, help="write the counts here as JSON on SIGUSR1 and at exit")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--no-uvloop", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    run = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
