"""Mirroring to the candidate, end to end: a real proxy between real loopback model servers.

Each test checks one behaviour of the mirror's contract (docs/comparison.md, "Mirror counts"):
what the candidate receives, what the client never sees, what is counted (sampled / sent / error /
dropped / skipped) and that nothing the candidate does (slow, hanging, refusing) reaches the client.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import RunningProxy, Upstream, closed_port_url, raw_exchange

MIRROR_ALL = {"sample_rate": 1.0}


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False)


async def post(session: aiohttp.ClientSession, url: str, body: bytes = b'{"instances": [[1, 2]]}',
               **kwargs: Any) -> tuple[int, bytes, float]:
    """POST, return status, body and the client's wall time for the whole answer."""
    t0 = time.monotonic()
    async with session.post(url, data=body, **kwargs) as r:
        data = await r.read()
    return r.status, data, time.monotonic() - t0


async def admin_stats(proxy: RunningProxy) -> dict[str, Any]:
    async with client() as s, s.get(proxy.admin_url + "/shadow/stats") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def mirror_metrics(proxy: RunningProxy) -> dict[str, float]:
    """`shadowproxy_mirror_requests_total` by result, plus the in-flight gauge, from /metrics."""
    async with client() as s, s.get(proxy.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shadowproxy_mirror_requests_total":
                out[sample.labels["result"]] = sample.value
            elif sample.name == "shadowproxy_mirror_in_flight":
                out["in_flight"] = sample.value
    return out


async def reason_metrics(proxy: RunningProxy) -> dict[str, dict[str, int]]:
    """The by-reason label counts of /metrics, in the layout of `/shadow/stats` `mirror`."""
    async with client() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, dict[str, int]] = {"skipped_by_reason": {}, "dropped_by_reason": {}, "errors_by_kind": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shadowproxy_mirror_skipped_total":
                out["skipped_by_reason"][sample.labels["reason"]] = int(sample.value)
            elif sample.name == "shadowproxy_mirror_dropped_total":
                out["dropped_by_reason"][sample.labels["reason"]] = int(sample.value)
            elif sample.name == "shadowproxy_upstream_failures_total" and sample.labels["target"] == "candidate":
                out["errors_by_kind"][sample.labels["kind"]] = int(sample.value)
    return out


def mirror_counts(proxy: RunningProxy) -> dict[str, int]:
    m = proxy.stats()["mirror"]
    return {k: m[k] for k in ("sampled", "sent", "error", "dropped", "skipped")}


# -- eligibility: sampled but not sent is counted skipped -----------------------------------------

async def test_sampled_get_is_counted_skipped_and_not_sent(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    async with client() as s:
        for _ in range(3):
            async with s.get(proxy.url + "/v1/models/m") as r:
                assert r.status == 200
        for _ in range(2):
            assert (await post(s, proxy.url + "/v1/models/m:predict"))[0] == 200
    await proxy.settle()
    assert mirror_counts(proxy) == {"sampled": 5, "sent": 2, "error": 0, "dropped": 0, "skipped": 3}
    assert [r["method"] for r in candidate_upstream.requests] == ["POST", "POST"]
    assert len(upstream.requests) == 5


async def test_body_over_mirror_max_body_bytes_by_content_length_is_skipped(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url,
                              mirror={"sample_rate": 1.0, "max_body_bytes": 1000})
    big, at_limit = os.urandom(1001), os.urandom(1000)
    async with client() as s:
        status, body, _ = await post(s, proxy.url + "/big", big)
        assert (status, body) == (200, big)  # production still gets (and echoes) all of it
        assert (await post(s, proxy.url + "/at-limit", at_limit))[:2] == (200, at_limit)
    await proxy.settle()
    assert mirror_counts(proxy) == {"sampled": 2, "sent": 1, "error": 0, "dropped": 0, "skipped": 1}
    assert [(r["path"], r["body"]) for r in candidate_upstream.requests] == [("/at-limit", at_limit)]


def chunked_request(path: str, chunks: list[bytes]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


async def test_chunked_body_growing_past_mirror_max_body_bytes_is_skipped(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url,
                              mirror={"sample_rate": 1.0, "max_body_bytes": 1000})
    chunks = [os.urandom(400) for _ in range(4)]  # 1600 bytes, no Content-Length up front
    raw = await raw_exchange(proxy.host, proxy.port, chunked_request("/chunked", chunks))
    assert raw.startswith(b"HTTP/1.1 200")
    await proxy.settle()
    assert upstream.requests[-1]["body"] == b"".join(chunks)
    assert candidate_upstream.requests == []
    assert mirror_counts(proxy) == {"sampled": 1, "sent": 0, "error": 0, "dropped": 0, "skipped": 1}
    assert proxy.stats()["mirror"]["in_flight"] == 0


async def test_chunked_body_within_the_limit_reaches_the_candidate_whole(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url,
                              mirror={"sample_rate": 1.0, "max_body_bytes": 1000})
    chunks = [os.urandom(300) for _ in range(3)]
    raw = await raw_exchange(proxy.host, proxy.port, chunked_request("/chunked", chunks))
    assert raw.startswith(b"HTTP/1.1 200")
    await proxy.settle()
    assert [r["body"] for r in candidate_upstream.requests] == [b"".join(chunks)]
    assert mirror_counts(proxy)["sent"] == 1


# -- what the candidate receives -------------------------------------------------------------------

async def test_candidate_sees_the_same_request_as_production_plus_shadow_header(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url,
                              mirror={"sample_rate": 1.0, "methods": ["POST", "PUT"]})
    payload = os.urandom(3000)
    headers = {"X-Request-ID": "req-42", "X-Custom": "yes", "Content-Type": "application/octet-stream"}
    async with client() as s, s.put(proxy.url + "/v1/models/m:predict?a=1&b=two", data=payload,
                                    headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "req-42"
    await proxy.settle()
    prod, cand = upstream.requests[-1], candidate_upstream.requests[-1]
    assert cand["method"] == prod["method"] == "PUT"
    assert cand["path"] == prod["path"] == "/v1/models/m:predict?a=1&b=two"
    assert cand["body"] == prod["body"] == payload
    assert cand["headers"]["X-Shadow-Request"] == "true"
    assert "X-Shadow-Request" not in prod["headers"]
    assert cand["headers"]["X-Request-ID"] == prod["headers"]["X-Request-ID"] == "req-42"
    assert cand["headers"]["Host"] == candidate_upstream.url.removeprefix("http://")
    assert prod["headers"]["Host"] == upstream.url.removeprefix("http://")
    for name in ("X-Custom", "Content-Type", "X-Forwarded-For", "X-Forwarded-Proto"):
        assert cand["headers"][name] == prod["headers"][name], name
    # Every other field too, each once (the candidate's copy is the rendered block production got).
    skip = {"host", "x-shadow-request"}
    assert sorted((k.lower(), v) for k, v in cand["headers"].items() if k.lower() not in skip) == sorted(
        (k.lower(), v) for k, v in prod["headers"].items() if k.lower() not in skip)


async def test_generated_request_id_is_the_same_for_both_models_and_the_client(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    async with client() as s, s.post(proxy.url + "/p", data=b"{}") as r:
        returned = r.headers["X-Request-ID"]
    await proxy.settle()
    assert returned
    assert upstream.requests[-1]["headers"]["X-Request-ID"] == returned
    assert candidate_upstream.requests[-1]["headers"]["X-Request-ID"] == returned


# -- isolation: the candidate never reaches the client ---------------------------------------------

async def test_client_gets_production_bytes_exactly_never_the_candidates(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    candidate_upstream.status = 500  # and it answers a different body, below
    candidate_upstream.answer = lambda seen: {"predictions": ["from the candidate"]}
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    payload = b'{"instances": [[1.0, 2.0]]}'
    async with client() as s:
        async with s.post(upstream.url + "/m", data=payload) as r:
            direct_status, direct_body = r.status, await r.read()
        for _ in range(5):
            status, body, _ = await post(s, proxy.url + "/m", payload)
            assert (status, body) == (direct_status, direct_body)
    await proxy.settle()
    assert len(candidate_upstream.requests) == 5
    assert b"candidate" not in direct_body


async def test_slow_candidate_does_not_delay_the_client(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    candidate_upstream.delay_s = 1.0
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    async with client() as s:
        times = [(await post(s, proxy.url + "/m"))[2] for _ in range(3)]
    assert max(times) < 0.3, f"client answer times {times} with a 1 s candidate"
    await proxy.settle()
    assert len(candidate_upstream.requests) == 3  # the candidate did get (and answer) them all
    assert mirror_counts(proxy) == {"sampled": 3, "sent": 3, "error": 0, "dropped": 0, "skipped": 0}


async def test_full_max_in_flight_drops_and_production_answers_all_fast(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    candidate_upstream.hang = True
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              candidate={"max_in_flight": 2, "timeout_s": 5.0},
                              listen={"drain_timeout_s": 0.2})
    async with client() as s:
        results = await asyncio.gather(*(post(s, proxy.url + f"/m/{i}", b"%d" % i) for i in range(10)))
    for i, (status, body, elapsed) in enumerate(results):
        assert (status, body) == (200, b"%d" % i)
        assert elapsed < 0.5, f"request {i} took {elapsed:.3f} s behind a hanging candidate"
    assert mirror_counts(proxy) == {"sampled": 10, "sent": 2, "error": 0, "dropped": 8, "skipped": 0}
    assert proxy.stats()["mirror"]["in_flight"] == 2
    await asyncio.sleep(0.05)
    assert len(candidate_upstream.requests) == 2


async def test_candidate_timeout_is_counted_as_error(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    candidate_upstream.delay_s = 1.0
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL,
                              candidate={"timeout_s": 0.2})
    async with client() as s:
        status, _, elapsed = await post(s, proxy.url + "/m")
    assert status == 200 and elapsed < 0.3
    await proxy.settle()
    assert mirror_counts(proxy) == {"sampled": 1, "sent": 1, "error": 1, "dropped": 0, "skipped": 0}
    stats = proxy.stats()
    assert stats["mirror"]["in_flight"] == 0
    assert stats["comparisons"]["candidate_error"] == 1
    assert stats["comparisons"]["total"] == 0


async def test_candidate_5xx_is_a_candidate_error_comparison_not_a_mirror_error(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    upstream.answer = lambda seen: {"predictions": [1]}
    candidate_upstream.status = 503
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    async with client() as s:
        for _ in range(3):
            assert (await post(s, proxy.url + "/m"))[0] == 200
    await proxy.settle()
    # Mirror `error` is a failed exchange (timeout, connection); a 5xx is an answer (docs/comparison.md).
    assert mirror_counts(proxy) == {"sampled": 3, "sent": 3, "error": 0, "dropped": 0, "skipped": 0}
    comparisons = proxy.stats()["comparisons"]
    assert (comparisons["candidate_error"], comparisons["total"]) == (3, 0)


async def test_refused_candidate_errors_then_backs_off_and_production_is_unaffected(
    upstream: Upstream, start_proxy
) -> None:
    backoff_after = 3
    proxy = await start_proxy(upstream.url, closed_port_url(), mirror=MIRROR_ALL,
                              candidate={"backoff_after": backoff_after})
    async with client() as s:
        for i in range(backoff_after):
            status, body, _ = await post(s, proxy.url + "/m", b"%d" % i)
            assert (status, body) == (200, b"%d" % i)
            await proxy.settle()
        assert mirror_counts(proxy) == {"sampled": 3, "sent": 3, "error": 3, "dropped": 0, "skipped": 0}
        # Backing off (0.1 s at first): the next requests are dropped without a connection attempt.
        for i in range(5):
            status, body, _ = await post(s, proxy.url + "/m", b"b%d" % i)
            assert (status, body) == (200, b"b%d" % i)
        await proxy.settle()
        counts = mirror_counts(proxy)
        assert counts["sent"] == counts["error"] >= backoff_after
        assert counts["dropped"] >= 1
        assert counts["sent"] + counts["dropped"] == 8
        # The back-off ends: the next request tries the candidate again (and fails again).
        await asyncio.sleep(0.25)
        before = mirror_counts(proxy)["sent"]
        assert (await post(s, proxy.url + "/m", b"again"))[:2] == (200, b"again")
        await proxy.settle()
        assert mirror_counts(proxy)["sent"] == before + 1
    stats = proxy.stats()
    assert stats["production"]["errors"] == 0
    assert stats["production"]["requests"] == 9
    assert len(upstream.requests) == 9


# -- PUT /shadow/sample_rate ------------------------------------------------------------------------

async def test_put_sample_rate_is_applied_at_once(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 0.0})
    async with client() as s:
        await post(s, proxy.url + "/before")
        async with s.put(proxy.admin_url + "/shadow/sample_rate", json={"sample_rate": 1.0}) as r:
            assert r.status == 200
            assert await r.json() == {"sample_rate": 1.0}
        async with s.get(proxy.admin_url + "/shadow/sample_rate") as r:
            assert (await r.json())["sample_rate"] == 1.0
        await post(s, proxy.url + "/after")
    await proxy.settle()
    assert [r["path"] for r in candidate_upstream.requests] == ["/after"]
    assert mirror_counts(proxy)["sent"] == 1


@pytest.mark.parametrize(
    "body",
    [b'{"sample_rate": 1.5}', b'{"sample_rate": -0.1}', b'{"sample_rate": "x"}', b'{"sample_rate": true}',
     b'{"sample_rate": null}', b'{"rate": 0.5}', b"{}", b"[0.5]", b"not json", b""],
    ids=["1.5", "negative", "string", "bool", "null", "wrong-key", "missing-key", "list", "bad-json", "empty"],
)
async def test_put_sample_rate_rejects_a_bad_value_with_400(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy, body: bytes
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 0.25})
    async with client() as s, s.put(proxy.admin_url + "/shadow/sample_rate", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "error" in await r.json()
    assert proxy.proxy.mirror is not None and proxy.proxy.mirror.sample_rate == 0.25


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer", "s3cret", "Basic czNjcmV0"])
async def test_put_sample_rate_without_the_right_token_is_401(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy, authorization: str | None
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 0.25},
                              admin={"token": "s3cret"})
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with client() as s, s.put(proxy.admin_url + "/shadow/sample_rate", json={"sample_rate": 1.0},
                                    headers=headers) as r:
        assert r.status == 401
    assert proxy.proxy.mirror is not None and proxy.proxy.mirror.sample_rate == 0.25


async def test_put_sample_rate_with_the_bearer_token_is_200(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror={"sample_rate": 0.0},
                              admin={"token": "s3cret"})
    async with client() as s:
        async with s.put(proxy.admin_url + "/shadow/sample_rate", json={"sample_rate": 1.0},
                         headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
        await post(s, proxy.url + "/m")
    await proxy.settle()
    assert len(candidate_upstream.requests) == 1


# -- the counts agree: /shadow/stats, /metrics and the candidate ------------------------------------

async def test_stats_metrics_and_candidate_agree_on_mirror_counts(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    proxy = await start_proxy(upstream.url, candidate_upstream.url,
                              mirror={"sample_rate": 1.0, "max_body_bytes": 100},
                              candidate={"max_in_flight": 2, "timeout_s": 0.3})
    async with client() as s:
        # 4 at once at a candidate slower than its timeout: 2 sent (then errors), 2 dropped.
        candidate_upstream.delay_s = 1.0
        await asyncio.gather(*(post(s, proxy.url + "/slow") for _ in range(4)))
        await proxy.settle()
        candidate_upstream.delay_s = 0.0
        for _ in range(5):  # sent, answered (one at a time: a copy is in flight until then)
            await post(s, proxy.url + "/ok")
            await proxy.settle()
        for _ in range(2):  # skipped: method
            async with s.get(proxy.url + "/get") as r:
                assert r.status == 200
        await post(s, proxy.url + "/big", b"x" * 101)  # skipped: body too large
    await proxy.settle()
    await asyncio.sleep(0.05)  # the candidate's handlers of the timed-out requests have recorded them

    mirror = (await admin_stats(proxy))["mirror"]
    metrics = await mirror_metrics(proxy)
    stats = {k: v for k, v in mirror.items() if not isinstance(v, dict)}
    assert stats == {"sampled": 12, "sent": 7, "error": 2, "dropped": 2, "skipped": 3, "in_flight": 0}
    # Split by reason, as the metrics' labels split them, and adding up to each result.
    assert mirror["skipped_by_reason"] == {"method": 2, "body_too_large": 1, "path": 0}
    assert mirror["dropped_by_reason"] == {"in_flight_full": 2, "backoff": 0, "client_gone": 0}
    assert mirror["errors_by_kind"] == {"connect": 0, "timeout": 2, "reset": 0, "malformed": 0}
    by_label = await reason_metrics(proxy)
    for block in ("skipped_by_reason", "dropped_by_reason", "errors_by_kind"):
        assert mirror[block] == by_label[block], block
    for result in ("sent", "dropped", "skipped", "error"):
        assert metrics[result] == stats[result], result
    assert metrics["in_flight"] == stats["in_flight"] == 0
    assert stats["sampled"] == stats["sent"] + stats["dropped"] + stats["skipped"]
    assert len(candidate_upstream.requests) == stats["sent"]
    assert all(r["method"] == "POST" and r["path"] != "/big" for r in candidate_upstream.requests)


async def test_comparisons_count_agreements_for_an_identical_candidate(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy
) -> None:
    answer = {"predictions": [1, 0, 2]}
    upstream.answer = candidate_upstream.answer = lambda seen: answer
    proxy = await start_proxy(upstream.url, candidate_upstream.url, mirror=MIRROR_ALL)
    async with client() as s:
        for _ in range(4):
            status, body, _ = await post(s, proxy.url + "/v1/models/m:predict")
            assert (status, orjson.loads(body)) == (200, answer)
    await proxy.settle()
    comparisons = (await admin_stats(proxy))["comparisons"]
    assert (comparisons["total"], comparisons["agree"], comparisons["disagree"]) == (12, 12, 0)


async def test_malformed_candidate_answer_is_an_error_and_production_is_untouched(
    upstream: Upstream, raw_upstream, start_proxy
) -> None:
    bad = await raw_upstream(b"\x00\x01garbage that is not HTTP\r\n\r\n", close_after=True)
    upstream.answer = lambda seen: {"predictions": [1]}
    proxy = await start_proxy(upstream.url, bad.url, mirror={"sample_rate": 1.0})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(proxy.url + "/", data=b"{}") as r:
                assert r.status == 200
                assert await r.read() == b'{"predictions":[1]}'
    await proxy.settle()
    stats = proxy.stats()
    assert stats["mirror"]["sent"] == 3
    assert stats["mirror"]["error"] == 3
    assert stats["comparisons"]["candidate_error"] == 3
