"""Bounded dispatch of sampled requests to the candidate, and pairing with production's answer.

The proxy hands a sampled exchange over through a `MirrorTicket`: body bytes as they arrive, then
"request complete" (the candidate request starts at once, from the buffered bytes, so the candidate
can never push back on the client connection) and finally production's status, body and latency.
The candidate exchange (`ShadowExchange`) runs on callbacks from its pooled connection like
production's does, with no task per request; a sweep enforces `candidate.timeout_s`. When both
answers are in, the pair is judged (parsed, compared, recorded) in a callback of its own, after
the client's answer has been sent. Nothing here can block the client's answer; what cannot be
afforded is dropped and counted (sampled / sent / error / dropped / skipped: docs/comparison.md,
"Mirror counts").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Final

import orjson

from shadowproxy.config import CandidateConfig, CompareConfig, MirrorConfig, NamedCandidateConfig
from shadowproxy.http.server import Cycle
from shadowproxy.http.upstream import (
    BufferedResponse,
    ResponseSink,
    UpstreamConnection,
    UpstreamPool,
)
from shadowproxy.judging.compare import Comparison, compare_predictions
from shadowproxy.judging.fields import FieldTable, field_diffs
from shadowproxy.judging.openai import OpenAIChoice, compare_openai, extract_openai, openai_endpoint
from shadowproxy.judging.presets import extract_predictions
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.shadow.judge import PairJudge
from shadowproxy.shadow.llm import LlmMeter, LlmWatch, is_event_stream
from shadowproxy.shadow.metrics import Metrics
from shadowproxy.shadow.observers import Observer, PairRecord
from shadowproxy.shadow.rewrite import CandidateRewrite
from shadowproxy.shadow.sampling import Sampler

log = logging.getLogger("shadowproxy.shadow.mirror")

# How long after its request a copy that needs a new connection opens it.
CONNECT_DELAY_S: Final = 0.002
_perf_counter: Final = time.perf_counter  # a static read when compiled, not a dict lookup

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 10.0


class Mirror:
    """One candidate: its pool, in-flight bound, backoff, sampling rate, stats and metrics."""

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        candidate: CandidateConfig,
        mirror: MirrorConfig,
        compare: CompareConfig,
        production_timeout_s: float,
        metrics: Metrics,
        stats: ShadowStats,
        observers: list[Observer] | None = None,
        name: str = "candidate",
        secondary: bool = False,
    ) -> None:
        self.pool = pool
        self.name = name
        # [secondary]: production's twin, whose answers are read by the candidates' judgements
        # (`SharedAnswer`), never judged on their own.
        self.is_secondary = secondary
        self.observers = observers if observers is not None else []  # shared: added to at run time
        self.sampler = Sampler(mirror)
        if isinstance(candidate, NamedCandidateConfig):
            self.sampler.sample_rate = candidate.rate(mirror)
        self.timeout_s = candidate.timeout_s
        self.stream_timeout_s = candidate.stream_timeout_s
        self.stream_idle_timeout_s = candidate.stream_idle_timeout_s
        self.max_in_flight = candidate.max_in_flight
        self.backoff_after = candidate.backoff_after
        self.compare = compare
        self.openai = compare.preset == "openai"
        # The candidate's LLM figures, over its mirrored answers.
        self.llm = (
            LlmMeter(name, stats.llm.candidate, metrics, candidate.price, compare.max_response_bytes)
            if self.openai and not secondary else None
        )
        self.rewrite = CandidateRewrite.from_config(candidate)  # None: the copy is the client's request
        # [judge]: offered every compared chat and completions pair (shadow/judge.py); None: no judge.
        self.judge: PairJudge | None = None
        self.metrics = metrics
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        target = pool.target
        self.prefix = target.path_prefix.encode()
        self.host_header = target.host_header.encode()
        self.in_flight = 0
        self.active: set[ShadowExchange] = set()  # candidate exchanges in flight
        self.unjudged = 0  # dispatched tickets whose pair has not been judged yet
        # Candidate deadlines are checked this often (a timeout fires at most this late).
        self.sweep_interval = min(
            0.5, max(0.01, min(self.timeout_s, self.stream_timeout_s, self.stream_idle_timeout_s) / 20)
        )
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        self._failures = 0
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._mirror_counter = metrics.mirror_requests.by_first(name)
        self._skipped = metrics.mirror_skipped.by_first(name)
        self._dropped = metrics.mirror_dropped.by_first(name)
        self._comparisons = metrics.comparisons.by_first(name) if not secondary else {}
        self._in_flight_gauge = metrics.mirror_in_flight.children[name]
        self._rate_gauge = metrics.mirror_sample_rate.children[name]
        self._duration = metrics.duration_by_target[name]
        self._rate_gauge.value = self.sampler.sample_rate

    # -- run-time control -------------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def set_sample_rate(self, rate: float) -> None:
        self.sampler.sample_rate = rate
        self._rate_gauge.value = rate

    # -- accounting -------------------------------------------------------------------------------
    def _count(self, result: str) -> None:
        self.stats.record_mirror(result)
        if result != "sampled":
            self._mirror_counter[result].inc()

    def skip(self, reason: str) -> None:
        self._count("skipped")
        self.stats.record_mirror_reason("skipped_by_reason", reason)
        self._skipped[reason].value += 1

    def drop(self, reason: str) -> None:
        self._count("dropped")
        self.stats.record_mirror_reason("dropped_by_reason", reason)
        self._dropped[reason].value += 1

    def _set_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        self.stats.mirror_in_flight = self.in_flight
        self._in_flight_gauge.value = float(self.in_flight)

    # -- the proxy's side -------------------------------------------------------------------------
    def begin(self, cycle: Cycle, path: bytes, request_id: bytes) -> MirrorTicket | None:
        """Called for every request head; a ticket when this request is to be mirrored (the caller
        sets its `fields`: the header block production gets, rendered)."""
        sampler = self.sampler
        if not sampler.sampled(cycle.headers):
            return None
        self._count("sampled")
        reason = sampler.skip_reason(cycle.method, cycle.content_length)
        if reason is not None:
            self.skip(reason)
            return None
        endpoint = ""
        if self.openai:
            endpoint = openai_endpoint(path) or ""
            if not endpoint:
                self.skip("path")
                return None
        ticket = MirrorTicket(self, cycle.method, path, request_id.decode("latin-1"))
        ticket.endpoint = endpoint
        return ticket

    def eligible(self, cycle: Cycle, path: bytes) -> str | None:
        """The openai endpoint of a sampled request ("" for other presets), or None after
        counting it as skipped."""
        reason = self.sampler.skip_reason(cycle.method, cycle.content_length)
        if reason is not None:
            self.skip(reason)
            return None
        if self.openai:
            endpoint = openai_endpoint(path) or ""
            if not endpoint:
                self.skip("path")
                return None
            return endpoint
        return ""

    def dispatch(self, ticket: MirrorTicket, body: bytes) -> None:
        """The request body is complete: send the candidate its copy now, or drop it."""
        if self.in_flight >= self.max_in_flight:
            ticket.cancelled = True
            self.drop("in_flight_full")
            return
        if self._backoff_until and self.loop.time() < self._backoff_until:
            ticket.cancelled = True
            self.drop("backoff")
            return
        if self.judge is not None:
            ticket.request_body = body  # the client's request, as the judge is to read it
        fields = ticket.fields
        rewrite = self.rewrite
        if rewrite is not None:
            fields = rewrite.fields(fields)
            body = rewrite.body(body)
        head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%sX-Shadow-Request: true\r\nContent-Length: %d\r\n\r\n" % (
            ticket.method, self.prefix, ticket.path, self.host_header, fields, len(body)
        )
        self._count("sent")
        self._set_in_flight(1)
        self.unjudged += 1
        exchange = ShadowExchange(self, ticket, head, body)
        self.active.add(exchange)
        exchange.start()

    @property
    def busy(self) -> bool:
        """True while a shadow exchange is in flight or a pair awaits its judgement."""
        return self.unjudged > 0

    def _sweep(self) -> None:
        if self.active:
            now = self.loop.time()
            for exchange in list(self.active):
                if now >= exchange.deadline:
                    exchange.expire()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def candidate_done(self, exchange: ShadowExchange, response: BufferedResponse | None, failure: str) -> None:
        """A shadow exchange ended (answer, failure or timeout): account for it, maybe judge."""
        self.active.discard(exchange)
        self._set_in_flight(-1)
        self._note_connect_outcome(failure == "connect")
        if self.is_secondary:
            self._secondary_done(exchange.ticket, response, failure)
            return
        slice_index = exchange.ticket.slice
        if response is None:
            self._count("error")
            self.stats.record_mirror_reason("errors_by_kind", failure)
            self.metrics.upstream_failures.labels(self.name, failure).inc()
            if slice_index >= 0:  # the candidate's total adds its slices up
                self.stats.record_slice_candidate(slice_index, None, True)
            else:
                self.stats.record_candidate(None, error=True)
        else:
            self._duration.observe(response.latency_s)
            if slice_index >= 0:
                self.stats.record_slice_candidate(slice_index, response.latency_s, response.status >= 500)
            else:
                self.stats.record_candidate(response.latency_s, error=response.status >= 500)
        exchange.ticket.candidate_ready(response)

    def _secondary_done(self, ticket: MirrorTicket, response: BufferedResponse | None, failure: str) -> None:
        if response is None:
            self._count("error")
            self.stats.record_mirror_reason("errors_by_kind", failure)
            self.metrics.upstream_failures.labels(self.name, failure).inc()
            self.stats.record_candidate(None, error=True)
        else:
            self._duration.observe(response.latency_s)
            self.stats.record_candidate(response.latency_s, error=response.status >= 500)
        self.unjudged -= 1
        shared = ticket.shared
        if shared is not None:
            shared.secondary_finished(response)

    def judge_later(self, ticket: MirrorTicket) -> None:
        # Not now: the caller may be writing the client's answer, which must leave first.
        self.loop.call_soon(self._judge_safely, ticket)

    def _judge_safely(self, ticket: MirrorTicket) -> None:
        self.unjudged -= 1
        try:
            self._judge(ticket, ticket.candidate)
        except Exception:  # a comparison bug must never take the proxy down: log and count
            log.exception("comparison failed")
            self._outcome("candidate_error", 1)

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

    def _outcome(self, outcome: str, n: int) -> None:
        """An outcome other than agree/disagree (those come from `record_comparison`)."""
        self.stats.record_outcome(outcome, n)
        self._comparisons[outcome].value += n

    def _judge(self, ticket: MirrorTicket, candidate: BufferedResponse | None) -> None:
        """Pair both answers, record the outcome, and tell the observers."""
        assert ticket.production is not None
        status, prod_body, prod_latency = ticket.production
        if prod_latency is not None and candidate is not None:
            self.stats.record_pair_latency(prod_latency, candidate.latency_s)
        if status == 0 or status >= 500:
            self.stats.record_production_error_on_mirrored()
        prod_preds: list[object] | None = None
        prod_choices: list[OpenAIChoice] | None = None
        prod_llm = ticket.production_llm
        cand_llm = ticket.candidate_llm
        if 200 <= status < 300 and prod_body is not None:
            if self.openai:
                if prod_llm is not None and prod_llm.asm is not None:
                    # A stream that broke off or carried an error is not read: production's
                    # answer counts as unparseable, as a whole answer that cannot be read would.
                    prod_choices = prod_llm.asm.openai_choices() if prod_llm.asm.complete else None
                else:
                    prod_choices = self._choices(prod_body, ticket.endpoint)
                if prod_choices is not None:
                    prod_preds = [choice.prediction() for choice in prod_choices]
            else:
                shared = ticket.shared
                if shared is not None and shared.done:
                    prod_preds = shared.predictions  # another candidate's judgement read them
                else:
                    prod_preds = self._predictions(prod_body)
                    if shared is not None:
                        shared.done = True
                        shared.predictions = prod_preds
        outcome, cand_preds, flags = self._compare(
            status, prod_body, prod_preds, candidate, ticket.endpoint, prod_choices, cand_llm, ticket
        )
        if (
            outcome in ("agree", "disagree")
            and prod_llm is not None
            and cand_llm is not None
            and prod_llm.ttft > 0
            and cand_llm.ttft > 0
        ):
            self.stats.llm.record_ttft_pair(prod_llm.ttft, cand_llm.ttft)
        if outcome not in ("agree", "disagree", "not_compared"):  # agreements are counted per prediction
            self._outcome(outcome, 1)
        judge = self.judge
        if (
            judge is not None
            and outcome in ("agree", "disagree")
            and ticket.endpoint in ("chat", "completions")
            and prod_preds is not None
            and cand_preds is not None
        ):
            judge.offer(ticket.request_body, ticket.endpoint, prod_preds, cand_preds)
        shared = ticket.shared
        if shared is not None and shared.with_secondary and flags is not None and outcome in ("agree", "disagree"):
            if self.compare.kind == "fields" and prod_choices is None:
                secondary_flags = ticket.secondary_agrees  # worked out with the fields' noise
            else:
                secondary_flags = self._secondary_flags(shared, prod_preds, prod_choices, ticket.endpoint)
            self.stats.record_noise(flags, secondary_flags)
        if ticket.slice >= 0 and outcome != "not_compared":
            agree = sum(flags) if flags is not None else 0
            disagree = len(flags) - agree if flags is not None else 0
            self.stats.record_slice_outcome(ticket.slice, outcome, agree, disagree)
        if self.observers:
            record = PairRecord(
                request_id=ticket.request_id,
                outcome=outcome,
                candidate_status=candidate.status if candidate is not None else 0,
                candidate_headers=candidate.headers if candidate is not None else [],
                candidate_body=candidate.body if candidate is not None and not candidate.truncated else None,
                candidate_latency_s=candidate.latency_s if candidate is not None else None,
                production_predictions=prod_preds,
                candidate_predictions=cand_preds,
                agreements=flags,
            )
            for observer in self.observers:
                try:
                    observer.on_pair(record)
                except Exception:  # an observer's bug must never break the mirror
                    log.exception("observer %r failed", observer)

    def _compare_fields(
        self, prod_doc: object, cand_preds: list[object], ticket: MirrorTicket | None
    ) -> tuple[str, list[object] | None, list[bool] | None]:
        """compare.kind "fields" (judging/fields.py): the whole answers, leaf by leaf; with a
        secondary, its own differences from production count per field too, and decide which
        fields are noisy before either answer's agreement is read."""
        cfg = self.compare
        table = self.stats.fields
        if table is None:  # stats built without enable_fields: count from the first answer on
            table = self.stats.fields = FieldTable(cfg.noise_threshold)
        try:
            cand = field_diffs(prod_doc, cand_preds[0], cfg.abs_tol, cfg.rel_tol)
        except RecursionError:
            return "candidate_error", cand_preds, None
        shared = ticket.shared if ticket is not None else None
        secondary: dict[str, bool] | None = None
        if shared is not None and shared.with_secondary:
            if not shared.secondary_read:
                shared.secondary_read = True
                answer = shared.secondary
                if answer is not None and 200 <= answer.status < 300 and not answer.truncated:
                    try:
                        shared.secondary_fields = field_diffs(prod_doc, _loads(answer.body), cfg.abs_tol, cfg.rel_tol)
                    except (ValueError, RecursionError):
                        shared.secondary_fields = None
            secondary = shared.secondary_fields
        agrees, secondary_agrees = table.record(cand, secondary)
        if ticket is not None:
            ticket.secondary_agrees = [secondary_agrees] if secondary_agrees is not None else None
        result = Comparison()
        result.flags = [agrees]
        result.agree = int(agrees)
        result.disagree = 1 - result.agree
        self.stats.record_comparison(result, "fields")
        self._comparisons["agree" if agrees else "disagree"].value += 1
        return ("agree" if agrees else "disagree"), cand_preds, result.flags

    def _secondary_flags(
        self,
        shared: SharedAnswer,
        prod_preds: list[object] | None,
        prod_choices: list[OpenAIChoice] | None,
        endpoint: str,
    ) -> list[bool] | None:
        """Per prediction, whether the secondary agrees with production (one [compare] for all
        candidates: worked out by the first judgement and reused); None when its answer is
        missing, not 2xx, too large or unreadable, or holds another number of predictions."""
        if shared.secondary_read:
            return shared.secondary_flags
        shared.secondary_read = True
        answer = shared.secondary
        if answer is None or not 200 <= answer.status < 300 or answer.truncated or prod_preds is None:
            return None
        cfg = self.compare
        if prod_choices is not None:
            choices = self._choices(answer.body, endpoint)
            if choices is None or len(choices) != len(prod_choices):
                return None
            shared.secondary_flags = compare_openai(prod_choices, choices, cfg).flags
        else:
            preds = self._predictions(answer.body)
            if preds is None or len(preds) != len(prod_preds):
                return None
            shared.secondary_flags = compare_predictions(
                cfg.kind, prod_preds, preds, cfg.abs_tol, cfg.rel_tol, cfg.min_similarity
            ).flags
        return shared.secondary_flags

    def _predictions(self, body: bytes) -> list[object] | None:
        cfg = self.compare
        if cfg.kind == "fields":  # the whole answer is the one prediction; preset and path unused
            try:
                return [_loads(body)]
            except (ValueError, RecursionError):
                return None
        try:
            return extract_predictions(_loads(body), cfg.preset, cfg.path, cfg.output)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return None

    def _choices(self, body: bytes, endpoint: str) -> list[OpenAIChoice] | None:
        """An OpenAI answer's choices (judging/openai.py), or None when it is not one."""
        try:
            return extract_openai(_loads(body), endpoint)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return None

    def _compare(
        self,
        status: int,
        prod_body: bytes | None,
        prod_preds: list[object] | None,
        candidate: BufferedResponse | None,
        endpoint: str = "",
        prod_choices: list[OpenAIChoice] | None = None,
        cand_llm: LlmWatch | None = None,
        ticket: MirrorTicket | None = None,
    ) -> tuple[str, list[object] | None, list[bool] | None]:
        """The request's outcome, the candidate's predictions and per-prediction agreement."""
        if candidate is None or candidate.status >= 500:
            return "candidate_error", None, None
        if not 200 <= status < 300:
            return "not_compared", None, None  # production's own error; a matching 4xx is no error
        if not 200 <= candidate.status < 300:
            return "candidate_error", None, None
        if prod_body is None or candidate.truncated:
            return "too_large", None, None
        if prod_preds is None:
            return "unparseable", None, None
        if prod_choices is not None:
            return self._compare_openai(prod_choices, candidate.body, endpoint, cand_llm)
        cand_preds = self._predictions(candidate.body)
        if cand_preds is None or len(prod_preds) != len(cand_preds):
            return "candidate_error", cand_preds, None
        cfg = self.compare
        if cfg.kind == "fields":
            return self._compare_fields(prod_preds[0], cand_preds, ticket)
        result = compare_predictions(cfg.kind, prod_preds, cand_preds, cfg.abs_tol, cfg.rel_tol, cfg.min_similarity)
        self.stats.record_comparison(result, cfg.kind)
        if result.agree:
            self._comparisons["agree"].value += result.agree
        if result.disagree:
            self._comparisons["disagree"].value += result.disagree
        return ("disagree" if result.disagree else "agree"), cand_preds, result.flags

    def _compare_openai(
        self, prod_choices: list[OpenAIChoice], cand_body: bytes, endpoint: str, cand_llm: LlmWatch | None = None
    ) -> tuple[str, list[object] | None, list[bool] | None]:
        """Choice by choice (judging/openai.py): a choice only one side has is a disagreement.
        A candidate stream that broke off or carried an error is the candidate's error."""
        if cand_llm is not None and cand_llm.asm is not None:
            asm = cand_llm.asm
            cand_choices = asm.openai_choices() if asm.complete else None
        else:
            cand_choices = self._choices(cand_body, endpoint)
        if cand_choices is None:
            return "candidate_error", None, None
        result = compare_openai(prod_choices, cand_choices, self.compare)
        self.stats.record_comparison(result, "vector" if endpoint == "embeddings" else "text")
        if result.agree:
            self._comparisons["agree"].value += result.agree
        if result.disagree:
            self._comparisons["disagree"].value += result.disagree
        cand_preds = [choice.prediction() for choice in cand_choices]
        return ("disagree" if result.disagree else "agree"), cand_preds, result.flags

    async def drain(self, timeout_s: float) -> None:
        """Give shadow exchanges in flight the same drain time as client requests (including ones
        started by client requests that are still finishing), then end what is left."""
        deadline = self.loop.time() + timeout_s
        while self.busy and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for exchange in list(self.active):
            exchange.expire()
        self._sweeper.cancel()


