from __future__ import annotations

import math
import random

import pytest

from shadowproxy.judging.compare import VECTORISE_MIN, Comparison, canonical_label, compare_predictions

NAN = float("nan")
INF = float("inf")


def _entropy_bits(p: list[float]) -> float:
    return -sum(x * math.log2(x) for x in p if x > 0)


def _jsd_reference(p: list[float], q: list[float]) -> float:
    # JSD = H(M) - (H(P) + H(Q)) / 2: a different formula from the module's KL sum.
    sp, sq = sum(p), sum(q)
    p = [x / sp for x in p]
    q = [x / sq for x in q]
    m = [(x + y) / 2 for x, y in zip(p, q, strict=True)]
    return _entropy_bits(m) - (_entropy_bits(p) + _entropy_bits(q)) / 2


# ---------------------------------------------------------------- general


def test_unequal_lengths_raise_value_error() -> None:
    with pytest.raises(ValueError, match="differ"):
        compare_predictions("label", [1, 2], [1], 0, 0)


def test_unknown_kind_raises_value_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        compare_predictions("fuzzy", [1], [1], 0, 0)


@pytest.mark.parametrize("kind", ["label", "numeric", "vector", "distribution", "text"])
def test_empty_batch_compares_nothing(kind: str) -> None:
    assert compare_predictions(kind, [], [], 0, 0) == Comparison()


@pytest.mark.parametrize("kind", ["label", "numeric", "vector", "distribution", "text"])
def test_odd_values_never_raise(kind: str) -> None:
    odd: list[object] = [None, {"a": [1, {}]}, "x", [1, [2]], True, 10**400, NAN, -INF, [], [[]], object()]
    out = compare_predictions(kind, odd, list(reversed(odd)), 1e-6, 1e-3)
    assert out.agree + out.disagree == len(odd) == len(out.flags)


# ---------------------------------------------------------------- label


def test_label_one_and_one_point_zero_agree() -> None:
    out = compare_predictions("label", [1, 2.0], [1.0, 2], 0, 0)
    assert out.flags == [True, True]
    assert out.pairs == [("1", "1"), ("2", "2")]


def test_label_true_is_not_one() -> None:
    out = compare_predictions("label", [True, False, True], [1, 0, True], 0, 0)
    assert out.flags == [False, False, True]
    assert out.pairs[0] == ("true", "1")


def test_int_labels_are_labelled_as_canonical_label_gives_them() -> None:
    # Class ids take a shortcut (both ints); their pairs must read as canonical_label's, small
    # ones, large ones and negative ones alike, and a bool beside an int still takes the long way.
    ids = [0, 7, 1023, 1024, 2**40, -3, 2**70]
    out = compare_predictions("label", ids, [*ids[1:], ids[0]], 0, 0)
    assert out.pairs == [(canonical_label(p), canonical_label(c)) for p, c in zip(ids, [*ids[1:], ids[0]], strict=True)]
    assert out.flags == [False] * len(ids)
    same = compare_predictions("label", ids, list(ids), 0, 0)
    assert same.flags == [True] * len(ids) and [p for p, _ in same.pairs] == [str(i) for i in ids]
    assert compare_predictions("label", [1, True], [True, 1], 0, 0).flags == [False, False]


def test_label_strings_compare_exactly() -> None:
    out = compare_predictions("label", ["cat", "dog", "Cat"], ["cat", "cat", "cat"], 0, 0)
    assert (out.agree, out.disagree) == (1, 2)
    assert out.pairs == [("cat", "cat"), ("dog", "cat"), ("Cat", "cat")]


def test_label_lists_and_dicts_compare_structurally_with_number_canonicalisation() -> None:
    out = compare_predictions(
        "label",
        [[1, "a"], {"k": 1.0, "j": [2]}, [1, 2]],
        [[1.0, "a"], {"j": [2.0], "k": 1}, [1, 2, 3]],
        0,
        0,
    )
    assert out.flags == [True, True, False]
    assert out.pairs[1] == ('{"j":[2],"k":1}', '{"j":[2],"k":1}')


