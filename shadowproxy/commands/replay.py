"""`shadowproxy replay`: recorded requests re-sent to candidates, judged against production's
recorded answers with the live proxy's presets, kinds, stats and gates, reported like `report`.

The recording is read whole (fileformat.read_paths, or goreplay.read_goreplay), then each request
is sent to every candidate (and to `--secondary`, a fresh production instance whose answers measure
the noise) through one aiohttp session per target with `--concurrency` connections. Pacing: `--max`
(as fast as the connections allow), `--rate R` (open loop: request i starts at i / R seconds),
`--speed N` (the recorded gaps divided by N). Each answer is judged as the mirror judges a pair
(`judge_answer`) into a `ShadowStats`, whose snapshot and `[gates]` make the same report and exit code
as `shadowproxy report`. Without `--secondary` the latency gate is left out: production's recorded
latencies were measured elsewhere, so only a fresh instance's are comparable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
import orjson

from shadowproxy.commands.report import EXIT_UNREACHABLE, Report, make_report, render, to_json_text, use_color
from shadowproxy.config import CompareConfig, GatesConfig
from shadowproxy.judging.compare import Comparison, compare_predictions
from shadowproxy.judging.fields import FieldTable, field_diffs
from shadowproxy.judging.openai import OpenAIChoice, compare_openai, extract_openai, openai_endpoint
from shadowproxy.judging.presets import extract_predictions
from shadowproxy.judging.sse import StreamAssembler
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import worst
from shadowproxy.record.fileformat import decode_body

__all__ = ["Answer", "Failure", "Replayed", "judge_answer", "parse_candidate", "replay_main", "without_latency_gate"]

LATENCY_GATE = "max_p99_latency_ratio"
# Not re-sent: hop-by-hop fields (RFC 9110 §7.6.1) and the framing, which aiohttp sets itself.
_SKIP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "host",
})


@dataclass(slots=True)
class Replayed:
    """One recorded request, ready to re-send, with production's recorded answer."""

    request_id: str
    time: float
    method: str
    target: str  # path and query
    headers: list[tuple[str, str]]
    body: bytes
    status: int
    response_body: bytes | None
    latency_s: float | None


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    latency_s: float


@dataclass(slots=True)
class Failure:
    """No answer: `kind` is one of the mirror's error kinds (connect, timeout, reset, malformed)."""

    kind: str


@dataclass(slots=True)
class Skipped:
    reasons: Counter[str] = field(default_factory=Counter)


def from_recording(doc: dict[str, Any], skipped: Counter[str]) -> Replayed | None:
    """An `exchange` record as a request to re-send, or None (with the reason counted)."""
    request, response = doc.get("request") or {}, doc.get("response") or {}
    body = decode_body(request)
    if body is None:
        skipped[f"request body not recorded ({request.get('body_omitted', 'missing')})"] += 1
        return None
    query = request.get("query") or ""
    target = str(request.get("path") or "/") + (f"?{query}" if query else "")
    headers = [(str(n), str(v)) for n, v in request.get("headers") or [] if str(n).lower() not in _SKIP_HEADERS]
    return Replayed(
        request_id=str(doc.get("id", "")), time=float(doc.get("time") or 0.0), method=str(request.get("method", "GET")),
        target=target, headers=headers, body=body, status=int(response.get("status") or 0),
        response_body=decode_body(response), latency_s=response.get("latency_s"),
    )


def parse_candidate(text: str, index: int) -> tuple[str, str]:
    """`[NAME=]URL` -> (name, url); unnamed candidates are "candidate", "candidate-2"...."""
    name, sep, url = text.partition("=")
    if sep and "://" not in name:
        return name, url
    return ("candidate" if index == 0 else f"candidate-{index + 1}"), text


# ---------------------------------------------------------------------------------------------------
# Judging, as the mirror judges a pair (shadow/mirror.py Mirror._judge, _compare)


