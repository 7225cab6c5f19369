"""Twin gates: how often do two identical models get each verdict? Counts from one series of runs.

    python benchmarks/twin_gates.py [--runs 20] [--requests 1000] [--threads 4] [--rate 250]

Each run starts two identical stand-in models (`python -m shadowproxy.models --role production`,
each in a process of its own) and `shadowproxy serve` in front of them with every request mirrored
(`mirror.sample_rate = 1.0`), `gates.min_samples = 300` and `gates.max_p99_latency_ratio = 3.0`;
sends `--requests` prediction requests from `--threads` threads (urllib, one request at a time
each), request i not before i / `--rate` seconds into the run; waits until every copy was answered
and counted; reads `/shadow/verdict`; and stops everything. Nothing is shared between runs.

`--rate 0` sends as fast as the threads can. The load generator then saturates the machine it
shares with the models, and the comparison is no longer one of twins: production sees at most
`--threads` requests at a time (each thread waits for its answer), while the mirror sends every
copy the moment production's request starts, whether or not the candidate has answered the
previous ones. When the candidate falls behind on a saturated machine, its copies queue (the
proxy opens up to `candidate.max_in_flight` connections to it) and its latency grows for the rest
of the run: a real difference the latency gate rightly reports, caused by the load, not the model.

Printed: one line per run (the verdict, the latency ratio with its 95% interval, and the gates that
did not pass), then the count of each verdict. The gates decide on 95% intervals, so a twin
candidate may be left at insufficient_data but should never be judged `fail`.

Exit 0: every run ended in pass or insufficient_data; 1: a setup failed; 4: some run said fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

GATES = {"min_samples": 300, "max_p99_latency_ratio": 3.0}
PREDICT = "/v1/models/demo:predict"


def start_model() -> tuple[h.Proc, str]:
    port = h.free_port()
    proc = h.Proc([h.PYTHON, "-m", "shadowproxy.models", "--port", str(port), "--role", "production"],
                  f"model-{port}", cwd=h.REPO)
    h.wait_for_http(f"http://{h.HOST}:{port}/healthz", 200, proc=proc)
    return proc, f"http://{h.HOST}:{port}"


def drive(url: str, requests: int, threads: int, rate: float) -> int:
    """`requests` POSTs from `threads` threads, request i not before i / rate s (rate 0: no
    pacing); the number that did not get a 200."""
    lock = threading.Lock()
    next_index = [0]
    failed = [0]
    started = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                return
            if rate > 0:
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            body = json.dumps({"instances": [[float(i % 7), float(i % 5), float(i % 3), 1.0]]}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                    ok = response.status == 200
            except OSError:
                ok = False
            if not ok:
                with lock:
                    failed[0] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return failed[0]


def settled_verdict(admin_url: str, requests: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _, body = h.http_get(f"{admin_url}/shadow/stats")
        mirror = json.loads(body)["mirror"]
        if mirror["sent"] + mirror["dropped"] + mirror["skipped"] >= requests and mirror["in_flight"] == 0:
            break
        if time.monotonic() > deadline:
            raise h.BenchError(f"mirror not settled after {timeout} s: {mirror}")
        time.sleep(0.1)
    time.sleep(1.1)  # the admin answers include everything answered more than 1 s earlier
    _, body = h.http_get(f"{admin_url}/shadow/verdict")
    return json.loads(body)  # type: ignore[no-any-return]


def one_run(requests: int, threads: int, rate: float) -> dict[str, Any]:
    production, production_url = start_model()
    candidate, candidate_url = start_model()
    proxy = h.ShadowproxySetup("twins", production_url, candidate_url, sample_rate=1.0, extra={"gates": GATES})
    try:
        url = proxy.start()
        assert proxy.admin_url is not None
        failed = drive(url + PREDICT, requests, threads, rate)
        verdict = settled_verdict(proxy.admin_url, requests)
        verdict["failed_requests"] = failed
        return verdict
    finally:
        proxy.stop()
        candidate.stop()
        production.stop()


def describe(run: int, verdict: dict[str, Any]) -> str:
    gates = {g["name"]: g for g in verdict["gates"]}
    latency = gates["max_p99_latency_ratio"]
    lower, upper = latency["interval"] or (None, None)
    interval = f"[{lower:.2f}, {'inf' if upper is None else f'{upper:.2f}'}]" if lower is not None else "-"
    value = "-" if latency["value"] is None else f"{latency['value']:.2f}"
    open_gates = [name for name, g in gates.items() if g["passed"] is not True]
    return (f"run {run:2d}: {verdict['verdict']:<17}  p99 ratio {value} {interval:<14}"
            f"  not passed: {', '.join(open_gates) or '-'}  failed requests {verdict['failed_requests']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=250.0, help="requests/s in total; 0: unpaced")
    args = parser.parse_args()
    h.install_signal_handlers()
    counts: Counter[str] = Counter()
    try:
        for run in range(1, args.runs + 1):
            verdict = one_run(args.requests, args.threads, args.rate)
            counts[verdict["verdict"]] += 1
            print(describe(run, verdict), flush=True)
    except h.BenchError as exc:
        print(f"twin_gates: {exc}", file=sys.stderr)
        return 1
    finally:
        h.stop_all()
    print()
    print(h.format_table(["verdict", "runs"], [[name, str(counts[name])]
                                                for name in ("pass", "insufficient_data", "fail")]))
    return 4 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
