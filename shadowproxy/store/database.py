"""The disk side of the audit store: SQLite schema, migrations, batched writes, retention, labels.

Everything here runs on the store's writer thread (`writer.StoreWriter`), never on the event loop
(reading a record is `records.read_request`, shared with the `audit` command). Requests are written
a batch per row (`batches`, found through `batch_keys`; see `Database._write_batch`), or with
`store_bodies` a row each (`requests`, schema 1's table). Delayed ground-truth labels are keyed by
(request_id, index) (`labels`), and per-version counts kept as traffic is written (`versions`, so
`audit --versions` stays cheap after retention pruned the requests).

Ground truth is kept as running totals (`Totals`), computed once when the file is opened and then
adjusted by every label upsert, every re-judged label and every pruned row, so `/shadow/stats`
never runs an aggregate query.
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from shadowproxy.config import CompareConfig, StoreConfig
from shadowproxy.judging.compare import canonical_label, compare_predictions
from shadowproxy.judging.presets import PresetError, extract_predictions, parse_pointer, redact, resolve_pointer
from shadowproxy.store.records import (
    E_ID,
    E_KIND,
    E_TIME,
    KIND_BOTH,
    KIND_EXCHANGE,
    KIND_PAIR,
    SLOT_DIGITS,
    Entries,
    lookup_key,
    read_request,
    request_columns,
)

__all__ = [
    "EXCHANGE",
    "MIGRATIONS",
    "PAIR",
    "Database",
    "Totals",
    "connect",
    "migrate",
    "redact",
]

log = logging.getLogger("shadowproxy.store.writer")

# Queued records. `version` is what the answer's version header said (None: no such header, or
# none configured); the JSON pointer, when configured, is read here from the body.
EXCHANGE: Final = 0  # (EXCHANGE, request_id, time, method, path, status, version, latency_s, mirrored,
#                wanted, request_body, response_body)
PAIR: Final = 1  # (PAIR, request_id, time, outcome, candidate_status, version, candidate_body,
#            latency_s, production_predictions, candidate_predictions)

_Versions = dict[str | None, list[float]]  # version -> [first seen, last seen, answers]

MAX_LABEL_ERRORS = 1000  # per POST /shadow/labels answer; the counts stay exact beyond it
MAX_VERSION_CHARS = 200

# Each migration is a list of statements, run in one transaction with its version number. Never edit
# a released migration: append a new one.
MIGRATIONS: list[list[str]] = [
    [  # 1: first release
        """CREATE TABLE requests (
            request_id TEXT PRIMARY KEY,
            time REAL,
            method TEXT,
            path TEXT,
            status INTEGER,
            production_version TEXT,
            production_latency_ms REAL,
            mirrored INTEGER NOT NULL DEFAULT 0,
            outcome TEXT,
            candidate_status INTEGER,
            candidate_version TEXT,
            candidate_latency_ms REAL,
            production_predictions BLOB,
            candidate_predictions BLOB,
            request_body BLOB,
            response_body BLOB,
            candidate_body BLOB
        )""",
        "CREATE INDEX requests_time ON requests(time)",
        """CREATE TABLE labels (
            request_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            label BLOB NOT NULL,
            time REAL NOT NULL,
            production_correct INTEGER,
            candidate_correct INTEGER,
            PRIMARY KEY (request_id, idx)
        ) WITHOUT ROWID""",
        """CREATE TABLE versions (
            target TEXT NOT NULL,
            version TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            requests INTEGER NOT NULL,
            PRIMARY KEY (target, version)
        ) WITHOUT ROWID""",
    ],
    [  # 2: requests written in batches, one row per batch (see Database._write_batch)
        """CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            first_time REAL NOT NULL,
            last_time REAL NOT NULL,
            records INTEGER NOT NULL,
            keys TEXT NOT NULL,
            versions TEXT NOT NULL,
            entries TEXT NOT NULL
        )""",
        """CREATE TABLE batch_keys (
            key TEXT NOT NULL,
            batch INTEGER NOT NULL,
            PRIMARY KEY (key, batch)
        ) WITHOUT ROWID""",
        # The requests in all batches, kept by the triggers below: exact for max_rows under `serve
        # --workers` too, where every worker's writer adds and prunes batches (one row).
        "CREATE TABLE batch_totals (records INTEGER NOT NULL)",
        "INSERT INTO batch_totals (records) VALUES (0)",
        # A batch is written by one INSERT: its lookup keys and its version counts ([target,
        # version, first seen, last seen, requests] each) go in with it, by these triggers. Every
        # statement the writer runs hands the GIL to the event loop and back (see
        # Database._write_batch).
        """CREATE TRIGGER batch_written AFTER INSERT ON batches BEGIN
            UPDATE batch_totals SET records = records + NEW.records;
            INSERT OR IGNORE INTO batch_keys (key, batch) SELECT value, NEW.id FROM json_each(NEW.keys);
            INSERT INTO versions (target, version, first_seen, last_seen, requests)
                SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
                       json_extract(value, '$[3]'), json_extract(value, '$[4]')
                FROM json_each(NEW.versions) WHERE true
                ON CONFLICT (target, version) DO UPDATE SET
                    first_seen = min(first_seen, excluded.first_seen),
                    last_seen = max(last_seen, excluded.last_seen),
                    requests = requests + excluded.requests;
        END""",
        """CREATE TRIGGER batch_trimmed AFTER UPDATE OF records ON batches BEGIN
            UPDATE batch_totals SET records = records - OLD.records + NEW.records;
        END""",
        """CREATE TRIGGER batch_deleted AFTER DELETE ON batches BEGIN
            UPDATE batch_totals SET records = records - OLD.records;
            DELETE FROM batch_keys WHERE key IN (SELECT value FROM json_each(OLD.keys)) AND batch = OLD.id;
        END""",
        # For people reading the file with sqlite3: one row per entry, in schema 1's columns
        # (slow: it parses the batches; see records.KIND_EXCHANGE for the layouts).
        """CREATE VIEW batch_entries AS
        SELECT batch, position,
            json_extract(v, '$[1]') AS request_id,
            CASE k WHEN 0 THEN 'exchange' WHEN 1 THEN 'pair' WHEN 2 THEN 'both' END AS kind,
            json_extract(v, '$[2]') AS time,
            CASE WHEN k != 1 THEN json_extract(v, '$[3]') END AS method,
            CASE WHEN k != 1 THEN json_extract(v, '$[4]') END AS path,
            CASE WHEN k != 1 THEN json_extract(v, '$[5]') END AS status,
            CASE WHEN k != 1 THEN json_extract(v, '$[6]') END AS production_version,
            CASE WHEN k != 1 THEN json_extract(v, '$[7]') * 1000.0 END AS production_latency_ms,
            CASE WHEN k != 1 THEN json_extract(v, '$[8]') ELSE 1 END AS mirrored,
            CASE k WHEN 1 THEN json_extract(v, '$[8]') ELSE json_extract(v, '$[11]') END AS production_predictions,
            CASE k WHEN 1 THEN json_extract(v, '$[3]') WHEN 2 THEN json_extract(v, '$[12]') END AS outcome,
            CASE k WHEN 1 THEN json_extract(v, '$[4]') WHEN 2 THEN json_extract(v, '$[13]') END AS candidate_status,
            CASE k WHEN 1 THEN json_extract(v, '$[5]') WHEN 2 THEN json_extract(v, '$[14]') END AS candidate_version,
            CASE k WHEN 1 THEN json_extract(v, '$[7]') * 1000.0
                   WHEN 2 THEN json_extract(v, '$[15]') * 1000.0 END AS candidate_latency_ms,
            CASE k WHEN 1 THEN json_extract(v, '$[9]') WHEN 2 THEN json_extract(v, '$[16]') END AS candidate_predictions
        FROM (SELECT b.id AS batch, e.key AS position, e.value AS v, json_extract(e.value, '$[0]') AS k
              FROM batches AS b, json_each(b.entries) AS e)""",
    ],
]

_CANDIDATE_COLUMNS = (
    "outcome", "candidate_status", "candidate_version", "candidate_latency_ms", "candidate_predictions",
    "candidate_body",
)
# A request id seen twice: the latest record wins, so a new exchange clears the candidate's side,
# unless the row was created by its own pair arriving first (time still NULL).
_UPSERT_EXCHANGE = f"""
INSERT INTO requests (request_id, time, method, path, status, production_version, production_latency_ms,
                      mirrored, production_predictions, request_body, response_body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO UPDATE SET
    time = excluded.time, method = excluded.method, path = excluded.path, status = excluded.status,
    production_version = excluded.production_version,
    production_latency_ms = excluded.production_latency_ms, mirrored = excluded.mirrored,
    production_predictions = CASE WHEN requests.time IS NULL
        THEN coalesce(requests.production_predictions, excluded.production_predictions)
        ELSE excluded.production_predictions END,
    request_body = excluded.request_body, response_body = excluded.response_body,
    {", ".join(f"{c} = CASE WHEN requests.time IS NULL THEN requests.{c} END" for c in _CANDIDATE_COLUMNS)}
"""
_UPSERT_PAIR = """
INSERT INTO requests (request_id, mirrored, outcome, candidate_status, candidate_version, candidate_latency_ms,
                      production_predictions, candidate_predictions, candidate_body)
VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO UPDATE SET
    mirrored = 1, outcome = excluded.outcome, candidate_status = excluded.candidate_status,
    candidate_version = excluded.candidate_version, candidate_latency_ms = excluded.candidate_latency_ms,
    production_predictions = coalesce(excluded.production_predictions, requests.production_predictions),
    candidate_predictions = excluded.candidate_predictions, candidate_body = excluded.candidate_body
"""


# Rows per statement: powers of two up to 1024 (11 parameters a row stays far below SQLite's
# 32766). A batch goes out as full 1024-row statements, then one statement per bit of what is
# left (at most 10, about 5 on average), so there are only 11 sizes per upsert. The sizes have to
# be few: a prepared statement of a thousand rows holds a lot of memory, and preparing one costs
# a large share of running it, so they are kept, all of them, in the statement cache.
_MAX_ROWS = 1024
STATEMENT_CACHE = 64  # 3 upserts x 11 sizes, and the handful of fixed statements


@functools.cache
def _values_sql(upsert: str, rows: int) -> str:
    """The same upsert for `rows` rows in one statement (a multi-row VALUES list). The sqlite3
    module releases the GIL around every step, so executemany's step per row would make the
    writer thread and the event loop hand the GIL back and forth thousands of times per flush,
    which the proxy's p99 shows; one statement per chunk is one step. Binding the rows as
    parameters is also cheaper than one statement reading a JSON array of rows through
    `json_each`, and bodies bind as they are."""
    head, _, tail = upsert.partition("VALUES (")
    values, _, conflict = tail.partition(")\nON CONFLICT")
    one = f"({values})"
    return f"{head}VALUES {', '.join([one] * rows)}\nON CONFLICT{conflict}"


_UPSERT_VERSION = """
INSERT INTO versions (target, version, first_seen, last_seen, requests) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (target, version) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen),
    requests = requests + excluded.requests
