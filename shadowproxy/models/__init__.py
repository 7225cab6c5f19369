"""Bundled stand-in model endpoints: real aiohttp servers, used by the demo, the tests and the
benchmarks as production and candidate upstreams.

- ``kserve``: the KServe v1 ``:predict`` protocol, a small classifier whose candidate flips a known
  share of labels (``ModelBehaviour``, ``start_model``).
- ``openai``: an OpenAI-compatible LLM (chat, completions and embeddings, streamed or not) whose
  candidate answers a known share of prompts differently and starts its first token later
  (``OpenAIBehaviour``, ``start_openai_model``); ``llm_answers`` computes its answers.
- ``judge``: an LLM judge for ``[judge]`` that answers A, B or TIE by a fixed rule, or fails in a
  chosen way (``JudgeBehaviour``, ``start_judge_model``).

``python -m shadowproxy.models --protocol PROTOCOL --role production|candidate`` serves one of
them until SIGTERM/SIGINT; ``kserve-v1`` is the default protocol. This package imports nothing
else of shadowproxy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shadowproxy.models import judge, kserve, openai
from shadowproxy.models.judge import JudgeBehaviour, RunningJudgeModel, start_judge_model
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
from shadowproxy.models.llm_answers import (
    AGREE_COSINE,
    DIFFER_COSINE,
    VOCABULARY,
    asks_for_tool,
    chat_prompt,
    count_tokens,
    openai_choice,
    openai_cosine,
    openai_differs,
    openai_embedding,
    openai_text,
    openai_tool_arguments,
)
from shadowproxy.models.openai import OpenAIBehaviour, RunningOpenAIModel, make_openai_app, start_openai_model

__all__ = [
    "AGREE_COSINE",
    "BIAS",
    "DIFFER_COSINE",
    "JudgeBehaviour",
    "MODEL_SEED",
    "N_CLASSES",
    "N_FEATURES",
    "VOCABULARY",
    "WEIGHTS",
    "ModelBehaviour",
    "OpenAIBehaviour",
    "ReceivedRequest",
    "RunningJudgeModel",
    "RunningModel",
    "RunningOpenAIModel",
    "asks_for_tool",
    "candidate_flips",
    "chat_prompt",
    "count_tokens",
    "generate_instances",
    "main",
    "make_app",
    "make_openai_app",
    "openai_choice",
    "openai_cosine",
    "openai_differs",
    "openai_embedding",
    "openai_text",
    "openai_tool_arguments",
    "predict_labels",
    "predict_proba",
    "request_fails",
    "start_judge_model",
    "start_model",
    "start_openai_model",
]

PROTOCOLS = ("kserve-v1", "openai", "judge")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shadowproxy.models``: the ``--protocol`` chooses the server, whose own options
    (and ``--help``) follow. 0 after SIGTERM/SIGINT, 1 when the port cannot be bound, 2 for bad
    arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m shadowproxy.models", add_help=False)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="kserve-v1")
    known, _ = parser.parse_known_args(args)
    if known.protocol == "openai":
        return openai.main(args)
    if known.protocol == "judge":
        return judge.main(args)
    return kserve.main(args)
