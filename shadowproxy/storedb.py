"""The disk side of the audit store: SQLite schema, migrations, batched writes, retention, labels.

Everything here runs on the store's writer thread (`store.StoreWriter`), never on the event loop
(reading a record is `audit.read_request`, shared with the `audit` command). One table row per
client request (`requests`), delayed ground-truth labels keyed by (request_id, index) (`labels`), and
per-version counts kept as traffic is written (`versions`, so `audit --versions` stays cheap after
retention pruned the rows).

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
from typing import Any

import orjson

from shadowproxy.audit import read_request
from shadowproxy.compare import canonical_label, compare_predictions
from shadowproxy.config import CompareConfig, StoreConfig
from shadowproxy.presets import PresetError, extract_predictions, parse_pointer, resolve_pointer

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

log = logging.getLogger("shadowproxy.store")

# Queued records. `version` is what the answer's version header said (None: no such header, or
# none configured); the JSON pointer, when configured, is read here from the body.
EXCHANGE = 0  # (EXCHANGE, request_id, time, method, path, status, version, latency_s, mirrored,
#                wanted, request_body, response_body)
PAIR = 1  # (PAIR, request_id, time, outcome, candidate_status, version, candidate_body,
#            latency_s, production_predictions, candidate_predictions)

_Tally = dict[tuple[str, str | None], list[float]]  # (target, version) -> [first seen, last seen, answers]

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
# be few: a prepared 1000-row statement takes ~1 MB, and preparing one costs as much as running
# it (2.1 against 4.3 ms for 1024 rows), so they are kept, all of them, in the statement cache.
_MAX_ROWS = 1024
STATEMENT_CACHE = 64  # 3 upserts x 11 sizes, and the handful of fixed statements


@functools.cache
def _values_sql(upsert: str, rows: int) -> str:
    """The same upsert for `rows` rows in one statement (a multi-row VALUES list). The sqlite3
    module releases the GIL around every step, so executemany's step per row made the writer
    thread and the event loop hand the GIL back and forth thousands of times per flush (the store
    benchmark's 80 ms p99); one statement per chunk is one step. It also costs half of what the
    previous one-statement form did (a JSON array of rows read through `json_each`, 5.2 against
    2.7 µs per row including the binding), and bodies bind as they are."""
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
    """Running ground-truth counts; see INTERFACE.md's `ground_truth` block."""

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
    while the event loop runs is what costs (see store.WRITE_CHUNK)."""
    start, n = 0, len(rows)
    size = _MAX_ROWS
    while start < n:
        if n - start >= size:
            conn.execute(_values_sql(upsert, size), [v for row in rows[start:start + size] for v in row])
            start += size
        else:
            size //= 2


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


def redact(body: bytes | None, pointers: Sequence[tuple[str, ...]]) -> bytes | None:
    """`body` with every pointed member removed. A `*` token matches every array element or object
    member (an extension of RFC 6901, for fields inside each instance of a batch). A body that is
    not JSON cannot be searched, so it is not kept at all when there is anything to redact."""
    if body is None or not pointers:
        return body
    doc = _loads(body)
    if doc is _NOT_JSON:
        return None
    for tokens in pointers:
        if tokens:
            _remove(doc, tokens)
    return orjson.dumps(doc)


def _remove(node: object, tokens: tuple[str, ...]) -> None:
    head, rest = tokens[0], tokens[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            if rest:
                _remove(node[key], rest)
            else:
                del node[key]
    elif isinstance(node, list):
        if head == "*":
            indexes = range(len(node))
        elif head.isdigit() and (head == "0" or head[0] != "0") and int(head) < len(node):
            indexes = range(int(head), int(head) + 1)
        else:
            return
        if not rest:
            for i in reversed(indexes):
                del node[i]
            return
        for i in indexes:
            _remove(node[i], rest)


# ---------------------------------------------------------------------------------------------------
# The writer's connection


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
        # every request id of the batch). The probe runs for each batch while the answer is no:
        # under `serve --workers`, labels arrive through another worker's writer. Labels are never
        # all deleted but by retention, after which the re-judging query just finds none.
        self.has_labels = self._any_label()

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
        exchanges: list[tuple[Any, ...]] = []
        pairs: list[tuple[Any, ...]] = []
        versions: _Tally = {}
        for item in items:
            if item[0] == EXCHANGE:
                exchanges.append(self._exchange_row(item, versions))
            else:
                pairs.append(self._pair_row(item, versions))
        for (target, version), (_, _, n) in versions.items():  # once per version and batch, not per row
            self.count_version(target, version, int(n))
        conn = self.conn
        delta = Totals()
        conn.execute("BEGIN")
        try:
            if exchanges:
                _upsert(conn, _UPSERT_EXCHANGE, exchanges)
            if pairs:
                _upsert(conn, _UPSERT_PAIR, pairs)
            named = [(t, v, first, last, int(n)) for (t, v), (first, last, n) in versions.items() if v is not None]
            if named:
                _upsert(conn, _UPSERT_VERSION, named)
            self._rejudge([row[0] for row in exchanges] + [row[0] for row in pairs], delta)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(delta)

    def _version(self, target: str, version: str | None, body: bytes | None,
                 doc: object, when: float, versions: _Tally,
                 ) -> tuple[str | None, object]:
        """The answer's model version (its header's, else the JSON pointer's), tallied in
        `versions` (None: the answer names none)."""
        if version is None and self.version_tokens is not None and body is not None:
            if doc is None:
                doc = _loads(body)
            version = _pointer_version(doc, self.version_tokens)
        seen = versions.get((target, version))
        if seen is None:
            versions[(target, version)] = [when, when, 1.0]
        else:
            if when < seen[0]:
                seen[0] = when
            if when > seen[1]:
                seen[1] = when
            seen[2] += 1
        return version, doc

    def _exchange_row(self, item: tuple[Any, ...], versions: _Tally) -> tuple[Any, ...]:
        _, rid, when, method, path, status, version, latency_s, mirrored, wanted, req_body, resp_body = item
        version, doc = self._version("production", version, resp_body, None, when, versions)
        predictions = None
        if wanted and not mirrored and resp_body is not None and 200 <= status < 300:
            # Mirrored requests get production's predictions from their pair (parsed once, there).
            predictions = self._predictions(resp_body if doc is None else doc)
        if self.store.store_bodies:
            req_body = redact(req_body, self.redactions)
            resp_body = redact(resp_body, self.redactions)
        else:
            req_body = resp_body = None
        latency_ms = latency_s * 1000.0 if latency_s is not None else None
        return (rid, when, method, path, status, version, latency_ms, int(mirrored), predictions, req_body, resp_body)

    def _pair_row(self, item: tuple[Any, ...], versions: _Tally) -> tuple[Any, ...]:
        _, rid, when, outcome, status, version, body, latency_s, prod_preds, cand_preds = item
        if status:
            version, _ = self._version("candidate", version, body, None, when, versions)
        else:
            version = None
        body = redact(body, self.redactions) if self.store.store_bodies else None
        latency_ms = latency_s * 1000.0 if latency_s is not None else None
        return (rid, outcome, status, version, latency_ms, _dumps(prod_preds), _dumps(cand_preds), body)

    def _predictions(self, body: bytes | object) -> bytes | None:
        doc = _loads(body) if isinstance(body, bytes) else body
        if doc is _NOT_JSON:
            return None
        cfg = self.compare
        try:
            return _dumps(extract_predictions(doc, cfg.preset, cfg.path, cfg.output))
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

    def _stored_predictions(self, request_id: str) -> tuple[list[object] | None, list[object] | None] | None:
        row = self.conn.execute(
            "SELECT production_predictions, candidate_predictions FROM requests WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        prod, cand = (orjson.loads(v) if v is not None else None for v in row)
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
        for rid, idx, label, old_pc, old_cc in rows:
            if rid not in cache:
                cache[rid] = self._stored_predictions(rid)
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
                    cache[rid] = self._stored_predictions(rid)
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
        """Delete rows beyond `max_rows` (oldest first) and older than `max_age_days`; their labels
        go with them. Cheap when there is nothing to do: two index lookups."""
        deleted = 0
        newest = self.conn.execute("SELECT max(rowid) FROM requests").fetchone()[0]
        # Rows are only ever appended and pruned from the oldest end, so rowids are contiguous and
        # "beyond max_rows" is a rowid bound, found without counting the table.
        if newest is not None and newest > self.store.max_rows:
            deleted += self._delete("rowid <= ?", newest - self.store.max_rows)
        cutoff = now - self.store.max_age_days * 86400.0
        oldest = self.conn.execute("SELECT min(time) FROM requests").fetchone()[0]
        if oldest is not None and oldest < cutoff:
            deleted += self._delete("time < ?", cutoff)
        return deleted

    def _delete(self, where: str, bound: float) -> int:
        doomed = f"SELECT request_id FROM requests WHERE {where}"
        conn = self.conn
        conn.execute("BEGIN")
        try:
            gone = _totals(conn.execute(f"{_TOTALS} WHERE request_id IN ({doomed})", (bound,)).fetchone())
            conn.execute(f"DELETE FROM labels WHERE request_id IN ({doomed})", (bound,))
            deleted = conn.execute(f"DELETE FROM requests WHERE {where}", (bound,)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.totals.merge(gone, -1)
        return int(deleted)

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
