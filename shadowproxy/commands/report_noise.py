"""`report` sections for production's noise and for where answers differ: the [secondary]'s noise
and net rates, the fields of `compare.kind = "fields"`, and which way labels flip."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FIELDS_SHOWN", "field_lines", "flip_lines", "flip_shares", "noise_lines"]

Paint = Callable[..., str]
FIELDS_SHOWN = 10  # fields listed by net difference rate


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def noise_lines(stats: Mapping[str, Any], paint: Paint) -> list[str]:
    """With a [secondary]: noise, raw and net disagreement over the predictions all three answered."""
    comparisons = stats.get("comparisons") or {}
    noise, net = comparisons.get("noise"), comparisons.get("net")
    if not isinstance(noise, Mapping) or not isinstance(net, Mapping):
        return []
    n = int(noise.get("compared", 0))
    lines = ["Noise (production against its secondary copy)"]
    if not n:
        lines.append(f"  nothing compared with the secondary yet ({noise.get('missing', 0)} predictions left out)")
        return lines
    nlo, nhi = noise["ci95"]
    lo, hi = net["ci95"]
    lines += [
        f"  noise {_pct(float(noise['rate']))}  (95% interval {_pct(float(nlo))} - {_pct(float(nhi))})"
        f" over {n} predictions, {noise.get('missing', 0)} left out (no usable secondary answer)",
        f"  net disagreement {paint(_pct(float(net['rate'])), 'bold')}  (95% interval {_pct(float(lo))} -"
        f" {_pct(float(hi))}) = raw {_pct(float(net['raw_rate']))} less noise {_pct(float(noise['rate']))}",
    ]
    return lines


def _field_rates(row: Mapping[str, Any]) -> tuple[float, float]:
    compared = int(row.get("compared", 0))
    noise_compared = int(row.get("noise_compared", 0))
    raw = int(row.get("differ", 0)) / compared if compared else 0.0
    noise = int(row.get("noise_differ", 0)) / noise_compared if noise_compared else 0.0
    return raw, noise


def field_lines(stats: Mapping[str, Any], paint: Paint) -> list[str]:
    """compare.kind "fields": the fields with the highest net difference rates, and the noisy ones."""
    fields = stats.get("fields")
    if not isinstance(fields, Mapping) or not fields:
        return []
    rated = []
    for pointer, row in fields.items():
        raw, noise = _field_rates(row)
        rated.append((raw - noise, raw, noise, str(pointer), row))
    rated.sort(key=lambda t: (-t[0], t[3]))
    lines = [f"Fields by net difference rate (top {min(FIELDS_SHOWN, len(rated))} of {len(rated)})"]
    width = max(len(t[3]) for t in rated[:FIELDS_SHOWN])
    for net, raw, noise, pointer, row in rated[:FIELDS_SHOWN]:
        text = f"  {pointer.ljust(width)}  net {_pct(net)}  (differ {row.get('differ', 0)} of {row.get('compared', 0)}"
        text += f", raw {_pct(raw)}, noise {_pct(noise)})"
        lines.append(paint(text, "dim") if row.get("noisy") else text)
    noisy = [t for t in rated if t[4].get("noisy")]
    if noisy:
        lines.append("  noisy, left out of agreement: " + ", ".join(
            f"{pointer} ({_pct(noise)} noise)" for _, _, noise, pointer, _ in sorted(noisy, key=lambda t: t[3])
        ))
    overflow = int(stats.get("fields_overflow", 0) or 0)
    if overflow:
        lines.append(f"  {overflow} leaves of fields beyond the tracked ones not counted")
    return lines


def flip_shares(confusion: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """The disagreeing label pairs (off the diagonal) and each class's share of them as the
    candidate's label: which way the candidate flips."""
    labels = [str(label) for label in confusion.get("labels", [])]
    matrix = confusion.get("matrix", [])
    toward = dict.fromkeys(labels, 0)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if i != j:
                toward[labels[j]] += int(n)
    flips = sum(toward.values())
    return flips, {label: n / flips for label, n in toward.items()} if flips else {}


def flip_lines(stats: Mapping[str, Any], name: str = "") -> list[str]:
    """Label kind: the share of flips toward each class ("candidate more permissive" at a glance);
    `name`: the candidate's, when there are several."""
    flips, shares = flip_shares(stats.get("confusion") or {})
    if not flips:
        return []
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = ", ".join(f"{label} {_pct(share)}" for label, share in ranked if share > 0)
    whose = f" of {name}" if name else ""
    return [f"Flips toward each class{whose} (the candidate's label, of {flips} disagreeing labels): {parts}"]
