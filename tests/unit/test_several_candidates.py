"""[[candidates]] in the config, per-candidate stats that merge exactly, and the worst verdict."""

from __future__ import annotations

from typing import Any

import pytest

from shadowproxy.config import GatesConfig, parse_config
from shadowproxy.errors import ConfigError
from shadowproxy.judging.compare import compare_predictions
from shadowproxy.judging.stats import ShadowStats
from shadowproxy.judging.verdict import evaluate_all, worst

PRODUCTION = {"url": "http://127.0.0.1:8001"}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    return excinfo.value.problems


def entry(name: str, **keys: Any) -> dict[str, Any]:
    return {"name": name, "url": "http://127.0.0.1:8002", **keys}


def test_the_old_candidate_table_is_one_candidate_named_candidate() -> None:
    config = parse_config({"production": PRODUCTION, "candidate": {"url": "http://127.0.0.1:8002"}})
    assert config.candidate_names == ("candidate",)
    assert config.candidates[0].rate(config.mirror) == 0.1


def test_candidates_keep_their_order_keys_and_rates() -> None:
    config = parse_config({
        "production": PRODUCTION,
        "mirror": {"sample_rate": 0.4},
        "candidates": [entry("retrained", max_in_flight=7), entry("quantised", sample_rate=0.05, backoff_after=2)],
    })
    assert config.candidate_names == ("retrained", "quantised")
    assert config.candidate is config.candidates[0]
    retrained, quantised = config.candidates
    assert (retrained.max_in_flight, retrained.rate(config.mirror)) == (7, 0.4)
    assert (quantised.backoff_after, quantised.rate(config.mirror)) == (2, 0.05)


def test_both_tables_at_once_is_a_problem() -> None:
    found = problems({"production": PRODUCTION, "candidate": {"url": "http://a:1"}, "candidates": [entry("a")]})
    assert found == ["candidates: [candidate] and [[candidates]] cannot both be set; use one"]


def test_neither_table_is_a_problem() -> None:
    assert problems({"production": PRODUCTION}) == ["candidate.url: required"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("production", 'candidates[0].name: "production" is reserved'),
        ("judge", 'candidates[0].name: "judge" is reserved'),
        ("secondary", 'candidates[0].name: "secondary" is reserved'),
        ("Upper", "candidates[0].name: must be 1 to 32 of a-z, 0-9, _ and -"),
        ("x" * 33, "candidates[0].name: must be 1 to 32 of a-z, 0-9, _ and -"),
        ("", "candidates[0].name: must be 1 to 32 of a-z, 0-9, _ and -"),
    ],
)
def test_candidate_names_are_checked(name: str, message: str) -> None:
    [found] = problems({"production": PRODUCTION, "candidates": [entry(name)]})
    assert found.startswith(message)


def test_names_are_required_unique_and_at_most_eight() -> None:
    found = problems({
        "production": PRODUCTION,
        "candidates": [entry("a"), entry("a"), {"url": "http://x:1"}, *(entry(f"c{i}") for i in range(6))],
    })
    assert found == [
        "candidates[2].name: required",
        "candidates: at most 8 entries, got 9",
        'candidates[1].name: "a" is used twice',
    ]


def test_a_candidate_entry_checks_its_keys_like_the_table() -> None:
    found = problems({"production": PRODUCTION, "candidates": [entry("a", sample_rate=1.5, max_in_flight=0, nope=1)]})
    assert found == [
        "candidates[0].sample_rate: must be between 0 and 1, got 1.5",
        "candidates[0].max_in_flight: must be at least 1, got 0",
        "candidates[0].nope: unknown key",
    ]


def _record(stats: ShadowStats, name: str, prod: list[int], cand: list[int], latency: float) -> None:
    target = stats.for_candidate(name)
    target.record_mirror("sampled")
    target.record_mirror("sent")
    target.record_candidate(latency, error=False)
    target.record_pair_latency(0.001, latency)
    target.record_comparison(compare_predictions("label", prod, cand, 0, 0, 1.0), "label")


def _fill(stats: ShadowStats, rows: range) -> None:
    for i in rows:
        stats.record_production(0.001 + i * 1e-5, 200)
        _record(stats, "a", [i % 3], [i % 3], 0.002)
        _record(stats, "b", [i % 3], [(i + (i % 4 == 0)) % 3], 0.003 + i * 1e-5)


