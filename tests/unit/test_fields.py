"""compare.kind = "fields": leaf-by-leaf differences keyed by JSON pointer, noisy fields, bounds and merging."""

from __future__ import annotations

import math

from shadowproxy.judging.fields import MAX_FIELDS, FieldTable, field_diffs


def diffs(p: object, c: object) -> dict[str, bool]:
    return field_diffs(p, c, 1e-6, 1e-3)


def test_equal_answers_have_every_leaf_and_no_difference() -> None:
    doc = {"id": "x", "scores": [0.1, 0.9], "meta": {"model": "m", "ok": True, "none": None, "tags": []}}
    assert diffs(doc, doc) == {
        "/id": False, "/scores/*": False, "/meta/model": False, "/meta/ok": False, "/meta/none": False,
        "/meta/tags": False,
    }


def test_array_indices_fold_and_one_differing_element_marks_the_field() -> None:
    p = {"predictions": [{"label": 1, "score": 0.5}, {"label": 2, "score": 0.25}]}
    c = {"predictions": [{"label": 1, "score": 0.5}, {"label": 0, "score": 0.25}]}
    assert diffs(p, c) == {"/predictions/*/label": True, "/predictions/*/score": False}


def test_numbers_within_tolerance_agree_and_types_are_strict() -> None:
    assert diffs({"x": 1.0}, {"x": 1.0005}) == {"/x": False}  # rel_tol 1e-3
    assert diffs({"x": 1.0}, {"x": 1.01}) == {"/x": True}
    assert diffs({"x": 1}, {"x": 1.0}) == {"/x": False}
    assert diffs({"x": True}, {"x": 1}) == {"/x": True}
    assert diffs({"x": math.nan}, {"x": math.nan}) == {"/x": False}
    assert diffs({"x": "1"}, {"x": 1}) == {"/x": True}


def test_a_leaf_only_one_side_has_differs_and_pointers_are_escaped() -> None:
    assert diffs({"a/b": 1, "t~": 2}, {"a/b": 1}) == {"/a~1b": False, "/t~0": True}
    assert diffs({"v": [1, 2]}, {"v": [1, 2, 3]}) == {"/v/*": True}
    assert diffs({"v": {"k": 1}}, {"v": 5}) == {"/v": True}
    assert diffs({}, {"n": {}}) == {"/n": True}


def test_a_field_the_secondary_keeps_changing_is_noisy_and_left_out_of_agreement() -> None:
    table = FieldTable(threshold=0.01)
    for i in range(100):
        ts = {"/label": False, "/ts": True}
        cand = {"/label": i % 10 == 0, "/ts": True}
        agrees, sec_agrees = table.record(cand, ts)
        assert sec_agrees is True  # the timestamp is noisy from its first difference on
        assert agrees is (i % 10 != 0)
    rows = table.snapshot()
    assert rows["/ts"] == {"compared": 100, "differ": 100, "noise_compared": 100, "noise_differ": 100, "noisy": True}
    assert rows["/label"]["noisy"] is False and rows["/label"]["differ"] == 10


def test_without_a_secondary_no_field_is_noisy() -> None:
    table = FieldTable()
    assert table.record({"/ts": True}, None) == (False, None)
    assert table.snapshot()["/ts"]["noisy"] is False


def test_the_table_tracks_at_most_max_fields_and_counts_the_rest() -> None:
    table = FieldTable()
    table.record({f"/f{i}": False for i in range(MAX_FIELDS + 5)}, None)
    assert len(table.rows) == MAX_FIELDS
    assert table.overflow == 5


def test_merging_adds_counts_and_keeps_the_most_compared_fields() -> None:
    one, two = FieldTable(), FieldTable()
    for _ in range(3):
        one.record({"/a": True, "/b": False}, {"/a": False})
    two.record({"/a": False}, {"/a": True})
    two.rows.update({f"/x{i}": [1, 0, 0, 0] for i in range(MAX_FIELDS - 1)})
    merged = FieldTable()
    merged.merge_state(one.to_state())
    merged.merge_state(two.to_state())
    assert merged.rows["/a"] == [4, 3, 4, 1]
    assert merged.rows["/b"] == [3, 0, 0, 0]
    assert len(merged.rows) == MAX_FIELDS
    assert merged.overflow == 1  # one of the once-compared fields left out


def test_stats_show_fields_per_candidate_and_merge_them_across_workers() -> None:
    from shadowproxy.judging.stats import ShadowStats

    def worker(differ: bool) -> dict[str, object]:
        stats = ShadowStats(("a", "b"))
        stats.enable_fields(0.01)
        assert stats.fields is not None and stats.others["b"].fields is not None
        stats.fields.record({"/x": differ}, None)
        stats.others["b"].fields.record({"/y": True}, {"/y": True})
        return stats.snapshot(full=True)

    one, two = worker(True), worker(False)
    assert one["fields"] == {"/x": {"compared": 1, "differ": 1, "noise_compared": 0, "noise_differ": 0, "noisy": False}}
    assert one["candidates"]["b"]["fields"]["/y"]["noisy"] is True
    merged = ShadowStats.from_states([one, two]).snapshot()
    assert merged["fields"]["/x"]["compared"] == 2 and merged["fields"]["/x"]["differ"] == 1
    assert merged["candidates"]["b"]["fields"]["/y"]["noise_differ"] == 2
    assert merged["fields_overflow"] == 0
