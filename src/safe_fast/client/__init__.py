"""The asyncio client of the SAFE realtime protocol.

Wire-compatible with the ``RealtimeClient`` of ``@degenerate/realtime``
0.7.1, with the close-code policy that client lacks (see ``docs/client.md``).
The decisions live in the sans-I/O :mod:`safe_fast.client._state`; the
picows adapter is :mod:`safe_fast.client.client`.
"""

from ._state import ProposalResult
from .backoff import Backoff, next_backoff_delay
from .client import RealtimeClient
from .errors import (
    ClientClosed,
    ConnectionClosed,
    ConnectionFailed,
    ProtocolError,
    QueueFull,
    RealtimeError,
    RequestTimeout,
    ServerError,
    SubscriptionOverflow,
    SubscriptionRejected,
    Unauthorized,
)
from .subscription import Subscription

__all__ = [
    "RealtimeClient",
    "Subscription",
    "Backoff",
    "ProposalResult",
    "next_backoff_delay",
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
