"""[secondary]: production's twin sets the noise floor, and the gate judges what is left (net)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.models import ModelBehaviour, start_model
from shadowproxy.models.kserve import candidate_flips, generate_instances
from tests.helpers import RunningProxy, closed_port_url
from tests.integration.test_candidates import candidates, send

GATES = {"min_samples": 300, "max_disagreement_rate": 0.05, "max_p99_latency_ratio": 100.0}


def within(observed: float, expected: float, n: int, sds: float = 4.0) -> bool:
    """`observed` a share of n draws, within `sds` binomial standard deviations of `expected`."""
    return abs(observed - expected) <= sds * math.sqrt(max(expected * (1 - expected), 1e-4) / n)


async def metric_value(proxy: RunningProxy, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exported")


async def test_noise_is_discounted_from_a_twin_and_a_real_flip_rate_shows_as_net(start_proxy: Any) -> None:
    n, s, f = 1000, 0.2, 0.3
    instances = generate_instances(n, seed=5)
    flipped = sum(candidate_flips(x, f) for x in instances) / n  # the flipper's own, deterministic share
    noise = 2 * s * (1 - s)  # two copies that each move a label with probability s disagree this often
    # A flipped instance still agrees when production's noise moved it and the candidate's did not.
    flipper_net = flipped * (1 - 3 * s * (1 - s))
    async with await start_model(ModelBehaviour.production(noise_rate=s)) as prod, \
            await start_model(ModelBehaviour(role="secondary", noise_rate=s)) as second, \
            await start_model(ModelBehaviour(role="twin", noise_rate=s)) as twin, \
            await start_model(ModelBehaviour(role="flipper", noise_rate=s, flip_rate=f)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, gates=GATES,
            candidates=candidates(twin=twin.url, flipper=flipper.url),
            secondary={"url": second.url, "timeout_s": 5.0},
        )
        await send(proxy, instances, clients=4)
        await proxy.settle(timeout=15.0)
        stats = proxy.stats()
        sent_secondary = await metric_value(
            proxy, "shadowproxy_mirror_requests_total", target="secondary", result="sent"
        )
        twin_net = await metric_value(proxy, "shadowproxy_net_disagreement_rate", target="twin")
        flipper_noise = await metric_value(proxy, "shadowproxy_noise_rate", target="flipper")
    assert second.requests == n
    assert sent_secondary == n
    assert stats["secondary"]["requests"] == n and stats["secondary"]["errors"] == 0
    twin_doc = stats["candidates"]["twin"]["comparisons"]
    flip_doc = stats["candidates"]["flipper"]["comparisons"]
    for doc in (twin_doc, flip_doc):
        assert doc["noise"]["compared"] == n and doc["noise"]["missing"] == 0
        assert within(doc["noise"]["rate"], noise, n)
    assert within(twin_doc["disagreement_rate"], noise, n)
    assert twin_net == pytest.approx(twin_doc["net"]["rate"])
    assert flipper_noise == pytest.approx(flip_doc["noise"]["rate"])
    # Net is a difference of two correlated shares, each within 4 sd: its own spread is below both.
    assert abs(twin_doc["net"]["rate"]) <= 8 * math.sqrt(noise * (1 - noise) / n)
    assert twin_doc["net"]["ci95"][0] < GATES["max_disagreement_rate"]
    assert abs(flip_doc["net"]["rate"] - flipper_net) <= 8 * math.sqrt(noise * (1 - noise) / n)
    assert flip_doc["net"]["ci95"][0] > GATES["max_disagreement_rate"]


async def test_verdicts_follow_net_with_a_secondary(start_proxy: Any) -> None:
    n, s = 1000, 0.2
    instances = generate_instances(n, seed=6)
    async with await start_model(ModelBehaviour.production(noise_rate=s)) as prod, \
            await start_model(ModelBehaviour(role="secondary", noise_rate=s)) as second, \
            await start_model(ModelBehaviour(role="twin", noise_rate=s)) as twin:
        proxy: RunningProxy = await start_proxy(
            prod.url, twin.url, mirror={"sample_rate": 1.0}, gates=GATES, secondary={"url": second.url},
        )
        await send(proxy, instances, clients=4)
        await proxy.settle(timeout=15.0)
        async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/shadow/verdict") as r:
            verdict = await r.json()
    gate = next(g for g in verdict["gates"] if g["name"] == "max_disagreement_rate")
    # Raw disagreement (about 32%) is far above the 5% limit; none of it is the candidate's.
    assert verdict["verdict"] != "fail", gate
    assert gate["passed"] is not False
    assert "net" in gate["reason"]


async def test_a_dead_secondary_leaves_every_prediction_out_and_counted(start_proxy: Any) -> None:
    n = 200
    instances = generate_instances(n, seed=8)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin:
        proxy: RunningProxy = await start_proxy(
            prod.url, twin.url, mirror={"sample_rate": 1.0}, gates=GATES,
            secondary={"url": closed_port_url(), "timeout_s": 1.0, "backoff_after": 1000},
        )
        await send(proxy, instances, clients=2)
        await proxy.settle(timeout=15.0)
        stats = proxy.stats()
    comparisons = stats["comparisons"]
    assert comparisons["total"] == n and comparisons["disagree"] == 0  # the candidate is judged anyway
    assert comparisons["noise"]["compared"] == 0
    assert comparisons["noise"]["missing"] == n
    assert stats["secondary"]["mirror"]["error"] == n
    assert stats["secondary"]["mirror"]["errors_by_kind"]["connect"] == n


@pytest.mark.parametrize("workers_states", [2])
async def test_noise_figures_of_one_proxy_survive_the_full_state(start_proxy: Any, workers_states: int) -> None:
    from shadowproxy.judging.stats import ShadowStats

    n = 200
    instances = generate_instances(n, seed=9)
    async with await start_model(ModelBehaviour.production(noise_rate=0.3)) as prod, \
            await start_model(ModelBehaviour(role="secondary", noise_rate=0.3)) as second, \
            await start_model(ModelBehaviour(role="twin", noise_rate=0.3)) as twin:
        proxy: RunningProxy = await start_proxy(
            prod.url, twin.url, mirror={"sample_rate": 1.0}, secondary={"url": second.url},
        )
        await send(proxy, instances, clients=2)
        await proxy.settle(timeout=15.0)
        full = proxy.proxy.stats_snapshot(full=True)
    merged = ShadowStats.from_states([full] * workers_states).snapshot()
    noise = full["comparisons"]["noise"]
    assert merged["comparisons"]["noise"]["compared"] == workers_states * noise["compared"]
    assert merged["comparisons"]["noise"]["rate"] == pytest.approx(noise["rate"])
    assert merged["secondary"]["requests"] == workers_states * n


async def test_field_diffs_find_the_altered_field_and_mark_the_timestamp_noisy(start_proxy: Any) -> None:
    n, f = 400, 0.3
    instances = generate_instances(n, seed=10)
    flipped = sum(candidate_flips(x, f) for x in instances)
    same = {"version": "1", "timestamp": True}
    async with await start_model(ModelBehaviour(role="production", **same)) as prod, \
            await start_model(ModelBehaviour(role="secondary", **same)) as second, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=f, **same)) as flipper:
        proxy: RunningProxy = await start_proxy(
            prod.url, flipper.url, mirror={"sample_rate": 1.0}, compare={"kind": "fields"},
            secondary={"url": second.url},
        )
        await send(proxy, instances, clients=4)
        await proxy.settle(timeout=15.0)
        stats = proxy.stats()
    fields = stats["fields"]
    assert set(fields) == {"/predictions/*", "/model_version", "/created"}
    assert fields["/predictions/*"] == {
        "compared": n, "differ": flipped, "noise_compared": n, "noise_differ": 0, "noisy": False,
    }
    assert fields["/model_version"]["differ"] == 0 and not fields["/model_version"]["noisy"]
    assert fields["/created"]["noisy"] is True
    assert fields["/created"]["noise_differ"] == n
    comparisons = stats["comparisons"]
    # One answer is one prediction; the timestamp, noisy from its first difference, is left out.
    assert comparisons["total"] == n
    assert comparisons["disagree"] == flipped
    assert comparisons["noise"]["rate"] == 0.0
    assert comparisons["net"]["rate"] == pytest.approx(flipped / n)


async def test_without_a_secondary_every_differing_field_counts(start_proxy: Any) -> None:
    n = 50
    instances = generate_instances(n, seed=11)
    async with await start_model(ModelBehaviour(role="production", timestamp=True)) as prod, \
            await start_model(ModelBehaviour(role="twin", timestamp=True)) as twin:
        proxy: RunningProxy = await start_proxy(
            prod.url, twin.url, mirror={"sample_rate": 1.0}, compare={"kind": "fields"},
        )
        await send(proxy, instances, clients=2)
        await proxy.settle(timeout=15.0)
        stats = proxy.stats()
    # The versions differ by role, the timestamps by time: every answer disagrees, nothing is noisy.
    assert stats["comparisons"]["disagree"] == n
    assert stats["fields"]["/model_version"]["differ"] == n
    assert stats["fields"]["/predictions/*"]["differ"] == 0
    assert not any(row["noisy"] for row in stats["fields"].values())


async def test_report_states_noise_net_fields_and_flip_shares(start_proxy: Any, capsys: Any) -> None:
    from shadowproxy.commands import cli
    from shadowproxy.models.kserve import predict_labels

    n, f = 300, 0.3
    instances = generate_instances(n, seed=12)
    # Where the flipper flips, its label is production's plus one: the truth of the flip shares.
    toward: dict[int, int] = {}
    for x, label in zip(instances, predict_labels(instances), strict=True):
        if candidate_flips(x, f):
            toward[(label + 1) % 3] = toward.get((label + 1) % 3, 0) + 1
    flips = sum(toward.values())
    same = {"version": "1", "timestamp": True}
    async with await start_model(ModelBehaviour(role="production", **same)) as prod, \
            await start_model(ModelBehaviour(role="secondary", **same)) as second, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=f, **same)) as flipper, \
            await start_model(ModelBehaviour(role="twin", **same)) as twin:
        labels = await start_proxy(
            prod.url, flipper.url, mirror={"sample_rate": 1.0}, secondary={"url": second.url},
        )
        fields = await start_proxy(
            prod.url, None, mirror={"sample_rate": 1.0}, compare={"kind": "fields"},
            candidates=candidates(flipper=flipper.url, twin=twin.url), secondary={"url": second.url},
        )
        await send(labels, instances, clients=4)
        await send(fields, instances, clients=4)
        await labels.settle(timeout=15.0)
        await fields.settle(timeout=15.0)
        # The report runs its own event loop; the proxies keep serving on the test's loop meanwhile.
        await asyncio.to_thread(cli.main, ["report", "--admin-url", labels.admin_url])
        label_out = capsys.readouterr().out
        await asyncio.to_thread(cli.main, ["report", "--admin-url", fields.admin_url])
        fields_out = capsys.readouterr().out
    assert "Noise (production against its secondary copy)" in label_out
    assert "noise 0% " in label_out and f"over {n} predictions, 0 left out" in label_out
    net = f"{flips / n * 100:.3g}%"
    assert f"net disagreement {net}" in label_out
    shares = ", ".join(f"{label} {count / flips * 100:.3g}%" for label, count in
                       sorted(toward.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    assert f"Flips toward each class (the candidate's label, of {flips} disagreeing labels): {shares}" in label_out
    assert "Fields by net difference rate (top 3 of 3) - flipper" in fields_out
    assert "noisy, left out of agreement: /created (100% noise)" in fields_out
    flipper_rows = fields_out.split("(top 3 of 3) - flipper", 1)[1].splitlines()
    assert flipper_rows[1].lstrip().startswith("/predictions/*")
    assert f"differ {flips} of {n}" in flipper_rows[1]
