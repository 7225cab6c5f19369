"""The `[record]` component: production's traffic written to compressed files, off the loop.

On the event loop the recorder only appends a tuple to a bounded queue (`on_exchange`, `on_pair`);
a full queue drops the record and counts it in `shadowproxy_record_dropped_total`, so a slow disk
never slows production. A writer thread drains the queue every `FLUSH_INTERVAL_S`, drops the
configured headers, redacts both bodies, and appends one zstd frame per batch (fileformat.py) to
this process's current file; it starts a new file past `max_file_bytes` and removes this process's
oldest files while they hold more than its share of `max_total_bytes` (each of `serve --workers N`
keeps 1/N). `close()` (after the drain on SIGTERM) writes everything still queued.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import threading
import time
from typing import Any

import zstandard
from aiohttp import web

from shadowproxy.config import Config, RecordConfig
from shadowproxy.judging.presets import parse_pointer, redact
from shadowproxy.record.fileformat import FORMAT, SUFFIX, VERSION, encode_body, frame
from shadowproxy.shadow.metrics import Metrics, RecordMetrics
from shadowproxy.shadow.observers import ExchangeRecord, PairRecord

__all__ = ["Recorder", "RecordWriter", "redact"]

log = logging.getLogger("shadowproxy.record")

QUEUE_RECORDS = 100_000
QUEUE_BYTES = 64 * 1024 * 1024
FLUSH_INTERVAL_S = 0.2
CLOSE_TIMEOUT_S = 30.0
FRAME_RECORDS = 1024  # records per zstd frame at most: a torn frame loses no more than this
AWAITING_MAX = 100_000  # mirrored exchanges whose candidate outcome is still to come
WORKERS_ENV = "SHADOWPROXY_WORKERS"  # set by `serve --workers N` for its workers

_EXCHANGE = 0
_PAIR = 1


def _headers(fields: list[tuple[bytes, bytes]] | None, drop: frozenset[str]) -> list[list[str]]:
    if not fields:
        return []
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in fields if n.decode("latin-1").lower() not in drop]


def _header(fields: list[tuple[bytes, bytes]], name: str) -> str | None:
    for n, v in fields:
        if n.decode("latin-1").lower() == name:
            return v.decode("latin-1")
    return None


class RecordWriter:
    """The thread that owns this process's recording files. The loop only appends to `records`."""

    def __init__(self, config: RecordConfig, metrics: RecordMetrics, share: int = 1) -> None:
        self.config = config
        self.metrics = metrics
        self.records: collections.deque[tuple[Any, ...]] = collections.deque()
        self.queued_bytes = 0  # written by the loop only
        self.drained_bytes = 0  # written by the thread only
        self.total_cap = max(config.max_total_bytes // max(share, 1), 1)
        self.drop = frozenset(h.lower() for h in config.drop_headers)
        self.redactions = [parse_pointer(p) for p in config.redact]
        self.version_header = config.version_header.lower()
        self.compressor = zstandard.ZstdCompressor(level=3)
        self.files: collections.deque[tuple[str, int]] = collections.deque()  # closed files, oldest first
        self.current: str | None = None
        self.file: Any = None
        self.size = 0
        self._failing = False
        self.cpu_s = 0.0  # the writer thread's CPU time so far (benchmarks/replay.py reports it per record)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadowproxy-record", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- thread side ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._cycle()
            if stopping and not self.records:
                break
        self._close_file()

    def _cycle(self) -> None:
        started = time.thread_time()
        try:
            self._write_queued()
        finally:
            self.cpu_s += time.thread_time() - started

    def _write_queued(self) -> None:
        counted = self.queued_bytes
        popleft = self.records.popleft
        batch = [popleft() for _ in range(len(self.records))]
        self.drained_bytes = counted
        for start in range(0, len(batch), FRAME_RECORDS):
            self._write([self._document(item) for item in batch[start : start + FRAME_RECORDS]])

    def _document(self, item: tuple[Any, ...]) -> dict[str, Any]:
        if item[0] == _PAIR:
            _, request_id, outcome, status, latency = item
            return {"type": "pair", "id": request_id,
                    "candidate": {"outcome": outcome, "status": status, "latency_s": latency}}
        _, request_id, at, method, target, status, req_headers, resp_headers, latency, mirrored, req_body, \
            resp_body = item[:12]
        chunk_times = item[12] if len(item) > 12 else None
        path, _, query = target.partition("?")
        request: dict[str, Any] = {"method": method, "path": path, "query": query,
                                   "headers": _headers(req_headers, self.drop)}
        response: dict[str, Any] = {"status": status, "headers": _headers(resp_headers, self.drop),
                                    "latency_s": latency}
        self._body(req_body, request)
        self._body(resp_body, response)
        content_type = _header(resp_headers, "content-type") or ""
        if chunk_times and content_type.startswith("text/event-stream") and "body_omitted" not in response:
            # A streamed answer: where each piece ended in the body, and when it arrived.
            response["chunks"] = [[int(chunk_times[i + 1]), chunk_times[i]] for i in range(0, len(chunk_times), 2)]
        doc: dict[str, Any] = {"type": "exchange", "id": request_id, "time": at, "request": request,
                               "response": response, "mirrored": mirrored}
        if self.version_header:
            doc["version"] = _header(resp_headers, self.version_header)
        return doc

    def _body(self, body: bytes | None, into: dict[str, Any]) -> None:
        if body is None:
            into["body_omitted"] = "not_captured"
            return
        if len(body) > self.config.max_body_bytes:
            into["body_omitted"] = "too_large"
            into["body_size"] = len(body)
            return
        if body and self.redactions:
            redacted = redact(body, self.redactions)
            if redacted is None:
                into["body_omitted"] = "not_json"  # cannot be redacted, so not kept
                return
            body = redacted
        encode_body(body, into)

    def _write(self, docs: list[dict[str, Any]]) -> None:
        try:
            if self.file is None:
                self._open()
            data = frame(docs, self.compressor)
            self.file.write(data)
            self.file.flush()
        except OSError as exc:
            self.metrics.lost.inc(len(docs))
            if not self._failing:
                self._failing = True
                log.error("recorder: writing to %s failed: %s", self.config.path, exc)
            self._close_file()
            return
        if self._failing:
            self._failing = False
            log.warning("recorder: writes succeed again")
        self.size += len(data)
        self.metrics.written.inc(len(docs))
        if self.size >= self.config.max_file_bytes:
            self._close_file()
        self._enforce_cap()

    def _open(self) -> None:
        os.makedirs(self.config.path, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}.{time.time_ns() % 1_000_000_000:09d}-{os.getpid()}{SUFFIX}"
        self.current = os.path.join(self.config.path, name)
        self.file = open(self.current, "xb")  # noqa: SIM115 - kept open across batches
        self.size = 0
        header = {"type": "header", "format": FORMAT, "version": VERSION, "created": time.time(),
                  "pid": os.getpid(), "dropped_headers": sorted(self.drop), "redacted": list(self.config.redact)}
        data = frame([header], self.compressor)
        self.file.write(data)
        self.size += len(data)

    def _close_file(self) -> None:
        if self.file is None:
            return
        try:
            self.file.close()
        except OSError as exc:
            log.error("recorder: closing %s: %s", self.current, exc)
        assert self.current is not None
        self.files.append((self.current, self.size))
        self.file = None
        self.current = None
        self.size = 0

    def _enforce_cap(self) -> None:
        total = self.size + sum(size for _, size in self.files)
        while self.files and total > self.total_cap:
            oldest, size = self.files.popleft()
            try:
                os.unlink(oldest)
            except OSError as exc:
                log.warning("recorder: removing %s: %s", oldest, exc)
            total -= size


class Recorder:
    """The `[record]` component: an `Observer` with a lifecycle; no routes, no stats block."""

    every_exchange = False  # only the sampled requests (and mirrored ones) cost a record
    keeps_chunk_times = True  # the proxy notes when each piece of a recorded answer arrived

    def __init__(self, config: Config, metrics: Metrics) -> None:
        record = config.record
        self.metrics = RecordMetrics(metrics.registry)
        share = int(os.environ.get(WORKERS_ENV, "1") or 1)
        self.writer = RecordWriter(record, self.metrics, share)
        self._queue = self.writer.records.append
        self.max_records = QUEUE_RECORDS
        self.max_bytes = QUEUE_BYTES
        self.sample_rate = record.sample_rate
        self._random = random.random
        self._awaiting: set[str] = set()  # recorded mirrored requests whose pair is to come

    # -- observer (event loop; must stay cheap) ------------------------------------------------------

    def wants_bodies(self) -> bool:
        return self._random() < self.sample_rate

    def _full(self, size: int) -> bool:
        writer = self.writer
        queued_bytes = writer.queued_bytes - writer.drained_bytes
        if len(writer.records) >= self.max_records or queued_bytes + size > self.max_bytes:
            self.metrics.dropped.inc()
            return True
        return False

    def on_exchange(self, record: ExchangeRecord, wanted: bool) -> None:
        if not wanted:
            return
        request, response = record.request_body, record.response_body
        size = (len(request) if request else 0) + (len(response) if response else 0)
        if self._full(size):
            return
        if record.mirrored:
            awaiting = self._awaiting
            if len(awaiting) >= AWAITING_MAX:
                awaiting.clear()  # pairs that never came (a dropped mirror) must not pile up
            awaiting.add(record.request_id)
        self._queue((
            _EXCHANGE, record.request_id, record.time, record.method, record.path, record.status,
            record.request_headers, record.response_headers, record.latency_s, record.mirrored, request, response,
            record.chunk_times,
        ))
        self.writer.queued_bytes += size

    def on_pair(self, record: PairRecord) -> None:
        awaiting = self._awaiting
        if record.request_id not in awaiting:
            return
        awaiting.discard(record.request_id)
        if self._full(0):
            return
        self._queue((_PAIR, record.request_id, record.outcome, record.candidate_status, record.candidate_latency_s))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        """Write everything queued (SIGTERM loses nothing queued) and close the file."""
        if not await asyncio.to_thread(self.writer.stop, CLOSE_TIMEOUT_S):
            log.error("recorder: the writer did not finish within %.0f s", CLOSE_TIMEOUT_S)

    def routes(self) -> list[web.RouteDef]:
        return []

    def stats_blocks(self) -> dict[str, Any]:
        return {}
