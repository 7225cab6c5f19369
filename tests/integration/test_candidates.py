"""Several candidates mirrored at once from one proxy: each judged on its own, none in another's way."""

from __future__ import annotations

import asyncio
import gc
import io
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from shadowproxy.commands.report import report_main
from shadowproxy.models import ModelBehaviour, start_model
from shadowproxy.models.kserve import candidate_flips, generate_instances
from tests.helpers import RunningProxy, closed_port_url

PREDICT = "/v1/models/demo:predict"
GATES = {"min_samples": 300, "max_p99_latency_ratio": 4.0}


async def send(proxy: RunningProxy, instances: list[list[float]], clients: int = 4, **headers: str) -> None:
    """One request per instance, every answer 200 (production's)."""
    pending = iter(instances)

    async def client(session: aiohttp.ClientSession) -> None:
        for instance in pending:
            async with session.post(proxy.url + PREDICT, json={"instances": [instance]}, headers=headers) as r:
                assert r.status == 200
                await r.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


async def admin(proxy: RunningProxy, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        method, proxy.admin_url + path, data=orjson.dumps(body) if body is not None else None
    ) as response:
        return response.status, await response.json()


def candidates(**urls: str) -> list[dict[str, Any]]:
    return [{"name": name, "url": url, "timeout_s": 2.0} for name, url in urls.items()]


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The heap as `serve` leaves it after start-up (collected, then frozen), so a full
    collection over what earlier tests left behind does not land in the latency tail judged here."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


async def test_a_twin_a_flipper_and_a_slow_candidate_get_the_verdicts_their_truths_imply(
    start_proxy: Any, frozen_heap: None
) -> None:
    n = 1000
    instances = generate_instances(n, seed=21)
    flips = sum(candidate_flips(x, 0.3) for x in instances)  # the flipper's known disagreements
    # Latencies far apart against a 10x latency gate: 5 ms for production and the twin, 600 ms for
    # the slow one, so only a tail of tens of milliseconds (a loop shared by four servers, the
    # proxy and the clients) could blur the verdicts. The p99 bounds of 1000 values rest on the
    # fifth largest, not on the single slowest.
    async with await start_model(ModelBehaviour.production(delay_ms=5.0)) as prod, \
            await start_model(ModelBehaviour(role="twin", delay_ms=5.0)) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.3, delay_ms=5.0)) as flipper, \
            await start_model(ModelBehaviour(role="slow", delay_ms=600.0)) as slow:
        entries = candidates(twin=twin.url, flipper=flipper.url, slow=slow.url)
        entries[2]["max_in_flight"] = 2048  # every copy sent: the slow one is judged on all of them
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, gates={"min_samples": 300, "max_p99_latency_ratio": 10.0},
            candidates=entries,
        )
        await send(proxy, instances, clients=2)  # few clients: a short latency tail on a busy machine
        await proxy.settle(timeout=10.0)
        status, stats = await admin(proxy, "/shadow/stats")
        assert status == 200
        _, verdict = await admin(proxy, "/shadow/verdict")

    docs = stats["candidates"]
    assert list(docs) == ["twin", "flipper", "slow"]
    for name, doc in docs.items():
        assert doc["mirror"]["sent"] == n, name
        assert doc["comparisons"]["total"] == n, name
        assert doc["production"] == stats["production"]
    assert docs["twin"]["comparisons"]["disagree"] == 0
    assert docs["flipper"]["comparisons"]["disagree"] == flips
    assert docs["slow"]["comparisons"]["disagree"] == 0
    # The top level describes the first candidate, as it would alone.
    assert stats["comparisons"] == docs["twin"]["comparisons"]
    assert stats["mirror"]["sent"] == n

    per = {name: v["verdict"] for name, v in verdict["candidates"].items()}
    why = {name: [g["reason"] for g in v["gates"]] for name, v in verdict["candidates"].items()}
    assert per == {"twin": "pass", "flipper": "fail", "slow": "fail"}, why
    failed = {
        name: [g["name"] for g in v["gates"] if g["passed"] is False] for name, v in verdict["candidates"].items()
    }
    assert failed == {"twin": [], "flipper": ["max_disagreement_rate"], "slow": ["max_p99_latency_ratio"]}
    assert verdict["verdict"] == "fail"  # the worst
    assert verdict["gates"] == verdict["candidates"]["twin"]["gates"]


