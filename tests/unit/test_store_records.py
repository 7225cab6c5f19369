"""The audit store's parts without a proxy: schema and migration, batches and their lookup keys,
retention by age and count, labels before predictions, the bounded queue, the version label cap,
redaction, and the accuracy gate of the verdict."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.config import GatesConfig, StoreConfig, parse_config
from shadowproxy.judging.presets import parse_pointer
from shadowproxy.judging.verdict import evaluate
from shadowproxy.shadow.metrics import Metrics, StoreMetrics
from shadowproxy.shadow.observers import ExchangeRecord
from shadowproxy.shadow.proxy import new_request_id
from shadowproxy.store import writer as store_module
from shadowproxy.store.database import EXCHANGE, MIGRATIONS, PAIR, Database, Totals, connect, redact
from shadowproxy.store.records import Entries, entries_in, lookup_key, read_request, request_columns

CONFIG = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"}})


def exchange(rid: str, when: float, predictions: list[Any] | None = None) -> tuple[Any, ...]:
    body = orjson.dumps({"predictions": predictions}) if predictions is not None else None
    return (EXCHANGE, rid, when, "POST", "/p", 200, "p1", 0.001, False,
            predictions is not None, None, body)


def pair(rid: str, prod: list[Any], cand: list[Any]) -> tuple[Any, ...]:
    return (PAIR, rid, time.time(), "disagree", 200, "c1", None, 0.002, prod, cand)


def stored(db: Database) -> dict[str, dict[str, Any]]:
    """Every request in the file, as the reader folds it, by id (rows and batch entries alike)."""
    entries = Entries(db.conn)
    ids = [r[0] for r in db.conn.execute(
        "SELECT request_id FROM requests UNION SELECT request_id FROM batch_entries ORDER BY 1")]
    return {rid: request_columns(db.conn, rid, entries) or {} for rid in ids}


def database(tmp_path: Path, **store: Any) -> Database:
    return Database(connect(str(tmp_path / "s.db")), StoreConfig(**store), CONFIG.compare)


def test_schema_version_is_recorded_and_reopening_migrates_nothing(tmp_path: Path) -> None:
    database(tmp_path).close()
    db = database(tmp_path)
    versions = db.conn.execute("SELECT version FROM schema_version").fetchall()
    db.close()
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]


def test_a_store_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    database(tmp_path).close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        connect(str(tmp_path / "s.db"))


def test_retention_by_age_prunes_old_rows_and_their_labels(tmp_path: Path) -> None:
    db = database(tmp_path, max_age_days=1.0)
    now = time.time()
    db.write([exchange("old", now - 2 * 86400, [1]), exchange("new", now, [1])])
    db.post_labels(orjson.dumps([{"request_id": r, "index": 0, "label": 1} for r in ("old", "new")]))
    assert db.totals.labeled == 2
    assert db.prune(now) == 1
    assert list(stored(db)) == ["new"]
    assert db.conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 1
    assert (db.totals.labeled, db.totals.production_correct) == (1, 1)
    db.close()


def test_a_label_is_judged_again_when_the_candidate_answer_arrives(tmp_path: Path) -> None:
    db = database(tmp_path)
    db.write([(EXCHANGE, "r", time.time(), "POST", "/p", 200, None, 0.001, True, False, None, None)])
    db.write([pair("r", [0, 1], [0, 2])])
    status, answer = db.post_labels(orjson.dumps([{"request_id": "r", "index": 1, "label": 2}]))
    assert (status, answer["matched"]) == (200, 1)
    assert (db.totals.labeled, db.totals.production_correct, db.totals.candidate_correct) == (1, 0, 1)
    # The same id comes back as a new, unmirrored request: its old predictions no longer count.
    db.write([exchange("r", time.time(), [2, 2])])
    assert (db.totals.labeled, db.totals.production_correct, db.totals.candidate_labeled) == (1, 1, 0)
    db.close()


def test_two_workers_on_one_file_judge_a_label_again_and_agree_on_the_totals(tmp_path: Path) -> None:
    # `serve --workers 2`: one file, a writer per worker. The request (and later its candidate
    # answer) is written by worker B; the label is posted through worker A, whose totals the
    # supervisor shows.
    a, b = database(tmp_path), database(tmp_path)
    b.write([exchange("r", time.time(), [0, 1])])
    status, answer = a.post_labels(orjson.dumps([{"request_id": "r", "index": 1, "label": 2}]))
    assert (status, answer["matched"]) == (200, 1)
    assert (a.totals.labeled, a.totals.production_correct, a.totals.candidate_labeled) == (1, 0, 0)
    # The candidate's answer arrives through B, which stored no label itself: it must still find
    # the label in the file and judge it again.
    b.write([pair("r", [0, 1], [0, 2])])
    row = a.conn.execute("SELECT production_correct, candidate_correct FROM labels").fetchone()
    assert row == (0, 1)
    # A's running totals missed B's re-judgement; a recount from the file has it.
    a.recount()
    assert (a.totals.labeled, a.totals.candidate_labeled, a.totals.candidate_correct) == (1, 1, 1)
    a.close()
    b.close()


def test_a_shared_store_counts_its_totals_afresh_from_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    config = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
                           "store": {"path": path}})
    writers = {shared: store_module.StoreWriter(config, StoreMetrics(CollectorRegistry()), shared=shared)
               for shared in (True, False)}
    for writer in writers.values():
        writer._open()  # the writer thread's steps, run here: no thread started
    other = Database(connect(path), config.store, config.compare)  # another worker's writer
    other.write([exchange("r", time.time(), [1, 0])])
    other.post_labels(orjson.dumps([{"request_id": "r", "index": i, "label": 1} for i in range(2)]))
    for writer in writers.values():
        writer._cycle()
    shared, alone = writers[True].totals, writers[False].totals
    assert (shared.labeled, shared.production_correct) == (2, 1)
    assert (alone.labeled, alone.production_correct) == (0, 0)  # a single process keeps its own count
    for writer in writers.values():
        assert writer.db is not None
        writer.db.close()
    other.close()


def test_labels_accept_numbers_and_strings_alike_for_label_kind(tmp_path: Path) -> None:
    db = database(tmp_path)
    db.write([exchange("r", time.time(), [1, "cat"])])
    db.post_labels(orjson.dumps([{"request_id": "r", "index": 0, "label": "1"},
                                 {"request_id": "r", "index": 1, "label": "cat"}]))
    assert (db.totals.labeled, db.totals.production_correct) == (2, 2)
    db.close()


def test_totals_survive_a_restart(tmp_path: Path) -> None:
    db = database(tmp_path)
    db.write([exchange("r", time.time(), [1, 2])])
    db.post_labels(orjson.dumps([{"request_id": "r", "index": i, "label": 1} for i in range(2)]))
    db.close()
    db = database(tmp_path)
    assert (db.totals.labeled, db.totals.production_correct) == (2, 1)
    db.close()


def _record(rid: str, body: bytes | None = None) -> ExchangeRecord:
    return ExchangeRecord(rid, time.time(), "POST", "/", 200, [], 0.001, False, body, body)


def test_a_full_queue_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "QUEUE_RECORDS", 3)
    config = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
                           "store": {"path": "unused.db"}})
    store = store_module.AuditStore(config, Metrics())  # never started: nothing drains the queue
    for i in range(5):
        store.on_exchange(_record(f"q-{i}"), False)
    assert len(store.writer.records) == 3
    assert store.metrics.dropped._value.get() == 2


def test_a_queue_full_of_bodies_drops_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "QUEUE_BYTES", 1000)
    config = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
                           "store": {"path": "unused.db", "store_bodies": True}})
    store = store_module.AuditStore(config, Metrics())
    store.on_exchange(_record("a", b"x" * 400), True)  # request + response: 800 bytes
    store.on_exchange(_record("b", b"x" * 400), True)
    assert (len(store.writer.records), store.metrics.dropped._value.get()) == (1, 1)


def test_version_label_is_capped_at_20_per_target() -> None:
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    for i in range(25):
        metrics.count_version("production", f"v{i}")
    metrics.count_version("production", "v3")
    metrics.count_version("production", None)
    versions = {s.labels["version"]: s.value for m in registry.collect() for s in m.samples
                if s.name == "shadowproxy_model_version_requests_total"}
    assert len(versions) == 22  # v0..v19, other, unknown
    assert (versions["other"], versions["v3"], versions["unknown"]) == (5.0, 2.0, 1.0)


def test_redaction_with_wildcards_and_escapes() -> None:
    body = orjson.dumps({"a/b": 1, "rows": [{"s": 1, "k": 2}, {"s": 3}], "keep": True})
    pointers = [parse_pointer(p) for p in ("/a~1b", "/rows/*/s", "/absent/x")]
    assert orjson.loads(redact(body, pointers) or b"") == {"rows": [{"k": 2}, {}], "keep": True}
    assert redact(b"not json", pointers) is None  # cannot be searched, so not kept
    assert redact(b"not json", []) == b"not json"


# ------------------------------------------------------------------------------------------- verdict


def _snapshot(candidate_labeled: int, delta: float) -> dict[str, Any]:
    """Production right on 90% of the paired labels, the candidate on 90% + delta."""
    production = round(0.9 * candidate_labeled)
    candidate = round((0.9 + delta) * candidate_labeled)
    totals = Totals(candidate_labeled, production, candidate_labeled, candidate, production)
    return {"ground_truth": store_module.ground_truth(totals)}


def _accuracy_gates(snapshot: dict[str, Any], gates: GatesConfig) -> list[dict[str, Any]]:
    return [g for g in evaluate(snapshot, gates)["gates"] if g["name"] == "min_accuracy_delta"]


def test_accuracy_gate_is_absent_while_unset() -> None:
    assert _accuracy_gates(_snapshot(1000, -0.5), GatesConfig()) == []


def test_accuracy_gate_is_left_out_before_min_labels() -> None:
    gates = GatesConfig(min_labels=100, min_accuracy_delta=-0.01)
    assert _accuracy_gates(_snapshot(99, -0.5), gates) == []
    assert evaluate(_snapshot(99, -0.5), gates)["verdict"] == "insufficient_data"  # min_samples waits, not this


def test_accuracy_gate_passes_above_the_threshold_fails_below_and_waits_between() -> None:
    gates = GatesConfig(min_samples=1, min_labels=100, min_accuracy_delta=-0.01)
    # 20,000 labels: the delta's 95% interval is about +-0.6 points wide.
    (passed,) = _accuracy_gates(_snapshot(20_000, 0.0), gates)
    assert (passed["passed"], passed["value"], passed["threshold"]) == (True, 0.0, -0.01)
    assert passed["interval"][0] >= -0.01
    (failed,) = _accuracy_gates(_snapshot(20_000, -0.05), gates)
    assert failed["passed"] is False and failed["interval"][1] < -0.01
    assert "-5%" in failed["reason"]
    assert evaluate(_snapshot(20_000, -0.05), gates)["verdict"] == "fail"
    # 100 labels: -5% cannot be told from -1% yet.
    (waiting,) = _accuracy_gates(_snapshot(100, -0.05), gates)
    assert waiting["passed"] is None
    assert waiting["interval"][0] < -0.01 < waiting["interval"][1]


def test_a_batch_of_any_size_is_written_whole(tmp_path: Path) -> None:
    # Rows go out in statements of power-of-two sizes (1024 down to 1): 2061 = 2x1024 + 8 + 4 + 1,
    # 37 = 32 + 4 + 1. Every row must arrive once, and the version tallies must add up.
    db = database(tmp_path)
    now = time.time()
    db.write([exchange(f"r{k}", now) for k in range(2061)] + [pair(f"r{k}", [1], [0]) for k in range(0, 370, 10)])
    rows = stored(db)
    assert (len(rows), sum(r["mirrored"] for r in rows.values())) == (2061, 37)
    versions = dict(db.conn.execute("SELECT version, requests FROM versions").fetchall())
    assert versions == {"p1": 2061, "c1": 37}
    assert rows["r360"]["outcome"] == "disagree"


def _mirrored(rid: str, when: float, status: int = 200) -> tuple[Any, ...]:
    return (EXCHANGE, rid, when, "POST", "/m", status, "p1", 0.003, True, False, None, None)


_BODIES = ("request_body", "response_body", "candidate_body")


def test_a_batch_reads_as_its_records_written_one_by_one_as_rows(tmp_path: Path) -> None:
    # The writer folds a mirrored request's exchange and pair found in the same batch into one
    # entry, and the reader folds a request's entries. Both must read exactly as schema 1's row
    # upserts did with every record written on its own, in order: pair before or after its
    # exchange, two pairs for one id, a pair whose exchange is in no batch, a failed candidate, a
    # sampled request's predictions. (An id a client reuses for two exchanges within one batch is
    # written exchanges first, then pairs, as schema 1 did within a batch.)
    now = time.time()
    records = [
        _mirrored("a", now), pair("a", [1], [0]),
        pair("b", [2], [2]), _mirrored("b", now + 1),
        _mirrored("c", now + 2), pair("c", [3], [4]),
        _mirrored("d", now + 4), pair("d", [5], [6]), pair("d", [7], [8]),
        pair("e", [9], [9]),
        _mirrored("f", now + 5, status=503),
        (PAIR, "g", now, "candidate_error", 0, None, None, None, [1], None), _mirrored("g", now + 6),
        exchange("h", now + 7, [1]), exchange("i", now + 8),
    ]
    for name in ("rows", "one", "all"):
        (tmp_path / name).mkdir()
    rows = database(tmp_path / "rows", store_bodies=True)
    one, whole = database(tmp_path / "one"), database(tmp_path / "all")
    for record in records:
        rows.write([record])
        one.write([record])
    whole.write(records)
    assert rows.conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    assert whole.conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
    expected = {rid: {k: v for k, v in r.items() if k not in _BODIES} for rid, r in stored(rows).items()}
    assert list(expected) == list("abcdefghi")
    assert expected["a"]["outcome"] == "disagree" and expected["i"]["production_predictions"] is None
    assert stored(one) == stored(whole) == {rid: {**r, **dict.fromkeys(_BODIES)} for rid, r in expected.items()}
    assert whole.totals == one.totals == rows.totals
    # merged: a, c, and b and g, whose pairs came first; d has two pairs, e's pair stands alone
    kinds = dict(whole.conn.execute(
        "SELECT request_id, group_concat(kind || mirrored) FROM batch_entries GROUP BY 1"))
    assert kinds == {"a": "both1", "b": "both1", "c": "both1", "d": "exchange1,pair1,pair1", "e": "pair1",
                     "f": "exchange1", "g": "both1", "h": "exchange0", "i": "exchange0"}


def _ids(n: int) -> list[str]:
    return [new_request_id().decode() for _ in range(n)]


def _orphans(db: Database) -> int:
    """Lookup keys that name a missing batch or a key the batch's entries no longer have."""
    keyed = {(k, b) for k, b in db.conn.execute("SELECT key, batch FROM batch_keys")}
    wanted = {(lookup_key(rid), b) for rid, b in db.conn.execute("SELECT request_id, batch FROM batch_entries")}
    return len(keyed ^ wanted)


