"""Sampled ModelInfer calls copied to a candidate over gRPC, off production's path.

The same bounds and counts as the HTTP mirror (shadow/mirror.py; docs/comparison.md, "Mirror
counts"): a sampled call is skipped when larger than `mirror.max_body_bytes`, dropped when
`candidate.max_in_flight` copies are outstanding or the candidate is backed off after
`backoff_after` refused connections in a row, and otherwise sent as its own task, which waits
at most `candidate.timeout_s` for the candidate and then for production's outcome. The client's
call never waits for any of it. Answers are read with the `oip-v2` preset (grpcproxy/oip.py); a
candidate's error status is a candidate error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import grpc

from shadowproxy.config import CandidateConfig, CompareConfig
from shadowproxy.grpcproxy.oip import infer_response_document
from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.presets import extract_predictions
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.metrics import Metrics
from shadowproxy.shadow.sampling import Sampler

log = logging.getLogger("shadowproxy.grpcproxy.mirror")

BACKOFF_START_S: Final = 0.1
BACKOFF_MAX_S: Final = 10.0
MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"

Metadata = Sequence[tuple[str, str | bytes]]
# Production's outcome for a mirrored call: its status code, latency and answer (None unless OK).
ProductionOutcome = tuple[grpc.StatusCode, float, bytes | None]


def is_server_error(code: grpc.StatusCode) -> bool:
    """The codes that, like an HTTP 5xx, say the server failed rather than the request."""
    return code in _SERVER_ERRORS


_SERVER_ERRORS: Final = frozenset((
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
))


class GrpcMirror:
    """One candidate's gRPC copies: its channel, in-flight bound, backoff, stats and metrics.
    `sampler` is the HTTP mirror's for the same candidate, so a run-time rate change covers both."""

    def __init__(
        self,
        *,
        channel: Any,
        candidate: CandidateConfig,
        compare: CompareConfig,
        sampler: Sampler,
        metrics: Metrics,
        stats: ShadowStats,
        name: str,
    ) -> None:
        self.name = name
        self.channel = channel
        self.infer = channel.unary_unary(MODEL_INFER)  # no (de)serializers: bytes in, bytes out
        self.sampler = sampler
        self.timeout_s = candidate.timeout_s
        self.max_in_flight = candidate.max_in_flight
        self.backoff_after = candidate.backoff_after
        self.compare = compare
        self.stats = stats
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._mirror_counter = metrics.mirror_requests.by_first(name)
        self._skipped = metrics.mirror_skipped.by_first(name)
        self._dropped = metrics.mirror_dropped.by_first(name)
        self._comparisons = metrics.comparisons.by_first(name)
        self._duration = metrics.duration_by_target[name]

    # -- accounting, as the HTTP mirror's ---------------------------------------------------------
    def _count(self, result: str) -> None:
        self.stats.record_mirror(result)
        if result != "sampled":
            self._mirror_counter[result].inc()

    def _skip(self, reason: str) -> None:
        self._count("skipped")
        self.stats.record_mirror_reason("skipped_by_reason", reason)
        self._skipped[reason].value += 1

    def _drop(self, reason: str) -> None:
        self._count("dropped")
        self.stats.record_mirror_reason("dropped_by_reason", reason)
        self._dropped[reason].value += 1

    def _outcome(self, outcome: str, n: int) -> None:
        self.stats.record_outcome(outcome, n)
        self._comparisons[outcome].value += n

    def _note_connect_outcome(self, connect_failed: bool) -> None:
        """Back off after `backoff_after` consecutive refused connections (0.1 s doubling to 10 s)."""
        if not connect_failed:
            self._failures = 0
            self._backoff_s = 0.0
            self._backoff_until = 0.0
            return
        self._failures += 1
        if self._failures >= self.backoff_after:
            self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2 if self._backoff_s else BACKOFF_START_S)
            self._backoff_until = self.loop.time() + self._backoff_s

    # -- the listener's side ----------------------------------------------------------------------
    def begin(self, request: bytes, metadata: Metadata) -> asyncio.Future[ProductionOutcome] | None:
        """Called once per ModelInfer call after production's call has started: a future to set
        with production's outcome when this call is mirrored, else None (counted)."""
        sampler = self.sampler
        headers: list[tuple[bytes, bytes]] = []
        if sampler.sticky_header:
            headers = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in metadata]
        if not sampler.sampled(headers):
            return None
        self._count("sampled")
        if len(request) > sampler.max_body_bytes:
            self._skip("body_too_large")
            return None
        if self.in_flight >= self.max_in_flight:
            self._drop("in_flight_full")
            return None
        if self._backoff_until and self.loop.time() < self._backoff_until:
            self._drop("backoff")
            return None
        self._count("sent")
        self.in_flight += 1
        production: asyncio.Future[ProductionOutcome] = self.loop.create_future()
        task = self.loop.create_task(self._exchange(request, metadata, production))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return production

    async def _exchange(
        self, request: bytes, metadata: Metadata, production: asyncio.Future[ProductionOutcome]
    ) -> None:
        answer: bytes | None = None
        code = grpc.StatusCode.OK
        start = time.perf_counter()
        try:
            answer = await self.infer(request, metadata=(*metadata, ("x-shadow-request", "true")),
                                      timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        finally:
            self.in_flight -= 1
        latency = time.perf_counter() - start
        self._note_connect_outcome(code == grpc.StatusCode.UNAVAILABLE)
        failure = {grpc.StatusCode.UNAVAILABLE: "connect", grpc.StatusCode.DEADLINE_EXCEEDED: "timeout"}.get(code)
        if failure is not None:
            self._count("error")
            self.stats.record_mirror_reason("errors_by_kind", failure)
            self.metrics.upstream_failures.labels(self.name, failure).inc()
            self.stats.record_candidate(None, error=True)
        else:
            self._duration.observe(latency)
            self.stats.record_candidate(latency, error=is_server_error(code))
        try:
            outcome = await production
        except asyncio.CancelledError:
            raise
        try:
            self._judge(outcome, code, latency, answer)
        except Exception:  # a comparison bug must never take the proxy down: log and count
            log.exception("comparison failed")
            self._outcome("candidate_error", 1)

    def _predictions(self, body: bytes) -> list[object] | None:
        cfg = self.compare
        try:
            return extract_predictions(infer_response_document(body), "oip-v2", cfg.path, cfg.output)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return None

    def _judge(
        self, production: ProductionOutcome, code: grpc.StatusCode, latency: float, answer: bytes | None
    ) -> None:
        prod_code, prod_latency, prod_body = production
        if answer is not None:
            self.stats.record_pair_latency(prod_latency, latency)
        if is_server_error(prod_code):
            self.stats.record_production_error_on_mirrored()
        if answer is None:
            self._outcome("candidate_error", 1)
            return
        if prod_code != grpc.StatusCode.OK or prod_body is None:
            return  # not compared: production's own error
        prod_preds = self._predictions(prod_body)
        if prod_preds is None:
            self._outcome("unparseable", 1)
            return
        cand_preds = self._predictions(answer)
        if cand_preds is None or len(cand_preds) != len(prod_preds):
            self._outcome("candidate_error", 1)
            return
        cfg = self.compare
        kind = "label" if cfg.kind == "fields" else cfg.kind  # whole answers: equal or not
        result = compare_predictions(kind, prod_preds, cand_preds, cfg.abs_tol, cfg.rel_tol, cfg.min_similarity)
        self.stats.record_comparison(result, kind)
        if result.agree:
            self._comparisons["agree"].value += result.agree
        if result.disagree:
            self._comparisons["disagree"].value += result.disagree

    async def drain(self, timeout_s: float) -> None:
        """Let copies in flight finish within `timeout_s`, then cancel what is left."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
