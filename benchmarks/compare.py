"""Cost of comparing: predictions compared per second, then the proxy's throughput.

    python benchmarks/compare.py                 # both parts: about 2 minutes
    python benchmarks/compare.py --quick         # 1 repetition, 3 s runs for the proxy part
    python benchmarks/compare.py --no-proxy      # only the compare_predictions table (no network)

First table: predictions compared per second per kind and batch size (``compare_predictions``
alone). Batches of 1 and 32+ show the per-prediction Python path and the vectorised numpy path. Each
cell is the best of a few timed rounds; production and candidate differ slightly, so both agreeing
and disagreeing predictions are in every batch.

Second table: the proxy's saturated throughput with ``mirror.sample_rate`` 0, 0.1 and 1.0 (label
comparison, kserve-v1: the defaults), the stand-in hit directly as the limit, all in one run:
interleaved repetitions, medians, as ``run.py`` measures them (its functions, the harness's
stand-ins). Needs wrk and nginx (or the python stand-in).
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

from shadowproxy.judging.compare import KINDS, compare_predictions

BATCH_SIZES: tuple[int, ...] = (1, 32, 1024)
VECTOR_WIDTH = 16
CLASSES = 10


def _pairs(kind: str, n: int, rng: random.Random) -> tuple[list[object], list[object]]:
    """Realistic-looking production / candidate predictions for one batch."""
    prod: list[object]
    cand: list[object]
    if kind == "label":
        prod = [rng.choice(("cat", "dog", "bird", "fish")) for _ in range(n)]
        cand = [p if rng.random() < 0.95 else "dog" for p in prod]
    elif kind == "numeric":
        values = [rng.gauss(100, 20) for _ in range(n)]
        prod = list(values)
        cand = [v * (1 + rng.gauss(0, 1e-3)) for v in values]
    elif kind == "vector":
        rows = [[rng.gauss(0, 1) for _ in range(VECTOR_WIDTH)] for _ in range(n)]
        prod = list(rows)
        cand = [[x + rng.gauss(0, 1e-6) for x in row] for row in rows]
    elif kind == "distribution":
        dists = [[rng.random() for _ in range(CLASSES)] for _ in range(n)]
        prod = list(dists)
        cand = [[x + rng.random() * 0.05 for x in row] for row in dists]
    elif kind == "text":
        words = ("the", "model", "predicts", "a", "cat", "on", "mat", "today")
        texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]
        prod = list(texts)
        cand = [t if rng.random() < 0.9 else t.replace("cat", "dog") for t in texts]
    else:
        raise ValueError(kind)
    return prod, cand


def predictions_per_second(kind: str, batch: int, min_time_s: float = 0.2) -> float:
    prod, cand = _pairs(kind, batch, random.Random(batch))

    def run() -> None:
        compare_predictions(kind, prod, cand, 1e-6, 1e-3)

    timer = timeit.Timer(run)
    number, _ = timer.autorange()
    number = max(1, int(number * min_time_s / 0.2))
    best = min(timer.repeat(repeat=3, number=number)) / number
    return batch / best


def compare_table(
    kinds: tuple[str, ...] = KINDS,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    out: Callable[[str], None] = print,
) -> dict[str, dict[int, float]]:
    """Print predictions compared per second for each kind and batch size, and return them."""
    results: dict[str, dict[int, float]] = {}
    header = f"{'kind':<14}" + "".join(f"{'batch ' + str(b):>16}" for b in batch_sizes)
    out("predictions compared per second (compare_predictions only)")
    out(header)
    out("-" * len(header))
    for kind in kinds:
        results[kind] = {b: predictions_per_second(kind, b) for b in batch_sizes}
        out(f"{kind:<14}" + "".join(f"{results[kind][b]:>16,.0f}" for b in batch_sizes))
    return results


def proxy_table(quick: bool = False, reps: int | None = None, backend: str = "auto") -> str:
    """The proxy's throughput at sample_rate 0, 0.1 and 1.0 in one run (run.py's measurement)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # a sibling script, imported here: only this part needs the network harness

    plan = run.Plan.quick() if quick else run.Plan()
    if reps is not None:
        plan.reps = max(1, reps)
    table, _ = run.sample_rate_throughput((0.0, 0.1, 1.0), plan, backend=backend)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compare_predictions speed and the proxy's throughput by sample_rate")
    p.add_argument("--no-proxy", action="store_true", help="only the compare_predictions table")
    p.add_argument("--quick", action="store_true", help="proxy part: 1 repetition, 3 s runs")
    p.add_argument("--reps", type=int, default=None, help="proxy part: interleaved repetitions (default 3)")
    p.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto",
                   help="stand-in models for the proxy part")
    args = p.parse_args(argv)
    compare_table()
    if not args.no_proxy:
        print()
        print(proxy_table(args.quick, args.reps, args.backend))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
