"""The candidate's own identity on its copy of a request: `[candidate] model` and `headers`.

The mirror applies this to the candidate's copy only, once, as it sends it; production's request
is built before and apart from it, so it never changes. With neither key set there is no rewrite
at all (the mirror holds None).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from shadowproxy.config import CandidateConfig

__all__ = ["CandidateRewrite"]


class CandidateRewrite:
    """Replaces the JSON body's ``model`` and same-named header fields (case-insensitively, and
    added when absent) on the candidate's copy. The Content-Length of the copy is the mirror's,
    computed from the body it sends."""

    __slots__ = ("block", "model", "names")

    def __init__(self, model: str, headers: Mapping[str, str]) -> None:
        self.model = model
        self.names = frozenset(name.lower().encode() for name in headers)
        # Config checked names (tokens) and values (visible ASCII, no line breaks).
        self.block = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items())

    @classmethod
    def from_config(cls, candidate: CandidateConfig) -> CandidateRewrite | None:
        if not candidate.model and not candidate.headers:
            return None
        return cls(candidate.model, {name: secret.value for name, secret in candidate.headers.items()})

    def fields(self, fields: bytes) -> bytes:
        """A rendered header block (``Name: value\\r\\n`` each) with the configured fields in place
        of the client's."""
        if not self.names:
            return fields
        names = self.names
        kept = [
            line + b"\r\n"
            for line in fields.split(b"\r\n")
            if line and line.split(b":", 1)[0].lower() not in names
        ]
        return b"".join(kept) + self.block

    def body(self, body: bytes) -> bytes:
        """The body with ``model`` set, when it is a JSON object; any other body as it is."""
        if not self.model:
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:  # not JSON (or not orjson's: NaN literals, huge integers)
            return body
        if not isinstance(doc, dict) or doc.get("model") == self.model:
            return body
        doc["model"] = self.model
        return orjson.dumps(doc)
