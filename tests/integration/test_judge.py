"""The blind LLM judge ([judge]) through a real proxy, with the OpenAI-compatible stand-ins as
production and candidate and the stand-in judge (shadowproxy.models.judge) answering as told:
every count against what the test computes from the answers it knows the models give."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.commands.report import collect, render
from shadowproxy.control.app import ShadowProxy
from shadowproxy.judging.judge import JUDGE_SYSTEM_PROMPT, judge_user_prompt
from shadowproxy.models import OpenAIBehaviour, RunningOpenAIModel, openai_text
from shadowproxy.models.judge import JudgeBehaviour, RunningJudgeModel, start_judge_model
from tests.helpers import ROOT, RunningProxy, closed_port_url, make_config, openai_models, require_binary
from tests.integration.test_workers import Workers

DIFFER = 0.5  # the candidate answers half the prompts with other words (often of another length)
FAST: dict[str, Any] = {"first_token_ms": 0.0, "inter_token_ms": 0.0}


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RunningOpenAIModel, RunningOpenAIModel]]:
    async with openai_models(
        OpenAIBehaviour.production(**FAST), OpenAIBehaviour.candidate(differ_rate=DIFFER, **FAST)
    ) as models:
        yield models


@pytest.fixture
async def judge() -> AsyncIterator[RunningJudgeModel]:
    async with await start_judge_model(JudgeBehaviour("correct")) as model:
        yield model


async def judged_proxy(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel],
    judge_url: str,
    **judge: Any,
) -> RunningProxy:
    production, candidate = pair
    return await start_proxy(
        production.url, candidate.url,
        compare={"preset": "openai"}, mirror={"sample_rate": 1.0},
        judge={"url": judge_url, "model": "judge-model", "sample_rate": 1.0, **judge},
    )


def prompt(i: int, tag: str = "q") -> str:
    return f"{tag} number {i}: say something"


async def chat(session: aiohttp.ClientSession, proxy: RunningProxy, text: str) -> float:
    """One chat request through the proxy; the client's wait in seconds."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    started = time.perf_counter()
    async with session.post(proxy.url + "/v1/chat/completions", data=orjson.dumps(body)) as r:
        assert r.status == 200
        await r.read()
    return time.perf_counter() - started


async def settle(proxy: RunningProxy, timeout: float = 10.0) -> None:
    """Every shadow exchange judged by text, and every drawn pair judged or failed."""
    await proxy.settle(timeout)
    judge = proxy.proxy.judge
    assert judge is not None
    deadline = time.monotonic() + timeout
    while judge.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def expected_result(text: str) -> str:
    """The `correct` stand-in judge prefers the longer answer; equal lengths tie."""
    prod, cand = openai_text(text), openai_text(text, DIFFER)
    if len(cand) == len(prod):
        return "tie"
    return "candidate_better" if len(cand) > len(prod) else "production_better"


async def metric_samples(proxy: RunningProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_correct_judge_counts_what_the_answers_lengths_say(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], judge: RunningJudgeModel, start_proxy
) -> None:
    proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1")
    texts = [prompt(i) for i in range(60)]
    async with aiohttp.ClientSession() as session:
        for i, text in enumerate(texts):
            await chat(session, proxy, text)
            if i % 8 == 7:
                await settle(proxy)  # as in the position test: no pair dropped from a full queue
    await settle(proxy)
    expected = {"candidate_better": 0, "tie": 0, "production_better": 0}
    for text in texts:
        expected[expected_result(text)] += 1
    assert expected["candidate_better"] and expected["production_better"] and expected["tie"]
    block = proxy.stats()["judge"]
    assert {k: block[k] for k in expected} == expected
    assert block["judged"] == block["sampled"] == len(texts) == judge.requests
    assert block["dropped"] == block["pending"] == 0
    assert sum(block["errors"].values()) == 0
    non_loss = expected["candidate_better"] + expected["tie"]
    assert block["non_loss_rate"] == pytest.approx(non_loss / len(texts))
    lo, hi = block["non_loss_ci95"]
    assert lo < non_loss / len(texts) < hi
    # Both orders were drawn, and each position's counts add up to the totals.
    positions = block["by_position"]
    assert positions["candidate_a"]["judged"] > 0 and positions["candidate_b"]["judged"] > 0
    for result in expected:
        assert positions["candidate_a"][result] + positions["candidate_b"][result] == expected[result]
    # Lengths: sums over the judged pairs, and this judge always sides with the longer answer.
    length = block["length"]
    assert length["candidate_chars"] == sum(len(openai_text(t, DIFFER)) for t in texts)
    assert length["production_chars"] == sum(len(openai_text(t)) for t in texts)
    decided = expected["candidate_better"] + expected["production_better"]
    assert length["longer_preferred"] == length["decided_on_length"] == decided
    # The metrics say the same.
    samples = await metric_samples(proxy)
    for result, n in expected.items():
        assert samples[("shadowproxy_judge_results_total", (("result", result),))] == n


