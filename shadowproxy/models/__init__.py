"""Bundled stand-in model endpoints: real aiohttp servers, used by the demo, the tests and the
benchmarks as production and candidate upstreams.

- ``kserve``: the KServe v1 ``:predict`` protocol, a small classifier whose candidate flips a known
  share of labels (``ModelBehaviour``, ``start_model``).

``python -m shadowproxy.models --protocol PROTOCOL --role production|candidate`` serves one of
them until SIGTERM/SIGINT; ``kserve-v1`` is the default protocol. This package imports nothing
else of shadowproxy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shadowproxy.models import kserve
from shadowproxy.models.kserve import (
    BIAS,
    MODEL_SEED,
    N_CLASSES,
    N_FEATURES,
    WEIGHTS,
    ModelBehaviour,
    ReceivedRequest,
    RunningModel,
    candidate_flips,
    generate_instances,
    make_app,
    predict_labels,
    predict_proba,
    request_fails,
    start_model,
)

__all__ = [
    "BIAS",
    "MODEL_SEED",
    "N_CLASSES",
    "N_FEATURES",
    "WEIGHTS",
    "ModelBehaviour",
    "ReceivedRequest",
    "RunningModel",
    "candidate_flips",
    "generate_instances",
    "main",
    "make_app",
    "predict_labels",
    "predict_proba",
    "request_fails",
    "start_model",
]

PROTOCOLS = ("kserve-v1",)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shadowproxy.models``: the ``--protocol`` chooses the server, whose own options
    (and ``--help``) follow. 0 after SIGTERM/SIGINT, 1 when the port cannot be bound, 2 for bad
    arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m shadowproxy.models", add_help=False)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="kserve-v1")
    parser.parse_known_args(args)
    return kserve.main(args)
