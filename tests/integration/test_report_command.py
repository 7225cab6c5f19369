"""`shadowproxy report` against real in-process proxies in front of the bundled model servers."""

from __future__ import annotations

import asyncio
import io
import json
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from shadowproxy.commands import cli as cli
from shadowproxy.commands.report import Report, collect, gates_from_verdict, render, report_main, use_color
from shadowproxy.config import GatesConfig
from shadowproxy.judging.intervals import newcombe_interval
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate, evaluate_all
from shadowproxy.models import ModelBehaviour, RunningModel, generate_instances, start_model
from tests.helpers import RunningProxy, Upstream, closed_port_url

PREDICT = "/v1/models/demo:predict"
StartModel = Callable[..., Awaitable[RunningModel]]
StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def models() -> AsyncIterator[StartModel]:
    started: list[RunningModel] = []

    async def start(**behaviour: Any) -> RunningModel:
        model = await start_model(ModelBehaviour(**behaviour))
        started.append(model)
        return model

    yield start
    for model in started:
        await model.close()


def batches(n: int, seed: int = 1, size: int = 2) -> list[list[list[float]]]:
    rows = generate_instances(n * size, seed)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def send(proxy: RunningProxy, requests: list[list[list[float]]]) -> None:
    async with aiohttp.ClientSession() as session:
        for batch in requests:
            async with session.post(proxy.url + PREDICT, json={"instances": batch}) as response:
                assert response.status == 200
                await response.read()
    await proxy.settle()


async def send_concurrently(proxy: RunningProxy, requests: list[list[list[float]]], clients: int = 8) -> None:
    pending = iter(requests)

    async def client(session: aiohttp.ClientSession) -> None:
        for batch in pending:
            async with session.post(proxy.url + PREDICT, json={"instances": batch}) as response:
                assert response.status == 200
                await response.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    await proxy.settle()


async def mirrored_proxy(models: StartModel, start_proxy: StartProxy, **gates: Any) -> tuple[RunningProxy, str]:
    """A proxy mirroring everything; both models answer in ~5 ms so latency is never 0 ms."""
    production = await models(role="production", delay_ms=5.0)
    candidate = await models(role="candidate", delay_ms=5.0, flip_rate=gates.pop("flip_rate", 0.0))
    proxy = await start_proxy(
        production.url,
        candidate.url,
        mirror={"sample_rate": 1.0},
        gates={"min_samples": 50, "max_p99_latency_ratio": 3.0, **gates},
    )
    return proxy, production.url


async def run_cli(*args: str) -> int:
    # The report runs its own event loop; the proxies keep serving on the test's loop meanwhile.
    return await asyncio.to_thread(cli.main, ["report", *args])


async def test_twin_candidate_passes_with_exit_0(models, start_proxy, capsys) -> None:
    # 800 mirrored requests: enough for an upper bound on each p99 (437) and for the error-rate
    # interval to fit under 1% (381); 1600 agreeing predictions put disagreement's under 0.3%.
    proxy, _ = await mirrored_proxy(models, start_proxy, max_disagreement_rate=0.05)
    await send_concurrently(proxy, batches(800))
    assert await run_cli("--admin-url", proxy.admin_url) == 0
    out = capsys.readouterr().out
    assert "Verdict: PASS" in out
    assert "\x1b[" not in out  # not a terminal: no colour
    # Each gate's interval is printed: the error-rate delta's is Newcombe's for 0 of 800 each side.
    lower, upper = newcombe_interval(0, 800, 0, 800)
    assert f"[{lower * 100:.2f}%, {upper * 100:.2f}%]" in out


async def test_candidate_flipping_a_fifth_fails_on_disagreement_with_exit_1(models, start_proxy, capsys) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy, flip_rate=0.2)
    await send(proxy, batches(60))
    assert await run_cli("--admin-url", proxy.admin_url, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "fail"
    failed = {g["name"] for g in report["gates"] if g["passed"] is False}
    assert "max_disagreement_rate" in failed


async def test_fresh_proxy_is_insufficient_data_with_exit_3(models, start_proxy, capsys) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy)
    assert await run_cli("--admin-url", proxy.admin_url) == 3
    assert "Verdict: INSUFFICIENT DATA" in capsys.readouterr().out


async def test_unreachable_admin_url_is_one_line_naming_it_with_exit_2(capsys) -> None:
    url = closed_port_url()
    assert await run_cli("--admin-url", url) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert url in lines[0]
    assert "Traceback" not in captured.err


