"""The picows adapter: sockets in, the connection protocol decides, bytes out.

This module only moves bytes and schedules things: it turns the HTTP upgrade
into an :class:`UpgradeRequest` for ``authenticate``, assembles fragmented
messages, maps WebSocket control frames, runs the heartbeat timer and owns
the listening socket. Every protocol decision is made in ``connection.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl as ssl_module
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterable, Optional
from urllib.parse import urlsplit

import picows
from multidict import CIMultiDict, CIMultiDictProxy

from .._backend import core
from .._events import EventEmitter, Listener
from ..messages import CLOSE_UNAUTHORIZED, ErrorFrame
from ..registry import ChannelRegistry, InMemoryChannelRegistry
from ..replay import InMemoryReplayStore, ReplayStore
from .admission import RATE_LIMITED_CODE, AdmissionPolicy, TokenBucket
from .connection import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    DEFAULT_REPLAY_TIMEOUT,
    ServerConnection,
    ServerHub,
)
from .http import HttpHandler, HttpResponse, is_websocket_upgrade, to_picows_response
from .listen import AcceptFailureLog, resolve_backlog
from .picows_buffers import GROWS_AT, BufferTrimmer
from .request import UpgradeRequest, query_parameters

__all__ = ["attach_realtime_server", "RealtimeServer", "use_uvloop"]

logger = logging.getLogger("safe_fast.server")

_TEXT = picows.WSMsgType.TEXT
_BINARY = picows.WSMsgType.BINARY
_CONTINUATION = picows.WSMsgType.CONTINUATION
_CLOSE = picows.WSMsgType.CLOSE
_PING = picows.WSMsgType.PING
_PONG = picows.WSMsgType.PONG

# Pings and pongs are framed here rather than by picows, whose send_ping and
# send_pong would allocate its write buffer again (see picows_buffers.py).
_PING_FRAME = b"\x89\x00"
_PONG_OPCODE = 0x8A

_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
"""Close codes a peer may send (RFC 6455 §7.4, with IANA's 1012–1014), besides 3000–4999.
1004 is reserved; 1005, 1006 and 1015 must never appear on the wire."""

READ_BUFFER_SIZE = 2048
"""Initial read buffer per connection. picows grows it on demand; clients of
this protocol send small messages, so the 16 KiB default mostly sits idle."""

# Given a logger name (or a Logger), picows makes a child Logger for every
# connection (~0.7 KiB, held for its life); a LoggerAdapter it uses as is. So one
# shared adapter over the logger that name selected: picows' records still go to
# ``picows.safe_fast.server.picows``, only without the per-connection ".<fd>".
_PICOWS_LOGGER = logging.LoggerAdapter(logging.getLogger("picows.safe_fast.server.picows"), {})

# What picows' upgrade request and 101 response keep as headers once the
# handshake is over (see ``_Listener.on_ws_connected``): one shared empty view.
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def use_uvloop() -> bool:
    """Install uvloop's event loop policy when it is available; True if it was."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _close_code(value: Any) -> int:
    return int(getattr(value, "value", value))


class _Listener(picows.WSListener):  # type: ignore[misc]
    """Feeds one picows connection into a :class:`ServerConnection`, and is its control seam."""

    # One per connection for its whole life: slots instead of a __dict__.
    __slots__ = (
        "server",
        "context",
        "pending_auth",
        "connection",
        "fragments",
        "fragments_binary",
        "transport",
        "bucket",
        "forwarded_for",
        "address",
    )

    def __init__(self, server: "RealtimeServer", context: Any, pending_auth: Any, forwarded_for: Any = ()) -> None:
        super().__init__()
        self.server = server
        self.context = context
        self.pending_auth = pending_auth
        self.connection: Optional[ServerConnection] = None
        self.fragments: Optional[bytearray] = None
        self.fragments_binary = False
        # Set by on_ws_connected, before anything calls the seam methods below.
        self.transport: picows.WSTransport = None  # type: ignore[assignment]
        # Admission (admission.py): the message-rate bucket, the X-Forwarded-For
        # values until the peer is known, the address counted against its cap.
        self.bucket: Optional[TokenBucket] = None
        self.forwarded_for = forwarded_for
        self.address: Optional[str] = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        server = self.server
        self.transport = transport
        admission = server.admission
        if admission is not None and not self._admitted(admission, transport):
            return
        # picows keeps the upgrade request and the 101 response, headers and
        # all, for the connection's life (~2 KiB with a browser's headers).
        # Both are done with: the response is sent, and ``authenticate`` got
        # the request headers in an UpgradeRequest of its own.
        request, response = transport.request, transport.response
        if request is not None:
            request.headers, request.path = _NO_HEADERS, b""  # type: ignore[assignment]
        if response is not None:
            response.headers = _NO_HEADERS  # type: ignore[assignment]
        connection = ServerConnection(
            server._hub,
            self,
            transport.underlying_transport,
            context=self.context,
            authenticating=self.pending_auth is not None,
            websocket=transport,
        )
        self.connection = connection
        connection.opened()
        server._trimmer.schedule(transport)
        if self.pending_auth is not None:
            task = asyncio.ensure_future(server._finish_auth(connection, self.pending_auth))
            server._tasks.add(task)
            task.add_done_callback(server._tasks.discard)
            self.pending_auth = None
        else:
            server._watch_expiry(connection)

    def _admitted(self, admission: AdmissionPolicy, transport: picows.WSTransport) -> bool:
        """The per-address cap, now that the peer is known; sets up the rate limit."""
        self.bucket = admission.new_bucket()
        if not admission.max_connections_per_address:
            return True
        peer = transport.underlying_transport.get_extra_info("peername")
        address = admission.client_address(peer[0] if peer else None, self.forwarded_for)
        self.forwarded_for = ()
        if admission.admit(address):
            self.address = address
            return True
        self.server._events.emit("connection:refused", ConnectionRefusedEvent("address_cap", address))
        pending, self.pending_auth = self.pending_auth, None
        if pending is not None:
            # Never awaited now: close it so it does not warn.
            (getattr(pending, "close", None) or getattr(pending, "cancel", lambda: None))()  # type: ignore[misc]
        transport.send_close(CLOSE_POLICY_VIOLATION, b"too many connections from this address")  # type: ignore[arg-type]
        transport.disconnect()
        return False

    def _over_rate(self, connection: ServerConnection) -> bool:
        """Spend a token for one message; past the limit, error frame and close 1008."""
        if self.bucket.take():  # type: ignore[union-attr]
            return False
        connection.send_message(ErrorFrame(RATE_LIMITED_CODE, "message rate limit exceeded"))
        connection.close(CLOSE_POLICY_VIOLATION, "message rate limit exceeded")
        self.server._events.emit("connection:rate-limited", ConnectionRefusedEvent("rate", self.address, connection.id))
        return True

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        connection = self.connection
        if connection is None:
            return
        msg_type = frame.msg_type
        trimmer = self.server._trimmer
        if frame.payload_size >= GROWS_AT or not frame.last_in_buffer or transport in trimmer.skipped:
            # picows' read buffer may have grown for this read (or could not
            # be trimmed last time): give it back once read.
            trimmer.schedule(transport)
        if connection.is_closing or transport.is_close_frame_sent:
            # After a close frame (ours, or one picows sent for a framing
            # error it found, while it goes on parsing what was already on
            # the way) nothing is acted on or answered: only the peer's close
            # ends the handshake.
            connection.close_frame_sent()
            if msg_type == _CLOSE:
                transport.disconnect()
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # No extension is ever negotiated, so a reserved bit fails the connection (RFC 6455 §5.2).
            connection.close(1002, "reserved bits set")
            return
        if msg_type == _TEXT or msg_type == _BINARY:
            if self.fragments is not None:
                # A new message before the fragmented one finished (RFC 6455 §5.4).
                self.fragments = None
                connection.close(1002, "expected a continuation frame")
            elif frame.fin:
                if self.bucket is not None and self._over_rate(connection):
                    return
                connection.receive_message(frame.get_payload_as_bytes(), msg_type == _BINARY)
            else:
                self.fragments = bytearray(frame.get_payload_as_memoryview())
                self.fragments_binary = msg_type == _BINARY
        elif msg_type == _CONTINUATION:
            if self.fragments is None:
                connection.close(1002, "unexpected continuation frame")
                return
            self.fragments += frame.get_payload_as_memoryview()
            if len(self.fragments) > self.server.max_message_size:
                self.fragments = None
                connection.close(CLOSE_MESSAGE_TOO_BIG, "message too big")
                return
            if frame.fin:
                payload, self.fragments = bytes(self.fragments), None
                if self.bucket is not None and self._over_rate(connection):
                    return
                connection.receive_message(payload, self.fragments_binary)
        elif msg_type == _PING:
            # The connection decides (not picows' auto-pong): nothing may precede a 4002.
            connection.ping_received(frame.get_payload_as_bytes())
        elif msg_type == _PONG:
            connection.pong_received()
        elif msg_type == _CLOSE:
            payload = frame.get_payload_as_bytes()
            if not payload:
                # A close without a status code is answered with 1000.
                connection.close(CLOSE_NORMAL, "")
            else:
                code = _close_code(frame.get_close_code())
                if code in _VALID_CLOSE_CODES or 3000 <= code <= 4999:
                    connection.close(code, "")  # echo the peer's code (RFC 6455 §5.5.1)
                else:
                    connection.close(1002, "invalid close code")
            transport.disconnect()

    # The transport's buffer crossing its watermarks: the outbox measures the
    # buffer itself, so these are only acknowledged (else picows logs each).
    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.server._trimmer.skipped.discard(transport)
        if self.address is not None:
            self.server.admission.release(self.address)  # type: ignore[union-attr]
            self.address = None
        connection = self.connection
        if connection is None:
            return
        handshake = transport.close_handshake
        info = None
        if handshake is not None:
            info = handshake.recv or handshake.sent
        if info is not None:
            # picows reports a close frame without a status as code 0 and a
            # missing reason as None; the event says 1005 and "" (as ws does).
            connection.disconnected(_close_code(info.code) or CLOSE_NO_STATUS, info.reason or "")
        else:
            connection.disconnected(CLOSE_ABNORMAL, "")

    # the control seam of ServerConnection

    def send_close(self, code: int, reason: bytes) -> None:
        self.transport.send_close(code, reason)  # type: ignore[arg-type]  # 4xxx codes are plain ints

    def disconnect(self, graceful: bool = True) -> None:
        self.transport.disconnect(graceful)

    def send_ping(self) -> None:
        transport = self.transport
        if not (transport.is_close_frame_sent or transport.is_disconnected):
            transport.underlying_transport.write(_PING_FRAME)

    def send_pong(self, payload: bytes) -> None:
        # Nothing after a close frame, whoever sent it (a ping held during an
        # async authenticate is answered later, maybe after picows' own 1002).
        transport = self.transport
        if not (transport.is_close_frame_sent or transport.is_disconnected):
            # picows refuses a ping of over 125 bytes (1002), so the length fits the first byte.
            transport.underlying_transport.write(bytes((_PONG_OPCODE, len(payload))) + payload)

    def pause_reading(self) -> None:
        self.transport.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.underlying_transport.resume_reading()


@dataclass(frozen=True, slots=True)
class ConnectionRefusedEvent:
    """An upgrade or a connection refused by the admission controls (reason: origin, address_cap, rate)."""

    reason: str
    address: Optional[str]
    connection_id: Optional[str] = None


class RealtimeServer:
    """A running realtime server; see :func:`attach_realtime_server`.

    ``close()`` is idempotent; ``async with`` closes on exit.
    """

    def __init__(
        self,
        *,
        manager: Any,
        authenticate: Callable[[UpgradeRequest], Any],
        path: str,
        resolve_function: Optional[Callable[..., Any]],
        authorize_subscribe: Optional[Callable[..., Any]],
        authorize_propose: Optional[Callable[..., Any]],
        registry: ChannelRegistry,
        replay_store: ReplayStore,
        max_buffered_bytes: int,
        heartbeat_interval: Optional[float],
        max_message_size: int,
        close_on_token_expiry: bool,
        close_timeout: float,
        ssl: Optional[ssl_module.SSLContext] = None,
        backlog: int,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        admission: Optional[AdmissionPolicy] = None,
    ) -> None:
        self.manager = manager
        self.ssl = ssl
        self.authenticate = authenticate
        self.path = path
        self.registry = registry
        self.replay_store = replay_store
        self.heartbeat_interval = heartbeat_interval
        self.max_message_size = max_message_size
        self.close_on_token_expiry = close_on_token_expiry
        self.backlog = backlog
        self.admission = admission if admission is not None and admission.active else None
        self._events = EventEmitter()
        self._loop = asyncio.get_running_loop()
        self._hub = ServerHub(
            manager=manager,
            registry=registry,
            replay_store=replay_store,
            flusher=core.Flusher(self._loop),
            resolve_function=resolve_function,
            authorize_subscribe=authorize_subscribe,
            authorize_propose=authorize_propose,
            max_buffered_bytes=max_buffered_bytes,
            close_timeout=close_timeout,
            replay_timeout=replay_timeout,
            events=self._events,
        )
        self._server: Optional[asyncio.AbstractServer] = None
        self._heartbeat: Optional[asyncio.TimerHandle] = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._closing: Optional[asyncio.Future[None]] = None
        self._http_routes: dict[str, HttpHandler] = {}
        self._trimmer = BufferTrimmer(self._loop)
        self._accept_failures = AcceptFailureLog(logger, self._loop, lambda: len(self._hub.connections))
        self.host = ""
        self.port = 0

    # public surface

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "ws" if self.ssl is None else "wss"
        return f"{scheme}://{host}:{self.port}{self.path}"

    @property
    def connections(self) -> list[ServerConnection]:
        """The open connections (a snapshot)."""
        return list(self._hub.connections.values())

    def on(self, event: str, listener: Listener) -> Listener:
        """Listen to ``connection:opened|closed|overflow``, ``replay:write-failed|timeout``,
        ``connection:refused`` or ``connection:rate-limited`` (a :class:`ConnectionRefusedEvent`)."""
        return self._events.on(event, listener)

    def off(self, event: str, listener: Listener) -> None:
        self._events.off(event, listener)

    def add_http_route(self, path: str, handler: HttpHandler) -> None:
        """Answer plain ``GET`` requests to ``path`` (exact, query ignored) with ``handler``.

        Only requests that are not WebSocket upgrades reach it, and ``path``
        cannot be the WebSocket path. Health checks, metrics and the
        inspector page use this to share the WebSocket port. picows itself
        answers any other method with 400.
        """
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("path must be a string starting with '/'")
        if path == self.path:
            raise ValueError(f"{path!r} is the WebSocket path")
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._http_routes[path] = handler

    def remove_http_route(self, path: str) -> None:
        self._http_routes.pop(path, None)

    async def close(self, timeout: Optional[float] = None) -> None:
        """Stop listening, let proposals under way finish, close every connection with 1001.

        In that order: no new connection is accepted; proposals already
        being evaluated finish and are answered (their transactions are
        broadcast); then every client gets what is queued for it and a 1001
        close. ``timeout`` (default ``close_timeout``) bounds the whole of
        it; connections still open then are dropped.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = self._loop.create_future()
        try:
            self._closed = True
            deadline = self._loop.time() + (self._hub.close_timeout if timeout is None else timeout)
            if self._server is not None:
                self._server.close()
            self._accept_failures.close()
            while self._hub.proposals_in_flight and self._loop.time() < deadline:
                await asyncio.sleep(0.01)
            self._hub.detach()
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            for connection in self.connections:
                connection.close(CLOSE_GOING_AWAY, "server shutting down")
            self._hub.flusher.flush_all()
            while self._hub.connections and self._loop.time() < deadline:
                await asyncio.sleep(0.01)
            for connection in self.connections:
                connection.abort()
            for task in list(self._tasks):
                task.cancel()
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closing.set_result(None)

    async def __aenter__(self) -> "RealtimeServer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # internals

    async def _start(self, host: str, port: int, sock: Optional[socket.socket]) -> None:
        kwargs: dict[str, Any] = {}
        if sock is not None:
            kwargs["sock"] = sock
            host_arg, port_arg = None, None
        else:
            host_arg, port_arg = host, port
        self._server = await picows.ws_create_server(
            self._route,
            host_arg,
            port_arg,
            websocket_handshake_timeout=10,
            max_frame_size=self.max_message_size,
            read_buffer_init_size=READ_BUFFER_SIZE,
            # Pings are answered by the listener, which knows when a close frame went out.
            enable_auto_pong=False,
            logger_name=_PICOWS_LOGGER,
            # picows' default is aiofastnet's transport whenever aiofastnet
            # is installed (a picows dependency). It embeds a 4 KiB iovec
            # array: over 5 KiB per connection against ~1 KiB for the loop's
            # own (uvloop) transport, to which the core sends directly anyway.
            use_aiofastnet=False,
            # TLS on the listener itself (wss://); the core then writes through
            # the TLS transport, never straight to the socket.
            ssl=self.ssl,
            # Reaches listen() on both paths: the loop listens on a given
            # socket too (uvloop with its own 100 unless told otherwise).
            backlog=self.backlog,
            **kwargs,
        )
        listening = self._server.sockets[0]
        bound = listening.getsockname()
        self.host, self.port = bound[0], bound[1]
        self._accept_failures.watch(listening.fileno())
        self._hub.attach()
        if self.heartbeat_interval:
            self._heartbeat = self._loop.call_later(self.heartbeat_interval, self._beat)

    def _route(self, request: picows.WSUpgradeRequest) -> Any:
        """picows' listener factory: decides the upgrade synchronously."""
        # Every request first checks there is room for the next connection:
        # uvloop drops connections it cannot accept without a word.
        self._accept_failures.check_descriptors()
        if self._closed:
            return picows.WSUpgradeResponseWithListener(
                picows.WSUpgradeResponse.create_error_response(HTTPStatus.SERVICE_UNAVAILABLE), None
            )
        target = request.path.decode("latin-1")
        try:
            parts = urlsplit(target)
        except ValueError:  # e.g. "//[x/realtime": not a path of ours either
            return None  # 404
        headers = CIMultiDictProxy(request.headers)
        if parts.path != self.path or not is_websocket_upgrade(headers):
            return self._answer_http(parts.path, parts.query, target, headers)
        if headers.get("sec-websocket-version") != "13":
            # RFC 6455 §4.4: name the version we speak. (picows would also take 7 and 8.)
            return _upgrade_required()
        admission = self.admission
        if admission is not None and not admission.origin_allowed(headers):
            self._events.emit("connection:refused", ConnectionRefusedEvent("origin", None))
            return _forbidden()
        upgrade = UpgradeRequest(
            path=target,
            query=query_parameters(parts.query),
            headers=headers,
            remote_address=None,
        )
        try:
            context = self.authenticate(upgrade)
        except Exception:
            logger.debug("authenticate raised; answering 401", exc_info=True)
            return _unauthorized()
        forwarded_for = headers.getall("x-forwarded-for", ()) if admission is not None else ()
        if inspect.isawaitable(context):
            # picows cannot await here: upgrade now, hold frames until it resolves.
            return _Listener(self, None, context, forwarded_for)
        if not context:
            return _unauthorized()
        return _Listener(self, context, None, forwarded_for)

    def _answer_http(self, path: str, query: str, target: str, headers: Any) -> Any:
        """A request that is not an upgrade of the WebSocket path: a plain route, or 404."""
        handler = self._http_routes.get(path)
        if handler is None or is_websocket_upgrade(headers):
            # The WebSocket path asked for without an upgrade: say how to ask.
            return _upgrade_required() if path == self.path else None  # else 404
        plain = UpgradeRequest(path=target, query=query_parameters(query), headers=headers, remote_address=None)
        try:
            return to_picows_response(handler(plain))
        except Exception:
            logger.exception("HTTP handler for %s failed", path)
            return to_picows_response(HttpResponse(HTTPStatus.INTERNAL_SERVER_ERROR, b"500 Internal Server Error"))

    async def _finish_auth(self, connection: ServerConnection, pending: Any) -> None:
        try:
            context = await pending
        except Exception:
            logger.debug("async authenticate raised; closing with 4002", exc_info=True)
            context = None
        if connection.is_closing:
            return
        if not context:
            connection.close(CLOSE_UNAUTHORIZED, "unauthorized")
            return
        connection.authenticated(context)
        self._watch_expiry(connection)

    def _watch_expiry(self, connection: ServerConnection) -> None:
        if not self.close_on_token_expiry:
            return
        expires_at = getattr(connection.context, "expires_at", None)
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
            delay = max(0.0, float(expires_at) - time.time())
            connection.call_later(delay, lambda: connection.close(CLOSE_UNAUTHORIZED, "token expired"))

    def _beat(self) -> None:
        for connection in self.connections:
            connection.heartbeat()
        if not self._closed and self.heartbeat_interval:
            self._heartbeat = self._loop.call_later(self.heartbeat_interval, self._beat)


def _upgrade_required() -> Any:
    return picows.WSUpgradeResponseWithListener(
        picows.WSUpgradeResponse.create_error_response(
            HTTPStatus.UPGRADE_REQUIRED,
            b"426 Upgrade Required",
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
        ),
        None,
    )


def _forbidden() -> Any:
    return picows.WSUpgradeResponseWithListener(
        picows.WSUpgradeResponse.create_error_response(HTTPStatus.FORBIDDEN, b"403 Forbidden: origin not allowed"), None
    )


def _unauthorized() -> Any:
    return picows.WSUpgradeResponseWithListener(
        picows.WSUpgradeResponse.create_error_response(HTTPStatus.UNAUTHORIZED, b"401 Unauthorized"), None
    )


def _default_replay_store(manager: Any, replay_buffer_size: int) -> ReplayStore:
    """The stored history when the manager has a store (it survives restarts), else a ring in memory."""
    if getattr(manager, "store", None) is not None:
        from ..store.history import HistoryReplayStore

        return HistoryReplayStore(manager, replay_buffer_size)
    return InMemoryReplayStore(replay_buffer_size)


async def attach_realtime_server(
    *,
    manager: Any,
    authenticate: Callable[[UpgradeRequest], Any],
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/realtime",
    resolve_function: Optional[Callable[..., Any]] = None,
    authorize_subscribe: Optional[Callable[..., Any]] = None,
    authorize_propose: Optional[Callable[..., Any]] = None,
    registry: Optional[ChannelRegistry] = None,
    replay_store: Optional[ReplayStore] = None,
    replay_buffer_size: int = 100,
    max_buffered_bytes: int = 1024 * 1024,
    heartbeat_interval: Optional[float] = 30.0,
    max_message_size: int = 8 * 1024 * 1024,
    sock: Optional[socket.socket] = None,
    close_on_token_expiry: bool = True,
    close_timeout: float = 5.0,
    ssl: Optional[ssl_module.SSLContext] = None,
    backlog: Optional[int] = None,
    replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
    inspector: bool = False,
    allowed_origins: Optional[Iterable[str]] = None,
    max_messages_per_second: Optional[float] = None,
    message_burst: Optional[int] = None,
    max_connections_per_address: Optional[int] = None,
    trusted_proxies: Iterable[str] = (),
) -> RealtimeServer:
    """Start a SAFE realtime WebSocket server that broadcasts ``manager``'s events.

    ``authenticate(request)`` runs at every upgrade: a falsy result or an
    exception answers HTTP 401. A coroutine ``authenticate`` cannot be awaited
    inside picows' synchronous upgrade, so such connections upgrade first,
    process no frame until it resolves, and are closed with 4002 if it
    rejects. ``heartbeat_interval=None`` turns heartbeats off. When the
    context has a numeric ``expires_at`` (the JWT bridge's contexts do) and
    ``close_on_token_expiry`` is true, the connection is closed with 4002 at
    that time. ``close_timeout`` bounds how long a closing connection may take
    to answer the close handshake before it is dropped. ``ssl``, a server-side
    :class:`ssl.SSLContext`, serves ``wss://`` on the listener itself (without
    it, put TLS in front, at a proxy). ``backlog`` is the listen backlog
    (connections the kernel queues until they are accepted); None takes the
    system's ``somaxconn``. ``replay_timeout`` bounds how long a ``subscribe``
    with ``since`` waits for the replay store before it answers ``state`` and
    ``replay-cursor-not-found``. Without ``replay_store``, a manager with a
    store answers ``since`` from its stored history (the newest
    ``replay_buffer_size`` records), any other from an in-memory window of
    that size.
    ``inspector=True`` serves the browser inspector page at ``/`` (see
    ``safe_fast.inspector``).

    Admission controls (all off by default; see ``server/admission.py``):
    ``allowed_origins`` answers 403 to a browser upgrade from another
    ``Origin`` before ``authenticate`` runs; ``max_messages_per_second``
    (with ``message_burst``, default twice the rate) closes a connection
    that sends faster with an ``error`` frame and 1008;
    ``max_connections_per_address`` closes connections past that many from
    one client address with 1008, the address read from ``X-Forwarded-For``
    when the peer is in ``trusted_proxies`` (CIDRs).
    """
    if not callable(authenticate):
        raise TypeError("authenticate must be callable")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must be a string starting with '/'")
    for name, value in (("max_buffered_bytes", max_buffered_bytes), ("max_message_size", max_message_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int")
    if heartbeat_interval is not None and not heartbeat_interval > 0:
        raise ValueError("heartbeat_interval must be a positive number of seconds or None")
    if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext or None, got {type(ssl).__name__}")
    backlog = resolve_backlog(backlog)
    if isinstance(replay_timeout, bool) or not isinstance(replay_timeout, (int, float)) or not replay_timeout > 0:
        raise ValueError("replay_timeout must be a positive number of seconds")
    server = RealtimeServer(
        manager=manager,
        authenticate=authenticate,
        path=path,
        resolve_function=resolve_function,
        authorize_subscribe=authorize_subscribe,
        authorize_propose=authorize_propose,
        registry=registry if registry is not None else InMemoryChannelRegistry(),
        replay_store=replay_store if replay_store is not None else _default_replay_store(manager, replay_buffer_size),
        max_buffered_bytes=max_buffered_bytes,
        heartbeat_interval=heartbeat_interval,
        max_message_size=max_message_size,
        close_on_token_expiry=close_on_token_expiry,
        close_timeout=close_timeout,
        ssl=ssl,
        backlog=backlog,
        replay_timeout=replay_timeout,
        admission=AdmissionPolicy(
            allowed_origins=allowed_origins,
            max_messages_per_second=max_messages_per_second,
            message_burst=message_burst,
            max_connections_per_address=max_connections_per_address,
            trusted_proxies=trusted_proxies,
        ),
    )
    if inspector:
        from ..inspector import install_inspector

        install_inspector(server, authorize_subscribe=authorize_subscribe)
    await server._start(host, port, sock)
    return server
