"""Streamed LLM answers through shadowproxy, beside nginx as a streaming proxy: time to first token,
CPU per event, memory with a thousand open streams, and a candidate that stalls mid-stream.

    python benchmarks/llm.py [--reps 3] [--duration 20] [--quick] [--no-rss] [--json FILE] [--build DIR]
    python benchmarks/llm.py --socket-free      # the stream follower's CPU per event, no sockets
    python benchmarks/llm.py --stall-only       # only the stalled candidate's phase

The models are `sse_standin.py` processes: production, a healthy candidate and one that stalls
after `--stall-after` events (then sends nothing, its connection left open). Each answers every
request with an OpenAI chat-completions stream of `--events` content events `--gap-ms` apart,
the first with the response head, then a final chunk (finish reason, usage) and `data: [DONE]`.
The load is `sse_client.py` in its own process: `--streams` keep-alive connections, each sending
its next streamed request as soon as the last answer ends. Neither's CPU is the proxy's.

Rows, every one started once per repetition, the order rotated, figures medians:

- `direct`: the client on production itself, the limit;
- `nginx stream proxy`: nginx, 1 worker, `proxy_buffering off`, upstream keep-alive;
- `shadowproxy 0`, `shadowproxy 1.0`: `serve` at `mirror.sample_rate` 0 and 1.0, `compare.preset =
  "openai"` (the default preset where this build has no `openai`, as the output then says);
- with `--default-preset-row`, `shadowproxy 0, default preset`: no stream followed, so the
  follower's cost shows apart.

`--build DIR` runs shadowproxy from another directory holding `shadowproxy/`, `pyproject.toml` and
the compiled modules: for instance a copy of the tree built there with `python setup.py build_ext
--inplace` while the working tree's own build is stale.

Columns: time to first token (the client's clock, from writing the request to the first `data:`
event with content) at p50 and p99, and each minus the direct row's; the proxy's CPU (user +
system of its processes) per production event, every `data:` event the client received in the
window counting one; what the candidate received as a share of the streams; mirror drops; the
proxy's RSS after the run; the machine's busy share over the window (all CPUs, from /proc/stat,
steal counted as busy). A repetition during which the machine was busier than `--max-machine-cpu`
percent is void: it reads as a failed repetition and is left out of the medians.

The stalled candidate, a phase of its own: two proxies at sample rate 1.0 side by side, each with
its own production stand-in and its own client of `--streams` streams, loaded at the same time;
one mirrors to a healthy candidate, the other to one that stalls. Loaded together, whatever the
machine does during the window (a neighbour's burst, steal) falls on both alike, which a
comparison of runs one after the other cannot promise. Both take up to 4096 copies in flight,
so the stalled exchanges pile up over the whole window (each held open by the candidate) instead
of filling the default 256 in seconds and leaving the rest of the window to drops. New proxies
every repetition.

Memory, a phase of its own (`--no-rss` skips it): a proxy at sample rate 1.0 in front of two slow
stand-ins (`--rss-events` events 1 s apart), warmed up with a few quick streams, then
`--rss-streams` streams opened over `--rss-ramp-s` seconds and held; its RSS is sampled every
quarter second. The growth is the peak less the warmed-up figure. The proxy's pools are sized for
the streams (`production.max_connections`, `candidate.max_in_flight`), and the candidate's count
of streams open at once shows that every stream was mirrored.

`--socket-free` only times, without sockets, what follows a stream inside the proxy (the stream
assembler, and production's `LlmWatch`) fed a stand-in's stream one event at a time; a full run
prints the same figures under its table.

Targets, printed as met or not met: at sample rate 1.0 the time to first token added over direct
at most 1 ms at p50 and 3 ms at p99; CPU per production event at sample rate 0 at most 1.5 x
nginx's; RSS growth at most 64 MiB with the thousand mirrored streams; the stalled candidate
moves production's time to first token by less than 1 ms at p50 and 5% at p99 against the healthy
candidate's proxy loaded beside it, both taken over the streams of every valid repetition pooled
(a 5% move of a tail needs every sample; the per-repetition figures are printed too). The extra CPU
per mirrored event (rows 1.0 less 0) is reported.
Exit 0: everything ran and every target was met; 1: a setup failed or a repetition was void; 4:
a target was not met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

PATH = "/v1/chat/completions"
TTFT_P50_MAX_MS = 1.0
TTFT_P99_MAX_MS = 3.0
CPU_RATIO_MAX = 1.5
RSS_GROWTH_MAX_MIB = 64.0
STALL_P50_MAX_MS = 1.0
STALL_P99_RATIO_MAX = 1.05
STALL_IN_FLIGHT = 4096
# A short drain, so stopping a proxy that still waits on a stalled candidate takes a second.
DRAIN = {"listen": {"drain_timeout_s": 1.0}}


# --------------------------------------------------------------------------------------------------
# Stand-ins, the client, the machine
# --------------------------------------------------------------------------------------------------

class SSEModel:
    """An `sse_standin.py` process on a free port; `counts()` asks it for its counts (SIGUSR1)."""

    def __init__(self, role: str, *flags: str) -> None:
        self.role = role
        self.port = h.free_port()
        self.stats_path = h.workdir() / f"sse-{role}-{self.port}.json"
        argv = [h.PYTHON, str(h.HERE / "sse_standin.py"), "--port", str(self.port),
                "--stats", str(self.stats_path), *flags]
        self.proc: h.Proc | None = h.Proc(argv, f"sse-{role}")
        h.wait_for_port(self.port, proc=self.proc)

    @property
    def url(self) -> str:
        return f"http://{h.HOST}:{self.port}"

    def counts(self, timeout: float = 2.0) -> dict[str, int]:
        """{"requests", "open", "max_open", "events", "completed"} as of now."""
        if self.proc is None:
            return {}
        before = _mtime(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while _mtime(self.stats_path) == before and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat. Idle
    and iowait are free time; steal, time the host gave another guest, counts as busy."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    total = sum(v)  # user nice system idle iowait irq softirq steal (guest time is within user)
    return total - v[3] - v[4], total


def busy_pct(a: tuple[int, int], b: tuple[int, int]) -> float | None:
    return 100.0 * (b[0] - a[0]) / (b[1] - a[1]) if b[1] > a[1] else None


def run_client(url: str, flags: Sequence[str], on_start: Callable[[], None] | None = None,
               on_end: Callable[[], None] | None = None, tick: Callable[[], None] | None = None,
               timeout: float = 120.0) -> dict[str, Any]:
    """Run `sse_client.py` against `url` to its end: `on_start` and `on_end` run as it prints its
    window's markers, `tick` about every 0.25 s meanwhile; its RESULT line, parsed."""
    proc = h.Proc([h.PYTHON, str(h.HERE / "sse_client.py"), "--url", url + PATH, *flags], "sse-client")
    deadline = time.monotonic() + timeout
    try:
        marks = [("MEASURE start", on_start), ("MEASURE end", on_end), ("RESULT ", None)]
        size, text, last_tick = -1, "", 0.0
        while marks:
            if time.monotonic() > deadline:
                raise h.BenchError(f"the client did not finish within {timeout:.0f} s:\n{proc.tail()}")
            now = time.monotonic()
            if tick is not None and now - last_tick >= 0.25:
                last_tick = now
                tick()
            new = os.stat(proc.log_path).st_size
            if new != size:
                size, text = new, proc.output()
            while marks and marks[0][0] in text:
                _, call = marks.pop(0)
                if call is not None:
                    call()
            if marks and not proc.alive() and marks[0][0] not in proc.output():
                raise h.BenchError(f"the client exited {proc.popen.returncode}:\n{proc.tail()}")
            time.sleep(0.002)
        proc.wait(10)
        line = next(ln for ln in proc.output().splitlines() if ln.startswith("RESULT "))
        return dict(json.loads(line[7:]))
    finally:
        proc.stop(timeout=2.0)


