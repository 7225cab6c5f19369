"""`shadowproxy audit`: one request's record, or the model versions seen, read from a store file.

Also the reading side of the store (`read_request` serves `GET /shadow/requests/{id}` too). The
command opens the SQLite file read-only, so it can run beside a serving proxy (WAL readers never block
the writer) or after it stopped. Exit codes: 0 found, 1 unknown request id, 2 no store at the path.
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson

__all__ = ["StoreNotFound", "open_readonly", "read_request", "read_versions", "run_audit"]

EXIT_FOUND = 0
EXIT_UNKNOWN = 1
EXIT_NO_STORE = 2


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


def _body(value: bytes | None) -> object:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode("utf-8", "replace")


def read_request(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """The `GET /shadow/requests/{id}` record, or None."""
    row = conn.execute(
        f"SELECT {', '.join(_REQUEST_COLUMNS)} FROM requests WHERE request_id = ?", (request_id,)
    ).fetchone()
    if row is None:
        return None
    r = dict(zip(_REQUEST_COLUMNS, row, strict=True))
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
        "predictions": {
            "production": orjson.loads(r["production_predictions"]) if r["production_predictions"] else None,
            "candidate": orjson.loads(r["candidate_predictions"]) if r["candidate_predictions"] else None,
        },
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


# ---------------------------------------------------------------------------------------------------
# The command


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_audit(path: str, request_id: str | None, *, versions: bool = False, as_json: bool = False) -> int:
    try:
        conn = open_readonly(path)
    except StoreNotFound as exc:
        print(f"shadowproxy audit: {exc}", file=sys.stderr)
        return EXIT_NO_STORE
    try:
        if versions:
            rows = read_versions(conn)
            if as_json:
                print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
            else:
                print(format_versions(rows))
            return EXIT_FOUND
        assert request_id is not None
        record = read_request(conn, request_id)
    finally:
        conn.close()
    if record is None:
        print(f"shadowproxy audit: no request {request_id!r} in {path}", file=sys.stderr)
        return EXIT_UNKNOWN
    record["time_iso"] = _iso(record["time"])
    print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
    return EXIT_FOUND


def format_versions(rows: list[dict[str, object]]) -> str:
    header = ["target", "version", "first seen (UTC)", "last seen (UTC)", "requests"]
    table = [header] + [
        [str(r["target"]), str(r["version"]), _iso(r["first_seen"]), _iso(r["last_seen"]),  # type: ignore[arg-type]
         str(r["requests"])]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
             strict=True))).rstrip() for row in table]
    if not rows:
        lines.append("(no versions recorded)")
    return "\n".join(lines)