def test_states_of_several_candidates_merge_to_the_figures_of_one_that_saw_everything() -> None:
    one, left, right = ShadowStats(("a", "b")), ShadowStats(("a", "b")), ShadowStats(("a", "b"))
    _fill(one, range(100))
    _fill(left, range(60))
    _fill(right, range(60, 100))
    merged = ShadowStats.from_states([left.snapshot(full=True), right.snapshot(full=True)])
    assert merged.names == ("a", "b")
    assert merged.snapshot() == one.snapshot()
    doc = one.snapshot()
    assert doc["candidates"]["b"]["comparisons"]["disagree"] == sum(1 for i in range(100) if i % 4 == 0)
    assert doc["candidates"]["a"]["comparisons"]["disagree"] == 0
    assert doc["candidates"]["b"]["production"] == doc["production"]
    assert set(doc["llm"]) == {"production", "candidate", "a", "b"}


def test_one_candidate_has_no_candidates_block() -> None:
    stats = ShadowStats()
    _fill_one = stats.for_candidate("candidate")
    assert _fill_one is stats
    assert "candidates" not in stats.snapshot()
    assert "candidates" not in stats.to_state()


def test_the_top_level_verdict_is_the_worst_and_its_gates_the_first_candidates() -> None:
    stats = ShadowStats(("a", "b"))
    _fill(stats, range(100))
    result = evaluate_all(stats.snapshot(), GatesConfig(min_samples=50, max_p99_latency_ratio=100.0))
    assert result["candidates"]["b"]["verdict"] == "fail"
    assert result["verdict"] == "fail"
    assert result["gates"] == result["candidates"]["a"]["gates"]
    assert worst(["pass", "insufficient_data"]) == "insufficient_data"
    assert worst(["pass", "pass"]) == "pass"
    assert worst(["insufficient_data", "fail", "pass"]) == "fail"


def _fill_slices(stats: ShadowStats, rows: range) -> None:
    for i in rows:
        index = i % 3
        stats.record_production(0.001, 200)
        stats.record_slice_production(index, 0.001 + i * 1e-5, 500 if i % 7 == 0 else 200)
        for name, disagree in (("a", 0), ("b", int(i % 4 == 0))):
            target = stats.for_candidate(name)
            target.record_slice_candidate(index, 0.002 + i * 1e-5, False)
            target.record_slice_outcome(index, "disagree" if disagree else "agree", 1 - disagree, disagree)
        stats.for_candidate("b").record_slice_outcome(index, "candidate_error")


def test_slice_figures_merge_to_those_of_one_that_saw_everything() -> None:
    names = ("x", "y", "other")
    one, left, right = (ShadowStats(("a", "b"), names) for _ in range(3))
    _fill_slices(one, range(90))
    _fill_slices(left, range(50))
    _fill_slices(right, range(50, 90))
    merged = ShadowStats.from_states([left.snapshot(full=True), right.snapshot(full=True)])
    assert merged.snapshot()["slices"] == one.snapshot()["slices"]
    doc = one.snapshot()["slices"]
    assert list(doc) == list(names)
    for index, name in enumerate(names):
        rows = [i for i in range(90) if i % 3 == index]
        assert doc[name]["production"]["requests"] == len(rows)
        assert doc[name]["production"]["errors"] == sum(1 for i in rows if i % 7 == 0)
        assert doc[name]["b"]["comparisons"]["disagree"] == sum(1 for i in rows if i % 4 == 0)
        assert doc[name]["b"]["comparisons"]["candidate_error"] == len(rows)
        assert doc[name]["a"]["comparisons"]["total"] == len(rows)


def test_slices_are_checked() -> None:
    found = problems({
        "production": PRODUCTION, "candidate": {"url": "http://a:1"},
        "slices": [
            {"name": "other", "path_prefix": "/"},
            {"name": "t", "header": "X-Tenant"},
            {"name": "v", "value": "x"},
            {"name": "n"},
            {"name": "d", "path_prefix": "/a"},
            {"name": "d", "path_prefix": "/b"},
        ],
    })
    assert found == [
        'slices[0].name: "other" is reserved (unmatched requests)',
        "slices[1].value: required when header is set",
        "slices[2]: needs path_prefix, or header and value, or both",
        "slices[2].header: required when value is set",
        "slices[3]: needs path_prefix, or header and value, or both",
        'slices[5].name: "d" is used twice',
    ]
    assert len(problems({
        "production": PRODUCTION, "candidate": {"url": "http://a:1"},
        "slices": [{"name": f"s{i}", "path_prefix": "/"} for i in range(33)],
    })) == 1


def test_check_config_summary_lists_each_candidate_with_its_rate_and_the_slices() -> None:
    from shadowproxy.commands.cli import summary

    config = parse_config({
        "production": PRODUCTION,
        "candidates": [entry("retrained"), entry("quantised", sample_rate=0.02)],
        "slices": [{"name": "fraud", "path_prefix": "/v1/models/fraud"}],
    })
    text = summary(config)
    assert "candidate retrained  http://127.0.0.1:8002 (sample_rate 0.1)" in text
    assert "candidate quantised  http://127.0.0.1:8002 (sample_rate 0.02)" in text
    assert "slices" in text and "fraud, other" in text
