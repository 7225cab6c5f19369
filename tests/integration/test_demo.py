"""`shadowproxy demo` in a real process: it runs, reports, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

DEMO = [sys.executable, "-m", "shadowproxy", "demo"]


def assert_group_gone(what: str, pgid: int) -> None:
    """The demo runs in a session of its own: once it exited, nothing may remain in its group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"{what}: processes left in group {pgid}")


def demo_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DEMO, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_demo_prints_verdict_and_expected_next_to_measured_disagreement() -> None:
    process = demo_process("--requests", "600")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert_group_gone("demo", process.pid)
    assert re.search(r"^Verdict: (PASS|FAIL|INSUFFICIENT DATA)", out, re.MULTILINE)
    assert re.search(r"^  max_error_rate_delta .* \[-?\d+\.\d\d%, \d+\.\d\d%\] ", out, re.MULTILINE), out
    expected = re.search(r"expected disagreement (\d+\.\d\d)%", out)
    measured = re.search(r"measured disagreement (\d+\.\d\d)%", out)
    assert expected and measured, out
    assert "Traceback" not in err
    assert "demo: 600/600 requests" in err  # the progress display (plain lines: not a terminal)


def test_demo_json_measures_exactly_the_flips_it_built_in() -> None:
    process = demo_process("--requests", "600", "--flip-rate", "0.05", "--json")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert_group_gone("demo --json", process.pid)
    report = json.loads(out)
    assert report["verdict"] in ("pass", "fail", "insufficient_data")
    demo = report["demo"]
    assert demo["requests"] == 600 and demo["failed"] == 0
    assert report["stats"]["comparisons"]["total"] == demo["instances"]
    # The candidate flips a stable hash-chosen set of instances, every one of them mirrored.
    assert demo["measured_disagree"] == demo["expected_disagree"] > 0
    assert report["stats"]["mirror"]["sent"] == 600


def test_default_demo_ends_with_a_decided_verdict() -> None:
    # The candidate flips 3% of instances against the default 2% limit, and answers 2 ms later:
    # with the default traffic, the intervals are narrow enough to say "fail", not "not yet known".
    process = demo_process("--json")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    report = json.loads(out)
    assert report["verdict"] == "fail"
    gates = {g["name"]: g for g in report["gates"]}
    disagreement = gates["max_disagreement_rate"]
    assert disagreement["passed"] is False
    assert disagreement["interval"][0] > disagreement["threshold"]
    assert gates["max_error_rate_delta"]["passed"] is True
    # A slower candidate never passes; on a quiet machine its interval decides "fail" too.
    assert gates["max_p99_latency_ratio"]["passed"] is not True
    assert report["stats"]["mirror"]["sent"] == 10_000


def test_sigint_stops_the_demo_cleanly_with_exit_130() -> None:
    process = demo_process("--requests", "1000000")
    assert process.stderr is not None
    first = process.stderr.readline()  # printed once the models and the proxy listen
    assert first.startswith("demo: production model"), first
    time.sleep(0.3)  # traffic in flight
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    assert time.monotonic() - started < 10
    assert "Traceback" not in err
    assert "interrupted" in err
    assert_group_gone("interrupted demo", process.pid)


def test_bad_option_is_one_line_and_exit_2() -> None:
    process = demo_process("--flip-rate", "1.5")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().splitlines() == ["shadowproxy demo: --flip-rate: must be between 0 and 1, got 1.5"]


def test_llm_demo_reports_a_verdict_and_the_differences_it_built_in() -> None:
    process = demo_process("--llm", "--requests", "300")
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    assert_group_gone("demo --llm", process.pid)
    assert re.search(r"^Verdict: (PASS|FAIL|INSUFFICIENT DATA)", out, re.MULTILINE), out
    assert "Demo (LLM)" in out
    assert re.search(r"sent 300 requests in .*, 0 failed; answered: chat \d+, completions \d+, embeddings \d+, "
                     r"tool_call \d+; \d+ streamed", out), out
    assert re.search(r"expected disagreement \d+\.\d\d% \(\d+ of \d+ choices and vectors", out), out
    assert "Traceback" not in err
    assert err.startswith("demo: production LLM http://127.0.0.1:")
    assert "demo: 300/300 requests" in err


def test_llm_demo_json_sends_every_kind_of_request_and_mirrors_each() -> None:
    process = demo_process("--llm", "--requests", "300", "--json", "--seed", "3")
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    report = json.loads(out)
    assert report["verdict"] in ("pass", "fail", "insufficient_data")
    demo = report["demo"]
    assert demo["requests"] == 300 and demo["failed"] == 0 and demo["seed"] == 3
    assert set(demo["answered"]) == {"chat", "completions", "embeddings", "tool_call"}
    assert sum(demo["answered"].values()) == 300
    assert 0 < demo["streamed"] < 300
    assert demo["first_token_ms"] == {"production": 50.0, "candidate": 80.0}
    assert 0 < demo["expected_disagree"] < demo["items"]
    assert report["stats"]["mirror"]["sent"] == 300


def test_llm_demo_options_belong_to_their_mode() -> None:
    process = demo_process("--differ-rate", "0.1")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().splitlines() == ["shadowproxy demo: --differ-rate: only with --llm"]
    process = demo_process("--llm", "--flip-rate", "0.1", "--delay-ms", "3")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().splitlines() == [
        "shadowproxy demo: --flip-rate: not with --llm", "shadowproxy demo: --delay-ms: not with --llm",
    ]
    process = demo_process("--llm", "--differ-rate", "2")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().splitlines() == ["shadowproxy demo: --differ-rate: must be between 0 and 1, got 2.0"]


def test_llm_demo_measures_exactly_the_differences_it_built_in_streams_included() -> None:
    process = demo_process("--llm", "--requests", "400", "--differ-rate", "0.2", "--json")
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    report = json.loads(out)
    demo, comparisons = report["demo"], report["stats"]["comparisons"]
    assert demo["streamed"] > 100
    assert comparisons["unparseable"] == comparisons["candidate_error"] == 0
    assert comparisons["total"] == demo["items"]
    assert comparisons["disagree"] == demo["measured_disagree"] == demo["expected_disagree"] > 0
    llm = report["stats"]["llm"]
    assert llm["candidate"]["pairs"]["streamed"] == demo["streamed"]
    assert llm["candidate"]["ttft_ms"]["p50"] > llm["production"]["ttft_ms"]["p50"] + 20  # 80 ms against 50
    assert llm["production"]["cost_usd"]["total"] > llm["candidate"]["cost_usd"]["total"] > 0  # priced lower


def test_default_llm_demo_fails_on_disagreement_and_never_passes_the_slower_first_token() -> None:
    # 5% of prompts answered differently against the default 2% limit; the first token 80 ms
    # against 50, a ratio of 1.6 against the default 1.25, over more than min_samples streamed pairs.
    process = demo_process("--llm", "--json")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    report = json.loads(out)
    assert report["verdict"] == "fail"
    gates = {g["name"]: g for g in report["gates"]}
    disagreement = gates["max_disagreement_rate"]
    assert disagreement["passed"] is False and disagreement["interval"][0] > disagreement["threshold"]
    assert report["stats"]["llm"]["candidate"]["pairs"]["streamed"] >= 500
    assert gates["max_ttft_p99_ratio"]["passed"] is not True
    assert report["demo"]["requests"] == 1500
