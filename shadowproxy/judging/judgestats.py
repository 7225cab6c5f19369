"""The LLM judge's figures as mergeable counts: the ``"judge"`` block of ``/shadow/stats``.

Every figure is a count or a sum, so workers and replicas merge by adding, exactly.

- ``sampled``: compared pairs drawn for judging (``[judge] sample_rate``); each ends as one
  judgement, one error, or one drop, or is still ``pending`` (queued or being judged).
- ``candidate_better`` / ``tie`` / ``production_better``: the judgements; ``judged`` their sum.
- ``errors``: judge errors by kind (judging/judge.py); never counted as judgements.
- ``dropped``: drawn but never sent to the judge (its queue was full, or the proxy stopped).
- ``non_loss_rate``: ``(candidate_better + tie) / judged``, with its Wilson 95% interval
  ``non_loss_ci95``; the ``min_judge_non_loss_rate`` gate decides on that interval.
- ``by_position``: the same counts by where the candidate's answer stood (``candidate_a``,
  ``candidate_b``), and ``a_preferred``: how often a decisive judgement picked position A. The
  order is drawn at random per judgement, so a judge without position bias picks A about half
  the time whichever model is better; an interval away from 0.5 shows a bias.
- ``length``: the answers' lengths in characters (sums over judged pairs, and their means), and
  among decisive judgements of answers of different lengths how often the longer one won
  (``longer_preferred``), to check for a bias towards length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shadowproxy.judging.intervals import wilson_interval
from shadowproxy.judging.judge import ERROR_KINDS, RESULTS

__all__ = ["POSITIONS", "JudgeStats"]

POSITIONS: tuple[str, ...] = ("candidate_a", "candidate_b")
DEFAULT_MIN_JUDGEMENTS = 100


class JudgeStats:
    """The judge's counts; ``enabled`` once a ``[judge]`` is configured (or a state with a judge
    block merged), and only then is the block shown."""

    __slots__ = (
        "enabled", "min_judgements", "sampled", "dropped", "pending", "errors", "results",
        "candidate_chars", "production_chars", "longer_won", "shorter_won",
    )

    def __init__(self) -> None:
        self.enabled = False
        self.min_judgements = 0  # [judge] min_judgements: when the judge gate starts to decide
        self.sampled = 0
        self.dropped = 0
        self.pending = 0  # a reading, not a count: queued or being judged now
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.results: dict[str, dict[str, int]] = {p: dict.fromkeys(RESULTS, 0) for p in POSITIONS}
        self.candidate_chars = 0
        self.production_chars = 0
        self.longer_won = 0
        self.shorter_won = 0

    def enable(self, min_judgements: int) -> None:
        self.enabled = True
        self.min_judgements = min_judgements

    # -- recording ---------------------------------------------------------------------------

    def record_judgement(self, result: str, candidate_first: bool, candidate_chars: int, production_chars: int) -> None:
        self.results[POSITIONS[0] if candidate_first else POSITIONS[1]][result] += 1
        self.candidate_chars += candidate_chars
        self.production_chars += production_chars
        if result != "tie" and candidate_chars != production_chars:
            candidate_longer = candidate_chars > production_chars
            if candidate_longer == (result == "candidate_better"):
                self.longer_won += 1
            else:
                self.shorter_won += 1

    def record_error(self, kind: str) -> None:
        if kind not in self.errors:
            raise ValueError(f"unknown judge error {kind!r}; expected one of {', '.join(ERROR_KINDS)}")
        self.errors[kind] += 1

    # -- reading -----------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        return {r: sum(self.results[p][r] for p in POSITIONS) for r in RESULTS}

    def snapshot(self) -> dict[str, Any]:
        totals = self.totals()
        judged = sum(totals.values())
        non_loss = totals["candidate_better"] + totals["tie"]
        lo, hi = wilson_interval(non_loss, judged)
        by_position: dict[str, Any] = {}
        a_picked = decisive = 0
        for position in POSITIONS:
            counts = self.results[position]
            n = sum(counts.values())
            won, lost = counts["candidate_better"], counts["production_better"]
            by_position[position] = {
                "judged": n,
                **counts,
                "candidate_win_rate": won / n if n else None,
                "non_loss_rate": (won + counts["tie"]) / n if n else None,
            }
            # Position A won: the candidate's win when it stood first, production's otherwise.
            a_picked += won if position == "candidate_a" else lost
            decisive += won + lost
        a_lo, a_hi = wilson_interval(a_picked, decisive)
        by_position["a_preferred"] = {
            "decisive": decisive,
            "a": a_picked,
            "rate": a_picked / decisive if decisive else None,
            "ci95": [a_lo, a_hi],
        }
        longer_n = self.longer_won + self.shorter_won
        l_lo, l_hi = wilson_interval(self.longer_won, longer_n)
        return {
            "sampled": self.sampled,
            "judged": judged,
            **totals,
            "errors": dict(self.errors),
            "dropped": self.dropped,
            "pending": self.pending,
            "non_loss_rate": non_loss / judged if judged else None,
            "non_loss_ci95": [lo, hi],
            "min_judgements": self.min_judgements,
            "by_position": by_position,
            "length": {
                "candidate_chars": self.candidate_chars,
                "production_chars": self.production_chars,
                "candidate_mean_chars": self.candidate_chars / judged if judged else None,
                "production_mean_chars": self.production_chars / judged if judged else None,
                "decided_on_length": longer_n,
                "longer_preferred": self.longer_won,
                "longer_preferred_rate": self.longer_won / longer_n if longer_n else None,
                "longer_preferred_ci95": [l_lo, l_hi],
            },
        }

    # -- merging -----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "min_judgements": self.min_judgements,
            "sampled": self.sampled,
            "dropped": self.dropped,
            "pending": self.pending,
            "errors": dict(self.errors),
            "results": {p: dict(c) for p, c in self.results.items()},
            "candidate_chars": self.candidate_chars,
            "production_chars": self.production_chars,
            "longer_won": self.longer_won,
            "shorter_won": self.shorter_won,
        }

    def merge_state(self, state: Mapping[str, Any]) -> None:
        """Add another process's counts. Replicas configured alike share ``min_judgements``; when
        they differ the largest holds (the gate waits for the most data any of them asks for)."""
        self.enabled = True
        self.min_judgements = max(self.min_judgements, int(state.get("min_judgements", DEFAULT_MIN_JUDGEMENTS)))
        self.sampled += int(state["sampled"])
        self.dropped += int(state["dropped"])
        self.pending += int(state.get("pending", 0))
        for kind, n in state["errors"].items():
            self.errors[str(kind)] = self.errors.get(str(kind), 0) + int(n)
        for position in POSITIONS:
            counts = state["results"].get(position, {})
            for result in RESULTS:
                self.results[position][result] += int(counts.get(result, 0))
        self.candidate_chars += int(state["candidate_chars"])
        self.production_chars += int(state["production_chars"])
        self.longer_won += int(state["longer_won"])
        self.shorter_won += int(state["shorter_won"])
