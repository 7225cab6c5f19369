"""Builds side by side in one run: the way to judge a change on a noisy machine with few cores.

    python benchmarks/sidebyside.py --snapshot /tmp/exp/before     # copy the current build there
    ... change the code, `python setup.py build_ext --inplace` ...
    python benchmarks/sidebyside.py /tmp/exp/before . [--store | --drift] [--reps 6]

Each positional argument is a directory holding a build (`shadowproxy/`, `pyproject.toml` and
`shadowproxy__mypyc*.so`: what `--snapshot` copies; `.` is the working tree). Every build runs as
`python -m shadowproxy serve` from its own directory at mirror.sample_rate 0.1, closed loop (wrk
-t2 -c32) against the nginx stand-in models, the setups interleaved and rotated each repetition.
With `--store` each build runs with the audit store on (store.sample_rate 0.1, a file per build)
and a "store off" row of the first build is the base; `--drift` likewise with `[drift]` at
sample_rate 1.0 (as `drift.py`, mirroring off); without either the first build is the base.
Prints the medians (`harness.closed_loop_cells`), the event loop thread's split per request, and
each build's paired ratio against the base (same repetition, run back to back), which is the
figure to read: a shared machine drifts more between repetitions than most changes move it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

_BUILD = ("shadowproxy", "pyproject.toml")


def snapshot(target: Path) -> None:
    """Copy the working tree's build (sources and compiled modules) to `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in _BUILD:
        src = h.REPO / name
        if src.is_dir():
            shutil.copytree(src, target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target / name)
    for lib in h.REPO.glob("shadowproxy__mypyc*.so"):
        shutil.copy2(lib, target / lib.name)


def build_setup(name: str, build: Path, prod_url: str, cand_url: str, rate: float,
                extra: dict[str, dict[str, Any]] | None = None) -> h.ShadowproxySetup:
    """shadowproxy started from a build directory, its own sources first on sys.path."""
    return h.ShadowproxySetup(name, prod_url, cand_url, rate, extra=extra, cwd=build,
                              env={"PYTHONPATH": str(build)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="builds side by side, interleaved, paired ratios")
    p.add_argument("builds", nargs="*", type=Path, help="build directories ('.' is the working tree)")
    p.add_argument("--snapshot", type=Path, help="copy the working tree's build to this directory and exit")
    component = p.add_mutually_exclusive_group()
    component.add_argument("--store", action="store_true", help="each build with the audit store on; base: store off")
    component.add_argument("--drift", action="store_true", help="each build with [drift] at 1.0; base: drift off")
    p.add_argument("--reps", type=int, default=6, help="interleaved repetitions (default 6)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run (default 6)")
    args = p.parse_args(argv)
    if args.snapshot:
        snapshot(args.snapshot)
        print(f"build copied to {args.snapshot}")
        return 0
    if not args.builds:
        p.error("name at least one build directory (or --snapshot DIR)")
    builds = [b.resolve() for b in args.builds]
    for b in builds:
        if not (b / "shadowproxy" / "__init__.py").exists():
            p.error(f"{b}: no shadowproxy/ here (make one with --snapshot)")
    if not h.have("wrk"):
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    names = [f"{i}:{b.name or b}" for i, b in enumerate(builds)]
    with h.Models(backend="nginx") as models:
        setups: list[h.ShadowproxySetup] = []
        rate = 0.0 if args.drift else 0.1
        if args.store or args.drift:
            setups.append(build_setup("store off" if args.store else "drift off", builds[0], models.prod_url,
                                     models.cand_url, rate))
        for name, build in zip(names, builds, strict=True):
            extra: dict[str, dict[str, Any]] | None = None
            if args.store:
                extra = {"store": {"path": str(h.workdir() / f"sidebyside-{len(setups)}.db"), "sample_rate": 0.1}}
            elif args.drift:
                extra = {"drift": {"sample_rate": 1.0, "warmup": 1000, "window": 10000}}
            setups.append(build_setup(name, build, models.prod_url, models.cand_url, rate, extra=extra))

        def measure(setup: h.Setup, url: str) -> dict[str, Any]:
            return dict(h.closed_loop(url, setup, duration=args.duration, models=models, threads_of=setup.pid))

        h.log(h.machine_summary())
        results = h.run_interleaved(setups, measure, reps=args.reps)
        med = h.medians(results)
    base = setups[0].name
    print()
    print(f"# {h.machine_summary()}")
    print(f"# medians of {args.reps} interleaved repetition(s); base: {base}")
    print()
    table = [h.closed_loop_cells(s.name, med[s.name], results[s.name], med[base].get("rps")) for s in setups]
    print(h.format_table(h.closed_loop_headers(f"÷ {base}"), table,
                         title=f"Closed loop: wrk -t2 -c32 -d{args.duration:g}s, mirror.sample_rate 0.1"
                               + (", store.sample_rate 0.1" if args.store else "")
                               + (" (0 with drift), drift.sample_rate 1.0" if args.drift else "")))
    split = [[s.name] + [h.fmt(med[s.name].get(k), 2, na="—") for k in
                         ("loop_cpu_us", "loop_runq_us", "loop_sleep_us", "threads_cpu_us")] for s in setups]
    print()
    print(h.format_table(["setup", "on CPU", "waiting for a CPU", "asleep", "other threads' CPU"], split,
                         title="The event loop's thread, µs per request (medians)"))
    print()
    for s in setups[1:]:
        paired = h.paired_ratios(results[s.name], results[base])
        if paired:
            print(h.paired_line(s.name, base, paired))
    return 1 if h.print_failures(med) else 0


if __name__ == "__main__":
    h.run_main(main)
