"""The store's record format and its reading side.

A request's entries are kept as compact JSON lists (`Entries`), folded into one record on read
(`fold`); `read_request` serves `GET /shadow/requests/{id}` on the writer thread and the
`shadowproxy audit` command on a read-only connection (`open_readonly`), which can run beside a
serving proxy (WAL readers never block the writer) or after it stopped.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import quote

import orjson

__all__ = [
    "Entries", "StoreNotFound", "entries_in", "fold", "labelled_predictions", "lookup_key", "open_readonly",
    "read_request", "read_versions", "request_columns",
]

class StoreNotFound(Exception):
    """`open_readonly`: no file at the path, or not a shadowproxy store."""


# ---------------------------------------------------------------------------------------------------
# Reading: the admin API (on the store's writer thread) and the command (a read-only connection)


def open_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing store; StoreNotFound when there is none at `path`."""
    try:
        conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreNotFound(f"{path}: cannot open: {exc}") from None
    try:
        conn.execute("SELECT version FROM schema_version LIMIT 1").fetchone()
    except sqlite3.Error:
        conn.close()
        raise StoreNotFound(f"{path}: not a shadowproxy store") from None
    return conn


def _uri_path(path: str) -> str:
    return quote(path, safe="/")


_REQUEST_COLUMNS = (
    "request_id", "time", "method", "path", "status", "mirrored", "outcome", "production_version",
    "candidate_version", "production_latency_ms", "candidate_latency_ms", "production_predictions",
    "candidate_predictions", "candidate_status", "request_body", "response_body", "candidate_body",
)

# Requests are stored in batches (schema version 2): a `batches` row per written batch of records,
# its `entries` a JSON list with one list per record, fields by position. The layouts are the
# store's queued records (database.EXCHANGE, database.PAIR) with the bodies left out and the
# predictions in, so a record of a request that was not sampled is written as it was queued:
KIND_EXCHANGE: Final = 0  # [0, request_id, time, method, path, status, production_version, production_latency_s,
#                     mirrored, sampled, null, production_predictions]: production's answer
KIND_PAIR: Final = 1  # [1, request_id, time, outcome, candidate_status, candidate_version, null,
#                 candidate_latency_s, production_predictions, candidate_predictions]: the candidate's
#                 side of a mirrored request whose exchange went to another batch
KIND_BOTH: Final = 2  # the exchange's 12 fields, then outcome, candidate_status, candidate_version,
#                candidate_latency_s, candidate_predictions: a mirrored request whose exchange and
#                pair met in one batch (nearly all of them)
E_KIND: Final = 0
E_ID: Final = 1
E_TIME: Final = 2
E_MIRRORED: Final = 8
E_PREDICTIONS: Final = 11
# An entry is found by its lookup key in `batch_keys` (key, batch). Ids the proxy makes are 32 hex
# digits that start with the time in milliseconds (proxy.new_request_id): their first 11 digits
# (a 16 ms slot) are the key, so a batch adds a handful of keys, not one per request. Any other id
# (a client's own X-Request-ID) is its own key, unless it too is 32 characters long and starts
# with 11 hex digits (then those are its key: found all the same, sharing the slot).
SLOT_DIGITS: Final = 11
_HEX = "0123456789abcdef"


def lookup_key(request_id: str) -> str:
    if len(request_id) == 32 and not request_id[:SLOT_DIGITS].strip(_HEX):
        return request_id[:SLOT_DIGITS]
    return request_id


def _body(value: bytes | None) -> object:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode("utf-8", "replace")


