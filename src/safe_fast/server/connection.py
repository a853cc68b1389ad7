"""The server's connection protocol, free of sockets.

Theory of operation
-------------------

There are two kinds of object here.

:class:`ServerHub` is the server-wide part: the manager, the hooks, the
registry, the replay store, the observability events, and the broadcast path
(manager event -> replay record -> one encoded frame -> every subscriber).

:class:`ServerConnection` is one client. It takes complete WebSocket messages
in (:meth:`ServerConnection.receive_message`) and decides everything the
protocol says about them: which frames to send, which hooks to call, when to
close and with which code. Its output goes to two small seams that the picows
adapter (``server.py``) fills in and that tests fill with recording objects:

* the *write transport* (``write``, ``get_write_buffer_size``,
  ``is_closing``) that the compiled :class:`~safe_fast._core.Outbox` it
  inherits from writes coalesced frames to;
* the *control* object (``send_close(code, reason)``, ``disconnect()``,
  ``send_ping()``, ``send_pong(payload)``, ``pause_reading()``,
  ``resume_reading()``) for WebSocket control frames and flow control.

A connection is in one of these states::

    AUTHENTICATING --context ok--> OPEN --close()/peer close--> CLOSING --> CLOSED
          |                          ^                                    ^
          +--rejected (4002)---------|------------------------------------+
                                     (disconnect from any state -> CLOSED)

Messages are handled strictly in arrival order. Ping and unsubscribe, which
call no hook, are answered inline when nothing is pending. Everything else
(and everything while something is pending) goes through a FIFO drained by
one task per busy connection, so an ``async`` hook delays only its own
connection, and an idle connection owns no task. When the FIFO holds
:data:`MAX_PENDING_MESSAGES`, the connection stops reading its socket until
half of them are handled, so a pipelining client is slowed down by TCP
rather than closed, and memory stays bounded.

From the moment a close frame is decided (by this object, or by the
WebSocket layer for a framing error it found: :meth:`close_frame_sent`),
nothing else is sent and nothing received is acted on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from .._backend import core
from .._events import EventEmitter
from ..messages import (
    CLOSE_FELL_BEHIND,
    CLOSE_INVALID_MESSAGE,
    CLOSE_REASONS,
    CLOSE_UNKNOWN_SHARE_DATA,
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
    json_rendering,
    parse_client_message,
)
from ..registry import ChannelRegistry
from ..sharedata import RuleError
from ..replay import ReplayEntry, ReplayStore

__all__ = [
    "ServerHub",
    "ServerConnection",
    "ConnectionOpenedEvent",
    "ConnectionClosedEvent",
    "ConnectionOverflowEvent",
    "ReplayWriteFailedEvent",
    "ReplayTimeoutEvent",
    "DEFAULT_REPLAY_TIMEOUT",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_TEXT",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_MESSAGE_TOO_BIG",
]

logger = logging.getLogger("safe_fast.server")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_TEXT = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

MAX_PENDING_MESSAGES = 1024
"""Messages a connection may have waiting before the server stops reading its socket.

