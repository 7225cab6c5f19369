"""`shadowproxy demo --llm`: two OpenAI-compatible stand-in LLMs, the proxy judging them with the
``openai`` preset, and LLM traffic, in one process.

The production stand-in starts its first token after 50 ms, the candidate after ``--first-token-ms``
(80), both 10 ms between tokens; the candidate answers a known share of prompts differently
(``--differ-rate``) and is priced as a smaller model. The client sends a mix of chat (a part of it
asking for a tool call), completions (some batched, some with ``n`` = 2 or a ``max_tokens`` cut) and
embeddings, more than half of the chat and completions streamed. Then the report is printed on the
proxy's own stats, with the disagreement the candidate was built to show (computed from the
stand-ins' known answers for what was actually answered) next to the measured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import orjson

from shadowproxy.commands.demo import (
    EXIT_USAGE,
    MIN_SAMPLES,
    Interrupted,
    Progress,
    address_url,
    run_loop,
    settle,
    until_signalled,
)
from shadowproxy.commands.report import Report, make_report, render, to_json_text, use_color
from shadowproxy.config import Config, parse_config
from shadowproxy.control.app import ShadowProxy
from shadowproxy.models import (
    OpenAIBehaviour,
    RunningOpenAIModel,
    openai_choice,
    openai_cosine,
    openai_tool_arguments,
    start_openai_model,
)

__all__ = ["LLMCall", "LLMDemoOptions", "LLMDemoResult", "demo_llm", "llm_calls", "llm_demo_config", "run_demo_llm"]

LLM_REQUESTS = 1500  # enough streamed pairs (more than half) for the time-to-first-token gate to decide
LLM_CONCURRENCY = 32
# US dollars per million prompt and completion tokens: a large model against a small one, so the
# report's cost lines have something to compare.
PRODUCTION_PRICE = {"input": 2.5, "output": 10.0}
CANDIDATE_PRICE = {"input": 0.5, "output": 1.5}
_TOOLS = [{"type": "function", "function": {"name": "search_docs", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "words": {"type": "integer"}},
}}}]
_ASKS = ("Explain", "Summarise", "Describe", "Compare", "List the risks of", "Write a haiku about")
_SUBJECTS = (
    "shadow traffic", "a canary release", "time to first token", "a retrained model",
    "tail latency", "an embedding index", "cost per request", "a blue-green deployment",
)


@dataclass(frozen=True, slots=True)
class LLMDemoOptions:
    requests: int = LLM_REQUESTS
    differ_rate: float = 0.05
    first_token_ms: float = 80.0  # the candidate's; production's is its default
    concurrency: int = LLM_CONCURRENCY
    seed: int = 0
    as_json: bool = False
    min_samples: int = MIN_SAMPLES

    def problems(self) -> list[str]:
        found = []
        if self.requests < 1:
            found.append(f"--requests: must be at least 1, got {self.requests}")
        if not 0.0 <= self.differ_rate <= 1.0:
            found.append(f"--differ-rate: must be between 0 and 1, got {self.differ_rate}")
        if not (math.isfinite(self.first_token_ms) and self.first_token_ms >= 0.0):
            found.append(f"--first-token-ms: must be a finite number >= 0, got {self.first_token_ms}")
        if self.concurrency < 1:
            found.append(f"--concurrency: must be at least 1, got {self.concurrency}")
        return found


@dataclass(frozen=True, slots=True)
class LLMCall:
    """One request of the demo's traffic, and what the proxy will compare for it."""

    kind: str  # "chat", "tool_call", "completions" or "embeddings"
    streamed: bool
    path: str
    body: bytes
    items: int  # choices or vectors compared
    differing: int  # of them, the ones the candidate answers differently