async def test_the_judge_sees_the_request_and_both_answers_but_not_who_wrote_which(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], judge: RunningJudgeModel, start_proxy
) -> None:
    proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1", max_tokens=8,
                               max_tokens_field="max_completion_tokens",
                               headers={"Authorization": "Bearer judge-key"})
    text = prompt(7)
    async with aiohttp.ClientSession() as session:
        await chat(session, proxy, text)
    await settle(proxy)
    [seen] = judge.received
    assert seen.path == "/v1/chat/completions"
    assert seen.header("Authorization") == "Bearer judge-key"
    assert seen.header("X-Shadow-Request") is None
    doc = orjson.loads(seen.body)
    assert doc["model"] == "judge-model" and doc["max_completion_tokens"] == 8 and "max_tokens" not in doc
    system, user = doc["messages"]
    assert system["role"] == "system" and "exactly one token" in system["content"]
    assert f"[Request]\nuser: {text}\n[End of Request]" in user["content"]
    prod, cand = openai_text(text), openai_text(text, DIFFER)
    positions = proxy.stats()["judge"]["by_position"]
    first, second = (cand, prod) if positions["candidate_a"]["judged"] else (prod, cand)
    assert f"[Answer A]\n{first}\n[End of Answer A]" in user["content"]
    assert f"[Answer B]\n{second}\n[End of Answer B]" in user["content"]
    for word in ("shadow", "stand-in-llm", "fp_"):
        assert word not in user["content"].replace(first, "").replace(second, "").replace(text, "")


async def test_a_judge_that_always_picks_a_scores_about_half_and_the_position_table_shows_it(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], start_proxy
) -> None:
    async with await start_judge_model(JudgeBehaviour("always_a")) as judge:
        proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1")
        n = 80
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                await chat(session, proxy, prompt(i, "bias"))
                if i % 8 == 7:
                    # Judged before more come: on a busy machine the judge's queue (twice its
                    # max_in_flight) would otherwise fill and drop pairs this test counts on.
                    await settle(proxy)
        await settle(proxy)
    block = proxy.stats()["judge"]
    positions = block["by_position"]
    first, second = positions["candidate_a"], positions["candidate_b"]
    assert block["judged"] == n and block["tie"] == 0
    # Whatever the answers, position A wins: the candidate exactly when it stood first.
    assert first["candidate_better"] == first["judged"] and first["candidate_win_rate"] == 1.0
    assert second["production_better"] == second["judged"] and second["candidate_win_rate"] == 0.0
    assert block["non_loss_rate"] == pytest.approx(first["judged"] / n)
    assert 0.3 < block["non_loss_rate"] < 0.7  # a fair coin's order, 80 draws: about 4.5 sd either side
    assert positions["a_preferred"]["rate"] == 1.0
    assert positions["a_preferred"]["ci95"][0] > 0.9  # far from the 0.5 of an unbiased judge


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        (JudgeBehaviour("wrong_format"), "unparseable"),
        (JudgeBehaviour("truncated"), "truncated"),
        (JudgeBehaviour("refusal"), "refusal"),
        (JudgeBehaviour("error"), "status"),
        (JudgeBehaviour("malformed"), "malformed"),
        (JudgeBehaviour("correct", delay_ms=1500), "timeout"),
        (JudgeBehaviour("hang"), "timeout"),
    ],
)
async def test_a_judge_failure_is_counted_by_kind_and_never_as_a_tie(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], start_proxy, behaviour: JudgeBehaviour, kind: str
) -> None:
    async with await start_judge_model(behaviour) as judge:
        proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1", timeout_s=1.0, max_in_flight=6)
        n = 6
        async with aiohttp.ClientSession() as session:
            waits = [await chat(session, proxy, prompt(i, kind)) for i in range(n)]
        await settle(proxy)
        # The stand-ins answer at once; a judge that takes a second or more adds nothing to that.
        assert max(waits) < 0.5, waits
        block = proxy.stats()["judge"]
        assert block["errors"][kind] == n
        assert sum(block["errors"].values()) == n
        assert block["judged"] == block["tie"] == 0
        assert block["non_loss_rate"] is None and block["non_loss_ci95"] == [0.0, 1.0]
        samples = await metric_samples(proxy)
        assert samples[("shadowproxy_judge_errors_total", (("kind", kind),))] == n
        assert samples[("shadowproxy_judge_results_total", (("result", "tie"),))] == 0