class Entries:
    """Finds a request's batch entries. A batch's text is searched for the id, and only the
    entries found are parsed (a search of the text is far cheaper than parsing the whole batch).
    The texts are kept for the reader's lifetime (one label post, one write's re-judging): the ids
    a caller asks about cluster in time, so in batches."""

    MAX_BATCHES = 64

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.has_batches = _has_table(conn, "batch_keys")
        self._texts: dict[int, str] = {}

    def find(self, request_id: str) -> list[list[Any]]:
        """Every entry for `request_id`, oldest first (batch order, then position)."""
        if not self.has_batches:
            return []
        batches = [b for (b,) in self.conn.execute(
            "SELECT batch FROM batch_keys WHERE key = ? ORDER BY batch", (lookup_key(request_id),))]
        found: list[list[Any]] = []
        for batch in batches:
            text = self._texts.get(batch)
            if text is None:
                row = self.conn.execute("SELECT entries FROM batches WHERE id = ?", (batch,)).fetchone()
                if row is None:
                    continue
                text = row[0]
                if len(self._texts) >= self.MAX_BATCHES:
                    self._texts.pop(next(iter(self._texts)))
                self._texts[batch] = text
            found.extend(entries_in(text, request_id))
        return found


_ENTRY_LENGTHS = {KIND_EXCHANGE: 12, KIND_PAIR: 10, KIND_BOTH: 17}
_DECODER = json.JSONDecoder()


def entries_in(text: str, request_id: str) -> list[list[Any]]:
    """The entries of a batch's text (orjson's compact JSON) whose id is `request_id`, in order.
    An entry starts `[kind,"id"` right after the list's `[` or a `,` between entries; each such
    spot is parsed on its own and kept when it has an entry's layout."""
    needle = orjson.dumps(request_id).decode()
    found: list[list[Any]] = []
    at = text.find(needle)
    while at >= 0:
        start = at - 3
        if start >= 1 and text[at - 1] == "," and text[start] == "[" and text[start - 1] in "[,":
            try:
                entry = _DECODER.raw_decode(text, start)[0]
            except ValueError:
                entry = None
            if (isinstance(entry, list) and len(entry) == _ENTRY_LENGTHS.get(entry[0], -1)
                    and entry[E_ID] == request_id):
                found.append(entry)
        at = text.find(needle, at + len(needle))
    return found


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


_CANDIDATE_SIDE = ("outcome", "candidate_status", "candidate_version", "candidate_latency_ms")


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000.0 if seconds is not None else None


def fold(entries: list[list[Any]]) -> dict[str, Any] | None:
    """One request's columns from its entries, applied in order as the row upserts of schema 1
    apply records: a later exchange replaces production's side and clears the candidate's (unless
    the row so far holds only a pair), a pair sets the candidate's side. Predictions are values."""
    if not entries:
        return None
    r: dict[str, Any] = dict.fromkeys(_REQUEST_COLUMNS)
    r["request_id"] = entries[0][E_ID]
    r["mirrored"] = 0
    for e in entries:
        kind = e[E_KIND]
        if kind == KIND_PAIR:
            r["mirrored"] = 1
            r["outcome"], r["candidate_status"], r["candidate_version"] = e[3:6]
            r["candidate_latency_ms"] = _ms(e[7])
            r["candidate_predictions"] = e[9]
            if e[8] is not None:
                r["production_predictions"] = e[8]
            continue
        had_exchange = r["time"] is not None
        r["time"], r["method"], r["path"], r["status"], r["production_version"] = e[2:7]
        r["production_latency_ms"] = _ms(e[7])
        r["mirrored"] = int(bool(e[E_MIRRORED]))
        predictions = e[E_PREDICTIONS]
        if had_exchange:
            r["production_predictions"] = predictions
            for name in (*_CANDIDATE_SIDE, "candidate_predictions"):
                r[name] = None
        elif r["production_predictions"] is None:
            r["production_predictions"] = predictions
        if kind == KIND_BOTH:
            r["outcome"], r["candidate_status"], r["candidate_version"] = e[12:15]
            r["candidate_latency_ms"] = _ms(e[15])
            r["candidate_predictions"] = e[16]
            if predictions is not None:
                r["production_predictions"] = predictions
    return r


