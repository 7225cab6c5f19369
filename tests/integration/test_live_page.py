"""The live page on the admin port, in a real headless Chromium driven by Selenium.

The proxies run as `serve` processes (the browser's calls block, so nothing the page reads may
run in the test's own thread), in front of the stand-in models or a small model server here.
Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`); without
them these tests skip, except in CI, where they must run.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import ROOT, free_port

selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "t0ken-for-the-page"
PREDICT = "/v1/models/demo:predict"
SCREENSHOT = ROOT / "docs" / "live-page.png"


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        reason = "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


# -- processes ---------------------------------------------------------------------------------

class Serving:
    """`shadowproxy serve` (with `--workers N` when given) on free ports."""

    def __init__(self, tmp: Path, production: str, candidate: str, *, token: str = "", extra: str = "",
                 workers: int = 0) -> None:
        self.listen_port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.listen_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        config = tmp / f"page-{self.admin_port}.toml"
        config.write_text(f"""
[listen]
host = "127.0.0.1"
port = {self.listen_port}
drain_timeout_s = 2.0
[admin]
host = "127.0.0.1"
port = {self.admin_port}
token = "{token}"
[production]
url = "{production}"
[candidate]
url = "{candidate}"
[mirror]
sample_rate = 1.0
{extra}""")
        args = [sys.executable, "-m", "shadowproxy", "serve", "--config", str(config)]
        if workers:
            args += ["--workers", str(workers)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening" in line, line

    def stats(self) -> dict[str, Any]:
        return dict(requests.get(self.admin + "/shadow/stats", timeout=10).json())

    def verdict(self) -> dict[str, Any]:
        return dict(requests.get(self.admin + "/shadow/verdict", timeout=10).json())

    def settled_stats(self) -> dict[str, Any]:
        """/shadow/stats once nothing is in flight and two reads a poll apart agree."""
        before = self.stats()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.stats()
            if now["mirror"]["in_flight"] == 0 and _figures(now) == _figures(before):
                return now
            before = now
        raise AssertionError("the stats did not settle")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _figures(stats: dict[str, Any]) -> tuple[Any, ...]:
    return (stats["mirror"], stats["comparisons"]["total"], stats["production"]["requests"])


def start_model(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "shadowproxy.models", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert " serving on " in line, line
    return proc, line.rsplit(" serving on ", 1)[1].strip()


class LabelModel:
    """A model answering every request with one label, in a thread of its own."""

    def __init__(self, label: str) -> None:
        body = json.dumps({"predictions": [label]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(url: str, n: int, *, gets: int = 0, seed: int = 1) -> None:
    rng = random.Random(seed)
    with requests.Session() as s:
        for _ in range(n):
            batch = [[round(rng.uniform(-3, 3), 3) for _ in range(4)] for _ in range(rng.randint(1, 3))]
            assert s.post(url + PREDICT, json={"instances": batch}, timeout=10).status_code == 200
        for _ in range(gets):  # not in mirror.methods: skipped, reason "method"
            s.get(url + "/v1/models/demo", timeout=10)


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[tuple[str, str]]:
    started = [start_model("--role", "production"), start_model("--role", "candidate")]
    yield started[0][1], started[1][1]
    for proc, _ in started:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture(scope="module")
def proxy(stand_ins: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    serving = Serving(tmp_path_factory.mktemp("page"), *stand_ins, token=TOKEN)
    yield serving
    serving.stop()


# -- reading the page --------------------------------------------------------------------------

def open_page(driver: webdriver.Chrome, admin: str) -> None:
    driver.get_log("browser")  # what earlier tests left
    driver.get_log("performance")
    driver.get(admin + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "verdict").get_attribute("data-verdict"))


def page_figures(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows, read back from its elements."""
    return dict(driver.execute_script("""
        const n = (sel) => { const e = document.querySelector(sel); return e ? Number(e.dataset.value) : null; };
        const out = {verdict: document.getElementById('verdict').dataset.verdict, stages: {}, reasons: {}, gates: {}};
        for (const s of document.querySelectorAll('#funnel [data-stage]'))
            out.stages[s.dataset.stage] = Number(s.querySelector('.n').dataset.value);
        for (const r of document.querySelectorAll('#reasons [data-reason]'))
            out.reasons[r.dataset.reason] = Number(r.querySelector('.n').dataset.value);
        for (const g of document.querySelectorAll('#gates [data-gate]'))
            out.gates[g.dataset.gate] = {
                value: JSON.parse(g.querySelector('.value').dataset.value),
                threshold: JSON.parse(g.querySelector('.threshold').dataset.value),
                passed: g.dataset.passed, reason: g.querySelector('.reason').textContent};
        return out;
    """))


