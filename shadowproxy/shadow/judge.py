"""The LLM judge's worker (``[judge]``): a sample of compared chat and completions pairs, judged
blind by an OpenAI-compatible model, off the hot path and bounded.

The mirror offers every compared chat or completions pair once it has been judged by text
(``offer``, a callback after the client's answer has gone); a share ``sample_rate`` of them is
drawn and put on a queue of at most ``QUEUE_PER_SLOT * max_in_flight`` waiting pairs. A full
queue drops the pair and counts it. ``max_in_flight`` tasks take pairs from the queue and call
``{url}/chat/completions`` on their own aiohttp session (a pool of ``max_in_flight``
connections), each call bounded by ``timeout_s``. What the judge said is read by
``judging/judge.py`` and counted in ``JudgeStats`` (judging/judgestats.py) and the metrics.
Production's path never waits for any of this: ``offer`` is a random draw and a queue put.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
import orjson

from shadowproxy.config import JudgeConfig
from shadowproxy.judging.judge import judge_request, read_reply, render_answer, render_request, result_of
from shadowproxy.judging.judgestats import JudgeStats
from shadowproxy.shadow.metrics import JudgeMetrics

__all__ = ["MAX_REPLY_BYTES", "QUEUE_PER_SLOT", "PairJudge"]

log = logging.getLogger("shadowproxy.shadow.judge")

# Pairs that may wait for a free judge slot, per slot (max_in_flight): enough to ride out a burst,
# few enough that a judgement is never about traffic long gone.
QUEUE_PER_SLOT = 2
# A judge's answer is a token; anything this large is not one.
MAX_REPLY_BYTES = 1_048_576


class _Pair:
    __slots__ = ("candidate", "endpoint", "production", "request_body")

    def __init__(self, request_body: bytes, endpoint: str, production: list[object], candidate: list[object]) -> None:
        self.request_body = request_body
        self.endpoint = endpoint
        self.production = production
        self.candidate = candidate


class PairJudge:
    """Draws pairs for the judge, queues them (bounded), judges them on ``max_in_flight`` tasks."""

    def __init__(
        self, config: JudgeConfig, stats: JudgeStats, metrics: JudgeMetrics, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.stats = stats
        self.metrics = metrics
        self.rng = rng if rng is not None else random.Random()
        self.sample_rate = config.sample_rate
        self.max_queue = QUEUE_PER_SLOT * config.max_in_flight
        self.queue: asyncio.Queue[_Pair] = asyncio.Queue(maxsize=self.max_queue)
        self.active = 0  # pairs being judged now
        self.headers = {"Content-Type": "application/json"}
        self.headers.update({name: secret.value for name, secret in config.headers.items()})
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        stats.enable(config.min_judgements)

    # -- the mirror's side ------------------------------------------------------------------------
    def offer(self, request_body: bytes, endpoint: str, production: list[object], candidate: list[object]) -> None:
        """A compared pair (both sides answered and were read): judge it, maybe. Never waits."""
        if self.rng.random() >= self.sample_rate:
            return
        self.stats.sampled += 1
        self.metrics.sampled.inc()
        try:
            self.queue.put_nowait(_Pair(request_body, endpoint, production, candidate))
        except asyncio.QueueFull:
            self._drop("queue_full")
            return
        self.stats.pending += 1

    @property
    def busy(self) -> bool:
        return self.active > 0 or not self.queue.empty()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.max_in_flight),
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tasks = [asyncio.create_task(self._work()) for _ in range(cfg.max_in_flight)]

    async def drain(self, timeout_s: float) -> None:
        """Give queued and running judgements up to ``timeout_s`` (the proxy's drain time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop: whatever is still queued or being judged is dropped (reason ``shutdown``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        left = self.active + self.queue.qsize()
        for _ in range(left):
            self._drop("shutdown")
        self.stats.pending -= left
        self.active = 0
        while not self.queue.empty():
            self.queue.get_nowait()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- judging ----------------------------------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.stats.dropped += 1
        self.metrics.dropped[reason].inc()

    async def _work(self) -> None:
        while True:
            pair = await self.queue.get()
            self.active += 1
            try:
                await self._judge(pair)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must never take the proxy down: log, count, go on
                log.exception("judging a pair failed")
                self._finish_error("malformed", 0.0)
            self.active -= 1

    async def _judge(self, pair: _Pair) -> None:
        cfg = self.config
        production = render_answer(pair.production)
        candidate = render_answer(pair.candidate)
        candidate_first = self.rng.random() < 0.5
        body = orjson.dumps(
            judge_request(
                cfg.model, cfg.max_tokens, render_request(pair.request_body, pair.endpoint),
                production, candidate, candidate_first, cfg.max_tokens_field,
            )
        )
        assert self._session is not None
        started = time.perf_counter()
        try:
            async with self._session.post(cfg.endpoint, data=body, headers=self.headers) as response:
                status = response.status
                reply = await _read_bounded(response)
        except TimeoutError:
            self._finish_error("timeout", started)
            return
        except (aiohttp.ClientError, OSError):
            self._finish_error("connection", started)
            return
        if not 200 <= status < 300:
            self._finish_error("status", started)
            return
        if reply is None:
            self._finish_error("malformed", started)
            return
        try:
            doc = orjson.loads(reply)
        except orjson.JSONDecodeError:
            self._finish_error("malformed", started)
            return
        read = read_reply(doc)
        if read.error:
            self._finish_error(read.error, started)
            return
        result = result_of(read.token, candidate_first)
        self.metrics.duration.observe(time.perf_counter() - started)
        self.stats.pending -= 1
        self.stats.record_judgement(result, candidate_first, len(candidate), len(production))
        self.metrics.results[result].inc()

    def _finish_error(self, kind: str, started: float) -> None:
        if started:
            self.metrics.duration.observe(time.perf_counter() - started)
        self.stats.pending -= 1
        self.stats.record_error(kind)
        self.metrics.errors[kind].inc()


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes | None:
    """The answer's body, or None past ``MAX_REPLY_BYTES``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            return None
        chunks.append(chunk)
