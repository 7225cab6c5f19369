"""Benchmark harness for shadowproxy: processes, stand-in models, reference proxies, load, measurement.

A library for the scripts in this directory (`proxy.py`, `isolation.py`, `run.py`, ...). The method
it implements: every setup is started once per repetition, the order rotates each repetition, each
measured run follows a 2 s warm-up, figures are medians, and comparisons are ratios from the same run.

Compact tour::

    import harness as h                      # scripts in benchmarks/ import it as a sibling module

    with h.Models(backend="auto") as models:  # production + candidate stand-ins on free ports
        setups = [h.DirectSetup("direct", models.prod_url),
                  h.ShadowproxySetup("shadowproxy", models.prod_url, models.cand_url, sample_rate=0.1),
                  h.NginxProxySetup("nginx mirror", models.prod_url, models.cand_url, mirror_rate=0.1)]
        results = h.run_interleaved(setups, lambda s, url: h.closed_loop(url, s, models=models), reps=3)
        med = h.medians(results)              # {name: {"rps": .., "p50_ms": .., "cpu_us": .., ...}}
        print(h.format_table(["setup", "requests/s"], [[n, h.fmt(m["rps"], 0)] for n, m in med.items()]))

Every process is started in its own process group and registered; `stop_all()` runs at exit and on
SIGTERM/SIGHUP (turned into SystemExit so `finally` blocks run), so nothing is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
HOST = "127.0.0.1"

BODY = '{"instances":[[1.0,2.0,3.0,4.0]]}'
PROD_ANSWER = '{"predictions":[1],"model_version":"v1"}'
CAND_ANSWER = '{"predictions":[1],"model_version":"v2"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A setup could not be started or a tool failed; the message says why (with a log tail)."""


def log(msg: str) -> None:
    """Progress output, on stderr so tables on stdout stay clean."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# --------------------------------------------------------------------------------------------------
# Temporary directory and process control
# --------------------------------------------------------------------------------------------------

_workdir: Path | None = None
_live: dict[int, Proc] = {}
_lock = threading.Lock()
_handlers_installed = False


def workdir() -> Path:
    """One temp directory per benchmark run (configs, logs, nginx temp paths); removed at exit.

    Set BENCH_KEEP=1 to keep it for debugging (its path is logged)."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="shadowproxy-bench-"))
        # nginx workers may run as another user when the master is root: let them traverse it.
        os.chmod(_workdir, 0o755)
        atexit.register(_cleanup_workdir)
    return _workdir


def _cleanup_workdir() -> None:
    if _workdir is None:
        return
    if os.environ.get("BENCH_KEEP"):
        log(f"kept {_workdir}")
        return
    shutil.rmtree(_workdir, ignore_errors=True)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# A watchdog for the one case atexit cannot cover: this process killed with SIGKILL. It reads the process
# groups we start and stop from a pipe; at EOF (our death, or our normal exit after stop_all) it kills
# whatever groups are still listed and removes the temp directory.
_REAPER = r"""
import os, shutil, signal, sys, time
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line[:1] == "+":
        groups.add(int(line[1:]))
    elif line[:1] == "-":
        groups.discard(int(line[1:]))
for sig in (signal.SIGTERM, signal.SIGKILL):
    for g in groups:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    if groups and sig == signal.SIGTERM:
        time.sleep(1.0)
if sys.argv[1] and not os.environ.get("BENCH_KEEP"):
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""
_reaper: subprocess.Popen[bytes] | None = None


def _tell_reaper(line: str) -> None:
    global _reaper
    if _reaper is None:
        _reaper = subprocess.Popen([PYTHON, "-c", _REAPER, str(workdir())], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    with contextlib.suppress(OSError, ValueError):
        assert _reaper.stdin is not None
        _reaper.stdin.write(line.encode() + b"\n")
        _reaper.stdin.flush()


def _close_reaper() -> None:
    if _reaper is not None and _reaper.stdin is not None:
        with contextlib.suppress(OSError):
            _reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _reaper.wait(5)


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP become SystemExit (SIGINT already is KeyboardInterrupt): `finally` blocks and
    the atexit clean-up run. Only handlers still at their default are replaced."""
    global _handlers_installed
    workdir()  # registers its removal first, so it runs after stop_all at exit
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)
    atexit.register(_close_reaper)  # atexit runs last-in first-out: stop_all, then this
    atexit.register(stop_all)