Reading resumes once half of them are handled: a client that sends faster
than its hooks answer is slowed down by TCP, never closed, and every message
is answered in order."""

DEFAULT_REPLAY_TIMEOUT = 0.25
"""Seconds a ``subscribe`` with ``since`` waits for the replay store before it resyncs the client."""


# -- observability events ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionOpenedEvent:
    connection_id: str
    context: Any


@dataclass(frozen=True, slots=True)
class ConnectionClosedEvent:
    connection_id: str
    code: int
    reason: str
    context: Any


@dataclass(frozen=True, slots=True)
class ConnectionOverflowEvent:
    connection_id: str
    buffered_amount: int
    max_buffered_bytes: int
    context: Any


@dataclass(frozen=True, slots=True)
class ReplayWriteFailedEvent:
    share_data_id: str
    operation: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class ReplayTimeoutEvent:
    """A ``subscribe`` with ``since`` gave up waiting for the replay store."""

    connection_id: str
    share_data_id: str
    since: str
    timeout: float


def _with_rendered_state(message: Any, share_data_id: str, error: EncodeError) -> Any:
    """``message`` with its ``current_state`` replaced by what JSON can carry of it."""
    try:
        rendered = json_rendering(message.current_state)
        how = "sending its JSON rendering"
    except EncodeError:
        rendered = None
        how = "sending null"
    logger.error("state in a %s frame for %r cannot be encoded (%s); %s", message.type, share_data_id, error, how)
    return dataclasses.replace(message, current_state=rendered)


def _error_text(exc: BaseException) -> str:
    # KeyError quotes its message; the wire wants the words themselves.
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# -- the server-wide part ------------------------------------------------------------


class ServerHub:
    """Everything the connections of one server share, and the broadcast path."""

    def __init__(
        self,
        *,
        manager: Any,
        registry: ChannelRegistry,
        replay_store: ReplayStore,
        flusher: Any,
        resolve_function: Optional[Callable[..., Any]] = None,
        authorize_subscribe: Optional[Callable[..., Any]] = None,
        authorize_propose: Optional[Callable[..., Any]] = None,
        max_buffered_bytes: int = 1024 * 1024,
        close_timeout: float = 5.0,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        events: Optional[EventEmitter] = None,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.replay_store = replay_store
        self.flusher = flusher
        self.resolve_function = resolve_function
        self.authorize_subscribe = authorize_subscribe
        self.authorize_propose = authorize_propose
        self.max_buffered_bytes = max_buffered_bytes
        self.close_timeout = close_timeout
        self.replay_timeout = replay_timeout
        self.events = events if events is not None else EventEmitter()
        self.connections: dict[str, ServerConnection] = {}
        self._attached = False
        self._remove_channel = getattr(registry, "remove_channel", None)
        # A registry of this process alone (``shared = False``): a change
        # another node made reaches this node's subscribers only through us.
        self._local_registry = getattr(registry, "shared", True) is False
        # Asynchronous replay-store writes still under way, per ShareData id:
        # a replay reads the window only once they have landed.
        self._pending_writes: dict[str, set[asyncio.Future[Any]]] = {}
        # The hash of the last transaction recorded per ShareData id: a
        # wholesale replacement whose history does not end with it has a
        # history of its own, and the window of the old one must go.
        self._recorded: dict[str, str] = {}
        # Observation seams (the metrics fill them; None costs one test):
        # propose_observer(outcome, seconds) after each proposal,
        # send_observer(frame_bytes) for each frame queued to one connection.
        self.proposals_in_flight = 0
        self.propose_observer: Optional[Callable[[str, float], None]] = None
        self.send_observer: Optional[Callable[[int], None]] = None
        # A manager with a store is read through before every snapshot.
        self._refresh = manager.refresh if getattr(manager, "store", None) is not None else None

    # manager wiring

    def attach(self) -> None:
        if not self._attached:
            self._attached = True
            self.manager.on("share-data:transaction", self._on_transaction)
            self.manager.on("share-data:updated", self._on_updated)
            self.manager.on("share-data:removed", self._on_removed)

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            self.manager.off("share-data:transaction", self._on_transaction)
            self.manager.off("share-data:updated", self._on_updated)
            self.manager.off("share-data:removed", self._on_removed)

    # the broadcast path

    def _on_transaction(self, event: Any) -> None:
        share_data_id = event.share_data_id
        history = event.share_data.transaction_history if event.share_data is not None else None
        if history:
            self._recorded[share_data_id] = history[-1].hash
        # Recorded before the broadcast, so a subscriber that resumes from the
        # id it just received finds it in the window.
        self._store_call("record", share_data_id, ReplayEntry(event.transaction_id, event.accepted))
        self.broadcast(
            share_data_id,
            TransactionFrame(share_data_id, event.transaction_id, event.accepted, event.current_state),
        )

    def _on_updated(self, event: Any) -> None:
        share_data_id = event.share_data_id
        if getattr(event, "remote", False):
            # Another node replaced it and broadcast `lifecycle updated`
            # itself, through a shared registry; through this process's own
            # registry only this node can tell its subscribers.
            self._recorded.pop(share_data_id, None)
            if self._local_registry:
                self.broadcast(share_data_id, LifecycleFrame(share_data_id, "updated", event.current_state))
            return
        recorded = self._recorded.get(share_data_id)
        share_data = event.share_data
        history = share_data.transaction_history if share_data is not None else None
        if recorded is not None and (not history or history[-1].hash != recorded):
            # Replaced by a ShareData with its own history: a cursor into the
            # old one must not be resumed against the new ids.
            del self._recorded[share_data_id]
            self._store_call("forget", share_data_id)
        self.broadcast(share_data_id, LifecycleFrame(share_data_id, "updated", event.current_state))

    def _on_removed(self, event: Any) -> None:
        share_data_id = event.share_data_id
        self._recorded.pop(share_data_id, None)
        if getattr(event, "remote", False) and not self._local_registry:
            # Another node removed it and broadcast `lifecycle removed`; the
            # frame is on its way through the shared registry: drop this
            # node's subscribers once it had time to reach them.
            self.flusher.loop.call_later(REMOTE_REMOVAL_GRACE, self._drop_removed_channel, share_data_id)
            return
        self._store_call("forget", share_data_id)
        self.broadcast(share_data_id, LifecycleFrame(share_data_id, "removed"))
        self._drop_removed_channel(share_data_id)

    def _drop_removed_channel(self, share_data_id: str) -> None:
        if self.manager.get_share_data_by_id(share_data_id) is not None:
            return  # registered again meanwhile: its subscribers are new ones
        # Terminal: nobody stays subscribed to a ShareData that is gone.
        remove_channel = self._remove_channel
        for connection in list(self.connections.values()):
            if share_data_id in connection.subscriptions:
                connection.subscriptions.discard(share_data_id)
                if remove_channel is None:
                    # A registry without the optional remove_channel must still
                    # forget them, or it keeps delivering to them (and leaks them).
                    self._run_hook(self.registry.unsubscribe(share_data_id, connection), "registry.unsubscribe")
        if remove_channel is not None:
            self._run_hook(remove_channel(share_data_id), "registry.remove_channel")

    async def refresh(self, share_data_id: str) -> None:
        """Read ``share_data_id`` through from the manager's store (no-op without one).

        A store that cannot answer within ``READ_THROUGH_TIMEOUT`` leaves the
        cached copy in use (logged): a snapshot that may lag behind other
        nodes beats a subscribe held up by a database that is away.
        """
        if self._refresh is None:
            return
        try:
            await asyncio.wait_for(self._refresh(share_data_id), READ_THROUGH_TIMEOUT)
        except Exception as exc:
            logger.warning("reading %r from the store failed; answering from the cached copy: %r", share_data_id, exc)

    def broadcast(self, share_data_id: str, message: ServerMessage) -> None:
        """Hand ``message`` to the registry; never raises into the manager."""
        try:
            try:
                result = self.registry.broadcast(share_data_id, message)
            except EncodeError as exc:
                # Skipping the frame would hide a change from every subscriber
                # (and leave a gap in their transaction ids): send the state
                # as JSON can carry it instead.
                result = self.registry.broadcast(share_data_id, _with_rendered_state(message, share_data_id, exc))
        except Exception:
            logger.exception("registry.broadcast failed for %r", share_data_id)
            return
        self._run_hook(result, "registry.broadcast")

    def _store_call(self, operation: str, share_data_id: str, *args: Any) -> None:
        try:
            result = getattr(self.replay_store, operation)(share_data_id, *args)
        except Exception as exc:
            self._replay_failed(share_data_id, operation, exc)
            return
        if result is not None and inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            pending = self._pending_writes.setdefault(share_data_id, set())
            pending.add(task)

            def done(t: asyncio.Future[Any]) -> None:
                pending.discard(t)
                if not pending and self._pending_writes.get(share_data_id) is pending:
                    del self._pending_writes[share_data_id]
                error = None if t.cancelled() else t.exception()
                if error is not None:
                    self._replay_failed(share_data_id, operation, error)

            task.add_done_callback(done)

    async def writes_landed(self, share_data_id: str) -> None:
        """Return once every replay-store write issued so far for ``share_data_id`` has finished.

        Failures are reported by the writes themselves (``replay:write-failed``);
        the caller bounds the wait (see :meth:`replay_after`).
        """
        pending = self._pending_writes.get(share_data_id)
        if pending:
            await asyncio.wait(list(pending))

    async def replay_after(self, connection_id: str, share_data_id: str, since: str) -> Optional[list[ReplayEntry]]:
        """The replay window after ``since``: None when not found, failed, or not read in time.

        The writes under way for the id land first, so a client resuming from
        the id it just received finds it. Both waits together are bounded by
        ``replay_timeout``: a store that does not answer (Redis away) must not
        hold the ``state`` frame back; past the bound the client is resynced
        from the snapshot and ``replay:timeout`` is emitted.
        """
        try:
            if share_data_id not in self._pending_writes:
                found = self.replay_store.entries_since(share_data_id, since)
                if not inspect.isawaitable(found):
                    return None if found is None else list(found)  # a synchronous store: no wait at all
                found = await asyncio.wait_for(found, self.replay_timeout)
            else:
                found = await asyncio.wait_for(self._landed_then_read(share_data_id, since), self.replay_timeout)
        except asyncio.TimeoutError:
            logger.warning(
                "replay store did not answer within %gs for %r since=%r; resyncing the client",
                self.replay_timeout, share_data_id, since,
            )  # fmt: skip
            self.events.emit(
                "replay:timeout", ReplayTimeoutEvent(connection_id, share_data_id, since, self.replay_timeout)
            )
            return None
        except Exception as exc:
            logger.warning("replay store entries_since failed for %r: %r", share_data_id, exc)
            return None
        return None if found is None else list(found)  # type: ignore[arg-type]

    async def _landed_then_read(self, share_data_id: str, since: str) -> Any:
        await self.writes_landed(share_data_id)
        return await _resolve(self.replay_store.entries_since(share_data_id, since))

    def _replay_failed(self, share_data_id: str, operation: str, error: BaseException) -> None:
        logger.warning("replay store %s failed for %r: %r", operation, share_data_id, error)
        self.events.emit("replay:write-failed", ReplayWriteFailedEvent(share_data_id, operation, error))

    async def run_proposal(self, proposal: Awaitable[str]) -> None:
        """Run one proposal to its end, counted in flight (a graceful close waits for them)."""
        self.proposals_in_flight += 1
        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = await proposal
        finally:
            self.proposals_in_flight -= 1
            if self.propose_observer is not None:
                self.propose_observer(outcome, time.perf_counter() - started)

    @staticmethod
    def _run_hook(result: Any, what: str) -> None:
        # Most hooks are synchronous and return None: skip the awaitable check.
        if result is not None and inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(
                lambda t: None
                if t.cancelled() or t.exception() is None
                else logger.error("%s failed", what, exc_info=t.exception())
            )


READ_THROUGH_TIMEOUT = 2.0
"""Seconds a subscribe waits for the store's copy of the id before it answers from the cache."""

