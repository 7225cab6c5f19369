"""The bundled stand-in model servers, checked over real loopback sockets."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import orjson
import pytest

from shadowproxy.models import (
    ModelBehaviour,
    RunningModel,
    candidate_flips,
    generate_instances,
    request_fails,
    start_model,
)

PREDICT = "/v1/models/demo:predict"


def reference_proba(instances: list[list[float]]) -> np.ndarray:
    """The documented model, computed independently: softmax(x @ W + b), W and b from rng(7)."""
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(4, 3))
    bias = rng.normal(size=3)
    logits = np.asarray(instances) @ weights + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return proba


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def predict(
    session: aiohttp.ClientSession, model: RunningModel, instances: list[list[float]], path: str = PREDICT
) -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps({"instances": instances})
    async with session.post(model.url + path, data=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_production_predictions_match_reference_model(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(500, seed=1)
    async with await start_model(ModelBehaviour.production()) as model:
        status, headers, body = await predict(session, model, instances)
    assert status == 200
    answer = orjson.loads(body)
    assert answer["predictions"] == reference_proba(instances).argmax(axis=1).tolist()
    assert answer["model_version"] == "production-1"
    assert headers["X-Model-Version"] == "production-1"


async def test_proba_output_matches_reference_model(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(50, seed=2)
    async with await start_model(ModelBehaviour(output="proba")) as model:
        _, _, body = await predict(session, model, instances)
    np.testing.assert_allclose(orjson.loads(body)["predictions"], reference_proba(instances), rtol=1e-12)


async def test_candidate_disagrees_exactly_where_candidate_flips_says(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(5000, seed=3)
    flip_rate = 0.1
    async with (
        await start_model(ModelBehaviour.production()) as prod,
        await start_model(ModelBehaviour.candidate(flip_rate=flip_rate, delay_ms=0)) as cand,
    ):
        _, _, prod_body = await predict(session, prod, instances)
        _, _, cand_body = await predict(session, cand, instances)
    prod_labels = orjson.loads(prod_body)["predictions"]
    cand_labels = orjson.loads(cand_body)["predictions"]
    expected = [candidate_flips(x, flip_rate) for x in instances]
    assert [p != c for p, c in zip(prod_labels, cand_labels, strict=True)] == expected
    assert all((p + 1) % 3 == c for p, c, f in zip(prod_labels, cand_labels, expected, strict=True) if f)
    n = len(instances)
    sd = math.sqrt(n * flip_rate * (1 - flip_rate))
    assert abs(sum(expected) - n * flip_rate) <= 4 * sd


async def test_flips_are_the_same_one_instance_at_a_time(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(40, seed=4)
    async with await start_model(ModelBehaviour.candidate(flip_rate=0.5, delay_ms=0)) as model:
        _, _, batch = await predict(session, model, instances)
        singles = [orjson.loads((await predict(session, model, [x]))[2])["predictions"][0] for x in instances]
    assert orjson.loads(batch)["predictions"] == singles


async def test_candidate_proba_argmax_moves_to_next_class(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(200, seed=5)
    async with await start_model(ModelBehaviour.candidate(flip_rate=0.3, delay_ms=0, output="proba")) as m:
        _, _, body = await predict(session, m, instances)
    got = np.asarray(orjson.loads(body)["predictions"]).argmax(axis=1)
    base = reference_proba(instances).argmax(axis=1)
    flips = np.array([candidate_flips(x, 0.3) for x in instances])
    assert (got == np.where(flips, (base + 1) % 3, base)).all()


def test_flip_rate_bounds() -> None:
    x = [0.1, -0.2, 0.3, 1.5]
    assert not candidate_flips(x, 0.0)
    assert candidate_flips(x, 1.0)


async def test_delay_is_applied(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour(delay_ms=150)) as model:
        start = time.perf_counter()
        status, _, _ = await predict(session, model, [[0.0, 0.0, 0.0, 0.0]])
        elapsed = time.perf_counter() - start
    assert status == 200
    assert elapsed >= 0.15


async def test_jitter_stays_within_bounds(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour(delay_ms=20, jitter_ms=30)) as model:
        for _ in range(5):
            start = time.perf_counter()
            await predict(session, model, [[0.0, 0.0, 0.0, 0.0]])
            assert 0.02 <= time.perf_counter() - start < 0.5


async def test_error_rate_fails_exactly_the_hashed_bodies(session: aiohttp.ClientSession) -> None:
    error_rate = 0.3
    instances = generate_instances(400, seed=6)
    async with await start_model(ModelBehaviour(error_rate=error_rate)) as model:
        statuses = [(await predict(session, model, [x]))[0] for x in instances]
    expected = [
        500 if request_fails(orjson.dumps({"instances": [x]}), error_rate) else 200 for x in instances
    ]
    assert statuses == expected
    share = statuses.count(500) / len(statuses)
    assert abs(share - error_rate) <= 4 * math.sqrt(error_rate * (1 - error_rate) / len(statuses))


async def test_error_answer_is_json(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour(error_rate=1.0)) as model:
        status, _, body = await predict(session, model, [[1.0, 2.0, 3.0, 4.0]])
    assert status == 500
    assert "error" in orjson.loads(body)


async def test_garbage_mode_answers_200_with_non_json(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour(garbage=True)) as model:
        status, _, body = await predict(session, model, [[1.0, 2.0, 3.0, 4.0]])
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2, 3]",
        b'{"inputs": []}',
        b'{"instances": 5}',
        b'{"instances": [[1, 2, 3]]}',
        b'{"instances": [[1, 2, 3, "x"]]}',
        b'{"instances": [[1, 2, 3, true]]}',
        b'{"instances": [[1e308, 1e308, 1e308, 1e308]]}',
    ],
)
async def test_malformed_body_gets_400(session: aiohttp.ClientSession, body: bytes) -> None:
    async with (
        await start_model(ModelBehaviour()) as model,
        session.post(model.url + PREDICT, data=body) as resp,
    ):
        assert resp.status == 400
        assert "error" in orjson.loads(await resp.read())


async def test_any_post_path_predicts(session: aiohttp.ClientSession) -> None:
    instances = generate_instances(3, seed=7)
    async with await start_model(ModelBehaviour()) as model:
        answers = [(await predict(session, model, instances, path=p))[2] for p in ("/", "/a/b?x=1", PREDICT)]
        assert model.requests == 3
        assert model.received[1].path == "/a/b"
        assert model.received[1].query_string == "x=1"
    assert answers[0] == answers[1] == answers[2]


async def test_predictions_key_override(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour(predictions_key="outputs", version="v7")) as model:
        _, headers, body = await predict(session, model, [[0.0, 1.0, 0.0, 1.0]])
    answer = orjson.loads(body)
    assert "predictions" not in answer
    assert len(answer["outputs"]) == 1
    assert answer["model_version"] == headers["X-Model-Version"] == "v7"


async def test_metadata_and_health_endpoints(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour()) as model:
        async with session.get(model.url + "/v1/models/demo") as resp:
            assert resp.status == 200
            assert orjson.loads(await resp.read()) == {"name": "demo", "ready": True}
        async with session.get(model.url + "/healthz") as resp:
            assert resp.status == 200


async def test_received_request_headers_are_recorded(session: aiohttp.ClientSession) -> None:
    async with await start_model(ModelBehaviour()) as model:
        async with session.post(model.url, data=b'{"instances": []}', headers={"X-Shadow-Request": "true"}):
            pass
        assert model.received[0].header("x-shadow-request") == "true"
        assert model.received[0].body == b'{"instances": []}'


async def test_binds_a_free_port_and_closes() -> None:
    model = await start_model(ModelBehaviour())
    assert model.port > 0
    assert model.url == f"http://127.0.0.1:{model.port}"
    await model.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", model.port), timeout=1):
        pass


def test_generate_instances_is_reproducible() -> None:
    a = generate_instances(1000, seed=11)
    assert a == generate_instances(1000, seed=11)
    assert a != generate_instances(1000, seed=12)
    arr = np.asarray(a)
    assert arr.shape == (1000, 4)
    assert abs(arr.mean()) < 0.1
    assert abs(arr.std() - 1.0) < 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_rate": 1.5},
        {"error_rate": -0.1},
        {"delay_ms": -1.0},
        {"output": "logits"},
        {"predictions_key": ""},
    ],
)
def test_invalid_behaviour_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelBehaviour(**kwargs)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_until_signal_and_exits_zero_quietly(sig: signal.Signals) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shadowproxy.models", "--port", str(port), "--role", "candidate"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        deadline = time.monotonic() + 10
        answer = None
        async with aiohttp.ClientSession() as session:
            while answer is None and time.monotonic() < deadline:
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}{PREDICT}", data=b'{"instances": [[0, 0, 0, 0]]}'
                    ) as resp:
                        answer = orjson.loads(await resp.read())
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        assert answer is not None and answer["model_version"] == "candidate-1"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == b""
    assert b"Traceback" not in stderr


def test_cli_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "shadowproxy.models", "--port", str(port)],
            capture_output=True,
            timeout=10,
        )
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().count("\n") == 0