class Proc:
    """A child process in its own process group, its output in a log file; stopped by PID/PGID."""

    def __init__(self, argv: Sequence[str], name: str, *, cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        install_signal_handlers()
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = workdir() / f"{_safe(name)}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(cwd) if cwd else None, env=full_env, start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        self.pid = self.popen.pid
        with _lock:
            _live[self.pid] = self
        _tell_reaper(f"+{self.pid}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and all its descendants (e.g. nginx workers, proxy worker processes)."""
        return [self.pid, *descendants(self.pid)] if self.alive() else []

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the whole group, wait up to `timeout`, then SIGKILL the group; idempotent."""
        if self.alive():
            _killpg(self.pid, sig)
            if self.wait(timeout) is None:
                _killpg(self.pid, signal.SIGKILL)
                self.wait(5)
        # sweep the group: children that outlived their leader (e.g. nginx workers)
        _killpg(self.pid, signal.SIGKILL)
        with _lock:
            known = _live.pop(self.pid, None) is not None
        if known:
            _tell_reaper(f"-{self.pid}")
        return self.popen.returncode

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, alive={self.alive()})"


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "proc"


def stop_all() -> None:
    """Stop every process this harness started (registered at exit)."""
    with _lock:
        procs = list(_live.values())
    for p in procs:
        with contextlib.suppress(Exception):
            p.stop(timeout=3.0)


def run_tool(argv: Sequence[str], name: str, timeout: float) -> str:
    """Run a command to completion (as a registered Proc) and return its output."""
    p = Proc(argv, name)
    try:
        if p.wait(timeout) is None:
            raise BenchError(f"{name} did not finish within {timeout:.0f} s: {' '.join(p.argv)}")
        out = p.output()
        if p.popen.returncode != 0:
            raise BenchError(f"{name} exited {p.popen.returncode}: {' '.join(p.argv)}\n{out[-2000:]}")
        return out
    finally:
        p.stop(timeout=2.0)
        with contextlib.suppress(OSError):
            p.log_path.unlink()


# --------------------------------------------------------------------------------------------------
# Ports and readiness
# --------------------------------------------------------------------------------------------------

def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct free TCP ports (all sockets are held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = HOST) -> int:
    return free_ports(1, host)[0]


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_alive(proc: Proc | None) -> None:
    if proc is not None and not proc.alive():
        raise BenchError(f"{proc.name} exited with {proc.popen.returncode} while starting:\n{proc.tail()}")


def wait_for_port(port: int, host: str = HOST, timeout: float = 15.0, proc: Proc | None = None) -> None:
    """Wait until something accepts connections on host:port; fail early if `proc` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc)
        if port_open(port, host):
            return
        time.sleep(0.05)
    _check_alive(proc)
    tail = f":\n{proc.tail()}" if proc else ""
    raise BenchError(f"nothing listening on {host}:{port} after {timeout:.0f} s{tail}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body); status 0 when the connection fails."""
    return http_request(url, timeout=timeout)


def http_request(url: str, method: str = "GET", body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of any request; status 0 when the connection fails."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def wait_for_http(url: str, status: int = 200, timeout: float = 15.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        _check_alive(proc)
        last, _ = http_get(url, timeout=1.0)
        if last == status:
            return
        time.sleep(0.05)
    _check_alive(proc)
    tail = f":\n{proc.tail()}" if proc else ""
    raise BenchError(f"GET {url} answered {last or 'nothing'}, wanted {status}, after {timeout:.0f} s{tail}")


# --------------------------------------------------------------------------------------------------
# /proc: CPU and memory
# --------------------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; comm may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (walks /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f:
            children.setdefault(int(f[1]), []).append(int(entry))  # field 4: ppid
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(children.get(c, ()))
    return out


def cpu_ticks(pids: Iterable[int], children: bool = True) -> int:
    """utime + stime (fields 14, 15 of /proc/PID/stat, clock ticks) summed over pids and, by default,
    all their live descendants."""
    seen: set[int] = set()
    for pid in pids:
        seen.add(pid)
        if children:
            seen.update(descendants(pid))
    total = 0
    for pid in seen:
        f = _stat_fields(pid)
        if f:
            total += int(f[11]) + int(f[12])  # fields 14, 15 (f[0] is field 3)
    return total


def cpu_seconds(pids: Iterable[int], children: bool = True) -> float:
    return cpu_ticks(pids, children) / CLK_TCK


def thread_sched(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of pid: (ns on a CPU, ns runnable but waiting for one), from
    /proc/PID/task/TID/schedstat; {} where the kernel does not keep schedstats. A thread's wall time
    minus both is the time it slept: in epoll, or for a lock such as the GIL."""
    out: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, waiting = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(on_cpu), int(waiting))
    return out


def rss_kb(pid: int, children: bool = False) -> int:
    """VmRSS of pid in KiB (plus its descendants' with children=True); 0 when gone."""
    total = 0
    for p in [pid, *(descendants(pid) if children else [])]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------------------------------
# Stand-in models
# --------------------------------------------------------------------------------------------------

def _nginx_prelude(tag: str, workers: int) -> tuple[Path, str]:
    """Directory and the config head for one nginx instance, with every path writable by us."""
    d = workdir() / f"nginx-{tag}-{time.monotonic_ns()}"
    d.mkdir()
    head = (f"worker_processes {workers}; daemon off; pid {d}/nginx.pid; error_log {d}/error.log warn;\n"
            "events { worker_connections 8192; }\n")
    temp = (f"  client_body_temp_path {d}/client_body; proxy_temp_path {d}/proxy;\n"
            f"  fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n")
    # Request bodies of any size (the default limit, 1 MiB, answers 413 above it), kept in memory up to
    # 2 MiB rather than written to a temp file: the growth tables of run.py POST up to 1 MiB.
    bodies = "  client_max_body_size 0; client_body_buffer_size 2m;\n"
    return d, head + "http { access_log off; keepalive_requests 1000000;\n" + temp + bodies


def _start_nginx(d: Path, conf: str, name: str, ports: Sequence[int]) -> Proc:
    if not have("nginx"):
        raise BenchError("nginx is not installed (apt-get install -y nginx)")
    path = d / "nginx.conf"
    path.write_text(conf)
    proc = Proc(["nginx", "-p", f"{d}/", "-e", f"{d}/error.log", "-c", str(path)], name)
    try:
        for port in ports:
            wait_for_port(port, proc=proc)
    except BaseException:
        err = (d / "error.log").read_text(errors="replace")[-2000:] if (d / "error.log").exists() else ""
        proc.stop()
        raise BenchError(f"{name} did not start: {err}") from None
    return proc


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


class Models:
    """Production and candidate stand-in models on free ports.

    backend: "nginx" (one nginx, 1 worker, both servers), "python"
    (`standin.py` processes), or "auto" (nginx when installed).
    candidate: "normal"; "slow" (answers after `delay_ms`; python stand-in); "blackhole" (accepts, never
    answers; python stand-in); "refusing" (a closed port: nothing listens there).
    Production is always a normal, fast model. The candidate logs one line per request it received:
    `candidate_count()` flushes and counts them.
    """

    def __init__(self, backend: str = "auto", candidate: str = "normal", delay_ms: float = 0.0,
                 prod_answer: str = PROD_ANSWER, cand_answer: str = CAND_ANSWER) -> None:
        if backend == "auto":
            backend = "nginx" if have("nginx") else "python"
        if backend not in ("nginx", "python"):
            raise ValueError(f"backend must be auto, nginx or python, not {backend!r}")
        if candidate not in ("normal", "slow", "blackhole", "refusing"):
            raise ValueError(f"unknown candidate mode {candidate!r}")
        if candidate == "slow" and delay_ms <= 0:
            raise ValueError("candidate='slow' needs delay_ms > 0")
        self.backend = backend
        self.candidate = candidate
        self.delay_ms = delay_ms
        self.prod_answer = prod_answer
        self.cand_answer = cand_answer
        self.prod_port, self.cand_port = free_ports(2)
        self.cand_log = workdir() / f"candidate-{self.cand_port}.log"
        self.procs: list[Proc] = []
        self._cand_proc: Proc | None = None

    @property
    def prod_url(self) -> str:
        return f"http://{HOST}:{self.prod_port}"

    @property
    def cand_url(self) -> str:
        return f"http://{HOST}:{self.cand_port}"

    def pids(self) -> list[int]:
        return [p for proc in self.procs for p in proc.pids()]

    def start(self) -> Models:
        try:
            nginx_cand = self.candidate == "normal"
            if self.backend == "nginx":
                self._start_nginx(with_candidate=nginx_cand)  # waits for its ports
            else:
                prod = self._standin(self.prod_port, "v1", self.prod_answer, None, "prod")
                self.procs.append(prod)
                wait_for_port(self.prod_port, proc=prod)
            if self.candidate in ("slow", "blackhole") or (self.backend == "python" and nginx_cand):
                cand = self._standin(self.cand_port, "v2", self.cand_answer, self.cand_log, "candidate")
                self.procs.append(cand)
                self._cand_proc = cand
                wait_for_port(self.cand_port, proc=cand)
        except BaseException:
            self.stop()
            raise
        log(f"models ({self.backend}, candidate {self.candidate}): production {self.prod_url}, "
            f"candidate {self.cand_url}")
        return self

    def _start_nginx(self, with_candidate: bool) -> None:
        d, conf = _nginx_prelude("models", 1)
        conf += (f"  server {{ listen {HOST}:{self.prod_port} backlog=4096; location / {{ "
                 f"default_type application/json;\n           return 200 '{self.prod_answer}'; }} }}\n")
        if with_candidate:
            conf += ('  log_format m "$msec";\n'
                     f"  server {{ listen {HOST}:{self.cand_port} backlog=4096; "
                     f"access_log {self.cand_log} m buffer=32k flush=1s;\n"
                     "           location / { default_type application/json;\n"
                     f"           return 200 '{self.cand_answer}'; }} }}\n")
        conf += "}\n"
        ports = [self.prod_port] + ([self.cand_port] if with_candidate else [])
        proc = _start_nginx(d, conf, "nginx-models", ports)
        self.procs.append(proc)
        if with_candidate:
            self._cand_proc = proc

    def _standin(self, port: int, version: str, answer: str, logfile: Path | None, role: str) -> Proc:
        argv = [PYTHON, str(HERE / "standin.py"), "--port", str(port), "--model-version", version,
                "--body", answer]
        if logfile is not None:
            argv += ["--log", str(logfile)]
        if role == "candidate" and self.candidate == "slow":
            argv += ["--delay-ms", str(self.delay_ms)]
        if role == "candidate" and self.candidate == "blackhole":
            argv += ["--blackhole"]
        return Proc(argv, f"standin-{role}")

    def candidate_count(self, settle: float = 0.15, timeout: float = 3.0) -> int:
        """Requests the candidate has received so far (flushes its log, waits until the count holds)."""
        if self._cand_proc is None:
            return 0
        self._cand_proc.send_signal(signal.SIGUSR1)  # nginx: reopen logs (flushes buffers); standin: flush
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            time.sleep(settle)
            n = _count_lines(self.cand_log)
            if n == last or time.monotonic() > deadline:
                return n
            last = n

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        self._cand_proc = None

    def __enter__(self) -> Models:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Setups: things to measure. start() -> URL, stop(), pids() for CPU (empty: no CPU figure)
# --------------------------------------------------------------------------------------------------

class Setup:
    """One thing to benchmark. Subclasses implement start() -> URL and stop(); `proc` (if any) is the
    process whose CPU (with its descendants) is charged to the setup."""

    name: str = "setup"
    proc: Proc | None = None

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc is not None else []

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid, children=True) if self.proc is not None else 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DirectSetup(Setup):
    """The stand-in hit directly: the limit. No process of its own, no CPU figure."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url

    def start(self) -> str:
        return self.url


class NginxProxySetup(Setup):
    """nginx in front of production: a plain proxy, or with `mirror` to the candidate at `mirror_rate`
    (split_clients on $request_id). Upstream keepalive 128. `buffering=False` adds
    `proxy_buffering off`: each piece of an answer is sent on as it arrives (a streaming proxy)."""

    def __init__(self, name: str, prod_url: str, cand_url: str | None = None,
                 mirror_rate: float | None = None, workers: int = 1, keepalive: int = 128,
                 buffering: bool = True) -> None:
        if mirror_rate is not None and not cand_url:
            raise ValueError("mirroring needs cand_url")
        if mirror_rate is not None and not 0.0 <= mirror_rate <= 1.0:
            raise ValueError("mirror_rate must be within 0..1")
        self.name = name
        self.prod = _hostport(prod_url)
        self.cand = _hostport(cand_url) if cand_url else None
        self.mirror_rate = mirror_rate
        self.workers = workers
        self.keepalive = keepalive
        self.buffering = buffering

    def config(self, port: int, d: Path, head: str) -> str:
        up = "proxy_http_version 1.1; proxy_set_header Connection \"\";"
        if not self.buffering:
            up += " proxy_buffering off;"
        conf = head + f"  upstream prod {{ server {self.prod}; keepalive {self.keepalive}; }}\n"
        if self.mirror_rate is None:
            conf += (f"  server {{ listen {HOST}:{port} backlog=4096;\n"
                     f"    location / {{ {up} proxy_pass http://prod; }} }} }}\n")
            return conf
        conf += f"  upstream cand {{ server {self.cand}; keepalive {self.keepalive}; }}\n"
        if 0.0 < self.mirror_rate < 1.0:
            pct = f"{self.mirror_rate * 100:.4g}%"
            conf += f'  split_clients "${{request_id}}" $mirror_on {{ {pct} 1; * 0; }}\n'
            gate = "if ($mirror_on = 0) { return 204; } "
        elif self.mirror_rate == 0.0:
            gate = "return 204; "
        else:
            gate = ""
        conf += (f"  server {{ listen {HOST}:{port} backlog=4096;\n"
                 f"    location / {{ mirror /m; mirror_request_body on; {up} proxy_pass http://prod; }}\n"
                 f"    location = /m {{ internal; {gate}{up} proxy_pass http://cand$request_uri; }} }} }}\n")
        return conf

    def start(self) -> str:
        port = free_port()
        d, head = _nginx_prelude("proxy", self.workers)
        self.proc = _start_nginx(d, self.config(port, d, head), f"nginx-{self.name}", [port])
        return f"http://{HOST}:{port}"


def _hostport(url: str) -> str:
    m = re.match(r"^https?://([^/]+)", url)
    if not m:
        raise ValueError(f"not an http URL: {url}")
    return m.group(1)


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Enough TOML for configs: tables of str/bool/int/float/list values, and arrays of such
    tables (a list of dicts: `[[candidates]]`)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    out = []
    for table, values in data.items():
        for entry in values if isinstance(values, list) else [values]:
            out.append(f"[[{table}]]" if isinstance(values, list) else f"[{table}]")
            out.extend(f"{k} = {val(v)}" for k, v in entry.items())
            out.append("")
    return "\n".join(out)


class ShadowproxySetup(Setup):
    """`python -m shadowproxy serve --config FILE` with a generated TOML on free ports.

    `extra` merges more keys into the config ({"candidate": {"timeout_s": 1.0}, ...}; a list is an
    array of tables, and `"candidates": [...]` takes the place of `[candidate]`); `args` are more
    command-line arguments (e.g. ["--workers", "2"]). Ready when the listen port accepts and the admin
    /healthz answers 200. `admin_url` is set while running."""

    def __init__(self, name: str, prod_url: str, cand_url: str, sample_rate: float = 0.1,
                 extra: Mapping[str, Any] | None = None, args: Sequence[str] = (),
                 startup_timeout: float = 30.0, stop_timeout: float = 20.0,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.prod_url = prod_url
        self.cand_url = cand_url
        self.sample_rate = sample_rate
        self.extra = extra or {}
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.env = env
        self.cwd = cwd or REPO  # another build's directory runs that build (benchmarks/sidebyside.py)
        self.admin_url: str | None = None
        self.config_path: Path | None = None

    def config(self, port: int, admin_port: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "listen": {"host": HOST, "port": port},
            "admin": {"host": HOST, "port": admin_port},
            "production": {"url": self.prod_url},
            "candidate": {"url": self.cand_url},
            "mirror": {"sample_rate": float(self.sample_rate)},
        }
        for table, values in self.extra.items():
            if isinstance(values, list):
                cfg[table] = values
                if table == "candidates":
                    del cfg["candidate"]
            else:
                cfg.setdefault(table, {}).update(values)
        return cfg

    def start(self) -> str:
        port, admin_port = free_ports(2)
        self.config_path = workdir() / f"shadowproxy-{port}.toml"
        self.config_path.write_text(toml_dumps(self.config(port, admin_port)))
        argv = [PYTHON, "-m", "shadowproxy", "serve", "--config", str(self.config_path), *self.args]
        self.proc = Proc(argv, f"shadowproxy-{self.name}", cwd=self.cwd, env=self.env)
        self.admin_url = f"http://{HOST}:{admin_port}"
        try:
            wait_for_port(port, timeout=self.startup_timeout, proc=self.proc)
            wait_for_http(f"{self.admin_url}/healthz", 200, timeout=self.startup_timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return f"http://{HOST}:{port}"

    def stop(self) -> None:
        if self.proc is not None:
            rc = self.proc.stop(signal.SIGTERM, timeout=self.stop_timeout)
            if rc not in (0, None):
                log(f"{self.name}: shadowproxy exited {rc} on SIGTERM:\n{self.proc.tail(5)}")
            self.proc = None
        self.admin_url = None

    def stats(self) -> dict[str, Any] | None:
        """GET /shadow/stats from the admin port (None when unavailable)."""
        if not self.admin_url:
            return None
        status, body = http_get(f"{self.admin_url}/shadow/stats")
        return json.loads(body) if status == 200 else None


class CommandSetup(Setup):
    """Any server started by a command: `argv(port)` builds the command line for a free port
    (e.g. a thin aiohttp proxy for comparison); ready when the port accepts (and `ready_url`, a path,
    answers 200 if given)."""

    def __init__(self, name: str, argv: Callable[[int], Sequence[str]], ready_path: str | None = None,
                 cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 30.0) -> None:
        self.name = name
        self.argv = argv
        self.ready_path = ready_path
        self.cwd = cwd or REPO
        self.env = env
        self.startup_timeout = startup_timeout

    def start(self) -> str:
        port = free_port()
        self.proc = Proc(self.argv(port), f"cmd-{self.name}", cwd=self.cwd, env=self.env)
        url = f"http://{HOST}:{port}"
        try:
            wait_for_port(port, timeout=self.startup_timeout, proc=self.proc)
            if self.ready_path:
                wait_for_http(url + self.ready_path, 200, timeout=self.startup_timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return url


# --------------------------------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------------------------------

_POST_LUA = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%.1f,"p90_us":%%.1f,"p99_us":%%.1f,"p999_us":%%.1f,' ..
    '"max_us":%%.1f,"mean_us":%%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""

_lua_cache: dict[str, Path] = {}


def post_lua(body: str = BODY) -> Path:
    """A wrk script: POST `body` as application/json; its done() prints exact figures as JSON."""
    if "'" in body or "\\" in body or "\n" in body:
        raise ValueError("body must not contain quotes, backslashes or newlines")
    if body not in _lua_cache:
        path = workdir() / f"post-{len(_lua_cache)}.lua"
        path.write_text(_POST_LUA % {"body": body})
        _lua_cache[body] = path
    return _lua_cache[body]


@dataclass
class WrkResult:
    rps: float
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float | None = None
    max_ms: float | None = None
    non2xx: int = 0          # wrk: non-2xx/3xx answers
    socket_errors: int = 0   # connect + read + write + timeout
    raw: str = field(default="", repr=False)

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_time_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Parse wrk's output: the JSON line from post.lua's done() when present (exact microseconds),
    else wrk's --latency text."""
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            j = json.loads(line[8:])
            dur = j["duration_us"] / 1e6
            return WrkResult(
                rps=j["requests"] / dur if dur else 0.0, requests=j["requests"], duration_s=dur,
                p50_ms=j["p50_us"] / 1e3, p90_ms=j["p90_us"] / 1e3, p99_ms=j["p99_us"] / 1e3,
                p999_ms=j["p999_us"] / 1e3, max_ms=j["max_us"] / 1e3, non2xx=j["status"],
                socket_errors=j["connect"] + j["read"] + j["write"] + j["timeout"], raw=out)
    pct = {m.group(1): _wrk_time_ms(m.group(2))
           for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M)}
    m_req = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
    m_rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not (pct and m_req and m_rps):
        raise BenchError(f"cannot parse wrk output:\n{out[-1500:]}")
    m_non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    m_sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=float(m_rps.group(1)), requests=int(m_req.group(1)),
        duration_s=_wrk_time_ms(m_req.group(2) + m_req.group(3)) / 1e3,
        p50_ms=pct.get("50", math.nan), p90_ms=pct.get("90", math.nan), p99_ms=pct.get("99", math.nan),
        non2xx=int(m_non.group(1)) if m_non else 0,
        socket_errors=sum(int(g) for g in m_sock.groups()) if m_sock else 0, raw=out)


def wrk(url: str, duration: float = 6.0, threads: int = 2, connections: int = 32, body: str = BODY,
        timeout_s: float | None = None) -> WrkResult:
    """Closed loop: `wrk -t2 -c32 -dNs --latency -s post.lua URL`."""
    if not have("wrk"):
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "-s", str(post_lua(body))]
    if timeout_s:
        argv += ["--timeout", f"{timeout_s}s"]
    return parse_wrk(run_tool([*argv, url], "wrk", timeout=duration + 60))


@dataclass
class HeyResult:
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    rps: float
    total: int              # requests attempted (answers + errors)
    ok: int                 # 2xx answers
    non2xx: int             # other answers
    errors: int             # failed requests (connection errors, timeouts)
    raw: str = field(default="", repr=False)

    @property
    def failed(self) -> int:
        return self.non2xx + self.errors


def parse_hey(out: str) -> HeyResult:
    """Parse hey's summary: latency distribution (0.1 ms resolution), status codes, errors."""
    pct: dict[str, float] = {}
    for m in re.finditer(r"^\s+(\d+(?:\.\d+)?)%+ in ([\d.]+) secs", out, re.M):
        pct[m.group(1)] = float(m.group(2)) * 1e3
    codes = {int(m.group(1)): int(m.group(2))
             for m in re.finditer(r"^\s+\[(\d+)\]\s+(\d+) responses", out, re.M)}
    err_block = out.split("Error distribution:", 1)[1] if "Error distribution:" in out else ""
    errors = sum(int(m.group(1)) for m in re.finditer(r"^\s+\[(\d+)\]\s", err_block, re.M))
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m_rps is None:
        raise BenchError(f"cannot parse hey output:\n{out[-1500:]}")
    ok = sum(n for c, n in codes.items() if 200 <= c < 300)
    non2xx = sum(codes.values()) - ok
    return HeyResult(p50_ms=pct.get("50"), p90_ms=pct.get("90"), p99_ms=pct.get("99"),
                     rps=float(m_rps.group(1)), total=sum(codes.values()) + errors, ok=ok,
                     non2xx=non2xx, errors=errors, raw=out)


def hey(url: str, n: int = 10000, c: int = 10, q: float = 100, body: str = BODY,
        timeout_s: int = 20) -> HeyResult:
    """Open loop: `hey -n N -c C -q Q -m POST -T application/json -d BODY URL` (rate = C x Q /s)."""
    if not have("hey"):
        raise BenchError("hey is not installed (apt-get install -y hey)")
    argv = ["hey", "-n", str(n), "-c", str(c), "-q", f"{q:g}", "-t", str(timeout_s), "-m", "POST",
            "-T", "application/json", "-d", body, url]
    expected = n / max(c * q, 1e-9)
    return parse_hey(run_tool(argv, "hey", timeout=expected * 3 + timeout_s + 30))


# --------------------------------------------------------------------------------------------------
# Measurements (one setup, one URL) and the interleaved runner
# --------------------------------------------------------------------------------------------------

def _cpu_us(pids: list[int], t0: int, requests: int) -> float | None:
    if not pids or requests <= 0:
        return None
    return (cpu_ticks(pids) - t0) / CLK_TCK * 1e6 / requests


def closed_loop(url: str, setup: Setup | None = None, duration: float = 6.0, warmup: float = 2.0,
                models: Models | None = None, threads: int = 2, connections: int = 32,
                body: str = BODY, threads_of: int | None = None) -> dict[str, float | None]:
    """Warm up, then one measured wrk run. Keys: rps, p50_ms, p90_ms, p99_ms, requests, errors,
    cpu_us (per request, the setup's processes; None without), mirrored (requests the candidate
    received during the run, with `models`), mirrored_share (mirrored / requests).

    With `threads_of` (a PID whose main thread runs the event loop), also where that thread's time
    went during the run, per request (see `thread_split`)."""
    if warmup > 0:
        wrk(url, warmup, threads, connections, body)
    pids = setup.pids() if setup else []
    c0 = models.candidate_count() if models else 0
    t0 = cpu_ticks(pids) if pids else 0
    sched0, wall0 = (thread_sched(threads_of), time.monotonic()) if threads_of else ({}, 0.0)
    r = wrk(url, duration, threads, connections, body)
    split = (thread_split(threads_of, sched0, thread_sched(threads_of), time.monotonic() - wall0, r.requests)
             if threads_of else {})
    cpu = _cpu_us(pids, t0, r.requests)
    out: dict[str, float | None] = {
        "rps": r.rps, "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms,
        "requests": r.requests, "errors": r.errors, "cpu_us": cpu, **split}
    if models:
        mirrored = models.candidate_count() - c0
        out["mirrored"] = mirrored
        out["mirrored_share"] = mirrored / r.requests if r.requests else None
    return out


def thread_split(pid: int, before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 wall_s: float, requests: int) -> dict[str, float | None]:
    """Where the event loop's thread (pid's main thread) spent a run, in µs per request: on a CPU
    (`loop_cpu_us`), runnable but waiting for one (`loop_runq_us`), asleep (`loop_sleep_us`: the
    run's wall time less both; waiting in epoll or for the GIL); and the CPU of the process's
    other threads (`threads_cpu_us`: the store's writer, for example). Saturated, a loop that
    sleeps is waiting for something other than its own work. `before` and `after` are
    `thread_sched(pid)` readings taken `wall_s` apart."""
    if requests <= 0 or pid not in after or pid not in before:
        return {}
    per = 1e-3 / requests  # ns -> µs per request
    on = (after[pid][0] - before[pid][0]) * per
    runq = (after[pid][1] - before[pid][1]) * per
    others = sum(a[0] - before.get(tid, (0, 0))[0] for tid, a in after.items() if tid != pid) * per
    return {"loop_cpu_us": on, "loop_runq_us": runq, "loop_sleep_us": max(0.0, wall_s * 1e6 / requests - on - runq),
            "threads_cpu_us": others}


def open_loop(url: str, setup: Setup | None = None, n: int = 10000, c: int = 10, q: float = 100,
              warmup: float = 2.0, models: Models | None = None, body: str = BODY) -> dict[str, float | None]:
    """Warm up `warmup` seconds at the same rate, then `hey -n N -c C -q Q`. Keys: p50_ms, p90_ms,
    p99_ms, rps, failed (non-2xx + errors), cpu_us, mirrored (with `models`)."""
    if warmup > 0:
        hey(url, max(c, int(warmup * c * q)), c, q, body)
    pids = setup.pids() if setup else []
    c0 = models.candidate_count() if models else 0
    t0 = cpu_ticks(pids) if pids else 0
    r = hey(url, n, c, q, body)
    out: dict[str, float | None] = {
        "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms, "rps": r.rps, "requests": r.total,
        "failed": r.failed, "cpu_us": _cpu_us(pids, t0, r.total)}
    if models:
        out["mirrored"] = models.candidate_count() - c0
    return out


Measure = Callable[[Setup, str], Mapping[str, Any]]


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """items rotated left by k (k-th repetition's order)."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def run_interleaved(setups: Sequence[Setup], measure: Measure, reps: int = 3,
                    between: Callable[[], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """For each repetition, start each setup, `measure(setup, url)`, stop it; the order rotates each
    repetition. A setup that fails records {"error": message} for that repetition and the run goes on.
    Returns {setup name: [result of each repetition]} in the setups' order."""
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in setups}
    for rep in range(reps):
        for s in rotated(setups, rep):
            log(f"rep {rep + 1}/{reps}: {s.name}")
            try:
                url = s.start()
                res = dict(measure(s, url))
            except BenchError as e:
                log(f"  {s.name} failed: {e}")
                res = {"error": _summary(e)}
            finally:
                s.stop()
            res["rep"] = rep
            results[s.name].append(res)
            if "error" not in res:
                log("  " + ", ".join(f"{k} {fmt(v, 3)}" for k, v in res.items()
                                     if isinstance(v, int | float) and k != "rep"))
            if between:
                between()
    return results


