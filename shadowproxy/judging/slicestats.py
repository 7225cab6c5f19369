"""Figures per slice of the traffic (`[[slices]]`): production's and each candidate's requests,
errors and latency, and each candidate's comparison outcomes, mergeable like the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.stats import OUTCOMES, LogHistogram, _latency_ms

__all__ = ["SliceCandidate", "SliceTarget"]


class SliceTarget:
    """Requests, errors and latency of one upstream within one slice."""

    __slots__ = ("errors", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = LogHistogram()

    def record(self, latency_s: float | None, error: bool) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        if latency_s is not None:
            self.latency.record(latency_s)

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latency_ms": _latency_ms(self.latency)}

    def to_state(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latency": self.latency.to_state()}

    def merge_state(self, state: Mapping[str, Any]) -> None:
        self.requests += int(state["requests"])
        self.errors += int(state["errors"])
        self.latency.merge(LogHistogram.from_state(state["latency"]))


class SliceCandidate(SliceTarget):
    """A candidate within one slice: its exchanges, and its comparisons as `comparisons` counts them."""

    __slots__ = ("agree", "disagree", "outcomes")

    def __init__(self) -> None:
        super().__init__()
        self.agree = 0
        self.disagree = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        total = self.agree + self.disagree
        lo, hi = wilson_interval(self.disagree, total)
        out["comparisons"] = {
            "total": total,
            "agree": self.agree,
            "disagree": self.disagree,
            **self.outcomes,
            "disagreement_rate": self.disagree / total if total else 0.0,
            "disagreement_rate_ci95": [lo, hi],
        }
        return out

    def to_state(self) -> dict[str, Any]:
        state = super().to_state()
        state.update(agree=self.agree, disagree=self.disagree, outcomes=dict(self.outcomes))
        return state

    def merge_state(self, state: Mapping[str, Any]) -> None:
        super().merge_state(state)
        self.agree += int(state["agree"])
        self.disagree += int(state["disagree"])
        for key in OUTCOMES:
            self.outcomes[key] += int(state["outcomes"].get(key, 0))