class ShadowExchange(ResponseSink):
    """One copy of a request sent to the candidate, its answer collected (bounded) by callbacks."""

    __slots__ = (
        "mirror", "ticket", "head", "body", "conn", "task", "deadline", "status", "headers", "chunks",
        "size", "truncated", "t_sent", "retried", "done", "started", "llm", "stream_end",
    )

    def __init__(self, mirror: Mirror, ticket: MirrorTicket, head: bytes, body: bytes) -> None:
        self.mirror = mirror
        self.ticket = ticket
        self.head = head
        self.body = body
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = mirror.loop.time()
        # The whole exchange, connect included; a streamed answer's head moves it to stream_timeout_s.
        self.deadline = self.started + mirror.timeout_s
        self.llm: LlmWatch | None = None  # an answer to an OpenAI-compatible request (preset openai)
        self.stream_end = 0.0  # a streamed answer: its last moment (stream_timeout_s); 0.0 otherwise
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.t_sent = 0.0
        self.retried = False
        self.done = False

    def start(self) -> None:
        conn = self.mirror.pool.acquire_idle()
        if conn is not None:
            self.attach(conn)  # the copy's head is held with production's and sent after it
        else:
            # Opening a connection takes the loop several callbacks and tens of microseconds, all
            # of which would fall between production's request and its first answer bytes were
            # they run now: they run once that moment has passed (for a stalled or closing
            # candidate, which never leaves an idle connection, that is every copy).
            self.mirror.loop.call_later(CONNECT_DELAY_S, self._connect)

    def _connect(self) -> None:
        if not self.done:
            self.task = self.mirror.pool.connect_for(self)

    def acquire_failed(self) -> None:
        self._end(None, "connect")

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.status, self.headers, self.chunks, self.size, self.truncated = 0, [], [], 0, False
        self.t_sent = _perf_counter()
        conn.start(self, self.head, head_request=self.ticket.method == b"HEAD")
        if self.body:
            conn.write(self.body)

    # -- ResponseSink -----------------------------------------------------------------------------
    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        lnames: list[bytes],
        tokens: frozenset[bytes],
        content_length: int | None,
    ) -> None:
        self.status = status
        self.headers = headers
        mirror = self.mirror
        if content_length is not None and content_length > mirror.compare.max_response_bytes:
            self.truncated = True
        llm = mirror.llm
        if llm is not None and 200 <= status < 300 and self.ticket.endpoint:
            stream = is_event_stream(headers, lnames)
            self.llm = llm.watch(self.ticket.endpoint, self.t_sent, stream)
            if stream:
                self.stream_end = self.started + mirror.stream_timeout_s
                self._stream_alive()

    def _stream_alive(self) -> None:
        """A stream's deadline: stream_idle_timeout_s from now, never past stream_timeout_s."""
        idle = self.mirror.loop.time() + self.mirror.stream_idle_timeout_s
        end = self.stream_end
        self.deadline = idle if idle < end else end

    def on_response_body(self, data: bytes) -> None:
        if self.stream_end:
            self._stream_alive()
        if self.truncated:
            return
        self.size += len(data)
        if self.size > self.mirror.compare.max_response_bytes:
            self.truncated = True
            self.chunks = []
        else:
            self.chunks.append(data)
        llm = self.llm
        if llm is not None:
            llm.feed(data)

    def on_response_complete(self) -> None:
        latency = _perf_counter() - self.t_sent
        conn = self.conn
        self.conn = None
        if conn is not None:
            self.mirror.pool.release(conn)
        body = b"".join(self.chunks) if not self.truncated else b""
        llm = self.llm
        if llm is not None:
            llm.finish()
            self.mirror.loop.call_soon(llm.record, None if self.truncated else body)
        self._end(BufferedResponse(self.status, self.headers, body, self.truncated, latency), "")

    def on_response_failed(self, exc: BaseException) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close()
            if conn.reused and not self.retried and not conn._got_bytes and not self.done:
                # A pooled connection the candidate had closed while idle: once more on a new one.
                self.retried = True
                self.task = self.mirror.pool.connect_for(self)
                return
        self._end(None, "malformed" if "malformed" in str(exc) else "reset")

    def pause_request_body(self) -> None:
        pass  # the body is already buffered: nothing to pause

    def resume_request_body(self) -> None:
        pass

    # -- endings ----------------------------------------------------------------------------------
    def expire(self) -> None:
        """Past candidate.timeout_s (or the drain): give up, close the connection."""
        if self.conn is not None:
            self.conn.detach()
            self.conn = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._end(None, "timeout")

    def _end(self, response: BufferedResponse | None, failure: str) -> None:
        if self.done:
            return
        self.done = True
        self.body = b""
        llm = self.llm
        if llm is not None:
            if response is None:
                llm.fail(failure)
            self.ticket.candidate_llm = llm
        self.mirror.candidate_done(self, response, failure)


