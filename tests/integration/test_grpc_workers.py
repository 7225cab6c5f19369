"""The gRPC listener under `serve --workers 2`: both workers serve the gRPC port, and the
supervisor's stats and metrics hold every worker's calls and comparisons."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import grpc

from shadowproxy.grpcproxy import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.grpc_models import OipServer, infer_request, label_of
from tests.helpers import Upstream, free_port
from tests.integration.test_workers import Workers

ROWS = [[0.5, 0.5], [-0.5, 0.1]]


async def test_two_workers_merge_grpc_calls_and_comparisons(tmp_path: Path, upstream: Upstream) -> None:
    production = await OipServer().start()
    candidate = await OipServer(flip_above=0.0).start()
    grpc_port = free_port()
    serving = Workers(tmp_path, upstream.url, upstream.url, """
[mirror]
sample_rate = 1.0
[compare]
preset = "oip-v2"
kind = "label"
""", listen=f"grpc_port = {grpc_port}")
    text = serving.config.read_text()
    text = text.replace(f'[production]\nurl = "{upstream.url}"',
                        f'[production]\nurl = "{upstream.url}"\ngrpc_url = "{production.url}"')
    text = text.replace(f'[candidate]\nurl = "{upstream.url}"',
                        f'[candidate]\nurl = "{upstream.url}"\ngrpc_url = "{candidate.url}"')
    serving.config.write_text(text)
    try:
        async with serving.running() as proc:
            calls = 30
            for _ in range(calls):  # a channel each: new connections, which the kernel spreads
                async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=5)
            truth = sum(label_of(r) != label_of(r, 0.0) for r in ROWS) * calls
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    async with s.get(serving.admin + "/shadow/stats") as r:
                        stats = await r.json()
                    if stats["comparisons"]["agree"] + stats["comparisons"]["disagree"] == calls * len(ROWS):
                        break
                    await asyncio.sleep(0.05)
                async with s.get(serving.admin + "/metrics") as r:
                    metrics = await r.text()
            assert stats["production"]["requests"] == calls
            assert stats["mirror"]["sent"] == calls == candidate.model.calls
            assert stats["comparisons"]["disagree"] == truth
            assert stats["comparisons"]["agree"] == calls * len(ROWS) - truth
            assert f'shadowproxy_grpc_calls_total{{code="OK",method="model_infer"}} {float(calls)}' in metrics
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await production.close()
        await candidate.close()