"""
_UPSERT_LABEL = """
INSERT INTO labels (request_id, idx, label, time, production_correct, candidate_correct)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id, idx) DO UPDATE SET
    label = excluded.label, time = excluded.time, production_correct = excluded.production_correct,
    candidate_correct = excluded.candidate_correct
"""
# The ground-truth totals over a set of label rows (the whole table, or the rows about to be pruned).
_TOTALS = """
SELECT count(production_correct),
       coalesce(sum(production_correct), 0),
       coalesce(sum(production_correct IS NOT NULL AND candidate_correct IS NOT NULL), 0),
       coalesce(sum(CASE WHEN production_correct IS NOT NULL THEN candidate_correct END), 0),
       coalesce(sum(CASE WHEN candidate_correct IS NOT NULL THEN production_correct END), 0)
FROM labels
"""


@dataclass(slots=True)
class Totals:
    """Running ground-truth counts; see docs/admin-api.md, `ground_truth`."""

    labeled: int = 0  # labelled predictions with a production prediction
    production_correct: int = 0
    candidate_labeled: int = 0  # ... that also have a candidate prediction
    candidate_correct: int = 0
    production_correct_paired: int = 0  # production correct on the candidate_labeled set

    def add(self, production: int | None, candidate: int | None, sign: int = 1) -> None:
        """Count (or with sign -1, uncount) one label row by its correctness columns."""
        if production is None:
            return
        self.labeled += sign
        self.production_correct += sign * production
        if candidate is not None:
            self.candidate_labeled += sign
            self.candidate_correct += sign * candidate
            self.production_correct_paired += sign * production

    def merge(self, other: Totals, sign: int = 1) -> None:
        self.labeled += sign * other.labeled
        self.production_correct += sign * other.production_correct
        self.candidate_labeled += sign * other.candidate_labeled
        self.candidate_correct += sign * other.candidate_correct
        self.production_correct_paired += sign * other.production_correct_paired


def _totals(row: Sequence[Any]) -> Totals:
    return Totals(*(int(v) for v in row))


# ---------------------------------------------------------------------------------------------------
# Helpers on bodies and headers


_NOT_JSON = object()


def _loads(body: bytes | None) -> object:
    if body is None:
        return _NOT_JSON
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _upsert(conn: sqlite3.Connection, upsert: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """All `rows` in a few statements of the sizes `_MAX_ROWS` allows (see `_values_sql`).
    Every statement is a GIL release and re-acquisition for the writer thread, and re-acquiring
    while the event loop runs is what costs (see writer.WRITE_CHUNK)."""
    start, n = 0, len(rows)
    size = _MAX_ROWS
    while start < n:
        if n - start >= size:
            conn.execute(_values_sql(upsert, size), [v for row in rows[start:start + size] for v in row])
            start += size
        else:
            size //= 2


def _merge_pairs(entries: list[tuple[Any, ...]], pairs: list[tuple[Any, ...]], mirrored: dict[str, int],
                 paired: dict[str, int]) -> list[tuple[Any, ...]]:
    """Fold each pair into its mirrored exchange's entry when both are in this batch (one entry
    instead of two, and a read finds the whole request at once); returns the pairs left over. An
    id with several mirrored exchanges or pairs in the batch is left as it is: the reader applies
    entries in order (records.fold), exchanges first, as schema 1's upserts do within a batch."""
    left: list[tuple[Any, ...]] = []
    for p in pairs:
        rid = p[1]
        i = mirrored.get(rid, -1)
        if i < 0 or paired[rid] > 1:
            left.append(p)
            continue
        e = entries[i]
        entries[i] = (KIND_BOTH, rid, e[2], e[3], e[4], e[5], e[6], e[7], True, e[9], None,
                      p[8] if p[8] is not None else e[11], p[3], p[4], p[5], p[7], p[9])
    return left