def llm_calls(requests: int, seed: int, differ_rate: float, min_cosine: float = 0.99) -> list[LLMCall]:
    """The demo's traffic, reproducible from ``seed``, with the differences a candidate answering
    ``differ_rate`` of prompts differently makes: 40% streamed chat, 15% chat, 10% chat asking for
    a tool call (half streamed), 10% streamed completions, 10% completions (batches of 1-3 prompts,
    ``n`` 1 or 2), 15% embeddings (1-4 inputs); a third of the completions cut by ``max_tokens``."""
    rng = random.Random(seed)
    calls = []

    def differs(prompt: str, index: int = 0, max_tokens: int | None = None) -> int:
        production = openai_choice(prompt, 0.0, index=index, max_tokens=max_tokens)
        return int(production != openai_choice(prompt, differ_rate, index=index, max_tokens=max_tokens))

    for i in range(requests):
        prompt = f"{rng.choice(_ASKS)} {rng.choice(_SUBJECTS)} (request {i}, seed {seed})"
        roll = rng.random()
        body: dict[str, Any]
        if roll < 0.55:
            streamed = roll < 0.40
            body = {"model": "stand-in-llm", "messages": [{"role": "user", "content": prompt}], "stream": streamed}
            if streamed:
                body["stream_options"] = {"include_usage": rng.random() < 0.5}
            differing = differs(prompt)
            calls.append(LLMCall("chat", streamed, "/v1/chat/completions", orjson.dumps(body), 1, differing))
        elif roll < 0.65:
            prompt = f"Use a tool to look up {prompt}"
            streamed = rng.random() < 0.5
            body = {"model": "stand-in-llm", "messages": [{"role": "user", "content": prompt}], "tools": _TOOLS,
                    "stream": streamed}
            differing = int(openai_tool_arguments(prompt) != openai_tool_arguments(prompt, differ_rate))
            calls.append(LLMCall("tool_call", streamed, "/v1/chat/completions", orjson.dumps(body), 1, differing))
        elif roll < 0.85:
            streamed = roll < 0.75
            prompts = [prompt] if streamed else [f"{prompt} part {k}" for k in range(rng.randint(1, 3))]
            n = 1 if streamed else rng.choice((1, 2))
            cut = rng.choice((None, None, 6))
            body = {"model": "stand-in-llm", "prompt": prompts if len(prompts) > 1 else prompts[0], "n": n,
                    "max_tokens": cut, "stream": streamed}
            differing = sum(differs(p, j, cut) for p in prompts for j in range(n))
            path = "/v1/completions"
            calls.append(LLMCall("completions", streamed, path, orjson.dumps(body), len(prompts) * n, differing))
        else:
            inputs = [f"{rng.choice(_SUBJECTS)} {i}.{k}" for k in range(rng.randint(1, 4))]
            body = {"model": "stand-in-embed", "input": inputs, "encoding_format": rng.choice(("float", "base64"))}
            differing = sum(openai_cosine(text, differ_rate) < min_cosine for text in inputs)
            calls.append(LLMCall("embeddings", False, "/v1/embeddings", orjson.dumps(body), len(inputs), differing))
    return calls


@dataclass(frozen=True, slots=True)
class LLMDemoResult:
    report: Report
    requests: int
    failed: int
    answered: dict[str, int]  # requests answered 200, per kind
    streamed: int  # of the answered, the streamed ones
    items: int  # choices and vectors in the answered requests
    expected_disagree: int  # of those, the ones the candidate answers differently
    seconds: float
    options: LLMDemoOptions
    production: OpenAIBehaviour
    candidate: OpenAIBehaviour

    @property
    def expected_rate(self) -> float:
        return self.expected_disagree / self.items if self.items else 0.0

    def to_json(self) -> dict[str, Any]:
        comparisons = self.report.stats["comparisons"]
        return {
            **self.report.to_json(),
            "demo": {
                "llm": True,
                "requests": self.requests,
                "failed": self.failed,
                "answered": self.answered,
                "streamed": self.streamed,
                "seconds": round(self.seconds, 3),
                "differ_rate": self.options.differ_rate,
                "first_token_ms": {"production": self.production.first_token_ms,
                                   "candidate": self.candidate.first_token_ms},
                "inter_token_ms": {"production": self.production.inter_token_ms,
                                   "candidate": self.candidate.inter_token_ms},
                "seed": self.options.seed,
                "items": self.items,
                "expected_disagree": self.expected_disagree,
                "expected_disagreement_rate": self.expected_rate,
                "measured_disagree": comparisons["disagree"],
                "measured_disagreement_rate": comparisons["disagreement_rate"],
            },
        }


def llm_demo_config(production_url: str, candidate_url: str, min_samples: int = MIN_SAMPLES) -> Config:
    """The LLM demo proxy's config: the openai preset, both prices, every request mirrored, free
    loopback ports."""
    config = parse_config(
        {
            # Placeholder ports, replaced by 0 (any free port) below, which validation rejects.
            "listen": {"host": "127.0.0.1", "port": 1, "drain_timeout_s": 2.0},
            "admin": {"host": "127.0.0.1", "port": 2},
            "production": {"url": production_url, "timeout_s": 10.0, "price": PRODUCTION_PRICE},
            "candidate": {"url": candidate_url, "timeout_s": 10.0, "price": CANDIDATE_PRICE},
            "mirror": {"sample_rate": 1.0},
            "compare": {"preset": "openai"},
            "gates": {"min_samples": min_samples},
        }
    )
    return dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, port=0),
        admin=dataclasses.replace(config.admin, port=0),
    )


async def _drive(url: str, calls: Sequence[LLMCall], concurrency: int, progress: Progress) -> list[LLMCall]:
    """Send every call once; the calls production answered 200."""
    answered: list[LLMCall] = []
    done = 0
    queue = iter(calls)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        for call in queue:  # one shared iterator: each call is sent once
            try:
                headers = {"Content-Type": "application/json", "Authorization": "Bearer demo"}
                async with session.post(url + call.path, data=call.body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            done += 1
            if ok:
                answered.append(call)

    async def ticker() -> None:
        while True:
            progress.update(done)
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30.0), cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(worker(session) for _ in range(min(concurrency, len(calls)))))
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
    progress.update(done)
    progress.close()
    return answered


