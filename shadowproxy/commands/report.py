"""`shadowproxy report`: one comparison report from the admin ports of one or more proxies.

Each proxy's ``/shadow/stats?full=1`` carries its raw mergeable state; the states of all replicas
are added up with ``ShadowStats.from_states`` (one URL takes the same path, so a single proxy's
report is its own stats). The verdict is recomputed on the merged stats with the gates the first
proxy is configured with, read back from the thresholds of its ``/shadow/verdict``::

    report = await collect(["http://10.0.0.5:9090", "http://10.0.0.6:9090"])
    print(render(report, color=False))
    raise SystemExit(report.exit_code)

With several candidates the report shows them side by side and exits by the worst verdict (1 when
any fails, else 3 when any waits, else 0), or by one candidate's verdict with ``--candidate NAME``.

Exit codes: 0 pass, 1 fail, 3 insufficient data, 2 when a proxy cannot be reached or answers
something that is not its stats (``ReportError``, one line naming the URL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import orjson

from shadowproxy.commands.report_noise import field_lines, flip_lines, noise_lines
from shadowproxy.config import GatesConfig
from shadowproxy.errors import ShadowProxyError
from shadowproxy.http.urls import parse_upstream_url
from shadowproxy.judging.stats import OTHER, PERCENTILES, ShadowStats
from shadowproxy.judging.verdict import evaluate_all

__all__ = [
    "EXIT_CODES",
    "Report",
    "ReportError",
    "collect",
    "gates_from_verdict",
    "make_report",
    "render",
    "report_main",
    "run_report",
    "use_color",
]

EXIT_CODES = {"pass": 0, "fail": 1, "insufficient_data": 3}
EXIT_UNREACHABLE = 2
DEFAULT_TIMEOUT_S = 5.0

# The verdict's gate names are the [gates] keys they are judged against.
_GATE_KEYS = (
    "min_samples", "max_disagreement_rate", "max_p99_latency_ratio", "max_error_rate_delta", "max_ttft_p99_ratio"
)


class ReportError(ShadowProxyError):
    """A proxy could not be reached or did not answer with its stats; ``str()`` names the URL."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")


@dataclass(frozen=True, slots=True)
class Report:
    """The merged stats of ``sources``, with the verdict on them."""

    verdict: dict[str, Any]  # {"verdict": ..., "gates": [...]} as from verdict.evaluate_all
    stats: dict[str, Any]  # ShadowStats.snapshot() of the merged stats
    sources: list[str]
    candidate: str | None = None  # --candidate: the report exits by this candidate's verdict
    names: tuple[str, ...] = ("candidate",)  # the candidates' names, in config order
    title: str = ""  # the first line, when not the proxies the stats came from (`replay`)

    @property
    def candidate_verdicts(self) -> dict[str, dict[str, Any]]:
        """Each candidate's verdict and gates, by name (one candidate: its name -> the verdict)."""
        per = self.verdict.get("candidates")
        if isinstance(per, Mapping) and per:
            return dict(per)
        return {self.names[0]: self.verdict}

    @property
    def exit_code(self) -> int:
        if self.candidate is not None:
            return EXIT_CODES[self.candidate_verdicts[self.candidate]["verdict"]]
        return EXIT_CODES[self.verdict["verdict"]]

    def to_json(self) -> dict[str, Any]:
        out = {
            "verdict": self.verdict["verdict"],
            "gates": self.verdict["gates"],
            "stats": self.stats,
            "sources": self.sources,
        }
        if "candidates" in self.verdict:
            out["candidates"] = self.verdict["candidates"]
        return out


# ---------------------------------------------------------------------------------------------------
# Collecting


def normalize_url(url: str) -> str:
    """The admin base URL without a trailing slash; ValueError when it is not http(s) with a host."""
    parse_upstream_url(url)
    return url.rstrip("/")