def spread(runs: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float] | None:
    """(min, max) of `key` over successful repetitions, or None: how noisy a median is."""
    vals = [r[key] for r in runs if "error" not in r and isinstance(r.get(key), int | float)]
    return (min(vals), max(vals)) if vals else None


def _summary(e: BaseException) -> str:
    """First line of an error, plus its last line when they differ (the cause, e.g. a traceback's end)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def medians(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per setup, the median of each numeric key over the repetitions that produced it; a key that was
    only ever None (e.g. cpu_us for a setup without a process) is None. "errors_seen" lists the
    failure messages, "n" counts successful repetitions. A setup that never ran has only those two."""
    out: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        keys = {k for r in ok for k, v in r.items()
                if (v is None or isinstance(v, int | float)) and k not in ("rep", "error")}
        med: dict[str, Any] = {}
        for k in sorted(keys):
            vals = [r[k] for r in ok if isinstance(r.get(k), int | float) and not math.isnan(r[k])]
            med[k] = statistics.median(vals) if vals else None
        med["n"] = len(ok)
        med["errors_seen"] = [r["error"] for r in runs if "error" in r]
        out[name] = med
    return out


def failures(med: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """The setups with failed repetitions (from `medians`), each with its failure messages."""
    return {name: list(m["errors_seen"]) for name, m in med.items() if m.get("errors_seen")}


def failure_notes(failed: Mapping[str, Sequence[str]]) -> list[str]:
    """One line per setup of `failures`: how many repetitions failed, and the first reason."""
    return [f"{name}: {len(errs)} failed repetition(s): {errs[0]}" for name, errs in failed.items()]


def print_failures(med: Mapping[str, Mapping[str, Any]]) -> bool:
    """Print `failure_notes` of `medians`, one `! ` line each; True when any setup failed."""
    failed = failures(med)
    for line in failure_notes(failed):
        print(f"! {line}")
    return bool(failed)


def paired_ratios(results: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]) -> list[float]:
    """requests/s ÷ the base's within each repetition (`run_interleaved` results of two setups):
    the two ran back to back, so a machine that drifts over the whole run moves both alike."""
    out = []
    for a, b in zip(results, base, strict=True):
        r = ratio(a.get("rps"), b.get("rps")) if "error" not in a and "error" not in b else None
        if r is not None:
            out.append(r)
    return out


