"""`serve --workers 2`: real processes sharing the listen port, one admin port over both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.drift.profile import build_profile
from tests.helpers import Upstream, free_port


class Workers:
    """`serve --workers 2` on a config with free ports: `listen` and `admin` are extra lines for
    those tables, `extra` more tables appended to the TOML."""

    def __init__(
        self, tmp_path: Path, production: str, candidate: str, extra: str = "", *, listen: str = "", admin: str = ""
    ) -> None:
        self.listen_port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.listen_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.config = tmp_path / "w.toml"
        self.config.write_text(f"""
[listen]
host = "127.0.0.1"
port = {self.listen_port}
{listen}
[admin]
host = "127.0.0.1"
port = {self.admin_port}
{admin}
[production]
url = "{production}"
[candidate]
url = "{candidate}"
{extra}""")
        self.first_line = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.subprocess.Process]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shadowproxy", "serve", "--config", str(self.config), "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a group of its own, as under systemd or a terminal
        )
        try:
            assert proc.stdout is not None
            self.first_line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()



async def test_two_workers_share_the_port_and_one_admin_covers_both(
    tmp_path: Path, upstream: Upstream, candidate_upstream: Upstream
) -> None:
    upstream.answer = lambda seen: {"predictions": [1]}
    candidate_upstream.answer = lambda seen: {"predictions": [1]}
    serving = Workers(tmp_path, upstream.url, candidate_upstream.url, """
[mirror]
sample_rate = 0.0
""", listen="drain_timeout_s = 5.0", admin='token = "t0ken"')
    async with serving.running() as proc:
        assert "2 workers" in serving.first_line
        url, admin = serving.url, serving.admin
        async with aiohttp.ClientSession() as s:

            async def burst(n: int) -> None:
                for _ in range(n):  # a new connection each time, so the kernel spreads them
                    async with s.post(url + "/", data=b"{}", headers={"Connection": "close"}) as r:
                        assert r.status == 200

            await asyncio.gather(*(burst(25) for _ in range(8)))
            async with s.get(admin + "/shadow/stats") as r:
                stats = await r.json()
            workers = stats["workers"]
            assert len(workers) == 2
            assert len({w["pid"] for w in workers}) == 2
            assert all(w["requests"] > 0 for w in workers), workers  # both served traffic
            assert stats["production"]["requests"] == 200 == sum(w["requests"] for w in workers)
            async with s.get(admin + "/metrics") as r:
                text = await r.text()
            assert 'shadowproxy_requests_total{status_class="2xx"} 200.0' in text
            # Production answers, and no probe has asked yet: the gauge says so all the same.
            assert "shadowproxy_production_ready 1.0" in text

            async with s.put(admin + "/shadow/sample_rate", json={"sample_rate": 1.0}) as r:
                assert r.status == 401
            async with s.put(admin + "/shadow/sample_rate", json={"sample_rate": 1.0},
                             headers={"Authorization": "Bearer t0ken"}) as r:
                assert r.status == 200
            async with s.get(admin + "/shadow/stats") as r:
                assert {w["sample_rate"] for w in (await r.json())["workers"]} == {1.0}
            await asyncio.gather(*(burst(10) for _ in range(4)))
            await asyncio.sleep(0.5)
            async with s.get(admin + "/shadow/stats") as r:
                stats = await r.json()
            assert stats["mirror"]["sent"] == 40
            assert stats["comparisons"]["agree"] == 40
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()


async def test_sigterm_to_the_whole_process_group_still_exits_0(tmp_path: Path, upstream: Upstream) -> None:
    # systemd (KillMode=control-group) and a terminal's Ctrl-C signal every process of the group:
    # each worker gets SIGTERM from there and again from the supervisor. A worker that has drained
    # must not die of the second one once its loop's handler is gone (the exit code would be 1).
    serving = Workers(tmp_path, upstream.url, upstream.url)
    for _ in range(2):  # the race is between the two signals: more than one try
        async with serving.running() as proc:
            async with aiohttp.ClientSession() as s, s.post(serving.url + "/", data=b"{}") as r:
                assert r.status == 200
            os.killpg(proc.pid, signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 20)
            assert proc.stderr is not None
            err = await proc.stderr.read()
            assert code == 0, err.decode("utf-8", "replace")[-2000:]  # the supervisor names the worker
            assert b"Traceback" not in err


async def test_a_dead_worker_is_restarted(tmp_path: Path, upstream: Upstream) -> None:
    serving = Workers(tmp_path, upstream.url, upstream.url)
    async with serving.running() as proc:
        admin = serving.admin
        async with aiohttp.ClientSession() as s:
            async with s.get(admin + "/shadow/stats") as r:
                pids = [w["pid"] for w in (await r.json())["workers"]]
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            for _ in range(100):
                await asyncio.sleep(0.1)
                async with s.get(admin + "/shadow/stats") as r:
                    now = [w["pid"] for w in (await r.json())["workers"]]
                if len(now) == 2 and victim not in now:
                    break
            assert len(now) == 2 and victim not in now
            async with s.post(serving.url + "/", data=b"{}") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_store_and_drift_endpoints_answer_on_the_supervisor(
    tmp_path: Path, upstream: Upstream
) -> None:
    upstream.answer = lambda seen: {"predictions": [1, 0]}
    serving = Workers(tmp_path, upstream.url, upstream.url, f"""
