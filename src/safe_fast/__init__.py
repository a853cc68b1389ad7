"""safe_fast: the fast realtime broadcast engine for SAFE ShareData.

A WebSocket server and client for the SAFE realtime protocol, wire-compatible
with ``@degenerate/realtime`` 0.7.1. The broadcast hot path is compiled
(``safe_fast.core_backend() == "cython"``) with a pure-Python twin.
"""

from ._backend import core_backend
from .auth import (
    AuthorizationAudience,
    AuthorizedAuthorities,
    ShareDataAuthContext,
    create_share_data_authenticate,
    share_data_audience_authorizer,
)
from .client import (
    Backoff,
    ClientClosed,
    ConnectionClosed,
    ConnectionFailed,
    ProposalResult,
    ProtocolError,
    QueueFull,
    RealtimeClient,
    RealtimeError,
    RequestTimeout,
    ServerError,
    Subscription,
    SubscriptionOverflow,
    SubscriptionRejected,
    Unauthorized,
    next_backoff_delay,
)
from .messages import (
    CLOSE_FELL_BEHIND,
    CLOSE_INVALID_MESSAGE,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_SHARE_DATA,
    ClientMessage,
    EncodeError,
    ErrorFrame,
    InvalidMessage,
    LifecycleFrame,
    Ping,
    PongFrame,
    ProposalResultFrame,
    Propose,
    ServerMessage,
    StateFrame,
    Subscribe,
    TransactionFrame,
    Unsubscribe,
    encode_message,
    parse_client_message,
    parse_server_message,
)
from .registry import ChannelRegistry, InMemoryChannelRegistry
from .replay import InMemoryReplayStore, ReplayEntry, ReplayStore
# scaleout takes a redis client from the caller and never imports redis itself,
# so importing it here keeps ``redis`` optional.
from .scaleout import CorruptReplayEntry, RedisChannelRegistry, RedisReplayStore
from .server import (
    ConnectionClosedEvent,
    ConnectionOpenedEvent,
    ConnectionOverflowEvent,
    RealtimeServer,
    ReplayTimeoutEvent,
    ReplayWriteFailedEvent,
    ServerConnection,
    UpgradeRequest,
    attach_realtime_server,
    create_id_based_function_resolver,
    use_uvloop,
)
from .sharedata import (
    RuleError,
    ShareData,
    ShareDataEvent,
    ShareDataManager,
    ShareFunction,
    TransactionOutcome,
    TransactionRecord,
)
from .store import (
    CorruptShareData,
    MemoryStore,
    PostgresStore,
    SchemaVersionError,
    ShareDataStore,
    SQLiteStore,
    StoredShareData,
    StoreError,
    StoreUnavailable,
    open_store,
)
from .store.history import HistoryReplayStore

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "core_backend",
    # the SAFE model
    "ShareFunction",
    "ShareData",
    "TransactionRecord",
    "TransactionOutcome",
    "ShareDataManager",
    "ShareDataEvent",
    "RuleError",
    # where ShareData lives (PostgreSQL needs the ``postgres`` extra)
    "ShareDataStore",
    "open_store",
    "MemoryStore",
    "SQLiteStore",
    "PostgresStore",
    "StoredShareData",
    "HistoryReplayStore",
    "StoreError",
    "StoreUnavailable",
    "CorruptShareData",
    "SchemaVersionError",
    # the wire protocol
    "CLOSE_FELL_BEHIND",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNKNOWN_SHARE_DATA",
    "CLOSE_INVALID_MESSAGE",
    "InvalidMessage",
    "EncodeError",
    "Subscribe",
    "Unsubscribe",
    "Propose",
    "Ping",
    "ClientMessage",
    "StateFrame",
    "TransactionFrame",
    "LifecycleFrame",
    "ProposalResultFrame",
    "PongFrame",
    "ErrorFrame",
    "ServerMessage",
    "parse_client_message",
    "parse_server_message",
    "encode_message",
    # the server
    "attach_realtime_server",
    "RealtimeServer",
    "ServerConnection",
    "UpgradeRequest",
    "ConnectionOpenedEvent",
    "ConnectionClosedEvent",
    "ConnectionOverflowEvent",
    "ReplayWriteFailedEvent",
    "ReplayTimeoutEvent",
    "create_id_based_function_resolver",
    "use_uvloop",
    "ChannelRegistry",
    "InMemoryChannelRegistry",
    "ReplayStore",
    "ReplayEntry",
    "InMemoryReplayStore",
    # the client
    "RealtimeClient",
    "Subscription",
    "ProposalResult",
    "Backoff",
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
    # scale-out through Redis (needs the ``redis`` extra)
    "RedisChannelRegistry",
    "RedisReplayStore",
    "CorruptReplayEntry",
    # authentication
    "AuthorizationAudience",
    "AuthorizedAuthorities",
    "ShareDataAuthContext",
    "create_share_data_authenticate",
    "share_data_audience_authorizer",
]
