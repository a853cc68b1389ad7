"""The HTTP upgrade request as the ``authenticate`` hook sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["UpgradeRequest"]


@dataclass(frozen=True)
class UpgradeRequest:
    """What a client asked for when it opened the WebSocket.

    ``path`` keeps the query string; ``query`` holds its decoded parameters
    (the first value wins when a key repeats, as with JavaScript's
    ``URLSearchParams.get``); ``headers`` is a case-insensitive
    mapping; ``remote_address`` is ``(host, port)`` or ``None``.
    """

    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=lambda: CIMultiDictProxy(CIMultiDict()))
    remote_address: Any = None

    @classmethod
    def from_target(
        cls,
        target: str,
        headers: Mapping[str, str] | None = None,
        remote_address: Any = None,
    ) -> "UpgradeRequest":
        """Build a request from a request target such as ``/realtime?token=x``."""
        query = query_parameters(urlsplit(target).query)
        header_map: CIMultiDictProxy[str]
        if headers is None:
            header_map = CIMultiDictProxy(CIMultiDict())
        elif isinstance(headers, CIMultiDictProxy):
            header_map = headers
        else:
            header_map = CIMultiDictProxy(CIMultiDict(headers))
        return cls(path=target, query=query, headers=header_map, remote_address=remote_address)

    @property
    def route(self) -> str:
        """The path without its query string."""
        return urlsplit(self.path).path


def query_parameters(query_string: str) -> dict[str, str]:
    """The decoded parameters of a query string; the first value of a repeated key wins."""
    parameters: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        parameters.setdefault(key, value)
    return parameters
