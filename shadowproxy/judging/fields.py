"""``compare.kind = "fields"``: whole JSON answers compared leaf by leaf, as Twitter's Diffy does.

Every leaf (a number, string, boolean, null, or an empty object or array) of either answer is
named by its JSON pointer (RFC 6901: ``~`` written ``~0`` and ``/`` written ``~1``), with array
indices folded to ``*``, so ``/predictions/0/score`` and ``/predictions/7/score`` are the one field
``/predictions/*/score``. A field differs in an answer when any of its leaves differs: numbers
(booleans are not numbers) within the ``[compare]`` tolerances as for ``numeric``, anything else
by equality; a leaf only one side has, or a container on one side where the other has a scalar,
differs. One answer is one prediction: it agrees when no field outside the noisy ones differs.

``FieldTable`` counts, per field, the answers that had it (``compared``) and those where it
differed (``differ``); with a ``[secondary]``, also the answers the secondary's copy was compared
on (``noise_compared``) and where the secondary differed from production (``noise_differ``). A field
whose ``noise_differ / noise_compared`` exceeds ``compare.noise_threshold`` is noisy: production
differs from itself there (a timestamp, a request id, a sampled value), so it is left out of
agreement. At most ``MAX_FIELDS`` distinct fields are tracked; a leaf of any further field counts
in ``overflow`` and can never be noisy. Merging tables keeps the ``MAX_FIELDS`` most compared
fields and counts what it leaves out in ``overflow``: approximate when replicas saw more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MAX_FIELDS", "FieldTable", "field_diffs"]

MAX_FIELDS: Final = 1000


class _Missing:
    """A leaf one answer does not have."""


_MISSING: Final = _Missing()


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _leaf_differs(p: object, c: object, abs_tol: float, rel_tol: float) -> bool:
    p_number = isinstance(p, int | float) and not isinstance(p, bool)
    c_number = isinstance(c, int | float) and not isinstance(c, bool)
    if p_number and c_number:
        a, b = float(p), float(c)  # type: ignore[arg-type]
        if math.isnan(a) or math.isnan(b):
            return not (math.isnan(a) and math.isnan(b))
        if a == b:
            return False
        return not abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)
    if p_number or c_number or isinstance(p, bool) or isinstance(c, bool):
        return type(p) is not type(c) or p != c
    return p != c


def field_diffs(prod: object, cand: object, abs_tol: float, rel_tol: float) -> dict[str, bool]:
    """Every field of either answer -> whether the two answers differ there."""
    out: dict[str, bool] = {}
    _walk(prod, cand, "", out, abs_tol, rel_tol)
    return out


def _mark(out: dict[str, bool], pointer: str, differs: bool) -> None:
    if differs:
        out[pointer] = True
    elif pointer not in out:
        out[pointer] = False


def _walk(p: object, c: object, pointer: str, out: dict[str, bool], abs_tol: float, rel_tol: float) -> None:
    p_dict, c_dict = isinstance(p, dict), isinstance(c, dict)
    p_list, c_list = isinstance(p, list), isinstance(c, list)
    if (p_dict or p is _MISSING) and (c_dict or c is _MISSING) and (p_dict or c_dict):
        pd: Mapping[str, Any] = p if isinstance(p, dict) else {}
        cd: Mapping[str, Any] = c if isinstance(c, dict) else {}
        if not pd and not cd:  # an empty object is a leaf
            _mark(out, pointer, p is _MISSING or c is _MISSING)
            return
        for key in (*pd, *(k for k in cd if k not in pd)):
            _walk(pd.get(key, _MISSING), cd.get(key, _MISSING), f"{pointer}/{_escape(str(key))}", out, abs_tol, rel_tol)
        return
    if (p_list or p is _MISSING) and (c_list or c is _MISSING) and (p_list or c_list):
        pl: list[Any] = p if isinstance(p, list) else []
        cl: list[Any] = c if isinstance(c, list) else []
        if not pl and not cl:  # an empty array is a leaf
            _mark(out, pointer, p is _MISSING or c is _MISSING)
            return
        star = pointer + "/*"
        for i in range(max(len(pl), len(cl))):
            _walk(pl[i] if i < len(pl) else _MISSING, cl[i] if i < len(cl) else _MISSING, star, out, abs_tol, rel_tol)
        return
    if p is _MISSING or c is _MISSING:
        _mark(out, pointer, True)
        return
    if p_dict or c_dict or p_list or c_list:  # a container against a scalar (or a list against an object)
        _mark(out, pointer, True)
        return
    _mark(out, pointer, _leaf_differs(p, c, abs_tol, rel_tol))


class FieldTable:
    """Per-field counts of one candidate (see the module docstring): ``[compared, differ,
    noise_compared, noise_differ]`` by pointer, bounded to ``MAX_FIELDS`` fields."""

    __slots__ = ("overflow", "rows", "threshold")

    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = threshold
        self.rows: dict[str, list[int]] = {}
        self.overflow = 0

    def _row(self, pointer: str) -> list[int] | None:
        row = self.rows.get(pointer)
        if row is None:
            if len(self.rows) >= MAX_FIELDS:
                self.overflow += 1
                return None
            row = self.rows[pointer] = [0, 0, 0, 0]
        return row

    def noisy(self, pointer: str) -> bool:
        row = self.rows.get(pointer)
        return row is not None and row[2] > 0 and row[3] / row[2] > self.threshold

    def record(self, cand: dict[str, bool], secondary: dict[str, bool] | None) -> tuple[bool, bool | None]:
        """One answer: the candidate's field differences and the secondary's (None: no usable
        secondary answer). Returns whether the candidate agrees, and whether the secondary does
        (None without it), with the noisy fields (this answer's counts included) left out."""
        for pointer, differs in cand.items():
            row = self._row(pointer)
            if row is not None:
                row[0] += 1
                row[1] += differs
        if secondary is not None:
            for pointer, differs in secondary.items():
                row = self._row(pointer)
                if row is not None:
                    row[2] += 1
                    row[3] += differs
        cand_agrees = not any(differs and not self.noisy(pointer) for pointer, differs in cand.items())
        if secondary is None:
            return cand_agrees, None
        return cand_agrees, not any(differs and not self.noisy(pointer) for pointer, differs in secondary.items())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``/shadow/stats`` ``fields``: most compared first."""
        ranked = sorted(self.rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {
            pointer: {
                "compared": row[0],
                "differ": row[1],
                "noise_compared": row[2],
                "noise_differ": row[3],
                "noisy": self.noisy(pointer),
            }
            for pointer, row in ranked
        }

    def to_state(self) -> dict[str, Any]:
        rows = {pointer: list(row) for pointer, row in self.rows.items()}
        return {"threshold": self.threshold, "overflow": self.overflow, "rows": rows}

    def merge_state(self, state: Mapping[str, Any]) -> None:
        self.threshold = float(state.get("threshold", self.threshold))
        self.overflow += int(state.get("overflow", 0))
        for pointer, counts in state.get("rows", {}).items():
            row = self.rows.setdefault(str(pointer), [0, 0, 0, 0])
            for i, n in enumerate(counts[:4]):
                row[i] += int(n)
        if len(self.rows) > MAX_FIELDS:
            ranked = sorted(self.rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
            for pointer, row in ranked[MAX_FIELDS:]:
                self.overflow += row[0]
                del self.rows[pointer]
