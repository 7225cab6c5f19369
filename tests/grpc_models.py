"""A stand-in Open Inference Protocol model server over gRPC, built from the shipped .proto, for
the gRPC listener's tests: the servicer KServe's ModelServer exposes on its gRPC port, with a
classifier whose answers the tests can compute on their own (`label_of`), plus a raw-bytes
bidirectional stream (`/test.Echo/Chat`) for streaming calls."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from shadowproxy.grpcproxy import grpc_predict_v2_pb2 as pb
from shadowproxy.grpcproxy import grpc_predict_v2_pb2_grpc as pb_grpc

CHAT = "/test.Echo/Chat"
BREAK = "/test.Echo/Break"  # two messages, then RESOURCE_EXHAUSTED with trailing metadata


def label_of(row: Sequence[float], flip_above: float | None = None) -> int:
    """The classifier: 1 when the row's sum is positive; the candidate (`flip_above` set) answers
    the other label for rows whose first value is above it."""
    label = 1 if sum(row) > 0 else 0
    if flip_above is not None and row[0] > flip_above:
        label = 1 - label
    return label


def infer_request(rows: Sequence[Sequence[float]], *, model: str = "clf", raw: bool = False) -> Any:
    flat = [v for row in rows for v in row]
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[len(rows), len(rows[0])])
    request = pb.ModelInferRequest(model_name=model, id="req", inputs=[tensor])
    if raw:
        request.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    else:
        tensor.contents.fp32_contents.extend(flat)
        request.inputs[0].CopyFrom(tensor)
    return request


def _rows(request: Any) -> list[list[float]]:
    tensor = request.inputs[0]
    n, d = tensor.shape
    if request.raw_input_contents:
        flat = list(struct.unpack(f"<{n * d}f", request.raw_input_contents[0]))
    else:
        flat = list(tensor.contents.fp32_contents)
    return [flat[i * d:(i + 1) * d] for i in range(n)]


class Classifier(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, flip_above: float | None, delay_s: float, raw_answers: bool,
                 fail: grpc.StatusCode | None = None) -> None:
        self.fail = fail
        self.flip_above = flip_above
        self.delay_s = delay_s
        self.raw_answers = raw_answers
        self.calls = 0
        self.cancelled = 0
        self.metadata: list[list[tuple[str, Any]]] = []
        self.time_remaining: list[float | None] = []

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the .proto's names)
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        self.metadata.append([(m.key, m.value) for m in context.invocation_metadata()])
        self.time_remaining.append(context.time_remaining())
        if self.delay_s:
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail is not None:
            await context.abort(self.fail, "the stand-in fails every call")
        if request.model_name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model missing is not loaded",
                                (("x-model-state", "unloaded"), ("why-bin", b"\x00\xff")))
        await context.send_initial_metadata((("x-served-by", "stand-in"),))
        context.set_trailing_metadata((("x-rows", str(len(request.inputs[0].shape) and request.inputs[0].shape[0])),
                                       ("trace-bin", b"\x01\x02\x03")))
        labels = [label_of(row, self.flip_above) for row in _rows(request)]
        output = pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[len(labels)])
        answer = pb.ModelInferResponse(model_name=request.model_name, id=request.id, outputs=[output])
        if self.raw_answers:
            answer.raw_output_contents.append(struct.pack(f"<{len(labels)}q", *labels))
        else:
            answer.outputs[0].contents.int64_contents.extend(labels)
        return answer


async def _chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    await context.send_initial_metadata((("x-chat", "open"),))
    count = 0
    async for message in requests:
        count += 1
        yield message[::-1]
    context.set_trailing_metadata((("x-messages", str(count)),))


async def _break(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield request
    yield request + request
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota spent after two",
                        (("x-quota", "0"), ("detail-bin", b"\x07")))


class OipServer:
    """One stand-in on a free loopback port: `url` is its grpc:// address."""

    def __init__(self, flip_above: float | None = None, delay_s: float = 0.0, raw_answers: bool = False,
                 fail: grpc.StatusCode | None = None) -> None:
        self.model = Classifier(flip_above, delay_s, raw_answers, fail)
        self.server: Any = None
        self.url = ""
        self.address = ""

    async def start(self) -> OipServer:
        self.server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.model, self.server)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(_chat),
                          "Break": grpc.unary_stream_rpc_method_handler(_break)}),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.url = f"grpc://{self.address}"
        return self

    async def close(self) -> None:
        await self.server.stop(0)


async def _serve_forever(port: int, flip_above: float | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Classifier(flip_above, 0.0, True), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":  # python -m tests.grpc_models PORT [FLIP_ABOVE]: the benchmark's stand-in
    import sys

    asyncio.run(_serve_forever(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else None))