def client_flags(streams: int, warmup: float, duration: float, ramp_s: float = 1.0,
                 requests_per_conn: int = 0, headers: Sequence[str] = ()) -> list[str]:
    out = ["--connections", str(streams), "--warmup", f"{warmup:g}", "--duration", f"{duration:g}",
           "--ramp-s", f"{ramp_s:g}", "--requests-per-conn", str(requests_per_conn)]
    for header in headers:
        out += ["--header", header]
    return out


# --------------------------------------------------------------------------------------------------
# shadowproxy: which keys this build takes, which build runs
# --------------------------------------------------------------------------------------------------

def accepts(extra: dict[str, dict[str, Any]], build: Path | None) -> bool:
    """Whether `check-config` takes a config with these keys (a build without them says no)."""
    probe = h.ShadowproxySetup("probe", "http://127.0.0.1:1", "http://127.0.0.1:2", 1.0, extra=extra)
    path = h.workdir() / f"probe-{time.monotonic_ns()}.toml"
    path.write_text(h.toml_dumps(probe.config(1, 2)))
    r = subprocess.run([h.PYTHON, "-m", "shadowproxy", "check-config", str(path)], cwd=build or h.REPO,
                       env=_env(build), capture_output=True, timeout=60)
    return r.returncode == 0


def build_line(build: Path | None) -> str:
    r = subprocess.run([h.PYTHON, "-m", "shadowproxy", "--version"], cwd=build or h.REPO, env=_env(build),
                       capture_output=True, text=True, timeout=60)
    return " ".join(r.stdout.split()) or " ".join(r.stderr.split())


