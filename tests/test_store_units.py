"""The audit store's parts without a proxy: schema, retention by age, labels before predictions,
the bounded queue, the version label cap, redaction, and the accuracy gate of the verdict."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from shadowproxy import store as store_module
from shadowproxy.config import GatesConfig, StoreConfig, parse_config
from shadowproxy.metrics import Metrics, StoreMetrics
from shadowproxy.observers import ExchangeRecord
from shadowproxy.presets import parse_pointer
from shadowproxy.storedb import EXCHANGE, MIGRATIONS, PAIR, Database, connect, redact
from shadowproxy.verdict import evaluate

CONFIG = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"}})


def exchange(rid: str, when: float, predictions: list[Any] | None = None) -> tuple[Any, ...]:
    body = orjson.dumps({"predictions": predictions}) if predictions is not None else None
    return (EXCHANGE, rid, when, "POST", "/p", 200, "p1", 0.001, False,
            predictions is not None, None, body)


def pair(rid: str, prod: list[Any], cand: list[Any]) -> tuple[Any, ...]:
    return (PAIR, rid, time.time(), "disagree", 200, "c1", None, 0.002, prod, cand)


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
    assert [r[0] for r in db.conn.execute("SELECT request_id FROM requests")] == ["new"]
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
    return {"ground_truth": {"labeled": candidate_labeled, "candidate_labeled": candidate_labeled,
                             "production_accuracy": 0.9, "candidate_accuracy": 0.9 + delta,
                             "production_accuracy_paired": 0.9, "accuracy_delta": delta}}


def _accuracy_gates(snapshot: dict[str, Any], gates: GatesConfig) -> list[dict[str, Any]]:
    return [g for g in evaluate(snapshot, gates)["gates"] if g["name"] == "min_accuracy_delta"]


def test_accuracy_gate_is_absent_while_unset() -> None:
    assert _accuracy_gates(_snapshot(1000, -0.5), GatesConfig()) == []


def test_accuracy_gate_is_left_out_before_min_labels() -> None:
    gates = GatesConfig(min_labels=100, min_accuracy_delta=-0.01)
    assert _accuracy_gates(_snapshot(99, -0.5), gates) == []
    assert evaluate(_snapshot(99, -0.5), gates)["verdict"] == "insufficient_data"  # min_samples waits, not this


def test_accuracy_gate_passes_at_or_above_the_threshold_and_fails_below() -> None:
    gates = GatesConfig(min_samples=1, min_labels=100, min_accuracy_delta=-0.01)
    (passed,) = _accuracy_gates(_snapshot(100, -0.01), gates)
    assert (passed["passed"], passed["value"], passed["threshold"]) == (True, -0.01, -0.01)
    (failed,) = _accuracy_gates(_snapshot(100, -0.05), gates)
    assert failed["passed"] is False
    assert "-5%" in failed["reason"]
    assert evaluate(_snapshot(100, -0.05), gates)["verdict"] == "fail"


def test_a_batch_of_any_size_is_written_whole(tmp_path: Path) -> None:
    # Rows go out in statements of power-of-two sizes (1024 down to 1): 2061 = 2x1024 + 8 + 4 + 1,
    # 37 = 32 + 4 + 1. Every row must arrive once, and the version tallies must add up.
    db = database(tmp_path)
    now = time.time()
    db.write([exchange(f"r{k}", now) for k in range(2061)] + [pair(f"r{k}", [1], [0]) for k in range(0, 370, 10)])
    assert db.conn.execute("SELECT count(*), sum(mirrored) FROM requests").fetchone() == (2061, 37)
    versions = dict(db.conn.execute("SELECT version, requests FROM versions").fetchall())
    assert versions == {"p1": 2061, "c1": 37}
    assert db.conn.execute("SELECT outcome FROM requests WHERE request_id = 'r360'").fetchone() == ("disagree",)
