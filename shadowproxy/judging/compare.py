"""Per-prediction comparison of production's and the candidate's answers, by kind.

| kind | agree when | figures recorded |
|---|---|---|
| ``label`` | equal after canonicalisation (1 == 1.0, ``True`` != 1, containers structurally) | ``pairs`` |
| ``numeric`` | ``|c - p| <= max(rel_tol * max(|p|, |c|), abs_tol)``; NaN == NaN | ``abs_diffs`` |
| ``vector`` | same shape and every element close as for ``numeric`` | ``abs_diffs`` (max), ``cosine`` |
| ``distribution`` | same argmax (first index on ties) | ``jsd`` (base 2, in [0, 1]) |
| ``text`` | similarity >= ``min_similarity``; at 1.0 (the default) equal after normalising | ``similarity`` |

``text`` normalises by collapsing whitespace runs to one space and stripping, and needs strings
on both sides; its similarity is difflib's ratio of the normalised texts. ``numeric`` reads a
one-element list (``[0.7]``, ``[[0.7]]``) as its element, since many regressors answer that way.

Odd values never raise: a value the kind cannot read (a string where a number belongs, a ragged
vector, a negative probability, ...) is a disagreement. Booleans are not numbers here, as in JSON.
The figure lists hold one entry per prediction where the figure is defined (``cosine`` is skipped
for zero or non-finite vectors, ``jsd`` for invalid distributions), so they may be shorter than
``flags``. ``abs_diffs`` uses 0 for NaN vs NaN and for equal infinities, and ``inf`` when only one
side is NaN or infinite.

Batches of at least ``VECTORISE_MIN`` predictions with a consistent shape are compared with one
numpy operation; ragged or odd batches fall back to per-prediction Python with the same results.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from itertools import chain
from typing import Any, Final

import numpy as np
import orjson

__all__ = [
    "KINDS",
    "VECTORISE_MIN",
    "Comparison",
    "canonical_label",
    "compare_predictions",
    "normalise_text",
    "text_similarity",
]

KINDS: tuple[str, ...] = ("label", "numeric", "vector", "distribution", "text")
VECTORISE_MIN = 32
# difflib's ratio is quadratic in the worst case; beyond this length use its cheap upper bound.
_SIMILARITY_MAX_CHARS = 4096

_NUMBER_TYPES = frozenset((int, float))
_NUMBER_TYPES_SET: set[type] = {int, float}

# A JSON number: int or float. Spelled out (not `float`, which type checkers let ints pass as)
# because compiled code checks a `float` annotation strictly at run time.
Number = int | float
FloatArray = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]
Preds = Sequence[object]


_COMPARISON_FIELDS: Final = (
    "agree", "disagree", "flags", "abs_diffs", "cosine", "jsd", "similarity", "pairs",
    "tool_calls_compared", "tool_calls_agree",
)


class Comparison:
    """The outcome of comparing one batch of predictions. A plain class, not a dataclass: mypyc
    compiles an explicit __init__, while a dataclass's generated one runs as Python, once per mirrored
    pair."""

    __slots__ = _COMPARISON_FIELDS

    def __init__(self) -> None:
        self.agree = 0
        self.disagree = 0
        self.flags: list[bool] = []
        self.abs_diffs: list[float] = []
        self.cosine: list[float] = []
        self.jsd: list[float] = []
        self.similarity: list[float] = []
        self.pairs: list[tuple[str, str]] = []
        # OpenAI answers (judging/openai.py): pairs where either side called a tool, and of those
        # the ones that agree.
        self.tool_calls_compared = 0
        self.tool_calls_agree = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Comparison):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _COMPARISON_FIELDS)

    def __repr__(self) -> str:
        return "Comparison(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in _COMPARISON_FIELDS) + ")"

    @property
    def total(self) -> int:
        return self.agree + self.disagree


def compare_predictions(
    kind: str,
    prod: Sequence[object],
    cand: Sequence[object],
    abs_tol: float,
    rel_tol: float,
    min_similarity: float = 1.0,
) -> Comparison:
    """Compare two equally long prediction lists; ``ValueError`` on unequal lengths or unknown kind.
    ``min_similarity`` is the ``text`` kind's threshold (1.0: equal after normalising).

    The loops below zip without ``strict=True``: compiled, a plain zip is a C loop, while the
    keyword makes it a call of the builtin, once per mirrored request and kind."""
    if len(prod) != len(cand):
        raise ValueError(f"prediction counts differ: production {len(prod)}, candidate {len(cand)}")
    out = Comparison()
    if kind == "label":
        _compare_labels(prod, cand, out)
    elif kind == "numeric":
        if len(prod) < VECTORISE_MIN or not _numeric_np(prod, cand, abs_tol, rel_tol, out):
            _compare_numbers(prod, cand, abs_tol, rel_tol, out)
    elif kind == "vector":
        if len(prod) < VECTORISE_MIN or not _vector_np(prod, cand, abs_tol, rel_tol, out):
            _compare_vectors(prod, cand, abs_tol, rel_tol, out)
    elif kind == "distribution":
        if len(prod) < VECTORISE_MIN or not _distribution_np(prod, cand, out):
            _compare_distributions(prod, cand, out)
    elif kind == "text":
        _compare_texts(prod, cand, min_similarity, out)
    else:
        raise ValueError(f"unknown comparison kind {kind!r}; expected one of {', '.join(KINDS)}")
    out.agree = sum(out.flags)
    out.disagree = len(out.flags) - out.agree
    return out


# ---------------------------------------------------------------- label


def _is_number(v: object) -> bool:
    return type(v) in _NUMBER_TYPES or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _labels_equal(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) and _is_number(b):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float))
        return a == b or (a != a and b != b)  # NaN labels are alike
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_labels_equal(x, y) for x, y in zip(a, b))  # noqa: B905  lengths checked
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_labels_equal(a[k], b[k]) for k in a)
    if _is_number(a) or _is_number(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd value must not break the comparison
        return False


def _canonical_json(v: object) -> object:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return int(v) if v.is_integer() else v
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)):
        return [_canonical_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _canonical_json(x) for k, x in v.items()}
    return repr(v)


def canonical_label(v: object) -> str:
    """The string a label is shown and counted under: strings as they are, anything else as
    compact JSON with int-valued floats as ints and sorted keys (so 1 and 1.0 are both ``"1"``)."""
    if isinstance(v, str):
        return v
    if type(v) is int:  # class ids, the common case: what the JSON below gives (repr beyond 64 bits)
        return str(v)
    try:
        return orjson.dumps(_canonical_json(v), option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. integers beyond 64 bits
        return repr(v)


# The labels of small class ids, made once: no new str per instance, and counting them (stats'
# confusion table) hashes each once and compares by identity.
_SMALL_INT_LABELS: Final = tuple(str(i) for i in range(1024))


def _int_label(v: int) -> str:
    """canonical_label of an int (`str`), shared for 0..1023."""
    return _SMALL_INT_LABELS[v] if 0 <= v < 1024 else str(v)


def _compare_labels(prod: Preds, cand: Preds, out: Comparison) -> None:
    flags = out.flags
    pairs = out.pairs
    for p, c in zip(prod, cand):  # noqa: B905  equal lengths (compare_predictions checks)
        if type(p) is str and type(c) is str:
            flags.append(p == c)
            pairs.append((p, c))
        elif type(p) is int and type(c) is int:  # class ids (not bools: their type is bool)
            flags.append(p == c)
            pairs.append((_int_label(p), _int_label(c)))
        else:
            flags.append(_labels_equal(p, c))
            pairs.append((canonical_label(p), canonical_label(c)))


# ---------------------------------------------------------------- numeric


def _close(p: Number, c: Number, abs_tol: float, rel_tol: float) -> tuple[bool, float]:
    """Agreement and |c - p| for two numbers; never raises (huge ints overflow floats)."""
    try:
        fp = float(p)
        fc = float(c)
    except OverflowError:
        return p == c, 0.0 if p == c else math.inf
    if fp == fc:
        return True, 0.0  # also equal infinities
    if fp != fp or fc != fc:
        both_nan = fp != fp and fc != fc
        return both_nan, 0.0 if both_nan else math.inf
    if fp in (math.inf, -math.inf) or fc in (math.inf, -math.inf):
        return False, math.inf  # as math.isclose: infinity is close only to itself
    diff = abs(fc - fp)
    return diff <= max(rel_tol * max(abs(fp), abs(fc)), abs_tol), diff


def _unwrap_scalar(v: object) -> object:
    # [[0.7]] is how many regressors answer one instance; treat a one-element list as its element.
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    return v


def _compare_numbers(prod: Preds, cand: Preds, abs_tol: float, rel_tol: float, out: Comparison) -> None:
    for p, c in zip(prod, cand):  # noqa: B905  equal lengths (compare_predictions checks)
        p = _unwrap_scalar(p)
        c = _unwrap_scalar(c)
        if not (_is_number(p) and _is_number(c)):
            out.flags.append(False)
            continue
        assert isinstance(p, (int, float)) and isinstance(c, (int, float))
        ok, diff = _close(p, c, abs_tol, rel_tol)
        out.flags.append(ok)
        out.abs_diffs.append(diff)


def _as_float_array(values: Preds) -> FloatArray | None:
    """A float64 array when ``values`` is a rectangular nest of ints and floats only, else None."""
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.dtype.kind not in "if" or arr.size == 0:
        return None
    # numpy turns a stray bool among numbers into 0/1; JSON says it is not a number.
    leaves: Any = values
    for _ in range(arr.ndim - 1):
        leaves = chain.from_iterable(leaves)
    if not set(map(type, leaves)) <= _NUMBER_TYPES_SET:
        return None
    return arr.astype(np.float64, copy=False)


def _elementwise(
    p: FloatArray, c: FloatArray, abs_tol: float, rel_tol: float
) -> tuple[BoolArray, FloatArray]:
    """Vectorised ``_close``: the same formula (math.isclose's, not numpy.isclose's asymmetric one)."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(c - p)
        tol = np.maximum(rel_tol * np.maximum(np.abs(p), np.abs(c)), abs_tol)
        same = (p == c) | (np.isnan(p) & np.isnan(c))
        ok = same | ((diff <= tol) & np.isfinite(p) & np.isfinite(c))
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    return ok, diff