def _predictions(body: bytes, cfg: CompareConfig) -> list[object] | None:
    try:
        doc = orjson.loads(body)
        if cfg.kind == "fields":
            return [doc]
        return extract_predictions(doc, cfg.preset, cfg.path, cfg.output)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None


def _openai_choices(body: bytes, endpoint: str) -> list[OpenAIChoice] | None:
    """An OpenAI answer's choices, whole (JSON) or streamed (server-sent events, assembled as the
    mirror assembles a stream); None when it is neither, or a stream that failed or broke off."""
    if body.lstrip()[:1] in (b"d", b"e", b":"):  # `data:`, `event:` or a comment: a stream
        asm = StreamAssembler(len(body) + 1)
        asm.feed(body, 0.0)
        asm.end()
        return asm.openai_choices() if asm.complete else None
    try:
        return extract_openai(orjson.loads(body), endpoint)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None


def _flags(
    prod_body: bytes, body: bytes, cfg: CompareConfig, endpoint: str | None
) -> tuple[str, Any, list[bool] | None]:
    """(outcome, comparison or field diffs, flags) of one 2xx answer against production's."""
    if cfg.preset == "openai":
        prod_choices = _openai_choices(prod_body, endpoint or "chat")
        if prod_choices is None:
            return "unparseable", None, None
        cand_choices = _openai_choices(body, endpoint or "chat")
        if cand_choices is None:
            return "candidate_error", None, None
        result = compare_openai(prod_choices, cand_choices, cfg)
        return ("disagree" if result.disagree else "agree"), result, result.flags
    prod = _predictions(prod_body, cfg)
    if prod is None:
        return "unparseable", None, None
    cand = _predictions(body, cfg)
    if cand is None or len(cand) != len(prod):
        return "candidate_error", None, None
    if cfg.kind == "fields":
        try:
            return "fields", field_diffs(prod[0], cand[0], cfg.abs_tol, cfg.rel_tol), None
        except RecursionError:
            return "candidate_error", None, None
    result = compare_predictions(cfg.kind, prod, cand, cfg.abs_tol, cfg.rel_tol, cfg.min_similarity)
    return ("disagree" if result.disagree else "agree"), result, result.flags


def judge_answer(
    stats: ShadowStats, cfg: CompareConfig, item: Replayed, answer: Answer | None,
    secondary: Answer | None = None, with_secondary: bool = False, failure: str = "connect",
) -> str:
    """Record one candidate's answer to a replayed request in `stats`; returns the outcome.
    `answer` None: no answer, for the reason `failure` (an error kind of the mirror's)."""
    error = answer is None or answer.status >= 500
    stats.record_mirror("sampled")
    stats.record_mirror("sent")
    if answer is None:
        stats.record_mirror("error")
        stats.record_mirror_reason("errors_by_kind", failure)
    stats.record_candidate(answer.latency_s if answer is not None else None, error)
    if answer is not None and secondary is not None:
        stats.record_pair_latency(secondary.latency_s, answer.latency_s)
    if item.status == 0 or item.status >= 500:
        stats.record_production_error_on_mirrored()
    if answer is None or answer.status >= 500:
        outcome = "candidate_error"
    elif not 200 <= item.status < 300:
        return "not_compared"
    elif not 200 <= answer.status < 300:
        outcome = "candidate_error"
    elif item.response_body is None:
        outcome = "too_large"
    else:
        endpoint = openai_endpoint(item.target)
        outcome, result, flags = _flags(item.response_body, answer.body, cfg, endpoint)
        sec_ok = secondary is not None and 200 <= secondary.status < 300
        if outcome == "fields":
            table = stats.fields if stats.fields is not None else FieldTable(cfg.noise_threshold)
            stats.fields = table
            sec_diffs = None
            if sec_ok and secondary is not None:
                _, sec_diffs, _ = _flags(item.response_body, secondary.body, cfg, endpoint)
            agrees, sec_agrees = table.record(result, sec_diffs if isinstance(sec_diffs, dict) else None)
            cmp = Comparison()
            cmp.flags = [agrees]
            cmp.agree = int(agrees)
            cmp.disagree = 1 - cmp.agree
            stats.record_comparison(cmp, "fields")
            if with_secondary:
                stats.record_noise([agrees], [sec_agrees] if sec_agrees is not None else None)
            return "agree" if agrees else "disagree"
        if outcome in ("agree", "disagree"):
            kind = cfg.kind if cfg.preset != "openai" else ("vector" if endpoint == "embeddings" else "text")
            stats.record_comparison(result, kind)
            if with_secondary and flags is not None:
                sec_flags = None
                if sec_ok and secondary is not None:
                    sec_outcome, _, sec_flags = _flags(item.response_body, secondary.body, cfg, endpoint)
                stats.record_noise(flags, sec_flags)
            return outcome
    stats.record_outcome(outcome, 1)
    return outcome


