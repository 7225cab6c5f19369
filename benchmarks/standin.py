"""A tiny stand-in model server for the benchmarks (asyncio + httptools, uvloop when installed).

It is the fallback when nginx is missing, and the slow or silent candidate that nginx cannot play:

    python benchmarks/standin.py --port 9001 --model-version v1
    python benchmarks/standin.py --port 9002 --model-version v2 --log mirrored.log --delay-ms 50
    python benchmarks/standin.py --port 9002 --blackhole          # accepts and counts, never answers

Every request gets `{"predictions":[1],"model_version":"<version>"}` (or `--body`). With `--log FILE`
it appends one line per request (its arrival time), buffered and written every `--flush-s` seconds,
at once on SIGUSR1, and on exit (SIGTERM/SIGINT), so a benchmark can count what the model received.
A "refusing" model needs no server at all: a closed port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

import httptools

STATUS_TEXT = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
               429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
               503: "Service Unavailable", 504: "Gateway Timeout"}


def build_response(status: int, body: bytes, close: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + body


class Model:
    """Shared state of one stand-in: canned answers, options, the request log."""

    def __init__(self, args: argparse.Namespace) -> None:
        body = args.body if args.body is not None else (
            '{"predictions":[1],"model_version":"' + args.model_version + '"}')
        raw = body.encode()
        self.keep = build_response(args.status, raw, close=False)
        self.close = build_response(args.status, raw, close=True)
        self.delay = max(0.0, args.delay_ms / 1000.0)
        self.blackhole = args.blackhole
        self.log_path = args.log
        self.pending: list[bytes] = []
        self.log_file = open(args.log, "ab") if args.log else None  # noqa: SIM115 - lives as long as the process

    def record(self) -> None:
        if self.log_file is not None:
            self.pending.append(b"%.6f\n" % time.time())

    def flush(self) -> None:
        if self.log_file is not None and self.pending:
            self.log_file.write(b"".join(self.pending))
            self.pending.clear()
            self.log_file.flush()


class ModelProtocol(asyncio.Protocol):
    __slots__ = ("model", "parser", "transport", "loop")

    def __init__(self, model: Model, loop: asyncio.AbstractEventLoop) -> None:
        self.model = model
        self.loop = loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(build_response(400, b'{"error":"bad request"}', close=True))
            self.transport.close()

    def on_message_complete(self) -> None:
        self.model.record()
        keep = self.parser.should_keep_alive()
        if self.model.blackhole:
            return  # counted, never answered
        if self.model.delay:
            self.loop.call_later(self.model.delay, self.respond, keep)
        else:
            self.respond(keep)

    def respond(self, keep: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if keep:
            t.write(self.model.keep)
        else:
            t.write(self.model.close)
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    model = Model(args)
    server = await loop.create_server(lambda: ModelProtocol(model, loop), args.host, args.port,
                                      backlog=args.backlog, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, model.flush)

    async def flusher() -> None:
        while True:
            await asyncio.sleep(args.flush_s)
            model.flush()

    task = asyncio.create_task(flusher())
    try:
        await stop.wait()
    finally:
        task.cancel()
        server.close()
        model.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-version", default="v1", help="put in the canned answer (default v1)")
    p.add_argument("--body", default=None, help="answer body instead of the canned prediction")
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--log", default=None, help="append one line per request to this file")
    p.add_argument("--flush-s", type=float, default=1.0, help="log flush interval (default 1 s)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer each request this late")
    p.add_argument("--blackhole", action="store_true", help="accept and read, never answer")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--no-uvloop", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
