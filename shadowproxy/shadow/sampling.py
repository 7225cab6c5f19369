"""The mirror decision: which requests the candidate also sees.

With `mirror.sticky_header` set, a stable hash of the header's value decides, so one key (a user,
a session) is always or never mirrored and the candidate sees whole histories; requests without the
header fall back to the rate. Eligibility (method, body size) is judged after sampling, so requests
sampled but not eligible are counted as `skipped` instead of vanishing (Istio users found >1 MiB
requests silently not mirrored, istio/istio #58870).
"""

from __future__ import annotations

import hashlib
import random

from shadowproxy.config import MirrorConfig

_SCALE = float(1 << 64)


def sticky_fraction(key: bytes) -> float:
    """A stable, uniform position in [0, 1) for a sticky key (same on every replica and restart)."""
    digest = hashlib.blake2b(key, digest_size=8, person=b"shadowproxy").digest()
    return int.from_bytes(digest, "big") / _SCALE


class Sampler:
    """Decides per request head; `sample_rate` may be changed at run time (PUT /shadow/sample_rate)."""

    __slots__ = ("sample_rate", "methods", "sticky_header", "max_body_bytes", "_random")

    def __init__(self, config: MirrorConfig, *, seed: int | None = None) -> None:
        self.sample_rate = config.sample_rate
        self.methods = frozenset(m.encode() for m in config.methods)
        self.sticky_header = config.sticky_header.lower().encode()
        self.max_body_bytes = config.max_body_bytes
        self._random = random.Random(seed).random

    def sampled(self, headers: list[tuple[bytes, bytes]]) -> bool:
        rate = self.sample_rate
        if rate <= 0.0:
            return False
        if self.sticky_header:
            for name, value in headers:
                if name.lower() == self.sticky_header:
                    return sticky_fraction(value) < rate
        return rate >= 1.0 or self._random() < rate

    def draw(self, headers: list[tuple[bytes, bytes]]) -> float:
        """This request's position in [0, 1): the sticky key's, else a uniform draw. Every
        candidate at a rate above it mirrors the request."""
        if self.sticky_header:
            for name, value in headers:
                if name.lower() == self.sticky_header:
                    return sticky_fraction(value)
        return self._random()

    def skip_reason(self, method: bytes, content_length: int | None) -> str | None:
        """Why a sampled request cannot be mirrored, or None when it can."""
        if method not in self.methods:
            return "method"
        if content_length is not None and content_length > self.max_body_bytes:
            return "body_too_large"
        return None