[mirror]
sample_rate = 0.0
[store]
path = "{tmp_path / 'audit.db'}"
sample_rate = 1.0
flush_interval_s = 0.05
[drift]
warmup = 10
""")
    async with serving.running() as proc:
        admin = serving.admin
        async with aiohttp.ClientSession() as s:
            ids = [f"w-{i}" for i in range(20)]
            for rid in ids:  # new connections, so both workers serve some of them
                async with s.post(serving.url + "/", json={"instances": [[1.0, 2.0], [3.0, 4.0]]},
                                  headers={"X-Request-ID": rid, "Connection": "close"}) as r:
                    assert r.status == 200
            await asyncio.sleep(0.5)  # the writers flush every 50 ms
            for rid in ids:
                async with s.get(admin + f"/shadow/requests/{rid}") as r:
                    assert r.status == 200, rid
                    assert (await r.json())["request_id"] == rid
            labels = [{"request_id": rid, "index": 0, "label": 1} for rid in ids]
            async with s.post(admin + "/shadow/labels", json=labels) as r:
                assert r.status == 200
                assert (await r.json())["matched"] == 20
            async with s.get(admin + "/shadow/drift") as r:
                assert r.status == 200
                assert "features" in await r.json()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_drift_with_a_baseline_file_merges_every_workers_window(tmp_path: Path, upstream: Upstream) -> None:
    rng = np.random.default_rng(11)
    xs, ys = rng.normal(0, 1, 5000), rng.uniform(0, 1, 5000)
    base = [{"x": float(v), "y": float(w)} for v, w in zip(xs, ys, strict=True)]
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes(orjson.dumps(build_profile(base).to_json()))
    upstream.answer = lambda seen: {"predictions": [1] * 20}
    serving = Workers(tmp_path, upstream.url, upstream.url, f"""
