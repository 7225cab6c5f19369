"""Live drift monitor (issue 7): the production inputs and predictions against a baseline profile.

Hot path: ``wants_bodies`` samples ``drift.sample_rate`` of all production requests, and
``on_exchange`` only appends the captured bodies to a bounded queue (dropped and counted when full).
A background task parses them (orjson), extracts instances with ``compare.preset``, bins every watched
feature against the baseline and writes the bin indices into a ring buffer of the last ``window``
instances, so window counts are exact. PSI and KS are computed when asked (``/shadow/drift``, a
scrape), after processing whatever is still queued.

Definitions (INTERFACE.md, "Drift"): live and baseline shares below 1e-4 are raised to 1e-4;
PSI = sum((live - base) * ln(live / base)); KS = the largest |live CDF - base CDF| over the bin edges
(from the unfloored shares). Status: warn at PSI >= 0.1, alert at >= 0.25.

Without a baseline file the first ``warmup`` instances (and, separately, predictions) are the
baseline; live windows start after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from aiohttp import web

from shadowproxy.admin import json_response
from shadowproxy.errors import ConfigError
from shadowproxy.presets import PresetError, extract_predictions
from shadowproxy.profile import (
    MISSING,
    FeatureProfile,
    InstanceError,
    ProfileError,
    build_feature,
    category_key,
    extract_instances,
    is_number,
    load_profile,
)

if TYPE_CHECKING:
    from shadowproxy.config import CompareConfig, DriftConfig
    from shadowproxy.metrics import Metrics
    from shadowproxy.observers import ExchangeRecord, PairRecord

log = logging.getLogger("shadowproxy.drift")

FLOOR = 1e-4
WARN = 0.1
ALERT = 0.25
BINS = 10
PROCESS_INTERVAL_S = 0.5
PROCESS_BATCH = 256  # records parsed per turn of the loop, so one turn stays short
QUEUE_RECORDS = 10_000
QUEUE_BYTES = 64 * 1024 * 1024
PREDICTION = "prediction"


def psi(live_counts: np.ndarray, base_shares: np.ndarray) -> float:
    """Population Stability Index of live bin counts against baseline shares (both floored at 1e-4)."""
    live = np.maximum(live_counts / live_counts.sum(), FLOOR)
    base = np.maximum(base_shares, FLOOR)
    return float(np.sum((live - base) * np.log(live / base)))


def ks(live_counts: np.ndarray, base_shares: np.ndarray) -> float:
    """Largest |live CDF - base CDF| over the inner bin edges."""
    if len(base_shares) < 2:
        return 0.0
    live_cdf = np.cumsum(live_counts / live_counts.sum())[:-1]
    base_cdf = np.cumsum(base_shares)[:-1]
    return float(np.max(np.abs(live_cdf - base_cdf)))


def status(value: float | None) -> str:
    if value is None:
        return "no_data"
    return "alert" if value >= ALERT else "warn" if value >= WARN else "ok"


class Stream:
    """A sequence of instances (dicts) watched against per-feature profiles over a sliding window.

    Learns the profiles from the first ``warmup`` instances when none are given. Feature names are
    fixed by the profile (or the first instances), at most ``max_features``: request content never
    adds label values beyond that cap.
    """

    def __init__(
        self,
        window: int,
        profiles: Mapping[str, FeatureProfile] | None,
        warmup: int,
        max_features: int,
        only: Sequence[str] = (),
        kind: str | None = None,
    ) -> None:
        self.window = window
        self.warmup = warmup
        self.max_features = max_features
        self.only = set(only)
        self.kind = kind  # forced kind of learned profiles (predictions), None = by the values
        self.seen = 0  # live instances, ever
        self.learning: dict[str, list[object]] | None = None
        self.learned = 0
        self.profiles: list[FeatureProfile] = []
        self.ring = np.empty((0, window), dtype=np.int32)
        self.missing: list[int] = []
        self.invalid: list[int] = []
        if profiles is None:
            self.learning = {}
        else:
            self._freeze(list(profiles.values()))

    @property
    def ready(self) -> bool:
        return self.learning is None

    @property
    def filled(self) -> int:
        return min(self.seen, self.window)

    def _freeze(self, profiles: list[FeatureProfile]) -> None:
        self.profiles = profiles
        self.ring = np.full((len(profiles), self.window), -1, dtype=np.int32)
        self.missing = [0] * len(profiles)
        self.invalid = [0] * len(profiles)
        self.learning = None

    def add(self, rows: list[dict[str, object]]) -> None:
        if self.learning is not None:
            take = min(len(rows), self.warmup - self.learned)
            self._learn(rows[:take])
            rows = rows[take:]
            if self.learned >= self.warmup:
                learning = self.learning
                assert learning is not None
                self._freeze([build_feature(name, values, BINS, self.kind) for name, values in learning.items()])
            if not rows:
                return
        k = len(rows)
        start = self.seen
        self.seen += k
        if k > self.window:
            rows, start = rows[-self.window :], start + k - self.window
            k = self.window
        positions = (start + np.arange(k)) % self.window
        for f, profile in enumerate(self.profiles):
            self.ring[f, positions] = self._bins(f, profile, [row.get(profile.name, MISSING) for row in rows])

    def _learn(self, rows: list[dict[str, object]]) -> None:
        learning = self.learning
        assert learning is not None
        for row in rows:
            if len(learning) < self.max_features:
                for name in row:
                    if name not in learning and len(learning) < self.max_features and (
                        not self.only or name in self.only
                    ):
                        learning[name] = [MISSING] * self.learned
            for name, values in learning.items():
                values.append(row.get(name, MISSING))
            self.learned += 1

    def _bins(self, f: int, profile: FeatureProfile, values: list[object]) -> np.ndarray:
        out = np.full(len(values), -1, dtype=np.int32)
        missing = invalid = 0
        if profile.kind == "numeric":
            where: list[int] = []
            numbers: list[object] = []
            for i, value in enumerate(values):
                if is_number(value):
                    where.append(i)
                    numbers.append(value)
                elif value is MISSING or value is None:
                    missing += 1
                else:
                    invalid += 1
            if numbers:
                array = np.asarray(numbers, dtype=np.float64)
                out[where] = np.searchsorted(profile.edges, array, side="left")
        else:
            label = profile.kind == "label"
            index = profile.index
            other = len(profile.categories)
            for i, value in enumerate(values):
                key = category_key(value, label)
                if key is not None:
                    out[i] = index.get(key, other)
                elif value is MISSING or value is None:
                    missing += 1
                else:
                    invalid += 1
        self.missing[f] += missing
        self.invalid[f] += invalid
        return out

    def counts(self, f: int) -> np.ndarray:
        row = self.ring[f]
        return np.bincount(row[row >= 0], minlength=self.profiles[f].bins)

    def figures(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f, profile in enumerate(self.profiles):
            counts = self.counts(f)
            n = int(counts.sum())
            value = psi(counts, profile.shares) if n else None
            distance = ks(counts, profile.shares) if n and profile.kind == "numeric" else None
            out[profile.name] = {
                "psi": value,
                "ks": distance,
                "status": status(value),
                "missing": self.missing[f],
                "invalid": self.invalid[f],
                "kind": profile.kind,
                "count": n,
            }
        return out


class DriftMonitor:
    """The drift component: an observer with a background task, `/shadow/drift` and a collector."""

    def __init__(self, config: DriftConfig, compare: CompareConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.compare = compare
        self.rate = config.sample_rate
        baseline_predictions: FeatureProfile | None = None
        features: dict[str, FeatureProfile] | None = None
        if config.baseline:
            try:
                profile = load_profile(config.baseline)
            except ProfileError as exc:
                raise ConfigError([f"drift.baseline: {exc}"]) from None
            unknown = [name for name in config.features if name not in profile.features]
            if unknown:
                raise ConfigError([f"drift.features: not in the baseline {config.baseline}: {', '.join(unknown)}"])
            names = list(config.features) or list(profile.features)
            if len(names) > config.max_features:
                log.warning("drift: watching the first %d of %d baseline features", config.max_features, len(names))
            features = {name: profile.features[name] for name in names[: config.max_features]}
            baseline_predictions = profile.predictions
        self.features = Stream(config.window, features, config.warmup, config.max_features, config.features)
        self.predictions: Stream | None = None
        kind = {"label": "label", "numeric": "numeric"}.get(compare.kind)
        if baseline_predictions is not None:
            self.predictions = Stream(config.window, {PREDICTION: baseline_predictions}, 0, 1)
        elif kind is not None:
            self.predictions = Stream(config.window, None, config.warmup, 1, kind=kind)
        self.queue: deque[tuple[bytes, bytes | None]] = deque()
        self.queued_bytes = 0
        self.dropped = 0
        self.unparseable = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cache: tuple[tuple[int, ...], dict[str, Any]] | None = None
        if metrics is not None:
            metrics.drift.source = self

    # -- hot path ---------------------------------------------------------------------------------

    every_exchange = False  # only the sampled requests matter (see observers.Observer)

    def wants_bodies(self) -> bool:
        rate = self.rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def on_exchange(self, record: ExchangeRecord, wanted: bool) -> None:
        body = record.request_body
        if not wanted or body is None:
            return
        size = len(body) + len(record.response_body or b"")
        if len(self.queue) >= QUEUE_RECORDS or self.queued_bytes + size > QUEUE_BYTES:
            self.dropped += 1
            return
        self.queue.append((body, record.response_body))
        self.queued_bytes += size
        if len(self.queue) >= PROCESS_BATCH:
            self._wake.set()

    def on_pair(self, record: PairRecord) -> None:
        pass

    # -- off the hot path -------------------------------------------------------------------------

    def process(self, limit: int | None = None) -> int:
        """Parse, extract and bin up to `limit` queued records (all when None); return how many."""
        queue = self.queue
        n = len(queue) if limit is None else min(limit, len(queue))
        rows: list[dict[str, object]] = []
        predictions: list[dict[str, object]] = []
        preset, compare = self.compare.preset, self.compare
        for _ in range(n):
            body, answer = queue.popleft()
            self.queued_bytes -= len(body) + len(answer or b"")
            try:
                instances = extract_instances(orjson.loads(body), preset)
            except (orjson.JSONDecodeError, InstanceError):
                self.unparseable += 1
                continue
            rows.extend(instances)
            if answer is not None and self.predictions is not None:
                try:
                    values = extract_predictions(orjson.loads(answer), preset, compare.path, compare.output)
                except (orjson.JSONDecodeError, PresetError):
                    continue
                predictions.extend({PREDICTION: value} for value in values)
        if rows:
            self.features.add(rows)
        if predictions and self.predictions is not None:
            self.predictions.add(predictions)
        return n

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROCESS_INTERVAL_S)
            self._wake.clear()
            while self.queue:
                try:
                    self.process(PROCESS_BATCH)
                except Exception:  # a bug here must not stop monitoring, nor the proxy
                    log.exception("drift: processing failed")
                await asyncio.sleep(0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- figures ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The `/shadow/drift` document, after processing everything queued."""
        self.process()
        predictions = self.predictions
        key = (
            self.features.seen, self.features.learned, self.dropped, self.unparseable,
            predictions.seen + predictions.learned if predictions else 0,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        features = self.features
        doc: dict[str, Any] = {
            "window": features.filled,
            "features": features.figures(),
            "predictions": None,
            "baseline": self.config.baseline or "warmup",
            "warming_up": not features.ready,
            "warmup": {"seen": features.learned, "needed": self.config.warmup} if not self.config.baseline else None,
            "watched": features.learned + features.seen,  # instances read, ever (warm-up included)
            "dropped": self.dropped,
            "unparseable": self.unparseable,
        }
        if predictions is not None and predictions.ready:
            figures = predictions.figures()[PREDICTION]
            doc["predictions"] = {**figures, "window": predictions.filled}
        elif predictions is not None:
            doc["predictions"] = {"psi": None, "status": "no_data", "window": 0, "warming_up": True}
        self._cache = (key, doc)
        return doc

    def routes(self) -> list[web.RouteDef]:
        async def drift(request: web.Request) -> web.Response:
            return json_response(self.snapshot())

        return [web.get("/shadow/drift", drift)]

    def stats_blocks(self) -> dict[str, Any]:
        return {}
