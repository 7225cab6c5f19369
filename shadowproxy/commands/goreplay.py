"""GoReplay's `.gor` files as replay input (`replay --format goreplay`).

GoReplay writes payloads separated by the line `🐵🙈🙉`; each payload is a header line
`TYPE ID TIMESTAMP_NS LATENCY_NS` (type 1 a request, 2 the original response, 3 a replayed response)
followed by the raw HTTP/1.x message. A request is paired with the type-2 payload of the same ID,
when one was captured; without it there is no production answer to compare with, so the request
is not replayed (and counted with its reason).
"""

from __future__ import annotations

import os
from collections import Counter

from shadowproxy.commands.replay import Replayed

__all__ = ["SEPARATOR", "read_goreplay"]

SEPARATOR = "\n🐵🙈🙉\n".encode()
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                  "content-length", "host"})


def _dechunk(body: bytes) -> bytes:
    out: list[bytes] = []
    rest = body
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


def _message(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """The start line, the header fields and the body (de-chunked) of a raw HTTP/1.x message."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields.append((name.strip(), value.strip()))
    lowered = {n.lower(): v for n, v in fields}
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in lowered and lowered["content-length"].isdigit():
        body = body[: int(lowered["content-length"])]
    return lines[0], fields, body


def read_goreplay(path: str | os.PathLike[str], skipped: Counter[str]) -> list[Replayed]:
    """The requests of a `.gor` file with their captured responses, in capture order."""
    with open(path, "rb") as file:
        data = file.read()
    requests: list[tuple[str, int, bytes]] = []
    responses: dict[str, tuple[int, bytes]] = {}
    for payload in data.split(SEPARATOR):
        header, _, raw = payload.lstrip(b"\n").partition(b"\n")
        parts = header.decode("latin-1").split()
        if len(parts) < 3 or not raw:
            if payload.strip():
                skipped["unreadable GoReplay payload"] += 1
            continue
        kind, request_id, stamp_text = parts[0], parts[1], parts[2]
        latency = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        if kind == "1":
            requests.append((request_id, int(stamp_text) if stamp_text.isdigit() else 0, raw))
        elif kind == "2":
            responses[request_id] = (latency, raw)
    out: list[Replayed] = []
    for request_id, stamp, raw in requests:
        answer = responses.get(request_id)
        if answer is None:
            skipped["no captured response (GoReplay --output-file without --input-raw-track-response)"] += 1
            continue
        start, fields, body = _message(raw)
        method, _, rest = start.partition(" ")
        target = rest.rsplit(" ", 1)[0] if " " in rest else rest
        status_line, _, response_body = _message(answer[1])
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            skipped["unreadable GoReplay response"] += 1
            continue
        out.append(Replayed(
            request_id=request_id, time=stamp / 1e9, method=method, target=target or "/",
            headers=[(n, v) for n, v in fields if n.lower() not in _HOP], body=body, status=status,
            response_body=response_body, latency_s=answer[0] / 1e9 if answer[0] else None,
        ))
    return out
