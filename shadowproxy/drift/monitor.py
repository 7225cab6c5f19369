"""Live drift monitor: the production inputs and predictions against a baseline profile.

Hot path: ``wants_bodies`` samples ``drift.sample_rate`` of all production requests, and
``on_exchange`` only appends the captured bodies to a bounded queue (dropped and counted when full).
A background task parses them (orjson), extracts instances with ``compare.preset``, bins every watched
feature against the baseline and writes the bin indices into a ring buffer of the last ``window``
instances, so window counts are exact. PSI and KS are computed when asked (``/shadow/drift``, a
scrape), after processing whatever is still queued.

Definitions (docs/comparison.md, "PSI, KS and status"): live and baseline shares below 1e-4 are
raised to 1e-4; PSI = sum((live - base) * ln(live / base)); KS = the largest |live CDF - base CDF|
over the bin edges (from the unfloored shares). Status: warn at PSI >= 0.1, alert at >= 0.25.

Without a baseline file the first ``warmup`` instances (and, separately, predictions) are the
baseline; live windows start after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from aiohttp import web

from shadowproxy.drift.profile import (
    MISSING,
    FeatureProfile,
    InstanceError,
    Profile,
    ProfileError,
    build_feature,
    category_key,
    extract_instances,
    instance_rows,
    is_number,
    load_profile,
    scalar_predictions,
)
from shadowproxy.errors import ConfigError
from shadowproxy.judging.presets import PresetError, extract_predictions
from shadowproxy.shadow.routes import json_response

if TYPE_CHECKING:
    from shadowproxy.config import CompareConfig, DriftConfig
    from shadowproxy.shadow.metrics import Metrics
    from shadowproxy.shadow.observers import ExchangeRecord, PairRecord

log = logging.getLogger("shadowproxy.drift.monitor")

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


_INSTANCES_LIST = ("kserve-v1", "tf-serving")  # presets whose requests hold an "instances" list


def _list_columns(instances: list[object], profiles: Sequence[FeatureProfile], bools: bool) -> list[np.ndarray] | None:
    """The watched columns of list instances (``f0, f1, ...``) as float arrays, when every instance is
    a list of finite numbers long enough and every watched feature is numeric; else None."""
    if bools or not profiles:
        return None
    columns: list[int] = []
    for profile in profiles:
        name = profile.name
        if profile.kind != "numeric" or name[:1] != "f" or not name[1:].isdigit() or name != f"f{int(name[1:])}":
            return None
        columns.append(int(name[1:]))
    try:
        matrix = np.array(instances)
    except (ValueError, TypeError, OverflowError):
        return None
    if matrix.ndim != 2 or matrix.dtype.kind not in "fi" or matrix.shape[1] <= max(columns):
        return None
    matrix = matrix.astype(np.float64, copy=False)
    return [matrix[:, c] for c in columns]


def _number_array(values: Sequence[object]) -> np.ndarray | None:
    """`values` as float64 when every one is an int or a float (JSON from orjson: finite), else None.
    The caller has ruled out booleans, which numpy would take for 0 and 1."""
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "fi":
        return None
    return array.astype(np.float64, copy=False)


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

    def add(self, rows: list[dict[str, object]], may_hold_bools: bool = True) -> None:
        """Instances as ``{feature: value}`` rows (learned from while warming up)."""
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
        if len(rows) > self.window:  # only the last window's instances count (and are checked)
            self.seen += len(rows) - self.window
            rows = rows[-self.window :]
        self.add_columns(len(rows), [[row.get(p.name, MISSING) for row in rows] for p in self.profiles],
                         may_hold_bools)

    def add_columns(
        self, k: int, columns: Sequence[Sequence[object] | np.ndarray], may_hold_bools: bool = True
    ) -> None:
        """`k` instances given per watched feature (in profile order): a list of parsed JSON values
        (MISSING where absent), or a float array of numbers already checked. Only when ready."""
        start = self.seen
        self.seen += k
        if k > self.window:
            columns = [column[k - self.window :] for column in columns]
            start, k = start + k - self.window, self.window
        positions = (start + np.arange(k)) % self.window
        for f, (profile, values) in enumerate(zip(self.profiles, columns, strict=True)):
            self.ring[f, positions] = self._bins(f, profile, values, may_hold_bools)

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

    def _bins(self, f: int, profile: FeatureProfile, values: Sequence[object] | np.ndarray,
              may_hold_bools: bool) -> np.ndarray:
        if profile.kind == "numeric":
            numbers = values if isinstance(values, np.ndarray) else None if may_hold_bools else _number_array(values)
            if numbers is not None:  # every value a finite number: binned in one call
                return np.searchsorted(profile.edges, numbers, side="left").astype(np.int32)
        out = np.full(len(values), -1, dtype=np.int32)
        missing = invalid = 0
        if profile.kind == "numeric":
            where: list[int] = []
            found: list[object] = []
            for i, value in enumerate(values):
                if is_number(value):
                    where.append(i)
                    found.append(value)
                elif value is MISSING or value is None:
                    missing += 1
                else:
                    invalid += 1
            if found:
                array = np.asarray(found, dtype=np.float64)
                out[where] = np.searchsorted(profile.edges, array, side="left")
        else:
            label = profile.kind == "label"
            index = profile.index
            other = len(profile.categories)
            known: dict[object, int] = {}  # str, int and float values seen in this call -> bin
            for i, value in enumerate(values):
                kind = type(value)
                if kind is str or kind is int or kind is float:
                    # (type, value) keys: 1, 1.0 and True are equal in a dict but not the same category.
                    memo = (kind, value)
                    bin_ = known.get(memo)
                    if bin_ is None:
                        key = category_key(value, label)
                        bin_ = -2 if key is None else index.get(key, other)
                        known[memo] = bin_
                    if bin_ >= 0:
                        out[i] = bin_
                        continue
                    invalid += 1
                    continue
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
        # Under preset openai compare.kind is ignored, and free text makes no label distribution.
        kind = None if compare.preset == "openai" else {"label": "label", "numeric": "numeric"}.get(compare.kind)
        if baseline_predictions is not None:
            self.predictions = Stream(config.window, {PREDICTION: baseline_predictions}, 0, 1)
        elif kind is not None:
            self.predictions = Stream(config.window, None, config.warmup, 1, kind=kind)
        # Two parallel lists, not a deque of (body, answer) tuples: no tuple per record for the
        # garbage collector to allocate and traverse.
        self.queue: list[bytes] = []  # request bodies
        self.answers: list[bytes | None] = []  # production's answers, in step
        self.queued_bytes = 0
        self.dropped = 0
        self.unparseable = 0
        # Batches of list instances binned in one numpy call per feature, or value by value.
        self.list_batches_vectorised = 0
        self.list_batches_by_value = 0
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
        answer = record.response_body
        size = len(body) + len(answer) if answer is not None else len(body)
        queue = self.queue
        if len(queue) >= QUEUE_RECORDS or self.queued_bytes + size > QUEUE_BYTES:
            self.dropped += 1
            return
        queue.append(body)
        self.answers.append(answer)
        self.queued_bytes += size
        if len(queue) == PROCESS_BATCH:
            self._wake.set()

    def on_pair(self, record: PairRecord) -> None:
        pass

    # -- off the hot path -------------------------------------------------------------------------

    def process(self, limit: int | None = None) -> int:
        """Parse, extract and bin up to `limit` queued records (all when None); return how many.

        A batch at a time: instances and predictions are gathered from every body first, then each
        watched feature is binned in one numpy call when its values are all numbers (the usual case),
        value by value otherwise (missing, invalid, categorical)."""
        queue = self.queue
        n = len(queue) if limit is None else min(limit, len(queue))
        if not n:
            return 0
        batch = queue[:n]
        batch_answers = self.answers[:n]
        del queue[:n]
        del self.answers[:n]
        bodies = b"\n".join(batch)
        present = [answer for answer in batch_answers if answer is not None]
        answers = b"\n".join(present)
        # What on_exchange counted: the bytes without the joins' separators.
        size = len(bodies) - (n - 1)
        if present:
            size += len(answers) - (len(present) - 1)
        self.queued_bytes -= size
        listed = self.compare.preset in _INSTANCES_LIST and not self.compare.path
        watch_predictions = self.predictions is not None
        instances: list[object] = []  # raw instances of the kserve-v1 shape (lists, dicts, scalars)
        rows: list[dict[str, object]] = []  # instances of any other shape, as rows
        values: list[object] = []
        loads = orjson.loads
        for body, answer in zip(batch, batch_answers):  # noqa: B905  plain zip compiles to a loop; in step
            try:
                doc = loads(body)
                fast = (
                    listed and type(doc) is dict and "feature_names" not in doc and type(doc.get("instances")) is list
                )
                if fast and not rows:
                    instances.extend(doc["instances"])
                else:  # from here on everything goes as rows, to keep arrival order (the window evicts the oldest)
                    if instances:
                        rows.extend(instance_rows(instances, None))
                        instances = []
                    rows.extend(
                        instance_rows(doc["instances"], None) if fast else extract_instances(doc, self.compare.preset)
                    )
            except (orjson.JSONDecodeError, InstanceError):
                self.unparseable += 1
                continue
            if answer is not None and watch_predictions:
                try:
                    reply = loads(answer)
                except orjson.JSONDecodeError:
                    continue
                if listed and type(reply) is dict and type(reply.get("predictions")) is list:
                    values.extend(reply["predictions"])
                else:
                    values.extend(self._predictions_of(reply))
        bools = b"true" in bodies or b"false" in bodies  # numpy would take booleans for numbers
        features = self.features
        if rows or (instances and not features.ready):
            rows.extend(instance_rows(instances, None))
            features.add(rows, bools)
        elif instances:
            columns = _list_columns(instances, features.profiles, bools)
            if columns is not None:
                self.list_batches_vectorised += 1
                features.add_columns(len(instances), columns)
            else:
                self.list_batches_by_value += 1
                features.add(instance_rows(instances, None), bools)
        if values and self.predictions is not None:
            values = scalar_predictions(values)
            answers_bools = b"true" in answers or b"false" in answers
            if self.predictions.ready:
                self.predictions.add_columns(len(values), [values], answers_bools)
            else:
                self.predictions.add([{PREDICTION: value} for value in values], answers_bools)
        return n

    def _predictions_of(self, reply: object) -> list[object]:
        compare = self.compare
        try:
            return extract_predictions(reply, compare.preset, compare.path, compare.output)
        except PresetError:
            return []

    async def _run(self) -> None:
        while True:
            timed_out = False
            try:
                # asyncio.timeout, not wait_for: no task per wait, and wait_for on Python 3.11 can
                # swallow a cancellation that meets a wake-up (close() would then wait forever).
                async with asyncio.timeout(PROCESS_INTERVAL_S):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True
            self._wake.clear()
            # Whole batches only (the rest on the next wake or the interval): numpy's fixed cost per
            # call, paid on batches of the few records that arrive per turn of the loop, tripled
            # the cost per record.
            while len(self.queue) >= PROCESS_BATCH or (timed_out and self.queue):
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

    def window_counts(self) -> dict[str, Any]:
        """The live windows' bin counts per watched feature (and of the predictions): what
        `merge_snapshots` adds up across workers. Empty while warming up."""
        self.process()
        features = self.features
        counts: dict[str, Any] = {"features": {}, "predictions": None}
        if features.ready:
            counts["features"] = {p.name: features.counts(f).tolist() for f, p in enumerate(features.profiles)}
        predictions = self.predictions
        if predictions is not None and predictions.ready and predictions.profiles:
            counts["predictions"] = predictions.counts(0).tolist()
        return counts

    def routes(self) -> list[web.RouteDef]:
        async def drift(request: web.Request) -> web.Response:
            doc = self.snapshot()
            if request.query.get("full") == "1":  # for the supervisor of `--workers` (merge_snapshots)
                doc = {**doc, "state": self.window_counts()}
            return json_response(doc)

        return [web.get("/shadow/drift", drift)]

    def stats_blocks(self) -> dict[str, Any]:
        return {}


def _figures(counts: np.ndarray, profile: FeatureProfile, missing: int, invalid: int) -> dict[str, Any]:
    n = int(counts.sum())
    value = psi(counts, profile.shares) if n else None
    return {
        "psi": value,
        "ks": ks(counts, profile.shares) if n and profile.kind == "numeric" else None,
        "status": status(value),
        "missing": missing,
        "invalid": invalid,
        "kind": profile.kind,
        "count": n,
    }


def merge_snapshots(docs: Sequence[Mapping[str, Any]], baseline: Profile) -> dict[str, Any]:
    """One `/shadow/drift` over the workers of `serve --workers N` (their `?full=1` documents),
    all watching against the same baseline file: window bin counts add up and PSI and KS are
    computed again from the sums, as one monitor seeing every worker's traffic would; counters
    add up. Predictions learned by each worker (no predictions in the baseline) cannot be added
    up: the first worker's figures stand for them."""
    first = docs[0]
    features: dict[str, Any] = {}
    for name, figures in first["features"].items():
        profile = baseline.features.get(name)
        states = [doc.get("state", {}).get("features", {}).get(name) for doc in docs]
        if profile is None or any(state is None for state in states):
            features[name] = figures  # not watched alike by every worker (still warming up)
            continue
        counts = np.sum([np.asarray(state, dtype=np.int64) for state in states], axis=0)
        missing = sum(int(doc["features"].get(name, {}).get("missing", 0)) for doc in docs)
        invalid = sum(int(doc["features"].get(name, {}).get("invalid", 0)) for doc in docs)
        features[name] = _figures(counts, profile, missing, invalid)
    predictions = first["predictions"]
    states = [doc.get("state", {}).get("predictions") for doc in docs]
    if baseline.predictions is not None and predictions is not None and all(state is not None for state in states):
        counts = np.sum([np.asarray(state, dtype=np.int64) for state in states], axis=0)
        windows = sum(int((doc["predictions"] or {}).get("window", 0)) for doc in docs)
        predictions = {**_figures(counts, baseline.predictions, 0, 0), "window": windows}
        for key in ("missing", "invalid"):
            predictions[key] = sum(int((doc["predictions"] or {}).get(key, 0)) for doc in docs)
    return {
        "window": sum(int(doc["window"]) for doc in docs),
        "features": features,
        "predictions": predictions,
        "baseline": first["baseline"],
        "warming_up": any(doc["warming_up"] for doc in docs),
        "warmup": first["warmup"],
        "watched": sum(int(doc["watched"]) for doc in docs),
        "dropped": sum(int(doc["dropped"]) for doc in docs),
        "unparseable": sum(int(doc["unparseable"]) for doc in docs),
        "workers": len(docs),
    }