def _loads(body: bytes) -> object:
    """Parse a model's JSON answer. Python servers write NaN/Infinity as bare literals (json.dumps'
    default) that strict JSON and orjson refuse; the standard library reads them."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


class MirrorTicket:
    """One sampled exchange as the mirror sees it: bytes and outcomes, never transports."""

    __slots__ = ("mirror", "method", "path", "fields", "request_id", "chunks", "size", "cancelled",
                 "dispatched", "production", "candidate", "candidate_in", "endpoint", "production_llm",
                 "candidate_llm", "request_body", "slice", "shared", "secondary_agrees")

    def __init__(self, mirror: Mirror, method: bytes, path: bytes, request_id: str) -> None:
        self.mirror = mirror
        self.request_id = request_id
        self.method = method
        self.path = path
        self.fields = b""  # the request's header fields as production got them, rendered
        self.endpoint = ""  # preset openai: "chat", "completions" or "embeddings"
        self.chunks: list[bytes] = []
        self.size = 0
        self.cancelled = False
        self.dispatched = False
        self.production: tuple[int, bytes | None, float | None] | None = None
        self.candidate: BufferedResponse | None = None
        self.candidate_in = False
        # Preset openai: what each side's answer said as it passed (a stream's assembled choices).
        self.production_llm: LlmWatch | None = None
        self.candidate_llm: LlmWatch | None = None
        self.request_body = b""  # kept for the judge only ([judge])
        self.slice = -1  # [[slices]]: the request's slice, else -1
        self.shared: SharedAnswer | None = None  # several candidates: production's answer, read once
        # compare.kind "fields" with a secondary: whether its answer agreed, noisy fields left out.
        self.secondary_agrees: list[bool] | None = None

    def add_body(self, data: bytes) -> None:
        if self.cancelled:
            return
        self.size += len(data)
        if self.size > self.mirror.sampler.max_body_bytes:
            # A chunked body grew past mirror.max_body_bytes: stop buffering, count it as skipped.
            self.cancelled = True
            self.chunks = []
            self.mirror.skip("body_too_large")
        else:
            self.chunks.append(data)

    def request_complete(self) -> None:
        if self.cancelled or self.dispatched:
            return
        self.dispatched = True
        body = b"".join(self.chunks)
        self.chunks = []
        self.mirror.dispatch(self, body)

    def production_done(self, status: int, body: bytes | None, latency_s: float | None) -> None:
        if self.production is not None:
            return
        if not self.dispatched and not self.cancelled:
            # The client's request never completed (it went away, or production answered early).
            self.cancelled = True
            self.mirror.drop("client_gone")
        self.production = (status, body, latency_s)
        if self.candidate_in:
            self._ready()

    def candidate_ready(self, response: BufferedResponse | None) -> None:
        self.candidate = response
        self.candidate_in = True
        if self.production is not None:
            self._ready()

    def _ready(self) -> None:
        """Both answers are in: judge now, or once the secondary's answer is in too."""
        shared = self.shared
        if shared is not None and shared.secondary_pending:
            shared.waiting.append(self)
        else:
            self.mirror.judge_later(self)


