"""Open Inference Protocol (v2) answers over gRPC, read into the JSON shape of the HTTP protocol's
answers so that the `oip-v2` preset (judging/presets.py) finds their predictions the same way.

Output data comes from `raw_output_contents` (little-endian, row-major; BYTES elements each
prefixed by a 4-byte little-endian length, as Triton and KServe write them) or, without it, from
the typed field of `InferTensorContents` that matches the output's datatype.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from shadowproxy.grpcproxy.grpc_predict_v2_pb2 import ModelInferResponse
from shadowproxy.judging.presets import PresetError

_CONTENTS: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_RAW_DTYPES: Final = {
    "BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _raw_bytes(buf: bytes) -> list[str]:
    items: list[str] = []
    at = 0
    while at < len(buf):
        if at + 4 > len(buf):
            raise PresetError("BYTES raw contents: truncated length prefix")
        size = int.from_bytes(buf[at:at + 4], "little")
        at += 4
        if at + size > len(buf):
            raise PresetError("BYTES raw contents: element longer than the buffer")
        items.append(_text(buf[at:at + size]))
        at += size
    return items


def infer_response_document(body: bytes) -> dict[str, Any]:
    """A serialized ModelInferResponse as the HTTP protocol's JSON answer would hold it
    (`outputs[*]` with `name`, `datatype`, `shape`, `data`); `PresetError` when it is not one."""
    try:
        message = ModelInferResponse.FromString(body)
    except Exception as exc:  # google.protobuf.message.DecodeError, and nothing else is raised
        raise PresetError(f"not a ModelInferResponse: {exc}") from None
    raw = message.raw_output_contents
    if raw and len(raw) != len(message.outputs):
        raise PresetError(f"{len(raw)} raw_output_contents for {len(message.outputs)} outputs")
    outputs: list[dict[str, Any]] = []
    for index, output in enumerate(message.outputs):
        datatype = output.datatype
        data: list[Any]
        if raw:
            if datatype == "BYTES":
                data = _raw_bytes(raw[index])
            elif datatype in _RAW_DTYPES:
                try:
                    data = np.frombuffer(raw[index], dtype=_RAW_DTYPES[datatype]).tolist()
                except ValueError as exc:
                    raise PresetError(f"output {output.name!r}: {exc}") from None
            else:
                raise PresetError(f"output {output.name!r}: unknown datatype {datatype!r}")
        else:
            name = _CONTENTS.get(datatype)
            if name is None:
                raise PresetError(f"output {output.name!r}: datatype {datatype!r} has no typed contents")
            values = getattr(output.contents, name)
            data = [_text(v) for v in values] if datatype == "BYTES" else list(values)
        outputs.append({"name": output.name, "datatype": datatype, "shape": list(output.shape), "data": data})
    return {"model_name": message.model_name, "model_version": message.model_version, "id": message.id,
            "outputs": outputs}