def _env(build: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if build is not None:
        env["PYTHONPATH"] = str(build)
    return env


def proxy_setup(name: str, prod_url: str, cand_url: str, rate: float, extra: dict[str, dict[str, Any]],
                build: Path | None) -> h.ShadowproxySetup:
    return h.ShadowproxySetup(name, prod_url, cand_url, rate, extra=extra, cwd=build,
                              env={"PYTHONPATH": str(build)} if build else None)


def pooled_ttft(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50 and p99 (nearest rank, ms) over the times to first token of every valid repetition."""
    values = sorted(v for r in runs if "error" not in r for v in r.get("ttft_samples_ms", ()))
    n = len(values)

    def at(q: float) -> float | None:
        return values[min(n - 1, max(0, math.ceil(q * n) - 1))] if n else None

    return {"p50": at(0.50), "p99": at(0.99), "n": n}


def merged(*tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for t in tables:
        for k, v in t.items():
            out.setdefault(k, {}).update(v)
    return out


def mirror_counts(setup: h.Setup) -> dict[str, int]:
    stats = setup.stats() if isinstance(setup, h.ShadowproxySetup) else None
    m = (stats or {}).get("mirror", {})
    return {f"mirror_{k}": int(m.get(k, 0)) for k in ("sent", "dropped", "error")}


def llm_ttft(setup: h.Setup) -> dict[str, float | None]:
    """Production's and the candidate's time to first token as the proxy measured them, if it does."""
    stats = setup.stats() if isinstance(setup, h.ShadowproxySetup) else None
    llm = (stats or {}).get("llm") or {}
    out: dict[str, float | None] = {}
    for target in ("production", "candidate"):
        t = (llm.get(target) or {}).get("ttft_ms") or {}
        out[f"proxy_{target}_ttft_p50_ms"] = t.get("p50")
    return out


# --------------------------------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------------------------------

def streams_measure(args: argparse.Namespace, owner: dict[str, SSEModel | None]) -> h.Measure:
    def measure(setup: h.Setup, url: str) -> dict[str, Any]:
        pids = setup.pids()
        cand = owner.get(setup.name)
        box: dict[str, Any] = {}

        def mark(tag: str) -> None:
            # The counters are read inside the CPU window's edges, so their own cost stays out of it.
            if tag == "0":
                box["mirror0"], box["cand0"] = mirror_counts(setup), cand.counts() if cand else {}
            box[f"cpu{tag}"] = h.cpu_ticks(pids) if pids else 0
            box[f"machine{tag}"] = machine_ticks()
            if tag == "1":
                box["mirror1"], box["cand1"] = mirror_counts(setup), cand.counts() if cand else {}

        samples = h.workdir() / f"ttft-{time.monotonic_ns()}.json"
        r = run_client(url, client_flags(args.streams, args.warmup, args.duration) + ["--samples", str(samples)],
                       on_start=lambda: mark("0"), on_end=lambda: mark("1"),
                       timeout=args.warmup + args.duration + 60)
        events = int(r["events"])
        ttft = r["ttft_ms"]
        got = box["cand1"].get("requests", 0) - box["cand0"].get("requests", 0) if cand else None
        out: dict[str, Any] = {
            "ttft_p50_ms": ttft["p50"], "ttft_p90_ms": ttft["p90"], "ttft_p99_ms": ttft["p99"],
            "ttft_n": ttft["n"], "events": events, "sent": r["sent"], "streams": r["streams"],
            "failed": r["failed"],
            "cpu_us_event": (box["cpu1"] - box["cpu0"]) / h.CLK_TCK * 1e6 / events if pids and events else None,
            "machine_cpu_pct": busy_pct(box["machine0"], box["machine1"]),
            "candidate_got": got, "candidate_share": got / r["sent"] if got is not None and r["sent"] else None,
            "rss_kib": setup.rss_kb() if pids else None,
            **{k: box["mirror1"][k] - box["mirror0"][k] for k in box["mirror1"]},
            **llm_ttft(setup), "ttft_samples_ms": json.loads(samples.read_text())}
        if r["failures"]:
            h.log(f"  {setup.name}: {r['failed']} failed streams, e.g. {r['failures'][0]}")
        busy = out["machine_cpu_pct"]
        if busy is not None and busy > args.max_machine_cpu:
            h.log("  " + ", ".join(f"{k} {h.fmt(v, 3)}" for k, v in out.items() if isinstance(v, int | float)))
            return {"error": f"void: the machine was {busy:.0f}% busy over the window (> {args.max_machine_cpu:g}%)"}
        return out

    return measure


def stall_phase(args: argparse.Namespace, base: dict[str, dict[str, Any]],
                build: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Two proxies at 1.0 loaded at the same time, each by its own client with `--streams` streams:
    one in front of a healthy candidate, one in front of a candidate that stalls. Each has its own
    production stand-in, so nothing is shared but the machine, and whatever the machine does (a
    neighbour's burst, steal) falls on both at once. Fresh proxies every repetition."""
    flags = ("--events", str(args.events), "--gap-ms", f"{args.gap_ms:g}")
    # Room for every copy of the window, so the stalled exchanges pile up all along it rather than
    # fill the default 256 in seconds and leave the rest of the window to cheap drops.
    extra = merged(base, {"candidate": {"max_in_flight": STALL_IN_FLIGHT}})
    models: list[SSEModel] = []
    runs: dict[str, list[dict[str, Any]]] = {"healthy": [], "stalled": []}
    try:
        ups: dict[str, tuple[SSEModel, SSEModel]] = {}
        for side in runs:
            prod = SSEModel(f"{side}-production", *flags)
            models.append(prod)
            cand = SSEModel(f"{side}-candidate", *flags,
                            *(("--stall-after", str(args.stall_after)) if side == "stalled" else ()))
            models.append(cand)
            ups[side] = (prod, cand)
        for rep in range(args.reps):
            setups = {side: proxy_setup(f"stall phase, {side}", p.url, c.url, 1.0, extra, build)
                      for side, (p, c) in ups.items()}
            out: dict[str, dict[str, Any]] = {}
            try:
                urls = {side: s.start() for side, s in setups.items()}
                box: dict[str, Any] = {}
                threads = [threading.Thread(target=_load_side, args=(args, side, urls[side], s, box, out))
                           for side, s in setups.items()]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                for s in setups.values():
                    s.stop()
            busy = busy_pct(box["m0"], box["m1"]) if "m0" in box and "m1" in box else None
            if busy is not None and busy > args.max_machine_cpu:
                out = {side: {"error": f"void: the machine was {busy:.0f}% busy"} for side in runs}
            for side in runs:
                r = out.get(side, {"error": "no result"})
                r["machine_cpu_pct"] = busy
                runs[side].append(r)
            st, he = pooled_ttft([out.get("stalled", {})]), pooled_ttft([out.get("healthy", {})])
            h.log(f"  stall phase rep {rep + 1}/{args.reps}: p50 {h.fmt(st['p50'], 3)} against "
                  f"{h.fmt(he['p50'], 3)} ms, p99 {h.fmt(st['p99'], 3)} against {h.fmt(he['p99'], 3)} ms; "
                  f"stalled copies sent {out.get('stalled', {}).get('mirror_sent')}, "
                  f"dropped {out.get('stalled', {}).get('mirror_dropped')}; machine {h.fmt(busy, 0)}% busy")
    finally:
        for m in models:
            m.stop()
    return runs


def _load_side(args: argparse.Namespace, side: str, url: str, setup: h.Setup, box: dict[str, Any],
               out: dict[str, dict[str, Any]]) -> None:
    """One side of the stall phase: its client's streams, its times to first token in `out[side]`;
    the healthy side's window also marks the machine's ticks in `box`."""
    samples = h.workdir() / f"stall-{side}-{time.monotonic_ns()}.json"
    pids = setup.pids()
    cpu: dict[str, int] = {}

    def mark(tag: str) -> None:
        cpu[tag] = h.cpu_ticks(pids)
        if side == "healthy":
            box[f"m{tag}"] = machine_ticks()

    try:
        r = run_client(url, client_flags(args.streams, args.warmup, args.duration) + ["--samples", str(samples)],
                       on_start=lambda: mark("0"), on_end=lambda: mark("1"),
                       timeout=args.warmup + args.duration + 60)
        events = int(r["events"])
        out[side] = {"ttft_samples_ms": json.loads(samples.read_text()), **mirror_counts(setup), **llm_ttft(setup),
                     "cpu_us_event": (cpu["1"] - cpu["0"]) / h.CLK_TCK * 1e6 / events if events else None}
    except h.BenchError as e:
        out[side] = {"error": str(e).splitlines()[0]}


def rss_phase(args: argparse.Namespace, base: dict[str, dict[str, Any]], stream_timeout: bool,
              build: Path | None) -> dict[str, Any]:
    """A proxy at 1.0 holding `--rss-streams` mirrored streams at once; its RSS before and at the peak."""
    n = args.rss_streams
    models: list[SSEModel] = []
    setup: h.ShadowproxySetup | None = None
    try:
        flags = ("--events", str(args.rss_events), "--gap-ms", "1000")
        prod = SSEModel("rss-production", *flags)
        models.append(prod)
        cand = SSEModel("rss-candidate", *flags)
        models.append(cand)
        # The stream's whole length bounds the candidate's exchange where no stream timeout exists.
        hold = args.rss_events + args.rss_ramp_s + 60
        cand_keys: dict[str, Any] = {"max_in_flight": n + 64}
        cand_keys.update({"stream_timeout_s": hold} if stream_timeout else {"timeout_s": hold})
        extra = merged(base, {"production": {"max_connections": n + 64}, "candidate": cand_keys})
        setup = proxy_setup("rss", prod.url, cand.url, 1.0, extra, build)
        url = setup.start()
        quick = ["X-Standin-Events: 20", "X-Standin-Gap-Ms: 5"]
        warm = run_client(url, client_flags(50, 0, 0, 0.2, 2, quick), timeout=60)
        if warm["failed"]:
            raise h.BenchError(f"warm-up: {warm['failed']} failed streams, e.g. {warm['failures'][0]}")
        time.sleep(1.0)
        base_kib = setup.rss_kb()
        mirror0 = mirror_counts(setup)
        samples: list[int] = []
        m0 = machine_ticks()
        r = run_client(url, client_flags(n, 0, 0, args.rss_ramp_s, 1) + ["--timeout-s", "30"],
                       tick=lambda: samples.append(setup.rss_kb() if setup else 0),
                       timeout=args.rss_events + args.rss_ramp_s + 90)
        busy = busy_pct(m0, machine_ticks())
        counts = cand.counts()
        mirror = {k: v - mirror0[k] for k, v in mirror_counts(setup).items()}
        return {"streams": n, "base_kib": base_kib, "peak_kib": max([*samples, setup.rss_kb()]),
                "end_kib": setup.rss_kb(), "client_max_open": r["max_open"], "complete": r["complete"],
                "failed": r["failed"], "failures": r["failures"], "candidate_max_open": counts.get("max_open"),
                "machine_cpu_pct": busy, **mirror}
    finally:
        if setup is not None:
            setup.stop()
        for m in models:
            m.stop()


def socket_free(build: Path | None, rounds: int = 5, streams: int = 2000, events: int = 100) -> list[dict[str, Any]]:
    """CPU per event of what follows a stream in the proxy, fed a stand-in's stream one piece per
    event (as each arrives): the stream assembler alone, and production's follower (`LlmWatch`:
    the assembler, the time to first token, the gap before each event, the figures at the end).
    Process CPU time, the minimum over `rounds` of `streams` streams. Empty when this tree has
    neither."""
    sys.path.insert(0, str(build or h.REPO))
    import sse_standin

    stream = sse_standin.Stream(sse_standin.parse_args(["--port", "0", "--events", str(events)]))
    # The chunk framing comes off before a body piece reaches the proxy's code: keep the event.
    pieces = [_unchunk(stream.content)] * events + [_unchunk(c) for c in _chunks(stream.tail(events))]
    out: list[dict[str, Any]] = []
    try:
        from shadowproxy.judging.sse import StreamAssembler
    except ImportError:
        return out

    def assembler() -> None:
        a = StreamAssembler(1 << 20)
        for piece in pieces:
            a.feed(piece, 1.0)
        a.end()
        if not a.complete or a.deltas != events:
            raise h.BenchError(f"the assembler did not read the stream: complete {a.complete}, deltas {a.deltas}")

    out.append(_time_streams(f"stream assembler ({_how(StreamAssembler)} judging.sse.StreamAssembler)",
                             assembler, rounds, streams, len(pieces)))
    try:
        from shadowproxy.judging.llmstats import LlmFigures
        from shadowproxy.shadow.llm import LlmMeter
        from shadowproxy.shadow.metrics import Metrics
    except ImportError:
        return out
    figures = LlmFigures()
    meter = LlmMeter("production", figures, Metrics(), None, 1 << 20)

    def follower() -> None:
        w = meter.watch("chat", time.perf_counter(), True)
        for piece in pieces:
            w.feed(piece)
        w.finish()
        w.record(None)  # the proxy runs this in a callback of its own, still on the event loop

    out.append(_time_streams(f"production's follower ({_how(LlmMeter)} shadow.llm.LlmWatch)", follower, rounds,
                             streams, len(pieces)))
    if figures.errors or figures.streams != rounds * streams:
        raise h.BenchError(f"the follower did not read the streams: {figures.streams} whole, {figures.errors} errors")
    return out


def _how(cls: type) -> str:
    """Whether a class's module runs compiled or as Python in this process."""
    path = str(getattr(sys.modules[cls.__module__], "__file__", ""))
    return "Python" if path.endswith(".py") else "compiled"


def _time_streams(label: str, one: Callable[[], None], rounds: int, streams: int, per: int) -> dict[str, Any]:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(streams):
            one()
        best = min(best, time.process_time() - t0)
    return {"what": label, "us_per_event": best * 1e6 / (streams * per), "us_per_stream": best * 1e6 / streams,
            "events_per_stream": per}


def _chunks(raw: bytes) -> list[bytes]:
    """Split a run of whole chunks (ending with the last chunk) into each chunk's bytes."""
    out, pos = [], 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol], 16)
        if size == 0:
            return out
        out.append(raw[pos:eol + 2 + size + 2])
        pos = eol + 2 + size + 2