class MirrorGroup:
    """Several candidates behind one hand-off: one draw per request decides for all of them (a
    candidate at a lower rate sees a subset of what a higher-rate one sees), the body is buffered
    and joined once, and each candidate then runs on its own pool, bound and backoff, so a slow
    or dead one delays neither production nor the others."""

    def __init__(self, mirrors: list[Mirror], mirror: MirrorConfig, secondary: Mirror | None = None) -> None:
        self.mirrors = mirrors
        # [secondary]: sent every request mirrored to any candidate; its answer joins each
        # candidate's judgement of the same request (`SharedAnswer`).
        self.secondary = secondary
        self.sampler = Sampler(mirror)  # the draw, methods and size limit; rates are the mirrors'
        self.max_body_bytes = mirror.max_body_bytes

    def begin(self, cycle: Cycle, path: bytes, request_id: bytes) -> TicketGroup | None:
        share = self.sampler.draw(cycle.headers)
        chosen = [m for m in self.mirrors if share < m.sampler.sample_rate]
        if not chosen:
            return None
        rid = request_id.decode("latin-1")
        tickets: list[MirrorTicket] = []
        shared = SharedAnswer()
        for mirror in chosen:
            mirror._count("sampled")
            endpoint = mirror.eligible(cycle, path)
            if endpoint is None:
                continue
            ticket = MirrorTicket(mirror, cycle.method, path, rid)
            ticket.endpoint = endpoint
            ticket.shared = shared
            tickets.append(ticket)
        if not tickets:
            return None
        second: MirrorTicket | None = None
        if self.secondary is not None:
            second = MirrorTicket(self.secondary, cycle.method, path, rid)
            second.endpoint = tickets[0].endpoint
            second.shared = shared
            shared.with_secondary = True
            shared.secondary_pending = True
        return TicketGroup(self, tickets, second)

    @property
    def busy(self) -> bool:
        return any(m.busy for m in self.mirrors) or (self.secondary is not None and self.secondary.busy)

    async def drain(self, timeout_s: float) -> None:
        secondary = [self.secondary] if self.secondary is not None else []
        await asyncio.gather(*(m.drain(timeout_s) for m in [*self.mirrors, *secondary]))