def request_columns(conn: sqlite3.Connection, request_id: str, entries: Entries | None = None) -> dict[str, Any] | None:
    """A request's columns (predictions as values), from its batch entries or its row in the
    `requests` table (schema 1's rows, and every record while `store_bodies` is on); when both
    hold it, the one with the later answer."""
    row = conn.execute(
        f"SELECT {', '.join(_REQUEST_COLUMNS)} FROM requests WHERE request_id = ?", (request_id,)
    ).fetchone()
    legacy: dict[str, Any] | None = None
    if row is not None:
        legacy = dict(zip(_REQUEST_COLUMNS, row, strict=True))
        for name in ("production_predictions", "candidate_predictions"):
            legacy[name] = orjson.loads(legacy[name]) if legacy[name] else None
    batched = fold((entries or Entries(conn)).find(request_id))
    if legacy is None or batched is None:
        return legacy or batched
    return batched if (batched["time"] or 0.0) >= (legacy["time"] or 0.0) else legacy


def read_request(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """The `GET /shadow/requests/{id}` record, or None."""
    r = request_columns(conn, request_id)
    if r is None:
        return None
    out: dict[str, Any] = {
        "request_id": r["request_id"],
        "time": r["time"],
        "method": r["method"],
        "path": r["path"],
        "status": r["status"],
        "mirrored": bool(r["mirrored"]),
        "outcome": r["outcome"],
        "production_version": r["production_version"],
        "candidate_version": r["candidate_version"],
        "production_latency_ms": r["production_latency_ms"],
        "candidate_latency_ms": r["candidate_latency_ms"],
        "predictions": {"production": r["production_predictions"], "candidate": r["candidate_predictions"]},
        "candidate_status": r["candidate_status"],
        "labels": [
            {"index": idx, "label": orjson.loads(label)}
            for idx, label in conn.execute(
                "SELECT idx, label FROM labels WHERE request_id = ? ORDER BY idx", (request_id,)
            )
        ],
    }
    if any(r[k] is not None for k in ("request_body", "response_body", "candidate_body")):
        out["bodies"] = {
            "request": _body(r["request_body"]),
            "production": _body(r["response_body"]),
            "candidate": _body(r["candidate_body"]),
        }
    return out


def read_versions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per target and model version: first and last seen (epoch seconds) and requests."""
    rows = conn.execute(
        "SELECT target, version, first_seen, last_seen, requests FROM versions ORDER BY target DESC, first_seen"
    ).fetchall()
    return [
        {"target": t, "version": v, "first_seen": first, "last_seen": last, "requests": n}
        for t, v, first, last, n in rows
    ]


def _at(predictions: object, index: int) -> object:
    if isinstance(predictions, list) and 0 <= index < len(predictions):
        return predictions[index]
    return None


def labelled_predictions(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    """Every stored label with the predictions it was judged against: one dict per (request,
    index), in request id order (the proxy's ids start with the time, so that is mostly time
    order, and a request's batches are read once for all its labels). `production_correct` and
    `candidate_correct` are the store's own judgement (None: no prediction at that index); a
    label whose request is no longer stored has None for the request's fields."""
    entries = Entries(conn)
    current: str | None = None
    record: dict[str, Any] | None = None
    rows = conn.execute(
        "SELECT request_id, idx, label, time, production_correct, candidate_correct FROM labels "
        "ORDER BY request_id, idx")
    for rid, index, label, when, production_correct, candidate_correct in rows:
        if rid != current:
            current = rid
            record = request_columns(conn, rid, entries)
        r = record or {}
        yield {
            "request_id": rid,
            "index": index,
            "label": orjson.loads(label),
            "label_time": when,
            "time": r.get("time"),
            "production_version": r.get("production_version"),
            "candidate_version": r.get("candidate_version"),
            "production": _at(r.get("production_predictions"), index),
            "candidate": _at(r.get("candidate_predictions"), index),
            "production_correct": None if production_correct is None else bool(production_correct),
            "candidate_correct": None if candidate_correct is None else bool(candidate_correct),
        }
