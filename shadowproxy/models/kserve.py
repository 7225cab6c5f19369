"""The KServe v1 stand-in: a real aiohttp server answering ``:predict`` with a small classifier.

``python -m shadowproxy.models`` serves it (the default ``--protocol kserve-v1``). Used by
``shadowproxy demo``, by the README's example config (production on 8001, candidate on 8002) and by
tests as a real upstream.

The model is a linear softmax classifier over 4 features and 3 classes with fixed weights
(``numpy.random.default_rng(7)``: first ``normal(size=(4, 3))`` weights, then ``normal(size=3)``
bias). Production is that model. The "retrained" candidate is the same model except that on a
known share of inputs, chosen by a stable hash of each instance (``candidate_flips``), it answers
class ``(c + 1) % 3`` — so a test or the demo knows exactly which predictions disagree.

Usage::

    async with await start_model(ModelBehaviour.candidate(flip_rate=0.1)) as model:
        ...  # POST f"{model.url}/v1/models/demo:predict" {"instances": [[f0, f1, f2, f3], ...]}

Endpoints: ``POST /v1/models/{name}:predict`` (and any other POST path, so the proxy's path
passthrough and URL prefixes work) -> ``{"predictions": [...], "model_version": "..."}`` plus an
``X-Model-Version`` header; ``GET /v1/models/{name}`` -> ``{"name": ..., "ready": true}``;
``GET /healthz``; ``GET /``. A malformed body gets 400 ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import math
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

__all__ = [
    "BIAS",
    "MODEL_SEED",
    "N_CLASSES",
    "N_FEATURES",
    "WEIGHTS",
    "ModelBehaviour",
    "ReceivedRequest",
    "RunningModel",
    "candidate_flips",
    "generate_instances",
    "main",
    "make_app",
    "predict_labels",
    "predict_proba",
    "request_fails",
    "start_model",
]

N_FEATURES = 4
N_CLASSES = 3
MODEL_SEED = 7


def _make_weights() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(MODEL_SEED)
    weights = rng.normal(size=(N_FEATURES, N_CLASSES))
    bias = rng.normal(size=N_CLASSES)
    weights.setflags(write=False)
    bias.setflags(write=False)
    return weights, bias


WEIGHTS, BIAS = _make_weights()

# Share of a hash: the first 8 digest bytes as an integer over 2**64, uniform in [0, 1).
_HASH_SPAN = float(2**64)
_MAX_BODY_BYTES = 64 * 1024 * 1024
_MAX_FEATURE = 1e100
_GARBAGE_BODY = b'{"predictions": [0, 1, <truncated by a broken model server'


def _hash_share(data: bytes, person: bytes) -> float:
    digest = hashlib.blake2b(data, digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


def _canonical(instance: Sequence[float]) -> bytes:
    # repr of a float is its shortest round-tripping form, which is also what orjson writes, so an
    # instance hashes the same before it is sent and after the server has parsed it.
    return ",".join(repr(float(v)) for v in instance).encode("ascii")


def candidate_flips(instance: Sequence[float], flip_rate: float) -> bool:
    """Whether the candidate answers ``(c + 1) % 3`` for this instance, given its ``flip_rate``.

    Stable across processes and runs: blake2b of the instance's canonical float repr.
    """
    return _hash_share(_canonical(instance), b"sp-model-flip") < flip_rate


def request_fails(body: bytes, error_rate: float) -> bool:
    """Whether a server with ``error_rate`` answers this exact request body with a 500."""
    return _hash_share(body, b"sp-model-error") < error_rate


def predict_proba(instances: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Production's class probabilities, shape ``(n, 3)``, for instances of shape ``(n, 4)``."""
    x = np.asarray(instances, dtype=np.float64).reshape(-1, N_FEATURES)
    # Broadcast-and-sum rather than ``x @ W``: a BLAS matmul may round differently with batch
    # size, and a row must get the same answer alone or in a batch.
    logits = (x[:, :, None] * WEIGHTS[None, :, :]).sum(axis=1) + BIAS
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    proba: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return proba


def predict_labels(instances: npt.ArrayLike) -> list[int]:
    """Production's class labels (``argmax`` of ``predict_proba``)."""
    return [int(c) for c in predict_proba(instances).argmax(axis=1)]