def _tally(versions: _Versions, version: str | None, when: float) -> None:
    seen = versions.get(version)
    if seen is None:
        versions[version] = [when, when, 1.0]
        return
    if when < seen[0]:
        seen[0] = when
    elif when > seen[1]:
        seen[1] = when
    seen[2] += 1.0


def _dump_entries(entries: Sequence[Sequence[Any]]) -> str:
    try:
        return orjson.dumps(entries).decode()
    except TypeError:  # a prediction orjson cannot write (an integer beyond 64 bits): as its repr
        return orjson.dumps([_writable(e) for e in entries]).decode()


def _writable(entry: Sequence[Any]) -> list[Any]:
    out = list(entry)
    for k, value in enumerate(out):
        try:
            orjson.dumps(value)
        except TypeError:
            out[k] = repr(value)
    return out


def _dumps(value: object) -> bytes | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits
        return orjson.dumps(repr(value))


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes), decoded, or None."""
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value.decode("latin-1").strip()[:MAX_VERSION_CHARS] or None
    return None


def _pointer_version(doc: object, tokens: tuple[str, ...]) -> str | None:
    if doc is _NOT_JSON:
        return None
    try:
        value = resolve_pointer(doc, tokens)
    except PresetError:
        return None
    if isinstance(value, str):
        return value[:MAX_VERSION_CHARS] or None
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode()
    return None


# ---------------------------------------------------------------------------------------------------
# The writer's connection


PAGE_SIZE = 16384
_NO_ID = 1 << 62
_INSERT_BATCH = ("INSERT INTO batches (first_time, last_time, records, keys, versions, entries) "
                 "VALUES (?, ?, ?, ?, ?, ?)")
_INSERT_BATCH_PROBING = f"{_INSERT_BATCH} RETURNING EXISTS (SELECT 1 FROM labels)"
# The newest of the oldest batches whose requests add up to at most `excess` (the second
# parameter), and that sum, looking at the oldest _PRUNE_SCAN batches (one statement: one step).
_PRUNE_SCAN = 4096
_WHOLE_BATCHES = """
SELECT id, total FROM (
    SELECT id, sum(records) OVER (ORDER BY id) AS total
    FROM (SELECT id, records FROM batches ORDER BY id LIMIT ?)
) WHERE total <= ? ORDER BY id DESC LIMIT 1
"""


def connect(path: str, attempts: int = 50) -> sqlite3.Connection:
    """Open (creating) the store for writing: WAL, synchronous=NORMAL, schema migrated.

    Workers of `serve --workers N` open one new file at the same moment; some of the steps (the
    switch to WAL) answer "database is locked" without waiting for the busy timeout, so a locked
    open is tried again, every 0.1 s up to `attempts` times (this runs on the writer thread)."""
    for _ in range(attempts - 1):
        try:
            return _connect(path)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.1)
    return _connect(path)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=STATEMENT_CACHE)
    try:
        # WAL: readers (the audit command) never block the writer. synchronous=NORMAL in WAL mode
        # keeps the file consistent after a crash and loses at most the last commits on power loss
        # (https://www.sqlite.org/pragma.html#pragma_synchronous).
        conn.execute("PRAGMA busy_timeout=5000")  # several workers may share one file (first: WAL needs a lock)
        # A new file only (an existing one keeps its size): a flushed batch spans many pages, and
        # writing it costs per page (a WAL frame, then the checkpoint's copy), so pages larger than
        # SQLite's default mean fewer frames and copies for the same batch.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Refuses a store from a newer release.

    One IMMEDIATE transaction from reading the version to the last migration: workers of
    `serve --workers N` open the same new file at once, and the second must wait and then find
    the schema in place (reading the version outside the lock let both create the tables)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
        if current > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"store schema version {current} is newer than this shadowproxy knows ({len(MIGRATIONS)})"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)


class Database:
    """The writer thread's handle: turns queued records into rows, prunes, matches labels."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        store: StoreConfig,
        compare: CompareConfig,
        count_version: Callable[[str, str | None, int], None] = lambda target, version, n: None,
    ) -> None:
        self.conn = conn
        self.store = store
        self.compare = compare
        self.count_version = count_version
        self.version_tokens = parse_pointer(store.version_path) if store.version_path else None
        self.redactions = [parse_pointer(p) for p in store.redact]
        self.totals = _totals(conn.execute(_TOTALS).fetchone())
        # Whether any label was ever stored: until one is, a written batch has nothing to re-judge,
        # and a one-row probe of the labels table stands in for the re-judging query (which sends
        # every request id of the batch). The probe runs for each batch while the answer is no (in
        # the batch's INSERT, RETURNING): under `serve --workers`, labels arrive through another
        # worker's writer. Labels are never all deleted but by retention, after which the
        # re-judging query just finds none.
        self.has_labels = self._any_label()
        # Records go to `batches` (one row and a few `batch_keys` per written batch: the B-tree
        # inserts per request are what the store cost), but with bodies to `requests`, a row each
        # (bodies are bytes, and big enough that a row costs little beside them).
        self.batched = not store.store_bodies

    @property
    def batch_records(self) -> int:
        """The client requests in `batches` (all writers'), for max_rows."""
        return int(self.conn.execute("SELECT records FROM batch_totals").fetchone()[0])

    def _any_label(self) -> bool:
        return self.conn.execute("SELECT 1 FROM labels LIMIT 1").fetchone() is not None

    def recount(self) -> None:
        """The ground-truth totals counted afresh from the file. Under `serve --workers` every
        worker writes it, and one worker's running totals miss the others' re-judgements and
        pruning (a scan of the labels table: run now and then, not per batch)."""
        self.totals = _totals(self.conn.execute(_TOTALS).fetchone())

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()

    # -- writes --------------------------------------------------------------------------------

    def write(self, items: Sequence[tuple[Any, ...]]) -> None:
        """One transaction for a batch of queued records; raises sqlite3.Error (rolled back)."""
        if self.batched:
            self._write_batch(items)
        else:
            self._write_rows(items)

    def _write_batch(self, items: Sequence[tuple[Any, ...]]) -> None:
        """The records as one `batches` row: a JSON list of entries (records.KIND_EXCHANGE has the
        layouts), its lookup keys and version counts (triggers put them in `batch_keys` and
        `versions`). One INSERT whatever the batch's size, until labels exist (then re-judging
        joins it in a transaction). A `requests` row per request, with its id and time indexes,
        would cost index updates for every request, and every statement is a GIL round trip with
        the event loop. A record without bodies (most) is written as it was queued: only sampled
        requests and versions read from bodies cost a new tuple, and a mirrored request's two
        records one."""
        if not items:
            return
        production: _Versions = {}
        candidate: _Versions = {}
        entries: list[tuple[Any, ...]] = []
        pairs: list[tuple[Any, ...]] = []
        mirrored: dict[str, int] = {}  # request id -> its mirrored exchange's position, -1: several
        paired: dict[str, int] = {}  # request id -> pairs in this batch
        keys: set[str] = set()
        slot = ""  # the last id's lookup key when it was a slot: most ids that follow share it
        first = last = items[0][2]
        for item in items:
            rid: str = item[1]
            when: float = item[2]
            if when < first:
                first = when
            elif when > last:
                last = when
            if not (slot and len(rid) == 32 and rid.startswith(slot)):
                key = lookup_key(rid)
                keys.add(key)
                slot = key if len(key) == SLOT_DIGITS else ""
            if item[0] == EXCHANGE:
                if item[11] is not None or item[10] is not None:
                    item = self._exchange_entry(item)
                _tally(production, item[6], when)
                if item[8]:
                    mirrored[rid] = -1 if rid in mirrored else len(entries)
                entries.append(item)
            else:
                if item[6] is not None:
                    item = self._pair_entry(item)
                if item[4]:  # a candidate that answered
                    _tally(candidate, item[5], when)
                paired[rid] = paired.get(rid, 0) + 1
                pairs.append(item)
        records = len(entries)
        if pairs:
            entries.extend(_merge_pairs(entries, pairs, mirrored, paired))
        named = self._count_versions(production, candidate)
        row = (first, last, records, orjson.dumps(sorted(keys)).decode(), orjson.dumps(named).decode(),
               _dump_entries(entries))
        conn = self.conn
        inserted = False
        if not self.has_labels:
            # The usual case until labels come: one statement, its own transaction, which also
            # says whether labels exist now (another worker's writer may have stored some).
            self.has_labels = inserted = bool(conn.execute(_INSERT_BATCH_PROBING, row).fetchone()[0])
            if not self.has_labels:
                return
        delta = Totals()
        conn.execute("BEGIN")
        try:
            if not inserted:
                conn.execute(_INSERT_BATCH, row)
            self._rejudge([e[E_ID] for e in entries], delta)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(delta)

    def _exchange_entry(self, item: tuple[Any, ...]) -> tuple[Any, ...]:
        """A queued exchange with bodies as its entry: the version read from the body when the
        header named none, production's predictions for a sampled request, no bodies."""
        _, rid, when, method, path, status, version, latency_s, mirrored, wanted, _, resp_body = item
        version, doc = self._version(version, resp_body)
        predictions = None
        if wanted and not mirrored and resp_body is not None and 200 <= status < 300:
            # Mirrored requests get production's predictions from their pair (parsed once, there).
            predictions = self._predictions(resp_body if doc is None else doc)
        return (KIND_EXCHANGE, rid, when, method, path, status, version, latency_s, mirrored, wanted, None,
                predictions)

    def _pair_entry(self, item: tuple[Any, ...]) -> tuple[Any, ...]:
        """A queued pair with the candidate's body as its entry: the version read from the body
        when the header named none, no body."""
        _, rid, when, outcome, status, version, body, latency_s, prod_preds, cand_preds = item
        version = self._version(version, body)[0] if status else None
        return (KIND_PAIR, rid, when, outcome, status, version, None, latency_s, prod_preds, cand_preds)

    def _write_rows(self, items: Sequence[tuple[Any, ...]]) -> None:
        """The records as `requests` rows (with `store_bodies`): an upsert per record."""
        exchanges: list[tuple[Any, ...]] = []
        pairs: list[tuple[Any, ...]] = []
        production: _Versions = {}
        candidate: _Versions = {}
        for item in items:
            if item[0] == EXCHANGE:
                exchanges.append(self._exchange_row(item, production))
            else:
                pairs.append(self._pair_row(item, candidate))
        named = self._count_versions(production, candidate)
        conn = self.conn
        delta = Totals()
        conn.execute("BEGIN")
        try:
            if exchanges:
                _upsert(conn, _UPSERT_EXCHANGE, exchanges)
            if pairs:
                _upsert(conn, _UPSERT_PAIR, pairs)
            if named:
                _upsert(conn, _UPSERT_VERSION, named)
            self._rejudge([row[0] for row in exchanges] + [row[0] for row in pairs], delta)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(delta)

    def _count_versions(self, production: _Versions, candidate: _Versions) -> list[tuple[str, str, float, float, int]]:
        """Count a batch's answers per target and version in the metric (once per version and
        batch, not per record); returns the named ones as `versions` rows."""
        named = []
        for target, tally in (("production", production), ("candidate", candidate)):
            for version, (first, last, n) in tally.items():
                self.count_version(target, version, int(n))
                if version is not None:
                    named.append((target, version, first, last, int(n)))
        return named

    def _version(self, version: str | None, body: bytes | None) -> tuple[str | None, object]:
        """The answer's model version: its header's, else the JSON pointer's (None: the answer
        names none); and the body parsed, when that took parsing it (else None)."""
        if version is None and self.version_tokens is not None and body is not None:
            doc = _loads(body)
            return _pointer_version(doc, self.version_tokens), doc
        return version, None

    def _exchange_row(self, item: tuple[Any, ...], production: _Versions) -> tuple[Any, ...]:
        """A queued exchange as a `requests` row: its entry's version and predictions, and its
        bodies (redacted)."""
        entry = self._exchange_entry(item)
        _, rid, when, method, path, status, version, latency_s, mirrored, _, _, predictions = entry
        _tally(production, version, when)
        req_body, resp_body = redact(item[10], self.redactions), redact(item[11], self.redactions)
        latency_ms = latency_s * 1000.0 if latency_s is not None else None
        return (rid, when, method, path, status, version, latency_ms, int(mirrored), _dumps(predictions),
                req_body, resp_body)

    def _pair_row(self, item: tuple[Any, ...], candidate: _Versions) -> tuple[Any, ...]:
        """A queued pair as a `requests` row: its entry's version, and its body (redacted)."""
        _, rid, when, outcome, status, version, _, latency_s, prod_preds, cand_preds = self._pair_entry(item)
        if status:
            _tally(candidate, version, when)
        body = redact(item[6], self.redactions)
        latency_ms = latency_s * 1000.0 if latency_s is not None else None
        return (rid, outcome, status, version, latency_ms, _dumps(prod_preds), _dumps(cand_preds), body)

    def _predictions(self, body: bytes | object) -> object:
        doc = _loads(body) if isinstance(body, bytes) else body
        if doc is _NOT_JSON:
            return None
        cfg = self.compare
        try:
            return extract_predictions(doc, cfg.preset, cfg.path, cfg.output)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return None

    # -- labels --------------------------------------------------------------------------------

    def judge(self, prediction: object, label: object) -> int:
        """1 when `prediction` is right about `label`, else 0."""
        cfg = self.compare
        if cfg.kind == "label":
            return int(canonical_label(prediction) == canonical_label(label))
        try:
            result = compare_predictions(cfg.kind, [prediction], [label], cfg.abs_tol, cfg.rel_tol)
        except (ValueError, TypeError):
            return 0
        return int(bool(result.flags and result.flags[0]))

    def _stored_predictions(self, request_id: str, entries: Entries,
                            ) -> tuple[list[object] | None, list[object] | None] | None:
        columns = request_columns(self.conn, request_id, entries)
        if columns is None:
            return None
        prod, cand = columns["production_predictions"], columns["candidate_predictions"]
        return (prod if isinstance(prod, list) else None, cand if isinstance(cand, list) else None)

    def _correctness(self, preds: tuple[list[object] | None, list[object] | None] | None, index: int,
                     label: object) -> tuple[int | None, int | None]:
        if preds is None:
            return None, None
        prod, cand = preds
        pc = self.judge(prod[index], label) if prod is not None and index < len(prod) else None
        cc = self.judge(cand[index], label) if cand is not None and index < len(cand) else None
        return pc, cc

    def _rejudge(self, request_ids: list[str], delta: Totals) -> None:
        """Labels that arrived before (part of) their request's predictions: judge them again."""
        if not request_ids:
            return
        if not self.has_labels:
            self.has_labels = self._any_label()
            if not self.has_labels:
                return
        rows = self.conn.execute(
            "SELECT request_id, idx, label, production_correct, candidate_correct FROM labels "
            "WHERE request_id IN (SELECT value FROM json_each(?))",
            (orjson.dumps(sorted(set(request_ids))),),
        ).fetchall()
        cache: dict[str, Any] = {}
        entries = Entries(self.conn)
        for rid, idx, label, old_pc, old_cc in rows:
            if rid not in cache:
                cache[rid] = self._stored_predictions(rid, entries)
            pc, cc = self._correctness(cache[rid], idx, orjson.loads(label))
            if (pc, cc) != (old_pc, old_cc):
                self.conn.execute(
                    "UPDATE labels SET production_correct = ?, candidate_correct = ? WHERE request_id = ? AND idx = ?",
                    (pc, cc, rid, idx),
                )
                delta.add(old_pc, old_cc, -1)
                delta.add(pc, cc)

    def post_labels(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """`POST /shadow/labels`: (HTTP status, answer). One bad item never fails the batch."""
        usage = 'body must be a JSON list of {"request_id": "...", "index": 0, "label": ...}'
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, {"error": usage}
        if not isinstance(items, list):
            return 400, {"error": usage}
        matched = unmatched = invalid = 0
        errors: list[dict[str, Any]] = []
        cache: dict[str, Any] = {}
        entries = Entries(self.conn)
        delta = Totals()
        now = time.time()
        conn = self.conn
        conn.execute("BEGIN")
        try:
            for i, item in enumerate(items):
                problem = _label_problem(item)
                if problem:
                    invalid += 1
                    if len(errors) < MAX_LABEL_ERRORS:
                        errors.append({"item": i, "error": problem})
                    continue
                rid, index, label = item["request_id"], item["index"], item["label"]
                if rid not in cache:
                    cache[rid] = self._stored_predictions(rid, entries)
                preds = cache[rid]
                has_prediction = preds is not None and any(p is not None and index < len(p) for p in preds)
                if not has_prediction:
                    unmatched += 1
                    if len(errors) < MAX_LABEL_ERRORS:
                        why = "unknown request_id" if preds is None else f"no stored prediction at index {index}"
                        errors.append({"item": i, "error": why})
                    continue
                pc, cc = self._correctness(preds, index, label)
                old = conn.execute(
                    "SELECT production_correct, candidate_correct FROM labels WHERE request_id = ? AND idx = ?",
                    (rid, index),
                ).fetchone()
                if old is not None:
                    delta.add(old[0], old[1], -1)  # a label sent again: the latest one counts
                conn.execute(_UPSERT_LABEL, (rid, index, orjson.dumps(label), now, pc, cc))
                self.has_labels = True
                delta.add(pc, cc)
                matched += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(delta)
        return 200, {"matched": matched, "unmatched": unmatched, "invalid": invalid, "errors": errors}

    # -- retention -----------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Delete requests beyond `max_rows` (oldest first) and older than `max_age_days`; their
        labels go with them. One transaction; cheap when there is nothing to do (a few index
        lookups). Returns how many requests went."""
        if not self.has_labels:
            self.has_labels = self._any_label()  # labels may come through another worker's writer
        conn = self.conn
        gone = Totals()
        conn.execute("BEGIN")
        try:
            deleted = self._prune(now, gone)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(gone, -1)
        return deleted

    def _prune(self, now: float, gone: Totals) -> int:
        conn = self.conn
        deleted = 0
        cutoff = now - self.store.max_age_days * 86400.0
        oldest = conn.execute("SELECT min(time) FROM requests").fetchone()[0]
        if oldest is not None and oldest < cutoff:
            deleted += self._delete_rows("time < ?", cutoff, gone)
        # Batches by age, the oldest first (their ids grow with time): whole ones answered before
        # the cutoff, then the one that straddles it, if any. Every statement here counts: each
        # row SQLite returns is a step, and each step hands the GIL to the event loop and back.
        oldest_batch = self._oldest_batch()
        if oldest_batch is not None and oldest_batch[1] < cutoff:  # then a scan (no index on last_time)
            young = conn.execute("SELECT min(id) FROM batches WHERE last_time >= ?", (cutoff,)).fetchone()[0]
            upto, n = conn.execute(
                "SELECT max(id), coalesce(sum(records), 0) FROM batches WHERE id < ?",
                (young if young is not None else _NO_ID,)).fetchone()
            if upto is not None:
                self._drop_batches(upto, gone)
            straddling = self._oldest_batch()
            if straddling is not None and straddling[1] < cutoff:
                n += self._trim(straddling, gone, before=cutoff)
            deleted += n
        # By count. `requests` rows are only appended and pruned from the oldest end, so their
        # rowids are contiguous and "the oldest n" is a rowid bound, found without counting.
        first, last = conn.execute("SELECT min(rowid), max(rowid) FROM requests").fetchone()
        rows = last - first + 1 if last is not None else 0
        excess = rows + self.batch_records - self.store.max_rows
        while excess > 0:
            batch = self._oldest_batch()
            older_rows = 0
            if rows:
                older_rows = rows if batch is None else int(conn.execute(
                    "SELECT count(*) FROM requests WHERE time < ?", (batch[1],)).fetchone()[0])
            if older_rows:
                n = self._delete_rows("rowid < ?", first + min(excess, older_rows), gone)
                first += n
                rows -= n
            elif batch is not None:
                # whole batches while they fit in the excess, else the oldest requests of one
                upto, n = conn.execute(_WHOLE_BATCHES, (_PRUNE_SCAN, excess)).fetchone() or (None, 0)
                if upto is not None:
                    self._drop_batches(upto, gone)
                else:
                    n = self._trim(batch, gone, oldest=excess)
            else:
                break
            deleted += n
            excess -= n
        return deleted

    def _drop_batches(self, upto: int, gone: Totals) -> None:
        """Delete every batch up to id `upto`, whole: their lookup keys, and the labels of their
        requests (read from the entries by SQLite, and only when labels were ever stored)."""
        conn = self.conn
        if self.has_labels:
            doomed = ("SELECT json_extract(e.value, '$[1]') FROM batches AS b, json_each(b.entries) AS e "
                      "WHERE b.id <= ?")
            gone.merge(_totals(conn.execute(f"{_TOTALS} WHERE request_id IN ({doomed})", (upto,)).fetchone()))
            conn.execute(f"DELETE FROM labels WHERE request_id IN ({doomed})", (upto,))
        conn.execute("DELETE FROM batches WHERE id <= ?", (upto,))  # their keys by trigger

    def _oldest_batch(self) -> tuple[int, float, float, int] | None:
        return self.conn.execute(  # type: ignore[no-any-return]
            "SELECT id, first_time, last_time, records FROM batches ORDER BY id LIMIT 1").fetchone()

    def _trim(self, batch: tuple[int, float, float, int], gone: Totals, *, before: float | None = None,
              oldest: int | None = None) -> int:
        """Remove requests from a batch, with their pairs and labels: those answered `before` a
        time, or the `oldest` n (by position), or all; the batch goes when nothing is left.
        Returns the requests removed."""
        batch_id, _, _, records = batch
        conn = self.conn
        row = conn.execute("SELECT keys, entries FROM batches WHERE id = ?", (batch_id,)).fetchone()
        entries: list[list[Any]] = orjson.loads(row[1])
        ids: set[str] = set()
        kept: list[list[Any]] = []
        for e in entries:
            if before is not None:
                doomed = e[E_TIME] < before
            elif oldest is not None:
                doomed = e[E_KIND] != KIND_PAIR and len(ids) < oldest
            else:
                doomed = True
            if doomed and e[E_KIND] != KIND_PAIR:
                ids.add(e[E_ID])
            elif not doomed:
                kept.append(e)
        kept = [e for e in kept if e[E_ID] not in ids]
        removed = records - sum(1 for e in kept if e[E_KIND] != KIND_PAIR)
        if kept:
            keys = sorted({lookup_key(e[E_ID]) for e in kept})
            times = [e[E_TIME] for e in kept]
            conn.execute("UPDATE batches SET first_time = ?, last_time = ?, records = ?, keys = ?, entries = ? "
                         "WHERE id = ?", (min(times), max(times), records - removed, orjson.dumps(keys).decode(),
                                          _dump_entries(kept), batch_id))
            dropped = sorted(set(orjson.loads(row[0])) - set(keys))
            conn.execute("DELETE FROM batch_keys WHERE batch = ? AND key IN (SELECT value FROM json_each(?))",
                         (batch_id, orjson.dumps(dropped)))
        else:
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))  # its keys by trigger
        if ids and self.has_labels:
            doomed_ids = orjson.dumps(sorted(ids))
            gone.merge(_totals(conn.execute(
                f"{_TOTALS} WHERE request_id IN (SELECT value FROM json_each(?))", (doomed_ids,)).fetchone()))
            conn.execute("DELETE FROM labels WHERE request_id IN (SELECT value FROM json_each(?))", (doomed_ids,))
        return removed

    def _delete_rows(self, where: str, bound: float, gone: Totals) -> int:
        doomed = f"SELECT request_id FROM requests WHERE {where}"
        conn = self.conn
        gone.merge(_totals(conn.execute(f"{_TOTALS} WHERE request_id IN ({doomed})", (bound,)).fetchone()))
        conn.execute(f"DELETE FROM labels WHERE request_id IN ({doomed})", (bound,))
        return int(conn.execute(f"DELETE FROM requests WHERE {where}", (bound,)).rowcount)

    def read(self, request_id: str) -> dict[str, Any] | None:
        return read_request(self.conn, request_id)


def _label_problem(item: object) -> str:
    if not isinstance(item, dict):
        return "not an object"
    rid = item.get("request_id")
    if not isinstance(rid, str) or not rid:
        return "request_id: missing or not a non-empty string"
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return "index: missing or not a non-negative integer"
    if item.get("label") is None:
        return "label: missing or null"
    label = item["label"]
    if isinstance(label, float) and not math.isfinite(label):
        return "label: not a finite number"
    return ""
