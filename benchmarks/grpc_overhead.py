"""Added latency and proxy CPU of the gRPC listener, beside calling the model directly.

    python benchmarks/grpc_overhead.py [--rate 500] [--duration 5] [--reps 3] [--sample-rate 0.1]

A grpcio load generator (one asyncio process, one channel) sends ModelInfer calls at a fixed
open-loop `--rate` for `--duration` seconds to the stand-in OIP model (tests/grpc_models.py, in a
process of its own), first directly, then through shadowproxy's gRPC listener (mirroring
`--sample-rate` of them to a second stand-in), repetitions interleaved. Reported: p50 and p99
latency of each, the difference (the added latency), and the proxy's user + system CPU per call.
Calls that fail are counted and make the run exit 4; a setup that does not start exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness as h  # noqa: E402

from tests.grpc_models import infer_request  # noqa: E402

ROWS = [[0.5, -0.25, 0.125, 1.0]] * 4


async def load(address: str, rate: float, duration: float) -> tuple[list[float], int]:
    """Open loop: one call every 1/rate s whatever the answers do; latencies and failures."""
    request = infer_request(ROWS).SerializeToString()
    latencies: list[float] = []
    failures = 0
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await infer(request, timeout=5)  # connected before the clock starts

        async def one() -> None:
            nonlocal failures
            start = time.perf_counter()
            try:
                await infer(request, timeout=5)
                latencies.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError:
                failures += 1

        tasks = []
        begin = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    return latencies, failures


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample-rate", type=float, default=0.1)
    args = ap.parse_args()
    prod_port, cand_port, grpc_port = h.free_ports(3)
    models = [h.Proc([h.PYTHON, "-m", "tests.grpc_models", str(port)], f"oip-{port}", cwd=h.REPO)
              for port in (prod_port, cand_port)]
    for port, proc in zip((prod_port, cand_port), models, strict=True):
        h.wait_for_port(port, proc=proc)
    proxy = h.ShadowproxySetup(
        "grpc", "http://127.0.0.1:9", "http://127.0.0.1:9", sample_rate=args.sample_rate,
        extra={"listen": {"grpc_port": grpc_port},
               "production": {"grpc_url": f"grpc://127.0.0.1:{prod_port}"},
               "candidate": {"grpc_url": f"grpc://127.0.0.1:{cand_port}"},
               "compare": {"preset": "oip-v2", "kind": "label"}},
    )
    try:
        proxy.start()
        h.wait_for_port(grpc_port)
    except Exception as exc:
        h.log(f"setup failed: {exc}")
        return 1
    rows: dict[str, list[tuple[float, float]]] = {"direct": [], "shadowproxy": []}
    cpu_per_call: list[float] = []
    failed = 0
    for rep in range(args.reps):
        for name, address in (("direct", f"127.0.0.1:{prod_port}"), ("shadowproxy", f"127.0.0.1:{grpc_port}")):
            pids = proxy.proc.pids() if proxy.proc is not None else []
            before = h.cpu_seconds(pids)
            latencies, failures = asyncio.run(load(address, args.rate, args.duration))
            used = h.cpu_seconds(pids) - before
            failed += failures
            rows[name].append((pct(latencies, 0.5), pct(latencies, 0.99)))
            if name == "shadowproxy":
                cpu_per_call.append(used / max(1, len(latencies)) * 1e6)
            h.log(f"rep {rep + 1} {name}: p50 {rows[name][-1][0]:.3f} ms p99 {rows[name][-1][1]:.3f} ms")
    proxy.stop()
    print(f"gRPC ModelInfer at {args.rate:g} calls/s, {args.duration:g} s x {args.reps}, "
          f"sample rate {args.sample_rate:g} (medians of repetitions)")
    print("| target | p50 ms | p99 ms | proxy CPU per call |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        p50 = statistics.median(v[0] for v in values)
        p99 = statistics.median(v[1] for v in values)
        cpu = f"{statistics.median(cpu_per_call):.0f} us" if name == "shadowproxy" else "-"
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {cpu} |")
    added50 = statistics.median(s[0] - d[0] for s, d in zip(rows["shadowproxy"], rows["direct"], strict=True))
    added99 = statistics.median(s[1] - d[1] for s, d in zip(rows["shadowproxy"], rows["direct"], strict=True))
    print(f"added latency: p50 {added50:.3f} ms, p99 {added99:.3f} ms; failed calls: {failed}")
    return 4 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