def test_ids_the_proxy_made_share_a_few_lookup_keys_and_each_is_found(tmp_path: Path) -> None:
    db = database(tmp_path)
    now = time.time()
    batches = [_ids(300) for _ in range(3)]
    client_ids = ["from-a-client", "0123456789abcdef0123456789ABCDEF", "x" * 32]
    for ids in batches:
        db.write([exchange(rid, now) for rid in ids])
        time.sleep(0.02)  # the next batch's ids fall in a later 16 ms slot
    db.write([exchange(rid, now) for rid in client_ids])
    keys = db.conn.execute("SELECT count(*) FROM batch_keys").fetchone()[0]
    assert keys <= 3 * 4 + len(client_ids)  # 300 ids made within a few ms: one or two slots each
    assert _orphans(db) == 0
    for rid in [rid for ids in batches for rid in ids] + client_ids:
        record = read_request(db.conn, rid)
        assert record is not None and record["request_id"] == rid and record["status"] == 200
    made_later = new_request_id().decode()
    assert lookup_key(made_later) == made_later[:11]
    assert read_request(db.conn, made_later) is None
    assert read_request(db.conn, batches[0][0][:-1] + "g") is None


def test_max_rows_keeps_exactly_the_newest_requests_across_batches(tmp_path: Path) -> None:
    db = database(tmp_path, max_rows=5)
    now = time.time()
    first, second = _ids(4), _ids(4)
    db.write([exchange(rid, now, [1]) for rid in first] + [pair("orphan", [1], [1])])
    db.write([exchange(rid, now + 1, [1]) for rid in second])
    labelled = [first[0], first[3], second[0]]
    db.post_labels(orjson.dumps([{"request_id": r, "index": 0, "label": 1} for r in labelled]))
    assert db.totals.labeled == 3
    assert db.prune(now + 1) == 3
    assert set(stored(db)) == {first[3], *second, "orphan"}  # a pair alone is no request: not counted
    assert db.batch_records == 5 and db.totals.labeled == 2
    assert db.conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 2
    assert _orphans(db) == 0
    db.write([exchange(rid, now + 2) for rid in _ids(6)])
    assert db.prune(now + 2) == 6  # the first two batches go whole (a lone pair with them), then one
    assert db.conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 1
    assert len(stored(db)) == 5 and db.batch_records == 5 and _orphans(db) == 0
    assert db.totals.labeled == 0 and db.conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 0


