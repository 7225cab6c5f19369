"""shadowproxy as a plain proxy, beside the stand-in hit directly and nginx as a plain proxy.

    python benchmarks/proxy.py [--reps 3] [--duration 6] [--quick]

Rows: direct (the stand-in model, the limit), shadowproxy (mirror.sample_rate 0.0, so a plain proxy;
its candidate URL points at the candidate stand-in, which must then receive nothing), nginx plain
proxy with 1 worker. One process each. Closed loop (wrk -t2 -c32) for throughput and CPU per request,
open loop (hey, 1000 requests/s) for added latency. Every setup is started once per repetition, the
order rotates, figures are medians. Exit 0 when every setup ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="shadowproxy as a plain proxy vs direct and nginx")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run (default 6)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s runs, 3000-request open loop")
    p.add_argument("--open-requests", type=int, default=10000, help="hey -n (default 10000)")
    p.add_argument("--no-open-loop", action="store_true", help="skip the 1000 requests/s block")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto",
                   help="stand-in models: nginx (default when installed) or the python stand-in")
    p.add_argument("--only", default="", help="comma-separated subset: direct,shadowproxy,nginx")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.open_requests = 1, 3.0, 3000
    conc, per_worker = 10, 100  # hey -c 10 -q 100: 1000 requests/s in total

    for tool in ("wrk", "hey"):
        if not h.have(tool):
            print(f"{tool} is not installed: apt-get install -y nginx wrk hey", file=sys.stderr)
            return 2

    rows_wanted = {"direct", "shadowproxy", "nginx"}
    if args.only:
        rows_wanted = {x.strip() for x in args.only.split(",") if x.strip()}

    with h.Models(backend=args.backend) as models:
        setups: list[h.Setup] = []
        if "direct" in rows_wanted:
            setups.append(h.DirectSetup("direct", models.prod_url))
        if "shadowproxy" in rows_wanted:
            setups.append(h.ShadowproxySetup("shadowproxy", models.prod_url, models.cand_url, 0.0))
        if "nginx" in rows_wanted:
            if h.have("nginx"):
                setups.append(h.NginxProxySetup("nginx proxy (1 worker)", models.prod_url))
            else:
                h.log("nginx is not installed: no nginx row")
        if not setups:
            p.error("nothing to run")

        def measure(setup: h.Setup, url: str) -> dict[str, float | None]:
            res = h.closed_loop(url, setup, duration=args.duration, models=models)
            if not args.no_open_loop:
                o = h.open_loop(url, setup, n=args.open_requests, c=conc, q=per_worker, models=models)
                res.update({f"open_{k}": v for k, v in o.items()})
            return res

        h.log(h.machine_summary())
        h.log(f"reps {args.reps}, closed loop {args.duration:g} s (+2 s warm-up), open loop "
              f"{'off' if args.no_open_loop else f'{args.open_requests} requests at {conc * per_worker}/s'}")
        results = h.run_interleaved(setups, measure, reps=args.reps)
        med = h.medians(results)

    names = [s.name for s in setups]
    nginx_name = next((s.name for s in setups if isinstance(s, h.NginxProxySetup)), None)
    nginx_rps = med[nginx_name].get("rps") if nginx_name else None

    print()
    print(f"# {h.machine_summary()}")
    print(f"# stand-in models: {models.backend}; medians of {args.reps} interleaved repetition(s)")
    print()
    rows = []
    for n in names:
        m = med[n]
        sp = h.spread(results[n], "rps")
        rng = f"{sp[0] / 1e3:.1f}k–{sp[1] / 1e3:.1f}k" if sp else "n/a"
        rows.append([n, h.fmt(m.get("rps"), 0), h.fmt(h.ratio(m.get("rps"), nginx_rps), 2), rng,
                     h.fmt(m.get("p50_ms"), 2), h.fmt(m.get("p99_ms"), 2),
                     h.fmt(m.get("cpu_us"), 1, na="—"), h.fmt(m.get("errors"), 0),
                     h.fmt(m.get("mirrored"), 0)])
    print(h.format_table(
        ["setup", "requests/s", "÷ nginx", "min–max", "p50 ms", "p99 ms", "CPU µs/req", "errors",
         "candidate got"],
        rows, title=f"Closed loop: wrk -t2 -c32 -d{args.duration:g}s, POST {len(h.BODY)}-byte JSON"))

    if not args.no_open_loop:
        direct = med.get("direct", {})
        rows = []
        for n in names:
            m = med[n]
            added50 = h.diff(m.get("open_p50_ms"), direct.get("open_p50_ms")) if n != "direct" else None
            added99 = h.diff(m.get("open_p99_ms"), direct.get("open_p99_ms")) if n != "direct" else None
            rows.append([n, h.fmt(m.get("open_p50_ms"), 1), h.fmt(m.get("open_p99_ms"), 1),
                         h.fmt(added50, 1, na="—", sign=True), h.fmt(added99, 1, na="—", sign=True),
                         h.fmt(m.get("open_cpu_us"), 1, na="—"), h.fmt(m.get("open_failed"), 0)])
        print()
        print(h.format_table(
            ["setup", "p50 ms", "p99 ms", "+p50 ms vs direct", "+p99 ms vs direct", "CPU µs/req",
             "non-2xx/errors"],
            rows, title=f"Open loop: hey -n {args.open_requests} -c {conc} -q {per_worker} "
                        f"({conc * per_worker} requests/s; hey rounds to 0.1 ms)"))

    failed = h.failures(med)
    spx = med.get("shadowproxy")
    notes = []
    if spx and spx.get("mirrored"):
        notes.append(f"shadowproxy at sample_rate 0.0 sent {spx['mirrored']:.0f} requests to the candidate")
    notes += h.failure_notes(failed)
    if notes:
        print()
        for line in notes:
            print(f"! {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