class SharedAnswer:
    """Production's predictions for one request, read by the first of several candidates' judgements
    and reused by the others (one [compare] for all: the same reading)."""

    __slots__ = (
        "done", "predictions", "with_secondary", "secondary_pending", "secondary", "secondary_read",
        "secondary_flags", "secondary_fields", "waiting",
    )

    def __init__(self) -> None:
        self.done = False
        self.predictions: list[object] | None = None
        # [secondary]: its answer (None: missing), and the candidates' tickets waiting for it.
        self.with_secondary = False
        self.secondary_pending = False
        self.secondary: BufferedResponse | None = None
        self.secondary_read = False  # its flags below were worked out (by the first judgement)
        self.secondary_flags: list[bool] | None = None
        self.secondary_fields: dict[str, bool] | None = None  # compare.kind "fields"
        self.waiting: list[MirrorTicket] = []

    def secondary_finished(self, answer: BufferedResponse | None) -> None:
        """The secondary answered, failed, timed out or was never sent: judge who waited."""
        if not self.secondary_pending:
            return
        self.secondary_pending = False
        self.secondary = answer
        waiting, self.waiting = self.waiting, []
        for ticket in waiting:
            ticket.mirror.judge_later(ticket)


class TicketGroup:
    """One sampled exchange for several candidates: the proxy's side of a `MirrorTicket`, fanned out."""

    __slots__ = (
        "group", "tickets", "secondary", "fields", "chunks", "size", "cancelled", "dispatched", "production_llm",
        "slice",
    )

    def __init__(self, group: MirrorGroup, tickets: list[MirrorTicket], secondary: MirrorTicket | None = None) -> None:
        self.group = group
        self.tickets = tickets
        self.secondary = secondary  # [secondary]: its copy of the exchange
        self.fields = b""
        self.chunks: list[bytes] = []
        self.size = 0
        self.cancelled = False
        self.dispatched = False
        self.production_llm: LlmWatch | None = None
        self.slice = -1

    def add_body(self, data: bytes) -> None:
        if self.cancelled:
            return
        self.size += len(data)
        if self.size > self.group.max_body_bytes:
            self.cancelled = True
            self.chunks = []
            for ticket in self.tickets:
                ticket.cancelled = True
                ticket.mirror.skip("body_too_large")
            self._secondary_off(skip="body_too_large")
        else:
            self.chunks.append(data)

    def request_complete(self) -> None:
        if self.cancelled or self.dispatched:
            return
        self.dispatched = True
        body = b"".join(self.chunks)  # once, for every candidate
        self.chunks = []
        for ticket in self.tickets:
            ticket.fields = self.fields
            ticket.slice = self.slice
            ticket.dispatched = True
            ticket.mirror.dispatch(ticket, body)
        self.cancelled = all(ticket.cancelled for ticket in self.tickets)
        second = self.secondary
        if second is not None:
            if self.cancelled:
                self._secondary_off()  # no candidate is to be judged: nothing to send it for
            else:
                second.mirror._count("sampled")
                second.fields = self.fields
                second.dispatched = True
                second.mirror.dispatch(second, body)
                if second.cancelled:  # dropped (in_flight_full, backoff): counted by dispatch
                    self._secondary_off()

    def _secondary_off(self, skip: str = "", drop: str = "") -> None:
        """The secondary's copy is not sent (or not answered): the candidates judge without it."""
        second = self.secondary
        if second is None:
            return
        second.cancelled = True
        if skip or drop:
            second.mirror._count("sampled")
        if skip:
            second.mirror.skip(skip)
        elif drop:
            second.mirror.drop(drop)
        if second.shared is not None:
            second.shared.secondary_finished(None)

    def production_done(self, status: int, body: bytes | None, latency_s: float | None) -> None:
        second = self.secondary
        if second is not None and not second.dispatched and not second.cancelled:
            self._secondary_off(drop="client_gone")  # the client's request never completed
        for ticket in self.tickets:
            ticket.production_llm = self.production_llm
            ticket.production_done(status, body, latency_s)