[mirror]
sample_rate = 0.0
[drift]
baseline = "{baseline}"
window = 5000
""")
    live_x, live_y = rng.normal(0.5, 1, 1200), rng.uniform(0, 1, 1200)
    async with serving.running() as proc:
        async with aiohttp.ClientSession() as s:
            for i in range(60):  # new connections, so both workers watch some of them
                rows = [{"x": float(live_x[k]), "y": float(live_y[k])} for k in range(20 * i, 20 * i + 20)]
                async with s.post(serving.url + "/", json={"instances": rows}, headers={"Connection": "close"}) as r:
                    assert r.status == 200
            async with s.get(serving.admin + "/shadow/stats") as r:
                assert all(w["requests"] > 0 for w in (await r.json())["workers"])  # both served traffic
            async with s.get(serving.admin + "/shadow/drift") as r:
                assert r.status == 200
                doc = await r.json()
            async with s.get(serving.admin + "/metrics") as r:
                exposition = await r.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert doc["workers"] == 2 and doc["window"] == 1200 and "state" not in doc
    # The reference: every instance sent, binned against the baseline's own deciles (docs/comparison.md).
    edges = np.quantile(xs, [k / 10 for k in range(1, 10)])
    shares = np.bincount(np.searchsorted(edges, xs), minlength=10) / len(xs)
    live = np.bincount(np.searchsorted(edges, live_x), minlength=10) / len(live_x)
    shares, live = np.maximum(shares, 1e-4), np.maximum(live, 1e-4)
    expected = float(np.sum((live - shares) * np.log(live / shares)))
    assert doc["features"]["x"]["psi"] == pytest.approx(expected, abs=1e-9)
    assert doc["features"]["x"]["status"] in ("warn", "alert")
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition) for s in family.samples
    }
    assert samples[("shadowproxy_feature_drift_psi", (("feature", "x"),))] == pytest.approx(expected)
    assert samples[("shadowproxy_drift_window_instances", ())] == 1200


async def test_a_config_the_workers_cannot_start_with_exits_2_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "baseline.json"
    bad.write_text("not a profile")
    workers = Workers(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", f'[drift]\nbaseline = "{bad}"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "serve", "--config", str(workers.config), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "drift.baseline:" in lines[0], lines


async def test_two_workers_merge_several_candidates_to_the_figures_of_one(tmp_path: Path) -> None:
    from shadowproxy.models import ModelBehaviour, start_model
    from shadowproxy.models.kserve import candidate_flips, generate_instances

    instances = generate_instances(120, seed=31)
    flips = sum(candidate_flips(x, 0.4) for x in instances)
    async with await start_model(ModelBehaviour.production()) as prod, \
            await start_model(ModelBehaviour(role="twin")) as twin, \
            await start_model(ModelBehaviour(role="flipper", flip_rate=0.4)) as flipper:
        serving = Workers(tmp_path, prod.url, twin.url)
        serving.config.write_text(f"""
[listen]
host = "127.0.0.1"
port = {serving.listen_port}
drain_timeout_s = 5.0
[admin]
host = "127.0.0.1"
port = {serving.admin_port}
[production]
url = "{prod.url}"
[mirror]
sample_rate = 1.0
[[candidates]]
name = "twin"
url = "{twin.url}"
[[candidates]]
name = "flipper"
url = "{flipper.url}"
sample_rate = 0.5
""")
        async with serving.running() as proc, aiohttp.ClientSession() as s:
            assert "candidates twin" in serving.first_line
            rate = {"candidate": "flipper", "sample_rate": 1.0}
            async with s.put(serving.admin + "/shadow/sample_rate", json=rate) as r:
                assert r.status == 200
            for instance in instances:  # a new connection each time, so the kernel spreads them
                async with s.post(serving.url + "/v1/models/demo:predict", json={"instances": [instance]},
                                  headers={"Connection": "close"}) as r:
                    assert r.status == 200
            await asyncio.sleep(0.5)
            async with s.get(serving.admin + "/shadow/stats") as r:
                stats = await r.json()
            async with s.get(serving.admin + "/shadow/verdict") as r:
                verdict = await r.json()
            async with s.get(serving.admin + "/metrics") as r:
                text = await r.text()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    workers = stats["workers"]
    assert len(workers) == 2 and all(w["requests"] > 0 for w in workers), workers
    assert all(w["sample_rates"] == {"twin": 1.0, "flipper": 1.0} for w in workers), workers
    docs = stats["candidates"]
    assert list(docs) == ["twin", "flipper"]
    for name in ("twin", "flipper"):
        assert docs[name]["mirror"]["sent"] == 120
        assert docs[name]["comparisons"]["total"] == 120
    assert docs["twin"]["comparisons"]["disagree"] == 0
    assert docs["flipper"]["comparisons"]["disagree"] == flips
    assert set(verdict["candidates"]) == {"twin", "flipper"}
    assert 'shadowproxy_mirror_requests_total{result="sent",target="flipper"} 120.0' in text
    assert f'shadowproxy_comparisons_total{{outcome="disagree",target="flipper"}} {float(flips)}' in text
