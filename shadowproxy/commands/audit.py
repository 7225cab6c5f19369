"""`shadowproxy audit`: one request's record, the model versions seen, or every label with the
predictions it was judged against, read from a store file.

Exit codes: 0 found, 1 unknown request id, 2 no store at the path.
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import UTC, datetime

import orjson

from shadowproxy.store.records import StoreNotFound, labelled_predictions, open_readonly, read_request, read_versions

EXIT_FOUND = 0
EXIT_UNKNOWN = 1
EXIT_NO_STORE = 2


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_audit(path: str, request_id: str | None, *, versions: bool = False, as_json: bool = False,
              labels: bool = False) -> int:
    try:
        conn = open_readonly(path)
    except StoreNotFound as exc:
        print(f"shadowproxy audit: {exc}", file=sys.stderr)
        return EXIT_NO_STORE
    try:
        if labels:
            return _print_labels(conn)
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


def _print_labels(conn: sqlite3.Connection) -> int:
    """JSON lines on stdout, written as they are read (a store may hold millions of labels)."""
    out = sys.stdout.buffer
    n = 0
    try:
        for row in labelled_predictions(conn):
            out.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            n += 1
        out.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        return EXIT_FOUND
    if not n:
        print("shadowproxy audit: no labels in the store", file=sys.stderr)
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
