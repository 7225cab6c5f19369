"""The recent past of a `ShadowStats`, for `/shadow/history` and the live page.

Every `HISTORY_INTERVAL_S` the admin side hands `History.record` the cumulative stats (one
process's, or the supervisor's merge of its workers') and the time. A point keeps, for the window
since the previous point and cumulatively: p50 and p99 of production's and the candidate's
latencies (all their exchanges, and the mirrored pairs), the mirror counts, and the compared
predictions with their disagreement rate and its Wilson 95% interval. The window's percentiles
come from the difference of two histograms, bucket by bucket, so they are those of the values
recorded in that window (within the histograms' 1%). The last `HISTORY_POINTS` points are kept:
an hour at 5 s.

A count that went down (a worker restarted, so the merged totals lost what it had counted) gives
a window with that figure at 0, never negative; the cumulative figures are the merge as it is.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.stats import MIRROR_RESULTS, LogHistogram, ShadowStats

HISTORY_INTERVAL_S = 5.0
HISTORY_POINTS = 720
_QUANTILES = (("p50", 0.5), ("p99", 0.99))
# The latency series of a point: its name, and where a ShadowStats keeps that histogram.
_SERIES = ("production", "candidate", "mirrored_production", "mirrored_candidate")


def _histograms(stats: ShadowStats) -> dict[str, LogHistogram]:
    return {
        "production": stats.production.latency,
        "candidate": stats.candidate.latency,
        "mirrored_production": stats.mirrored_production,
        "mirrored_candidate": stats.mirrored_candidate,
    }


def _copy(h: LogHistogram) -> LogHistogram:
    return LogHistogram.from_state(h.to_state())


def _minus(now: LogHistogram, before: LogHistogram | None) -> LogHistogram:
    """The values `now` holds that `before` did not: bucket counts subtracted, floored at 0."""
    if before is None:
        return now
    state = now.to_state()
    old = before.to_state()
    counts = [int(c) for c in state["counts"]]
    start = int(state["offset"])
    for i, c in enumerate(old["counts"]):
        j = int(old["offset"]) + i - start
        if 0 <= j < len(counts):
            counts[j] = max(0, counts[j] - int(c))
    zero = max(0, int(state["zero"]) - int(old["zero"]))
    window = {
        **state,
        "counts": counts,
        "zero": zero,
        "count": zero + sum(counts),
        "sum": max(0.0, float(state["sum"]) - float(old["sum"])),
    }
    return LogHistogram.from_state(window)


def _latency(h: LogHistogram) -> dict[str, float | int]:
    out: dict[str, float | int] = {"count": h.count}
    for name, q in _QUANTILES:
        out[name] = round(h.quantile(q) * 1000, 6)
    return out


def _figures(
    hists: dict[str, LogHistogram], mirror: dict[str, int], agree: int, disagree: int
) -> dict[str, Any]:
    total = agree + disagree
    lo, hi = wilson_interval(disagree, total)
    return {
        "latency_ms": {name: _latency(hists[name]) for name in _SERIES},
        "mirror": mirror,
        "agree": agree,
        "disagree": disagree,
        "disagreement_rate": disagree / total if total else 0.0,
        "disagreement_rate_ci95": [lo, hi],
    }


class History:
    """A ring of points, one per `record` call; oldest first."""

    def __init__(self, capacity: int = HISTORY_POINTS, interval_s: float = HISTORY_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.points: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._before: dict[str, LogHistogram] | None = None
        self._counts: tuple[dict[str, int], int, int] | None = None

    def record(self, stats: ShadowStats, t: float) -> dict[str, Any]:
        """Append the point for time `t` (seconds since the epoch) and return it."""
        now = {name: _copy(h) for name, h in _histograms(stats).items()}
        mirror = {key: int(stats.mirror[key]) for key in MIRROR_RESULTS}
        agree, disagree = int(stats.agree), int(stats.disagree)
        before = self._before or {}
        if self._counts is None:
            old_mirror, old_agree, old_disagree = dict.fromkeys(MIRROR_RESULTS, 0), 0, 0
        else:
            old_mirror, old_agree, old_disagree = self._counts
        window = _figures(
            {name: _minus(h, before.get(name)) for name, h in now.items()},
            {key: max(0, mirror[key] - old_mirror[key]) for key in MIRROR_RESULTS},
            max(0, agree - old_agree),
            max(0, disagree - old_disagree),
        )
        point = {
            "t": round(t, 3),
            "window": window,
            "cumulative": _figures(now, mirror, agree, disagree),
        }
        self._before = now
        self._counts = (mirror, agree, disagree)
        self.points.append(point)
        return point

    def document(self, since: float | None = None) -> dict[str, Any]:
        """`/shadow/history`: the points after `since` (all of them without it)."""
        points = list(self.points)
        if since is not None:
            points = [p for p in points if p["t"] > since]
        return {"interval_s": self.interval_s, "capacity": self.points.maxlen, "points": points}