def gates_from_verdict(verdict: Mapping[str, Any], url: str = "") -> GatesConfig:
    """The ``[gates]`` a proxy judges with, read from the thresholds in its ``/shadow/verdict``.

    Gates the answer does not list keep their defaults (an older proxy, or one judging fewer).
    """
    gates = verdict.get("gates")
    if not isinstance(gates, list):
        raise ReportError(url, '/shadow/verdict: no "gates" list in the answer')
    values: dict[str, Any] = {}
    for gate in gates:
        if not isinstance(gate, Mapping):
            raise ReportError(url, "/shadow/verdict: a gate is not a JSON object")
        name, threshold = gate.get("name"), gate.get("threshold")
        if name not in _GATE_KEYS and name not in ("min_accuracy_delta", "min_judge_non_loss_rate"):
            continue
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ReportError(url, f"/shadow/verdict: gate {name} has no numeric threshold")
        if not math.isfinite(threshold):
            raise ReportError(url, f"/shadow/verdict: gate {name} has threshold {threshold}")
        values[str(name)] = int(threshold) if name == "min_samples" else float(threshold)
    if values.get("min_samples", 1) < 1:
        raise ReportError(url, f"/shadow/verdict: min_samples threshold {values['min_samples']} < 1")
    min_labels = verdict.get("min_labels")  # present when the accuracy gate is configured
    if isinstance(min_labels, int) and not isinstance(min_labels, bool) and min_labels >= 1:
        values["min_labels"] = min_labels
    return dataclasses.replace(GatesConfig(), **values)


async def _get_json(session: aiohttp.ClientSession, url: str, path: str) -> Any:
    try:
        async with session.get(url + path) as response:
            body = await response.read()
            if response.status != 200:
                raise ReportError(url, f"{path.split('?')[0]} answered HTTP {response.status}")
    except TimeoutError:
        raise ReportError(url, f"no answer from {path.split('?')[0]} in time") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ReportError(url, f"cannot reach the admin port: {exc}") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ReportError(url, f"{path.split('?')[0]} did not answer JSON") from None


async def _fetch(
    session: aiohttp.ClientSession, url: str, with_verdict: bool
) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
    stats = await _get_json(session, url, "/shadow/stats?full=1")
    if not isinstance(stats, Mapping) or not isinstance(stats.get("state"), Mapping):
        raise ReportError(url, '/shadow/stats?full=1: no mergeable "state" in the answer')
    verdict = await _get_json(session, url, "/shadow/verdict") if with_verdict else None
    if with_verdict and not isinstance(verdict, Mapping):
        raise ReportError(url, "/shadow/verdict: the answer is not a JSON object")
    return stats, verdict


async def collect(urls: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> Report:
    """Fetch every proxy's stats (and the first one's gates), merge, judge; ReportError on failure."""
    if not urls:
        raise ValueError("need at least one admin URL")
    bases = [url.rstrip("/") for url in urls]
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 3.0))
    connector = aiohttp.TCPConnector(limit=16, force_close=True)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        results = await asyncio.gather(
            *(_fetch(session, url, with_verdict=i == 0) for i, url in enumerate(bases)),
            return_exceptions=True,
        )
    answers: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = []
    for result in results:  # in URL order, so the first unreachable URL is the one named
        if isinstance(result, BaseException):
            raise result
        answers.append(result)
    verdict = answers[0][1]
    assert verdict is not None
    gates = gates_from_verdict(verdict, bases[0])
    merged = ShadowStats()
    for url, (stats, _) in zip(bases, answers, strict=True):
        try:
            merged.merge_state(stats)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReportError(url, f"/shadow/stats?full=1: cannot merge its state ({exc!r})") from None
    snapshot = merged.snapshot()
    # Blocks that are not mergeable state (ground truth, drift, the process) come from the first
    # proxy; with several, the per-process block would describe only one of them and is left out.
    first = answers[0][0]
    skip = {"state", "process", "workers"} if len(bases) > 1 else {"state"}
    snapshot.update({k: v for k, v in first.items() if k not in snapshot and k not in skip})
    return make_report(snapshot, gates, bases, merged.names)


def make_report(
    snapshot: dict[str, Any], gates: GatesConfig, sources: Sequence[str], names: Sequence[str] = ("candidate",)
) -> Report:
    """A report on an in-process snapshot (the demo) or on merged stats."""
    return Report(verdict=evaluate_all(snapshot, gates), stats=snapshot, sources=list(sources), names=tuple(names))


# ---------------------------------------------------------------------------------------------------
# Rendering

_RESET = "\x1b[0m"
_STYLES = {"green": "\x1b[32m", "red": "\x1b[31m", "yellow": "\x1b[33m", "bold": "\x1b[1m", "dim": "\x1b[2m"}


