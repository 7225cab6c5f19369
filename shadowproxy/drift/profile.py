"""Baseline profiles for drift monitoring: where the instances are, and what they look like.

A profile holds, per feature, what the drift monitor compares the live window with:

- numeric features: the bin edges (``numpy.quantile`` at the inner ``k/bins`` levels, default
  method) and the share of baseline values in each bin; a value falls in bin
  ``numpy.searchsorted(edges, v, side="left")``, the outer bins open;
- categorical features (strings and booleans): the shares of the top 50 categories, the rest
  pooled as ``other`` (a category never seen in the baseline also lands there);
- optionally the production predictions, as ``label`` (category shares of any scalar) or numeric.

File format (JSON, written by ``shadowproxy profile``)::

    {"format": "shadowproxy-profile", "version": 1, "preset": "kserve-v1", "bins": 10, "instances": n,
     "features": {"f0": {"kind": "numeric", "edges": [...], "shares": [...], "count": n,
                         "missing": n, "invalid": n, "mean": x, "std": x},
                  "color": {"kind": "categorical", "categories": ["red", ...], "shares": [...],
                            "other": x, "count": n, "missing": n, "invalid": n}},
     "predictions": {... one profile like the above, kind numeric or label ...} or null}

Request-side instances per preset (``extract_instances``): ``kserve-v1``, ``tf-serving`` and ``json``
read ``{"instances": [...]}``; ``mlflow`` reads ``dataframe_split`` {columns, data},
``dataframe_records``, ``instances`` or ``inputs``; ``oip-v2`` reads ``inputs[*]`` (name, shape,
data) and names the features ``name[k]``. A list instance gives ``f0, f1, ...`` (or the names of a
top-level ``feature_names`` list), a dict its keys, a scalar ``f0``. Bad data never raises past
this module's callers: it is ``InstanceError`` (unusable request) or counted missing / invalid.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shadowproxy.judging.presets import flatten

__all__ = [
    "MISSING",
    "FeatureProfile",
    "InstanceError",
    "Profile",
    "ProfileError",
    "build_feature",
    "build_profile",
    "category_key",
    "extract_instances",
    "load_profile",
    "quantile_levels",
]

FORMAT = "shadowproxy-profile"
VERSION = 1
TOP_CATEGORIES = 50
OTHER = "other"
KINDS = ("numeric", "categorical", "label")
_MISSING_TYPE = type("Missing", (), {"__repr__": lambda self: "MISSING"})
MISSING: Any = _MISSING_TYPE()  # a feature absent from an instance (as opposed to an explicit null)


class InstanceError(ValueError):
    """The request does not hold instances where the preset says they are."""


class ProfileError(ValueError):
    """A baseline profile file that cannot be used; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------------
# Instances


