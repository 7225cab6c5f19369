"""Where the predictions live in a model server's answer, one per instance.

``extract_predictions`` takes the already-parsed JSON answer (the caller runs ``orjson.loads``)
and returns a flat list with one prediction per instance, ready for ``compare.compare_predictions``.

| preset | predictions |
|---|---|
| ``kserve-v1``, ``tf-serving`` | ``/predictions`` (a list) |
| ``mlflow`` | ``/predictions`` (a list, or a dict of columns -> one dict per row), or a bare top-level list |
| ``oip-v2`` | ``outputs[*].data`` reshaped by each output's ``shape`` (first dimension = instances) |
| ``json`` | the RFC 6901 pointer in ``path`` |
| ``openai`` | one per choice or embedding (``judging/openai.py``, which the mirror calls directly) |

A non-empty ``path`` overrides every preset but ``openai``. Any problem raises ``PresetError`` (a ``ValueError``),
which the mirror counts as an unparseable (or candidate_error) answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson

__all__ = [
    "PRESETS",
    "PresetError",
    "extract_predictions",
    "flatten",
    "parse_pointer",
    "redact",
    "resolve_pointer",
]

PRESETS: tuple[str, ...] = ("kserve-v1", "oip-v2", "tf-serving", "mlflow", "json")


class PresetError(ValueError):
    """The answer does not hold predictions where the preset (or path) says they are."""


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """Split an RFC 6901 JSON pointer into its unescaped reference tokens.

    ``""`` is the whole document; otherwise the pointer must start with ``/``.
    ``~1`` becomes ``/`` and ``~0`` becomes ``~`` (in that order, RFC 6901 §4).
    """
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise PresetError(f"JSON pointer must be empty or start with '/', got {pointer!r}")
    tokens = []
    for raw in pointer[1:].split("/"):
        # A "~" not followed by 0 or 1 is malformed (RFC 6901 §3).
        stripped = raw.replace("~0", "").replace("~1", "")
        if "~" in stripped:
            raise PresetError(f"JSON pointer {pointer!r}: bad escape in {raw!r}")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


def resolve_pointer(doc: object, tokens: Sequence[str]) -> object:
    """Follow parsed pointer tokens into ``doc``; raise ``PresetError`` when a step is missing."""
    node = doc
    for depth, token in enumerate(tokens):
        if isinstance(node, dict):
            if token not in node:
                raise PresetError(f"no key {token!r} at /{'/'.join(tokens[:depth])}")
            node = node[token]
        elif isinstance(node, list):
            # RFC 6901 §4: an array index is digits without a leading zero ("-" never exists yet).
            if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
                raise PresetError(f"{token!r} is not an array index at /{'/'.join(tokens[:depth])}")
            index = int(token)
            if index >= len(node):
                raise PresetError(f"index {index} out of range at /{'/'.join(tokens[:depth])}")
            node = node[index]
        else:
            raise PresetError(f"cannot descend into {type(node).__name__} at /{'/'.join(tokens[:depth])}")
    return node


def extract_predictions(doc: object, preset: str, path: str = "", output: str = "") -> list[object]:
    """Return one prediction per instance from a parsed answer.

    ``path`` (an RFC 6901 pointer) overrides the preset; a pointed value that is not a list is a
    single prediction. ``output`` selects one ``oip-v2`` output by name; without it a single output
    gives its per-instance values, several outputs give one list of per-output values per instance.
    """
    if preset == "openai":
        # Imported here: openai.py imports PresetError from this module.
        from shadowproxy.judging.openai import answer_predictions

        return answer_predictions(doc)
    if path:
        value = resolve_pointer(doc, parse_pointer(path))
        return list(value) if isinstance(value, list) else [value]
    if preset in ("kserve-v1", "tf-serving"):
        return _predictions_list(doc)
    if preset == "mlflow":
        return _mlflow(doc)
    if preset == "oip-v2":
        return _oip_v2(doc, output)
    if preset == "json":
        raise PresetError("preset 'json' needs compare.path")
    raise PresetError(f"unknown preset {preset!r}")


def _predictions_list(doc: object) -> list[object]:
    if not isinstance(doc, dict) or "predictions" not in doc:
        raise PresetError("answer has no 'predictions' key")
    predictions = doc["predictions"]
    if not isinstance(predictions, list):
        raise PresetError(f"'predictions' is a {type(predictions).__name__}, not a list")
    return predictions


def _mlflow(doc: object) -> list[object]:
    # MLflow 1.x scoring servers answered with a bare list; 2.x wraps it in {"predictions": ...}.
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("predictions"), dict):
        return _columns_to_rows(doc["predictions"])
    return _predictions_list(doc)


def _columns_to_rows(columns: dict[str, object]) -> list[object]:
    """``{"a": [1, 2], "b": [3, 4]}`` -> ``[{"a": 1, "b": 3}, {"a": 2, "b": 4}]`` (pandas orient=list)."""
    lengths = set()
    for name, column in columns.items():
        if not isinstance(column, list):
            raise PresetError(f"predictions column {name!r} is not a list")
        lengths.add(len(column))
    if len(lengths) > 1:
        raise PresetError(f"predictions columns differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    cols = [(name, column) for name, column in columns.items() if isinstance(column, list)]
    return [{name: column[i] for name, column in cols} for i in range(n)]


def _oip_v2(doc: object, output: str) -> list[object]:
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise PresetError("answer has no 'outputs' list")
    outputs: list[object] = doc["outputs"]
    if output:
        chosen = [o for o in outputs if isinstance(o, dict) and o.get("name") == output]
        if not chosen:
            raise PresetError(f"no output named {output!r}")
        return _oip_output(chosen[0])
    if not outputs:
        raise PresetError("'outputs' is empty")
    per_output = [_oip_output(o) for o in outputs]
    if len(per_output) == 1:
        return per_output[0]
    n = len(per_output[0])
    if any(len(values) != n for values in per_output):
        raise PresetError("outputs disagree on the number of instances")
    return [[values[i] for values in per_output] for i in range(n)]


def _oip_output(out: object) -> list[object]:
    if not isinstance(out, dict):
        raise PresetError("an output is not an object")
    name = out.get("name", "?")
    shape = out.get("shape")
    data = out.get("data")
    if not isinstance(shape, list) or not shape:
        raise PresetError(f"output {name!r}: 'shape' must be a non-empty list")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise PresetError(f"output {name!r}: 'shape' must hold non-negative integers, got {shape}")
    if not isinstance(data, list):
        raise PresetError(f"output {name!r}: 'data' must be a list")
    dims: list[int] = shape
    if data and isinstance(data[0], list):
        # The spec allows row-major nested data as well as flat; flatten it once.
        data = flatten(data)
    if len(data) != math.prod(dims):
        raise PresetError(
            f"output {name!r}: data has {len(data)} elements, shape {dims} needs {math.prod(dims)}"
        )
    return _reshape(data, dims)


def flatten(values: list[object]) -> list[object]:
    """Nested lists as one flat list, in row-major order (a tensor's `data` in OIP v2)."""
    flat: list[object] = []
    for item in values:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat


def _reshape(flat: list[object], dims: list[int]) -> list[object]:
    """Row-major reshape: the first dimension becomes the list of instances."""
    if len(dims) == 1:
        return list(flat)
    inner = dims[1:]
    step = math.prod(inner)
    return [_reshape(flat[i * step : (i + 1) * step], inner) for i in range(dims[0])]


def redact(body: bytes | None, pointers: Sequence[tuple[str, ...]]) -> bytes | None:
    """`body` with every pointed member removed. A `*` token matches every array element or object
    member (an extension of RFC 6901, for fields inside each instance of a batch). A body that is
    not JSON cannot be searched, so it is not kept at all when there is anything to redact."""
    if body is None or not pointers:
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for tokens in pointers:
        if tokens:
            _remove(doc, tokens)
    return orjson.dumps(doc)


def _remove(node: object, tokens: tuple[str, ...]) -> None:
    head, rest = tokens[0], tokens[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            if rest:
                _remove(node[key], rest)
            else:
                del node[key]
    elif isinstance(node, list):
        if head == "*":
            indexes = range(len(node))
        elif head.isdigit() and (head == "0" or head[0] != "0") and int(head) < len(node):
            indexes = range(int(head), int(head) + 1)
        else:
            return
        if not rest:
            for i in reversed(indexes):
                del node[i]
            return
        for i in indexes:
            _remove(node[i], rest)
