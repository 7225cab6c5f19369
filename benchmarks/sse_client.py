"""A load client for streamed chat completions, for llm.py: time to first token, events, failures.

    python benchmarks/sse_client.py --url http://127.0.0.1:8080/v1/chat/completions \\
        [--connections 50] [--warmup 3] [--duration 20] [--ramp-s 1] [--requests-per-conn 0]

Each of `--connections` keep-alive connections (their starts spread over `--ramp-s`) POSTs a
streamed chat request (`"stream": true`, with Content-Length), reads the chunked
`text/event-stream` answer as it arrives, and sends the next request as soon as the answer is
whole: a closed loop of streams. The time to first token of a stream runs from just before its
request is written to the arrival of the first `data:` event whose `delta.content` is not empty,
both read with `time.perf_counter()` (the arrival at the top of `data_received`, before any
parsing).

The measured window opens `--warmup` seconds after the start and lasts `--duration` seconds; the
client prints `MEASURE start` and `MEASURE end` (flushed) as it opens and closes, so a parent can
read CPU counters at the same moments. Streams whose request was sent inside the window give
their time to first token; events are counted when they arrive inside it. After the window no
new request is sent and open streams finish (at most `--drain-s`). `--duration 0` has no end:
each connection sends `--requests-per-conn` requests and the client stops when all are done.
The summary is one line, `RESULT {json}`: `ttft_ms` (p50, p90, p99, p999, max, n), `events`
(every `data:` event in the window), `content_events`, `sent` (requests sent in the window),
`streams` (answers ended in the window or sent in it),
`complete`, `failed` and the first failure messages, `max_open` (streams open at once);
`--samples FILE` also writes every time to first token, in milliseconds, as a JSON list.

Plain asyncio protocols on uvloop, so the client's own cost per event stays small and outside the
process it measures. The soft open-files limit is raised to the hard one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from urllib.parse import urlsplit

HEAD, CHUNKED, LENGTH, CLOSE, TRAILER = range(5)


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        u = urlsplit(args.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        body = args.body.encode()
        extra = "".join(f"{h}\r\n" for h in args.header)
        self.request = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{extra}"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.args = args
        self.measuring = False
        self.ended = False  # the window closed: no new requests
        self.ttft: list[float] = []
        self.events = 0
        self.content_events = 0
        self.sent = 0  # requests sent inside the window
        self.streams = 0
        self.complete = 0
        self.failed = 0
        self.failures: list[str] = []
        self.open = 0
        self.max_open = 0
        self.conns: set[Conn] = set()
        self.pending = args.connections  # connections not yet closed for good
        self.done = asyncio.Event()

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(why)

    def retire(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.done.set()


class Conn(asyncio.Protocol):
    __slots__ = ("client", "transport", "sent", "t_sent", "timed", "state", "buf", "need", "crlf",
                 "sse", "first", "saw_done", "active", "last_rx", "status", "length")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.t_sent = 0.0
        self.timed = False
        self.active = False
        self.last_rx = 0.0
        self._reset()

    def _reset(self) -> None:
        self.state = HEAD
        self.buf = b""
        self.need = 0
        self.crlf = 0
        self.sse = b""
        self.first = False
        self.saw_done = False
        self.status = 0
        self.length = 0

    # -- requests -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client.conns.add(self)
        self.send()

    def send(self) -> None:
        c = self.client
        limit = c.args.requests_per_conn
        if c.ended or (limit and self.sent >= limit) or self.transport is None:
            self.close()
            return
        self._reset()
        self.sent += 1
        self.active = True
        c.open += 1
        c.max_open = max(c.max_open, c.open)
        self.timed = c.measuring
        c.sent += self.timed
        self.t_sent = self.last_rx = time.perf_counter()
        self.transport.write(c.request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # connection_lost retires it

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.client
        if self.active:
            if self.state == CLOSE:
                self._end()  # a close-delimited body ends here
            else:
                self.active = False
                c.open -= 1
                c.fail(f"connection closed mid-answer ({exc or 'EOF'})")
        self.transport = None
        c.conns.discard(self)
        c.retire()

    # -- answers ------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.last_rx = now
        if not self.active:
            return
        if self.state == HEAD:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").lower().split("\r\n")
            data = self.buf[end + 4:]
            self.buf = b""
            try:
                self.status = int(head[0].split()[1])
            except (IndexError, ValueError):
                self._broken(f"bad status line {head[0][:60]!r}")
                return
            fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            if "chunked" in fields.get("transfer-encoding", ""):
                self.state = CHUNKED
            elif "content-length" in fields:
                self.state = LENGTH
                self.length = int(fields["content-length"])
            else:
                self.state = CLOSE
            if self.status != 200:
                self._broken(f"status {self.status}")
                return
            if not data and self.state != LENGTH:
                return
        if self.state == CHUNKED or self.state == TRAILER:
            self._chunked(data, now)
        elif self.state == LENGTH:
            take = data[:self.length]
            self.length -= len(take)
            self._body(take, now)
            if self.length <= 0:
                self._end()
        else:
            self._body(data, now)

    def _chunked(self, data: bytes, now: float) -> None:
        """RFC 9112 §7.1: size line, data, CRLF; a zero size, then trailer lines and a blank line."""
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while pos < n:
            if self.need:
                take = min(self.need, n - pos)
                self._body(buf[pos:pos + take], now)
                pos += take
                self.need -= take
                if not self.need:
                    self.crlf = 2
                continue
            if self.crlf:
                take = min(self.crlf, n - pos)
                pos += take
                self.crlf -= take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self.state == TRAILER:
                if not line:
                    self.buf = b""
                    self._end()
                    return
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                self._broken(f"bad chunk size {line[:20]!r}")
                return
            if size == 0:
                self.state = TRAILER
            self.need = size
        self.buf = buf[pos:]

    def _body(self, piece: bytes, now: float) -> None:
        sse = self.sse + piece if self.sse else piece
        start = 0
        c = self.client
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            ev = sse[start:end]
            start = end + 2
            if not ev.startswith(b"data:"):
                continue
            if c.measuring:
                c.events += 1
            if ev[5:].strip() == b"[DONE]":
                self.saw_done = True
                continue
            at = ev.find(b'"content":"')
            if at >= 0 and ev[at + 11:at + 12] != b'"':
                if c.measuring:
                    c.content_events += 1
                if not self.first:
                    self.first = True
                    if self.timed:
                        c.ttft.append(now - self.t_sent)
        self.sse = sse[start:]

    def _end(self) -> None:
        c = self.client
        self.active = False
        c.open -= 1
        if c.measuring or self.timed:
            c.streams += 1
            if self.saw_done and self.first:
                c.complete += 1
            else:
                c.fail("the answer ended without a content event and data: [DONE]")
        self.send()

    def _broken(self, why: str) -> None:
        self.active = False
        self.client.open -= 1
        self.client.fail(why)
        self.close()


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank percentiles in milliseconds."""
    v = sorted(values)
    n = len(v)

    def at(q: float) -> float | None:
        if not n:
            return None
        return v[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1e3

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999),
            "max": v[-1] * 1e3 if n else None, "n": n}


