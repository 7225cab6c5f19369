"""Drift test data and an independent numpy reference of the drift definitions, shared by the unit
and the through-the-proxy drift tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shadowproxy.config import CompareConfig, DriftConfig
from shadowproxy.drift.monitor import DriftMonitor
from shadowproxy.drift.profile import build_profile
from shadowproxy.shadow.metrics import Metrics
from shadowproxy.shadow.observers import ExchangeRecord

COLORS = ["red", "green", "blue", "yellow"]
COLOR_P = [0.4, 0.3, 0.2, 0.1]


# --- the reference: the documented definitions (docs/comparison.md), written out independently ------


def ref_edges(base: np.ndarray, bins: int = 10) -> np.ndarray:
    return np.quantile(base, [k / bins for k in range(1, bins)])


def ref_psi_ks(base: np.ndarray, live: np.ndarray, bins: int = 10) -> tuple[float, float]:
    edges = ref_edges(base, bins)
    b = np.bincount(np.searchsorted(edges, base, side="left"), minlength=bins) / len(base)
    lv = np.bincount(np.searchsorted(edges, live, side="left"), minlength=bins) / len(live)
    ks = float(np.max(np.abs(np.cumsum(lv)[:-1] - np.cumsum(b)[:-1])))
    b, lv = np.maximum(b, 1e-4), np.maximum(lv, 1e-4)
    return float(np.sum((lv - b) * np.log(lv / b))), ks


def ref_categorical_psi(base: list[str], live: list[str]) -> float:
    cats = sorted(set(base))  # fewer than 50: no "other" in the baseline
    b = np.array([base.count(c) for c in cats] + [0]) / len(base)
    lv = np.array([live.count(c) for c in cats] + [sum(v not in cats for v in live)]) / len(live)
    b, lv = np.maximum(b, 1e-4), np.maximum(lv, 1e-4)
    return float(np.sum((lv - b) * np.log(lv / b)))


# --- synthetic data ----------------------------------------------------------------------------------


def synthetic(n: int, seed: int, shift: float = 0.0, new_color: float = 0.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {
        "age": rng.normal(40.0, 10.0, n),
        "income": rng.lognormal(10.0, 0.5, n),
        "score": rng.uniform(0.0, 1.0, n) + shift,  # std 1/sqrt(12): shift in units of it below
    }
    colors = list(rng.choice(COLORS, n, p=COLOR_P))
    if new_color:
        colors = ["purple" if rng.random() < new_color else c for c in colors]
    columns["color"] = colors
    return columns


def rows_of(columns: dict[str, Any]) -> list[dict[str, object]]:
    n = len(columns["age"])
    return [
        {"age": float(columns["age"][i]), "income": float(columns["income"][i]),
         "score": float(columns["score"][i]), "color": str(columns["color"][i])}
        for i in range(n)
    ]


def bodies(rows: list[dict[str, object]], per_request: int = 500) -> list[bytes]:
    return [orjson.dumps({"instances": rows[i : i + per_request]}) for i in range(0, len(rows), per_request)]


def record(body: bytes, answer: bytes | None = None) -> ExchangeRecord:
    return ExchangeRecord("r", 0.0, "POST", "/", 200, [], 0.001, False, body, answer)


def monitor(tmp_path: Path, base_rows: list[dict[str, object]] | None, **drift: Any) -> DriftMonitor:
    if base_rows is not None:
        path = tmp_path / "baseline.json"
        path.write_bytes(orjson.dumps(build_profile(base_rows).to_json()))
        drift.setdefault("baseline", str(path))
    config = DriftConfig(**drift)
    return DriftMonitor(config, CompareConfig(), Metrics())


def feed(m: DriftMonitor, payloads: list[bytes], answers: list[bytes] | None = None) -> dict[str, Any]:
    for i, body in enumerate(payloads):
        m.on_exchange(record(body, answers[i] if answers else None), wanted=True)
    return m.snapshot()


BASE = synthetic(20000, seed=1)
BASE_ROWS = rows_of(BASE)