def generate_instances(n: int, seed: int) -> list[list[float]]:
    """``n`` instances with 4 features each drawn from N(0, 1), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    rows: list[list[float]] = rng.standard_normal((n, N_FEATURES)).tolist()
    return rows


@dataclass(frozen=True)
class ModelBehaviour:
    """How a stand-in model server behaves.

    ``ModelBehaviour.production()`` is the reference model; ``ModelBehaviour.candidate()`` a
    retrained one that flips 10% of labels and adds 2 ms. Every field can be set directly::

        ModelBehaviour(role="candidate", flip_rate=0.05, delay_ms=20, jitter_ms=5, error_rate=0.01)

    - ``role``: a free-form name (``production``, ``candidate``); ``version`` defaults to
      ``f"{role}-1"`` and is sent as ``model_version`` and ``X-Model-Version``.
    - ``flip_rate``: share of instances answered ``(c + 1) % 3`` (see ``candidate_flips``).
    - ``noise_rate``: share of instances moved one class further (``(c + 1) % 3`` unless flipped
      too), drawn afresh for every answer and unseeded: a non-deterministic model, whose two
      copies disagree on about ``2 s (1 - s)`` of the instances for ``noise_rate = s``.
    - ``timestamp``: add ``"created"``, the answer's time (ISO 8601, microseconds) and so a field
      that differs between any two answers.
    - ``delay_ms`` + uniform ``[0, jitter_ms)``: extra latency before every answer.
    - ``error_rate``: share of request bodies answered 500 (see ``request_fails``).
    - ``garbage``: answer every predict request 200 with a body that is not JSON.
    - ``predictions_key``: the answer's key holding the predictions.
    - ``output``: ``"label"`` (class ids) or ``"proba"`` (one probability list per instance; a
      flipped instance gets its probabilities rotated so that its argmax is ``(c + 1) % 3``).
    - ``seed``: seeds the jitter, so a run's latencies are reproducible too.
    """

    role: str = "production"
    version: str = ""
    name: str = "demo"
    flip_rate: float = 0.0
    noise_rate: float = 0.0
    timestamp: bool = False
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    garbage: bool = False
    predictions_key: str = "predictions"
    output: Literal["label", "proba"] = "label"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("flip_rate", "noise_rate", "error_rate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: must be between 0 and 1, got {value}")
        for key in ("delay_ms", "jitter_ms"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{key}: must be a finite number >= 0, got {value}")
        if self.output not in ("label", "proba"):
            raise ValueError(f"output: must be 'label' or 'proba', got {self.output!r}")
        if not self.predictions_key:
            raise ValueError("predictions_key: must not be empty")
        if not self.role:
            raise ValueError("role: must not be empty")

    @property
    def model_version(self) -> str:
        return self.version or f"{self.role}-1"

    @classmethod
    def production(cls, **overrides: Any) -> ModelBehaviour:
        """The reference model: no flips, no added latency."""
        return replace(cls(role="production"), **overrides)

    @classmethod
    def candidate(cls, **overrides: Any) -> ModelBehaviour:
        """The demo's retrained model: 10% of labels flipped, 2 ms slower."""
        base = cls(role="candidate", flip_rate=0.1, delay_ms=2.0)
        return replace(base, **overrides)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the model server saw it (for tests of what the proxy forwards)."""

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


@dataclass
class _ModelState:
    behaviour: ModelBehaviour
    rng: random.Random
    received: collections.deque[ReceivedRequest] = field(
        default_factory=lambda: collections.deque(maxlen=10_000)
    )
    requests: int = 0


_STATE = web.AppKey("shadowproxy_model_state", _ModelState)


class _BadRequest(ValueError):
    pass


def _parse_instances(body: bytes) -> list[list[float]]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise _BadRequest('body must be a JSON object with an "instances" list')
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise _BadRequest('"instances" must be a list')
    rows: list[list[float]] = []
    for i, row in enumerate(instances):
        if not (
            isinstance(row, list)
            and len(row) == N_FEATURES
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)
        ):
            raise _BadRequest(f"instances[{i}]: must be a list of {N_FEATURES} numbers")
        floats = [float(v) for v in row]
        # Bounded so that logits (a few weights times a feature) cannot overflow to inf.
        if not all(abs(v) <= _MAX_FEATURE for v in floats):
            raise _BadRequest(f"instances[{i}]: features must be within +-{_MAX_FEATURE:g}")
        rows.append(floats)
    return rows


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


# noise_rate's draws: seeded from the operating system, so no two runs (or copies) share them.
_noise = random.Random()


def _predictions(behaviour: ModelBehaviour, rows: list[list[float]]) -> list[int] | list[list[float]]:
    if not rows:
        return []
    proba = predict_proba(rows)
    labels = proba.argmax(axis=1)
    noise = behaviour.noise_rate
    flips = [
        int(candidate_flips(row, behaviour.flip_rate)) + (1 if noise and _noise.random() < noise else 0)
        for row in rows
    ]
    if behaviour.output == "label":
        return [int((c + flip) % N_CLASSES) for c, flip in zip(labels, flips, strict=True)]
    # np.roll by one moves p[c] to index c + 1, so the argmax moves with it.
    out: list[list[float]] = [
        (np.roll(p, flip) if flip else p).tolist() for p, flip in zip(proba, flips, strict=True)
    ]
    return out


async def _predict(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    behaviour = state.behaviour
    body = await request.read()
    state.requests += 1
    state.received.append(
        ReceivedRequest(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            headers=tuple(request.headers.items()),
            body=body,
        )
    )
    delay_ms = behaviour.delay_ms + (
        state.rng.uniform(0.0, behaviour.jitter_ms) if behaviour.jitter_ms else 0.0
    )
    if delay_ms > 0.0:
        await asyncio.sleep(delay_ms / 1000.0)

    version_header = {"X-Model-Version": behaviour.model_version}
    try:
        rows = _parse_instances(body)
    except _BadRequest as exc:
        return _json({"error": str(exc)}, status=400, headers=version_header)
    if request_fails(body, behaviour.error_rate):
        return _json({"error": "injected model failure"}, status=500, headers=version_header)
    if behaviour.garbage:
        return web.Response(body=_GARBAGE_BODY, content_type="application/json", headers=version_header)
    answer = {
        behaviour.predictions_key: _predictions(behaviour, rows),
        "model_version": behaviour.model_version,
    }
    if behaviour.timestamp:
        answer["created"] = datetime.now(UTC).isoformat(timespec="microseconds")
    return _json(answer, headers=version_header)


async def _model_metadata(request: web.Request) -> web.Response:
    return _json({"name": request.match_info["name"], "ready": True})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _root(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return _json({"status": "alive", "role": state.behaviour.role, "version": state.behaviour.model_version})


def make_app(behaviour: ModelBehaviour) -> web.Application:
    """An aiohttp application serving ``behaviour``'s model."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[_STATE] = _ModelState(behaviour=behaviour, rng=random.Random(behaviour.seed))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/v1/models/{name}", _model_metadata)
    app.router.add_get("/", _root)
    app.router.add_post("/{tail:.*}", _predict)
    return app