def test_max_age_drops_old_batches_and_trims_the_one_that_straddles_the_cutoff(tmp_path: Path) -> None:
    db = database(tmp_path, max_age_days=1.0)
    now = time.time()
    older, old, new = _ids(2), _ids(3), _ids(3)
    db.write([exchange(rid, now - 3 * 86400, [1]) for rid in older])
    db.write([exchange(rid, now - 2 * 86400) for rid in old] + [exchange(rid, now) for rid in new])
    db.post_labels(orjson.dumps([{"request_id": older[0], "index": 0, "label": 1}]))
    assert db.prune(now) == 5  # the first batch whole, the second trimmed
    assert set(stored(db)) == set(new) and db.batch_records == 3 and _orphans(db) == 0
    assert db.totals.labeled == 0 and db.conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 0
    first_time = db.conn.execute("SELECT first_time FROM batches").fetchone()[0]
    assert first_time == now


def test_a_schema_1_file_is_migrated_and_its_rows_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO requests (request_id, time, method, path, status, mirrored, production_predictions)"
                     " VALUES ('legacy', ?, 'POST', '/p', 200, 0, '[1]')", (time.time() - 10,))
    conn.close()
    db = database(tmp_path, max_rows=3)
    assert db.conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    record = read_request(db.conn, "legacy")
    assert record is not None and record["predictions"]["production"] == [1]
    status, answer = db.post_labels(b'[{"request_id": "legacy", "index": 0, "label": 1}]')
    assert (status, answer["matched"]) == (200, 1)
    now = time.time()
    db.write([exchange(rid, now) for rid in _ids(3)])
    assert len(stored(db)) == 4
    assert db.prune(now) == 1  # the schema-1 row is the oldest
    assert "legacy" not in stored(db) and db.totals.labeled == 0


