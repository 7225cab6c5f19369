"""The audit store's cost: shadowproxy with `[store]` on vs off, mirror.sample_rate 0.1.

    python benchmarks/store.py [--reps 3] [--duration 6] [--quick] [--control]

Rows: "store off" (no [store] table) and "store on" ([store] path in the temp dir, sample_rate 0.1,
default flush interval 200 ms), both mirroring 10% to the candidate stand-in. Closed loop (wrk -t2
-c32) after a 2 s warm-up; setups start afresh each repetition, the order rotates, figures are
medians; each repetition's own on ÷ off is printed too. The work is checked: records written and
dropped are read from the store's own metrics before each stop, and the rows in the file are
counted at the end. Target: the store should cost at most 10% of requests/s. Exit 0 when
both setups ran, 1 otherwise.

`--control` adds a third row, "store off + writer process": the proxy with the store off while
`store_load.py` does the store's SQLite work (`database.Database` writing the same mix of records,
at `--control-rate` records a second) in a process of its own. What that row loses against
"store off" is what the SQLite work costs the proxy on the machine from anywhere; the rest of the
"store on" row's loss is the record path inside the proxy.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


class WriterElsewhere(h.ShadowproxySetup):
    """Store off, and the store's SQLite work in a process of its own (`store_load.py`)."""

    def __init__(self, name: str, prod_url: str, cand_url: str, db: Path, rate: float) -> None:
        super().__init__(name, prod_url, cand_url, 0.1)
        self.db = db
        self.rate = rate
        self.load: h.Proc | None = None

    def start(self) -> str:
        url = super().start()
        script = Path(__file__).resolve().parent / "store_load.py"
        self.load = h.Proc([h.PYTHON, str(script), "--path", str(self.db), "--rate", f"{self.rate:g}"],
                           "store-load")
        return url

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
            self.load = None
        super().stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="throughput with the audit store on vs off")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run (default 6)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s runs")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto")
    p.add_argument("--control", action="store_true",
                   help="add 'store off + writer process': the store's SQLite work in a process of its own")
    p.add_argument("--control-rate", type=float, default=50000.0,
                   help="records a second for --control (default 50000, the store's rate at ~45k requests/s)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 3.0
    if not h.have("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2

    db = h.workdir() / "audit.db"
    with h.Models(backend=args.backend) as models:
        off = h.ShadowproxySetup("store off", models.prod_url, models.cand_url, 0.1)
        on = h.ShadowproxySetup("store on", models.prod_url, models.cand_url, 0.1,
                                extra={"store": {"path": str(db), "sample_rate": 0.1}})
        setups: list[h.Setup] = [off, on]
        if args.control:
            setups.append(WriterElsewhere("store off + writer process", models.prod_url, models.cand_url,
                                          h.workdir() / "control.db", args.control_rate))

        def measure(setup: h.Setup, url: str) -> dict[str, Any]:
            res: dict[str, Any] = dict(h.closed_loop(url, setup, duration=args.duration, models=models,
                                                     threads_of=setup.pid))
            if setup is on and on.admin_url:
                _, body = h.http_get(f"{on.admin_url}/metrics")
                text = body.decode()
                res["written"] = _metric(text, "shadowproxy_store_written_total")
                res["dropped"] = _metric(text, "shadowproxy_store_dropped_total")
            return res

        h.log(h.machine_summary())
        results = h.run_interleaved(setups, measure, reps=args.reps)
        med = h.medians(results)

    rows_in_file = None
    if db.exists():
        with sqlite3.connect(db) as conn:
            rows_in_file = conn.execute(
                "SELECT (SELECT count(*) FROM requests) + (SELECT coalesce(sum(records), 0) FROM batches)"
            ).fetchone()[0]
        conn.close()

    base = med["store off"].get("rps")
    print()
    print(f"# {h.machine_summary()}")
    print(f"# stand-in models: {models.backend}; medians of {args.reps} interleaved repetition(s)")
    print()
    table = []
    for s in setups:
        m = med[s.name]
        table.append(h.closed_loop_cells(s.name, m, results[s.name], base) + [
            h.fmt(m.get("errors"), 0), h.fmt(m.get("mirrored_share"), 3),
            h.fmt(m.get("written"), 0, na="—"), h.fmt(m.get("dropped"), 0, na="—")])
    print(h.format_table(
        h.closed_loop_headers("÷ off") + ["errors", "mirrored share", "records written", "dropped"],
        table, title=f"Closed loop: wrk -t2 -c32 -d{args.duration:g}s, mirror.sample_rate 0.1, "
                     f"store.sample_rate 0.1"))
    if any(med[s.name].get("loop_cpu_us") is not None for s in setups):
        split = [[s.name] + [h.fmt(med[s.name].get(k), 2, na="—") for k in
                             ("loop_cpu_us", "loop_runq_us", "loop_sleep_us", "threads_cpu_us")]
                 + [h.fmt(1e6 / med[s.name]["rps"], 2) if med[s.name].get("rps") else "—"] for s in setups]
        print()
        print(h.format_table(
            ["setup", "on CPU", "waiting for a CPU", "asleep", "other threads' CPU", "µs per request at this rate"],
            split, title="The event loop's thread, µs per request (medians; /proc/PID/task/*/schedstat): "
                         "saturated, its on-CPU + waiting + asleep is the wall time a request costs"))
    ratio = h.ratio(med["store on"].get("rps"), base)
    if ratio is not None:
        verdict = "within" if ratio >= 0.9 else "OVER"
        print(f"\nstore cost: {(1 - ratio) * 100:.1f}% of requests/s ({verdict} the 10% target); "
              f"rows in the file after all runs: {rows_in_file}")
    for name in [s.name for s in setups[1:]]:
        paired = h.paired_ratios(results[name], results["store off"])
        if paired:
            print(h.paired_line(name, "store off", paired))
    return 1 if h.print_failures(med) else 0


if __name__ == "__main__":
    h.run_main(main)