_B = TypeVar("_B")


class _ServerState(Protocol[_B]):
    behaviour: _B
    requests: int
    received: collections.deque[ReceivedRequest]


class RunningServer(Generic[_B]):
    """A stand-in server listening on a real socket; ``close()`` (or ``async with``) stops it."""

    def __init__(self, runner: web.AppRunner, state: _ServerState[_B], host: str, port: int) -> None:
        self._runner = runner
        self._state = state
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def behaviour(self) -> _B:
        return self._state.behaviour

    @property
    def requests(self) -> int:
        """POST requests received so far."""
        return self._state.requests

    @property
    def received(self) -> list[ReceivedRequest]:
        """The last 10 000 POST requests received, oldest first."""
        return list(self._state.received)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self.behaviour, 'role', '')} {self.url}>"


async def serve_app(app: web.Application, host: str, port: int, shutdown_timeout: float) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` (0 = a free port); the runner and the port it is bound to."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner, int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise


class RunningModel(RunningServer[ModelBehaviour]):
    """A KServe v1 stand-in listening on a real socket."""


async def start_model(
    behaviour: ModelBehaviour,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> RunningModel:
    """Serve ``behaviour`` on ``host:port`` (0 = a free port, read back into ``.port``)."""
    app = make_app(behaviour)
    runner, bound_port = await serve_app(app, host, port, shutdown_timeout)
    state = app[_STATE]
    return RunningModel(runner, state, host, bound_port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shadowproxy.models",
        description="Serve a bundled stand-in model (KServe v1 protocol) until SIGTERM/SIGINT.",
    )
    parser.add_argument(
        "--protocol",
        choices=("kserve-v1", "openai"),
        default="kserve-v1",
        help="kserve-v1: this classifier (the default); openai: an LLM (see --protocol openai --help)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--role",
        default="production",
        help="production (the reference) or candidate (defaults: --flip-rate 0.1 --delay-ms 2)",
    )
    parser.add_argument("--version", default="", help="model version (default: ROLE-1)")
    parser.add_argument("--name", default="demo", help="model name")
    parser.add_argument("--flip-rate", type=float, default=None)
    parser.add_argument("--delay-ms", type=float, default=None)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--garbage", action="store_true", help="answer 200 with a non-JSON body")
    parser.add_argument("--predictions-key", default="predictions")
    parser.add_argument("--output", choices=("label", "proba"), default="label")
    parser.add_argument("--seed", type=int, default=0, help="seed for the latency jitter")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be between 0 and 65535, got {args.port}")
    candidate = args.role == "candidate"
    if args.flip_rate is None:
        args.flip_rate = 0.1 if candidate else 0.0
    if args.delay_ms is None:
        args.delay_ms = 2.0 if candidate else 0.0
    try:
        args.behaviour = ModelBehaviour(
            role=args.role,
            version=args.version,
            name=args.name,
            flip_rate=args.flip_rate,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            error_rate=args.error_rate,
            garbage=args.garbage,
            predictions_key=args.predictions_key,
            output=args.output,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run_until_signalled(start: Callable[[], Awaitable[RunningServer[Any]]], label: str, host: str, port: int) -> int:
    """Serve what ``start`` starts until SIGTERM/SIGINT: 0 then, 1 when the port cannot be bound."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        model = await start()
        try:
            print(f"{label} serving on {model.url}", file=sys.stderr)
            await stop.wait()
        finally:
            await model.close()

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 after SIGTERM/SIGINT, 1 when the port cannot be bound, 2 for bad arguments."""
    args = _parse_args(argv)
    behaviour: ModelBehaviour = args.behaviour
    label = f"{behaviour.role} model {behaviour.model_version}"
    return run_until_signalled(lambda: start_model(behaviour, args.host, args.port), label, args.host, args.port)
