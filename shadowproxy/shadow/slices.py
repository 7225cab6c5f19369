"""Which slice of the traffic a request belongs to: `[[slices]]`, first match in config order.

A slice matches by a path prefix, a header's exact value, or both; a request no slice matches is
in `other` (the last index). On the hot path a request costs one dictionary lookup of its path
when no slice looks at a header (the answer for a path is cached, in a bounded table), else a scan
of its header names for the few that slices name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from shadowproxy.config import SliceConfig

OTHER: Final = "other"
_CACHE_MAX: Final = 4096  # distinct paths remembered; past it the table starts over


class SliceMatcher:
    __slots__ = ("names", "other", "_rules", "_headers", "_cache")

    def __init__(self, slices: Sequence[SliceConfig]) -> None:
        self.names: tuple[str, ...] = (*(s.name for s in slices), OTHER)
        self.other = len(slices)
        self._rules: list[tuple[bytes, bytes, bytes]] = [
            (s.path_prefix.encode(), s.header.lower().encode(), s.value.encode()) for s in slices
        ]
        self._headers = frozenset(s.header.lower().encode() for s in slices if s.header)
        self._cache: dict[bytes, int] = {}

    def match(self, path: bytes, headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> int:
        """The index of the request's slice in `names`."""
        if not self._headers:
            index = self._cache.get(path)
            if index is None:
                index = self._scan(path, None)
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[path] = index
            return index
        values: dict[bytes, bytes] = {}
        wanted = self._headers
        for (_, value), lname in zip(headers, lnames):  # noqa: B905  equal lengths, built together
            if lname in wanted and lname not in values:
                values[lname] = value
        return self._scan(path, values)

    def _scan(self, path: bytes, values: dict[bytes, bytes] | None) -> int:
        for index, (prefix, header, value) in enumerate(self._rules):
            if prefix and not path.startswith(prefix):
                continue
            if header and (values is None or values.get(header) != value):
                continue
            return index
        return self.other
