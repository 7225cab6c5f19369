from __future__ import annotations

import orjson
import pytest

from shadowproxy.judging.presets import PresetError, extract_predictions, parse_pointer, resolve_pointer


def test_kserve_v1_gives_one_prediction_per_instance() -> None:
    doc = orjson.loads(b'{"predictions": [1, 0, 2]}')
    assert extract_predictions(doc, "kserve-v1") == [1, 0, 2]


def test_tf_serving_keeps_each_instance_row() -> None:
    doc = orjson.loads(b'{"predictions": [[0.1, 0.9], [0.8, 0.2]]}')
    assert extract_predictions(doc, "tf-serving") == [[0.1, 0.9], [0.8, 0.2]]


def test_missing_predictions_key_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match="predictions"):
        extract_predictions({"error": "boom"}, "kserve-v1")


def test_predictions_that_are_not_a_list_are_a_preset_error() -> None:
    with pytest.raises(PresetError):
        extract_predictions({"predictions": 3}, "tf-serving")


def test_preset_error_is_a_value_error() -> None:
    assert issubclass(PresetError, ValueError)


def test_mlflow_wrapped_list() -> None:
    assert extract_predictions({"predictions": ["a", "b"]}, "mlflow") == ["a", "b"]


def test_mlflow_bare_top_level_list() -> None:
    assert extract_predictions([0.5, 1.5], "mlflow") == [0.5, 1.5]


def test_mlflow_column_dict_becomes_one_row_per_instance() -> None:
    doc = {"predictions": {"label": ["cat", "dog"], "score": [0.9, 0.7]}}
    assert extract_predictions(doc, "mlflow") == [
        {"label": "cat", "score": 0.9},
        {"label": "dog", "score": 0.7},
    ]


def test_mlflow_columns_of_unequal_length_are_a_preset_error() -> None:
    with pytest.raises(PresetError, match="length"):
        extract_predictions({"predictions": {"a": [1, 2], "b": [1]}}, "mlflow")


def _oip(*outputs: dict[str, object]) -> object:
    return orjson.loads(orjson.dumps({"model_name": "m", "id": "r1", "outputs": list(outputs)}))


def test_oip_v2_shape_n_gives_scalars() -> None:
    doc = _oip({"name": "label", "datatype": "INT64", "shape": [3], "data": [1, 0, 1]})
    assert extract_predictions(doc, "oip-v2") == [1, 0, 1]


def test_oip_v2_shape_n_1_keeps_one_element_lists() -> None:
    doc = _oip({"name": "score", "datatype": "FP32", "shape": [2, 1], "data": [0.2, 0.7]})
    assert extract_predictions(doc, "oip-v2") == [[0.2], [0.7]]


def test_oip_v2_shape_n_k_splits_flat_data_row_major() -> None:
    doc = _oip({"name": "probs", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]})
    assert extract_predictions(doc, "oip-v2") == [[1, 2, 3], [4, 5, 6]]


def test_oip_v2_three_dimensional_shape() -> None:
    doc = _oip({"name": "t", "datatype": "FP32", "shape": [2, 2, 2], "data": list(range(8))})
    assert extract_predictions(doc, "oip-v2") == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_oip_v2_nested_data_is_accepted_like_flat_data() -> None:
    doc = _oip({"name": "probs", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]})
    assert extract_predictions(doc, "oip-v2") == [[1, 2], [3, 4]]


def test_oip_v2_several_outputs_give_one_list_per_instance_in_output_order() -> None:
    doc = _oip(
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 1]},
        {"name": "probs", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.6, 0.4]},
    )
    assert extract_predictions(doc, "oip-v2") == [[3, [0.1, 0.9]], [1, [0.6, 0.4]]]


def test_oip_v2_output_selects_one_output_by_name() -> None:
    doc = _oip(
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 1]},
        {"name": "probs", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.6, 0.4]},
    )
    assert extract_predictions(doc, "oip-v2", output="probs") == [[0.1, 0.9], [0.6, 0.4]]


def test_oip_v2_unknown_output_name_is_a_preset_error() -> None:
    doc = _oip({"name": "label", "datatype": "INT64", "shape": [1], "data": [3]})
    with pytest.raises(PresetError, match="nope"):
        extract_predictions(doc, "oip-v2", output="nope")


def test_oip_v2_data_length_must_match_shape() -> None:
    doc = _oip({"name": "probs", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5]})
    with pytest.raises(PresetError, match="5 elements"):
        extract_predictions(doc, "oip-v2")


def test_oip_v2_outputs_with_different_batch_sizes_are_a_preset_error() -> None:
    doc = _oip(
        {"name": "a", "datatype": "INT64", "shape": [2], "data": [3, 1]},
        {"name": "b", "datatype": "INT64", "shape": [3], "data": [3, 1, 2]},
    )
    with pytest.raises(PresetError):
        extract_predictions(doc, "oip-v2")


def test_oip_v2_bad_shape_is_a_preset_error() -> None:
    doc = _oip({"name": "a", "datatype": "INT64", "shape": ["2"], "data": [3, 1]})
    with pytest.raises(PresetError, match="shape"):
        extract_predictions(doc, "oip-v2")


def test_json_pointer_with_escapes_and_index() -> None:
    doc = {"result": [{"a/b": {"m~n": [7, 8]}}]}
    assert extract_predictions(doc, "json", path="/result/0/a~1b/m~0n") == [7, 8]


def test_path_overrides_the_preset() -> None:
    doc = {"predictions": [1, 2], "extra": {"labels": ["x", "y"]}}
    assert extract_predictions(doc, "kserve-v1", path="/extra/labels") == ["x", "y"]


def test_pointer_to_a_non_list_is_a_single_prediction() -> None:
    assert extract_predictions({"out": {"label": "cat"}}, "json", path="/out/label") == ["cat"]


def test_json_preset_without_path_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match="path"):
        extract_predictions({"predictions": [1]}, "json")


def test_unknown_preset_is_a_preset_error() -> None:
    with pytest.raises(PresetError, match="unknown preset"):
        extract_predictions({"predictions": [1]}, "sagemaker")


def test_parse_pointer_unescapes_tilde_one_before_tilde_zero() -> None:
    # RFC 6901 §4: "~01" is "~1" literally, not "/".
    assert parse_pointer("/~01/a~1b/~0") == ("~1", "a/b", "~")


def test_parse_pointer_empty_is_whole_document() -> None:
    assert parse_pointer("") == ()
    assert resolve_pointer({"a": 1}, ()) == {"a": 1}


def test_parse_pointer_empty_token_is_the_empty_key() -> None:
    assert parse_pointer("/") == ("",)
    assert resolve_pointer({"": 5}, parse_pointer("/")) == 5


@pytest.mark.parametrize("pointer", ["a/b", "/a~2", "/~"])
def test_parse_pointer_rejects_malformed_pointers(pointer: str) -> None:
    with pytest.raises(PresetError):
        parse_pointer(pointer)


@pytest.mark.parametrize("pointer", ["/missing", "/list/5", "/list/01", "/list/-", "/list/0/deeper"])
def test_resolve_pointer_missing_step_is_a_preset_error(pointer: str) -> None:
    with pytest.raises(PresetError):
        resolve_pointer({"list": [1, 2]}, parse_pointer(pointer))
