"""The narrow seam through which other capabilities (audit store, drift monitor) see traffic.

The proxy and the mirror never grow for them: an observer is told about each finished exchange
(`on_exchange`) and each judged mirrored pair (`on_pair`) with plain records — bytes and numbers,
never transports. Bodies are captured only for the share of requests an observer asks for
(`wants_bodies`, decided once per request head), so an observer that samples 5% costs the other
95% nothing but one call. Observers must not block: anything slow goes to their own queue or task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web


# Plain classes with an explicit __init__, not dataclasses: mypyc compiles an explicit __init__,
# while a dataclass's generated one runs as interpreted Python (eval frames and generic setattr,
# once per request with an observer).


class ExchangeRecord:
    """One client request and production's answer, as the client saw it."""

    __slots__ = ("request_id", "time", "method", "path", "status", "response_headers", "latency_s", "mirrored",
                 "request_body", "response_body", "request_headers", "chunk_times")

    def __init__(
        self,
        request_id: str,
        time: float,  # wall clock (time.time()) when the request head arrived
        method: str,
        path: str,
        status: int,  # production's status, or ours (502, 504, 413...), or 499 when the client left
        response_headers: list[tuple[bytes, bytes]],
        latency_s: float | None,  # first byte sent upstream to last byte received; None without an answer
        mirrored: bool,  # a shadow copy was sent to the candidate
        request_body: bytes | None,  # only when captured (an observer asked, or the request was mirrored)
        response_body: bytes | None,  # only when captured, 2xx and within compare.max_response_bytes
        # The client's header fields as received (hop-by-hop ones included); the path holds the query.
        request_headers: list[tuple[bytes, bytes]] | None = None,
        # Only for an observer with `keeps_chunk_times = True` that wanted this request: for each
        # captured piece of the answer, seconds since the request was sent and the body's length
        # so far, flat ([t0, end0, t1, end1, ...]).
        chunk_times: list[float] | None = None,
    ) -> None:
        self.request_id = request_id
        self.time = time
        self.method = method
        self.path = path
        self.status = status
        self.response_headers = response_headers
        self.latency_s = latency_s
        self.mirrored = mirrored
        self.request_body = request_body
        self.response_body = response_body
        self.request_headers = request_headers
        self.chunk_times = chunk_times


class PairRecord:
    """A mirrored request after both answers were judged."""

    __slots__ = ("request_id", "outcome", "candidate_status", "candidate_headers", "candidate_body",
                 "candidate_latency_s", "production_predictions", "candidate_predictions", "agreements")

    def __init__(
        self,
        request_id: str,
        # agree | disagree (any prediction) | candidate_error | unparseable | too_large | not_compared
        outcome: str,
        candidate_status: int,  # 0 when the candidate gave no answer
        candidate_headers: list[tuple[bytes, bytes]],
        candidate_body: bytes | None,
        candidate_latency_s: float | None,
        production_predictions: list[object] | None,
        candidate_predictions: list[object] | None,
        agreements: list[bool] | None,  # per prediction, when compared
    ) -> None:
        self.request_id = request_id
        self.outcome = outcome
        self.candidate_status = candidate_status
        self.candidate_headers = candidate_headers
        self.candidate_body = candidate_body
        self.candidate_latency_s = candidate_latency_s
        self.production_predictions = production_predictions
        self.candidate_predictions = candidate_predictions
        self.agreements = agreements


class Observer(Protocol):
    """An optional class attribute `every_exchange = False` means `on_exchange` is called only for
    requests this observer wanted (or that were mirrored), so an observer that samples costs the
    requests it does not sample no record at all; without it, every exchange is reported."""

    def wants_bodies(self) -> bool:
        """Called once per request head: capture this request's bodies for `on_exchange`?"""
        ...

    def on_exchange(self, record: ExchangeRecord, wanted: bool) -> None:
        """Every finished client request; `wanted` is this observer's own `wants_bodies` answer (the
        bodies may also be there because the request was mirrored or another observer asked)."""
        ...

    def on_pair(self, record: PairRecord) -> None: ...


class Component(Observer, Protocol):
    """An observer with a lifecycle and a public face (the audit store, the drift monitor).

    `start` runs before traffic is accepted; `close` after the drain (flush what is queued);
    `routes` are added to the admin app; `stats_blocks` are merged into `/shadow/stats` (for
    example `{"ground_truth": {...}}`) and so reach the verdict.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def routes(self) -> list[web.RouteDef]: ...

    def stats_blocks(self) -> dict[str, Any]: ...
