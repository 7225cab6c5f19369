"""Throughput with drift monitoring at sample_rate 1.0 vs off (target: at most 10% cost).

    python benchmarks/drift.py [--reps 3] [--duration 6] [--quick] [--instances 1] [--features 4]

Rows: shadowproxy without a [drift] table (a plain proxy: mirror.sample_rate 0.0), and with
[drift] sample_rate 1.0 (every request's body parsed, its instances binned; baseline learned from the
first 1000 instances). Closed loop (wrk -t2 -c32) with the same POST body for both; every setup is
started once per repetition, the order rotates, figures are medians. The work is checked: the drift
row reports how many instances the monitor read (`watched`) and dropped during its run.
Exit 0 when every setup ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402


def body(instances: int, features: int) -> str:
    rows = [[round(0.5 + 0.01 * (i * features + k), 3) for k in range(features)] for i in range(instances)]
    return json.dumps({"instances": rows}, separators=(",", ":"))


def drift_doc(setup: h.ShadowproxySetup) -> dict[str, Any] | None:
    if not setup.admin_url:
        return None
    status, raw = h.http_get(f"{setup.admin_url}/shadow/drift", timeout=10.0)
    return json.loads(raw) if status == 200 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="shadowproxy throughput with drift monitoring on vs off")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run (default 6)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s runs")
    p.add_argument("--instances", type=int, default=1, help="instances per request (default 1)")
    p.add_argument("--features", type=int, default=4, help="features per instance (default 4)")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 3.0
    if not h.have("wrk"):
        print("wrk is not installed: apt-get install -y nginx wrk hey", file=sys.stderr)
        return 2
    payload = body(args.instances, args.features)
    answer = json.dumps({"predictions": [1] * args.instances, "model_version": "v1"}, separators=(",", ":"))

    with h.Models(backend=args.backend, prod_answer=answer) as models:
        off = h.ShadowproxySetup("drift off", models.prod_url, models.cand_url, 0.0)
        on = h.ShadowproxySetup("drift 1.0", models.prod_url, models.cand_url, 0.0,
                                extra={"drift": {"sample_rate": 1.0, "warmup": 1000, "window": 10000}})
        setups: list[h.Setup] = [off, on]

        def measure(setup: h.Setup, url: str) -> dict[str, float | None]:
            res = h.closed_loop(url, setup, duration=args.duration, models=models, body=payload)
            if isinstance(setup, h.ShadowproxySetup) and setup is on:
                doc = drift_doc(setup)  # also processes anything still queued
                res["watched"] = float(doc["watched"]) if doc else None
                res["drift_dropped"] = float(doc["dropped"]) if doc else None
            return res

        h.log(h.machine_summary())
        h.log(f"reps {args.reps}, closed loop {args.duration:g} s (+2 s warm-up), body {len(payload)} bytes")
        results = h.run_interleaved(setups, measure, reps=args.reps)
        med = h.medians(results)

    base = med[off.name].get("rps")
    print()
    print(f"# {h.machine_summary()}")
    print(f"# stand-in models: {models.backend}; medians of {args.reps} interleaved repetition(s)")
    print()
    rows = []
    for s in setups:
        m = med[s.name]
        rows.append(h.closed_loop_cells(s.name, m, results[s.name], base) + [
            h.fmt(m.get("errors"), 0), h.fmt(m.get("watched"), 0, na="—"),
            h.fmt(m.get("drift_dropped"), 0, na="—")])
    print(h.format_table(
        h.closed_loop_headers("÷ off") + ["errors", "instances watched", "drift dropped"],
        rows, title=f"Closed loop: wrk -t2 -c32 -d{args.duration:g}s, POST {len(payload)}-byte JSON "
                    f"({args.instances} instance(s) x {args.features} features)"))
    return 1 if h.print_failures(med) else 0


if __name__ == "__main__":
    h.run_main(main)
