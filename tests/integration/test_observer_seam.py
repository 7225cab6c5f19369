"""The observer seam: what the audit store and the drift monitor are told, and when."""

from __future__ import annotations

from typing import Any

import aiohttp

from shadowproxy.shadow.observers import ExchangeRecord, PairRecord
from tests.helpers import Upstream, raw_exchange


class Recorder:
    def __init__(self, want: bool) -> None:
        self.want = want
        self.exchanges: list[tuple[ExchangeRecord, bool]] = []
        self.pairs: list[PairRecord] = []

    def wants_bodies(self) -> bool:
        return self.want

    def on_exchange(self, record: ExchangeRecord, wanted: bool) -> None:
        self.exchanges.append((record, wanted))

    def on_pair(self, record: PairRecord) -> None:
        self.pairs.append(record)


class Broken(Recorder):
    def on_exchange(self, record: ExchangeRecord, wanted: bool) -> None:
        raise RuntimeError("observer bug")


async def _start(start_proxy: Any, production: str, candidate: str, observers: list[Recorder], **sections: Any) -> Any:
    proxy = await start_proxy(production, candidate, **sections)
    # Observers are wired at start-up; tests attach theirs to the running instance's lists.
    proxy.proxy.observers.extend(observers)
    return proxy


async def test_every_exchange_is_reported_with_bodies_only_when_wanted(
    upstream: Upstream, start_proxy: Any
) -> None:
    upstream.answer = lambda seen: {"predictions": [1]}
    wanting, indifferent = Recorder(True), Recorder(False)
    proxy = await _start(start_proxy, upstream.url, upstream.url, [wanting, indifferent])
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/p?q=1", data=b'{"instances": [[1]]}',
                                                    headers={"X-Request-ID": "r-1"}) as r:
        assert r.status == 200
    (record, wanted), = wanting.exchanges
    assert wanted is True
    assert record.request_id == "r-1"
    assert (record.method, record.path, record.status, record.mirrored) == ("POST", "/p?q=1", 200, False)
    assert record.request_body == b'{"instances": [[1]]}'
    assert record.response_body == b'{"predictions":[1]}'
    assert record.latency_s is not None and record.latency_s > 0
    assert indifferent.exchanges[0][1] is False


async def test_no_bodies_are_captured_when_nobody_wants_them(upstream: Upstream, start_proxy: Any) -> None:
    observer = Recorder(False)
    proxy = await _start(start_proxy, upstream.url, upstream.url, [observer])
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/", data=b"x") as r:
        assert r.status == 200
    (record, wanted), = observer.exchanges
    assert (record.request_body, record.response_body, wanted) == (None, None, False)


async def test_mirrored_pair_is_reported_with_predictions_and_outcome(
    upstream: Upstream, candidate_upstream: Upstream, start_proxy: Any
) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 2]}
    candidate_upstream.answer = lambda seen: {"predictions": [1, 3]}
    observer = Recorder(False)
    proxy = await _start(start_proxy, upstream.url, candidate_upstream.url, [observer],
                         mirror={"sample_rate": 1.0})
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/", data=b"{}",
                                                    headers={"X-Request-ID": "pair-1"}) as r:
        assert r.status == 200
    await proxy.settle()
    record, wanted = observer.exchanges[0]
    assert record.mirrored is True
    assert record.response_body == b'{"predictions":[1,2]}'  # mirrored requests always carry bodies
    (pair,) = observer.pairs
    assert pair.request_id == "pair-1"
    assert pair.outcome == "disagree"
    assert pair.production_predictions == [1, 2]
    assert pair.candidate_predictions == [1, 3]
    assert pair.agreements == [True, False]
    assert pair.candidate_status == 200


async def test_a_failing_observer_does_not_break_the_answer(upstream: Upstream, start_proxy: Any) -> None:
    proxy = await _start(start_proxy, upstream.url, upstream.url, [Broken(True)])
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(proxy.url + "/", data=b"ok") as r:
                assert r.status == 200
                assert await r.read() == b"ok"


class Sampling(Recorder):
    every_exchange = False


async def test_a_sampling_observer_hears_only_of_the_requests_it_wanted(upstream: Upstream, start_proxy: Any) -> None:
    picky, skipping = Sampling(True), Sampling(False)
    proxy = await _start(start_proxy, upstream.url, upstream.url, [picky, skipping])
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(proxy.url + "/", data=b"x") as r:
                assert r.status == 200
    assert len(picky.exchanges) == 3
    assert skipping.exchanges == []


async def test_a_chunked_body_cut_off_at_the_limit_is_reported_as_the_413_the_client_got(
    upstream: Upstream, start_proxy: Any
) -> None:
    recorder = Recorder(False)
    proxy = await _start(start_proxy, upstream.url, upstream.url, [recorder], listen={"max_body_bytes": 1000},
                         mirror={"sample_rate": 1.0})
    request = (b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
    assert (await raw_exchange(proxy.host, proxy.port, request)).startswith(b"HTTP/1.1 413 ")
    await proxy.settle()
    (record, _), = recorder.exchanges
    assert (record.path, record.status, record.mirrored) == ("/big", 413, False)
    # The copy never went: its request ended before its body was whole.
    assert (proxy.stats()["mirror"]["sent"], proxy.stats()["mirror"]["dropped"]) == (0, 1)
