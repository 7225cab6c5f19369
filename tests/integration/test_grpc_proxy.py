"""The gRPC listener with real grpcio stubs generated from the shipped .proto, against stand-in
Open Inference Protocol servers (tests/grpc_models.py) on loopback."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from shadowproxy.grpcproxy import grpc_predict_v2_pb2 as pb
from shadowproxy.grpcproxy import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.grpc_models import BREAK, CHAT, OipServer, infer_request, label_of
from tests.helpers import RunningProxy, free_port

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def oip() -> AsyncIterator[Callable[..., Awaitable[OipServer]]]:
    servers: list[OipServer] = []

    async def make(**kwargs: Any) -> OipServer:
        server = await OipServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def grpc_proxy(start_proxy: Start, upstream_url: str, production: str, candidate_grpc: str = "",
                     **sections: Any) -> tuple[RunningProxy, str]:
    sections.setdefault("listen", {})["grpc_port"] = free_port()
    sections.setdefault("production", {})["grpc_url"] = production
    if candidate_grpc:
        sections.setdefault("candidate", {})["grpc_url"] = candidate_grpc
    proxy = await start_proxy(upstream_url, **sections)
    return proxy, f"127.0.0.1:{proxy.proxy.grpc_port}"


async def settle(proxy: RunningProxy, timeout: float = 5.0) -> None:
    grpc_side = proxy.proxy.grpc
    assert grpc_side is not None
    deadline = time.monotonic() + timeout
    while any(m.tasks for m in grpc_side.mirrors) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)


def pairs(metadata: Any) -> list[tuple[str, Any]]:
    return [(m[0], m[1]) for m in metadata or ()]


ROWS = [[0.5, -0.25], [-1.0, 0.25], [2.0, 1.0]]


async def call_infer(address: str, request: Any, **kwargs: Any) -> tuple[Any, list[Any], list[Any], Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, **kwargs)
        try:
            answer = await call
        except grpc.aio.AioRpcError as exc:
            return None, pairs(exc.initial_metadata()), pairs(exc.trailing_metadata()), exc
        return answer, pairs(await call.initial_metadata()), pairs(await call.trailing_metadata()), None


async def test_model_infer_through_proxy_is_byte_identical_to_direct(start_proxy: Start, upstream: Any,
                                                                      oip: Any) -> None:
    production = await oip()
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url)
    request = infer_request(ROWS)
    md = (("x-tenant", "acme"), ("ctx-bin", b"\x00\x01\xfe"))
    direct = await call_infer(production.address, request, metadata=md)
    proxied = await call_infer(address, request, metadata=md)
    assert direct[0] is not None and proxied[0] is not None
    assert proxied[0].SerializeToString() == direct[0].SerializeToString()
    assert list(proxied[0].outputs[0].contents.int64_contents) == [label_of(r) for r in ROWS]
    assert proxied[1] == direct[1] == [("x-served-by", "stand-in")]
    assert proxied[2] == direct[2]
    assert ("trace-bin", b"\x01\x02\x03") in proxied[2]
    # The client's metadata reached production unchanged, both times.
    seen = [dict(m) for m in production.model.metadata]
    assert seen[0]["x-tenant"] == seen[1]["x-tenant"] == "acme"
    assert seen[0]["ctx-bin"] == seen[1]["ctx-bin"] == b"\x00\x01\xfe"
    stats = proxy.stats()
    assert stats["production"]["requests"] == 1


async def test_error_status_details_and_trailers_pass_through(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    _, address = await grpc_proxy(start_proxy, upstream.url, production.url)
    request = infer_request(ROWS, model="missing")
    direct = await call_infer(production.address, request)
    proxied = await call_infer(address, request)
    assert proxied[0] is None and direct[3] is not None and proxied[3] is not None
    assert proxied[3].code() == direct[3].code() == grpc.StatusCode.NOT_FOUND
    assert proxied[3].details() == direct[3].details() == "model missing is not loaded"
    assert proxied[2] == direct[2]
    assert ("why-bin", b"\x00\xff") in proxied[2]


async def test_client_deadline_reaches_production(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip(delay_s=1.0)
    _, address = await grpc_proxy(start_proxy, upstream.url, production.url)
    started = time.monotonic()
    answer = await call_infer(address, infer_request(ROWS), timeout=0.3)
    assert answer[3] is not None and answer[3].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9
    remaining = production.model.time_remaining[0]
    assert remaining is not None and 0 < remaining <= 0.31  # deadlines travel in ms units


async def test_cancelled_client_call_cancels_production(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip(delay_s=3.0)
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url)
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS))
        deadline = time.monotonic() + 2
        while production.model.calls == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        call.cancel()
    deadline = time.monotonic() + 2
    while production.model.cancelled == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert production.model.cancelled == 1
    grpc_side = proxy.proxy.grpc
    assert grpc_side is not None
    assert grpc_side.calls.labels("model_infer", "CANCELLED")._value.get() == 1


async def test_unknown_service_streams_through_both_ways(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url)
    messages = [b"alpha", b"\x00\x01binary", b"gamma" * 1000]

    async def chat(target: str) -> tuple[list[bytes], list[Any], list[Any]]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_stream(CHAT)(iter(messages), metadata=(("x-chat-user", "u1"),))
            got = [m async for m in call]
            return got, pairs(await call.initial_metadata()), pairs(await call.trailing_metadata())

    direct = await chat(production.address)
    proxied = await chat(address)
    assert proxied == direct
    assert proxied[0] == [m[::-1] for m in messages]
    assert ("x-messages", "3") in proxied[2]
    grpc_side = proxy.proxy.grpc
    assert grpc_side is not None
    assert grpc_side.calls.labels("other", "OK")._value.get() == 1
    # Another method of the service is passed through too (ServerLive, unary, on the stream path).
    async with grpc.aio.insecure_channel(address) as channel:
        live = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
    assert live.live is True
    assert grpc_side.calls.labels("other", "OK")._value.get() == 2


async def test_server_stream_ending_in_an_error_passes_through(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    _, address = await grpc_proxy(start_proxy, upstream.url, production.url)

    async def broken(target: str) -> tuple[list[bytes], Any, str, list[Any]]:
        got: list[bytes] = []
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_stream(BREAK)(b"ab")
            try:
                async for message in call:
                    got.append(message)
            except grpc.aio.AioRpcError as exc:
                return got, exc.code(), exc.details() or "", pairs(exc.trailing_metadata())
        raise AssertionError("the stream ended without its error")

    direct = await broken(production.address)
    proxied = await broken(address)
    assert proxied == direct
    assert proxied[0] == [b"ab", b"abab"]
    assert proxied[1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("detail-bin", b"\x07") in proxied[3]


async def test_disagreement_equals_the_offline_truth(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    candidate = await oip(flip_above=0.6, raw_answers=True)  # raw bytes on one side, typed on the other
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url, candidate.url,
                                      mirror={"sample_rate": 1.0}, compare={"preset": "oip-v2", "kind": "label"})
    rng = random.Random(7)
    batches = [[[rng.uniform(-1, 1), rng.uniform(-1, 1)] for _ in range(rng.randint(1, 4))] for _ in range(40)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for rows in batches:
            await stub.ModelInfer(infer_request(rows))
    await settle(proxy)
    truth_disagree = sum(label_of(r) != label_of(r, 0.6) for rows in batches for r in rows)
    total = sum(len(rows) for rows in batches)
    stats = proxy.stats()
    assert stats["mirror"]["sent"] == 40
    assert stats["comparisons"]["disagree"] == truth_disagree
    assert stats["comparisons"]["agree"] == total - truth_disagree
    assert candidate.model.calls == 40
    assert all(dict(m).get("x-shadow-request") == "true" for m in candidate.model.metadata)


async def test_mirrored_share_follows_the_sample_rate(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    candidate = await oip()
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url, candidate.url,
                                      mirror={"sample_rate": 0.25}, compare={"preset": "oip-v2", "kind": "label"})
    n = 400
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(*(stub.ModelInfer(infer_request(ROWS)) for _ in range(n)))
    await settle(proxy)
    stats = proxy.stats()
    sampled = stats["mirror"]["sampled"]
    # Binomial(400, 0.25): mean 100, sd ~8.7; 5 sd either side.
    assert 56 <= sampled <= 144
    assert candidate.model.calls == stats["mirror"]["sent"] == sampled
    assert production.model.calls == n
    assert stats["comparisons"]["agree"] == sampled * len(ROWS)


async def test_candidate_error_status_is_a_candidate_error(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    candidate = await oip(fail=grpc.StatusCode.INTERNAL)
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url, candidate.url,
                                      mirror={"sample_rate": 1.0})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            await stub.ModelInfer(infer_request(ROWS))
    await settle(proxy)
    stats = proxy.stats()
    assert candidate.model.calls == 5
    assert stats["comparisons"]["candidate_error"] == 5
    assert stats["comparisons"]["agree"] == stats["comparisons"]["disagree"] == 0
    assert stats["candidate"]["errors"] == 5
    assert stats["mirror"]["error"] == 0  # it answered, with an error status


async def test_dead_candidate_leaves_production_untouched(start_proxy: Start, upstream: Any, oip: Any) -> None:
    production = await oip()
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url, f"grpc://127.0.0.1:{free_port()}",
                                      mirror={"sample_rate": 1.0}, candidate={"backoff_after": 3})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = []
        for _ in range(30):
            answers.append(await stub.ModelInfer(infer_request(ROWS), timeout=2))
            await asyncio.sleep(0.005)
    assert all(list(a.outputs[0].contents.int64_contents) == [label_of(r) for r in ROWS] for a in answers)
    await settle(proxy)
    stats = proxy.stats()
    mirror = stats["mirror"]
    assert mirror["sampled"] == 30
    assert mirror["error"] >= 3
    assert mirror["dropped"] >= 1  # backed off after 3 refusals in a row
    assert mirror["sent"] + mirror["dropped"] == 30
    assert mirror["error"] == mirror["sent"]
    assert stats["comparisons"]["candidate_error"] == mirror["sent"]
    assert stats["production"]["errors"] == 0


async def test_hung_candidate_never_delays_production_and_is_bounded(start_proxy: Start, upstream: Any,
                                                                    oip: Any) -> None:
    production = await oip()
    candidate = await oip(delay_s=3.0)
    proxy, address = await grpc_proxy(start_proxy, upstream.url, production.url, candidate.url,
                                      mirror={"sample_rate": 1.0}, candidate={"timeout_s": 0.5, "max_in_flight": 4})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        await asyncio.gather(*(stub.ModelInfer(infer_request(ROWS)) for _ in range(10)))
        elapsed = time.monotonic() - started
    assert elapsed < 0.4  # the candidate takes 3 s and times out after 0.5 s
    await settle(proxy)
    mirror = proxy.stats()["mirror"]
    assert mirror["sent"] == 4
    assert mirror["dropped"] == 6
    assert mirror["error"] == 4  # each timed out
    assert mirror["errors_by_kind"]["timeout"] == 4


async def test_tls_listener_with_cert_and_key(start_proxy: Start, upstream: Any, oip: Any, tmp_path: Any) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    assert await made.wait() == 0
    production = await oip()
    _, address = await grpc_proxy(start_proxy, upstream.url, production.url,
                                  listen={"grpc_cert_file": str(cert), "grpc_key_file": str(key)})
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    async with grpc.aio.secure_channel(address, credentials) as channel:
        answer = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=5)
    assert list(answer.outputs[0].contents.int64_contents) == [label_of(r) for r in ROWS]
    async with grpc.aio.insecure_channel(address) as channel:  # cleartext is refused
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=2)