async def test_an_unreachable_judge_is_a_connection_error(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], start_proxy
) -> None:
    proxy = await judged_proxy(start_proxy, pair, closed_port_url() + "/v1")
    async with aiohttp.ClientSession() as session:
        for i in range(4):
            await chat(session, proxy, prompt(i, "closed"))
    await settle(proxy)
    block = proxy.stats()["judge"]
    assert block["errors"]["connection"] == 4 and block["judged"] == 0


async def test_a_hung_judge_never_delays_production_and_a_full_queue_drops_and_counts(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], start_proxy
) -> None:
    async with await start_judge_model(JudgeBehaviour("hang")) as judge:
        # One judge slot and a queue of two: the first pair hangs at the judge, two wait, the rest drop.
        proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1", max_in_flight=1, timeout_s=60.0)
        n = 20
        waits = []
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                waits.append(await chat(session, proxy, prompt(i, "hung")))
        await proxy.settle()
        block = proxy.stats()["judge"]
        assert block["sampled"] == n
        assert block["pending"] == 3
        assert block["dropped"] == n - 3
        assert block["judged"] == 0 and sum(block["errors"].values()) == 0
        samples = await metric_samples(proxy)
        assert samples[("shadowproxy_judge_dropped_total", (("reason", "queue_full"),))] == n - 3
        # The stand-ins answer at once; a judge that never answers adds nothing to the client's wait.
        assert max(waits) < 0.5, waits
        # Stopping the proxy drops (and counts) what the judge still held.
        judge_worker = proxy.proxy.judge
        assert judge_worker is not None
        await judge_worker.close()
        block = proxy.stats()["judge"]
        assert block["dropped"] == n and block["pending"] == 0


async def test_the_judge_gate_decides_once_min_judgements_exist_and_report_merges_replicas(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], judge: RunningJudgeModel, start_proxy
) -> None:
    gates = {"min_samples": 1, "min_judge_non_loss_rate": 0.99, "max_p99_latency_ratio": 100.0}
    replicas = [
        await judged_proxy(start_proxy, pair, judge.url + "/v1", min_judgements=15) for _ in range(2)
    ]
    for replica in replicas:
        replica.proxy.config = dataclasses.replace(
            replica.proxy.config, gates=dataclasses.replace(replica.proxy.config.gates, **gates)
        )
    texts = [prompt(i, "gate") for i in range(40)]
    async with aiohttp.ClientSession() as session:
        for i, text in enumerate(texts[:10]):
            await chat(session, replicas[i % 2], text)
        for replica in replicas:
            await settle(replica)
        async with session.get(replicas[0].admin_url + "/shadow/verdict") as r:
            verdict = await r.json()
        [gate] = [g for g in verdict["gates"] if g["name"] == "min_judge_non_loss_rate"]
        assert gate["passed"] is None and gate["reason"] == "waiting: 5 of 15 judgements"
        for i, text in enumerate(texts[10:]):
            await chat(session, replicas[i % 2], text)
        for replica in replicas:
            await settle(replica)
    expected = {"candidate_better": 0, "tie": 0, "production_better": 0}
    for text in texts:
        expected[expected_result(text)] += 1
    # The candidate loses many judgements (its answers are shorter on a share of prompts): decided below 99%.
    report = await collect([r.admin_url for r in replicas])
    block = report.stats["judge"]
    assert {k: block[k] for k in expected} == expected
    assert block["judged"] == len(texts) and block["min_judgements"] == 15
    [gate] = [g for g in report.verdict["gates"] if g["name"] == "min_judge_non_loss_rate"]
    assert gate["threshold"] == 0.99 and gate["passed"] is False
    assert gate["interval"] == block["non_loss_ci95"]
    assert report.verdict["verdict"] == "fail"
    text = render(report)
    assert "LLM judge" in text and "candidate as A" in text and "candidate as B" in text
    assert f"judged {len(texts)} of {len(texts)} drawn" in text