async def test_a_dead_candidate_leaves_production_and_the_other_two_unaffected(start_proxy: Any) -> None:
    instances = generate_instances(300, seed=5)
    flips = sum(candidate_flips(x, 0.2) for x in instances)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.2)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, gates=GATES,
            candidates=candidates(twin=twin.url, dead=closed_port_url(), flipper=flipper.url),
        )
        await send(proxy, instances)
        await proxy.settle()
        stats = proxy.stats()
        assert twin.requests == flipper.requests == 300
    assert stats["production"]["requests"] == 300 and stats["production"]["errors"] == 0
    docs = stats["candidates"]
    for name in ("twin", "flipper"):
        assert docs[name]["mirror"]["sent"] == 300
        assert docs[name]["mirror"]["error"] == docs[name]["mirror"]["dropped"] == 0
        assert docs[name]["comparisons"]["total"] == 300
    assert docs["flipper"]["comparisons"]["disagree"] == flips
    dead = docs["dead"]["mirror"]
    # Every copy to the dead one failed or was dropped once it backed off; none was compared.
    assert dead["sampled"] == 300
    assert dead["sent"] + dead["dropped"] == 300
    assert dead["error"] == dead["sent"] > 0
    assert docs["dead"]["comparisons"]["total"] == 0


async def test_a_candidate_at_a_lower_rate_sees_a_subset_of_what_a_higher_rate_one_sees(start_proxy: Any) -> None:
    instances = generate_instances(1000, seed=8)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="half")) as half, \
            await start_model(ModelBehaviour(role="fifth")) as fifth:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 0.5},
            candidates=[
                {"name": "half", "url": half.url},  # mirror.sample_rate
                {"name": "fifth", "url": fifth.url, "sample_rate": 0.2},
            ],
        )
        await send(proxy, instances)
        await proxy.settle()
        seen_half = {r.body for r in half.received}
        seen_fifth = {r.body for r in fifth.received}
        stats = proxy.stats()
    assert seen_fifth <= seen_half
    assert stats["candidates"]["half"]["mirror"]["sent"] == len(seen_half)
    assert stats["candidates"]["fifth"]["mirror"]["sent"] == len(seen_fifth)
    # Binomial(1000, p): within 5 standard deviations.
    assert abs(len(seen_half) - 500) < 5 * (1000 * 0.25) ** 0.5
    assert abs(len(seen_fifth) - 200) < 5 * (1000 * 0.16) ** 0.5


async def test_sample_rate_is_set_for_one_named_candidate_or_for_all(start_proxy: Any) -> None:
    proxy: RunningProxy = await start_proxy(
        closed_port_url(), None, mirror={"sample_rate": 0.1},
        candidates=[
            {"name": "a", "url": closed_port_url()},
            {"name": "b", "url": closed_port_url(), "sample_rate": 0.3},
        ],
    )
    status, doc = await admin(proxy, "/shadow/sample_rate")
    assert (status, doc) == (200, {"sample_rate": 0.1, "candidates": {"a": 0.1, "b": 0.3}})
    status, doc = await admin(proxy, "/shadow/sample_rate", "PUT", {"candidate": "b", "sample_rate": 0.7})
    assert (status, doc) == (200, {"sample_rate": 0.1, "candidates": {"a": 0.1, "b": 0.7}})
    status, doc = await admin(proxy, "/shadow/sample_rate", "PUT", {"candidate": "nope", "sample_rate": 0.7})
    assert status == 404 and "nope" in doc["error"]
    status, doc = await admin(proxy, "/shadow/sample_rate", "PUT", {"sample_rate": 0.25})
    assert (status, doc) == (200, {"sample_rate": 0.25, "candidates": {"a": 0.25, "b": 0.25}})
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'shadowproxy_mirror_sample_rate{target="a"} 0.25' in text
    assert 'shadowproxy_mirror_sample_rate{target="b"} 0.25' in text


