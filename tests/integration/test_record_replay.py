"""Record production's traffic through the proxy, then replay the recording against candidates:
a twin passes with no disagreement, a candidate flipping a known share disagrees on exactly that
share, a dead candidate is a candidate error on every request; GoReplay files replay too."""

from __future__ import annotations

import io
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard

from shadowproxy.commands.goreplay import SEPARATOR
from shadowproxy.commands.replay import Pacing, replay_main
from shadowproxy.config import CompareConfig, GatesConfig
from shadowproxy.models import ModelBehaviour, RunningModel, candidate_flips, generate_instances, start_model
from shadowproxy.record.fileformat import read_paths, recording_files
from shadowproxy.record.recorder import Recorder
from tests.helpers import RunningProxy, closed_port_url

PREDICT = "/v1/models/demo:predict"
N = 120
FLIP_RATE = 0.3
SECRET = "s3cr3t-do-not-record"
TOKEN = "Bearer tok-never-in-the-file"
GATES = GatesConfig(min_samples=50, max_disagreement_rate=0.1, max_error_rate_delta=0.1)


@pytest.fixture
async def production() -> AsyncIterator[RunningModel]:
    model = await start_model(ModelBehaviour.production(version="prod-7"))
    yield model
    await model.close()


async def record(start_proxy: Any, production: RunningModel, directory: Path) -> list[list[float]]:
    """N requests of one instance each through a recording proxy; the instances sent."""
    proxy: RunningProxy = await start_proxy(
        production.url, record={"path": str(directory), "redact": ["/secret"], "sample_rate": 1.0},
    )
    instances = generate_instances(N, seed=11)
    async with aiohttp.ClientSession() as session:
        for i, row in enumerate(instances):
            body = {"instances": [row], "secret": SECRET}
            async with session.post(f"{proxy.url}{PREDICT}?trace=on", json=body,
                                    headers={"Authorization": TOKEN, "X-Request-ID": f"req-{i}",
                                             "Cookie": "session=abc", "X-Tenant": "acme"}) as r:
                assert r.status == 200
                await r.read()
    (recorder,) = [c for c in proxy.proxy.components if isinstance(c, Recorder)]
    await recorder.close()  # what SIGTERM does after the drain: write everything queued
    return instances


