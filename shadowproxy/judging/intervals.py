"""The confidence intervals the gates decide on.

- ``wilson_interval``: the Wilson score interval of one proportion (disagreement, accuracy).
- ``newcombe_interval``: Newcombe's hybrid score interval for the difference of two independent
  proportions, built from their Wilson intervals (Newcombe, Statistics in Medicine 17, 1998,
  method 10; statsmodels' ``confint_proportions_2indep(method="newcomb")``).
- ``paired_newcombe_interval``: the same for two proportions measured on the same items (a paired
  2x2 table), with the correlation between the two sides folded in (Newcombe, Statistics in
  Medicine 17, 1998, "Improved confidence intervals for the difference between binomial
  proportions based on paired data", method 10).
- ``quantile_rank_bounds``: distribution-free bounds for a quantile, as the ranks of two order
  statistics chosen with the exact binomial distribution (Hahn & Meeker, *Statistical Intervals*,
  chapter 5). For ``n`` values from any distribution, the number of them at or below its ``q``-quantile
  is at least Binomial(n, q), so ``P(X_(l) <= x_q <= X_(u)) >= P(l <= B <= u - 1)``.

Everything is plain arithmetic on counts: nothing here depends on how the counts were merged.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "Z95",
    "binomial_cdf_window",
    "newcombe_interval",
    "paired_newcombe_interval",
    "quantile_rank_bounds",
    "wilson_interval",
]

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal: two-sided 95%

# The window of the binomial distribution that is summed: mean ± (15 standard deviations + 40).
# By Bernstein's inequality the mass left outside is below 2 * exp(-60) for every n and p, far
# under the 1.25% tails the ranks are chosen at, so the sums are those of the whole distribution.
_WINDOW_SDS = 15.0
_WINDOW_EXTRA = 40


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lower = 0.0 if k == 0 else max(0.0, center - half)
    upper = 1.0 if k == n else min(1.0, center + half)
    return (lower, upper)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for ``k1/n1 - k2/n2`` (95% by default).

    With ``(l1, u1)`` and ``(l2, u2)`` the Wilson intervals of the two proportions::

        lower = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        upper = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    (-1, 1) when either side has no trials.
    """
    if n1 <= 0 or n2 <= 0:
        return (-1.0, 1.0)
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    p1 = k1 / n1
    p2 = k2 / n2
    d = p1 - p2
    lower = d - math.hypot(p1 - l1, u2 - p2)
    upper = d + math.hypot(u1 - p1, p2 - l2)
    return (max(-1.0, lower), min(1.0, upper))


def paired_newcombe_interval(both: int, first: int, second: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's score interval (method 10) for ``p1 - p2`` on paired data (95% by default).

    The table counts items where both events happened, only the first, only the second, and
    neither: ``p1 = (both + first) / n``, ``p2 = (both + second) / n``. With ``(l1, u1)`` and
    ``(l2, u2)`` their Wilson intervals and ``phi`` the table's correlation (its numerator
    ``both * neither - first * second`` shrunk towards 0 by ``n / 2`` when positive, and ``phi`` 0
    when a margin is empty)::

        lower = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        upper = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

    (-1, 1) when the table is empty.
    """
    if min(both, first, second, neither) < 0:
        raise ValueError("need non-negative counts")
    n = both + first + second + neither
    if n == 0:
        return (-1.0, 1.0)
    k1 = both + first
    k2 = both + second
    l1, u1 = wilson_interval(k1, n, z)
    l2, u2 = wilson_interval(k2, n, z)
    p1 = k1 / n
    p2 = k2 / n
    d = p1 - p2
    margins = float(k1) * (n - k1) * k2 * (n - k2)
    phi = 0.0
    if margins > 0:
        cross = both * neither - first * second
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    down1, up2 = p1 - l1, u2 - p2
    up1, down2 = u1 - p1, p2 - l2
    lower = d - math.sqrt(max(0.0, down1 * down1 - 2 * phi * down1 * up2 + up2 * up2))
    upper = d + math.sqrt(max(0.0, up1 * up1 - 2 * phi * up1 * down2 + down2 * down2))
    return (max(-1.0, lower), min(1.0, upper))


def binomial_cdf_window(n: int, p: float) -> tuple[int, np.ndarray[Any, Any]]:
    """``(first, cdf)`` with ``cdf[i] = P(B <= first + i)`` for ``B ~ Binomial(n, p)``, over the
    stretch of ``k`` that holds all but a negligible share of the mass (see ``_WINDOW_SDS``).

    Exact up to floating-point rounding, for any ``n``: the probabilities are built in log space
    from the ratio of neighbours, ``P(k+1) / P(k) = (n - k) / (k + 1) * p / (1 - p)``, and
    normalised over the window, so no binomial coefficient is ever formed and the cost grows with
    the standard deviation, not with ``n`` (a few thousand terms for ten million values).
    """
    if n < 0:
        raise ValueError(f"need n >= 0, got {n}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"need 0 < p < 1, got {p}")
    mean = n * p
    span = math.ceil(_WINDOW_SDS * math.sqrt(mean * (1.0 - p))) + _WINDOW_EXTRA
    first = max(0, math.floor(mean) - span)
    last = min(n, math.ceil(mean) + span)
    k = np.arange(first, last, dtype=np.float64)
    steps = np.log(n - k) - np.log(k + 1.0) + math.log(p / (1.0 - p))
    log_pmf = np.concatenate((np.zeros(1), np.cumsum(steps)))
    pmf = np.exp(log_pmf - log_pmf.max())
    cdf: np.ndarray[Any, Any] = np.cumsum(pmf) / pmf.sum()
    return first, cdf


@lru_cache(maxsize=256)
def quantile_rank_bounds(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks ``(l, u)`` of the order statistics that bound the ``q``-quantile of the
    distribution ``n`` values came from, with ``P(X_(l) <= x_q <= X_(u)) >= confidence``.

    Two-sided with equal tails: ``l`` is the largest rank with ``P(B <= l - 1) <= (1 - c) / 2``
    (the chance that ``X_(l)`` lies above the quantile) and ``u`` the smallest with
    ``P(B >= u) <= (1 - c) / 2`` (the chance that ``X_(u)`` lies below it), for
    ``B ~ Binomial(n, q)``. Either is None when no rank within ``1..n`` qualifies: too few values
    for that side (the upper rank of the 0.99-quantile at 97.5% needs 437 values).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"need 0 < q < 1, got {q}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    if n <= 0:
        return (None, None)
    tail = (1.0 - confidence) / 2.0
    first, cdf = binomial_cdf_window(n, q)
    # F(k) <= tail for every k below the window (its mass is negligible) and for the first
    # `below` entries of it, so l - 1 = first + below - 1.
    below = int(np.searchsorted(cdf, tail, side="right"))
    lower = first + below
    # The first k with F(k) >= 1 - tail is u - 1; the window always holds one (F(last) = 1).
    upper = first + int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1
    return (lower if lower >= 1 else None, upper if upper <= n else None)
