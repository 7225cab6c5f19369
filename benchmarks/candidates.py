"""Proxy CPU per request with 0, 1 and 3 candidates and with 32 slices, at a fixed open-loop rate.

    python benchmarks/candidates.py [--reps 3] [--duration 5] [--rate 2000] [--quick]

Rows, every one at mirror.sample_rate 1.0 except the first: `0 candidates` (sample rate 0: the
plain proxy), `1 candidate` ([candidate]), `3 candidates` ([[candidates]], three tables on the
same stand-in), `1 candidate, 32 slices` (32 [[slices]] by path prefix, none matching: the worst
case, every request in `other`). Each runs `hey` at `--rate` requests/s in total (10 workers)
after a 2 s warm-up at the same rate; the figure is the user + system CPU of the proxy's process
per request. The work is checked: the candidate stand-in counts what it received, which must be
the requests times the candidates. Targets: each extra candidate costs no more than the first,
(c3 - c1) / 2 <= c1 - c0; and 32 slices add at most 0.5 us per request. Every setup is started once
per repetition, the order rotates, figures are medians. Exit 0 when every setup ran and every
target was met, 4 when a target was missed, 1 when a setup failed, 2 without hey.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

CLIENTS = 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="proxy CPU per request by number of candidates and slices")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (default 5)")
    p.add_argument("--rate", type=float, default=2000.0, help="requests/s in total (default 2000)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s runs")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 3.0
    if not h.have("hey"):
        print("hey is not installed: apt-get install -y nginx wrk hey", file=sys.stderr)
        return 2
    n = int(args.rate * args.duration)

    with h.Models(backend=args.backend) as models:
        cand = models.cand_url
        three = [{"name": f"c{i}", "url": cand} for i in range(3)]
        slices = [{"name": f"s{i}", "path_prefix": f"/v2/models/s{i}"} for i in range(32)]
        setups: dict[str, tuple[h.ShadowproxySetup, int]] = {
            "0 candidates": (h.ShadowproxySetup("0 candidates", models.prod_url, cand, 0.0), 0),
            "1 candidate": (h.ShadowproxySetup("1 candidate", models.prod_url, cand, 1.0), 1),
            "3 candidates": (h.ShadowproxySetup("3 candidates", models.prod_url, cand, 1.0,
                                                extra={"candidates": three}), 3),
            "1 candidate, 32 slices": (h.ShadowproxySetup("1 candidate, 32 slices", models.prod_url, cand, 1.0,
                                                          extra={"slices": slices}), 1),
        }

        def measure(setup: h.Setup, url: str) -> dict[str, Any]:
            res = dict(h.open_loop(url, setup, n=n, c=CLIENTS, q=args.rate / CLIENTS, models=models))
            expected = setups[setup.name][1] * (res.get("requests") or 0)
            res["expected"] = float(expected)
            return res

        h.log(h.machine_summary())
        h.log(f"reps {args.reps}, open loop {args.rate:g} requests/s for {args.duration:g} s (+2 s warm-up)")
        results = h.run_interleaved([s for s, _ in setups.values()], measure, reps=args.reps)
        med = h.medians(results)

    print()
    print(f"# {h.machine_summary()}")
    print(f"# stand-in models: {models.backend}; medians of {args.reps} interleaved repetition(s)")
    print()
    rows = []
    for name in setups:
        m = med[name]
        rows.append([name, h.fmt(m.get("cpu_us"), 2), h.fmt(m.get("rps"), 0), h.fmt(m.get("p50_ms"), 2),
                     h.fmt(m.get("p99_ms"), 2), h.fmt(m.get("mirrored"), 0), h.fmt(m.get("expected"), 0),
                     h.fmt(m.get("failed"), 0)])
    print(h.format_table(
        ["setup", "CPU us/req", "requests/s", "p50 ms", "p99 ms", "candidates got", "expected", "failed"],
        rows, title=f"Open loop: hey -c {CLIENTS} at {args.rate:g} requests/s, sample_rate 1.0"))
    failed = h.print_failures(med)
    cpu = {name: med[name].get("cpu_us") for name in setups}
    missed = False
    if all(v is not None for v in cpu.values()):
        c0, c1, c3 = cpu["0 candidates"], cpu["1 candidate"], cpu["3 candidates"]
        first, extra = c1 - c0, (c3 - c1) / 2
        sliced = cpu["1 candidate, 32 slices"] - c1
        print()
        print(f"first candidate {first:.2f} us/req; each extra candidate {extra:.2f} us/req: "
              f"{'met' if extra <= first else 'NOT met'} (extra <= first)")
        print(f"32 slices {sliced:+.2f} us/req: {'met' if sliced <= 0.5 else 'NOT met'} (<= 0.5 us)")
        missed = extra > first or sliced > 0.5
    for name in setups:
        got, want = med[name].get("mirrored"), med[name].get("expected")
        if got is not None and want and abs(got - want) > 0.02 * want:
            print(f"! {name}: the candidates got {got:.0f} requests, expected {want:.0f}")
            missed = True
    return 1 if failed else 4 if missed else 0


if __name__ == "__main__":
    h.run_main(main)
