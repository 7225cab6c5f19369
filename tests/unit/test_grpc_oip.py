"""Reading ModelInferResponse messages into the oip-v2 preset's shape (grpcproxy/oip.py)."""

from __future__ import annotations

import struct

import pytest

from shadowproxy.grpcproxy import grpc_predict_v2_pb2 as pb
from shadowproxy.grpcproxy.oip import infer_response_document
from shadowproxy.judging.presets import PresetError, extract_predictions


def response(raw: bool) -> bytes:
    scores = [0.25, 0.75, 0.5, 0.5]
    labels = [b"cat", b"dog"]
    out_scores = pb.ModelInferResponse.InferOutputTensor(name="scores", datatype="FP32", shape=[2, 2])
    out_labels = pb.ModelInferResponse.InferOutputTensor(name="labels", datatype="BYTES", shape=[2])
    answer = pb.ModelInferResponse(model_name="m", outputs=[out_scores, out_labels])
    if raw:
        answer.raw_output_contents.append(struct.pack("<4f", *scores))
        answer.raw_output_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in labels))
    else:
        answer.outputs[0].contents.fp32_contents.extend(scores)
        answer.outputs[1].contents.bytes_contents.extend(labels)
    return bytes(answer.SerializeToString())


@pytest.mark.parametrize("raw", [False, True])
def test_typed_and_raw_contents_read_the_same(raw: bool) -> None:
    doc = infer_response_document(response(raw))
    assert doc["outputs"] == [
        {"name": "scores", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]},
        {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]},
    ]
    assert extract_predictions(doc, "oip-v2", "", "labels") == ["cat", "dog"]
    assert extract_predictions(doc, "oip-v2", "", "scores") == [[0.25, 0.75], [0.5, 0.5]]


def test_bytes_that_are_no_infer_response_are_a_preset_error() -> None:
    with pytest.raises(PresetError):
        infer_response_document(b"\xff\xff\xff")
    answer = pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(name="x", datatype="FP32")])
    answer.raw_output_contents.append(b"\x00\x00\x80")  # three bytes: no whole float
    with pytest.raises(PresetError):
        infer_response_document(answer.SerializeToString())