def extract_instances(doc: object, preset: str) -> list[dict[str, object]]:
    """One ``{feature: value}`` per instance of a parsed request body."""
    if not isinstance(doc, dict):
        raise InstanceError("request body is not a JSON object")
    names = doc.get("feature_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = None
    if preset == "oip-v2":
        return _oip_v2_instances(doc)
    if preset == "mlflow":
        split = doc.get("dataframe_split")
        if isinstance(split, dict):
            columns, data = split.get("columns"), split.get("data")
            if not isinstance(data, list):
                raise InstanceError("dataframe_split has no 'data' list")
            if isinstance(columns, list) and all(isinstance(c, str) for c in columns):
                names = columns
            return instance_rows(data, names)
        records = doc.get("dataframe_records")
        if isinstance(records, list):
            return instance_rows(records, names)
        inputs = doc.get("inputs")
        if isinstance(inputs, dict):  # columnar {"a": [..], "b": [..]}
            return _columns(inputs)
        if isinstance(inputs, list):
            return instance_rows(inputs, names)
    instances = doc.get("instances")
    if not isinstance(instances, list):
        raise InstanceError("request has no 'instances' list")
    return instance_rows(instances, names)


def instance_rows(instances: list[object], names: list[str] | None) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    cache: list[str] = list(names or ())
    for instance in instances:
        if isinstance(instance, dict):
            rows.append(instance)
        elif isinstance(instance, list):
            if len(instance) > len(cache):
                cache.extend(f"f{i}" for i in range(len(cache), len(instance)))
            rows.append(dict(zip(cache, instance, strict=False)))
        else:
            rows.append({cache[0] if cache else "f0": instance})
    return rows


def _columns(columns: Mapping[str, object]) -> list[dict[str, object]]:
    lists = {name: col for name, col in columns.items() if isinstance(col, list)}
    n = max((len(col) for col in lists.values()), default=0)
    return [{name: col[i] for name, col in lists.items() if i < len(col)} for i in range(n)]


def _oip_v2_instances(doc: Mapping[str, object]) -> list[dict[str, object]]:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InstanceError("request has no 'inputs' list")
    rows: list[dict[str, object]] = []
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise InstanceError("an input is not an object")
        name, shape, data = tensor.get("name"), tensor.get("shape"), tensor.get("data")
        if not isinstance(name, str) or not isinstance(shape, list) or not shape or not isinstance(data, list):
            raise InstanceError("an input lacks name, shape or data")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InstanceError(f"input {name!r}: bad shape {shape}")
        flat = flatten(data) if data and isinstance(data[0], list) else data
        n, width = shape[0], math.prod(shape[1:])
        if len(flat) != n * width:
            raise InstanceError(f"input {name!r}: {len(flat)} elements, shape {shape} needs {n * width}")
        keys = [f"{name}[{k}]" for k in range(width)]
        while len(rows) < n:
            rows.append({})
        for i in range(n):
            rows[i].update(zip(keys, flat[i * width : (i + 1) * width], strict=True))
    return rows


# ---------------------------------------------------------------------------------------------------
# Profiles


def quantile_levels(bins: int) -> np.ndarray:
    """The inner quantile levels: k/bins for k = 1..bins-1 (the deciles for 10 bins)."""
    return np.arange(1, bins) / bins


def category_key(value: object, label: bool) -> str | None:
    """A categorical value's key, or None when the value is not categorical. Strings and booleans are
    categories; for ``label`` predictions any scalar is (a class id 3 is the category "3")."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if label and isinstance(value, int | float):
        return orjson.dumps(value).decode()
    return None


def is_number(value: object) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -1e308 < value < 1e308


@dataclass(slots=True)
class FeatureProfile:
    """One feature's baseline. ``shares`` has one entry per bin (numeric) or per category plus a last
    one for ``other`` (categorical, label)."""

    name: str
    kind: str
    shares: np.ndarray
    edges: np.ndarray = field(default_factory=lambda: np.empty(0))
    categories: list[str] = field(default_factory=list)
    count: int = 0
    missing: int = 0
    invalid: int = 0
    mean: float | None = None
    std: float | None = None
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.categories)}

    @property
    def bins(self) -> int:
        return len(self.shares)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "numeric":
            out["edges"] = self.edges.tolist()
            out["shares"] = self.shares.tolist()
            out["mean"], out["std"] = self.mean, self.std
        else:
            out["categories"] = list(self.categories)
            out["shares"] = self.shares[:-1].tolist()
            out[OTHER] = float(self.shares[-1])
        out.update(count=self.count, missing=self.missing, invalid=self.invalid)
        return out

    @classmethod
    def from_json(cls, name: str, data: object) -> FeatureProfile:
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            raise ProfileError(f"feature {name!r}: kind must be one of {', '.join(KINDS)}")
        try:
            shares = [float(x) for x in data["shares"]]
            if data["kind"] == "numeric":
                edges = np.asarray([float(x) for x in data["edges"]], dtype=np.float64)
                if len(edges) + 1 != len(shares) or np.any(np.diff(edges) < 0):
                    raise ProfileError(f"feature {name!r}: needs sorted edges and one share more than edges")
                return cls(name, "numeric", np.asarray(shares), edges=edges, count=int(data.get("count", 0)))
            categories = [str(c) for c in data["categories"]]
            if len(categories) != len(shares):
                raise ProfileError(f"feature {name!r}: one share per category needed")
            shares.append(float(data.get(OTHER, 0.0)))
            return cls(name, data["kind"], np.asarray(shares), categories=categories, count=int(data.get("count", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"feature {name!r}: malformed ({exc})") from None


def build_feature(name: str, values: Iterable[object], bins: int = 10, kind: str | None = None) -> FeatureProfile:
    """Profile one feature's baseline values. ``kind`` None: numeric when at least as many values are
    numbers as are strings or booleans; values of the other kind count as invalid."""
    numbers: list[float] = []
    keys: list[str] = []
    missing = invalid = 0
    for value in values:
        if value is None or value is MISSING:
            missing += 1
        elif is_number(value):
            numbers.append(value)  # type: ignore[arg-type]
            if kind == "label":
                keys.append(orjson.dumps(value).decode())
        elif (key := category_key(value, False)) is not None:
            keys.append(key)
        else:
            invalid += 1
    if kind is None:
        kind = "numeric" if len(numbers) >= len(keys) else "categorical"
    if kind == "numeric":
        invalid += len(keys)
        data = np.asarray(numbers, dtype=np.float64)
        if data.size == 0:
            edges, shares = np.zeros(bins - 1), np.full(bins, 1.0 / bins)
        else:
            edges = np.quantile(data, quantile_levels(bins))
            counts = np.bincount(np.searchsorted(edges, data, side="left"), minlength=bins)
            shares = counts / data.size
        return FeatureProfile(
            name, "numeric", shares, edges=edges, count=int(data.size), missing=missing, invalid=invalid,
            mean=float(data.mean()) if data.size else None, std=float(data.std()) if data.size else None,
        )
    if kind == "categorical":
        invalid += len(numbers)
    counted = Counter(keys)
    top = [key for key, _ in counted.most_common(TOP_CATEGORIES)]
    total = len(keys)
    shares_list = [counted[key] / total for key in top] if total else []
    other = (total - sum(counted[key] for key in top)) / total if total else 0.0
    return FeatureProfile(
        name, kind, np.asarray([*shares_list, other]), categories=top, count=total, missing=missing,
        invalid=invalid,
    )


@dataclass(slots=True)
class Profile:
    features: dict[str, FeatureProfile]
    predictions: FeatureProfile | None = None
    preset: str = ""
    bins: int = 10
    instances: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "preset": self.preset,
            "bins": self.bins,
            "instances": self.instances,
            "features": {name: f.to_json() for name, f in self.features.items()},
            "predictions": self.predictions.to_json() if self.predictions is not None else None,
        }


def scalar_predictions(values: list[object]) -> list[object]:
    """``values`` with each one-element list replaced by its element: a model whose output has
    shape (n, 1) answers one number (or label) per instance as ``[0.7]``. Checked on the first
    value, so a batch of scalars costs one type test."""
    if values and type(values[0]) is list:
        return [v[0] if type(v) is list and len(v) == 1 else v for v in values]
    return values


def build_profile(
    rows: Sequence[Mapping[str, object]],
    bins: int = 10,
    max_features: int = 100,
    only: Sequence[str] = (),
    predictions: Sequence[object] | None = None,
    prediction_kind: str | None = None,
    preset: str = "",
) -> Profile:
    """Profile instances (dicts of feature -> value). Features are named in order of first appearance,
    at most ``max_features`` (or exactly ``only`` when given)."""
    names: list[str] = list(only)
    if not names:
        seen: dict[str, None] = {}
        for row in rows:
            for name in row:
                if len(seen) >= max_features:
                    break
                seen.setdefault(name, None)
            if len(seen) >= max_features:
                break
        names = list(seen)
    features = {name: build_feature(name, (row.get(name, MISSING) for row in rows), bins) for name in names}
    prediction_profile = None
    if predictions:
        prediction_profile = build_feature("prediction", scalar_predictions(list(predictions)), bins, prediction_kind)
    return Profile(features, prediction_profile, preset=preset, bins=bins, instances=len(rows))


def load_profile(path: str | Path) -> Profile:
    """Read a profile file; ProfileError (one line) for anything unusable."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ProfileError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"{path} is not a shadowproxy profile (written by `shadowproxy profile`)")
    if data.get("version") != VERSION:
        raise ProfileError(f"{path}: profile version {data.get('version')!r} is not {VERSION}")
    raw = data.get("features")
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: 'features' must be an object")
    features = {str(name): FeatureProfile.from_json(str(name), f) for name, f in raw.items()}
    predictions = data.get("predictions")
    return Profile(
        features,
        FeatureProfile.from_json("prediction", predictions) if predictions is not None else None,
        preset=str(data.get("preset", "")),
        bins=int(data.get("bins", 10)),
        instances=int(data.get("instances", 0)),
    )
