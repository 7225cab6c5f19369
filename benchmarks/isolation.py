"""Isolation: does a misbehaving candidate reach production's clients? One table from one run.

    python benchmarks/isolation.py [--reps 3] [--requests 5000] [--soak-s 60] [--quick]

A fast production stand-in (nginx when installed, else the python stand-in) and four candidates,
all python stand-ins running side by side: healthy, slow (answers after 300 ms), black hole (accepts
and reads, never answers) and refusing (a closed port). One shadowproxy per candidate mode, every
request mirrored (`mirror.sample_rate = 1.0`, all else default), open-loop load at a fixed rate
(`hey -n N -c 10 -q 50`, 500 requests/s) after a 2 s warm-up at the same rate. Every setup is started
once per repetition, the order rotates, figures are medians.

Columns: production p50 / p99 as the client sees them, p99 ÷ the healthy row's p99, failed production
requests (non-2xx and errors), the mirror counts of the measured run from the proxy's /shadow/stats
(sent / dropped / error), what the candidate stand-in received in that run (the work was done), and
the proxy's RSS after the run. With nginx installed, nginx's `mirror` module at 100% in front of the
same slow candidate is a reference row: it holds every request until its mirror subrequest is done.

Memory: a proxy in front of the black hole under the same load for `--soak-s` seconds; its RSS at
10 s against the end must stay within 20 MiB, and under 150 MiB.

Targets (printed as met / not met): production p99 under every faulty candidate <= 1.10 x the healthy
p99; zero failed production requests; RSS flat. Exit 0: everything ran and every target was met;
1: a setup failed; 4: everything ran, a target was not met.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

CONC, PER_WORKER = 10, 50  # hey -c 10 -q 50: 500 requests/s in total
SLOW_MS = 300.0
P99_RATIO_MAX = 1.10
RSS_GROWTH_MAX_MIB = 20.0
RSS_MAX_MIB = 150.0
RSS_FIRST_AT_S = 10.0
# The same for every row: a short drain, so stopping a proxy that waits on a black hole takes 1 s.
PROXY_EXTRA = {"listen": {"drain_timeout_s": 1.0}}


class Candidate:
    """A candidate stand-in (`standin.py`) on a free port that logs one line per request received."""

    def __init__(self, mode: str, delay_ms: float = 0.0) -> None:
        self.mode = mode
        self.port = h.free_port()
        self.log_path = h.workdir() / f"candidate-{mode}-{self.port}.log"
        argv = [h.PYTHON, str(h.HERE / "standin.py"), "--port", str(self.port), "--model-version", "v2",
                "--body", h.CAND_ANSWER, "--log", str(self.log_path), "--flush-s", "0.2"]
        if delay_ms:
            argv += ["--delay-ms", str(delay_ms)]
        if mode == "blackhole":
            argv += ["--blackhole"]
        self.proc: h.Proc | None = h.Proc(argv, f"candidate-{mode}")
        h.wait_for_port(self.port, proc=self.proc)

    @property
    def url(self) -> str:
        return f"http://{h.HOST}:{self.port}"

    def count(self, settle: float = 0.3, timeout: float = 3.0) -> int:
        """Requests received so far: flush the stand-in's log, count its lines until they hold."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            time.sleep(settle)
            try:
                n = self.log_path.read_bytes().count(b"\n")
            except FileNotFoundError:
                n = 0
            if n == last or time.monotonic() > deadline:
                return n
            last = n

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class Refusing:
    """A candidate nobody listens to: connections are refused. Receives nothing."""

    mode = "refusing"

    def __init__(self) -> None:
        self.url = f"http://{h.HOST}:{h.free_port()}"

    def count(self) -> int:
        return 0

    def stop(self) -> None:
        pass


def mirror_counts(setup: h.Setup) -> dict[str, int]:
    stats = setup.stats() if isinstance(setup, h.ShadowproxySetup) else None
    m = (stats or {}).get("mirror", {})
    # "mirror_" keys: a bare "error" key marks a failed repetition in harness.medians.
    return {f"mirror_{k}": int(m.get(k, 0)) for k in ("sent", "dropped", "error")}


def mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024.0