def without_latency_gate(verdict: dict[str, Any]) -> dict[str, Any]:
    """The verdict with the latency gate left out, and the verdicts worked out again without it."""

    def strip(one: dict[str, Any]) -> dict[str, Any]:
        gates = [g for g in one["gates"] if g.get("name") != LATENCY_GATE]
        passed = [g.get("passed") for g in gates]
        if any(p is False for p in passed):
            v = "fail"
        elif any(p is None for p in passed):
            v = "insufficient_data"
        else:
            v = "pass"
        return {**one, "gates": gates, "verdict": v}

    out = strip(verdict)
    if "candidates" in verdict:
        out["candidates"] = {name: strip(doc) for name, doc in verdict["candidates"].items()}
        out["verdict"] = worst([doc["verdict"] for doc in out["candidates"].values()])
    return out


# ---------------------------------------------------------------------------------------------------
# Sending


class _Progress:
    """A one-line progress bar on a terminal; nothing when the output is piped."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and total > 0
        self._last = 0.0

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        width = 30
        filled = width * self.done // self.total
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


async def _send(session: aiohttp.ClientSession, base: str, item: Replayed) -> Answer | Failure:
    started = time.perf_counter()
    try:
        async with session.request(item.method, base + item.target, headers=item.headers, data=item.body) as r:
            body = await r.read()
            return Answer(r.status, body, time.perf_counter() - started)
    except TimeoutError:
        return Failure("timeout")
    except aiohttp.ClientConnectorError:
        return Failure("connect")
    except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError):
        return Failure("malformed")
    except (aiohttp.ClientError, OSError):
        return Failure("reset")


@dataclass(slots=True)
class Pacing:
    mode: str = "max"  # max | rate | speed
    value: float = 0.0


def _start_times(items: Sequence[Replayed], pacing: Pacing) -> list[float] | None:
    """Each request's start, in seconds from the first; None for --max."""
    if pacing.mode == "rate":
        return [i / pacing.value for i in range(len(items))]
    if pacing.mode == "speed":
        first = items[0].time if items else 0.0
        return [max(0.0, (item.time - first) / pacing.value) for item in items]
    return None