def _numeric_np(prod: Preds, cand: Preds, abs_tol: float, rel_tol: float, out: Comparison) -> bool:
    p = _as_float_array(prod)
    c = _as_float_array(cand)
    if p is None or c is None:
        return False
    # Mirror _unwrap_scalar: [N], [N, 1], [N, 1, 1] ... all hold one number per instance.
    if any(d != 1 for d in p.shape[1:]) or any(d != 1 for d in c.shape[1:]):
        return False
    p = p.reshape(-1)
    c = c.reshape(-1)
    ok, diff = _elementwise(p, c, abs_tol, rel_tol)
    out.flags.extend(ok.tolist())
    out.abs_diffs.extend(diff.tolist())
    return True


# ---------------------------------------------------------------- vector


def _shape(v: object) -> tuple[int, ...] | None:
    """The shape of a rectangular nest of numbers; None when ragged or holding a non-number."""
    if isinstance(v, list):
        if not v:
            return (0,)
        inner = [_shape(x) for x in v]
        first = inner[0]
        if first is None or any(s != first for s in inner):
            return None
        return (len(v), *first)
    return () if _is_number(v) else None


def _flat(v: object) -> list[Number]:
    if isinstance(v, list):
        return [x for item in v for x in _flat(item)]
    assert isinstance(v, (int, float))
    return [v]