def soak(prod_url: str, blackhole_url: str, seconds: float) -> dict[str, Any]:
    """A proxy in front of the black hole under the open-loop load for `seconds`; RSS over time."""
    setup = h.ShadowproxySetup("soak-blackhole", prod_url, blackhole_url, 1.0, extra=PROXY_EXTRA)
    url = setup.start()
    samples: list[tuple[float, int]] = []
    result: dict[str, Any] = {}
    try:
        n = int(seconds * CONC * PER_WORKER)
        done = threading.Event()
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                box["hey"] = h.hey(url, n, CONC, PER_WORKER)
            except BaseException as e:  # reported below
                box["error"] = e
            finally:
                done.set()

        t0 = time.monotonic()
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        while not done.wait(1.0):
            samples.append((time.monotonic() - t0, setup.rss_kb()))
        samples.append((time.monotonic() - t0, setup.rss_kb()))
        thread.join()
        if "error" in box:
            raise box["error"]
        r: h.HeyResult = box["hey"]
        at_first = next((kb for t, kb in samples if t >= RSS_FIRST_AT_S), samples[0][1])
        result = {"seconds": samples[-1][0], "rss_first_kib": at_first, "rss_end_kib": samples[-1][1],
                  "rss_peak_kib": max(kb for _, kb in samples), "failed": r.failed, "requests": r.total,
                  "p99_ms": r.p99_ms, **mirror_counts(setup)}
    finally:
        setup.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="production latency behind faulty candidates, and memory")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--requests", type=int, default=5000, help="hey -n per measured run (default 5000: 10 s)")
    p.add_argument("--soak-s", type=float, default=60.0, help="black-hole memory check length (default 60)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load per run (default 2)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s runs, 20 s soak (~1 minute)")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto",
                   help="production stand-in: nginx (default when installed) or the python stand-in")
    p.add_argument("--no-nginx", action="store_true", help="leave out the nginx mirror reference row")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.requests, args.soak_s, args.warmup = 1, 1500, 20.0, 1.0
    if not h.have("hey"):
        print("hey is not installed: apt-get install -y hey", file=sys.stderr)
        return 2
    rate = CONC * PER_WORKER

    candidates: dict[str, Any] = {}
    # Models with a "refusing" candidate is production alone; our candidates run beside it.
    with h.Models(backend=args.backend, candidate="refusing") as models:
        try:
            candidates["healthy"] = Candidate("healthy")
            candidates["slow"] = Candidate("slow", SLOW_MS)
            candidates["blackhole"] = Candidate("blackhole")
            candidates["refusing"] = Refusing()
            labels = {"healthy": "healthy", "slow": f"slow ({SLOW_MS:.0f} ms)",
                      "blackhole": "black hole", "refusing": "refusing (closed port)"}
            setups: list[h.Setup] = []
            owner: dict[str, Any] = {}
            for mode, cand in candidates.items():
                sp = h.ShadowproxySetup(labels[mode], models.prod_url, cand.url, 1.0, extra=PROXY_EXTRA)
                setups.append(sp)
                owner[sp.name] = cand
            nginx_name = None
            if h.have("nginx") and not args.no_nginx:
                nginx_name = f"nginx mirror 100%, slow ({SLOW_MS:.0f} ms)"
                setups.append(h.NginxProxySetup(nginx_name, models.prod_url, candidates["slow"].url,
                                                mirror_rate=1.0))
                owner[nginx_name] = candidates["slow"]
            else:
                h.log("nginx not installed (or --no-nginx): no nginx reference row")

            def measure(setup: h.Setup, url: str) -> dict[str, Any]:
                cand = owner[setup.name]
                n, warm = args.requests, args.warmup
                if isinstance(setup, h.NginxProxySetup):
                    # nginx holds each request for the candidate's 300 ms: 10 workers make ~33/s, so
                    # a short run (about 12 s) shows it; warm-up one request per worker.
                    n, warm = min(n, 400), 0.0
                    h.hey(url, CONC, CONC, PER_WORKER)
                if warm > 0:
                    h.hey(url, max(CONC, int(warm * rate)), CONC, PER_WORKER)
                before, got0 = mirror_counts(setup), cand.count()
                r = h.hey(url, n, CONC, PER_WORKER)
                after, got1 = mirror_counts(setup), cand.count()
                out: dict[str, Any] = {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "failed": r.failed,
                                       "requests": r.total, "rps": r.rps, "candidate_got": got1 - got0,
                                       "rss_kib": setup.rss_kb()}
                if isinstance(setup, h.ShadowproxySetup):
                    out.update({k: after[k] - before[k] for k in after})
                return out

            h.log(h.machine_summary())
            h.log(f"production: {models.backend} stand-in; reps {args.reps}; {args.requests} requests at "
                  f"{rate}/s per run (+{args.warmup:g} s warm-up); soak {args.soak_s:g} s")
            med = h.medians(h.run_interleaved(setups, measure, reps=args.reps))
            h.log(f"soak: black hole, {args.soak_s:g} s at {rate}/s")
            try:
                mem = soak(models.prod_url, candidates["blackhole"].url, args.soak_s)
            except h.BenchError as e:
                h.log(f"soak failed: {e}")
                mem = {"error": str(e).splitlines()[0]}
        finally:
            for cand in candidates.values():
                cand.stop()

    healthy_p99 = med[setups[0].name].get("p99_ms")
    print()
    print(f"# {h.machine_summary()}")
    print(f"# production: {models.backend} stand-in; candidates: python stand-ins; "
          f"medians of {args.reps} interleaved repetition(s)")
    print()
    rows = []
    for s in setups:
        m = med[s.name]
        is_sp = isinstance(s, h.ShadowproxySetup)
        rows.append([s.name, h.fmt(m.get("p50_ms"), 1), h.fmt(m.get("p99_ms"), 1),
                     h.fmt(h.ratio(m.get("p99_ms"), healthy_p99), 2), h.fmt(m.get("failed"), 0),
                     h.fmt(m.get("mirror_sent"), 0) if is_sp else "—",
                     h.fmt(m.get("mirror_dropped"), 0) if is_sp else "—",
                     h.fmt(m.get("mirror_error"), 0) if is_sp else "—", h.fmt(m.get("candidate_got"), 0),
                     h.fmt(mib(m.get("rss_kib")), 1)])
    title = (f"Open loop: hey -n {args.requests} -c {CONC} -q {PER_WORKER} ({rate} requests/s), "
             "sample_rate 1.0; hey rounds to 0.1 ms")
    if nginx_name:
        title += f"; the nginx row ran {min(args.requests, 400)} requests"
    print(h.format_table(
        ["candidate", "prod p50 ms", "prod p99 ms", "p99 ÷ healthy", "failed", "sent", "dropped", "error",
         "candidate got", "proxy RSS MiB"], rows, title=title))

    print()
    if "error" in mem:
        print(f"Memory ({args.soak_s:g} s against the black hole): failed: {mem['error']}")
    else:
        print(f"Memory ({mem['seconds']:.0f} s against the black hole at {rate}/s, {mem['requests']} requests, "
              f"{mem['failed']} failed, p99 {h.fmt(mem['p99_ms'], 1)} ms; mirror sent {mem['mirror_sent']}, "
              f"dropped {mem['mirror_dropped']}, error {mem['mirror_error']}): RSS at {RSS_FIRST_AT_S:.0f} s "
              f"{mib(mem['rss_first_kib']):.1f} MiB, at the end {mib(mem['rss_end_kib']):.1f} MiB, "
              f"peak {mib(mem['rss_peak_kib']):.1f} MiB")

    targets: list[tuple[str, bool | None]] = []
    for s in setups[1:4]:
        r = h.ratio(med[s.name].get("p99_ms"), healthy_p99)
        targets.append((f"production p99 with a {s.name} candidate <= {P99_RATIO_MAX:.2f} x healthy "
                        f"(got {h.fmt(r, 2)})", None if r is None else r <= P99_RATIO_MAX))
    failed = [med[s.name].get("failed") for s in setups[:4]]
    total_failed = sum(f for f in failed if f is not None) + (mem.get("failed") or 0)
    targets.append((f"zero failed production requests (got {total_failed:.0f})",
                    None if None in failed else total_failed == 0))
    if "error" in mem:
        targets.append(("RSS flat against the black hole", None))
    else:
        growth = mib(mem["rss_end_kib"] - mem["rss_first_kib"]) or 0.0
        end = mib(mem["rss_end_kib"]) or 0.0
        targets.append((f"RSS flat: end - {RSS_FIRST_AT_S:.0f} s within {RSS_GROWTH_MAX_MIB:.0f} MiB "
                        f"(got {growth:+.1f}) and under {RSS_MAX_MIB:.0f} MiB (got {end:.1f})",
                        abs(growth) <= RSS_GROWTH_MAX_MIB and end < RSS_MAX_MIB))
    print()
    print("Targets:")
    for text, ok in targets:
        print(f"  {'met    ' if ok else 'NOT MET' if ok is False else 'unknown'}  {text}")

    if h.print_failures(med) or "error" in mem:
        return 1
    return 0 if all(ok for _, ok in targets) else 4


if __name__ == "__main__":
    h.run_main(main)
