"""The gRPC side: a listener forwarding every call to production as raw bytes (`forward`), the
mirror of sampled ModelInfer calls to a candidate (`mirror`), and the reading of Open Inference
Protocol answers (`oip`, over the generated `grpc_predict_v2_pb2`). Needs the `grpc` extra."""