def test_an_entry_is_found_in_a_batch_text_and_not_mistaken_for_a_prediction() -> None:
    rid = "r-1"
    entries = [
        [0, "other", 1.0, "POST", "/p", 200, None, 0.001, False, True, None, ["r-1", [0, "r-1"], {"r-1": 1}]],
        [0, rid, 2.0, "POST", "/p", 200, "v1", 0.001, True, False, None, None],
        [1, "r-10", 2.5, "agree", 200, "c1", None, 0.002, None, None],
        [1, rid, 3.0, "agree", 200, "c1", None, 0.002, [[0, "r-1", 2.0]], ["x"]],
    ]
    text = orjson.dumps(entries).decode()
    assert entries_in(text, rid) == [entries[1], entries[3]]
    assert entries_in(text, "r-10") == [entries[2]]
    assert entries_in(text, "r-") == []
    assert entries_in(text, 'q"uote') == []


def test_two_writers_on_one_file_agree_on_max_rows(tmp_path: Path) -> None:
    # `serve --workers 2`: each worker's writer adds and prunes batches in the same file; the count
    # max_rows is held to is the file's, so neither prunes what the other already pruned.
    a, b = database(tmp_path, max_rows=4), database(tmp_path, max_rows=4)
    now = time.time()
    a.write([exchange(rid, now) for rid in _ids(3)])
    b.write([exchange(rid, now + 1) for rid in _ids(3)])
    assert a.batch_records == b.batch_records == 6
    assert a.prune(now + 1) == 2
    assert b.batch_records == 4 and b.prune(now + 1) == 0
    assert len(stored(b)) == 4
    a.close()
    b.close()