REMOTE_REMOVAL_GRACE = 2.0
"""Seconds this node's subscribers of an id another node removed stay
registered, for that node's `lifecycle removed` frame to reach them."""


def _through_snapshot(entries: list[ReplayEntry], since: str, share_data: Any) -> list[ReplayEntry]:
    """The replay window read before the snapshot, completed up to it.

    Transactions recorded on this node after the window was read are in the
    snapshot and were never sent live to this connection; they come from the
    ShareData's own history (ids are positions in it). A window ahead of that
    history (another node's, or a replaced ShareData) is left as it is.
    """
    last = entries[-1].transaction_id if entries else since
    history = share_data.transaction_history
    try:
        start = int(last)
    except ValueError:
        return entries
    if not 0 < start <= len(history) or history[start - 1].transaction_id != last:
        return entries
    return entries + [ReplayEntry(record.transaction_id, record.accepted) for record in history[start:]]


# -- one connection --------------------------------------------------------------------

_AUTHENTICATING, _OPEN, _CLOSING, _CLOSED = range(4)


class ServerConnection(core.Outbox):
    """One client connection: protocol decisions plus its coalescing outbox."""

    # One per client for its whole life: slots instead of a __dict__ (~0.3 KiB
    # less per idle connection). An attribute a method sets must be listed here.
    __slots__ = (
        "hub",
        "control",
        "id",
        "context",
        "subscriptions",
        "awaiting_pong",
        "close_code",
        "close_reason",
        "_state",
        "_announced",
        "_inbox",
        "_worker",
        "_timers",
        "_reading_paused",
        "_held_ping",
    )

    def __init__(
        self,
        hub: ServerHub,
        control: Any,
        write_transport: Any,
        *,
        context: Any = None,
        authenticating: bool = False,
        connection_id: Optional[str] = None,
        websocket: Any = None,
    ) -> None:
        # ``websocket``: the WebSocket layer's transport, when it can send a
        # close frame on its own (see close_frame_sent); the outbox writes
        # nothing once it has.
        super().__init__(write_transport, hub.flusher, hub.max_buffered_bytes, websocket)
        self.hub = hub
        self.control = control
        self.id = connection_id or str(uuid.uuid4())
        self.context = context
        self.subscriptions: set[str] = set()
        self.awaiting_pong = False
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._state = _AUTHENTICATING if authenticating else _OPEN
        # Whether ``connection:opened`` was emitted: ``connection:closed`` pairs with it.
        self._announced = False
        # Both created on first use and the inbox dropped once drained: an idle
        # connection holds neither (an empty deque alone is ~0.75 KiB).
        self._inbox: Optional[deque[tuple[bytes, bool]]] = None
        self._worker: Optional[asyncio.Task[None]] = None
        # Whether this connection stopped reading its socket (FIFO full).
        self._reading_paused = False
        # The payload of a WebSocket ping that came while authenticating: it is
        # answered once the connection opens (nothing may precede a 4002).
        self._held_ping: Optional[bytes] = None
        self._timers: Optional[list[asyncio.TimerHandle]] = None

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id}>"

    # Outbox protocol

    def send_message(self, message: ServerMessage) -> bool:
        """Encode and queue one message for this connection only."""
        frame = core.encode_frame(encode_message(message))
        if self.hub.send_observer is None:
            return self.send_frame(frame)
        sent = self.send_frame(frame)
        if sent:
            self.hub.send_observer(len(frame))
        return sent

    def on_overflow(self, buffered_amount: int) -> None:
        self.hub.events.emit(
            "connection:overflow",
            ConnectionOverflowEvent(self.id, buffered_amount, self.max_buffered_bytes, self.context),
        )
        # The frame is dropped; what is queued would only deepen the backlog.
        self.close(CLOSE_FELL_BEHIND, CLOSE_REASONS[CLOSE_FELL_BEHIND], flush=False)

    # lifecycle

    @property
    def is_authenticating(self) -> bool:
        return self._state == _AUTHENTICATING

    @property
    def is_closing(self) -> bool:
        return self._state >= _CLOSING

    def opened(self) -> None:
        """The upgrade completed (and, for an async ``authenticate``, resolved)."""
        self.hub.connections[self.id] = self
        if self._state == _AUTHENTICATING:
            return
        self._announced = True
        self.hub.events.emit("connection:opened", ConnectionOpenedEvent(self.id, self.context))

    def authenticated(self, context: Any) -> None:
        """An async ``authenticate`` accepted: process what arrived meanwhile."""
        if self._state != _AUTHENTICATING:
            return
        self.context = context
        self._state = _OPEN
        self._announced = True
        self.hub.events.emit("connection:opened", ConnectionOpenedEvent(self.id, self.context))
        if self._held_ping is not None:
            self.ping_received(self._held_ping)
            self._held_ping = None
        self._ensure_worker()

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Send a close frame, stop taking frames; disconnect on the peer's reply or a timeout."""
        if self._state >= _CLOSING:
            return
        self._stop(flush)
        try:
            self.control.send_close(code, reason.encode())
        except Exception:
            logger.debug("send_close failed on %s", self.id, exc_info=True)

    def close_frame_sent(self) -> None:
        """The WebSocket layer sent a close frame itself (a framing error it found).

        From then on, as after :meth:`close`, nothing is sent and nothing
        received is acted on.
        """
        if self._state < _CLOSING:
            self._stop(flush=False)

    def _stop(self, flush: bool, *, handshake: bool = True) -> None:
        # Everything that must hold from the moment a close frame is decided
        # (or the connection dropped): no queued message runs, no live frame
        # is sent, no channel delivers.
        self._state = _CLOSING
        self._inbox = None
        self._held_ping = None
        self.close_outbox(flush)
        self._leave_channels()
        if handshake:
            self._resume_reading()  # the peer's close frame must still be read
            self.call_later(self.hub.close_timeout, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (a peer that does not answer); nothing is sent on it after."""
        if self._state < _CLOSING:
            self._stop(flush=False, handshake=False)
        try:
            self.control.disconnect(False)
        except Exception:
            logger.debug("disconnect failed on %s", self.id, exc_info=True)

    def disconnected(self, code: int, reason: str) -> None:
        """The transport is gone: forget the connection everywhere."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self.close_code, self.close_reason = code, reason
        self._inbox = None
        self.close_outbox(False)
        if self._timers is not None:
            for timer in self._timers:
                timer.cancel()
            self._timers = None
        self._leave_channels()
        self.hub.connections.pop(self.id, None)
        if self._announced:
            # A connection whose async ``authenticate`` rejected it never opened.
            self.hub.events.emit("connection:closed", ConnectionClosedEvent(self.id, code, reason, self.context))

    def call_later(self, delay: float, callback: Callable[[], Any]) -> None:
        timer = self.hub.flusher.loop.call_later(delay, callback)
        if self._timers is None:
            self._timers = [timer]
        else:
            self._timers.append(timer)

    def _leave_channels(self) -> None:
        if self.subscriptions:
            # The registry may read ``subscriptions`` (then cleared) to find the channels.
            result = self.hub.registry.remove_connection(self)
            self.subscriptions.clear()
            self.hub._run_hook(result, "registry.remove_connection")

    # incoming

    def receive_message(self, payload: bytes, binary: bool = False) -> None:
        """One complete WebSocket data message from the peer."""
        if self._state >= _CLOSING:
            return  # frames after a close are ignored
        if self._worker is None and self._state == _OPEN:
            try:
                message = parse_client_message(payload)
            except InvalidMessage as exc:
                self._reject(exc, binary)
                return
            if isinstance(message, Ping):
                self.send_message(PongFrame(message.correlation_id))
                return
            if isinstance(message, Unsubscribe):
                self._unsubscribe(message)
                return
            self._enqueue(payload, binary)
            self._ensure_worker()
            return
        self._enqueue(payload, binary)
        if self._state == _OPEN:
            self._ensure_worker()

    def _enqueue(self, payload: bytes, binary: bool) -> None:
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append((payload, binary))
        if len(self._inbox) >= MAX_PENDING_MESSAGES and not self._reading_paused:
            # Enough waiting: let TCP hold the rest (what the current socket
            # read already delivered still arrives, so the FIFO stays bounded).
            self._reading_paused = True
            self.control.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            try:
                self.control.resume_reading()
            except Exception:
                logger.debug("resume_reading failed on %s", self.id, exc_info=True)

    def ping_received(self, payload: bytes) -> None:
        """A WebSocket ping: answered while open, held while authenticating, dropped after a close frame."""
        if self._state == _OPEN:
            self.control.send_pong(payload)
        elif self._state == _AUTHENTICATING:
            self._held_ping = payload

    def _ensure_worker(self) -> None:
        if self._worker is None and self._inbox:
            self._worker = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._inbox and self._state == _OPEN:
                payload, binary = self._inbox.popleft()
                if self._reading_paused and len(self._inbox) <= MAX_PENDING_MESSAGES // 2:
                    self._resume_reading()
                try:
                    await self._handle(payload, binary)
                except Exception:
                    logger.exception("unexpected failure handling a message on %s", self.id)
        finally:
            self._worker = None
            if not self._inbox:
                self._inbox = None

    async def _handle(self, payload: bytes, binary: bool) -> None:
        try:
            message = parse_client_message(payload)
        except InvalidMessage as exc:
            self._reject(exc, binary)
            return
        if isinstance(message, Subscribe):
            await self._subscribe(message)
        elif isinstance(message, Propose):
            await self.hub.run_proposal(self._propose(message))
        elif isinstance(message, Ping):
            self.send_message(PongFrame(message.correlation_id))
        else:
            self._unsubscribe(message)

    def _reject(self, exc: InvalidMessage, binary: bool) -> None:
        if not binary and exc.problems == ["message: not valid UTF-8"]:
            # Invalid UTF-8 in a text frame is a WebSocket-level error (RFC 6455 §8.1).
            self.close(CLOSE_INVALID_TEXT, "invalid UTF-8")
            return
        self.send_message(ErrorFrame("invalid-message", str(exc)))
        self.close(CLOSE_INVALID_MESSAGE, CLOSE_REASONS[CLOSE_INVALID_MESSAGE])

    # the four messages

    def _unsubscribe(self, message: Unsubscribe) -> None:
        share_data_id = message.share_data_id
        if share_data_id in self.subscriptions:
            self.subscriptions.discard(share_data_id)
            self.hub._run_hook(self.hub.registry.unsubscribe(share_data_id, self), "registry.unsubscribe")

    async def _subscribe(self, message: Subscribe) -> None:
        hub = self.hub
        share_data_id = message.share_data_id
        if hub.manager.get_share_data_by_id(share_data_id) is None:
            self.send_message(ErrorFrame("unknown-share-data", f"shareDataId {share_data_id} not found"))
            self.close(CLOSE_UNKNOWN_SHARE_DATA, CLOSE_REASONS[CLOSE_UNKNOWN_SHARE_DATA])
            return
        if hub.authorize_subscribe is not None:
            try:
                allowed = await _resolve(hub.authorize_subscribe(self.context, share_data_id))
            except Exception as exc:
                self.send_message(ErrorFrame("unauthorized-subscribe", f"authorizer threw: {_error_text(exc)}"))
                return
            if not allowed:
                self.send_message(
                    ErrorFrame("unauthorized-subscribe", f"not authorized to subscribe to {share_data_id}")
                )
                return
        # Rule 3 of a shared store: the snapshot holds every commit
        # acknowledged anywhere before this subscribe.
        await hub.refresh(share_data_id)
        if self._state != _OPEN:
            return
        since = message.since  # "" means no cursor
        entries: Optional[list[ReplayEntry]] = None
        if since:
            # The window is read before registering: once registered, live
            # frames flow, and they must come after the replay, never before
            # it or twice.
            entries = await hub.replay_after(self.id, share_data_id, since)
            if self._state != _OPEN:
                return
        # Read the ShareData again: the awaits above may have let it change.
        share_data = hub.manager.get_share_data_by_id(share_data_id)
        if share_data is None:
            self.send_message(ErrorFrame("unknown-share-data", f"shareDataId {share_data_id} not found"))
            self.close(CLOSE_UNKNOWN_SHARE_DATA, CLOSE_REASONS[CLOSE_UNKNOWN_SHARE_DATA])
            return
        # Register, snapshot and replay with no await in between: every later
        # transaction reaches this connection live, every earlier one is in
        # the snapshot (and, after the cursor, in the replay).
        # Registered again when already subscribed: a registry may track when
        # a subscriber's snapshot was taken (the Redis one does).
        # The ShareData's own id string is kept, not the message's copy: one
        # object for every subscriber.
        share_data_id = share_data.id
        self.subscriptions.add(share_data_id)
        registered = hub.registry.subscribe(share_data_id, self)
        snapshot = StateFrame(share_data_id, share_data.current_state, share_data.last_transaction_id)
        try:
            sent = self.send_message(snapshot)
        except EncodeError as exc:
            sent = self.send_message(_with_rendered_state(snapshot, share_data_id, exc))
        if sent and since:
            if entries is None:
                self.send_message(
                    ErrorFrame(
                        "replay-cursor-not-found",
                        f"since={since} not present in retained replay window; skipping replay",
                    )
                )
            else:
                for entry in _through_snapshot(entries, since, share_data):
                    self.send_message(
                        TransactionFrame(share_data_id, entry.transaction_id, entry.accepted, replayed=True)
                    )
        if inspect.isawaitable(registered):
            await registered

    async def _propose(self, message: Propose) -> str:
        """Answer one proposal; returns its outcome for the metrics: accepted, rejected or error (a hook raised)."""
        hub = self.hub
        share_data_id, function_id = message.share_data_id, message.function_id

        def reject(error: str, outcome: str = "rejected") -> str:
            self.send_message(ProposalResultFrame(message.correlation_id, False, error=error))
            return outcome

        if hub.manager.get_share_data_by_id(share_data_id) is None:
            return reject(f"shareDataId {share_data_id} not found")
        if hub.authorize_propose is not None:
            try:
                allowed = await _resolve(hub.authorize_propose(self.context, share_data_id, function_id))
            except Exception as exc:
                return reject(f"unauthorized-propose: {_error_text(exc)}", "error")
            if not allowed:
                return reject(f"unauthorized-propose: not allowed to invoke {function_id} on {share_data_id}")
        if hub.resolve_function is None:
            return reject("propose is not enabled on this server (no resolveFunction configured)")
        try:
            function = await _resolve(hub.resolve_function(share_data_id, function_id))
        except Exception as exc:
            return reject(f"resolveFunction threw: {_error_text(exc)}", "error")
        if not function:
            return reject(f"unknown functionId {function_id} for shareDataId {share_data_id}")
        try:
            outcome = await hub.manager.apply_transaction(
                share_data_id, message.proposed_data, function, message.proof
            )
        except RuleError as exc:
            # The rule's own words, as the reference server sends them; the
            # RuleError wrapper is for Python callers.
            return reject(_error_text(exc.__cause__ if exc.__cause__ is not None else exc), "error")
        except Exception as exc:
            return reject(_error_text(exc), "error")
        # The transaction frame reaches subscribers through the manager event.
        self.send_message(
            ProposalResultFrame(message.correlation_id, outcome.accepted, transaction_id=outcome.transaction_id)
        )
        return "accepted" if outcome.accepted else "rejected"

    # liveness

    def heartbeat(self) -> None:
        """One heartbeat tick: ping, or terminate if the last ping went unanswered."""
        websocket = self.websocket
        if websocket is not None and websocket.is_close_frame_sent:
            # The WebSocket layer closed it and nothing flushed since to notice.
            self.close_frame_sent()
        if self._state >= _CLOSING:
            return
        # While this server is not reading the socket, the pong may be waiting in it.
        if self.awaiting_pong and not self._reading_paused:
            logger.info("connection %s missed a heartbeat; terminating", self.id)
            self.abort()
            return
        self.awaiting_pong = True
        try:
            self.control.send_ping()
        except Exception:
            self.abort()

    def pong_received(self) -> None:
        self.awaiting_pong = False