async def test_one_unreachable_replica_among_good_ones_is_exit_2(models, start_proxy, capsys) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy)
    url = closed_port_url()
    assert await run_cli("--admin-url", proxy.admin_url, "--admin-url", url) == 2
    err = capsys.readouterr().err
    assert url in err and proxy.admin_url not in err


async def test_admin_url_answering_garbage_is_exit_2(upstream: Upstream, capsys) -> None:
    # The echo upstream answers GET with 200 "empty": not the stats of a proxy.
    assert await run_cli("--admin-url", upstream.url) == 2
    err = capsys.readouterr().err
    assert upstream.url in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--admin-url", "ftp://example.com"],
        ["--admin-url", "not a url"],
        ["--timeout", "0", "--admin-url", "http://h"],
    ],
)
async def test_usage_errors_exit_2(args: list[str], capsys) -> None:
    assert await run_cli(*args) == 2
    assert "Traceback" not in capsys.readouterr().err


async def test_json_holds_verdict_gates_stats_and_sources(models, start_proxy) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy)
    await send(proxy, batches(30))
    out = io.StringIO()
    code = await report_main([proxy.admin_url + "/"], as_json=True, stdout=out)
    report = json.loads(out.getvalue())
    assert code == {"pass": 0, "fail": 1, "insufficient_data": 3}[report["verdict"]]
    assert set(report) == {"verdict", "gates", "stats", "sources"}
    assert report["sources"] == [proxy.admin_url]
    assert report["stats"]["comparisons"]["total"] == 60
    assert [g["name"] for g in report["gates"]] == [
        "min_samples",
        "max_disagreement_rate",
        "max_p99_latency_ratio",
        "max_error_rate_delta",
    ]


async def test_report_judges_with_the_proxys_configured_gates(models, start_proxy) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy, max_disagreement_rate=0.5, max_error_rate_delta=0.25)
    report = await collect([proxy.admin_url])
    thresholds = {g["name"]: g["threshold"] for g in report.verdict["gates"]}
    assert thresholds == {
        "min_samples": 50,
        "max_disagreement_rate": 0.5,
        "max_p99_latency_ratio": 3.0,
        "max_error_rate_delta": 0.25,
    }


def test_gates_are_read_from_verdict_thresholds() -> None:
    verdict = {
        "verdict": "insufficient_data",
        "gates": [
            {"name": "min_samples", "value": 0, "threshold": 7, "passed": None, "reason": ""},
            {"name": "max_p99_latency_ratio", "value": None, "threshold": 2.5, "passed": None, "reason": ""},
        ],
    }
    assert gates_from_verdict(verdict) == GatesConfig(min_samples=7, max_p99_latency_ratio=2.5)


def test_min_labels_travels_in_the_verdict_so_a_report_adds_the_accuracy_gate_when_the_proxy_does() -> None:
    gates = GatesConfig(min_samples=1, min_accuracy_delta=-0.05, min_labels=20)
    snapshot = ShadowStats().snapshot()
    snapshot["ground_truth"] = {"candidate_labeled": 30, "accuracy_delta": 0.0,
                                "accuracy_delta_ci95": [-0.1, 0.1]}
    verdict = evaluate_all(snapshot, gates)
    assert verdict["min_labels"] == 20
    assert "min_accuracy_delta" in [g["name"] for g in verdict["gates"]]  # 30 labels >= 20
    read = gates_from_verdict(verdict)
    assert (read.min_labels, read.min_accuracy_delta) == (20, -0.05)
    assert evaluate_all(snapshot, read)["gates"] == verdict["gates"]  # the default 100 would leave it out
    assert "min_labels" not in evaluate_all(snapshot, GatesConfig())


async def test_report_of_one_proxy_is_its_own_stats_and_verdict(models, start_proxy) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy, flip_rate=0.1)
    await send(proxy, batches(60))
    report = await collect([proxy.admin_url])
    assert report.stats == proxy.proxy.stats_snapshot()
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/shadow/verdict") as r:
        assert report.verdict == await r.json()