def test_audit_labels_exports_each_label_with_the_predictions_at_its_index(tmp_path: Path) -> None:
    db = database(tmp_path)
    now = time.time()
    db.write([
        exchange("sampled", now, [0, 1, 2]),  # production only
        (EXCHANGE, "mirrored", now, "POST", "/p", 200, "p1", 0.001, True, False, None, None),
        pair("mirrored", [1, 1], [1, 0]),
        exchange("plain", now, None),  # no predictions kept
    ])
    posted = [
        ("sampled", 0, 0), ("sampled", 2, 1), ("mirrored", 0, 1), ("mirrored", 1, 1), ("plain", 0, 5),
        ("unknown", 3, "x"),
    ]
    db.post_labels(orjson.dumps([{"request_id": r, "index": i, "label": label} for r, i, label in posted]))
    db.close()
    # The truth, from the predictions written above: (production, candidate) at each label's index.
    predictions = {"sampled": ([0, 1, 2], None), "mirrored": ([1, 1], [1, 0]), "plain": (None, None),
                   "unknown": (None, None)}
    expected = []
    for rid, index, label in sorted(posted, key=lambda p: (p[0], p[1])):
        prod, cand = predictions[rid]
        p = prod[index] if prod is not None and index < len(prod) else None
        c = cand[index] if cand is not None and index < len(cand) else None
        if p is None and c is None:
            continue  # unmatched: answered as such, and not stored
        expected.append((rid, index, label, p, c, None if p is None else p == label,
                         None if c is None else c == label))

    proc = subprocess.run([sys.executable, "-m", "shadowproxy", "audit", "--store", str(tmp_path / "s.db"), "--labels"],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    got = [(r["request_id"], r["index"], r["label"], r["production"], r["candidate"], r["production_correct"],
            r["candidate_correct"]) for r in rows]
    assert got == expected
    assert len(expected) == 4
    versions = {r["request_id"]: (r["production_version"], r["candidate_version"], r["time"]) for r in rows}
    assert versions == {"sampled": ("p1", None, now), "mirrored": ("p1", "c1", now)}


def test_audit_labels_on_a_store_without_labels_says_so_and_exits_0(tmp_path: Path) -> None:
    database(tmp_path).close()
    proc = subprocess.run([sys.executable, "-m", "shadowproxy", "audit", "--store", str(tmp_path / "s.db"), "--labels"],
                          capture_output=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert b"no labels" in proc.stderr and b"Traceback" not in proc.stderr