def expected_figures(stats: dict[str, Any], verdict: dict[str, Any]) -> dict[str, Any]:
    """The same figures, computed here from the API's JSON."""
    m = stats["mirror"]
    reasons = {f"{block}.{reason}": n for block in ("skipped_by_reason", "dropped_by_reason", "errors_by_kind")
               for reason, n in m[block].items()}
    return {
        "verdict": verdict["verdict"],
        "stages": {"sampled": m["sampled"], "sent": m["sent"], "answered": m["sent"] - m["error"],
                   "compared": stats["comparisons"]["total"]},
        "reasons": reasons,
        "gates": {g["name"]: {"value": g["value"], "threshold": g["threshold"], "passed": str(g["passed"]).lower()
                              if g["passed"] is not None else "null", "reason": g["reason"]}
                  for g in verdict["gates"]},
    }


def console_errors(driver: webdriver.Chrome, allowed: Callable[[str], bool] = lambda m: False) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and not allowed(e["message"])]


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def set_viewport(driver: webdriver.Chrome, width: int, height: int, mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def sideways(driver: webdriver.Chrome) -> dict[str, Any]:
    return dict(driver.execute_script("""
        const w = document.documentElement.clientWidth;
        const over = [];
        for (const e of document.querySelectorAll('body *')) {
            const r = e.getBoundingClientRect();
            if (r.width > 0 && (r.right > w + 0.5 || r.left < -0.5))
                over.push(e.tagName + '#' + e.id + '.' + e.getAttribute('class') + ' ' + r.left + '..' + r.right);
        }
        return {scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth, width: w,
                over: over.slice(0, 10)};
    """))


# -- the tests ---------------------------------------------------------------------------------

def test_page_loads_without_console_errors_and_shows_the_api_figures(
    browser: webdriver.Chrome, proxy: Serving
) -> None:
    before = proxy.settled_stats()["mirror"]
    send(proxy.url, 300, gets=3)
    open_page(browser, proxy.admin)
    stats = proxy.settled_stats()
    want = expected_figures(stats, proxy.verdict())
    WebDriverWait(browser, 3).until(lambda d: page_figures(d) == want)
    assert want["stages"]["sampled"] == before["sampled"] + 303
    assert want["reasons"]["skipped_by_reason.method"] == before["skipped_by_reason"]["method"] + 3
    assert console_errors(browser) == []
    assert browser.find_element(By.ID, "alert").is_displayed()  # copies never compared
    skipped, sampled = stats["mirror"]["skipped"], stats["mirror"]["sampled"]
    assert f"{skipped:,} of {sampled:,} sampled copies" in browser.find_element(By.ID, "alert").text


def test_figures_follow_new_traffic_within_3_s_without_a_reload(browser: webdriver.Chrome, proxy: Serving) -> None:
    open_page(browser, proxy.admin)
    before = proxy.settled_stats()
    WebDriverWait(browser, 3).until(lambda d: page_figures(d)["stages"]["sampled"] == before["mirror"]["sampled"])
    marker = browser.execute_script("window.__same_document = 1; return 1;")
    send(proxy.url, 40, seed=2)
    sent_at = time.monotonic()
    target = before["mirror"]["sampled"] + 40
    WebDriverWait(browser, 3).until(lambda d: page_figures(d)["stages"]["sampled"] == target)
    assert time.monotonic() - sent_at <= 3.0
    assert browser.execute_script("return window.__same_document;") == marker  # no reload happened
    stats = proxy.settled_stats()
    want = expected_figures(stats, proxy.verdict())
    WebDriverWait(browser, 3).until(lambda d: page_figures(d) == want)


def test_history_feeds_the_charts(browser: webdriver.Chrome, proxy: Serving) -> None:
    doc = requests.get(proxy.admin + "/shadow/history", timeout=5).json()
    assert doc["interval_s"] == 5 and doc["capacity"] == 720
    deadline = time.monotonic() + 12
    while len(doc["points"]) < 2 and time.monotonic() < deadline:
        time.sleep(1)
        doc = requests.get(proxy.admin + "/shadow/history", timeout=5).json()
    points = doc["points"]
    assert len(points) >= 2
    last = points[-1]["cumulative"]
    stats = proxy.stats()
    assert last["agree"] + last["disagree"] <= stats["comparisons"]["total"]
    # The windows add up to the cumulative figures.
    assert sum(p["window"]["agree"] for p in points) == last["agree"]
    assert sum(p["window"]["mirror"]["sampled"] for p in points) == last["mirror"]["sampled"]
    since = requests.get(proxy.admin + f"/shadow/history?since={points[-2]['t']}", timeout=5).json()
    assert [p["t"] for p in since["points"]][:1] == [points[-1]["t"]]
    open_page(browser, proxy.admin)
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#latency-chart svg path"))
    browser.find_element(By.ID, "view-cumulative").click()
    assert browser.find_element(By.ID, "view-cumulative").get_attribute("aria-pressed") == "true"
    paths = browser.find_elements(By.CSS_SELECTOR, "#disagreement-chart svg .band.s-cum")
    assert paths, "the disagreement chart draws its 95% band"
    browser.find_element(By.ID, "view-window").click()
    assert console_errors(browser) == []


def test_sample_rate_change_needs_the_token(browser: webdriver.Chrome, proxy: Serving) -> None:
    open_page(browser, proxy.admin)
    rate = browser.find_element(By.ID, "rate-input")
    rate.clear()
    rate.send_keys("0.5")
    browser.find_element(By.ID, "rate-apply").click()
    WebDriverWait(browser, 3).until(lambda d: "401" in d.find_element(By.ID, "rate-message").text)
    assert requests.get(proxy.admin + "/shadow/sample_rate", timeout=5).json() == {"sample_rate": 1.0}

    browser.find_element(By.ID, "token-input").send_keys(TOKEN)
    rate.clear()
    rate.send_keys("0.5")
    browser.find_element(By.ID, "rate-apply").click()
    WebDriverWait(browser, 3).until(lambda d: "Applied" in d.find_element(By.ID, "rate-message").text)
    assert requests.get(proxy.admin + "/shadow/sample_rate", timeout=5).json() == {"sample_rate": 0.5}
    assert browser.execute_script("return [sessionStorage.length, localStorage.length, document.cookie];") == [
        1, 0, ""]
    # Back to every request, through the page, with the token it kept for this tab.
    rate.clear()
    rate.send_keys("1")
    browser.find_element(By.ID, "rate-apply").click()
    WebDriverWait(browser, 3).until(
        lambda d: requests.get(proxy.admin + "/shadow/sample_rate", timeout=5).json() == {"sample_rate": 1.0})
    assert console_errors(browser, allowed=lambda m: "401" in m) == []


@pytest.mark.parametrize(("width", "height", "mobile"), [(1280, 800, False), (390, 844, True)])
def test_nothing_scrolls_sideways(browser: webdriver.Chrome, proxy: Serving, width: int, height: int,
                                  mobile: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    set_viewport(browser, width, height, mobile)
    try:
        open_page(browser, proxy.admin)
        WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reasons table"))
        seen = sideways(browser)
        assert seen["scroll"] <= seen["width"] and seen["over"] == [], seen
        path = tmp_path_factory.mktemp("viewport") / f"live-page-{width}x{height}.png"
        browser.save_screenshot(str(path))
        print(f"\nthe page at {width}x{height}: {path}")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_every_request_stays_on_the_admin_origin_under_a_strict_csp(
    browser: webdriver.Chrome, proxy: Serving
) -> None:
    open_page(browser, proxy.admin)
    time.sleep(2.5)  # a few polls
    urls = requested_urls(browser)
    assert any(u.endswith("/shadow/stats") for u in urls)
    assert any(u.endswith("/page/page.js") for u in urls)
    assert [u for u in urls if not u.startswith(proxy.admin + "/")] == []
    page = requests.get(proxy.admin + "/", timeout=5)
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in page.text and 'src="/page/page.js"' in page.text  # no inline script


def test_screenshot_after_a_demo_run(browser: webdriver.Chrome, proxy: Serving,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    send(proxy.url, 500, seed=3)
    proxy.settled_stats()
    time.sleep(5.5)  # one more history point
    open_page(browser, proxy.admin)
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#latency-chart svg path"))
    height = int(browser.execute_script("return document.documentElement.scrollHeight;"))
    set_viewport(browser, 1280, height, False)
    try:
        time.sleep(1.2)
        path = tmp_path_factory.mktemp("screenshot") / "live-page.png"
        assert browser.save_screenshot(str(path))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"\nscreenshot of the live page: {path}")
    assert path.stat().st_size > 10_000
    if os.environ.get("SHADOWPROXY_UPDATE_SCREENSHOT") == "1":
        shutil.copy(path, SCREENSHOT)


def test_prediction_text_is_shown_as_text_never_as_html(
    browser: webdriver.Chrome, tmp_path_factory: pytest.TempPathFactory
) -> None:
    hostile = "<script>document.title='pwned'</script><img src=/x-injected onerror=\"document.title='pwned'\">"
    production, candidate = LabelModel("safe"), LabelModel(hostile)
    serving = Serving(tmp_path_factory.mktemp("xss"), production.url, candidate.url)
    try:
        with requests.Session() as s:
            for _ in range(5):
                s.post(serving.url + PREDICT, json={"instances": [[1, 2, 3, 4]]}, timeout=5)
        serving.settled_stats()
        open_page(browser, serving.admin)
        WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#confusion"))
        headers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#confusion thead th")]
        assert hostile in headers
        assert browser.find_elements(By.CSS_SELECTOR, "#confusion img, #confusion script") == []
        assert browser.title == "shadowproxy"
        assert not any("x-injected" in u for u in requested_urls(browser))
        # With no admin.token (loopback admin), the page changes the rate without one, as the API does.
        rate = browser.find_element(By.ID, "rate-input")
        rate.clear()
        rate.send_keys("0.25")
        browser.find_element(By.ID, "rate-apply").click()
        WebDriverWait(browser, 3).until(lambda d: "Applied" in d.find_element(By.ID, "rate-message").text)
        assert requests.get(serving.admin + "/shadow/sample_rate", timeout=5).json() == {"sample_rate": 0.25}
        assert console_errors(browser) == []
    finally:
        serving.stop()
        production.close()
        candidate.close()


def test_drift_status_appears_with_a_drift_table(
    browser: webdriver.Chrome, stand_ins: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    serving = Serving(tmp_path_factory.mktemp("drift"), *stand_ins, extra="[drift]\nwarmup = 20\nwindow = 50\n")
    try:
        send(serving.url, 60, seed=6)
        open_page(browser, serving.admin)
        WebDriverWait(browser, 8).until(lambda d: d.find_element(By.ID, "drift-card").is_displayed())
        doc = requests.get(serving.admin + "/shadow/drift", timeout=5).json()
        WebDriverWait(browser, 8).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#drift tbody tr")) == len(doc["features"]) + 1)
        statuses = [row.find_elements(By.CSS_SELECTOR, "td")[0].text
                    for row in browser.find_elements(By.CSS_SELECTOR, "#drift tbody tr")]
        assert set(statuses) <= {"ok", "warn", "alert", "no_data"}
        assert console_errors(browser) == []
    finally:
        serving.stop()


def test_llm_figures_appear_under_the_openai_preset(
    browser: webdriver.Chrome, tmp_path_factory: pytest.TempPathFactory
) -> None:
    models = [start_model("--protocol", "openai", "--role", role, "--first-token-ms", "5", "--inter-token-ms", "1")
              for role in ("production", "candidate")]
    serving = Serving(tmp_path_factory.mktemp("llm"), models[0][1], models[1][1], extra='[compare]\npreset = "openai"')
    try:
        with requests.Session() as s:
            for i in range(6):
                body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "stream": i % 2 == 0}
                assert s.post(serving.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        stats = serving.settled_stats()
        answers = stats["llm"]["production"]["answers"]
        assert answers == 6
        open_page(browser, serving.admin)
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "llm-card").is_displayed())
        rows = {row.find_element(By.CSS_SELECTOR, "th").text: [c.text for c in row.find_elements(By.CSS_SELECTOR, "td")]
                for row in browser.find_elements(By.CSS_SELECTOR, "#llm table:first-of-type tbody tr")}
        assert rows["answers"] == [str(answers), str(stats["llm"]["candidate"]["answers"])]
        assert rows["streams"][0] == str(stats["llm"]["production"]["streams"])
        assert console_errors(browser) == []
    finally:
        serving.stop()
        for proc, _ in models:
            proc.terminate()
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()


class CannedAdmin:
    """The page's own files, and fixed API answers: for blocks other features add to the stats."""

    def __init__(self, stats: dict[str, Any]) -> None:
        from shadowproxy.config import parse_config
        from shadowproxy.judging.verdict import evaluate

        page = ROOT / "shadowproxy" / "control" / "page"
        types = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
        gates = parse_config({"production": {"url": "http://127.0.0.1:1"},
                              "candidate": {"url": "http://127.0.0.1:2"}}).gates
        answers: dict[str, tuple[str, bytes]] = {
            "/shadow/stats": ("application/json", json.dumps(stats).encode()),
            "/shadow/verdict": ("application/json", json.dumps(evaluate(stats, gates)).encode()),
            "/shadow/sample_rate": ("application/json", b'{"sample_rate": 0.1}'),
            "/shadow/history": ("application/json", b'{"interval_s": 5.0, "capacity": 720, "points": []}'),
            "/page/features.json": ("application/json", b'{"drift": false}'),
            "/": ("text/html", (page / "index.html").read_bytes()),
        }
        for file in page.iterdir():
            answers[f"/page/{file.name}"] = (types[file.suffix[1:]], file.read_bytes())

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                kind, body = answers.get(self.path.split("?")[0], ("text/plain", b""))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_candidates_block_gets_one_column_per_candidate_and_a_judge_block_its_table(
    browser: webdriver.Chrome
) -> None:
    from shadowproxy.judging.stats import ShadowStats

    stats = ShadowStats().snapshot()
    stats["candidates"] = {
        "v2": {"candidate": {"requests": 120, "errors": 1}, "comparisons": {"disagreement_rate": 0.05}},
        "<i>v3</i>": {"candidate": {"requests": 80, "errors": 0}, "comparisons": {"disagreement_rate": 0.01}},
    }
    stats["judge"] = {"judged": 42, "candidate_better": 0.4, "win_rate_ci95": [0.3, 0.5]}
    canned = CannedAdmin(stats)
    try:
        open_page(browser, canned.url)
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "candidates-card").is_displayed())
        head = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#candidates thead th")]
        assert head == ["", "v2", "<i>v3</i>"]
        rows = {row.find_element(By.CSS_SELECTOR, "th").text: [c.text for c in row.find_elements(By.CSS_SELECTOR, "td")]
                for row in browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")}
        assert rows["candidate.requests"] == ["120", "80"]
        assert rows["comparisons.disagreement_rate"] == ["0.05", "0.01"]
        judge = {row.find_element(By.CSS_SELECTOR, "th").text: row.find_element(By.CSS_SELECTOR, "td").text
                 for row in browser.find_elements(By.CSS_SELECTOR, "#judge tbody tr")}
        assert judge == {"judged": "42", "candidate_better": "0.4", "win_rate_ci95": "[0.3, 0.5]"}
        assert browser.find_elements(By.CSS_SELECTOR, "#candidates i") == []
        assert console_errors(browser) == []
    finally:
        canned.close()


def test_workers_page_shows_the_merged_state(
    browser: webdriver.Chrome, stand_ins: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    serving = Serving(tmp_path_factory.mktemp("workers"), *stand_ins, workers=2)
    try:
        send(serving.url, 60)
        open_page(browser, serving.admin)
        stats = serving.settled_stats()
        assert len(stats["workers"]) == 2
        WebDriverWait(browser, 8).until(lambda d: page_figures(d) == expected_figures(stats, serving.verdict()))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2
        send(serving.url, 30, seed=4)
        sent_at = time.monotonic()
        target = stats["mirror"]["sampled"] + 30
        WebDriverWait(browser, 8).until(lambda d: page_figures(d)["stages"]["sampled"] == target)
        assert time.monotonic() - sent_at <= 8.0
        # The supervisor keeps the history from the merged state.
        deadline = time.monotonic() + 12
        doc: dict[str, Any] = {"points": []}
        while time.monotonic() < deadline:
            doc = requests.get(serving.admin + "/shadow/history", timeout=5).json()
            if doc["points"] and doc["points"][-1]["cumulative"]["mirror"]["sampled"] == target:
                break
            time.sleep(1)
        assert doc["points"][-1]["cumulative"]["mirror"]["sampled"] == target
        assert console_errors(browser) == []
    finally:
        serving.stop()


def test_a_fields_block_lists_the_fields_that_differ_most_by_share(browser: webdriver.Chrome) -> None:
    from shadowproxy.judging.stats import ShadowStats

    stats = ShadowStats().snapshot()
    stats["fields"] = {
        "/predictions/*": {"compared": 200, "differ": 20, "noise_compared": 0, "noise_differ": 0, "noisy": False},
        "/created": {"compared": 200, "differ": 200, "noise_compared": 200, "noise_differ": 200, "noisy": True},
        "/<b>model</b>": {"compared": 50, "differ": 10, "noise_compared": 0, "noise_differ": 0, "noisy": False},
        "/same": {"compared": 200, "differ": 0, "noise_compared": 0, "noise_differ": 0, "noisy": False},
    }
    canned = CannedAdmin(stats)
    try:
        open_page(browser, canned.url)
        xpath = "//h3[text()='Fields that differ most']/following-sibling::table[1]//tbody/tr"
        WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.XPATH, xpath))
        rows = [[c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
                for row in browser.find_elements(By.XPATH, xpath)]
        # By the share that differs (200/200, 10/50, 20/200); a field that never differs is left out.
        assert [row[0] for row in rows] == ["/created", "/<b>model</b>", "/predictions/*"]
        assert rows[0][1:] == ["200", "200", "100%", "yes"]
        assert rows[1][3:] == ["20%", "no"]
        assert console_errors(browser) == []
    finally:
        canned.close()
