"""The live page's routes without a browser: its files, their headers, and `/shadow/history`."""

from __future__ import annotations

import aiohttp

from shadowproxy.control.live import CSP
from tests.helpers import ROOT, Upstream

PAGE = ROOT / "shadowproxy" / "control" / "page"


async def test_the_page_and_its_files_come_with_a_strict_csp(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession() as s:
        for path, name, kind in (("/", "index.html", "text/html"), ("/page/page.js", "page.js", "text/javascript"),
                                 ("/page/page.css", "page.css", "text/css"), ("/page/icon.svg", "icon.svg",
                                                                             "image/svg+xml")):
            async with s.get(proxy.admin_url + path) as r:
                assert r.status == 200, path
                assert await r.read() == (PAGE / name).read_bytes()
                assert r.content_type == kind
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["X-Frame-Options"] == "DENY"
        for path in ("/page/index.html", "/page/../config.py", "/page/nothing.js"):
            async with s.get(proxy.admin_url + path) as r:
                assert r.status == 404, path
        async with s.get(proxy.admin_url + "/page/features.json") as r:
            assert await r.json() == {"drift": False, "history_interval_s": 5.0}


async def test_features_say_when_drift_is_served(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, drift={"warmup": 10})
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/page/features.json") as r:
        assert (await r.json())["drift"] is True


async def test_the_page_has_no_inline_script_or_style(upstream: Upstream, start_proxy) -> None:
    html = (PAGE / "index.html").read_text()
    script = (PAGE / "page.js").read_text()
    assert "<script>" not in html and "style=" not in html and " on" + "click=" not in html
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


async def test_history_starts_with_a_point_and_refuses_a_bad_since(upstream: Upstream, start_proxy) -> None:
    proxy = await start_proxy(upstream.url, candidate_url=upstream.url, mirror={"sample_rate": 1.0})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/shadow/history") as r:
            doc = await r.json()
        assert doc["interval_s"] == 5.0 and doc["capacity"] == 720
        assert len(doc["points"]) == 1  # taken when the admin port opened
        first = doc["points"][0]
        assert first["cumulative"]["mirror"]["sampled"] == 0
        async with s.get(proxy.admin_url + f"/shadow/history?since={first['t']}") as r:
            assert (await r.json())["points"] == []
        for bad in ("abc", "nan", "inf"):
            async with s.get(proxy.admin_url + f"/shadow/history?since={bad}") as r:
                assert r.status == 400, bad
                assert "since" in (await r.json())["error"]
        async with s.post(proxy.url + "/m", data=b"{}") as r:
            assert r.status == 200
    await proxy.settle()
    await proxy.proxy.history.tick()
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/shadow/history") as r:
        points = (await r.json())["points"]
    # Taken now (and by the 5 s timer, on a slow machine): the windows hold the one request once.
    assert [p["window"]["mirror"]["sampled"] for p in points][0] == 0
    assert sum(p["window"]["mirror"]["sampled"] for p in points) == 1
    assert sum(p["window"]["latency_ms"]["production"]["count"] for p in points) == 1
    assert points[-1]["cumulative"]["latency_ms"]["candidate"]["count"] == 1
