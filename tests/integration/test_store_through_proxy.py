"""The audit store against real model servers: audit rows, delayed labels, redaction,
retention, failure containment. Subprocess behaviour (SIGTERM, kill -9, the CLI) is in
test_store_serve_process.py; the store's parts without a proxy in tests/unit/test_store_records.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shadowproxy.judging.stats import wilson_interval
from shadowproxy.models import (
    ModelBehaviour,
    RunningModel,
    candidate_flips,
    generate_instances,
    predict_labels,
    start_model,
)
from shadowproxy.store.writer import AuditStore
from tests.helpers import RunningProxy, Upstream

PREDICT = "/v1/models/demo:predict"
FLIP_RATE = 0.3


@pytest.fixture
async def models() -> AsyncIterator[tuple[RunningModel, RunningModel]]:
    production = await start_model(ModelBehaviour.production(version="prod-7"))
    candidate = await start_model(ModelBehaviour.candidate(flip_rate=FLIP_RATE, delay_ms=0.0, version="cand-8"))
    yield production, candidate
    await production.close()
    await candidate.close()


def audit_store(proxy: RunningProxy) -> AuditStore:
    (store,) = [c for c in proxy.proxy.components if isinstance(c, AuditStore)]
    return store


async def predict(session: aiohttp.ClientSession, proxy: RunningProxy, instances: list[list[float]],
                  request_id: str) -> dict[str, Any]:
    async with session.post(proxy.url + PREDICT, json={"instances": instances},
                            headers={"X-Request-ID": request_id}) as r:
        assert r.status == 200
        answer: dict[str, Any] = await r.json()
        return answer


async def audit(session: aiohttp.ClientSession, proxy: RunningProxy, request_id: str) -> tuple[int, Any]:
    async with session.get(f"{proxy.admin_url}/shadow/requests/{request_id}") as r:
        return r.status, await r.json()


async def post_labels(session: aiohttp.ClientSession, proxy: RunningProxy, body: Any,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else None
    async with session.post(f"{proxy.admin_url}/shadow/labels", data=data,
                            json=None if data is not None else body, headers=headers) as r:
        return r.status, await r.json()


async def start(start_proxy: Any, production: str, candidate: str, tmp_path: Path, *, mirror: float = 1.0,
                **store: Any) -> RunningProxy:
    proxy: RunningProxy = await start_proxy(
        production, candidate, mirror={"sample_rate": mirror},
        store={"path": str(tmp_path / "audit.db"), "sample_rate": 0.0, **store},
    )
    return proxy


async def test_audit_row_carries_both_versions_status_and_outcome(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path)
    instances = generate_instances(6, seed=11)
    expected_prod = predict_labels(instances)
    flips = [candidate_flips(row, FLIP_RATE) for row in instances]
    assert any(flips), "the seed must give at least one disagreement"
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, instances, "audit-1")
        await proxy.settle()
        status, row = await audit(s, proxy, "audit-1")
    assert status == 200
    assert (row["request_id"], row["method"], row["path"], row["status"]) == ("audit-1", "POST", PREDICT, 200)
    assert row["mirrored"] is True
    assert (row["production_version"], row["candidate_version"]) == ("prod-7", "cand-8")
    assert row["outcome"] == "disagree"
    assert row["predictions"]["production"] == expected_prod
    assert row["predictions"]["candidate"] == [(p + 1) % 3 if f else p for p, f in zip(expected_prod, flips,
                                                                                          strict=True)]
    assert row["production_latency_ms"] > 0 and row["candidate_latency_ms"] > 0


async def test_unmirrored_request_has_a_row_without_candidate_side(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path, mirror=0.0)
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, generate_instances(2, seed=1), "plain-1")
        status, row = await audit(s, proxy, "plain-1")
    assert status == 200
    assert row["mirrored"] is False
    assert (row["production_version"], row["candidate_version"], row["outcome"]) == ("prod-7", None, None)
    assert row["predictions"] == {"production": None, "candidate": None}  # store.sample_rate 0


async def test_store_sample_keeps_production_predictions_without_a_candidate(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path, mirror=0.0, sample_rate=1.0)
    instances = generate_instances(3, seed=2)
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, instances, "sampled-1")
        _, row = await audit(s, proxy, "sampled-1")
    assert row["predictions"] == {"production": predict_labels(instances), "candidate": None}


async def test_version_comes_from_the_json_pointer_when_the_header_is_absent(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path,
                        version_header="X-Not-Sent", version_path="/model_version")
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, generate_instances(1, seed=3), "pointer-1")
        await proxy.settle()
        _, row = await audit(s, proxy, "pointer-1")
    assert (row["production_version"], row["candidate_version"]) == ("prod-7", "cand-8")


async def test_a_request_id_seen_twice_keeps_the_latest_record(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path, mirror=0.0)
    async with aiohttp.ClientSession() as s:
        for path in ("/first", "/status/404"):
            async with s.post(proxy.url + path, data=b"{}", headers={"X-Request-ID": "twice"}) as r:
                await r.read()
        _, row = await audit(s, proxy, "twice")
    assert (row["path"], row["status"]) == ("/status/404", 404)


async def test_unknown_request_id_is_404(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path)
    async with aiohttp.ClientSession() as s:
        status, body = await audit(s, proxy, "never-seen")
    assert status == 404
    assert "never-seen" in body["error"]


async def test_late_labels_join_and_give_the_accuracies_of_a_known_truth(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path, sample_rate=1.0)
    batches = {f"gt-{i}": generate_instances(5, seed=100 + i) for i in range(24)}
    async with aiohttp.ClientSession() as s:
        for n, (rid, instances) in enumerate(batches.items()):
            if n == 16:  # the rest: production-only predictions from the store's own sample
                assert proxy.proxy.mirror is not None
                proxy.proxy.mirror.set_sample_rate(0.0)
            await predict(s, proxy, instances, rid)
        await proxy.settle()
        await asyncio.sleep(0.3)  # labels arrive after the rows were written

        # The truth: production is right except on every third instance; the candidate answers
        # (p + 1) % 3 on its flipped instances (candidate_flips).
        labels, prod_right, cand_right, paired_prod_right = [], [], [], []
        k = 0
        for n, (rid, instances) in enumerate(batches.items()):
            for index, (row, p) in enumerate(zip(instances, predict_labels(instances), strict=True)):
                truth = (p + 2) % 3 if k % 3 == 0 else p
                k += 1
                labels.append({"request_id": rid, "index": index, "label": truth})
                prod_right.append(p == truth)
                if n < 16:
                    c = (p + 1) % 3 if candidate_flips(row, FLIP_RATE) else p
                    cand_right.append(c == truth)
                    paired_prod_right.append(p == truth)
        status, answer = await post_labels(s, proxy, labels)
    assert status == 200
    assert answer == {"matched": 120, "unmatched": 0, "invalid": 0, "errors": []}
    gt = proxy.stats()["ground_truth"]
    assert gt["labeled"] == 120
    assert gt["candidate_labeled"] == 80
    assert gt["production_accuracy"] == pytest.approx(sum(prod_right) / 120)
    assert gt["production_accuracy_ci95"] == pytest.approx(list(wilson_interval(sum(prod_right), 120)))
    assert gt["candidate_accuracy"] == pytest.approx(sum(cand_right) / 80)
    assert gt["candidate_accuracy_ci95"] == pytest.approx(list(wilson_interval(sum(cand_right), 80)))
    assert gt["accuracy_delta"] == pytest.approx((sum(cand_right) - sum(paired_prod_right)) / 80)
    assert gt["accuracy_delta"] != 0


async def test_a_label_sent_again_replaces_the_first(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path, mirror=0.0, sample_rate=1.0)
    instances = generate_instances(1, seed=5)
    right = predict_labels(instances)[0]
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, instances, "again")
        await post_labels(s, proxy, [{"request_id": "again", "index": 0, "label": (right + 1) % 3}])
        await post_labels(s, proxy, [{"request_id": "again", "index": 0, "label": right}])
    gt = proxy.stats()["ground_truth"]
    assert (gt["labeled"], gt["production_accuracy"]) == (1, 1.0)


async def test_unknown_ids_and_malformed_items_are_reported_per_item(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path, mirror=0.0, sample_rate=1.0)
    async with aiohttp.ClientSession() as s:
        await predict(s, proxy, generate_instances(2, seed=6), "known")
        items: list[Any] = [
            {"request_id": "known", "index": 1, "label": 0},  # 0 matched
            {"request_id": "nobody", "index": 0, "label": 0},  # 1 unmatched: unknown id
            {"request_id": "known", "index": 2, "label": 0},  # 2 unmatched: no prediction there
            "not an object",  # 3 invalid
            {"request_id": "known", "index": 0},  # 4 invalid: no label
            {"request_id": "known", "index": True, "label": 0},  # 5 invalid: bool index
            {"request_id": "known", "index": -1, "label": 0},  # 6 invalid
            {"request_id": 7, "index": 0, "label": 0},  # 7 invalid
        ]
        status, answer = await post_labels(s, proxy, items)
    assert status == 200
    assert (answer["matched"], answer["unmatched"], answer["invalid"]) == (1, 2, 5)
    assert [e["item"] for e in answer["errors"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(isinstance(e["error"], str) and e["error"] for e in answer["errors"])


@pytest.mark.parametrize("body", [b'{"request_id": "x", "index": 0, "label": 1}', b"not json", b""])
async def test_labels_body_that_is_not_a_json_list_is_400(
    upstream: Upstream, start_proxy: Any, tmp_path: Path, body: bytes
) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path)
    async with aiohttp.ClientSession() as s:
        status, answer = await post_labels(s, proxy, body)
    assert status == 400
    assert "list" in answer["error"]


async def test_labels_need_the_token_when_one_is_set(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy: RunningProxy = await start_proxy(upstream.url, upstream.url, admin={"token": "s3cret"},
                                            store={"path": str(tmp_path / "a.db")})
    async with aiohttp.ClientSession() as s:
        assert (await post_labels(s, proxy, []))[0] == 401
        status, answer = await post_labels(s, proxy, [], headers={"Authorization": "Bearer s3cret"})
    assert (status, answer["matched"]) == (200, 0)


async def test_redaction_removes_the_configured_fields_from_stored_bodies(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 0], "debug": {"token": "t0k3n", "host": "m1"}}
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path, mirror=1.0, store_bodies=True,
                        redact=["/user/email", "/instances/*/ssn", "/debug/token"])
    request = {"user": {"email": "a@example.com", "id": 42},
               "instances": [{"ssn": "123-45-6789", "age": 30}, {"ssn": "987-65-4321", "age": 40}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/p", json=request, headers={"X-Request-ID": "pii"}) as r:
            assert r.status == 200
        await proxy.settle()
        _, row = await audit(s, proxy, "pii")
    assert row["bodies"]["request"] == {"user": {"id": 42}, "instances": [{"age": 30}, {"age": 40}]}
    assert row["bodies"]["production"] == {"predictions": [1, 0], "debug": {"host": "m1"}}
    assert row["bodies"]["candidate"] == {"predictions": [1, 0], "debug": {"host": "m1"}}
    raw = (tmp_path / "audit.db").read_bytes() + (tmp_path / "audit.db-wal").read_bytes()
    for secret in (b"a@example.com", b"123-45-6789", b"987-65-4321", b"t0k3n"):
        assert secret not in raw


async def test_bodies_are_not_stored_by_default(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path, sample_rate=1.0)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/p", data=b'{"instances": [[1]]}', headers={"X-Request-ID": "nb"}) as r:
            assert r.status == 200
        await proxy.settle()
        _, row = await audit(s, proxy, "nb")
    assert "bodies" not in row


async def test_retention_keeps_only_the_newest_max_rows(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path, mirror=0.0, max_rows=5,
                        flush_interval_s=0.05)
    store = audit_store(proxy)
    store.writer.prune_interval_s = 0.05
    async with aiohttp.ClientSession() as s:
        for i in range(12):
            async with s.post(proxy.url + "/", data=b"x", headers={"X-Request-ID": f"keep-{i:02d}"}) as r:
                await r.read()
        ids: list[str] = []
        for _ in range(50):
            ids = await store.call(lambda db: [r[0] for r in db.conn.execute(
                "SELECT request_id FROM requests UNION SELECT request_id FROM batch_entries ORDER BY 1")])
            if len(ids) <= 5:
                break
            await asyncio.sleep(0.05)
        assert ids == [f"keep-{i:02d}" for i in range(7, 12)]
        assert (await audit(s, proxy, "keep-00"))[0] == 404


async def test_read_only_store_path_does_not_stop_production_traffic(
    upstream: Upstream, start_proxy: Any
) -> None:
    # /proc refuses new files even to root (tests run as root, where chmod would not stop writes).
    proxy: RunningProxy = await start_proxy(upstream.url, upstream.url, mirror={"sample_rate": 1.0},
                                            store={"path": "/proc/shadowproxy-audit.db", "sample_rate": 1.0})
    store = audit_store(proxy)
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(proxy.url + "/", data=b"ok", headers={"X-Request-ID": f"ro-{i}"}) as r:
                assert (r.status, await r.read()) == (200, b"ok")
        await proxy.settle()
        status, body = await audit(s, proxy, "ro-0")
        assert status == 503 and "unavailable" in body["error"]
        async with s.get(proxy.admin_url + "/shadow/stats") as r:
            assert (await r.json())["ground_truth"]["labeled"] == 0
    for _ in range(50):
        if store.metrics.lost._value.get() >= 10:
            break
        await asyncio.sleep(0.05)
    assert store.metrics.errors_by_op["open"]._value.get() >= 1
    assert store.metrics.lost._value.get() == 10  # 5 exchanges + 5 pairs, counted, not written


async def test_a_full_disk_is_counted_and_traffic_goes_on(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path, mirror=0.0, store_bodies=True,
                        sample_rate=1.0, flush_interval_s=0.05)
    store = audit_store(proxy)
    # SQLITE_FULL, as on a full disk: the file may not grow past its current size.
    await store.call(lambda db: db.conn.execute(
        "PRAGMA max_page_count = " + str(db.conn.execute("PRAGMA page_count").fetchone()[0])))
    big = b'{"x": "' + b"y" * 200_000 + b'"}'
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(proxy.url + "/", data=big, headers={"X-Request-ID": f"full-{i}"}) as r:
                assert r.status == 200
                assert len(await r.read()) == len(big)
        await store.call(lambda db: None)
    assert store.metrics.errors_by_op["write"]._value.get() >= 1
    assert store.metrics.lost._value.get() >= 1


async def test_ground_truth_block_is_empty_before_labels(upstream: Upstream, start_proxy: Any, tmp_path: Path) -> None:
    proxy = await start(start_proxy, upstream.url, upstream.url, tmp_path)
    gt = proxy.stats()["ground_truth"]
    assert (gt["labeled"], gt["candidate_labeled"], gt["production_accuracy"]) == (0, 0, 0.0)
    assert gt["production_accuracy_ci95"] == [0.0, 1.0]


async def test_version_metric_counts_each_target(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy = await start(start_proxy, production.url, candidate.url, tmp_path)
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            await predict(s, proxy, generate_instances(1, seed=i), f"v-{i}")
        await proxy.settle()
        await audit(s, proxy, "v-0")  # the writer has caught up
        async with s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'shadowproxy_model_version_requests_total{target="production",version="prod-7"} 3.0' in text
    assert 'shadowproxy_model_version_requests_total{target="candidate",version="cand-8"} 3.0' in text
    assert "shadowproxy_store_dropped_total 0.0" in text


async def test_the_verdict_metric_counts_the_accuracy_gate_as_the_verdict_endpoint_does(
    models: tuple[RunningModel, RunningModel], start_proxy: Any, tmp_path: Path
) -> None:
    production, candidate = models
    proxy: RunningProxy = await start_proxy(
        production.url, candidate.url, mirror={"sample_rate": 1.0},
        store={"path": str(tmp_path / "audit.db"), "sample_rate": 0.0},
        gates={"min_samples": 1, "min_labels": 1, "min_accuracy_delta": 0.0, "max_disagreement_rate": 1.0},
    )
    batches = {f"acc-{i}": generate_instances(5, seed=300 + i) for i in range(30)}
    async with aiohttp.ClientSession() as s:
        for rid, instances in batches.items():
            await predict(s, proxy, instances, rid)
        await proxy.settle()
        await asyncio.sleep(0.3)
        # Production's predictions are the truth: the candidate, wrong on its flips, is worse.
        labels = [{"request_id": rid, "index": i, "label": p}
                  for rid, instances in batches.items() for i, p in enumerate(predict_labels(instances))]
        status, _ = await post_labels(s, proxy, labels)
        assert status == 200
        async with s.get(proxy.admin_url + "/shadow/verdict") as r:
            verdict = (await r.json())["verdict"]
        async with s.get(proxy.admin_url + "/metrics") as r:
            exposition = await r.text()
    assert verdict == "fail"  # the latency gate still waits: only the accuracy gate decides
    assert f'shadowproxy_promotion_verdict{{target="candidate",verdict="{verdict}"}} 1.0' in exposition