async def run_replay(paths: list[str], *candidates: str, secondary: str | None = None,
                     input_format: str = "recording") -> tuple[int, dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    code = await replay_main(
        paths, list(candidates), compare=CompareConfig(), gates=GATES,
        secondary=secondary, pacing=Pacing(), concurrency=8, timeout_s=5.0, input_format=input_format,
        as_json=True, stdout=out, stderr=err,
    )
    return code, orjson.loads(out.getvalue())


def decompressed(directory: Path) -> bytes:
    out = b""
    for path in recording_files([str(directory)]):
        data = Path(path).read_bytes()
        while data:
            d = zstandard.ZstdDecompressor().decompressobj()
            out += d.decompress(data)
            data = d.unused_data
    return out


async def test_recording_holds_each_request_and_production_answer(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    instances = await record(start_proxy, production, tmp_path / "rec")
    records = list(read_paths([str(tmp_path / "rec")]))
    assert [r["id"] for r in records] == [f"req-{i}" for i in range(N)]
    first = records[0]
    assert first["request"]["method"] == "POST"
    assert first["request"]["path"] == PREDICT
    assert first["request"]["query"] == "trace=on"
    assert orjson.loads(first["request"]["body"]) == {"instances": [instances[0]]}  # /secret redacted
    assert ["X-Tenant", "acme"] in first["request"]["headers"]
    assert first["response"]["status"] == 200
    assert first["response"]["latency_s"] > 0
    assert first["version"] == "prod-7"
    assert orjson.loads(first["response"]["body"])["predictions"]


async def test_redacted_fields_and_dropped_headers_never_reach_the_file(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    await record(start_proxy, production, tmp_path / "rec")
    raw = decompressed(tmp_path / "rec")
    assert raw.count(b"X-Tenant") == N  # the check below reads the right bytes
    for secret in (SECRET.encode(), TOKEN.encode(), b"session=abc", b"Authorization\"", b"Cookie\""):
        assert secret not in raw


async def test_replay_against_a_twin_passes_with_no_disagreement(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    await record(start_proxy, production, tmp_path / "rec")
    twin = await start_model(ModelBehaviour.production())
    try:
        code, doc = await run_replay([str(tmp_path / "rec")], twin.url)
    finally:
        await twin.close()
    assert doc["stats"]["comparisons"]["agree"] == N
    assert doc["stats"]["comparisons"]["disagree"] == 0
    assert doc["verdict"] == "pass" and code == 0
    assert "max_p99_latency_ratio" not in [g["name"] for g in doc["gates"]]  # no --secondary


async def test_replay_counts_exactly_the_flipped_share(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    instances = await record(start_proxy, production, tmp_path / "rec")
    expected = sum(candidate_flips(row, FLIP_RATE) for row in instances)
    assert 0 < expected < N
    flipper = await start_model(ModelBehaviour.candidate(flip_rate=FLIP_RATE, delay_ms=0.0))
    twin = await start_model(ModelBehaviour.production())
    try:
        code, doc = await run_replay([str(tmp_path / "rec")], f"flip={flipper.url}", secondary=twin.url)
    finally:
        await flipper.close()
        await twin.close()
    assert doc["stats"]["comparisons"]["disagree"] == expected
    assert doc["stats"]["comparisons"]["agree"] == N - expected
    assert doc["verdict"] == "fail" and code == 1
    assert "max_p99_latency_ratio" in [g["name"] for g in doc["gates"]]  # the secondary is its baseline


async def test_replay_against_a_dead_candidate_reports_every_request_as_its_error(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    await record(start_proxy, production, tmp_path / "rec")
    code, doc = await run_replay([str(tmp_path / "rec")], closed_port_url())
    assert doc["stats"]["comparisons"]["candidate_error"] == N
    assert doc["stats"]["comparisons"]["agree"] == 0
    assert doc["stats"]["mirror"]["errors_by_kind"]["connect"] == N
    assert doc["verdict"] == "fail" and code == 1


async def test_a_torn_file_replays_everything_before_the_tear(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    await record(start_proxy, production, tmp_path / "rec")
    (path,) = recording_files([str(tmp_path / "rec")])
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 7])  # cut inside the last frame
    torn: list[str] = []
    records = list(read_paths([path], torn))
    assert torn  # the tear is reported
    ids = [r["id"] for r in records]
    assert ids == [f"req-{i}" for i in range(len(ids))]  # a prefix, in order
    twin = await start_model(ModelBehaviour.production())
    try:
        _, doc = await run_replay([path], twin.url)
    finally:
        await twin.close()
    assert doc["stats"]["comparisons"]["agree"] == len(ids)
    assert doc["replay"]["torn"] == torn


async def test_a_goreplay_file_replays(production: RunningModel, tmp_path: Path) -> None:
    instances = generate_instances(60, seed=5)
    payloads: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        for i, row in enumerate(instances):
            body = orjson.dumps({"instances": [row]})
            async with session.post(production.url + PREDICT, data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                answer = await r.read()
                status = r.status
            rid = f"{i:024x}"
            request = (f"POST {PREDICT} HTTP/1.1\r\nHost: example\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            response = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(answer)}\r\n\r\n").encode() + answer
            payloads.append(f"1 {rid} {1_700_000_000_000_000_000 + i} 0\n".encode() + request)
            payloads.append(f"2 {rid} {1_700_000_000_000_100_000 + i} 100000\n".encode() + response)
    payloads.append(b"1 ffff 1700000000000000000 0\nGET /unanswered HTTP/1.1\r\nHost: x\r\n\r\n")
    gor = tmp_path / "requests_0.gor"
    gor.write_bytes(SEPARATOR.join(payloads))
    flipper = await start_model(ModelBehaviour.candidate(flip_rate=FLIP_RATE, delay_ms=0.0))
    try:
        _, doc = await run_replay([str(gor)], flipper.url, input_format="goreplay")
    finally:
        await flipper.close()
    assert doc["replay"]["replayed"] == 60
    assert sum(doc["replay"]["not_replayed"].values()) == 1
    assert doc["stats"]["comparisons"]["disagree"] == sum(candidate_flips(row, FLIP_RATE) for row in instances)


def test_crc_guards_each_record(tmp_path: Path) -> None:
    from shadowproxy.record.fileformat import frame, read_file

    records = [{"type": "exchange", "id": str(i)} for i in range(3)]
    compressed = frame(records, zstandard.ZstdCompressor())
    data = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(compressed))
    assert zlib.crc32(data[8:8 + int.from_bytes(data[:4], "little")]) == int.from_bytes(data[4:8], "little")
    data[-2] ^= 0xFF  # a flipped bit in the last record's payload
    path = tmp_path / "x.rec.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(data)))
    torn: list[str] = []
    assert [r["id"] for r in read_file(path, torn)] == ["0", "1"]
    assert Counter("CRC" in t for t in torn)[True] == 1


def write_recording(directory: Path, bodies: list[bytes], answers: list[bytes], spacing_s: float) -> None:
    from prometheus_client import CollectorRegistry

    from shadowproxy.config import RecordConfig
    from shadowproxy.record.recorder import _EXCHANGE, RecordWriter
    from shadowproxy.shadow.metrics import RecordMetrics

    writer = RecordWriter(RecordConfig(path=str(directory)), RecordMetrics(CollectorRegistry()))
    for i, (body, answer) in enumerate(zip(bodies, answers, strict=True)):
        writer.records.append((_EXCHANGE, f"r{i}", 1000.0 + i * spacing_s, "POST", PREDICT, 200,
                               [(b"Content-Type", b"application/json")], [], 0.001, False, body, answer))
    writer._cycle()
    writer._close_file()


async def recorded_answers(production: RunningModel, n: int) -> tuple[list[bytes], list[bytes]]:
    bodies = [orjson.dumps({"instances": [row]}) for row in generate_instances(n, seed=3)]
    answers = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(production.url + PREDICT, data=body) as r:
                answers.append(await r.read())
    return bodies, answers


@pytest.mark.parametrize(("pacing", "least_s", "most_s"), [
    (Pacing("rate", 100.0), 0.39, 2.0),  # 40 requests at 100/s: the last starts at 0.39 s
    (Pacing("speed", 4.0), 0.39, 2.0),  # recorded 40 ms apart, four times faster: 10 ms apart
])
async def test_pacing_spreads_the_requests_as_asked(
    production: RunningModel, tmp_path: Path, pacing: Pacing, least_s: float, most_s: float
) -> None:
    import time

    from shadowproxy.commands.replay import replay

    bodies, answers = await recorded_answers(production, 40)
    write_recording(tmp_path / "rec", bodies, answers, spacing_s=0.04)
    from shadowproxy.commands.replay import from_recording

    items = [from_recording(doc, Counter()) for doc in read_paths([str(tmp_path / "rec")])]
    assert all(items)
    started = time.monotonic()
    stats = await replay([i for i in items if i is not None], [("candidate", production.url)],
                         compare=CompareConfig(), pacing=pacing, concurrency=4)
    elapsed = time.monotonic() - started
    assert least_s <= elapsed <= most_s
    assert stats.snapshot()["comparisons"]["agree"] == 40


async def test_a_mirrored_request_carries_the_candidates_outcome(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    candidate = await start_model(ModelBehaviour.candidate(flip_rate=0.0, delay_ms=0.0))
    try:
        proxy: RunningProxy = await start_proxy(production.url, candidate.url, mirror={"sample_rate": 1.0},
                                                record={"path": str(tmp_path / "rec")})
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                async with session.post(proxy.url + PREDICT, json={"instances": [[0.1, 0.2, 0.3, 0.4]]},
                                        headers={"X-Request-ID": f"m-{i}"}) as r:
                    assert r.status == 200
        await proxy.settle()
        (recorder,) = [c for c in proxy.proxy.components if isinstance(c, Recorder)]
        await recorder.close()
    finally:
        await candidate.close()
    records = list(read_paths([str(tmp_path / "rec")]))
    assert [r["id"] for r in records] == [f"m-{i}" for i in range(5)]
    for r in records:
        assert r["mirrored"] is True
        assert r["candidate"]["outcome"] == "agree"
        assert r["candidate"]["status"] == 200
        assert r["candidate"]["latency_s"] > 0


async def test_the_replay_command_reads_gates_from_config_and_exits_by_the_verdict(
    production: RunningModel, start_proxy: Any, tmp_path: Path
) -> None:
    import asyncio
    import sys

    await record(start_proxy, production, tmp_path / "rec")
    config = tmp_path / "gates.toml"
    config.write_text("[compare]\npreset = \"kserve-v1\"\n\n[gates]\nmin_samples = 50\nmax_disagreement_rate = 0.1\n"
                      "max_error_rate_delta = 0.1\n")
    twin = await start_model(ModelBehaviour.production())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "replay", str(tmp_path / "rec"), "--candidate", twin.url,
            "--config", str(config), "--rate", "2000",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await twin.close()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert text.startswith(f"shadowproxy replay: {N} recorded requests")
    assert "PASS" in text
    assert f"compared {N}: agree {N}, disagree 0" in text
    assert "\r[" not in err.decode()  # no progress bar when piped
    assert f"replayed {N} requests" in err.decode()


async def test_a_bad_gates_key_in_the_replay_config_exits_2_naming_it(tmp_path: Path) -> None:
    import asyncio
    import sys

    config = tmp_path / "bad.toml"
    config.write_text("[gates]\nmin_samples = 0\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "replay", str(tmp_path), "--candidate", closed_port_url(),
        "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == [f"{config}: gates.min_samples: must be at least 1, got 0"]


async def test_a_streamed_answer_is_recorded_raw_with_chunk_times(openai_pair: Any, start_proxy: Any,
                                                                  tmp_path: Path) -> None:
    production_llm, _ = openai_pair
    proxy: RunningProxy = await start_proxy(production_llm.url, record={"path": str(tmp_path / "rec")})
    request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "count to five"}]}
    async with aiohttp.ClientSession() as session, session.post(proxy.url + "/v1/chat/completions",
                                                                json=request) as r:
        assert r.status == 200
        received = await r.read()
    (recorder,) = [c for c in proxy.proxy.components if isinstance(c, Recorder)]
    await recorder.close()
    (doc,) = list(read_paths([str(tmp_path / "rec")]))
    response = doc["response"]
    assert response["body"].encode() == received  # raw, as the client got it
    chunks = response["chunks"]
    assert len(chunks) >= 2
    assert chunks[-1][0] == len(received)
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    assert [c[1] for c in chunks] == sorted(c[1] for c in chunks)
    assert 0 < chunks[-1][1] <= response["latency_s"]


async def test_recorded_streams_replay_and_compare_as_streams(openai_pair: Any, start_proxy: Any,
                                                             tmp_path: Path) -> None:
    from shadowproxy.commands.replay import replay

    production_llm, candidate_llm = openai_pair
    proxy: RunningProxy = await start_proxy(production_llm.url, record={"path": str(tmp_path / "rec")})
    async with aiohttp.ClientSession() as session:
        for i in range(8):
            request = {"model": "m", "stream": i % 2 == 0, "messages": [{"role": "user", "content": f"q {i}"}]}
            async with session.post(proxy.url + "/v1/chat/completions", json=request) as r:
                assert r.status == 200
                await r.read()
    (recorder,) = [c for c in proxy.proxy.components if isinstance(c, Recorder)]
    await recorder.close()
    from shadowproxy.commands.replay import from_recording

    items = [from_recording(doc, Counter()) for doc in read_paths([str(tmp_path / "rec")])]
    todo = [i for i in items if i is not None]
    assert len(todo) == 8
    stats = await replay(todo, [("twin", production_llm.url)], compare=CompareConfig(preset="openai"))
    comparisons = stats.snapshot()["comparisons"]
    assert comparisons["agree"] == 8  # streamed and whole answers alike, read back and compared
    assert comparisons["unparseable"] == 0 and comparisons["candidate_error"] == 0