async def test_the_judge_metrics_pass_promtool_and_are_documented(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel], judge: RunningJudgeModel, start_proxy
) -> None:
    promtool = require_binary("promtool")
    proxy = await judged_proxy(start_proxy, pair, judge.url + "/v1")
    async with aiohttp.ClientSession() as session:
        await chat(session, proxy, prompt(1, "metrics"))
        await settle(proxy)
        async with session.get(proxy.admin_url + "/metrics") as r:
            exposition = await r.read()
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate(exposition)
    assert (check.returncode, output.decode()) == (0, "")
    names = {
        f.name for f in text_string_to_metric_families(exposition.decode())
        if f.name.startswith("shadowproxy_judge") and not f.name.endswith("_created")
    }
    assert names == {"shadowproxy_judge_sampled", "shadowproxy_judge_results", "shadowproxy_judge_errors",
                     "shadowproxy_judge_dropped", "shadowproxy_judge_duration_seconds"}
    documented = (ROOT / "docs" / "metrics.md").read_text()
    for name in names:
        full = name if name.endswith("_seconds") else name + "_total"
        assert f"`{full}`" in documented, full


def test_the_documented_prompt_is_the_shipped_one() -> None:
    comparison = (ROOT / "docs" / "comparison.md").read_text()
    assert f"```text\n{JUDGE_SYSTEM_PROMPT}\n```" in comparison
    assert f"```text\n{judge_user_prompt('{request}', '{answer A}', '{answer B}')}\n```" in comparison


async def test_workers_judgements_merge_into_one_block_and_one_set_of_metrics(
    tmp_path: Path, pair: tuple[RunningOpenAIModel, RunningOpenAIModel], judge: RunningJudgeModel
) -> None:
    production, candidate = pair
    serving = Workers(tmp_path, production.url, candidate.url, f"""
[mirror]
sample_rate = 1.0
[compare]
preset = "openai"
[judge]
url = "{judge.url}/v1"
model = "judge-model"
sample_rate = 1.0
min_judgements = 7
""")
    texts = [prompt(i, "workers") for i in range(30)]
    expected = {"candidate_better": 0, "tie": 0, "production_better": 0}
    for text in texts:
        expected[expected_result(text)] += 1
    async with serving.running() as proc:
        async with aiohttp.ClientSession() as session:
            for text in texts:
                body = {"model": "m", "messages": [{"role": "user", "content": text}]}
                # A new connection each time, so the kernel spreads them over both workers.
                async with session.post(serving.url + "/v1/chat/completions", data=orjson.dumps(body),
                                        headers={"Connection": "close"}) as r:
                    assert r.status == 200
            block: dict[str, Any] = {}
            for _ in range(100):
                async with session.get(serving.admin + "/shadow/stats") as r:
                    stats = await r.json()
                block = stats["judge"]
                if block["judged"] == len(texts):
                    break
                await asyncio.sleep(0.1)
            async with session.get(serving.admin + "/metrics") as r:
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(await r.text()) for s in family.samples
                }
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()
    assert all(w["requests"] > 0 for w in stats["workers"]), stats["workers"]
    assert {k: block[k] for k in expected} == expected
    assert block["judged"] == block["sampled"] == len(texts) and block["min_judgements"] == 7
    assert block["length"]["candidate_chars"] == sum(len(openai_text(t, DIFFER)) for t in texts)
    for result, n in expected.items():
        assert samples[("shadowproxy_judge_results_total", (("result", result),))] == n


async def test_on_shutdown_the_judge_finishes_within_the_drain_time_and_counts_what_it_could_not(
    pair: tuple[RunningOpenAIModel, RunningOpenAIModel]
) -> None:
    production, candidate = pair
    async with await start_judge_model(JudgeBehaviour("correct", delay_ms=1000)) as judge:
        for drain_timeout_s, judged in ((5.0, 3), (0.1, 0)):
            config = make_config(
                production.url, candidate.url, compare={"preset": "openai"}, mirror={"sample_rate": 1.0},
                listen={"drain_timeout_s": drain_timeout_s},
                judge={"url": judge.url + "/v1", "model": "j", "sample_rate": 1.0, "max_in_flight": 3},
            )
            shadow = ShadowProxy(config)
            await shadow.start()
            proxy = RunningProxy(shadow)
            async with aiohttp.ClientSession() as session:
                for i in range(3):
                    await chat(session, proxy, prompt(i, f"drain{drain_timeout_s}"))
            await proxy.settle()
            await shadow.shutdown()
            block = shadow.stats_snapshot()["judge"]
            # Given the time, all three are judged; given less than one judgement takes, none is.
            assert block["judged"] == judged
            assert block["dropped"] == 3 - judged and block["pending"] == 0