async def test_metrics_name_each_candidate_in_target(start_proxy: Any) -> None:
    instances = generate_instances(50, seed=3)
    flips = sum(candidate_flips(x, 0.5) for x in instances)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.5)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, candidates=candidates(twin=twin.url, flipper=flipper.url)
        )
        await send(proxy, instances)
        await proxy.settle()
        async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'shadowproxy_mirror_requests_total{result="sent",target="twin"} 50.0' in text
    assert 'shadowproxy_mirror_requests_total{result="sent",target="flipper"} 50.0' in text
    assert 'shadowproxy_comparisons_total{outcome="disagree",target="twin"} 0.0' in text
    assert f'shadowproxy_comparisons_total{{outcome="disagree",target="flipper"}} {float(flips)}' in text
    assert 'shadowproxy_upstream_request_duration_seconds_count{target="twin"} 50.0' in text
    assert 'shadowproxy_upstream_request_duration_seconds_count{target="flipper"} 50.0' in text
    assert f'shadowproxy_disagreement_rate{{target="flipper"}} {flips / 50}' in text
    assert 'shadowproxy_promotion_verdict{target="twin",verdict="insufficient_data"} 1.0' in text


@pytest.mark.parametrize(("chosen", "code"), [(None, 1), ("twin", 3), ("flipper", 1), ("nope", 2)])
async def test_report_exits_by_the_worst_candidate_or_the_one_named(
    start_proxy: Any, chosen: str | None, code: int
) -> None:
    instances = generate_instances(120, seed=4)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.9)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, gates={"min_samples": 100},
            candidates=candidates(twin=twin.url, flipper=flipper.url),
        )
        # The twin passes nothing it cannot: a latency gate on 120 pairs has no upper bound yet.
        await send(proxy, instances)
        await proxy.settle()
        out, err = io.StringIO(), io.StringIO()
        result = await report_main([proxy.admin_url], candidate=chosen, stdout=out, stderr=err)
    assert result == code, err.getvalue()
    if chosen is None:
        text = out.getvalue()
        assert "Candidates" in text and "twin" in text and "flipper" in text
    if chosen == "nope":
        assert "no candidate named 'nope'" in err.getvalue()


async def test_two_admin_urls_merge_several_candidates_to_the_figures_of_one(start_proxy: Any) -> None:
    first, second = generate_instances(200, seed=11), generate_instances(150, seed=12)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.25)) as flipper:
        sections: dict[str, Any] = {
            "mirror": {"sample_rate": 1.0}, "candidates": candidates(twin=twin.url, flipper=flipper.url)
        }
        a = await start_proxy(prod.url, None, **sections)
        b = await start_proxy(prod.url, None, **sections)
        whole = await start_proxy(prod.url, None, **sections)
        await send(a, first)
        await send(b, second)
        await send(whole, first + second)
        for proxy in (a, b, whole):
            await proxy.settle()
        out = io.StringIO()
        await report_main([a.admin_url, b.admin_url], as_json=True, stdout=out, stderr=io.StringIO())
        merged = orjson.loads(out.getvalue())
        out = io.StringIO()
        await report_main([whole.admin_url], as_json=True, stdout=out, stderr=io.StringIO())
        one = orjson.loads(out.getvalue())
    for name in ("twin", "flipper"):
        got, want = merged["stats"]["candidates"][name], one["stats"]["candidates"][name]
        assert got["mirror"] == want["mirror"]
        assert got["comparisons"] == want["comparisons"]
    flips = sum(candidate_flips(x, 0.25) for x in first + second)
    assert merged["stats"]["candidates"]["flipper"]["comparisons"]["disagree"] == flips
    assert merged["candidates"]["flipper"]["verdict"] == one["candidates"]["flipper"]["verdict"]


SLICES = [
    {"name": "alpha", "path_prefix": "/v1/models/alpha"},
    {"name": "acme", "header": "X-Tenant", "value": "acme"},
    {"name": "beta-acme", "path_prefix": "/v1/models/beta", "header": "X-Tenant", "value": "acme"},
]


def slice_of(path: str, tenant: str) -> str:
    """The test's own reading of SLICES: first match in order, else other."""
    if path.startswith("/v1/models/alpha"):
        return "alpha"
    if tenant == "acme":
        return "acme"  # before beta-acme, which it shadows
    return "other"