def _unchunk(c: bytes) -> bytes:
    eol = c.index(b"\r\n")
    return c[eol + 2:eol + 2 + int(c[:eol], 16)]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="streamed LLM answers through shadowproxy and nginx")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each window (default 3)")
    p.add_argument("--streams", type=int, default=50, help="concurrent streams (default 50)")
    p.add_argument("--events", type=int, default=100, help="content events per answer (default 100)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="between events (default 20)")
    p.add_argument("--stall-after", type=int, default=5, help="the stalled candidate's events (default 5)")
    p.add_argument("--max-machine-cpu", type=float, default=70.0,
                   help="a repetition with the machine busier than this percent is void (default 70)")
    p.add_argument("--rss-streams", type=int, default=1000, help="memory phase: streams at once (default 1000)")
    p.add_argument("--rss-events", type=int, default=30, help="memory phase: events 1 s apart (default 30)")
    p.add_argument("--rss-ramp-s", type=float, default=10.0, help="memory phase: open them over this (default 10)")
    p.add_argument("--no-rss", action="store_true", help="skip the memory phase")
    p.add_argument("--no-nginx", action="store_true", help="leave out the nginx row")
    p.add_argument("--default-preset-row", action="store_true",
                   help="add shadowproxy 0 with the default preset: no stream followed, its cost apart")
    p.add_argument("--socket-free", action="store_true", help="only the assembler's CPU per event, no sockets")
    p.add_argument("--build", type=Path, default=None,
                   help="run shadowproxy from this build directory (sources and compiled modules)")
    p.add_argument("--json", type=Path, default=None, help="also write every repetition's figures here")
    p.add_argument("--stall-only", action="store_true", help="only the stall phase")
    p.add_argument("--quick", action="store_true", help="1 repetition of 8 s, 300 streams in the memory phase")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.rss_streams, args.rss_events, args.rss_ramp_s = 1, 8.0, 300, 15, 4.0

    if args.socket_free:
        try:
            timed = socket_free(args.build.resolve() if args.build else None)
        except Exception as e:  # the follower's API moves with the tree: say so in one line
            print(f"socket-free timing failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if not timed:
            print("no stream assembler in this tree (shadowproxy.judging.sse): nothing to time")
            return 1
        print(f"# {h.machine_summary()}")
        print(f"# a {timed[0]['events_per_stream']}-event stream fed one event per piece; process CPU, "
              "min of 5 rounds of 2000 streams")
        for t in timed:
            print(f"{t['what']}: {t['us_per_event']:.2f} µs per event, {t['us_per_stream']:.0f} µs per stream")
        return 0

    build = args.build.resolve() if args.build else None
    if args.stall_only:
        h.log(h.machine_summary())
        h.log(f"shadowproxy: {build_line(build)}; stall phase only, {args.reps} repetition(s)")
        stall = stall_phase(args, merged(DRAIN, {"compare": {"preset": "openai"}}), build)
        print()
        targets = stall_targets(stall_summary(stall))
        for text, ok in targets:
            print(f"  {'met    ' if ok else 'NOT MET' if ok is False else 'unknown'}  {text}")
        if any("error" in r for runs in stall.values() for r in runs):
            return 1
        return 4 if any(ok is False for _, ok in targets) else 0
    openai = accepts(merged(DRAIN, {"compare": {"preset": "openai"}}), build)
    stream_timeout = accepts({"candidate": {"stream_timeout_s": 600.0}}, build)
    base = merged(DRAIN, {"compare": {"preset": "openai"}} if openai else {})
    version = build_line(build)
    preset_note = ('compare.preset = "openai"' if openai else
                   'compare.preset left at its default: this build has no "openai" preset')
    use_nginx = h.have("nginx") and not args.no_nginx
    h.log(h.machine_summary())
    h.log(f"shadowproxy: {version}; {preset_note}")

    flags = ("--events", str(args.events), "--gap-ms", f"{args.gap_ms:g}")
    models: list[SSEModel] = []
    owner: dict[str, SSEModel | None] = {}
    try:
        prod = SSEModel("production", *flags)
        models.append(prod)
        healthy = SSEModel("candidate", *flags)
        models.append(healthy)
        setups: list[h.Setup] = [h.DirectSetup("direct", prod.url)]
        if use_nginx:
            setups.append(h.NginxProxySetup("nginx stream proxy", prod.url, buffering=False))
        else:
            h.log("nginx not installed (or --no-nginx): no nginx row")
        setups += [proxy_setup("shadowproxy 0", prod.url, healthy.url, 0.0, base, build),
                   proxy_setup("shadowproxy 1.0", prod.url, healthy.url, 1.0, base, build)]
        owner.update({"shadowproxy 0": healthy, "shadowproxy 1.0": healthy})
        if args.default_preset_row and openai:
            name = "shadowproxy 0, default preset"
            setups.append(proxy_setup(name, prod.url, healthy.url, 0.0, DRAIN, build))
            owner[name] = healthy
        h.log(f"reps {args.reps}; {args.streams} streams of {args.events} events {args.gap_ms:g} ms apart; "
              f"{args.warmup:g} s warm-up + {args.duration:g} s window per run")
        results = h.run_interleaved(setups, streams_measure(args, owner), reps=args.reps)
    finally:
        for m in models:
            m.stop()
    med = h.medians(results)
    if args.json:  # written after each phase, so a later failure keeps what was measured
        args.json.write_text(json.dumps({"results": results}, indent=1))

    h.log(f"stall phase: a healthy and a stalling candidate's proxies side by side, {args.reps} repetition(s)")
    stall = stall_phase(args, base, build)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "stall": stall}, indent=1))

    mem: dict[str, Any] = {}
    if not args.no_rss:
        h.log(f"memory: {args.rss_streams} mirrored streams of {args.rss_events} events 1 s apart")
        try:
            mem = rss_phase(args, base, stream_timeout, build)
            h.log("  " + ", ".join(f"{k} {h.fmt(v, 1)}" for k, v in mem.items() if isinstance(v, int | float)))
        except h.BenchError as e:
            h.log(f"memory phase failed: {e}")
            mem = {"error": str(e).splitlines()[0]}
    try:
        sf = socket_free(build, rounds=3, streams=1000)
    except Exception as e:  # the follower's API moves with the tree: the measured run still reports
        h.log(f"socket-free timing failed: {type(e).__name__}: {e}")
        sf = [{"what": "failed", "error": f"{type(e).__name__}: {e}"}]

    if args.json:
        args.json.write_text(json.dumps({"results": results, "stall": stall, "memory": mem, "socket_free": sf},
                                        indent=1))
    return report(args, setups, med, results, stall, mem, sf, version, preset_note)