async def demo_llm(options: LLMDemoOptions, progress_stream: TextIO) -> LLMDemoResult:
    """Run the LLM demo on the running loop; everything started is stopped before it returns."""
    production_behaviour = OpenAIBehaviour.production(seed=options.seed)
    candidate_behaviour = OpenAIBehaviour.candidate(
        differ_rate=options.differ_rate, first_token_ms=options.first_token_ms, seed=options.seed
    )
    async with contextlib.AsyncExitStack() as stack:
        production: RunningOpenAIModel = await stack.enter_async_context(
            await start_openai_model(production_behaviour)
        )
        candidate: RunningOpenAIModel = await stack.enter_async_context(await start_openai_model(candidate_behaviour))
        config = llm_demo_config(production.url, candidate.url, options.min_samples)
        calls = llm_calls(options.requests, options.seed, options.differ_rate, config.compare.min_cosine)
        proxy = ShadowProxy(config)
        stack.push_async_callback(proxy.shutdown)  # copes with a start that failed half-way
        await proxy.start()
        admin_url = address_url(proxy.admin_address)
        print(
            f"demo: production LLM {production.url} (first token {production_behaviour.first_token_ms:g} ms), "
            f"candidate {candidate.url} (first token {candidate_behaviour.first_token_ms:g} ms, "
            f"differ_rate {options.differ_rate:g}), proxy {address_url(proxy.listen_address)} (admin {admin_url}), "
            "openai preset, mirroring every request",
            file=progress_stream,
            flush=True,
        )
        stats = proxy.stats

        def live() -> str:
            compared = stats.agree + stats.disagree
            rate = f"{stats.disagree / compared:.2%}" if compared else "-"
            return f"mirrored {stats.mirror['sent']}, disagreement {rate}"

        progress = Progress(options.requests, progress_stream, live)
        started = time.monotonic()
        try:
            answered = await _drive(address_url(proxy.listen_address), calls, options.concurrency, progress)
        finally:
            progress.close()
        await settle(proxy)
        seconds = time.monotonic() - started
        report = make_report(proxy.stats_snapshot(), config.gates, [admin_url])
    return LLMDemoResult(
        report=report,
        requests=len(calls),
        failed=len(calls) - len(answered),
        answered=dict(sorted(Counter(call.kind for call in answered).items())),
        streamed=sum(call.streamed for call in answered),
        items=sum(call.items for call in answered),
        expected_disagree=sum(call.differing for call in answered),
        seconds=seconds,
        options=options,
        production=production_behaviour,
        candidate=candidate_behaviour,
    )


def render_demo_llm(result: LLMDemoResult, color: bool = False) -> str:
    """The report, then what the demo sent and the differences it was built to show."""
    comparisons = result.report.stats["comparisons"]
    lo, hi = comparisons["disagreement_rate_ci95"]
    rate = result.requests / result.seconds if result.seconds > 0 else 0.0
    kinds = ", ".join(f"{kind} {count}" for kind, count in result.answered.items())
    prod, cand = result.production, result.candidate
    lines = [
        render(result.report, color=color),
        "",
        "Demo (LLM)",
        f"  sent {result.requests} requests in {result.seconds:.1f} s ({rate:.0f} req/s), {result.failed} failed; "
        f"answered: {kinds}; {result.streamed} streamed",
        f"  stand-ins: first token after {prod.first_token_ms:g} ms (production) and {cand.first_token_ms:g} ms "
        f"(candidate), then one token every {prod.inter_token_ms:g} ms; the candidate answers "
        f"{result.options.differ_rate:.0%} of prompts differently; prices per million input/output tokens: "
        f"production ${PRODUCTION_PRICE['input']:.2f}/${PRODUCTION_PRICE['output']:.2f}, "
        f"candidate ${CANDIDATE_PRICE['input']:.2f}/${CANDIDATE_PRICE['output']:.2f}",
        f"  expected disagreement {result.expected_rate:.2%} ({result.expected_disagree} of {result.items} "
        "choices and vectors the candidate answers differently)",
        f"  measured disagreement {comparisons['disagreement_rate']:.2%} ({comparisons['disagree']} of "
        f"{comparisons['total']} compared; 95% interval {lo:.2%} - {hi:.2%})",
    ]
    return "\n".join(lines)


async def _main(options: LLMDemoOptions, out: TextIO, err: TextIO) -> int:
    try:
        result = await until_signalled(demo_llm(options, err))
    except Interrupted as exc:
        return exc.report(err)
    if options.as_json:
        print(to_json_text(result.to_json()), file=out)
    else:
        print(render_demo_llm(result, color=use_color(out)), file=out)
    return 0


def run_demo_llm(
    options: LLMDemoOptions | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """`shadowproxy demo --llm` in a fresh event loop."""
    options = options or LLMDemoOptions()
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    problems = options.problems()
    if problems:
        for problem in problems:
            print(f"shadowproxy demo: {problem}", file=err)
        return EXIT_USAGE
    return run_loop(_main(options, out, err))
