"""Drift monitoring through a real proxy: `/shadow/drift` and the drift metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowproxy.drift.profile import build_profile
from tests.drift_data import BASE, BASE_ROWS, bodies, ref_psi_ks, rows_of, synthetic
from tests.helpers import Upstream


async def test_drift_endpoint_and_metrics_through_a_real_proxy(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes(orjson.dumps(build_profile(BASE_ROWS).to_json()))
    upstream.answer = lambda seen: {"predictions": [1] * len(orjson.loads(seen["body"])["instances"])}
    proxy = await start_proxy(upstream.url, drift={"baseline": str(baseline), "window": 3000, "warmup": 1000})
    live = synthetic(4000, seed=8, shift=0.5 * float(np.std(BASE["score"])))
    async with aiohttp.ClientSession() as session:
        for body in bodies(rows_of(live), per_request=400):
            async with session.post(proxy.url + "/v1/models/m:predict", data=body) as r:
                assert r.status == 200
                await r.read()
        # The background task parses within its interval: nothing is left for the endpoint to do.
        (monitor,) = proxy.proxy.components
        for _ in range(100):
            if not monitor.queue:
                break
            await asyncio.sleep(0.02)
        assert not monitor.queue
        async with session.get(proxy.admin_url + "/shadow/drift") as r:
            assert r.status == 200
            doc = await r.json()
        async with session.get(proxy.admin_url + "/metrics") as r:
            exposition = await r.text()
    assert doc["window"] == 3000
    expected_psi, expected_ks = ref_psi_ks(BASE["score"], live["score"][-3000:])
    assert doc["features"]["score"]["psi"] == pytest.approx(expected_psi, abs=1e-9)
    assert doc["features"]["score"]["ks"] == pytest.approx(expected_ks, abs=1e-9)
    assert doc["features"]["score"]["status"] in ("warn", "alert")
    assert doc["features"]["age"]["status"] == "ok"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }
    assert samples[("shadowproxy_feature_drift_psi", (("feature", "score"),))] == pytest.approx(expected_psi)
    assert samples[("shadowproxy_drift_values_total", (("feature", "age"), ("problem", "missing")))] == 0
    assert samples[("shadowproxy_drift_window_instances", ())] == 3000
    assert samples[("shadowproxy_prediction_drift_psi", ())] == pytest.approx(0.0, abs=1e-6)


async def test_without_a_drift_table_there_is_no_monitor(upstream: Upstream, start_proxy: Any) -> None:
    proxy = await start_proxy(upstream.url)
    assert proxy.proxy.components == []
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/shadow/drift") as r:
        assert r.status == 404


