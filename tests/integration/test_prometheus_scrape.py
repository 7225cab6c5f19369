"""A real Prometheus scraping a real proxy: the dashboard's queries and the alert rules work on it.

Prometheus runs as a subprocess on a free loopback port with its own temporary storage; the proxy and
the demo models run in this test's event loop, so every wait here is `await asyncio.sleep`: a blocking
sleep would leave the scrapes unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from shadowproxy.models import ModelBehaviour, generate_instances, start_model
from tests.helpers import DASHBOARD, PROMETHEUS_DIR, RunningProxy, dashboard_panels, free_port, require_binary

RATE_WINDOW = "30s"
JOB = "shadowproxy"
# Grafana's template variables, as Grafana would expand them for this job.
VARIABLES = {"$__rate_interval": RATE_WINDOW, "${job}": JOB, "$job": JOB}


def expand(query: str) -> str:
    for name, value in VARIABLES.items():
        query = query.replace(name, value)
    assert "$" not in query, f"a template variable this test does not expand: {query}"
    return query


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/v1/query", params={"query": promql}) as response:
            answer = await response.json()
        assert response.status == 200 and answer["status"] == "success", f"{promql}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/v1/rules") as response:
            answer = await response.json()
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]


async def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_prometheus(binary: str, admin_address: str) -> AsyncIterator[Prometheus]:
    """Prometheus scraping `admin_address` every second, with alerts.yml loaded; gone on exit."""
    with tempfile.TemporaryDirectory(prefix="shadowproxy-prometheus-") as tmp:
        workdir = Path(tmp)
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": [admin_address]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

                async def ready() -> bool:
                    assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
                    try:
                        async with session.get(f"{url}/-/ready") as response:
                            return response.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_for(ready, "prometheus to be ready")
                yield Prometheus(url, session)
        finally:
            process.terminate()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while process.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if process.poll() is None:
                process.kill()
                process.wait()


async def drive_traffic(proxy: RunningProxy, stop: asyncio.Event) -> int:
    """Batches of 8 instances until `stop`: the candidate (10% flipped) disagrees now and then."""
    instances = generate_instances(4000, seed=3)
    sent = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            batch = instances[(8 * sent) % 4000 :][:8]
            async with session.post(f"{proxy.url}/v1/models/demo:predict", json={"instances": batch}) as r:
                assert r.status == 200, await r.text()
                await r.read()
            sent += 1
            await asyncio.sleep(0.005)
    return sent


async def test_dashboard_queries_and_alert_rules_work_on_a_real_prometheus(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
) -> None:
    prometheus_binary = require_binary("prometheus")
    promtool = require_binary("promtool")
    async with (
        await start_model(ModelBehaviour.production()) as production,
        await start_model(ModelBehaviour.candidate(flip_rate=0.1)) as candidate,
    ):
        proxy: RunningProxy = await start_proxy(production.url, candidate.url, mirror={"sample_rate": 1.0})
        admin = proxy.admin_url.removeprefix("http://")
        stop = asyncio.Event()
        traffic = asyncio.create_task(drive_traffic(proxy, stop))
        try:
            async with running_prometheus(prometheus_binary, admin) as prometheus:
                latency = (
                    "histogram_quantile(0.5, sum by (le, target) "
                    f"(rate(shadowproxy_upstream_request_duration_seconds_bucket[{RATE_WINDOW}])))"
                )

                async def both_targets_have_a_median() -> bool:
                    series = await prometheus.query(latency)
                    values = {s["metric"]["target"]: float(s["value"][1]) for s in series}
                    return set(values) == {"production", "candidate"} and all(
                        math.isfinite(v) and v > 0 for v in values.values()
                    )

                # Finite medians for both need two scrapes, at least, with traffic between them.
                await wait_for(both_targets_have_a_median, "scrapes with traffic for both targets")
                up = await prometheus.query(f'up{{job="{JOB}"}}')
                assert [s["value"][1] for s in up] == ["1"]

                with DASHBOARD.open() as file:
                    assert json.load(file)["panels"]
                for panel in dashboard_panels():
                    for target in panel["targets"]:
                        if "shadowproxy_judge_" in target["expr"]:
                            continue  # registered with a [judge] table only; this proxy has none
                        series = await prometheus.query(expand(target["expr"]))
                        assert series, f"panel {panel['title']!r} ({target['refId']}) returned no series"

                async def rules_evaluated() -> bool:
                    rules = await prometheus.rules()
                    return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

                await wait_for(rules_evaluated, "a rule evaluation")
                broken = {r["name"]: r.get("lastError") for r in await prometheus.rules() if r["health"] != "ok"}
                assert not broken
        finally:
            stop.set()
            assert await traffic > 0

        async with aiohttp.ClientSession() as session, session.get(f"{proxy.admin_url}/metrics") as r:
            exposition = await r.read()
        check = await asyncio.create_subprocess_exec(
            promtool,
            "check",
            "metrics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await check.communicate(exposition)
        assert b"shadowproxy_comparisons_total" in exposition
        assert (check.returncode, output.decode()) == (0, "")