def test_label_nan_labels_agree() -> None:
    assert compare_predictions("label", [NAN], [NAN], 0, 0).flags == [True]


def test_label_number_and_its_string_disagree() -> None:
    assert compare_predictions("label", [1], ["1"], 0, 0).flags == [False]


def test_canonical_label_of_huge_integer_does_not_raise() -> None:
    assert canonical_label(10**30) == str(10**30)


@pytest.mark.parametrize(("value", "expected"), [
    (0, "0"), (7, "7"), (-3, "-3"), (2**63 - 1, str(2**63 - 1)), (-(2**63), str(-(2**63))),
    (2**64 + 5, str(2**64 + 5)), (1.0, "1"), (-2.0, "-2"), (2.5, "2.5"), (True, "true"), (None, "null"),
    ([1, 2.0], "[1,2]"),
])
def test_canonical_label_of_numbers_is_their_compact_json(value: object, expected: str) -> None:
    assert canonical_label(value) == expected


# ---------------------------------------------------------------- numeric


def test_numeric_exactly_at_abs_tolerance_agrees() -> None:
    assert compare_predictions("numeric", [1.0], [1.5], 0.5, 0.0).flags == [True]


def test_numeric_just_past_abs_tolerance_disagrees() -> None:
    assert compare_predictions("numeric", [1.0], [math.nextafter(1.5, 2.0)], 0.5, 0.0).flags == [False]


def test_numeric_exactly_at_rel_tolerance_agrees() -> None:
    # rel_tol 0.5 of max(|2|, |4|) = 2 = |4 - 2|
    assert compare_predictions("numeric", [2.0], [4.0], 0.0, 0.5).flags == [True]


def test_numeric_just_past_rel_tolerance_disagrees() -> None:
    assert compare_predictions("numeric", [2.0], [math.nextafter(4.0, 5.0)], 0.0, 0.5).flags == [False]


def test_numeric_records_absolute_differences() -> None:
    out = compare_predictions("numeric", [1.0, 3], [1.25, 2], 0.0, 0.0)
    assert out.abs_diffs == [0.25, 1.0]


def test_numeric_nan_equals_nan_but_not_a_number() -> None:
    out = compare_predictions("numeric", [NAN, NAN, 1.0], [NAN, 1.0, NAN], 1.0, 1.0)
    assert out.flags == [True, False, False]
    assert out.abs_diffs == [0.0, INF, INF]


def test_numeric_infinity_equals_same_signed_infinity_only() -> None:
    out = compare_predictions("numeric", [INF, -INF, INF, INF], [INF, -INF, -INF, 1e308], 1.0, 1.0)
    assert out.flags == [True, True, False, False]


def test_numeric_non_number_disagrees() -> None:
    out = compare_predictions("numeric", ["1.0", True, None, 1.0], [1.0, 1, 1, [1.0, 2.0]], 1.0, 1.0)
    assert out.flags == [False, False, False, False]


def test_numeric_one_element_lists_are_unwrapped() -> None:
    out = compare_predictions("numeric", [[0.5], [[2]]], [0.5, [2.0]], 0.0, 0.0)
    assert out.flags == [True, True]


def test_numeric_integers_beyond_float_range_do_not_raise() -> None:
    out = compare_predictions("numeric", [10**400, 10**400], [10**400, 1], 0.0, 0.0)
    assert out.flags == [True, False]


