"""The realtime server: connection protocol, picows adapter, built-in hooks."""

from .connection import (
    ConnectionClosedEvent,
    ConnectionOpenedEvent,
    ConnectionOverflowEvent,
    ReplayTimeoutEvent,
    ReplayWriteFailedEvent,
    ServerConnection,
    ServerHub,
)
from .request import UpgradeRequest
from .resolver import create_id_based_function_resolver
from .admission import AdmissionPolicy
from .server import ConnectionRefusedEvent, RealtimeServer, attach_realtime_server, use_uvloop

__all__ = [
    "attach_realtime_server",
    "RealtimeServer",
    "ServerConnection",
    "ServerHub",
    "UpgradeRequest",
    "ConnectionOpenedEvent",
    "ConnectionClosedEvent",
    "ConnectionOverflowEvent",
    "ReplayWriteFailedEvent",
    "ReplayTimeoutEvent",
    "ConnectionRefusedEvent",
    "AdmissionPolicy",
    "create_id_based_function_resolver",
    "use_uvloop",
]
