"""The mirror decision (shadowproxy.shadow.sampling), as a unit: no sockets, no event loop."""

from __future__ import annotations

import math

import pytest

from shadowproxy.config import MirrorConfig
from shadowproxy.shadow.sampling import Sampler, sticky_fraction

N = 2000
SIGMAS = 4.5  # a false alarm about once in 150,000 runs


def binomial_bounds(n: int, p: float, sigmas: float = SIGMAS) -> tuple[float, float]:
    """The range of a Binomial(n, p) count within `sigmas` standard deviations of its mean."""
    mean = n * p
    sd = math.sqrt(n * p * (1.0 - p))
    return mean - sigmas * sd, mean + sigmas * sd


def sampler(**mirror: object) -> Sampler:
    return Sampler(MirrorConfig(**mirror))  # type: ignore[arg-type]


def test_rate_quarter_over_2000_requests_lands_within_binomial_bounds() -> None:
    s = sampler(sample_rate=0.25)
    hits = sum(s.sampled([(b"Content-Type", b"application/json")]) for _ in range(N))
    lo, hi = binomial_bounds(N, 0.25)
    assert lo <= hits <= hi, f"{hits} of {N} sampled at rate 0.25, expected within [{lo:.0f}, {hi:.0f}]"


def test_rate_zero_never_samples_and_rate_one_always_samples() -> None:
    assert not any(sampler(sample_rate=0.0).sampled([]) for _ in range(500))
    assert all(sampler(sample_rate=1.0).sampled([]) for _ in range(500))


def test_rate_changed_at_run_time_is_used_by_the_next_decision() -> None:
    s = sampler(sample_rate=0.0)
    assert not s.sampled([])
    s.sample_rate = 1.0
    assert s.sampled([])
    s.sample_rate = 0.0
    assert not s.sampled([])


def test_sticky_keys_are_all_or_nothing_over_repeated_requests() -> None:
    s = sampler(sample_rate=0.25, sticky_header="X-User-ID")
    keys = [b"user-%d" % i for i in range(400)]
    mirrored_keys = 0
    for key in keys:
        decisions = {s.sampled([(b"X-User-ID", key)]) for _ in range(10)}
        assert len(decisions) == 1, f"key {key!r} was mirrored on some requests and not on others"
        mirrored_keys += decisions.pop()
    lo, hi = binomial_bounds(len(keys), 0.25)
    assert lo <= mirrored_keys <= hi, f"{mirrored_keys} of {len(keys)} keys mirrored at rate 0.25"


def test_sticky_decision_is_the_same_on_every_replica() -> None:
    # Two samplers with different random seeds stand in for two replicas (or a restart).
    a = Sampler(MirrorConfig(sample_rate=0.3, sticky_header="X-User-ID"), seed=1)
    b = Sampler(MirrorConfig(sample_rate=0.3, sticky_header="X-User-ID"), seed=2)
    for i in range(500):
        headers = [(b"X-User-ID", b"u%d" % i)]
        assert a.sampled(headers) == b.sampled(headers)


def test_sticky_header_name_matches_case_insensitively() -> None:
    s = sampler(sample_rate=0.5, sticky_header="X-User-ID")
    for i in range(200):
        key = b"k%d" % i
        expected = sticky_fraction(key) < 0.5
        assert s.sampled([(b"x-user-id", key)]) == expected
        assert s.sampled([(b"X-USER-ID", key)]) == expected


def test_raising_the_rate_keeps_every_sticky_key_already_mirrored() -> None:
    keys = [b"session-%d" % i for i in range(1000)]
    low = {k for k in keys if sampler(sample_rate=0.1, sticky_header="X-Session").sampled([(b"X-Session", k)])}
    high = {k for k in keys if sampler(sample_rate=0.5, sticky_header="X-Session").sampled([(b"X-Session", k)])}
    assert low, "no key mirrored at 0.1 out of 1000"
    assert low <= high


def test_requests_without_the_sticky_header_fall_back_to_the_rate() -> None:
    s = sampler(sample_rate=0.25, sticky_header="X-User-ID")
    hits = sum(s.sampled([(b"Content-Type", b"application/json")]) for _ in range(N))
    lo, hi = binomial_bounds(N, 0.25)
    assert lo <= hits <= hi, f"{hits} of {N} header-less requests sampled at rate 0.25"


def test_sticky_keys_are_not_mirrored_at_rate_zero_and_all_mirrored_at_rate_one() -> None:
    keys = [b"u%d" % i for i in range(300)]
    assert not any(sampler(sample_rate=0.0, sticky_header="X-U").sampled([(b"X-U", k)]) for k in keys)
    assert all(sampler(sample_rate=1.0, sticky_header="X-U").sampled([(b"X-U", k)]) for k in keys)


def test_sticky_fraction_is_uniform_in_unit_interval() -> None:
    values = [sticky_fraction(b"key-%d" % i) for i in range(N)]
    assert all(0.0 <= v < 1.0 for v in values)
    for edge in (0.1, 0.25, 0.5, 0.9):
        below = sum(v < edge for v in values)
        lo, hi = binomial_bounds(N, edge)
        assert lo <= below <= hi, f"{below} of {N} fractions below {edge}"


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"PUT", b"post"])
def test_method_not_in_methods_is_skipped(method: bytes) -> None:
    assert sampler(methods=("POST",)).skip_reason(method, 10) == "method"


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
def test_method_in_methods_is_eligible(method: bytes) -> None:
    assert sampler(methods=("POST", "PUT")).skip_reason(method, 10) is None


def test_body_over_mirror_max_body_bytes_is_skipped_at_the_limit_is_not() -> None:
    s = sampler(max_body_bytes=1000)
    assert s.skip_reason(b"POST", 1001) == "body_too_large"
    assert s.skip_reason(b"POST", 1000) is None
    assert s.skip_reason(b"POST", 0) is None


def test_unknown_length_body_is_eligible_up_front() -> None:
    # A chunked body has no Content-Length; the mirror ticket enforces the limit as it grows.
    assert sampler(max_body_bytes=10).skip_reason(b"POST", None) is None


def test_the_draw_is_the_sticky_keys_share_and_decides_as_sampled_does() -> None:
    """Several candidates share one draw per request: a request goes to every candidate whose rate
    is above it, so the same key is mirrored to a candidate exactly when `sampled` would say so."""
    s = sampler(sample_rate=0.3, sticky_header="X-User-ID")
    for i in range(200):
        headers = [(b"X-User-ID", f"user-{i}".encode())]
        share = s.draw(headers)
        assert share == sticky_fraction(f"user-{i}".encode())
        assert (share < 0.3) == s.sampled(headers)


def test_the_draw_without_a_sticky_key_is_uniform() -> None:
    s = sampler(sample_rate=0.3)
    draws = [s.draw([]) for _ in range(N)]
    assert all(0.0 <= d < 1.0 for d in draws)
    lo, hi = binomial_bounds(N, 0.2)
    assert lo <= sum(d < 0.2 for d in draws) <= hi
