"""Plain HTTP answers on the WebSocket port.

picows hands every HTTP request on the listening port to the server's
listener factory, upgrade or not, and sends whatever non-101 response the
factory returns before closing the connection. So a health check, a metrics
scrape or a static page can share the WebSocket port: the server looks up a
request that is not a WebSocket upgrade in a table of exact paths and
answers it from there, with picows' own response writer (no HTTP parser of
ours).

Handlers are synchronous, because picows' factory is: one that needs I/O
(is Redis up?) reads a value kept current in the background. Each response
closes its connection (``Connection: close``), which is what probes and
scrapers expect from a one-shot request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Mapping

import picows

from .request import UpgradeRequest

__all__ = ["HttpResponse", "HttpHandler", "is_websocket_upgrade", "to_picows_response"]


@dataclass(frozen=True)
class HttpResponse:
    """A complete answer to a plain HTTP request."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


HttpHandler = Callable[[UpgradeRequest], HttpResponse]
"""Answers one plain (non-upgrade) ``GET`` request to its path (picows takes no other method)."""


def is_websocket_upgrade(headers: Mapping[str, str]) -> bool:
    """Whether the request asks for a WebSocket (``Upgrade: websocket``)."""
    return "websocket" in headers.get("upgrade", "").lower()


def to_picows_response(response: HttpResponse) -> picows.WSUpgradeResponseWithListener:
    """The picows response object for ``response``; TypeError/ValueError naming a bad field."""
    if not isinstance(response, HttpResponse):
        raise TypeError(f"an HTTP handler must return an HttpResponse, got {type(response).__name__}")
    if not isinstance(response.body, bytes):
        raise TypeError(f"HttpResponse.body must be bytes, got {type(response.body).__name__}")
    if not isinstance(response.status, int) or not 200 <= response.status <= 599:
        raise ValueError(f"HttpResponse.status must be an HTTP status from 200 to 599, got {response.status!r}")
    answer = picows.WSUpgradeResponse()
    answer.version = b"HTTP/1.1"
    answer.status = HTTPStatus(response.status)  # ValueError for a code the standard library does not know
    headers = answer.headers = type(picows.WSUpgradeResponse.create_ok_response().headers)()
    headers["Content-Type"] = response.content_type
    headers["Cache-Control"] = "no-store"
    headers["Connection"] = "close"
    for name, value in response.headers.items():
        headers[name] = value
    if response.body:
        answer.body = response.body
    else:
        # picows writes Content-Length only for a body; an empty answer says it too.
        headers["Content-Length"] = "0"
        answer.body = None
    return picows.WSUpgradeResponseWithListener(answer, None)