def paired_line(name: str, base: str, ratios: Sequence[float]) -> str:
    return (f"{name} ÷ {base}, per repetition (run back to back): {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.3f}")


def run_main(main: Callable[[], int]) -> NoReturn:
    """A benchmark's `__main__`: exit with main()'s code, or 130 on Ctrl-C (processes are reaped)."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 1, na: str = "n/a", sign: bool = False) -> str:
    """A number for a table: None/NaN -> na; thousands separators for large values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return na
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:+,}" if sign else f"{x:,}"
    if isinstance(x, float):
        return f"{x:+,.{digits}f}" if sign else f"{x:,.{digits}f}"
    return str(x)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def closed_loop_headers(ratio_label: str) -> list[str]:
    """The first columns of a closed-loop table (see `closed_loop_cells`)."""
    return ["setup", "requests/s", ratio_label, "min–max", "p50 ms", "p99 ms", "CPU µs/req"]


def closed_loop_cells(
    name: str, med: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], base_rps: float | None
) -> list[str]:
    """One setup's closed-loop cells: median requests/s, its ratio to `base_rps`, the spread over
    the repetitions, wrk's p50/p99 and the proxy's CPU per request."""
    sp = spread(runs, "rps")
    rng = f"{sp[0] / 1e3:.1f}k–{sp[1] / 1e3:.1f}k" if sp else "n/a"
    return [name, fmt(med.get("rps"), 0), fmt(ratio(med.get("rps"), base_rps), 3), rng,
            fmt(med.get("p50_ms"), 2), fmt(med.get("p99_ms"), 2), fmt(med.get("cpu_us"), 1, na="—")]


def diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a - b


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
                 digits: int = 1) -> str:
    """Plain-text aligned table: first column left-aligned, the others right-aligned. Cells that are
    not strings go through fmt(cell, digits)."""
    cells = [[c if isinstance(c, str) else fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def machine_summary() -> str:
    """One line describing the machine (cores, load, tool versions) to print above tables."""
    cores = os.cpu_count()
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    tools = []
    for t in ("nginx", "wrk", "hey"):
        tools.append(f"{t} {'yes' if have(t) else 'missing'}")
    return f"{cores} cores, load {load}, python {sys.version.split()[0]}, {', '.join(tools)}"