async def replay(
    items: Sequence[Replayed],
    candidates: Sequence[tuple[str, str]],
    *,
    compare: CompareConfig,
    secondary: str | None = None,
    pacing: Pacing | None = None,
    concurrency: int = 64,
    timeout_s: float = 30.0,
    progress: TextIO | None = None,
) -> ShadowStats:
    """Re-send `items` to every candidate (and the secondary) and judge the answers."""
    pacing = pacing or Pacing()
    names = [name for name, _ in candidates]
    stats = ShadowStats(names)
    if compare.kind == "fields":
        stats.enable_fields(compare.noise_threshold)
    if secondary is not None:
        stats.enable_secondary()
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=False, skip_auto_headers=("User-Agent",))

    sessions = [session() for _ in candidates]
    sec_session = session() if secondary is not None else None
    bar = _Progress(len(items), progress if progress is not None else sys.stderr)
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Replayed) -> None:
        try:
            sends = [_send(s, url.rstrip("/"), item) for s, (_, url) in zip(sessions, candidates, strict=True)]
            if sec_session is not None and secondary is not None:
                sends.append(_send(sec_session, secondary.rstrip("/"), item))
            results = await asyncio.gather(*sends)
            answers = [r if isinstance(r, Answer) else None for r in results]
            sec = answers[len(candidates)] if secondary is not None else None
            stats.record_production(item.latency_s, item.status)
            if stats.secondary is not None:
                stats.secondary.record_mirror("sent")
                stats.secondary.record_candidate(sec.latency_s if sec is not None else None,
                                                 sec is None or sec.status >= 500)
            for (name, _), answer, result in zip(candidates, answers, results, strict=False):
                failure = result.kind if isinstance(result, Failure) else ""
                judge_answer(stats.for_candidate(name), compare, item, answer, sec, secondary is not None, failure)
        finally:
            gate.release()
            bar.step()

    try:
        starts = _start_times(items, pacing)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: list[asyncio.Task[None]] = []
        for i, item in enumerate(items):
            if starts is not None:
                delay = t0 + starts[i] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await gate.acquire()
            tasks.append(asyncio.create_task(one(item)))
        await asyncio.gather(*tasks)
    finally:
        for s in (*sessions, *([sec_session] if sec_session is not None else [])):
            await s.close()
    return stats


# ---------------------------------------------------------------------------------------------------
# The command


async def replay_main(
    paths: Sequence[str],
    candidates: Sequence[str],
    *,
    compare: CompareConfig,
    gates: GatesConfig,
    secondary: str | None = None,
    pacing: Pacing | None = None,
    concurrency: int = 64,
    timeout_s: float = 30.0,
    input_format: str = "recording",
    as_json: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`shadowproxy replay` on the running loop: prints the report, returns the exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    skipped: Counter[str] = Counter()
    torn: list[str] = []
    items: list[Replayed] = []
    try:
        if input_format == "goreplay":
            from shadowproxy.commands.goreplay import read_goreplay

            for path in paths:
                items.extend(read_goreplay(path, skipped))
        else:
            from shadowproxy.record.fileformat import read_paths

            for doc in read_paths(list(paths), torn):
                item = from_recording(doc, skipped)
                if item is not None:
                    items.append(item)
    except OSError as exc:
        print(f"shadowproxy replay: {exc}", file=err)
        return EXIT_UNREACHABLE
    named = [parse_candidate(text, i) for i, text in enumerate(candidates)]
    if len({name for name, _ in named}) != len(named):
        print("shadowproxy replay: --candidate: two candidates have the same name", file=err)
        return EXIT_UNREACHABLE
    stats = await replay(items, named, compare=compare, secondary=secondary, pacing=pacing,
                         concurrency=concurrency, timeout_s=timeout_s, progress=err)
    snapshot = stats.snapshot()
    report: Report = make_report(snapshot, gates, list(paths), [name for name, _ in named])
    report = dataclasses.replace(
        report, title=f"shadowproxy replay: {len(items)} recorded requests ({', '.join(paths)})"
    )
    if secondary is None:
        report = dataclasses.replace(report, verdict=without_latency_gate(report.verdict))
    if as_json:
        doc = report.to_json()
        doc["replay"] = {"replayed": len(items), "not_replayed": dict(skipped), "torn": torn}
        print(to_json_text(doc), file=out)
    else:
        print(render(report, color=use_color(out)), file=out)
        summary = [f"replayed {len(items)} requests"]
        summary.extend(f"not replayed: {n} ({reason})" for reason, n in sorted(skipped.items()))
        summary.extend(f"torn tail skipped: {t}" for t in torn)
        print("\n".join(summary), file=err)
    return report.exit_code