def _cosine(a: list[Number], b: list[Number]) -> float | None:
    try:
        dot = math.fsum(x * y for x, y in zip(a, b))  # noqa: B905  equal lengths (callers check)
        na = math.sqrt(math.fsum(x * x for x in a))
        nb = math.sqrt(math.fsum(y * y for y in b))
    except (OverflowError, ValueError):
        return None
    if not (math.isfinite(dot) and math.isfinite(na) and math.isfinite(nb)) or na == 0 or nb == 0:
        return None
    return max(-1.0, min(1.0, dot / (na * nb)))


def _compare_vectors(prod: Preds, cand: Preds, abs_tol: float, rel_tol: float, out: Comparison) -> None:
    for p, c in zip(prod, cand):  # noqa: B905  equal lengths (compare_predictions checks)
        sp = _shape(p)
        if sp is None or sp != _shape(c):
            out.flags.append(False)
            continue
        fp = _flat(p)
        fc = _flat(c)
        ok = True
        worst = 0.0
        for x, y in zip(fp, fc):  # noqa: B905  equal shapes, so equal lengths
            close, diff = _close(x, y, abs_tol, rel_tol)
            ok = ok and close
            worst = max(worst, diff)
        out.flags.append(ok)
        out.abs_diffs.append(worst)
        cos = _cosine(fp, fc)
        if cos is not None:
            out.cosine.append(cos)


def _vector_np(prod: Preds, cand: Preds, abs_tol: float, rel_tol: float, out: Comparison) -> bool:
    p = _as_float_array(prod)
    c = _as_float_array(cand)
    if p is None or c is None or p.ndim < 2 or p.shape != c.shape:
        return False
    n = p.shape[0]
    p2 = p.reshape(n, -1)
    c2 = c.reshape(n, -1)
    ok, diff = _elementwise(p2, c2, abs_tol, rel_tol)
    rows_ok: BoolArray = np.all(ok, axis=1)
    out.flags.extend(rows_ok.tolist())
    out.abs_diffs.extend(diff.max(axis=1).tolist())
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        dot = np.einsum("ij,ij->i", p2, c2)
        norms = np.linalg.norm(p2, axis=1) * np.linalg.norm(c2, axis=1)
        cos = dot / norms
    valid = np.isfinite(dot) & np.isfinite(norms) & (norms > 0)
    out.cosine.extend(np.clip(cos[valid], -1.0, 1.0).tolist())
    return True


