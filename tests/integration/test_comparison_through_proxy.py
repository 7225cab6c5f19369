"""Mirrored pairs through a real proxy: outcomes and numbers against a truth the test computes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from shadowproxy.judging.stats import wilson_interval
from shadowproxy.models import ModelBehaviour, candidate_flips, generate_instances, start_model
from tests.helpers import RunningProxy, Upstream

FULL_MIRROR: dict[str, Any] = {"sample_rate": 1.0}


async def _send_batches(proxy: RunningProxy, batches: list[list[list[float]]], concurrency: int = 16) -> list[bytes]:
    semaphore = asyncio.Semaphore(concurrency)
    answers: list[bytes] = [b""] * len(batches)

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        async with semaphore, session.post(proxy.url + "/v1/models/demo:predict",
                                           data=orjson.dumps({"instances": batches[i]})) as r:
            assert r.status == 200
            answers[i] = await r.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(i, session) for i in range(len(batches))))
    await proxy.settle()
    return answers


async def test_known_flip_share_gives_exactly_that_disagreement(start_proxy) -> None:
    flip_rate = 0.2
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour.candidate(flip_rate=flip_rate, delay_ms=0)) as cand:
        proxy = await start_proxy(prod.url, cand.url, mirror=FULL_MIRROR)
        instances = generate_instances(3000, seed=11)
        batches = [instances[i:i + 3] for i in range(0, len(instances), 3)]
        await _send_batches(proxy, batches)
    expected = sum(candidate_flips(x, flip_rate) for x in instances)
    comparisons = proxy.stats()["comparisons"]
    assert comparisons["total"] == len(instances)
    assert comparisons["disagree"] == expected
    assert comparisons["agree"] == len(instances) - expected
    assert comparisons["candidate_error"] == 0
    lo, hi = comparisons["disagreement_rate_ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(expected, len(instances)))
    assert lo <= flip_rate <= hi


async def test_twin_candidate_agrees_everywhere(start_proxy) -> None:
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour.production(version="twin")) as cand:
        proxy = await start_proxy(prod.url, cand.url, mirror=FULL_MIRROR)
        await _send_batches(proxy, [[x] for x in generate_instances(300, seed=3)])
    comparisons = proxy.stats()["comparisons"]
    assert comparisons["agree"] == 300
    assert comparisons["disagree"] == 0


async def _direct_p50_ms(url: str, n: int = 200, concurrency: int = 8) -> float:
    """The median time a client sees from `url` (a model, or the proxy in front of one) at
    `concurrency`: the delay plus server and loopback overhead, the part of the truth no stand-in
    can make exact."""
    body = orjson.dumps({"instances": [[0.1, 0.2, 0.3, 0.4]]})
    times: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession) -> None:
        async with semaphore:
            started = time.perf_counter()
            async with session.post(url + "/v1/models/demo:predict", data=body) as r:
                await r.read()
            times.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(n)))
    return float(np.quantile(times, 0.5, method="inverted_cdf"))


async def test_percentiles_of_known_delays(start_proxy) -> None:
    # Production answers in 10 ms, the candidate in 40 ms. The proxy measures each upstream from
    # the first byte sent to the last received, so its p50 lies between the delay itself and what
    # a client measures. Client, proxy and models share this test's event loop, so the truths are
    # measured in the same run: the proxy's production exchange lies inside the client's request
    # through it (the same requests: a bound that holds request by request, 2% for the
    # histogram's buckets); the candidate's, against clients calling it directly meanwhile.
    async with await start_model(ModelBehaviour.production(delay_ms=10)) as prod, \
            await start_model(ModelBehaviour.production(delay_ms=40)) as cand:
        proxy = await start_proxy(prod.url, cand.url, mirror=FULL_MIRROR)
        through, direct_production, direct_candidate = await asyncio.gather(
            _direct_p50_ms(proxy.url), _direct_p50_ms(prod.url), _direct_p50_ms(cand.url))
        await proxy.settle()
    stats = proxy.stats()
    assert stats["production"]["requests"] == 200
    production = stats["production"]["latency_ms"]["p50"]
    assert 10.0 <= production <= through * 1.02, (production, through)
    candidate = stats["candidate"]["latency_ms"]["p50"]
    assert 40.0 <= candidate <= direct_candidate * 1.02 + 1.0, (candidate, direct_candidate)
    diff = stats["latency_diff_ms"]["p50"]
    truth = direct_candidate - direct_production
    assert abs(diff - truth) <= 1.0 + 0.02 * truth + 1.0, (diff, truth)  # both sides' 1 ms + 2%


async def test_unparseable_production_answer_is_counted_not_compared(upstream: Upstream, candidate_upstream: Upstream,
                                                                      start_proxy) -> None:
    upstream.answer = lambda seen: "not a kserve answer"
    candidate_upstream.answer = lambda seen: {"predictions": [1]}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR)
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(proxy.url + "/", data=b'{"instances": [[1]]}') as r:
                assert await r.read() == b'"not a kserve answer"'
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert comparisons["unparseable"] == 5
    assert comparisons["total"] == 0
    assert comparisons["candidate_error"] == 0


async def test_unparseable_candidate_answer_is_candidate_error(upstream: Upstream, candidate_upstream: Upstream,
                                                                start_proxy) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 2]}
    candidate_upstream.answer = lambda seen: {"nothing": "here"}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(proxy.url + "/", data=b"{}") as r:
                assert r.status == 200
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert comparisons["candidate_error"] == 4
    assert comparisons["agree"] == comparisons["disagree"] == 0


async def test_batch_length_mismatch_is_candidate_error(upstream: Upstream, candidate_upstream: Upstream,
                                                         start_proxy) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 2, 3]}
    candidate_upstream.answer = lambda seen: {"predictions": [1, 2]}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR)
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/", data=b"{}") as r:
        assert r.status == 200
    await proxy.settle()
    assert proxy.stats()["comparisons"]["candidate_error"] == 1
    assert proxy.stats()["comparisons"]["total"] == 0


async def test_production_error_is_not_compared_and_candidate_5xx_is_error(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/status/404", data=b"{}") as r:  # both 404: no error, no comparison
            assert r.status == 404
        async with s.post(proxy.url + "/status/500", data=b"{}") as r:  # candidate 5xx: always its error
            assert r.status == 500
    await proxy.settle()
    stats = proxy.stats()
    assert stats["comparisons"]["total"] == 0
    assert stats["comparisons"]["candidate_error"] == 1
    assert stats["errors"]["production_error"] == 1


async def test_oversized_answer_is_too_large_not_compared(upstream: Upstream, candidate_upstream: Upstream,
                                                          start_proxy) -> None:
    upstream.answer = lambda seen: {"predictions": [1] * 1000}
    candidate_upstream.answer = lambda seen: {"predictions": [1] * 1000}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR,
                              compare={"max_response_bytes": 100})
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/", data=b"{}") as r:
        assert len(await r.read()) > 100
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert comparisons["too_large"] == 1
    assert comparisons["total"] == 0


async def test_numeric_kind_through_the_proxy(upstream: Upstream, candidate_upstream: Upstream, start_proxy) -> None:
    # Python model servers write NaN as a bare literal (json.dumps' default), which strict JSON lacks.
    upstream.answer = lambda seen: b'{"predictions": [1.0, 2.0, 3.0, NaN]}'
    candidate_upstream.answer = lambda seen: b'{"predictions": [1.0000001, 2.5, 3.0, NaN]}'
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=FULL_MIRROR,
                              compare={"kind": "numeric"})
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/", data=b"{}") as r:
        assert r.status == 200
    await proxy.settle()
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["agree"], comparisons["disagree"]) == (3, 1)
    assert proxy.stats()["differences"]["abs_diff"]["count"] == 4


async def test_comparison_metrics_match_stats(start_proxy) -> None:
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour.candidate(flip_rate=0.3, delay_ms=0)) as cand:
        proxy = await start_proxy(prod.url, cand.url, mirror=FULL_MIRROR)
        await _send_batches(proxy, [[x] for x in generate_instances(200, seed=9)])
        async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    comparisons = proxy.stats()["comparisons"]
    for outcome in ("agree", "disagree", "candidate_error"):
        series = f'shadowproxy_comparisons_total{{outcome="{outcome}",target="candidate"}}'
        assert f"{series} {float(comparisons[outcome])}" in text
    assert f'shadowproxy_upstream_request_duration_seconds_count{{target="candidate"}} {200.0}' in text


async def test_scrape_time_figures_follow_the_stats(start_proxy) -> None:
    async with await start_model(ModelBehaviour.production(output="proba")) as prod, \
            await start_model(ModelBehaviour.candidate(flip_rate=0.5, delay_ms=0, output="proba")) as cand:
        proxy = await start_proxy(prod.url, cand.url, mirror=FULL_MIRROR, compare={"kind": "distribution"},
                                  gates={"min_samples": 10})
        await _send_batches(proxy, [[x] for x in generate_instances(100, seed=4)])
        async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    comparisons = proxy.stats()["comparisons"]
    lower, upper = comparisons["disagreement_rate_ci95"]
    assert f'shadowproxy_disagreement_rate{{target="candidate"}} {comparisons["disagreement_rate"]}' in text
    assert f'shadowproxy_disagreement_rate_ci95{{bound="upper",target="candidate"}} {upper}' in text
    assert 'shadowproxy_promotion_verdict{target="candidate",verdict="fail"} 1.0' in text
    jsd_p90 = proxy.stats()["differences"]["jsd"]["p90"]
    assert jsd_p90 > 0
    assert f'shadowproxy_prediction_difference{{figure="jsd",percentile="p90",target="candidate"}} {jsd_p90}' in text
