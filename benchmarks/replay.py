"""Recording and replay costs.

    python benchmarks/replay.py hotpath [--requests N]      # event-loop CPU per recorded request
    python benchmarks/replay.py writer [--rate R] [--seconds S]   # the writer alone, fed at R records/s
    python benchmarks/replay.py replay [--rate R] [--seconds S]   # replay CPU per request and rate held

- hotpath: benchmarks/hotpath.py's fake-transport proxy with and without `[record]` (every request
  recorded), interleaved, min of 5 rounds: the loop thread's CPU per request (target: recording
  adds <= 3 us), and the writer thread's CPU per record.
- writer: records of a small predict request and answer queued at a fixed rate from the loop for S
  seconds; reports records written per second, dropped records (target: >= 20,000/s, 0 dropped),
  and the writer's CPU per record.
- replay: a recording of R x S requests replayed with `--rate R` against a stand-in model in its
  own process; reports the rate achieved (target: within 2%) and this process's CPU per request,
  comparison included (target: <= 50 us).
Defaults are short (a few seconds); quote figures from runs with --seconds 60.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from shadowproxy.commands.replay import Pacing, from_recording, replay  # noqa: E402
from shadowproxy.config import CompareConfig, RecordConfig  # noqa: E402
from shadowproxy.record.fileformat import read_paths  # noqa: E402
from shadowproxy.record.recorder import _EXCHANGE, QUEUE_RECORDS, Recorder, RecordWriter  # noqa: E402
from shadowproxy.shadow.metrics import RecordMetrics  # noqa: E402

BODY = b'{"instances":[[1.0,2.0,3.0,4.0]]}'
PREDICT = "/v1/models/m:predict"


def _option(name: str, default: float) -> float:
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


async def hotpath(requests: int, rounds: int = 5) -> None:
    from hotpath import Setup, settle

    with tempfile.TemporaryDirectory() as tmp:
        plain, recording = Setup(0, 0, False, ""), Setup(0, 0, False, "", record=f"{tmp}/rec")
        for setup in (plain, recording):
            await setup.start()
            await setup.run(2000)
        gc.collect()
        gc.freeze()
        (recorder,) = [c for c in recording.components if isinstance(c, Recorder)]
        best = {"plain": float("inf"), "record": float("inf")}
        cpu0, written0 = recorder.writer.cpu_s, recorder.metrics.written._value.get()
        for r in range(rounds):
            order = [("plain", plain), ("record", recording)][:: 1 if r % 2 == 0 else -1]
            for name, setup in order:
                started = time.thread_time()
                await setup.run(requests // rounds)
                best[name] = min(best[name], (time.thread_time() - started) / (requests // rounds))
        await settle(recording.components)
        await asyncio.sleep(0.5)
        written = recorder.metrics.written._value.get() - written0
        writer_us = (recorder.writer.cpu_s - cpu0) / written * 1e6 if written else float("nan")
        added = (best["record"] - best["plain"]) * 1e6
        print(f"event loop: {best['plain'] * 1e6:.2f} us/request plain, {best['record'] * 1e6:.2f} us recorded: "
              f"+{added:.2f} us ({'met' if added <= 3 else 'NOT met'}: <= 3 us)")
        print(f"writer thread: {writer_us:.2f} us of CPU per record ({written:.0f} records)")
        for setup in (plain, recording):
            await setup.close()


async def writer(rate: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = RecordMetrics(CollectorRegistry())
        w = RecordWriter(RecordConfig(path=tmp), metrics)
        w.start()
        answer = b'{"predictions":[1],"model_version":"v1"}'
        headers = [(b"Host", b"127.0.0.1:8080"), (b"Content-Type", b"application/json"), (b"Content-Length", b"33")]
        loop = asyncio.get_running_loop()
        dropped = 0
        t0 = loop.time()
        sent = 0
        total = int(rate * seconds)
        while sent < total:
            due = min(total, int((loop.time() - t0) * rate) + 1)
            while sent < due:
                if len(w.records) >= QUEUE_RECORDS:
                    dropped += 1
                else:
                    w.records.append((_EXCHANGE, f"r{sent}", time.time(), "POST", PREDICT, 200, headers, headers,
                                      0.001, False, BODY, answer))
                sent += 1
            await asyncio.sleep(0.001)
        fed_s = loop.time() - t0
        while w.records:
            await asyncio.sleep(0.01)
        w.stop(30)
        done_s = loop.time() - t0
        written = metrics.written._value.get()
        size = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp))
        # Kept up: nothing dropped, and the queue empty within a couple of flushes of the last record.
        kept_up = dropped == 0 and done_s - fed_s <= 0.5
        print(f"writer: fed {rate:.0f} records/s for {fed_s:.2f} s, {written:.0f} written, queue empty "
              f"{done_s - fed_s:.2f} s after the last; {dropped} dropped "
              f"({'met' if kept_up and rate >= 20_000 else 'NOT met'}: keeps up with >= 20,000/s)")
        print(f"writer thread: {w.cpu_s / max(written, 1) * 1e6:.2f} us of CPU per record; "
              f"{size / max(written, 1):.0f} bytes per record on disk")


async def replay_rate(rate: float, seconds: float) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy.models", "--port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        url = line.rsplit(" serving on ", 1)[1].strip()
        n = int(rate * seconds)
        with tempfile.TemporaryDirectory() as tmp:
            w = RecordWriter(RecordConfig(path=tmp), RecordMetrics(CollectorRegistry()))
            answer = b'{"predictions":[0]}'
            for i in range(n):
                w.records.append((_EXCHANGE, f"r{i}", float(i), "POST", PREDICT, 200,
                                  [(b"Content-Type", b"application/json")], [], 0.001, False, BODY, answer))
            w._cycle()
            w._close_file()
            items = [from_recording(doc, Counter()) for doc in read_paths([tmp])]
        todo = [i for i in items if i is not None]
        cpu0, wall0 = time.process_time(), time.monotonic()
        stats = await replay(todo, [("candidate", url)], compare=CompareConfig(), pacing=Pacing("rate", rate))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        snap = stats.snapshot()
        achieved = (n - 1) / wall if wall else 0.0
        print(f"replay at --rate {rate:.0f}: {n} requests in {wall:.2f} s = {achieved:.0f}/s "
              f"({(achieved / rate - 1) * 100:+.1f}%), {cpu / n * 1e6:.1f} us of CPU per request incl. comparison; "
              f"compared {snap['comparisons']['total']}")
    finally:
        proc.kill()
        await proc.wait()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "hotpath"
    if what == "hotpath":
        uvloop.run(hotpath(int(_option("--requests", 20_000))))
    elif what == "writer":
        uvloop.run(writer(_option("--rate", 20_000), _option("--seconds", 3)))
    elif what == "replay":
        uvloop.run(replay_rate(_option("--rate", 1000), _option("--seconds", 2)))
    else:
        sys.exit(f"unknown benchmark {what!r}: hotpath, writer or replay")