def use_color(stream: TextIO) -> bool:
    """ANSI colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Painter:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        return "".join(_STYLES[s] for s in styles) + text + _RESET


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _gate_number(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "min_samples":
        return str(int(value))
    if name in ("max_disagreement_rate", "max_error_rate_delta", "min_accuracy_delta", "min_judge_non_loss_rate"):
        return _pct(float(value))
    return f"{float(value):.2f}"


def _gate_interval(name: str, interval: Any) -> str:
    """``[lower, upper]`` in the gate's own unit; an upper bound still unknown reads ``inf)``."""
    if not isinstance(interval, list | tuple) or len(interval) != 2:
        return "-"
    lower, upper = interval
    high = "inf)" if upper is None else _gate_number(name, upper) + "]"
    return f"[{_gate_number(name, lower)}, {high}"


def _ms(value: Any, signed: bool = False) -> str:
    number = float(value)
    return f"{number:+.2f}" if signed else f"{number:.2f}"


def _pad(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    out = []
    for cell, width, is_right in zip(cells, widths, right, strict=True):
        out.append(cell.rjust(width) if is_right else cell.ljust(width))
    return "  " + "  ".join(out).rstrip()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [_pad(header, widths, right), *(_pad(row, widths, right) for row in rows)]


def _paint_cell(text: str, width: int, right: bool, paint: _Painter, *styles: str) -> str:
    # Pad before painting: escape codes have no width on screen.
    return paint(text.rjust(width) if right else text.ljust(width), *styles)


def _verdict_lines(report: Report, paint: _Painter) -> list[str]:
    verdict = report.verdict["verdict"]
    style = {"pass": "green", "fail": "red"}.get(verdict, "yellow")
    label = {"pass": "PASS", "fail": "FAIL", "insufficient_data": "INSUFFICIENT DATA"}.get(verdict, verdict)
    what = {
        "pass": "every gate passed: the candidate may be promoted",
        "fail": "at least one gate failed: do not promote",
        "insufficient_data": "not enough mirrored traffic yet to decide every gate",
    }.get(verdict, "")
    n = len(report.sources)
    return [
        report.title or f"shadowproxy report: {n} {'proxy' if n == 1 else 'proxies'} ({', '.join(report.sources)})",
        f"Verdict: {paint(label, 'bold', style)}  {what}",
    ]


def _gate_lines(report: Report, paint: _Painter) -> list[str]:
    header = ["gate", "value", "95% interval", "threshold", "passed", "reason"]
    rows: list[list[str]] = []
    for gate in report.verdict["gates"]:
        name = str(gate["name"])
        passed = gate["passed"]
        rows.append(
            [
                name,
                _gate_number(name, gate["value"]),
                _gate_interval(name, gate.get("interval")),
                _gate_number(name, gate["threshold"]),
                "yes" if passed is True else "NO" if passed is False else "waiting",
                str(gate["reason"]),
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = [False, True, True, True, False, False]
    lines = ["Gates", paint(_pad(header, widths, right), "dim")]
    for row, gate in zip(rows, report.verdict["gates"], strict=True):
        passed = gate["passed"]
        style = "green" if passed is True else "red" if passed is False else "yellow"
        cells = [
            row[0].ljust(widths[0]),
            row[1].rjust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].rjust(widths[3]),
            _paint_cell(row[4], widths[4], False, paint, style),
            row[5],
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _latency_lines(stats: Mapping[str, Any], paint: _Painter, candidate: str = "candidate") -> list[str]:
    prod = stats["production"]["latency_ms"]
    cand = stats["candidate"]["latency_ms"]
    mirrored = stats.get("mirrored", {})
    pairs = int(mirrored.get("pairs", 0))
    mprod = mirrored.get("production_latency_ms", {})
    mcand = mirrored.get("candidate_latency_ms", {})
    diff = stats.get("latency_diff_ms", {})
    header = ["", "production", candidate, "pair: prod", "pair: cand", "cand - prod"]
    rows = [
        [
            name,
            _ms(prod.get(name, 0)),
            _ms(cand.get(name, 0)),
            _ms(mprod.get(name, 0)),
            _ms(mcand.get(name, 0)),
            _ms(diff.get(name, 0), signed=True),
        ]
        for name, _ in PERCENTILES
    ]
    table = _table(header, rows, [False, True, True, True, True, True])
    counts = (
        f"production {stats['production']['requests']} requests, {candidate} "
        f"{stats['candidate']['requests']}; {pairs} mirrored pairs answered by both"
    )
    return [f"Latency (ms)  {paint(counts, 'dim')}", paint(table[0], "dim"), *table[1:]]


def _comparison_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    comparisons = stats["comparisons"]
    total = int(comparisons["total"])
    lo, hi = comparisons["disagreement_rate_ci95"]
    rate = float(comparisons["disagreement_rate"])
    lines = [
        "Predictions",
        f"  compared {total}: agree {comparisons['agree']}, disagree {comparisons['disagree']}",
        f"  disagreement rate {paint(_pct(rate), 'bold')}"
        + (f"  (95% interval {_pct(float(lo))} - {_pct(float(hi))})" if total else "  (nothing compared yet)"),
    ]
    others = [
        (key, int(comparisons.get(key, 0))) for key in ("candidate_error", "unparseable", "too_large")
    ]
    shown = ", ".join(f"{key} {paint(str(n), 'red') if n else n}" for key, n in others)
    lines.append(f"  not compared: {shown}")
    return lines


def _llm_number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _llm_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    """The LLM figures per upstream, when any OpenAI-compatible answer was seen."""
    llm = stats.get("llm")
    if not isinstance(llm, Mapping):
        return []
    sides = [(name, block) for name, block in llm.items() if isinstance(block, Mapping)]
    if not any(block.get("answers") or block.get("errors") or block.get("too_large") for _, block in sides):
        return []

    def row(label: str, read: Callable[[Mapping[str, Any]], str]) -> list[str]:
        return [label, *(read(block) for _, block in sides)]

    def percentile(key: str, q: str, digits: int = 2) -> Callable[[Mapping[str, Any]], str]:
        return lambda b: _llm_number(b.get(key, {}).get(q, 0), digits)

    def finished(reason: str) -> Callable[[Mapping[str, Any]], str]:
        return lambda b: str(b.get("finish_reasons", {}).get(reason, 0))

    def cost_total(b: Mapping[str, Any]) -> str:
        cost = b.get("cost_usd", {})
        return "-" if cost.get("per_request") is None else _llm_number(cost.get("total"), 6)  # "-": no price

    def tokens(b: Mapping[str, Any]) -> str:
        counted = b.get("output_tokens", {})
        return f"{counted.get('total', 0)} ({counted.get('estimated', 0)})"

    rows = [
        row("answers (streamed)", lambda b: f"{b.get('answers', 0)} ({b.get('streams', 0)})"),
        row("stream errors, too large", lambda b: f"{b.get('errors', 0)}, {b.get('too_large', 0)}"),
        row("time to first token p50 (ms)", percentile("ttft_ms", "p50")),
        row("time to first token p99 (ms)", percentile("ttft_ms", "p99")),
        row("inter-token p50 (ms)", percentile("inter_token_ms", "p50")),
        row("inter-token p99 (ms)", percentile("inter_token_ms", "p99")),
        row("tokens/s p50", percentile("tokens_per_s", "p50", 1)),
        row("output tokens (estimated)", tokens),
    ]
    reasons: list[str] = []
    for _, block in sides:
        counts = block.get("finish_reasons", {})
        reasons.extend(r for r in counts if counts[r] and r not in reasons)
    rows.extend(row(f"finish: {reason}", finished(reason)) for reason in reasons)
    rows.append(row("cost (USD)", cost_total))
    rows.append(row("cost per request (USD)", lambda b: _llm_number(b.get("cost_usd", {}).get("per_request"), 6)))
    table = _table(["", *(name for name, _ in sides)], rows, [False] + [True] * len(sides))
    note = "production over every answer, the candidate over its mirrored ones"
    lines = [f"LLM  {paint(note, 'dim')}", paint(table[0], "dim"), *table[1:]]
    for name, block in sides:
        pairs = block.get("pairs")
        if not isinstance(pairs, Mapping):
            continue
        streamed = int(pairs.get("streamed", 0))
        similarity = pairs.get("similarity", {})
        tools = pairs.get("tool_calls", {})
        text = f"  {name} vs production: {streamed} streamed pairs"
        if streamed:
            text += (
                f", p99 time to first token {_llm_number(pairs['candidate_ttft_ms'].get('p99', 0))} ms "
                f"vs {_llm_number(pairs['production_ttft_ms'].get('p99', 0))} ms"
            )
        if similarity.get("count"):
            text += f"; text similarity mean {float(similarity.get('mean', 0)):.3f} over {similarity['count']}"
        if tools.get("compared"):
            text += f"; tool calls agree {tools.get('agree', 0)} of {tools['compared']}"
        lines.append(text)
    return lines


def _rate_text(rate: Any, interval: Any = None) -> str:
    if rate is None:
        return "-"
    text = _pct(float(rate))
    if isinstance(interval, list | tuple) and len(interval) == 2:
        text += f" ({_pct(float(interval[0]))} - {_pct(float(interval[1]))})"
    return text


def _judge_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    """The LLM judge's judgements, by the position the candidate's answer stood in."""
    judge = stats.get("judge")
    if not isinstance(judge, Mapping):
        return []
    judged = int(judge.get("judged", 0))
    errors = {k: int(n) for k, n in judge.get("errors", {}).items() if n}
    dropped = int(judge.get("dropped", 0))
    lines = [
        "LLM judge  " + paint("blind, answers in random order; errors are never ties", "dim"),
        f"  judged {judged} of {judge.get('sampled', 0)} drawn: candidate better {judge.get('candidate_better', 0)}, "
        f"tie {judge.get('tie', 0)}, production better {judge.get('production_better', 0)}",
        f"  non-loss rate {paint(_rate_text(judge.get('non_loss_rate')), 'bold')}"
        + (f"  (95% interval {_rate_text(judge['non_loss_ci95'][0])} - {_rate_text(judge['non_loss_ci95'][1])})"
           if judged else "  (nothing judged yet)"),
    ]
    error_text = ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items())) or "none"
    lines.append(f"  judge errors: {paint(error_text, 'red') if errors else error_text}"
                 + (f"; dropped {paint(str(dropped), 'red')} (queue full or stopped)" if dropped else ""))
    positions = judge.get("by_position", {})
    rows = []
    for key, label in (("candidate_a", "candidate as A"), ("candidate_b", "candidate as B")):
        block = positions.get(key, {})
        rows.append([
            label, str(block.get("judged", 0)), str(block.get("candidate_better", 0)), str(block.get("tie", 0)),
            str(block.get("production_better", 0)), _rate_text(block.get("candidate_win_rate")),
            _rate_text(block.get("non_loss_rate")),
        ])
    header = ["position", "judged", "cand better", "tie", "prod better", "cand win rate", "non-loss rate"]
    table = _table(header, rows, [False, True, True, True, True, True, True])
    lines.extend([paint(table[0], "dim"), *table[1:]])
    preferred = positions.get("a_preferred", {})
    if preferred.get("decisive"):
        lines.append(
            f"  position A chosen in {_rate_text(preferred.get('rate'), preferred.get('ci95'))} of "
            f"{preferred['decisive']} decisive judgements (an unbiased judge: about 50%)"
        )
    length = judge.get("length", {})
    if judged:
        cand_mean, prod_mean = length.get("candidate_mean_chars"), length.get("production_mean_chars")
        text = f"  mean length: candidate {float(cand_mean or 0):.0f} chars, production {float(prod_mean or 0):.0f}"
        if length.get("decided_on_length"):
            text += (
                f"; the longer answer won {_rate_text(length.get('longer_preferred_rate'))} of "
                f"{length['decided_on_length']} decisive judgements of unequal lengths"
            )
        lines.append(text)
    return lines


def _label_key(label: str) -> tuple[int, float, str]:
    if label == OTHER:
        return (2, 0.0, label)
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def _confusion_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    confusion = stats.get("confusion") or {}
    labels = [str(label) for label in confusion.get("labels", [])]
    matrix = confusion.get("matrix", [])
    if not labels or not matrix:
        return []
    # The stats list labels by frequency; a table reads better in label order, "other" last.
    order = sorted(range(len(labels)), key=lambda i: _label_key(labels[i]))
    header = ["prod \\ cand", *(labels[i] for i in order)]
    rows = [[labels[i], *(str(matrix[i][j]) for j in order)] for i in order]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["Confusion (rows: production label, columns: candidate label)"]
    lines.append(paint(_pad(header, widths, [False] + [True] * len(labels)), "dim"))
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        for j, cell in enumerate(row[1:]):
            off_diagonal = i != j and cell != "0"
            cells.append(_paint_cell(cell, widths[j + 1], True, paint, *(("red",) if off_diagonal else ())))
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _mirror_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    mirror = stats["mirror"]
    parts = []
    for key in ("sampled", "sent", "dropped", "skipped", "error", "in_flight"):
        n = int(mirror.get(key, 0))
        text = f"{key.replace('_', ' ')} {n}"
        if key == "dropped" and n:
            # Drops mean the candidate saw less than the sample: its numbers may be biased.
            text = paint(f"{text} (!)", "bold", "red")
        elif key == "error" and n:
            text = paint(text, "red")
        parts.append(text)
    lines = ["Mirror", "  " + "  ".join(parts)]
    dropped, sampled = int(mirror.get("dropped", 0)), int(mirror.get("sampled", 0))
    if dropped:
        share = dropped / sampled if sampled else 0.0
        warning = f"  {_pct(share)} of sampled requests were dropped (candidate.max_in_flight full or backed off)"
        lines.append(paint(warning, "red"))
    return lines


def _candidates_lines(report: Report, paint: _Painter) -> list[str]:
    """Several candidates side by side: verdict, traffic, disagreement, errors and latency."""
    docs = report.stats.get("candidates")
    if not isinstance(docs, Mapping) or len(docs) < 2:
        return []
    verdicts = report.candidate_verdicts
    names = list(docs)

    def cell(read: Callable[[Mapping[str, Any]], str]) -> list[str]:
        return [read(docs[name]) for name in names]

    def interval(doc: Mapping[str, Any]) -> str:
        lo, hi = doc["comparisons"]["disagreement_rate_ci95"]
        return f"[{_pct(float(lo))}, {_pct(float(hi))}]"

    rows = [
        ["verdict", *(str(verdicts.get(name, {}).get("verdict", "-")) for name in names)],
        ["sampled", *cell(lambda d: str(d["mirror"]["sampled"]))],
        ["sent", *cell(lambda d: str(d["mirror"]["sent"]))],
        ["dropped", *cell(lambda d: str(d["mirror"]["dropped"]))],
        ["compared", *cell(lambda d: str(d["comparisons"]["total"]))],
        ["disagreement rate", *cell(lambda d: _pct(float(d["comparisons"]["disagreement_rate"])))],
        ["95% interval", *cell(interval)],
        ["candidate_error", *cell(lambda d: str(d["comparisons"]["candidate_error"]))],
        ["p99 (ms)", *cell(lambda d: _ms(d["candidate"]["latency_ms"]["p99"]))],
        ["pair p99 (ms)", *cell(lambda d: _ms(d.get("mirrored", {}).get("candidate_latency_ms", {}).get("p99", 0)))],
    ]
    table = _table(["", *names], rows, [False] + [True] * len(names))
    return ["Candidates", paint(table[0], "dim"), *table[1:]]


def _slice_lines(stats: Mapping[str, Any], paint: _Painter) -> list[str]:
    """[[slices]]: each slice's requests and p99, and each candidate's disagreement and errors in it."""
    slices = stats.get("slices")
    if not isinstance(slices, Mapping) or not slices:
        return []
    names = [n for n in next(iter(slices.values())) if n != "production"]
    header = ["slice", "requests", "prod p99 ms"]
    for name in names:
        header += [f"{name} compared", f"{name} disagree", f"{name} errors", f"{name} p99 ms"]
    rows = []
    for slice_name, doc in slices.items():
        prod = doc["production"]
        row = [slice_name, str(prod["requests"]), _ms(prod["latency_ms"]["p99"])]
        for name in names:
            cand = doc.get(name, {})
            comparisons = cand.get("comparisons", {})
            total = int(comparisons.get("total", 0))
            rate = _pct(float(comparisons.get("disagreement_rate", 0.0))) if total else "-"
            row += [str(total), rate, str(comparisons.get("candidate_error", 0)),
                    _ms(cand.get("latency_ms", {}).get("p99", 0))]
        rows.append(row)
    table = _table(header, rows, [False] + [True] * (len(header) - 1))
    return ["Slices", paint(table[0], "dim"), *table[1:]]


def _one_candidate(report: Report, name: str) -> Report:
    """The report of one of several candidates, as if it were the only one."""
    docs = report.stats.get("candidates") or {}
    stats = dict(docs.get(name, report.stats))
    slices = report.stats.get("slices")
    if isinstance(slices, Mapping):  # this candidate's column of each slice
        stats["slices"] = {s: {k: v for k, v in doc.items() if k in ("production", name)} for s, doc in slices.items()}
    verdict = report.candidate_verdicts[name]
    return Report(verdict=verdict, stats=stats, sources=report.sources, candidate=name, names=(name,))


def render(report: Report, color: bool = False) -> str:
    """The human-readable report, ANSI-coloured when ``color``."""
    paint = _Painter(color)
    several = isinstance(report.stats.get("candidates"), Mapping) and len(report.stats["candidates"]) > 1
    if several and report.candidate is not None:
        return render(_one_candidate(report, report.candidate), color)
    if several:
        sections = [_verdict_lines(report, paint), _candidates_lines(report, paint)]
        for name in report.stats["candidates"]:
            one = _one_candidate(report, name)
            gates = _gate_lines(one, paint)
            gates[0] = f"Gates of {paint(name, 'bold')}: {one.verdict['verdict']}"
            sections.append(gates)
        for name, doc in report.stats["candidates"].items():  # each candidate against production
            sections.append(_latency_lines(doc, paint, name))
            sections.extend(_noise_sections(doc, paint, name))
        sections.append(_slice_lines(report.stats, paint))
        return "\n\n".join("\n".join(lines) for lines in sections if lines)
    stats = report.stats
    sections = [
        _verdict_lines(report, paint),
        _gate_lines(report, paint),
        _latency_lines(stats, paint),
        _comparison_lines(stats, paint),
        _slice_lines(stats, paint),
        _llm_lines(stats, paint),
        _judge_lines(stats, paint),
        _confusion_lines(stats, paint),
        *_noise_sections(stats, paint),
        _mirror_lines(stats, paint),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines)


def _noise_sections(stats: Mapping[str, Any], paint: _Painter, name: str = "") -> list[list[str]]:
    """[secondary] noise and net, compare.kind "fields" fields, label flips (commands/report_noise.py);
    `name`: the candidate's, put in the headings when there are several."""
    sections = [noise_lines(stats, paint), field_lines(stats, paint)]
    if name:
        sections = [[f"{lines[0]} - {name}", *lines[1:]] if lines else lines for lines in sections]
    return [*sections, flip_lines(stats, name)]


def to_json_text(data: Any) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


# ---------------------------------------------------------------------------------------------------
# The command


async def report_main(
    urls: Sequence[str],
    *,
    candidate: str | None = None,
    as_json: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`shadowproxy report` on the running loop: prints the report, returns the exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        print(f"shadowproxy report: --timeout: must be a positive number, got {timeout_s}", file=err)
        return EXIT_UNREACHABLE
    try:
        bases = [normalize_url(url) for url in urls]
    except ValueError as exc:
        print(f"shadowproxy report: --admin-url: {exc}", file=err)
        return EXIT_UNREACHABLE
    try:
        report = await collect(bases, timeout_s)
    except ReportError as exc:
        print(f"shadowproxy report: {exc}", file=err)
        return EXIT_UNREACHABLE
    if candidate is not None:
        names = list(report.candidate_verdicts)
        if candidate not in names:
            print(f"shadowproxy report: --candidate: no candidate named {candidate!r} (have {', '.join(names)})",
                  file=err)
            return EXIT_UNREACHABLE
        report = dataclasses.replace(report, candidate=candidate)
    if as_json:
        print(to_json_text(report.to_json()), file=out)
    else:
        print(render(report, color=use_color(out)), file=out)
    return report.exit_code


def run_report(
    urls: Sequence[str], *, candidate: str | None = None, as_json: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> int:
    """`shadowproxy report` in a fresh event loop (the command line's entry)."""
    return asyncio.run(report_main(urls, candidate=candidate, as_json=as_json, timeout_s=timeout_s))
