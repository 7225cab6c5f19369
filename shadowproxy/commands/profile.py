"""`shadowproxy profile DATA -o baseline.json`: a drift baseline from training data.

DATA is JSON Lines of request bodies (instances read with the preset) or CSV with a header row;
optional JSON Lines of answers add a profile of the predictions. Unusable lines are skipped and
counted; exit 0 written, 2 for input the user must fix.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from shadowproxy.drift.profile import InstanceError, build_profile, extract_instances
from shadowproxy.judging.presets import PRESETS, PresetError, extract_predictions

# ---------------------------------------------------------------------------------------------------
# Reading training data: JSON Lines of request bodies, or CSV with a header row


@dataclass(slots=True)
class ReadStats:
    lines: int = 0
    bad: int = 0
    first_error: str = ""

    def fail(self, where: str, why: str) -> None:
        self.bad += 1
        if not self.first_error:
            self.first_error = f"{where}: {why}"


def read_jsonl_instances(path: Path, preset: str, stats: ReadStats) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for number, line in _lines(path):
        stats.lines += 1
        try:
            rows.extend(extract_instances(orjson.loads(line), preset))
        except (orjson.JSONDecodeError, InstanceError) as exc:
            stats.fail(f"{path}:{number}", str(exc))
    return rows


def read_jsonl_predictions(
    path: Path, preset: str, pointer: str, output: str, stats: ReadStats
) -> list[object]:
    predictions: list[object] = []
    for number, line in _lines(path):
        stats.lines += 1
        try:
            predictions.extend(extract_predictions(orjson.loads(line), preset, pointer, output))
        except (orjson.JSONDecodeError, PresetError) as exc:
            stats.fail(f"{path}:{number}", str(exc))
    return predictions


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                yield number, line


def read_csv_instances(path: Path, stats: ReadStats) -> list[dict[str, object]]:
    """Rows of a CSV with a header row; empty cells are missing, finite numbers numeric, the rest
    strings."""
    rows: list[dict[str, object]] = []
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if not header:
            return rows
        for record in reader:
            stats.lines += 1
            if len(record) != len(header):
                stats.fail(f"{path}:{reader.line_num}", f"{len(record)} cells, header has {len(header)}")
            rows.append({name: _cell(cell) for name, cell in zip(header, record, strict=False) if cell != ""})
    return rows


def _cell(text: str) -> object:
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def run_profile(
    data: str,
    output: str,
    preset: str = "kserve-v1",
    bins: int = 10,
    data_format: str = "auto",
    predictions: str = "",
    prediction_kind: str | None = None,
    pointer: str = "",
    prediction_output: str = "",
    features: Sequence[str] = (),
    max_features: int = 100,
) -> int:
    """The `shadowproxy profile` command: 0 written, 2 for input the user must fix."""
    if preset not in PRESETS:
        print(f"shadowproxy profile: unknown preset {preset!r}", file=sys.stderr)
        return 2
    path = Path(data)
    if data_format == "auto":
        data_format = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    stats = ReadStats()
    try:
        rows = read_csv_instances(path, stats) if data_format == "csv" else read_jsonl_instances(path, preset, stats)
        answers: list[object] | None = None
        prediction_stats = ReadStats()
        if predictions:
            answers = read_jsonl_predictions(Path(predictions), preset, pointer, prediction_output, prediction_stats)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        print(f"shadowproxy profile: cannot read the data: {exc}", file=sys.stderr)
        return 2
    if not rows:
        why = f" (first problem: {stats.first_error})" if stats.first_error else ""
        print(f"shadowproxy profile: no instances found in {data}{why}", file=sys.stderr)
        return 2
    profile = build_profile(rows, bins, max_features, features, answers, prediction_kind, preset)
    try:
        Path(output).write_bytes(orjson.dumps(profile.to_json(), option=orjson.OPT_INDENT_2))
    except OSError as exc:
        print(f"shadowproxy profile: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for read, what in ((stats, "data"), (prediction_stats, "predictions")):
        if read.bad:
            print(f"skipped {read.bad} unusable {what} line(s); first: {read.first_error}", file=sys.stderr)
    kinds = Counter(f.kind for f in profile.features.values())
    print(
        f"{output}: {len(rows)} instances, {len(profile.features)} features "
        f"({kinds['numeric']} numeric, {kinds['categorical']} categorical), {bins} bins"
        + (f", {profile.predictions.count} predictions ({profile.predictions.kind})" if profile.predictions else "")
    )
    return 0