def stall_summary(stall: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Print the stall phase's figures; its pooled times to first token, per side."""
    stalled_runs, healthy_runs = stall["stalled"], stall["healthy"]
    pairs = [(pooled_ttft([a]), pooled_ttft([b])) for a, b in zip(stalled_runs, healthy_runs, strict=True)
             if "error" not in a and "error" not in b]
    if pairs:
        print("Stall phase, stalled against healthy candidate per repetition (loaded at the same time): p50 "
              + ", ".join(f"{a['p50'] - b['p50']:+.3f} ms" for a, b in pairs) + "; p99 ÷ "
              + ", ".join(f"{a['p99'] / b['p99']:.3f}" for a, b in pairs if a["p99"] and b["p99"]))
        print("Stall phase, the proxies' CPU per production event, stalled against healthy: "
              + ", ".join(f"{h.fmt(a.get('cpu_us_event'), 2)} against {h.fmt(b.get('cpu_us_event'), 2)} µs"
                          for a, b in zip(stalled_runs, healthy_runs, strict=True)
                          if "error" not in a and "error" not in b))
        print("Stall phase, production's time to first token as the proxies measured it (request sent upstream "
              "to the first event), p50, stalled against healthy: "
              + ", ".join(f"{h.fmt(a.get('proxy_production_ttft_p50_ms'), 3)} against "
                          f"{h.fmt(b.get('proxy_production_ttft_p50_ms'), 3)} ms"
                          for a, b in zip(stalled_runs, healthy_runs, strict=True)
                          if "error" not in a and "error" not in b))
        sent = [r.get("mirror_sent", 0) for r in stalled_runs if "error" not in r]
        print(f"Stall phase, copies sent to the stalled candidate per repetition, every one still open at the "
              f"window's end: {sent} (candidate.max_in_flight {STALL_IN_FLIGHT})")
    pooled = {name: pooled_ttft(runs) for name, runs in (("stalled", stalled_runs), ("healthy", healthy_runs))}
    if pooled["stalled"]["n"] and pooled["healthy"]["n"]:
        print(f"Stall phase pooled over the valid repetitions ({pooled['stalled']['n']} and "
              f"{pooled['healthy']['n']} streams): p50 {pooled['stalled']['p50']:.3f} against "
              f"{pooled['healthy']['p50']:.3f} ms, p99 {pooled['stalled']['p99']:.3f} against "
              f"{pooled['healthy']['p99']:.3f} ms")
    return pooled


def stall_targets(pooled: dict[str, dict[str, Any]]) -> list[tuple[str, bool | None]]:
    st50 = h.diff(pooled["stalled"]["p50"], pooled["healthy"]["p50"])
    st99 = h.ratio(pooled["stalled"]["p99"], pooled["healthy"]["p99"])
    return [
        (f"stalled candidate moves the pooled p50 by < {STALL_P50_MAX_MS:g} ms (got {h.fmt(st50, 3, sign=True)})",
         None if st50 is None else st50 < STALL_P50_MAX_MS),
        (f"stalled candidate moves the pooled p99 by < {(STALL_P99_RATIO_MAX - 1) * 100:.0f}% "
         f"(got ratio {h.fmt(st99, 3)})", None if st99 is None else st99 < STALL_P99_RATIO_MAX),
    ]


def report(args: argparse.Namespace, setups: Sequence[h.Setup], med: dict[str, dict[str, Any]],
           results: dict[str, list[dict[str, Any]]], stall: dict[str, list[dict[str, Any]]], mem: dict[str, Any],
           sf: list[dict[str, Any]],
           version: str, preset_note: str) -> int:
    direct = med["direct"]
    print()
    print(f"# {h.machine_summary()}")
    print(f"# shadowproxy: {version}; {preset_note}")
    print(f"# {args.streams} concurrent streams of {args.events} events {args.gap_ms:g} ms apart; medians of "
          f"{args.reps} interleaved repetition(s), each {args.duration:g} s after {args.warmup:g} s of warm-up")
    print()
    rows = []
    for s in setups:
        m = med[s.name]
        is_direct = s.name == "direct"
        rows.append([
            s.name, h.fmt(m.get("ttft_p50_ms"), 2), h.fmt(m.get("ttft_p99_ms"), 2),
            "—" if is_direct else h.fmt(h.diff(m.get("ttft_p50_ms"), direct.get("ttft_p50_ms")), 2, sign=True),
            "—" if is_direct else h.fmt(h.diff(m.get("ttft_p99_ms"), direct.get("ttft_p99_ms")), 2, sign=True),
            h.fmt(m.get("cpu_us_event"), 2, na="—"), h.fmt(m.get("sent"), 0), h.fmt(m.get("failed"), 0),
            h.fmt(m.get("candidate_share"), 2, na="—"),
            h.fmt(m.get("mirror_dropped"), 0) if isinstance(s, h.ShadowproxySetup) else "—",
            h.fmt(None if m.get("rss_kib") is None else m["rss_kib"] / 1024, 1, na="—"),
            h.fmt(m.get("machine_cpu_pct"), 0)])
    print(h.format_table(
        ["setup", "TTFT p50 ms", "TTFT p99 ms", "+p50 ms", "+p99 ms", "CPU µs/event", "streams", "failed",
         "candidate got", "dropped", "RSS MiB", "machine %"], rows,
        title="Time to first token (client's clock) and the proxy's CPU per production event"))

    sp0, sp1 = med.get("shadowproxy 0", {}), med.get("shadowproxy 1.0", {})
    nginx = med.get("nginx stream proxy", {})
    extra = h.diff(sp1.get("cpu_us_event"), sp0.get("cpu_us_event"))
    print()
    print(f"Extra CPU per mirrored event (shadowproxy 1.0 less 0): {h.fmt(extra, 2)} µs")
    if sp1.get("proxy_production_ttft_p50_ms") is not None:
        print(f"The proxy's own time to first token at 1.0, p50: production "
              f"{h.fmt(sp1.get('proxy_production_ttft_p50_ms'), 2)} ms, candidate "
              f"{h.fmt(sp1.get('proxy_candidate_ttft_p50_ms'), 2)} ms")
    pooled = stall_summary(stall)
    if not sf:
        print("Socket-free: this tree has no stream assembler (shadowproxy.judging.sse)")
    for t in sf:
        if "error" in t:
            print(f"Socket-free: failed: {t['error']}")
            continue
        print(f"Socket-free, {t['what']}: {t['us_per_event']:.2f} µs per event "
              f"({t['us_per_stream']:.0f} µs per {t['events_per_stream']}-event stream)")
    print()
    if not mem:
        print("Memory: skipped (--no-rss)")
    elif "error" in mem:
        print(f"Memory: failed: {mem['error']}")
    else:
        print(f"Memory ({mem['streams']} mirrored streams of {args.rss_events} events 1 s apart, opened over "
              f"{args.rss_ramp_s:g} s): RSS {mem['base_kib'] / 1024:.1f} MiB warmed up, peak "
              f"{mem['peak_kib'] / 1024:.1f} MiB, {mem['end_kib'] / 1024:.1f} MiB after; streams open at once: "
              f"client {mem['client_max_open']}, candidate {mem['candidate_max_open']}; {mem['complete']} whole, "
              f"{mem['failed']} failed; mirror sent {mem['mirror_sent']}, dropped {mem['mirror_dropped']}, "
              f"error {mem['mirror_error']}; machine {h.fmt(mem['machine_cpu_pct'], 0)}% busy")

    def within(value: float | None, limit: float, strict: bool = False) -> bool | None:
        if value is None:
            return None
        return value < limit if strict else value <= limit

    add50 = h.diff(sp1.get("ttft_p50_ms"), direct.get("ttft_p50_ms"))
    add99 = h.diff(sp1.get("ttft_p99_ms"), direct.get("ttft_p99_ms"))
    n50 = h.diff(nginx.get("ttft_p50_ms"), direct.get("ttft_p50_ms"))
    n99 = h.diff(nginx.get("ttft_p99_ms"), direct.get("ttft_p99_ms"))
    cpu_ratio = h.ratio(sp0.get("cpu_us_event"), nginx.get("cpu_us_event"))
    growth = (mem["peak_kib"] - mem["base_kib"]) / 1024 if mem and "error" not in mem else None
    targets: list[tuple[str, bool | None]] = [
        (f"time to first token added at 1.0, p50 <= {TTFT_P50_MAX_MS:g} ms (got {h.fmt(add50, 2, sign=True)}; "
         f"nginx {h.fmt(n50, 2, sign=True)})", within(add50, TTFT_P50_MAX_MS)),
        (f"time to first token added at 1.0, p99 <= {TTFT_P99_MAX_MS:g} ms (got {h.fmt(add99, 2, sign=True)}; "
         f"nginx {h.fmt(n99, 2, sign=True)})", within(add99, TTFT_P99_MAX_MS)),
        (f"CPU per production event at 0 <= {CPU_RATIO_MAX:g} x nginx's (got {h.fmt(cpu_ratio, 2)}: "
         f"{h.fmt(sp0.get('cpu_us_event'), 2)} against {h.fmt(nginx.get('cpu_us_event'), 2)} µs)",
         within(cpu_ratio, CPU_RATIO_MAX)),
        # A 5% move of a tail needs the most samples: every valid repetition's streams, pooled.
        *stall_targets(pooled),
    ]
    if mem:
        targets.append((f"RSS growth with {args.rss_streams} mirrored streams <= {RSS_GROWTH_MAX_MIB:g} MiB "
                        f"(got {h.fmt(growth, 1, sign=True)})", within(growth, RSS_GROWTH_MAX_MIB)))
    print()
    print("Targets:")
    for text, ok in targets:
        print(f"  {'met    ' if ok else 'NOT MET' if ok is False else 'unknown'}  {text}")

    failed_setups = h.print_failures(med)
    stall_failed = [r["error"] for runs in stall.values() for r in runs if "error" in r]
    for err in stall_failed[:2]:
        print(f"stall phase: {err}")
    if failed_setups or stall_failed or (mem and "error" in mem) or any("error" in t for t in sf):
        return 1
    if any(ok is False for _, ok in targets):
        return 4
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    h.run_main(main)