def _isclose_reference(a: float, b: float, abs_tol: float, rel_tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def test_numeric_large_batch_matches_math_isclose() -> None:
    rng = random.Random(7)
    prod: list[object] = [rng.uniform(-100, 100) for _ in range(1024)]
    cand: list[object] = [p * (1 + rng.uniform(-2e-3, 2e-3)) for p in prod]  # type: ignore[operator]
    for i, (p, c) in enumerate([(NAN, NAN), (NAN, 1.0), (INF, INF), (INF, -INF), (0.0, 1e-7), (5, 5)]):
        prod[i], cand[i] = p, c
    out = compare_predictions("numeric", prod, cand, 1e-6, 1e-3)
    expected = [_isclose_reference(p, c, 1e-6, 1e-3) for p, c in zip(prod, cand, strict=True)]  # type: ignore[arg-type]
    assert out.flags == expected
    assert 0 < out.agree < 1024


def test_numeric_large_batch_with_a_bool_falls_back_and_rejects_it() -> None:
    prod: list[object] = [1.0] * VECTORISE_MIN
    cand: list[object] = [1.0] * VECTORISE_MIN
    cand[3] = True
    out = compare_predictions("numeric", prod, cand, 0.0, 0.0)
    assert out.disagree == 1 and out.flags[3] is False


# ---------------------------------------------------------------- vector


def test_vector_agrees_when_every_element_is_within_tolerance() -> None:
    out = compare_predictions("vector", [[1.0, 2.0, 3.0]], [[1.0, 2.125, 3.0]], 0.125, 0.0)
    assert out.flags == [True]
    assert out.abs_diffs == [0.125]


def test_vector_disagrees_when_one_element_is_past_tolerance() -> None:
    out = compare_predictions("vector", [[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.25]], 0.125, 0.0)
    assert out.flags == [False]
    assert out.abs_diffs == [0.25]


def test_vector_shape_mismatch_disagrees() -> None:
    out = compare_predictions("vector", [[1, 2], [[1, 2]], [1, [2]]], [[1, 2, 3], [1, 2], [1, [2]]], 1.0, 1.0)
    assert out.flags == [False, False, False]  # the third is ragged on both sides


def test_vector_nested_lists_compare_element_wise() -> None:
    p = [[[1.0, 2.0], [3.0, 4.0]]]
    c = [[[1.0, 2.0], [3.0, 4.5]]]
    assert compare_predictions("vector", p, c, 0.5, 0.0).flags == [True]
    assert compare_predictions("vector", p, c, 0.4, 0.0).flags == [False]


def test_vector_cosine_of_orthogonal_and_parallel_vectors() -> None:
    out = compare_predictions("vector", [[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [2.0, 4.0]], 0.0, 0.0)
    assert out.cosine == [pytest.approx(0.0), pytest.approx(1.0)]


def test_vector_cosine_is_skipped_for_zero_vectors() -> None:
    out = compare_predictions("vector", [[0.0, 0.0]], [[0.0, 0.0]], 0.0, 0.0)
    assert out.flags == [True]
    assert out.cosine == []


def test_vector_nan_elements_agree_with_nan() -> None:
    out = compare_predictions("vector", [[NAN, 1.0]], [[NAN, 1.0]], 0.0, 0.0)
    assert out.flags == [True]
    assert out.abs_diffs == [0.0]


def test_vector_bool_element_disagrees() -> None:
    assert compare_predictions("vector", [[1, 0]], [[True, 0]], 0.0, 0.0).flags == [False]


def _vector_reference(
    p: list[float], c: list[float], abs_tol: float, rel_tol: float
) -> tuple[bool, float, float]:
    ok = all(_isclose_reference(x, y, abs_tol, rel_tol) for x, y in zip(p, c, strict=True))
    worst = max(abs(x - y) for x, y in zip(p, c, strict=True))
    dot = sum(x * y for x, y in zip(p, c, strict=True))
    cos = dot / (math.hypot(*p) * math.hypot(*c))
    return ok, worst, cos


def test_vector_large_batch_matches_element_wise_reference() -> None:
    rng = random.Random(3)
    prod = [[rng.gauss(0, 1) for _ in range(8)] for _ in range(1024)]
    cand = [[x + rng.gauss(0, 1e-3) for x in row] for row in prod]
    out = compare_predictions("vector", list(prod), list(cand), 1e-3, 0.0)
    refs = [_vector_reference(p, c, 1e-3, 0.0) for p, c in zip(prod, cand, strict=True)]
    assert out.flags == [r[0] for r in refs]
    assert out.abs_diffs == pytest.approx([r[1] for r in refs], rel=1e-12)
    assert out.cosine == pytest.approx([r[2] for r in refs], rel=1e-9)
    assert 0 < out.agree < 1024


def test_vector_large_ragged_batch_gives_the_same_answers_row_by_row() -> None:
    rows: list[object] = [[float(i), 1.0] for i in range(VECTORISE_MIN)]
    other: list[object] = [[float(i), 1.0] for i in range(VECTORISE_MIN)]
    other[5] = [5.0, 1.0, 0.0]
    out = compare_predictions("vector", rows, other, 0.0, 0.0)
    assert out.flags == [i != 5 for i in range(VECTORISE_MIN)]


# ---------------------------------------------------------------- distribution


def test_distribution_agrees_on_equal_argmax_and_records_jsd() -> None:
    p = [0.7, 0.2, 0.1]
    q = [0.5, 0.3, 0.2]
    out = compare_predictions("distribution", [p], [q], 0, 0)
    assert out.flags == [True]
    assert out.jsd == [pytest.approx(_jsd_reference(p, q), abs=1e-12)]


def test_distribution_disagrees_on_different_argmax() -> None:
    assert compare_predictions("distribution", [[0.6, 0.4]], [[0.4, 0.6]], 0, 0).flags == [False]


def test_distribution_disjoint_supports_give_jsd_one() -> None:
    out = compare_predictions("distribution", [[1.0, 0.0]], [[0.0, 1.0]], 0, 0)
    assert out.jsd == [pytest.approx(1.0)]


def test_distribution_is_normalised_before_jsd() -> None:
    out = compare_predictions("distribution", [[2.0, 2.0]], [[0.5, 0.5]], 0, 0)
    assert out.jsd == [pytest.approx(0.0, abs=1e-15)]


@pytest.mark.parametrize("bad", [[-0.1, 1.1], [0.0, 0.0], [NAN, 1.0], [INF, 1.0], [], "x", [0.5, "0.5"]])
def test_distribution_invalid_disagrees_without_jsd(bad: object) -> None:
    out = compare_predictions("distribution", [bad], [[0.5, 0.5]], 0, 0)
    assert out.flags == [False]
    assert out.jsd == []


def test_distribution_length_mismatch_disagrees() -> None:
    assert compare_predictions("distribution", [[0.5, 0.5]], [[0.5, 0.3, 0.2]], 0, 0).flags == [False]


def test_distribution_dicts_compare_by_class_name() -> None:
    out = compare_predictions("distribution", [{"cat": 0.8, "dog": 0.2}], [{"dog": 0.1, "cat": 0.9}], 0, 0)
    assert out.flags == [True]


def test_distribution_large_batch_matches_reference() -> None:
    rng = random.Random(11)
    prod = [[rng.random() for _ in range(5)] for _ in range(1024)]
    cand = [[x + rng.random() * 0.3 for x in row] for row in prod]
    out = compare_predictions("distribution", list(prod), list(cand), 0, 0)
    assert out.flags == [p.index(max(p)) == c.index(max(c)) for p, c in zip(prod, cand, strict=True)]
    expected = [_jsd_reference(p, c) for p, c in zip(prod, cand, strict=True)]
    assert out.jsd == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- text


def test_text_equal_after_whitespace_normalisation() -> None:
    out = compare_predictions("text", ["  hello\n\tworld "], ["hello world"], 0, 0)
    assert out.flags == [True]
    assert out.similarity == [1.0]


def test_text_case_differences_disagree_with_high_similarity() -> None:
    out = compare_predictions("text", ["Hello world"], ["hello world"], 0, 0)
    assert out.flags == [False]
    assert out.similarity[0] == pytest.approx(20 / 22)


def test_text_non_string_disagrees() -> None:
    out = compare_predictions("text", [None, 1], [None, "1"], 0, 0)
    assert out.flags == [False, False]
    assert out.similarity == []


def test_text_very_long_strings_stay_cheap() -> None:
    a = "ab" * 50_000
    b = "ba" * 50_000
    out = compare_predictions("text", [a], [b], 0, 0)
    assert out.flags == [False]
    assert 0.0 <= out.similarity[0] <= 1.0