async def test_two_replicas_merge_to_the_stats_of_one_proxy_that_saw_all_traffic(models, start_proxy) -> None:
    production = await models(role="production", delay_ms=1.0)
    candidate = await models(role="candidate", delay_ms=3.0, flip_rate=0.15)
    sections: dict[str, Any] = {"mirror": {"sample_rate": 1.0}, "gates": {"min_samples": 50}}
    replica_a = await start_proxy(production.url, candidate.url, **sections)
    replica_b = await start_proxy(production.url, candidate.url, **sections)
    whole = await start_proxy(production.url, candidate.url, **sections)
    traffic = batches(80, seed=3, size=3)
    await asyncio.gather(send(replica_a, traffic[:50]), send(replica_b, traffic[50:]), send(whole, traffic))

    report = await collect([replica_a.admin_url, replica_b.admin_url])
    merged, single = report.stats, whole.proxy.stats_snapshot()
    # Counts do not depend on timing: exactly those of one proxy that saw everything.
    for section in ("mirror", "comparisons", "errors"):
        assert merged[section] == single[section]
    assert merged["confusion"] == single["confusion"]
    for target in ("production", "candidate"):
        assert merged[target]["requests"] == single[target]["requests"]
        assert merged[target]["errors"] == single[target]["errors"]
    assert merged["mirrored"]["pairs"] == single["mirrored"]["pairs"] == 80
    # Latencies were measured separately, so compare with one aggregator holding both replicas'
    # histograms: bucket sums are exact, so the merged quantiles must match to the bit.
    union = ShadowStats.from_states(
        [replica_a.proxy.stats_snapshot(full=True), replica_b.proxy.stats_snapshot(full=True)]
    )
    assert merged == union.snapshot()
    assert report.verdict == union_verdict(union, GatesConfig(min_samples=50))
    assert report.verdict["verdict"] == "fail"  # 15% flipped on 240 predictions


async def test_two_replicas_give_the_p99_bounds_of_one_proxy_that_saw_every_pair(
    upstream: Upstream, candidate_upstream: Upstream
) -> None:
    # Two admin ports serving the stats of a known split of 3000 latency pairs: the merged bounds
    # must be those of one aggregator that recorded every pair.
    rng = random.Random(8)
    whole, halves = ShadowStats(), (ShadowStats(), ShadowStats())
    for i in range(3000):
        production, candidate = rng.lognormvariate(-5.0, 0.5), rng.lognormvariate(-4.8, 0.5)
        for stats in (whole, halves[i % 2]):
            stats.record_mirror("sent")
            stats.record_pair_latency(production, candidate)
    gates = GatesConfig(min_samples=100)
    for server, half in zip((upstream, candidate_upstream), halves, strict=True):
        full, verdict = half.snapshot(full=True), evaluate(half.snapshot(), gates)

        def answer(seen: dict[str, Any], full: Any = full, verdict: Any = verdict) -> Any:
            return verdict if seen["path"].startswith("/shadow/verdict") else full

        server.answer = answer
    report = await collect([upstream.url, candidate_upstream.url])
    single = whole.snapshot()
    for side in ("production_latency_ms", "candidate_latency_ms"):
        merged_ci = report.stats["mirrored"][side]["p99_ci"]
        assert merged_ci == single["mirrored"][side]["p99_ci"]
        assert None not in merged_ci
    latency = [g for g in report.verdict["gates"] if g["name"] == "max_p99_latency_ratio"]
    expected = [g for g in evaluate(single, gates)["gates"] if g["name"] == "max_p99_latency_ratio"]
    assert latency == expected
    # Each half alone (1500 pairs) is known less precisely than the two together.
    half_ci = halves[0].snapshot()["mirrored"]["production_latency_ms"]["p99_ci"]
    merged_ci = report.stats["mirrored"]["production_latency_ms"]["p99_ci"]
    assert half_ci[1] - half_ci[0] > merged_ci[1] - merged_ci[0]


def union_verdict(stats: ShadowStats, gates: GatesConfig) -> dict[str, Any]:
    return evaluate(stats.snapshot(), gates)


def _sample_report() -> Report:
    stats = ShadowStats()
    stats.mirror["sampled"] = 10
    stats.mirror["dropped"] = 3
    snapshot = stats.snapshot()
    return Report(
        verdict={"verdict": "fail", "gates": []}, stats=snapshot, sources=["http://127.0.0.1:9090"]
    )


def test_dropped_mirror_requests_are_flagged_without_colour() -> None:
    text = render(_sample_report(), color=False)
    assert "dropped 3 (!)" in text
    assert "30.00% of sampled requests were dropped" in text
    assert "\x1b[" not in text


def test_colour_only_on_a_terminal_without_no_color(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(Terminal())
    assert not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Terminal())
    assert "\x1b[31m" in render(_sample_report(), color=True)


async def test_command_line_exit_code_in_a_real_process(models, start_proxy) -> None:
    proxy, _ = await mirrored_proxy(models, start_proxy)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shadowproxy",
        "report",
        "--admin-url",
        proxy.admin_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 3, err
    assert b"INSUFFICIENT DATA" in out
