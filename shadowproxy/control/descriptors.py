"""File descriptors: the open-files limit raised at start, and the client connections it allows.

Every client connection, pooled upstream connection and admin connection takes a descriptor.
A process that runs out of them can accept nothing, not even on its admin port, so a liveness
probe would restart a proxy that is still serving. So each process raises its soft limit to the
hard one, and caps client connections (`listen.max_connections`) below that, leaving room for
the upstream pools, the admin port and the files a process keeps open.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from shadowproxy.config import Config

# Descriptors kept free beyond the pools: the admin port's connections, the listening sockets,
# the event loop's own, log and store files, a worker's pipes.
RESERVED = 64
MIN_CLIENT_CONNECTIONS = 64


@dataclass(frozen=True)
class OpenFiles:
    """The open-files limit before and after `raise_open_files_limit`."""

    before: int  # the soft limit the process started with
    soft: int
    hard: int
    problem: str = ""  # why the soft limit could not be raised, or ""

    def describe(self) -> str:
        """For the start-up log: both limits, and what became of the soft one."""
        text = f"open-files limit: soft {_text(self.soft)}, hard {_text(self.hard)}"
        if self.problem:
            return f"{text} (cannot raise the soft limit: {self.problem})"
        if self.before != self.soft:
            return f"{text} (soft raised from {_text(self.before)})"
        return text


def raise_open_files_limit() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, problem = soft, ""
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS refuses an unlimited soft limit
            problem = str(exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(before, soft, hard, problem)


def client_connection_limit(config: Config, soft_limit: int | None = None) -> int | None:
    """`listen.max_connections`, or when unset: the soft open-files limit less the upstream pools'
    connections and `RESERVED`, at least `MIN_CLIENT_CONNECTIONS`; None (no cap) when the limit is
    unlimited."""
    if config.listen.max_connections is not None:
        return config.listen.max_connections
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return None
    pools = config.production.max_connections + sum(c.max_in_flight for c in config.candidates)
    return max(MIN_CLIENT_CONNECTIONS, soft_limit - pools - RESERVED)


def _text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
