"""Predictions compared per second, per kind and batch size (``compare_predictions`` alone).

    python benchmarks/compare.py

Batches of 1 and 32+ show the per-prediction Python path and the vectorised numpy path. Each cell
is the best of a few timed rounds; production and candidate differ slightly, so both agreeing and
disagreeing predictions are in every batch.
"""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

from shadowproxy.compare import KINDS, compare_predictions

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


def main() -> None:
    compare_table()


if __name__ == "__main__":
    main()