async def test_slice_figures_equal_the_tests_own_counts_per_slice(start_proxy: Any) -> None:
    instances = generate_instances(240, seed=17)
    paths = ["/v1/models/alpha:predict", "/v1/models/beta:predict", "/v1/models/gamma:predict"]
    tenants = ["acme", "other", ""]
    requests = [(paths[i % 3], tenants[(i // 3) % 3], x) for i, x in enumerate(instances)]
    truth: dict[str, dict[str, int]] = {}
    for path, tenant, x in requests:
        counts = truth.setdefault(slice_of(path, tenant), {"requests": 0, "flips": 0})
        counts["requests"] += 1
        counts["flips"] += candidate_flips(x, 0.3)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.3)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, slices=SLICES,
            candidates=candidates(twin=twin.url, flipper=flipper.url),
        )
        async with aiohttp.ClientSession() as session:
            for path, tenant, x in requests:
                headers = {"X-Tenant": tenant} if tenant else {}
                async with session.post(proxy.url + path, json={"instances": [x]}, headers=headers) as r:
                    assert r.status == 200
        await proxy.settle()
        stats = proxy.stats()
        async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    slices = stats["slices"]
    assert list(slices) == ["alpha", "acme", "beta-acme", "other"]
    for name, doc in slices.items():
        want = truth.get(name, {"requests": 0, "flips": 0})
        assert set(doc) == {"production", "twin", "flipper"}
        assert doc["production"]["requests"] == want["requests"], name
        for cand in ("twin", "flipper"):
            assert doc[cand]["requests"] == want["requests"], (name, cand)
            assert doc[cand]["comparisons"]["total"] == want["requests"], (name, cand)
        assert doc["twin"]["comparisons"]["disagree"] == 0
        assert doc["flipper"]["comparisons"]["disagree"] == want["flips"], name
        requests_series = f'shadowproxy_slice_requests_total{{slice="{name}",target="production"}}'
        assert f"{requests_series} {float(want['requests'])}" in text
        disagree_series = f'shadowproxy_slice_comparisons_total{{outcome="disagree",slice="{name}",target="flipper"}}'
        assert f"{disagree_series} {float(want['flips'])}" in text
    assert slices["beta-acme"]["production"]["requests"] == 0  # shadowed by acme, earlier in order
    assert sum(doc["production"]["requests"] for doc in slices.values()) == stats["production"]["requests"] == 240
    assert slices["alpha"]["production"]["latency_ms"]["p50"] > 0


async def test_a_hanging_candidate_delays_neither_production_nor_the_other_candidates(start_proxy: Any) -> None:
    instances = generate_instances(60, seed=2)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="hanging", delay_ms=5000.0)) as hanging:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0},
            candidates=[
                {"name": "twin", "url": twin.url},
                {"name": "hanging", "url": hanging.url, "timeout_s": 0.5, "max_in_flight": 4},
            ],
        )
        loop = asyncio.get_running_loop()
        slowest = 0.0
        async with aiohttp.ClientSession() as session:
            for x in instances:
                started = loop.time()
                async with session.post(proxy.url + PREDICT, json={"instances": [x]}) as r:
                    assert r.status == 200
                    await r.read()
                slowest = max(slowest, loop.time() - started)
        await proxy.settle(timeout=3.0)
        stats = proxy.stats()
    assert slowest < 0.25  # far below the hanging candidate's 5 s and its 0.5 s timeout
    twin_doc, hanging_doc = stats["candidates"]["twin"], stats["candidates"]["hanging"]
    # The twin saw and compared every request; the hanging one is bounded at 4 in flight, the rest
    # dropped and counted, its copies timed out.
    assert twin_doc["mirror"]["sent"] == twin_doc["comparisons"]["agree"] == 60
    assert hanging_doc["mirror"]["sent"] + hanging_doc["mirror"]["dropped"] == 60
    assert hanging_doc["mirror"]["dropped"] > 0
    assert hanging_doc["mirror"]["error"] == hanging_doc["mirror"]["sent"]
    assert hanging_doc["comparisons"]["candidate_error"] == hanging_doc["mirror"]["sent"]