def mark(text: str) -> None:
    print(text, flush=True)


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    c = Client(args)
    t0 = time.perf_counter()

    async def connect(delay: float) -> None:
        await asyncio.sleep(delay)
        if c.ended:
            c.retire()
            return
        try:
            await loop.create_connection(lambda: Conn(c), c.host, c.port)
        except OSError as e:
            c.fail(f"connect: {e}")
            c.retire()

    def start_window() -> None:
        c.measuring = True
        mark("MEASURE start")

    def end_window() -> None:
        c.measuring = False
        c.ended = True
        mark("MEASURE end")
        for conn in list(c.conns):
            if not conn.active:
                conn.close()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for conn in list(c.conns):
                if conn.active and now - conn.last_rx > args.timeout_s:
                    conn._broken(f"no bytes for {args.timeout_s:g} s")

    tasks = [asyncio.ensure_future(connect(i * args.ramp_s / max(1, args.connections)))
             for i in range(args.connections)]
    loop.call_later(args.warmup, start_window)
    if args.duration > 0:
        loop.call_later(args.warmup + args.duration, end_window)
    sweeper = asyncio.ensure_future(sweep())
    try:
        if args.duration > 0:
            await asyncio.sleep(args.warmup + args.duration)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(c.done.wait(), args.drain_s)
        else:
            await c.done.wait()
            end_window()
    finally:
        sweeper.cancel()
        for t in tasks:
            t.cancel()
        cut = sum(1 for conn in c.conns if conn.active)
        for conn in list(c.conns):
            conn.active = False
            conn.close()
    return {"ttft_ms": percentiles(c.ttft), "events": c.events, "content_events": c.content_events,
            "sent": c.sent, "streams": c.streams, "complete": c.complete, "failed": c.failed, "failures": c.failures,
            "cut_at_end": cut, "max_open": c.max_open, "elapsed_s": time.perf_counter() - t0,
            "ttft_samples_ms": [round(v * 1e3, 4) for v in c.ttft]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--url", required=True, help="http://host:port/v1/chat/completions")
    p.add_argument("--connections", type=int, default=50, help="concurrent streams (default 50)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window (default 3)")
    p.add_argument("--duration", type=float, default=20.0, help="window length; 0 = no end (default 20)")
    p.add_argument("--ramp-s", type=float, default=1.0, help="connection starts spread over this (default 1)")
    p.add_argument("--requests-per-conn", type=int, default=0, help="then close it; 0 = no limit")
    p.add_argument("--drain-s", type=float, default=10.0, help="after the window, wait for open streams")
    p.add_argument("--timeout-s", type=float, default=30.0, help="an answer silent this long fails")
    p.add_argument("--samples", default=None, help="also write every time to first token (ms) here, as JSON")
    p.add_argument("--header", action="append", default=[], help="'Name: value', sent with every request")
    p.add_argument("--body", default='{"model":"standin","messages":[{"role":"user","content":"Say hi"}],'
                                     '"stream":true,"stream_options":{"include_usage":true}}')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.duration <= 0 and args.requests_per_conn <= 0:
        print("--duration 0 needs --requests-per-conn", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run_ = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run_ = uvloop.run
    result = run_(run(args))
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(result.pop("ttft_samples_ms"), f)
    else:
        result.pop("ttft_samples_ms")
    print("RESULT " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
