"""The `shadowproxy` command line.

Each subcommand is one `_add_<name>(subparsers)` function that adds its parser and sets
`func=<handler>`; list it in `_COMMANDS`. A handler takes the parsed arguments and returns the exit
code. Mistakes a user can fix are one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

from shadowproxy import __version__
from shadowproxy.config import Config, load_config
from shadowproxy.errors import ConfigError

EXIT_OK = 0
EXIT_USAGE = 2  # also argparse's own code for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class _Version(argparse.Action):
    """`--version`: the release and how the hot path runs here (compiled by mypyc at install, or
    as Python: see setup.py). Worked out only when asked, since it imports the hot path."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from shadowproxy import compiled

        mode = "compiled" if compiled() else "pure Python"
        print(f"shadowproxy {__version__} (hot path: {mode})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowproxy",
        description="Shadow-mode reverse proxy for ML model endpoints.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="show the version and whether the hot path is compiled"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def _load(path: str) -> Config | None:
    """The config at `path`, or None after printing its problems as `path: problem` lines."""
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return None


def _print_problems(path: str, error: ConfigError) -> None:
    for problem in error.problems:
        print(f"{path}: {problem}", file=sys.stderr)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------
# check-config


def _add_check_config(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "check-config",
        help="validate a config file and print a summary",
        description="Validate a config file. Exit 0 when valid, 2 with one line per problem otherwise.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.set_defaults(func=_check_config)


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_USAGE
    print(f"{args.file}: OK")
    print(summary(config))
    _warn_if_open(config)
    return EXIT_OK


def _warn_if_open(config: Config) -> None:
    warning = config.admin.open_warning()
    if warning is not None:
        print(f"shadowproxy: warning: {warning}", file=sys.stderr)


def _candidate_lines(config: Config, identity: list[str]) -> list[tuple[str, str]]:
    if len(config.candidates) == 1:
        return [("candidate", str(config.candidate.target) + (f" ({'; '.join(identity)})" if identity else ""))]
    lines = []
    for cand in config.candidates:
        notes = [f"sample_rate {cand.rate(config.mirror):g}"]
        if cand.model:
            notes.append(f"model {cand.model}")
        if cand.headers:
            notes.append(f"headers {', '.join(cand.headers)}")
        lines.append((f"candidate {cand.name}", f"{cand.target} ({'; '.join(notes)})"))
    return lines


def summary(config: Config) -> str:
    """A few lines describing what a config will do."""
    mirror, compare, path = config.mirror, config.compare, config.compare.path
    candidate = config.candidate
    identity = [f"model {candidate.model}"] if candidate.model else []
    if candidate.headers:
        identity.append(f"headers {', '.join(candidate.headers)}")  # names only: values may be keys
    if compare.preset == "openai":
        comparing = (
            f"preset openai (chat, completions: min_similarity {compare.min_similarity:g}; "
            f"embeddings: min_cosine {compare.min_cosine:g}); other paths are not mirrored"
        )
    else:
        comparing = f"preset {compare.preset}, kind {compare.kind}" + (f", path {path}" if path else "")
    lines = [
        ("production", str(config.production.target)),
        *_candidate_lines(config, identity),
        *([("secondary", f"{config.secondary.target} (production's twin: noise and net disagreement)")]
          if config.secondary is not None else []),
        ("listen", _address(config.listen.host, config.listen.port)),
        ("admin", _address(config.admin.host, config.admin.port)),
        ("mirror", f"sample_rate {mirror.sample_rate:g}, methods {', '.join(mirror.methods) or '(none)'}"),
        ("compare", comparing),
        *([("slices", ", ".join([*(s.name for s in config.slices), "other"]))] if config.slices else []),
        ("store", config.store.path or "off"),
        ("drift", "on" if config.drift is not None else "off"),
        *([("record", f"{config.record.path} (sample_rate {config.record.sample_rate:g}; see `shadowproxy replay`)")]
          if config.record.path else []),
    ]
    width = max(12, *(len(name) + 2 for name, _ in lines))
    text = "\n".join(f"  {name:<{width}}{value}" for name, value in lines)
    if compare.preset == "openai":
        text += "\n  note: compare.kind, compare.path and compare.output are ignored under preset openai"
    return text


# ---------------------------------------------------------------------------------------------------
# serve


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_serve(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the proxy and the admin server",
        description="Run the proxy and the admin server until SIGTERM/SIGINT, then drain and exit.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N",
        help="proxy processes sharing the listen port (default 1); the admin port covers them all",
    )
    # Internal: how the supervisor of --workers starts each worker process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if not args.worker:  # a worker's admin is private (loopback); the supervisor warns for all
        _warn_if_open(config)
    # Imported here: the server stack is not needed by the other commands.
    from shadowproxy.control.app import run

    try:
        result = run(config, workers=args.workers, config_path=args.config, worker=args.worker)
    except ConfigError as exc:  # problems only found at startup (e.g. an unreadable ca_file)
        _print_problems(args.config, exc)
        return EXIT_USAGE
    return result if isinstance(result, int) else EXIT_OK


# ---------------------------------------------------------------------------------------------------
# report and demo (their modules import aiohttp, numpy and uvloop: loaded only when run)


def _add_report(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="print the comparison report of running proxies",
        description="Read the stats of one or more running proxies (replicas are merged), judge them "
        "with the first proxy's gates and print a report. Exit 0 pass, 1 fail, 3 insufficient "
        "data, 2 when a proxy cannot be reached.",
    )
    parser.add_argument(
        "--admin-url",
        action="append",
        required=True,
        metavar="URL",
        help="a proxy's admin base URL, e.g. http://127.0.0.1:9090; repeat for replicas",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--candidate",
        metavar="NAME",
        help="with several candidates: report this one and exit by its verdict (default: the worst of all)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per-proxy timeout (default 5)")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from shadowproxy.commands.report import run_report

    return run_report(args.admin_url, candidate=args.candidate, as_json=args.json, timeout_s=args.timeout)


def _add_demo(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a self-contained demo: two model servers, the proxy, traffic and the report",
        description="Start a production and a candidate demo model and the proxy on free ports, send "
        "traffic through it, print the comparison report and stop everything. With --llm the models "
        "are OpenAI-compatible LLMs and the traffic chat, completions and embeddings, streamed and not.",
    )
    parser.add_argument(
        "--llm", action="store_true", help="OpenAI-compatible LLM stand-ins judged with compare.preset = openai"
    )
    parser.add_argument(
        "--requests", type=_positive_int, default=None, metavar="N",
        help="requests to send (default 10000; 1500 with --llm)",
    )
    parser.add_argument(
        "--flip-rate",
        type=float,
        default=None,
        metavar="X",
        help="share of instances the candidate answers differently (default 0.03)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=None,
        metavar="MS",
        help="latency the candidate adds to every answer (default 2)",
    )
    parser.add_argument(
        "--differ-rate", type=float, default=None, metavar="X",
        help="with --llm: share of prompts the candidate answers differently (default 0.05)",
    )
    parser.add_argument(
        "--first-token-ms", type=float, default=None, metavar="MS",
        help="with --llm: the candidate's delay before its first token (default 80; production's is 50)",
    )
    parser.add_argument(
        "--concurrency", type=_positive_int, default=None, metavar="N",
        help="client connections (default 16; 32 with --llm)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    # Each mode's own options; one meant for the other mode is a mistake worth saying.
    other = ("--differ-rate", "--first-token-ms") if not args.llm else ("--flip-rate", "--delay-ms")
    given = [flag for flag in other if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        mode = "only with --llm" if not args.llm else "not with --llm"
        for flag in given:
            print(f"shadowproxy demo: {flag}: {mode}", file=sys.stderr)
        return EXIT_USAGE
    if args.llm:
        from shadowproxy.commands.demo_llm import LLMDemoOptions, run_demo_llm

        defaults = LLMDemoOptions()
        return run_demo_llm(
            LLMDemoOptions(
                requests=args.requests or defaults.requests,
                differ_rate=defaults.differ_rate if args.differ_rate is None else args.differ_rate,
                first_token_ms=defaults.first_token_ms if args.first_token_ms is None else args.first_token_ms,
                concurrency=args.concurrency or defaults.concurrency,
                seed=args.seed,
                as_json=args.json,
            )
        )
    from shadowproxy.commands.demo import DEMO_REQUESTS, run_demo

    return run_demo(
        requests=args.requests or DEMO_REQUESTS,
        flip_rate=0.03 if args.flip_rate is None else args.flip_rate,
        delay_ms=2.0 if args.delay_ms is None else args.delay_ms,
        concurrency=args.concurrency or 16,
        seed=args.seed,
        as_json=args.json,
    )


# ---------------------------------------------------------------------------------------------------
# profile (drift baseline; numpy is loaded only when run)


def _add_profile(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="write a drift baseline profile from training data",
        description="Profile training data (JSON Lines of request bodies, or CSV with a header row) into "
        "the baseline file [drift] baseline reads: per numeric feature quantile bin edges and shares, per "
        "categorical feature the top 50 category shares. Exit 0 written, 2 for unusable input.",
    )
    parser.add_argument("data", metavar="DATA", help="JSON Lines of request bodies, or a .csv file")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the profile to write (JSON)")
    parser.add_argument("--preset", default="kserve-v1", help="where the instances are (default kserve-v1)")
    parser.add_argument("--bins", type=_positive_int, default=10, metavar="N", help="numeric bins (default 10)")
    parser.add_argument("--format", dest="data_format", choices=["auto", "jsonl", "csv"], default="auto",
                        help="DATA's format (default: csv for a .csv name, else jsonl)")
    parser.add_argument("--predictions", default="", metavar="FILE",
                        help="JSON Lines of production answers: adds the prediction distribution")
    parser.add_argument("--prediction-kind", choices=["label", "numeric"], default=None,
                        help="label (category shares) or numeric (bins); default: by the values")
    parser.add_argument("--path", default="", metavar="POINTER", help="JSON pointer to the predictions")
    parser.add_argument("--output-name", default="", metavar="NAME", help="oip-v2: the output to profile")
    parser.add_argument("--features", default="", metavar="A,B", help="only these features (comma-separated)")
    parser.add_argument("--max-features", type=_positive_int, default=100, metavar="N",
                        help="at most this many features (default 100)")
    parser.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    from shadowproxy.commands.profile import run_profile

    return run_profile(
        args.data,
        args.output,
        preset=args.preset,
        bins=args.bins,
        data_format=args.data_format,
        predictions=args.predictions,
        prediction_kind=args.prediction_kind,
        pointer=args.path,
        prediction_output=args.output_name,
        features=[name.strip() for name in args.features.split(",") if name.strip()],
        max_features=args.max_features,
    )


# ---------------------------------------------------------------------------------------------------
# audit: reads the store file directly, so it works with the proxy stopped


def _add_audit(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="show one request from the audit store, the model versions seen, or the labels",
        description="Read an audit store file. With REQUEST_ID: print that request's record as JSON "
        "(exit 0 found, 1 unknown). With --versions: per target and model version, first and last "
        "seen and requests. With --labels: every stored label with the production and candidate "
        "predictions at its index and the store's judgement, as JSON lines (for offline "
        "evaluation). Exit 2 when there is no store at PATH.",
    )
    parser.add_argument("--store", required=True, metavar="PATH", help="the SQLite file of [store] path")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("request_id", nargs="?", metavar="REQUEST_ID", help="an X-Request-ID")
    group.add_argument("--versions", action="store_true", help="list model versions instead")
    group.add_argument("--labels", action="store_true", help="every label with its predictions, as JSON lines")
    parser.add_argument("--json", action="store_true", help="--versions as JSON")
    parser.set_defaults(func=_audit)


def _audit(args: argparse.Namespace) -> int:
    from shadowproxy.commands.audit import run_audit

    return run_audit(args.store, args.request_id, versions=args.versions, as_json=args.json, labels=args.labels)


# ---------------------------------------------------------------------------------------------------
# replay


def _add_replay(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="re-send recorded requests to candidates and judge them against production's answers",
        description="Re-send the requests of recordings ([record] files or directories, or GoReplay "
        "files with --format goreplay) to each candidate, compare every answer with production's "
        "recorded one using --config's [compare] and [gates], print the report and exit by its verdict "
        "(0 pass, 1 fail, 3 insufficient data, 2 usage or unreadable input).",
    )
    parser.add_argument("recordings", nargs="+", metavar="RECORDINGS", help="recording files or directories")
    parser.add_argument("--candidate", action="append", required=True, metavar="[NAME=]URL",
                        help="a candidate's base URL; repeat for several")
    parser.add_argument("--secondary", metavar="URL",
                        help="a fresh production instance: its answers measure the noise, its latency is "
                        "the latency gate's baseline (without it the latency gate is left out)")
    parser.add_argument("--config", metavar="PATH", help="a config file; only [compare] and [gates] are read")
    parser.add_argument("--format", dest="input_format", choices=("recording", "goreplay"), default="recording",
                        help="the input's format (default: recording)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--max", action="store_true", help="as fast as --concurrency allows (the default)")
    pace.add_argument("--rate", type=float, metavar="R", help="R requests per second, open loop")
    pace.add_argument("--speed", type=float, metavar="N", help="the recorded pace, N times faster (1: as recorded)")
    parser.add_argument("--concurrency", type=int, default=64, metavar="N",
                        help="requests in flight per target at most (default 64)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per-request timeout (default 30)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_replay)


def _replay_config(path: str) -> tuple[Any, Any] | None:
    """[compare] and [gates] of the file at `path` (nothing else is read or required)."""
    import tomllib

    from shadowproxy.config import parse_config

    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        print(f"{path}: cannot read the config file: {exc}", file=sys.stderr)
        return None
    placeholder = {"url": "http://127.0.0.1:9"}
    try:
        config = parse_config({"production": placeholder, "candidate": placeholder,
                               **{k: data[k] for k in ("compare", "gates") if k in data}})
    except ConfigError as exc:
        _print_problems(path, exc)
        return None
    return config.compare, config.gates


def _replay(args: argparse.Namespace) -> int:
    import asyncio

    from shadowproxy.commands.replay import Pacing, replay_main
    from shadowproxy.config import CompareConfig, GatesConfig

    problems = []
    if args.concurrency < 1:
        problems.append(f"--concurrency: must be at least 1, got {args.concurrency}")
    if args.rate is not None and not args.rate > 0:
        problems.append(f"--rate: must be a positive number, got {args.rate}")
    if args.speed is not None and not args.speed > 0:
        problems.append(f"--speed: must be a positive number, got {args.speed}")
    if not args.timeout > 0:
        problems.append(f"--timeout: must be a positive number, got {args.timeout}")
    for problem in problems:
        print(f"shadowproxy replay: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    compare, gates = CompareConfig(), GatesConfig()
    if args.config:
        loaded = _replay_config(args.config)
        if loaded is None:
            return EXIT_USAGE
        compare, gates = loaded
    pacing = Pacing("rate", args.rate) if args.rate else Pacing("speed", args.speed) if args.speed else Pacing()
    return asyncio.run(replay_main(
        args.recordings, args.candidate, compare=compare, gates=gates, secondary=args.secondary, pacing=pacing,
        concurrency=args.concurrency, timeout_s=args.timeout, input_format=args.input_format, as_json=args.json,
    ))


_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_serve,
    _add_check_config,
    _add_report,
    _add_replay,
    _add_demo,
    _add_profile,
    _add_audit,
)
