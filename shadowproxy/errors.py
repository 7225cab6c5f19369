"""Exceptions raised by shadowproxy.

The tree::

    ShadowProxyError            base of everything shadowproxy raises on purpose
     └── ConfigError            the configuration is missing, unreadable or invalid;
                                ``problems`` holds one line per problem
"""

from __future__ import annotations

from collections.abc import Iterable


class ShadowProxyError(Exception):
    """Base class of shadowproxy's own exceptions."""


class ConfigError(ShadowProxyError):
    """A configuration cannot be used.

    Every problem found is listed, one line each, naming the key path::

        ConfigError(["mirror.sample_rate: must be between 0 and 1, got 1.5"])
    """

    problems: list[str]

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Keep `problems` intact across pickling (worker processes).
        return (type(self), (self.problems,))
