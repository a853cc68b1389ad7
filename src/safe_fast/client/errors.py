"""The exceptions of the realtime client.

Every exception the client raises or reports on its ``error`` event is a
:class:`RealtimeError`, so ``except RealtimeError`` catches them all; each
situation has its own subclass so callers can tell them apart without
reading messages. Where a standard exception already means the same thing
(a timeout, a connection error) the class derives from it too.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

__all__ = [
    "RealtimeError",
    "RequestTimeout",
    "ConnectionClosed",
    "ConnectionFailed",
    "QueueFull",
    "ClientClosed",
    "Unauthorized",
    "ServerError",
    "ProtocolError",
    "SubscriptionRejected",
    "SubscriptionOverflow",
]


class RealtimeError(Exception):
    """Base class of every error of the realtime client."""


# asyncio.TimeoutError is the builtin TimeoutError from Python 3.11 on; on
# 3.10 they are distinct classes, and callers may catch either.
_TIMEOUT_BASES: tuple[type, ...] = (
    (asyncio.TimeoutError,)
    if asyncio.TimeoutError is TimeoutError
    else (asyncio.TimeoutError, TimeoutError)
)


class RequestTimeout(RealtimeError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """A ``propose`` or ``ping`` got no answer within its timeout.

    The timeout counts from the call, so time spent waiting in the outbound
    queue while disconnected counts too. ``queued`` tells whether the request
    was still waiting to be sent when it expired.
    """

    def __init__(self, message: str, *, timeout: float, queued: bool) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.queued = queued


class ConnectionClosed(RealtimeError):
    """The connection closed while a request was waiting for its answer.

    ``str(exc)`` is ``"connection closed: <code> <reason>"``. A request that
    was already sent is never re-sent on the next connection: the server may
    have applied it, and only the caller can decide whether to try again.
    """

    def __init__(self, code: int, reason: str, message: Optional[str] = None) -> None:
        super().__init__(message if message is not None else f"connection closed: {code} {reason}")
        self.code = code
        self.reason = reason


class ConnectionFailed(RealtimeError, ConnectionError):
    """A connection attempt failed before the WebSocket opened.

    The original error (refused, handshake timeout, an HTTP status other than
    401, a token callable that raised) is chained as ``__cause__``; ``status``
    holds the HTTP status when the server answered the upgrade with one.
    """

    def __init__(self, message: str, *, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(RealtimeError):
    """The outbound queue already holds ``limit`` requests.

    ``str(exc)`` is ``"outbound queue full (limit <limit>)"``.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"outbound queue full (limit {limit})")
        self.limit = limit


class ClientClosed(RealtimeError):
    """The client is closed: ``close()`` was called (for good), or it stopped
    after a terminal failure and ``connect()`` was not called again."""


class Unauthorized(RealtimeError):
    """The server rejected the credentials: HTTP 401 at the upgrade
    (``status == 401``) or close code 4002 (``code == 4002``).

    With a fixed ``token`` the client stops on it, since the same token will
    be rejected again; with a token callable it reconnects instead.
    """

    def __init__(self, message: str, *, code: Optional[int] = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ServerError(RealtimeError):
    """The server sent an ``error`` frame (``code``, ``message``, ``frame``)."""

    def __init__(self, frame: Any) -> None:
        super().__init__(f"server error: {frame.code}: {frame.message}")
        self.code: str = frame.code
        self.message: str = frame.message
        self.correlation_id: Optional[str] = frame.correlation_id
        self.frame = frame


class ProtocolError(RealtimeError):
    """The server sent something the client could not use.

    Garbage, an unknown message type, a binary frame, a frame for a
    subscription the client does not hold, an answer nobody asked for. The
    frame is skipped; the connection stays open. ``data`` holds the raw
    payload (or the parsed frame) when there is one.
    """

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


class SubscriptionRejected(RealtimeError):
    """The server refused a subscription, which the client then dropped.

    ``code`` is ``"unknown-share-data"`` (close 4003) or
    ``"unauthorized-subscribe"``.
    """

    def __init__(self, share_data_id: str, code: str, message: str) -> None:
        super().__init__(f"subscription to {share_data_id} rejected: {code}: {message}")
        self.share_data_id = share_data_id
        self.code = code
        self.message = message


class SubscriptionOverflow(RealtimeError):
    """An ``async for`` consumer of a subscription did not keep up.

    Its buffer held ``limit`` frames when another arrived; the buffer was
    discarded and ``dropped`` frames were lost to the iterator (listeners
    registered with ``on()`` still got them all). Iterating again continues
    with the frames that arrive from now on.
    """

    def __init__(self, share_data_id: str, dropped: int, limit: int) -> None:
        super().__init__(
            f"subscription {share_data_id}: consumer fell behind, "
            f"{dropped} frame(s) dropped (queue limit {limit})"
        )
        self.share_data_id = share_data_id
        self.dropped = dropped
        self.limit = limit
