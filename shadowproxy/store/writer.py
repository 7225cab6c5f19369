"""The audit store: a durable memory of every request, its model versions and ground truth.

On the event loop the store only appends a compact tuple to a bounded queue (`on_exchange`,
`on_pair`: no disk, no JSON; a full queue drops the record and counts it in
`shadowproxy_store_dropped_total`). A writer thread (`StoreWriter`) drains the queue every
`flush_interval_s` into one SQLite transaction (`database.Database`), prunes by `max_rows` and
`max_age_days`, and runs the admin API's reads and label posts after the writes queued before them,
so an answered request is visible to `GET /shadow/requests/{id}` at once.

Failure is contained: a path that cannot be opened (read-only, missing directory) or a write that
fails (full disk) is logged once, counted in `shadowproxy_store_errors_total{op}` and
`shadowproxy_store_lost_total`, and the proxy keeps serving; the writer tries to open the file again
every `REOPEN_INTERVAL_S`. `close()` (after the drain on SIGTERM) writes everything still queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from shadowproxy.config import Config
from shadowproxy.judging.intervals import newcombe_interval, wilson_interval
from shadowproxy.shadow.metrics import Metrics, StoreMetrics
from shadowproxy.shadow.observers import ExchangeRecord, PairRecord
from shadowproxy.shadow.routes import json_response, requires_token
from shadowproxy.store.database import EXCHANGE, PAIR, Database, Totals, connect, header_value

__all__ = ["AuditStore", "StoreUnavailable", "StoreWriter"]

log = logging.getLogger("shadowproxy.store.writer")

QUEUE_RECORDS = 100_000  # records waiting for the writer; beyond this new ones are dropped
QUEUE_BYTES = 64 * 1024 * 1024  # bodies waiting for the writer (they dominate a record's size)
# Records per transaction. Two costs pull against each other here:
# - The writer's Python (rows, JSON) holds the GIL, which the event loop then waits for: a whole
#   flush in one go (thousands of records under load) lands on the proxy's p99 as one stall. So
#   the writer's modules are compiled, and a flush is written in chunks of at most this many.
# - Every SQLite statement releases the GIL and re-acquires it after. Re-acquiring while the
#   loop runs is expensive: the waiting thread loses the GIL at each of the loop's many releases
#   (uvloop releases it around every poll) until the switch interval runs out, and each of those
#   releases costs the loop a futex wake, for the writer's thread and the loop alike.
# So a transaction is a handful of statements (database.Database.write), over up to 1024 records.
WRITE_CHUNK = 1024
REOPEN_INTERVAL_S = 10.0
CLOSE_TIMEOUT_S = 30.0
RECOUNT_INTERVAL_S = 10.0  # shared files only (serve --workers): see StoreWriter.shared

_T = TypeVar("_T")
_Reply = Callable[[Any, "BaseException | None"], None]


class StoreUnavailable(Exception):
    """The database is not open (a read-only path, a missing directory): reads cannot be answered."""


class StoreWriter:
    """The thread that owns the SQLite connection. The loop side only appends to `records` and
    `commands`; everything else here runs on the thread."""

    def __init__(self, config: Config, metrics: StoreMetrics, shared: bool = False) -> None:
        self.config = config
        self.metrics = metrics
        # One file for several writers (`serve --workers`): the totals are counted afresh from it
        # every RECOUNT_INTERVAL_S, since the other writers' re-judgements and pruning change them.
        self.shared = shared
        self.records: collections.deque[tuple[Any, ...]] = collections.deque()
        self.commands: collections.deque[tuple[Callable[[Database], Any], _Reply]] = collections.deque()
        self.queued_bytes = 0  # written by the loop only
        self.drained_bytes = 0  # written by the thread only: queued = queued_bytes - drained_bytes
        self.totals = Totals()  # replaced (never mutated) by the thread: the loop reads a consistent copy
        self.db: Database | None = None
        self.prune_interval_s = max(config.store.flush_interval_s, 1.0)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._failing: set[str] = set()
        self._next_open = 0.0
        self._next_prune = 0.0
        self._next_recount = 0.0
        self._writer_thread = threading.Thread(target=self._run, name="shadowproxy-store", daemon=True)

    # -- loop side -----------------------------------------------------------------------------

    def start(self) -> None:
        self._writer_thread.start()

    def wait_opened(self, timeout: float) -> bool:
        return self._opened.wait(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float) -> bool:
        """Write what is queued, close the file; False when the thread did not finish in time."""
        self._stop.set()
        self._wake.set()
        self._writer_thread.join(timeout)
        return not self._writer_thread.is_alive()

    # -- thread side ---------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.store.flush_interval_s
        try:
            self._open()
        finally:
            self._opened.set()
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._cycle()
            if stopping and not self.records and not self.commands:
                break
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error as exc:
                log.warning("audit store: closing %s: %s", self.config.store.path, exc)
            self.db = None

    def _open(self) -> None:
        self._next_open = time.monotonic() + REOPEN_INTERVAL_S
        path = self.config.store.path
        try:
            conn = connect(path)
            self.db = Database(conn, self.config.store, self.config.compare, self.metrics.count_version)
        except (sqlite3.Error, OSError) as exc:
            self._failed("open", f"cannot open {path}: {exc}; the proxy serves on without recording")
            return
        self.totals = _copy(self.db.totals)
        self._recovered("open", f"opened {path}")

    def _cycle(self) -> None:
        if self.db is None and time.monotonic() >= self._next_open:
            self._open()
        batch = self._drain()
        for start in range(0, len(batch), WRITE_CHUNK):
            self._write(batch[start : start + WRITE_CHUNK])
        self.metrics.queue.set(len(self.records))
        while self.commands:
            command, reply = self.commands.popleft()
            self._command(command, reply)
        now = time.monotonic()
        if self.db is not None and now >= self._next_prune:
            self._next_prune = now + self.prune_interval_s
            try:
                deleted = self.db.prune(time.time())
            except sqlite3.Error as exc:
                self._failed("prune", f"pruning failed: {exc}")
            else:
                self._recovered("prune", "pruning works again")
                if deleted:
                    self.totals = _copy(self.db.totals)
        if self.shared and self.db is not None and now >= self._next_recount:
            self._next_recount = now + RECOUNT_INTERVAL_S
            try:
                self.db.recount()
            except sqlite3.Error as exc:
                self._failed("read", f"counting the labels failed: {exc}")
            else:
                self.totals = _copy(self.db.totals)

    def _drain(self) -> list[tuple[Any, ...]]:
        # The loop appends a record before it adds the record's bytes to `queued_bytes`, so every
        # byte counted before this drain belongs to a record it takes (a record appended meanwhile
        # is counted at the next drain: the bound errs on the safe side, never below the truth).
        counted = self.queued_bytes
        records = self.records
        popleft = records.popleft  # looked up once, not once per record: this loop runs for every record
        batch = [popleft() for _ in range(len(records))]
        self.drained_bytes = counted
        return batch

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        if self.db is None:
            self.metrics.lost.inc(len(batch))
            for item in batch:  # the version counts do not depend on the disk
                self.metrics.count_version(*_target_version(item))
            return
        try:
            self.db.write(batch)
        except sqlite3.Error as exc:
            self.metrics.lost.inc(len(batch))
            self._failed("write", f"writing {len(batch)} records failed: {exc}")
            return
        self.metrics.written.inc(len(batch))
        self.totals = _copy(self.db.totals)
        self._recovered("write", "writes succeed again")

    def _command(self, command: Callable[[Database], Any], reply: _Reply) -> None:
        if self.db is None:
            reply(None, StoreUnavailable(f"the store at {self.config.store.path} is not open"))
            return
        try:
            result = command(self.db)
        except sqlite3.Error as exc:
            self._failed("read", f"a query failed: {exc}")
            reply(None, StoreUnavailable(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must reach the caller, not end the thread
            reply(None, exc)
            return
        self.totals = _copy(self.db.totals)
        reply(result, None)

    def _failed(self, op: str, message: str) -> None:
        self.metrics.errors_by_op[op].inc()
        if op not in self._failing:  # once per outage, not once per batch
            self._failing.add(op)
            log.error("audit store: %s", message)

    def _recovered(self, op: str, message: str) -> None:
        if op in self._failing:
            self._failing.discard(op)
            log.warning("audit store: %s", message)


def _copy(totals: Totals) -> Totals:
    return Totals(totals.labeled, totals.production_correct, totals.candidate_labeled,
                  totals.candidate_correct, totals.production_correct_paired)


def _target_version(item: tuple[Any, ...]) -> tuple[str, str | None]:
    """A queued record's target and the version its answer's header named (see database.EXCHANGE)."""
    if item[0] == EXCHANGE:
        return "production", item[6]
    return "candidate", item[5]


class AuditStore:
    """The `[store]` component: an `Observer` with a lifecycle, admin routes and a stats block."""

    def __init__(self, config: Config, metrics: Metrics, shared: bool = False) -> None:
        self.config = config
        store = config.store
        self.metrics = StoreMetrics(metrics.registry)
        self.writer = StoreWriter(config, self.metrics, shared)
        # deque.append bound once: a deque method called by name is looked up on the type at each
        # call from compiled code, once a request (the writer's drain does the same for popleft)
        self._queue = self.writer.records.append
        self.max_records = QUEUE_RECORDS  # attributes, not the module's names, on the hot path: a
        self.max_bytes = QUEUE_BYTES  # global costs a dict lookup in compiled code
        self.sample_rate = store.sample_rate
        self._random = random.random
        self._keep_response = store.store_bodies or bool(store.version_path)
        self._keep_request = store.store_bodies
        self._version_header = store.version_header.lower().encode("latin-1")
        self._keep_candidate = store.store_bodies or bool(store.version_path)

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
        # Production's predictions are kept for the sampled share (parsed on the writer thread);
        # a mirrored request gets them from its pair.
        keep_response = (wanted and not record.mirrored) or self._keep_response
        response = record.response_body if keep_response else None
        request = record.request_body if self._keep_request else None
        size = (len(response) if response else 0) + (len(request) if request else 0)
        if self._full(size):
            return
        # The version header is read here, not on the writer thread: a queued record of plain
        # values is cheap for the garbage collector to walk, one holding the header list is not.
        header = self._version_header
        writer = self.writer
        self._queue((
            EXCHANGE, record.request_id, record.time, record.method, record.path, record.status,
            header_value(record.response_headers, header) if header else None, record.latency_s,
            record.mirrored, wanted, request, response,
        ))
        writer.queued_bytes += size  # after the append (see StoreWriter._drain)

    def on_pair(self, record: PairRecord) -> None:
        body = record.candidate_body if self._keep_candidate else None
        size = len(body) if body else 0
        if self._full(size):
            return
        header = self._version_header
        writer = self.writer
        self._queue((
            PAIR, record.request_id, time.time(), record.outcome, record.candidate_status,
            header_value(record.candidate_headers, header) if header else None, body,
            record.candidate_latency_s, record.production_predictions, record.candidate_predictions,
        ))
        writer.queued_bytes += size  # after the append (see StoreWriter._drain)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer; it opens the file off the loop. A file that cannot be opened is
        reported (logged, counted) and the proxy starts anyway."""
        self.writer.start()
        await asyncio.to_thread(self.writer.wait_opened, 10.0)

    async def close(self) -> None:
        """Write everything queued (SIGTERM loses nothing) and close the file."""
        if not await asyncio.to_thread(self.writer.stop, CLOSE_TIMEOUT_S):
            log.error("audit store: the writer did not finish within %.0f s", CLOSE_TIMEOUT_S)

    async def call(self, command: Callable[[Database], _T]) -> _T:
        """Run `command` on the writer thread after the records queued so far are written."""
        if self.writer.stopping:
            raise StoreUnavailable("the store is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def reply(result: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, result, error)

        self.writer.commands.append((command, reply))
        self.writer.wake()
        return await future

    # -- public face -----------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/shadow/requests/{request_id}", requires_token(self.get_request)),
            web.post("/shadow/labels", requires_token(self.post_labels)),
        ]

    async def get_request(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        try:
            record = await self.call(lambda db: db.read(request_id))
        except StoreUnavailable as exc:
            return json_response({"error": f"audit store unavailable: {exc}"}, 503)
        if record is None:
            return json_response({"error": f"no request {request_id!r} in the audit store"}, 404)
        return json_response(record)

    async def post_labels(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            status, answer = await self.call(lambda db: db.post_labels(body))
        except StoreUnavailable as exc:
            return json_response({"error": f"audit store unavailable: {exc}"}, 503)
        return json_response(answer, status)

    def stats_blocks(self) -> dict[str, Any]:
        return {"ground_truth": ground_truth(self.writer.totals)}


def ground_truth(t: Totals) -> dict[str, Any]:
    """The `/shadow/stats` `ground_truth` block (0.0 and [0, 1] while nothing is labelled)."""
    prod = t.production_correct / t.labeled if t.labeled else 0.0
    cand = t.candidate_correct / t.candidate_labeled if t.candidate_labeled else 0.0
    paired_prod = t.production_correct_paired / t.candidate_labeled if t.candidate_labeled else 0.0
    return {
        "labeled": t.labeled,
        "production_correct": t.production_correct,
        "production_accuracy": prod,
        "production_accuracy_ci95": list(wilson_interval(t.production_correct, t.labeled)),
        "candidate_labeled": t.candidate_labeled,
        "candidate_correct": t.candidate_correct,
        "candidate_accuracy": cand,
        "candidate_accuracy_ci95": list(wilson_interval(t.candidate_correct, t.candidate_labeled)),
        "production_accuracy_paired": paired_prod,
        "accuracy_delta": cand - paired_prod,
        # Newcombe's interval treats the two accuracies as independent proportions. On the same
        # labelled set they are usually positively correlated, which makes it wider than a paired
        # interval would be (that one needs the discordant counts, which the totals do not keep).
        "accuracy_delta_ci95": list(newcombe_interval(
            t.candidate_correct, t.candidate_labeled, t.production_correct_paired, t.candidate_labeled
        )),
    }