# ---------------------------------------------------------------- distribution


def _probabilities(v: object) -> list[float] | None:
    """A valid distribution as a list (dicts in sorted-key order), or None."""
    if isinstance(v, dict):
        try:
            v = [v[k] for k in sorted(v)]
        except TypeError:
            return None
    if not isinstance(v, list) or not v or not all(_is_number(x) for x in v):
        return None
    try:
        probs = [float(x) for x in v]
    except OverflowError:
        return None
    if not all(math.isfinite(x) and x >= 0 for x in probs):
        return None
    total = math.fsum(probs)
    if not (total > 0 and math.isfinite(total)):
        return None
    return [x / total for x in probs]


def _jsd(p: list[float], q: list[float]) -> float:
    """Jensen–Shannon divergence in bits; 0 log 0 = 0, so the result lies in [0, 1]."""
    acc = 0.0
    for x, y in zip(p, q):  # noqa: B905  equal lengths (the caller checks)
        m = (x + y) / 2
        if x > 0:
            acc += x * math.log2(x / m)
        if y > 0:
            acc += y * math.log2(y / m)
    return min(1.0, max(0.0, acc / 2))


def _keys_match(p: object, c: object) -> bool:
    return not (isinstance(p, dict) or isinstance(c, dict)) or (
        isinstance(p, dict) and isinstance(c, dict) and p.keys() == c.keys()
    )


def _compare_distributions(prod: Preds, cand: Preds, out: Comparison) -> None:
    for p, c in zip(prod, cand):  # noqa: B905  equal lengths (compare_predictions checks)
        pp = _probabilities(p)
        pc = _probabilities(c)
        if pp is None or pc is None or len(pp) != len(pc) or not _keys_match(p, c):
            out.flags.append(False)
            continue
        out.flags.append(pp.index(max(pp)) == pc.index(max(pc)))
        out.jsd.append(_jsd(pp, pc))


def _distribution_np(prod: Preds, cand: Preds, out: Comparison) -> bool:
    p = _as_float_array(prod)
    c = _as_float_array(cand)
    if p is None or c is None or p.ndim != 2 or p.shape != c.shape:
        return False
    if not (np.isfinite(p).all() and np.isfinite(c).all() and (p >= 0).all() and (c >= 0).all()):
        return False
    sp = p.sum(axis=1, keepdims=True)
    sc = c.sum(axis=1, keepdims=True)
    if not ((sp > 0).all() and (sc > 0).all() and np.isfinite(sp).all() and np.isfinite(sc).all()):
        return False
    p = p / sp
    c = c / sc
    m = (p + c) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
        kc = np.where(c > 0, c * np.log2(c / m), 0.0).sum(axis=1)
    out.flags.extend((p.argmax(axis=1) == c.argmax(axis=1)).tolist())
    out.jsd.extend(np.clip((kp + kc) / 2, 0.0, 1.0).tolist())
    return True


# ---------------------------------------------------------------- text


def normalise_text(s: str) -> str:
    """Text as the ``text`` kind compares it: whitespace runs collapsed to one space, stripped."""
    return " ".join(s.split())


def text_similarity(a: str, b: str) -> float:
    """difflib's ratio of two (normalised) texts in [0, 1]; 1.0 for equal texts."""
    if a == b:
        return 1.0
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if max(len(a), len(b)) > _SIMILARITY_MAX_CHARS:
        return matcher.quick_ratio()
    return matcher.ratio()


def _compare_texts(prod: Preds, cand: Preds, min_similarity: float, out: Comparison) -> None:
    # At 1.0 agreement is equality itself: difflib's cheap bound for long texts (quick_ratio)
    # reaches 1.0 for any rearrangement of the same characters.
    exact = min_similarity >= 1.0
    for p, c in zip(prod, cand):  # noqa: B905  equal lengths (compare_predictions checks)
        if not (isinstance(p, str) and isinstance(c, str)):
            out.flags.append(False)
            continue
        np_ = normalise_text(p)
        nc = normalise_text(c)
        similarity = text_similarity(np_, nc)
        out.flags.append(np_ == nc if exact else similarity >= min_similarity)
        out.similarity.append(similarity)
