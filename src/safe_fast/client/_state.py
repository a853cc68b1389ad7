"""The realtime client's decisions, without I/O.

Rules of this module:

* No sockets, no timers, no event loop. Time comes in as ``now`` arguments
  (seconds on any monotonic clock); bytes to write go out through
  :meth:`ClientProtocol.data_to_send`; events go out through the ``emit``
  callback given at construction; reconnects go out as a :class:`Decision`.
  The picows adapter (``client.py``) only moves bytes and runs timers, and
  the tests drive this module directly, in memory.
* Nothing here raises because of what the server sent. Bad input is
  reported on ``error`` and skipped; only the caller's own mistakes (a
  request on a closed client, a full queue, data that cannot be JSON) raise,
  synchronously, from the call that made them.

Theory of operation
-------------------

There are really four small machines in here, which is why the class is
worth reading as a whole.

1. **The connection machine** (``state``) says whether frames can be sent.
   A *run* starts with ``connect()`` and lasts until the client stops; within
   a run, each lost connection leads either to another attempt (after a delay
   the backoff computes) or to the end of the run. The first connection of a
   run is special: if it cannot be made, ``connect()`` raises that failure and
   the run ends at once, rather than retrying in the background behind the
   caller's back (a known weakness of the reference client after a 401).
   ``close()`` ends the run for good: it is *sticky*.

2. **The close-code policy** (:data:`CLOSE_POLICIES`) decides what a lost
   connection means. The reference client treats every close alike and
   resets its attempt counter on every open, so a server that accepts and
   then closes at once (e.g. on a subscribe to a missing id, 4003) gets
   reconnects forever at the minimum delay. Here the close code steers: 4001
   (fell behind) resumes at once from the cursors; 4003 drops the
   subscription that caused it and reconnects for the others; 4002 (and an
   HTTP 401 at the upgrade) stops the client, since a fixed token will not get
   better, unless the token is a callable that can fetch a fresh one; 4004
   is reported and retried with backoff. The attempt counter resets only
   after a connection stayed open for ``stable_after`` seconds, so "at once"
   can only happen once in a row: a server that keeps closing at once meets
   growing delays.

3. **Requests** (``propose``, ``ping``) are correlated by ids ``c-1``,
   ``c-2``, ... . A request made while the connection is not open waits in a
   bounded FIFO queue (:class:`QueueFull` beyond ``max_queue_size``) and is
   sent, in order, right after the resubscribes of the next open. Once sent
   it is *in flight*; when the connection is lost, every in-flight request
   fails with :class:`ConnectionClosed` and is never re-sent (the server may
   have applied it). The timeout is armed by the adapter at the call and
   comes back here as :meth:`ClientProtocol.request_timed_out`, wherever the
   request then is.

4. **Subscriptions** live across connections. On every open each live one
   is subscribed again with ``since`` = its cursor, so the server replays
   what was missed; the cursor rules themselves are in ``subscription.py``.
   Per connection we remember which subscribes still await their ``state``
   (in send order): the server answers subscribes strictly in order and
   closes with 4003 at the first unknown id, so the culprit of a 4003 is the
   id named by the server's preceding ``unknown-share-data`` error frame, or
   failing that, the *first* subscribe still awaiting its state. A live
   ``transaction`` frame that skips ahead of the cursor (gap detection, see
   ``subscription.py``) is not delivered: the subscription is subscribed
   again, on the same connection, with ``since`` = its cursor. Live frames
   that arrive while a subscribe awaits its state are dropped: the server
   sent them before it took the subscribe, so its state and replay hold
   them.

The connection machine
----------------------

==============  ================================  ==============  ===============================
state           event                             next state      effects
==============  ================================  ==============  ===============================
idle            ``connect()``                     connecting      the adapter starts a run
closed¹         ``connect()``                     connecting      the adapter starts a run
connecting      opened                            open            resubscribe all, flush queue,
                                                                  emit ``open``
connecting      attempt failed                    closed¹         fail the queue with it;
                                                                  ``connect()`` raises it
open            lost, policy says reconnect       reconnecting    fail in flight; emit ``close``,
                                                                  ``reconnecting(attempt, delay)``
open            lost, policy says stop²           closed¹         fail in flight and queue;
                                                                  emit ``close``, ``error``
reconnecting    opened                            open            as from connecting
reconnecting    attempt failed, 401 + fixed token closed¹         emit ``error``; fail the queue
reconnecting    attempt failed, otherwise         reconnecting    emit ``error``,
                                                                  ``reconnecting(attempt, delay)``
any             ``close()``                       closed (sticky) fail queue and in flight with
                                                                  :class:`ClientClosed`
==============  ================================  ==============  ===============================

¹ Entering ``closed`` other than by ``close()`` detaches every subscription
(their iterators raise the error that stopped the client) and fails the
queue; ``connect()`` may start a new run. Requests made in ``closed`` fail at
once with :class:`ClientClosed`; in ``idle``, ``connecting`` and
``reconnecting`` they queue.

² 4002 with a fixed token, or any close when ``Backoff(disabled=True)``.

The close-code policy (applies to an *open* connection that was lost):

=========  ==================  ===================================================
code       policy              what happens
=========  ==================  ===================================================
4001       resume              reconnect at once³, resubscribe from the cursors
4002       unauthorized        stop with :class:`Unauthorized`, unless the token
                               is a callable: then reconnect with backoff
4003       drop-subscription   drop the culprit subscription (reported on ``error``
                               as :class:`SubscriptionRejected`), reconnect at once³
4004       report              report :class:`ConnectionClosed` on ``error``,
                               reconnect with backoff
other      backoff             reconnect with backoff
HTTP 401   unauthorized        as 4002 (an attempt that failed at the upgrade)
=========  ==================  ===================================================

³ At once only for the first failure of a streak; a connection that did not
stay open ``stable_after`` seconds continues the streak, and later attempts
of a streak wait the backoff delay.
"""

from __future__ import annotations

import random as _random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from ..messages import (
    CLOSE_FELL_BEHIND,
    CLOSE_INVALID_MESSAGE,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_SHARE_DATA,
    ErrorFrame,
    InvalidMessage,
    LifecycleFrame,
    Ping,
    PongFrame,
    ProposalResultFrame,
    Propose,
    StateFrame,
    Subscribe,
    TransactionFrame,
    Unsubscribe,
    encode_message,
    parse_server_message,
)
from .backoff import DEFAULT_BACKOFF, Backoff, next_backoff_delay
from .errors import (
    ClientClosed,
    ConnectionClosed,
    ConnectionFailed,
    ProtocolError,
    QueueFull,
    RealtimeError,
    RequestTimeout,
    ServerError,
    SubscriptionRejected,
    Unauthorized,
)
from .subscription import DUPLICATE, GAP, Subscription

__all__ = [
    "IDLE",
    "CONNECTING",
    "OPEN",
    "RECONNECTING",
    "CLOSED",
    "ClosePolicy",
    "CLOSE_POLICIES",
    "DEFAULT_CLOSE_POLICY",
    "HTTP_401_POLICY",
    "close_policy",
    "Reconnect",
    "Stop",
    "Decision",
    "ProposalResult",
    "PendingRequest",
    "ClientProtocol",
]

IDLE = "idle"
CONNECTING = "connecting"
OPEN = "open"
RECONNECTING = "reconnecting"
CLOSED = "closed"


# -- the close-code policy table ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClosePolicy:
    """What a lost connection's close code makes the client do."""

    name: str
    immediate: bool = False
    """Reconnect with no delay when this is the first failure of a streak."""
    drop_subscription: bool = False
    """Drop the subscription that caused the close (4003)."""
    unauthorized: bool = False
    """Stop, unless the token is a callable that can be asked again."""
    report: bool = False
    """Report the close itself on the ``error`` event."""


DEFAULT_CLOSE_POLICY = ClosePolicy("backoff")

CLOSE_POLICIES: dict[int, ClosePolicy] = {
    CLOSE_FELL_BEHIND: ClosePolicy("resume", immediate=True),
    CLOSE_UNAUTHORIZED: ClosePolicy("unauthorized", unauthorized=True),
    CLOSE_UNKNOWN_SHARE_DATA: ClosePolicy("drop-subscription", immediate=True, drop_subscription=True),
    CLOSE_INVALID_MESSAGE: ClosePolicy("report", report=True),
}
"""Close code -> policy; every code not listed gets :data:`DEFAULT_CLOSE_POLICY`."""

HTTP_401_POLICY = CLOSE_POLICIES[CLOSE_UNAUTHORIZED]
"""An HTTP 401 at the upgrade is treated like a 4002 close."""


def close_policy(code: int) -> ClosePolicy:
    """The policy for a connection lost with ``code``."""
    return CLOSE_POLICIES.get(code, DEFAULT_CLOSE_POLICY)


# -- decisions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Try again after ``delay`` seconds; ``attempt`` counts the streak from 1."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Stop:
    """The run is over. ``error`` is why (None after ``close()``)."""

    error: Optional[BaseException]


Decision = Union[Reconnect, Stop]


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposalResult:
    """The server's answer to :meth:`RealtimeClient.propose`.

    A proposal the rule rejected is a normal result (``accepted=False`` with
    the recorded ``transaction_id``); one the server could not process at all
    (unknown id or function, not authorized, ...) has ``accepted=False``, no
    ``transaction_id`` and the server's ``error`` text.
    """

    accepted: bool
    transaction_id: Optional[str] = None
    error: Optional[str] = None


QUEUED = "queued"
SENT = "sent"
DONE = "done"


class PendingRequest:
    """One ``propose`` or ``ping`` between its call and its answer.

    ``status`` goes ``queued`` -> ``sent`` -> ``done`` (or straight to
    ``done``). When it is done, exactly one of ``result`` / ``error`` is
    meaningful and ``on_settle`` (set by the adapter) has been called.
    """

    __slots__ = ("kind", "correlation_id", "data", "timeout", "sent_at", "status", "result", "error", "on_settle")

    def __init__(self, kind: str, correlation_id: str, data: bytes, timeout: Optional[float]) -> None:
        self.kind = kind
        self.correlation_id = correlation_id
        self.data = data
        self.timeout = timeout
        self.sent_at: Optional[float] = None
        self.status = QUEUED
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.on_settle: Optional[Callable[["PendingRequest"], None]] = None

    def __repr__(self) -> str:
        return f"<PendingRequest {self.kind} {self.correlation_id} {self.status}>"

    @property
    def done(self) -> bool:
        return self.status == DONE

    def _settle(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        if self.status == DONE:
            return
        self.status = DONE
        self.result = result
        self.error = error
        callback, self.on_settle = self.on_settle, None
        if callback is not None:
            callback(self)


# -- the protocol object ----------------------------------------------------------------

_ABANDONED_LIMIT = 10_000
"""How many timed-out or cancelled correlation ids are remembered per
connection, so that their late answers are ignored rather than reported."""

_UNKNOWN_PREFIX, _UNKNOWN_SUFFIX = "shareDataId ", " not found"
_UNAUTHORIZED_PREFIX = "not authorized to subscribe to "

EmitCallback = Callable[..., None]


class ClientProtocol:
    """The client's state machines; see the module documentation."""

    def __init__(
        self,
        *,
        emit: EmitCallback,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_queue_size: int = 100,
        stable_after: float = 5.0,
        token_refreshable: bool = False,
        subscription_queue_size: int = 1000,
        random: Callable[[], float] = _random.random,
        on_output: Optional[Callable[[], None]] = None,
    ) -> None:
        if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int) or max_queue_size < 0:
            raise ValueError("max_queue_size must be an int >= 0")
        if isinstance(subscription_queue_size, bool) or not isinstance(subscription_queue_size, int) or subscription_queue_size < 1:
            raise ValueError("subscription_queue_size must be an int >= 1")
        if not stable_after >= 0:
            raise ValueError("stable_after must be >= 0 seconds")
        self._emit = emit
        self._on_output = on_output
        self.backoff = backoff
        self.max_queue_size = max_queue_size
        self.stable_after = float(stable_after)
        self.token_refreshable = token_refreshable
        self.subscription_queue_size = subscription_queue_size
        self._random = random

        self.state = IDLE
        self._closed_by_user = False
        self._ever_opened = False
        self._attempt = 0
        self._opened_at: Optional[float] = None
        self._next_id = 1
        self._outbox: list[bytes] = []
        self._queue: deque[PendingRequest] = deque()
        self._in_flight: dict[str, PendingRequest] = {}
        self._subscriptions: dict[str, Subscription] = {}
        # Per connection:
        # Subscribes sent and not answered yet (a state frame or a refusal),
        # in send order, the server's answer order. One unsubscribed meanwhile
        # stays until its answer comes, so that answer is matched to it, not
        # blamed on the next one.
        self._awaiting_state: dict[str, None] = {}
        self._unsubscribed: set[str] = set()
        self._abandoned: dict[str, None] = {}
        self._culprit_dropped = False

    # -- outputs -----------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The text frames to write, in order; each call hands them over once."""
        out, self._outbox = self._outbox, []
        return out

    # -- views -------------------------------------------------------------------------

    @property
    def closed_by_user(self) -> bool:
        return self._closed_by_user

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The live subscriptions by id (a copy)."""
        return dict(self._subscriptions)

    @property
    def queued(self) -> int:
        """Requests waiting for a connection."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._in_flight)

    @property
    def attempt(self) -> int:
        """Consecutive failures in the current streak."""
        return self._attempt

    # -- the connection machine ----------------------------------------------------------

    def connect(self) -> bool:
        """``connect()`` was called; True when the adapter must start a run.

        Raises :class:`ClientClosed` after ``close()``.
        """
        if self._closed_by_user:
            raise ClientClosed("client is closed")
        if self.state in (IDLE, CLOSED):
            self.state = CONNECTING
            self._ever_opened = False
            self._attempt = 0
            return True
        return False

    def connection_opened(self, now: float) -> bool:
        """The WebSocket is open. False if nobody wants it any more (close it)."""
        if self.state not in (CONNECTING, RECONNECTING):
            return False
        self.state = OPEN
        self._ever_opened = True
        self._opened_at = now
        # What was queued for the previous connection (e.g. by a "close"
        # listener) is moot: subscriptions and requests are sent again below.
        self._outbox.clear()
        self._awaiting_state.clear()
        self._unsubscribed.clear()
        self._abandoned.clear()
        self._culprit_dropped = False
        for subscription in list(self._subscriptions.values()):
            self._send_subscribe(subscription)
        queued, self._queue = self._queue, deque()
        for request in queued:
            self._send_request(request, now)
        self._emit("open")
        return True

    def connection_lost(self, code: int, reason: str, now: float) -> Decision:
        """The open connection ended with ``code``/``reason`` (1006 if no close frame)."""
        reason = reason or ""
        in_flight = list(self._in_flight.values())
        self._in_flight.clear()
        for request in in_flight:
            request._settle(error=ConnectionClosed(code, reason))
        awaiting = list(self._awaiting_state)
        culprit_dropped = self._culprit_dropped
        self._awaiting_state.clear()
        self._unsubscribed.clear()
        self._abandoned.clear()
        self._culprit_dropped = False
        was_open = self.state == OPEN
        if was_open or self._closed_by_user:
            self._emit("close", code, reason)
        if self._closed_by_user:
            self.state = CLOSED
            return Stop(None)
        if not was_open:
            # Already decided (e.g. a stop while the socket was closing).
            return Stop(None)

        if self._opened_at is not None and now - self._opened_at >= self.stable_after:
            self._attempt = 0
        self._opened_at = None
        policy = close_policy(code)

        immediate = policy.immediate
        if policy.drop_subscription:
            if not culprit_dropped:
                # The oldest unanswered subscribe; if it was unsubscribed
                # meanwhile, there is nothing left to drop.
                culprit = next(iter(awaiting), None)
                if culprit is None:
                    immediate = False
                elif culprit in self._subscriptions:
                    self._reject(culprit, "unknown-share-data", f"shareDataId {culprit} not found")
        if policy.report:
            self._emit("error", ConnectionClosed(code, reason))
        if policy.unauthorized and not self.token_refreshable:
            error = Unauthorized(f"unauthorized: connection closed: {code} {reason}", code=code)
            self._emit("error", error)
            return self._stop(lambda: Unauthorized(f"unauthorized: connection closed: {code} {reason}", code=code))
        if self.backoff.disabled:
            return self._stop(
                lambda: ConnectionClosed(code, reason, f"connection closed: {code} {reason} (reconnect disabled)")
            )
        return self._schedule(immediate)

    def attempt_failed(self, error: RealtimeError, now: float) -> Decision:
        """A connection attempt failed before the WebSocket opened.

        ``error`` is the classified failure: :class:`Unauthorized` for an HTTP
        401, :class:`ConnectionFailed` otherwise.
        """
        if self._closed_by_user:
            self.state = CLOSED
            return Stop(None)
        if not self._ever_opened:
            # The first connection of a run: connect() raises it, no retries.
            return self._stop(_same(error), error)
        self._emit("error", error)
        if isinstance(error, Unauthorized) and not self.token_refreshable:
            return self._stop(_same(error), error)
        if self.backoff.disabled:
            return self._stop(_same(error), error)
        return self._schedule(False)

    def close(self) -> bool:
        """``close()``: sticky. True when a connection or attempt must be torn down."""
        if self._closed_by_user:
            return False
        self._closed_by_user = True
        active = self.state in (CONNECTING, OPEN, RECONNECTING)
        in_flight = list(self._in_flight.values())
        self._in_flight.clear()
        for request in in_flight:
            request._settle(error=ClientClosed("client closed"))
        self._stop(lambda: ClientClosed("client closed"), None, detach_error=False)
        return active

    def _schedule(self, immediate: bool) -> Reconnect:
        if immediate and self._attempt == 0:
            delay = 0.0
        else:
            delay = next_backoff_delay(self._attempt, self.backoff, self._random)
        self._attempt += 1
        self.state = RECONNECTING
        self._emit("reconnecting", self._attempt, delay)
        return Reconnect(delay, self._attempt)

    def _stop(
        self,
        make_error: Callable[[], BaseException],
        error: Optional[BaseException] = None,
        *,
        detach_error: bool = True,
    ) -> Stop:
        self.state = CLOSED
        self._ever_opened = False
        self._attempt = 0
        self._opened_at = None
        queued, self._queue = self._queue, deque()
        for request in queued:
            request._settle(error=make_error())
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        self._awaiting_state.clear()
        for subscription in subscriptions:
            subscription._detach(make_error() if detach_error else None)
        if error is None and detach_error:
            error = make_error()
        return Stop(error)

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, share_data_id: str) -> Subscription:
        """The live handle for ``share_data_id``, created (and sent) if needed."""
        if not isinstance(share_data_id, str) or not share_data_id:
            raise ValueError("share_data_id must be a non-empty string")
        if self._closed_by_user:
            raise ClientClosed("client is closed")
        subscription = self._subscriptions.get(share_data_id)
        if subscription is not None:
            return subscription
        subscription = Subscription(share_data_id, self, self.subscription_queue_size)
        self._subscriptions[share_data_id] = subscription
        if self.state == OPEN:
            self._send_subscribe(subscription)
        return subscription

    def _send_subscribe(self, subscription: Subscription, since: Optional[str] = None) -> None:
        """Subscribe on this connection, with ``since`` = the cursor unless given."""
        share_data_id = subscription.share_data_id
        since = since if since is not None else subscription.last_transaction_id
        self._outbox.append(encode_message(Subscribe(share_data_id, since or None)))
        self._awaiting_state.pop(share_data_id, None)
        self._awaiting_state[share_data_id] = None

    def _unsubscribe(self, subscription: Subscription) -> None:
        """Called by :meth:`Subscription.unsubscribe` (which then detaches it)."""
        share_data_id = subscription.share_data_id
        if self._subscriptions.get(share_data_id) is not subscription:
            return
        del self._subscriptions[share_data_id]
        if self.state == OPEN:
            self._outbox.append(encode_message(Unsubscribe(share_data_id)))
            # Frames already on their way are expected: drop them quietly.
            self._unsubscribed.add(share_data_id)
            if self._on_output is not None:
                # The one input that comes from a handle, not the adapter.
                self._on_output()

    def _reject(self, share_data_id: str, code: str, message: str) -> None:
        subscription = self._subscriptions.pop(share_data_id, None)
        self._awaiting_state.pop(share_data_id, None)
        if subscription is None:
            return
        subscription._detach(SubscriptionRejected(share_data_id, code, message))
        self._emit("error", SubscriptionRejected(share_data_id, code, message))

    # -- requests ---------------------------------------------------------------------------

    def propose(
        self,
        share_data_id: str,
        function_id: str,
        proposed_data: Any,
        proof: Optional[dict[str, Any]],
        timeout: Optional[float],
        now: float,
    ) -> PendingRequest:
        """Send (or queue) a ``propose``. Raises :class:`ClientClosed`,
        :class:`QueueFull`, or ``EncodeError`` for data that is not JSON."""
        if not isinstance(share_data_id, str) or not share_data_id:
            raise ValueError("share_data_id must be a non-empty string")
        if not isinstance(function_id, str) or not function_id:
            raise ValueError("function_id must be a non-empty string")
        if proof is not None and not isinstance(proof, dict):
            raise TypeError("proof must be a dict (a JSON object) or None")
        self._check_can_request()
        correlation_id = self._take_correlation_id()
        data = encode_message(Propose(share_data_id, function_id, proposed_data, correlation_id, proof))
        return self._submit(PendingRequest("propose", correlation_id, data, timeout), now)

    def ping(self, timeout: Optional[float], now: float) -> PendingRequest:
        """Send (or queue) a ``ping``; its result is the round trip in seconds."""
        self._check_can_request()
        correlation_id = self._take_correlation_id()
        data = encode_message(Ping(correlation_id))
        return self._submit(PendingRequest("ping", correlation_id, data, timeout), now)

    def request_timed_out(self, request: PendingRequest) -> None:
        """The request's timeout (armed at the call) expired."""
        if request.done:
            return
        queued = request.status == QUEUED
        self._forget(request)
        where = "while queued (never sent)" if queued else "waiting for the answer"
        timeout = request.timeout if request.timeout is not None else 0.0
        request._settle(
            error=RequestTimeout(
                f"{request.kind} {request.correlation_id} timed out after {timeout:g} s {where}",
                timeout=timeout,
                queued=queued,
            )
        )

    def abandon(self, request: PendingRequest) -> None:
        """The caller stopped waiting (cancelled): never send it, ignore its answer."""
        if request.done:
            return
        self._forget(request)
        request.status = DONE
        request.on_settle = None

    def _forget(self, request: PendingRequest) -> None:
        if request.status == QUEUED:
            try:
                self._queue.remove(request)
            except ValueError:
                pass
        elif request.status == SENT:
            if self._in_flight.pop(request.correlation_id, None) is not None:
                self._abandoned[request.correlation_id] = None
                if len(self._abandoned) > _ABANDONED_LIMIT:
                    del self._abandoned[next(iter(self._abandoned))]

    def _check_can_request(self) -> None:
        if self._closed_by_user:
            raise ClientClosed("client is closed")
        if self.state == CLOSED:
            raise ClientClosed("client is closed (it stopped; call connect() to start again)")
        if self.state != OPEN and len(self._queue) >= self.max_queue_size:
            raise QueueFull(self.max_queue_size)

    def _take_correlation_id(self) -> str:
        correlation_id = f"c-{self._next_id}"
        self._next_id += 1
        return correlation_id

    def _submit(self, request: PendingRequest, now: float) -> PendingRequest:
        if self.state == OPEN:
            self._send_request(request, now)
        else:
            self._queue.append(request)
        return request

    def _send_request(self, request: PendingRequest, now: float) -> None:
        request.status = SENT
        request.sent_at = now
        self._in_flight[request.correlation_id] = request
        self._outbox.append(request.data)

    # -- input ---------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float, *, binary: bool = False) -> None:
        """One complete message from the server. Never raises on bad input."""
        if self.state != OPEN:
            return
        if binary:
            self._emit(
                "error",
                ProtocolError("binary frame from the server skipped: the protocol sends JSON text frames", data),
            )
            return
        try:
            message = parse_server_message(data)
        except InvalidMessage as exc:
            error = ProtocolError(f"unusable frame from the server skipped: {exc}", data)
            error.__cause__ = exc
            self._emit("error", error)
            return
        self._emit("message", message)
        if isinstance(message, (StateFrame, TransactionFrame, LifecycleFrame)):
            self._on_channel_frame(message)
        elif isinstance(message, ProposalResultFrame):
            request = self._answered(message, "propose")
            if request is not None:
                request._settle(ProposalResult(message.accepted, message.transaction_id, message.error))
        elif isinstance(message, PongFrame):
            request = self._answered(message, "ping")
            if request is not None:
                sent_at = request.sent_at if request.sent_at is not None else now
                request._settle(max(0.0, now - sent_at))
        elif isinstance(message, ErrorFrame):
            self._on_error_frame(message)

    def _on_channel_frame(self, frame: Union[StateFrame, TransactionFrame, LifecycleFrame]) -> None:
        share_data_id = frame.share_data_id
        subscription = self._subscriptions.get(share_data_id)
        if frame.type == "state":
            self._awaiting_state.pop(share_data_id, None)
        if share_data_id in self._unsubscribed:
            # Unsubscribed on this connection: what the server sent before it
            # processed our unsubscribe is expected. A new subscription to the
            # same id starts with its state frame.
            if subscription is None or frame.type != "state":
                return
            self._unsubscribed.discard(share_data_id)
        if subscription is None:
            self._emit(
                "error",
                ProtocolError(
                    f"{frame.type} frame for {share_data_id!r} skipped: this client is not subscribed to it",
                    frame,
                ),
            )
            return
        if frame.type == "transaction" and not frame.replayed:  # type: ignore[union-attr]
            if share_data_id in self._awaiting_state:
                # Sent before the server took our resubscribe: its state and
                # replay hold this one.
                return
            order = subscription._live_order(frame.transaction_id)  # type: ignore[union-attr]
            if order == DUPLICATE:
                return
            if order == GAP:
                # Frames were lost on the way: fetch them, in order, by replay.
                self._send_subscribe(subscription, subscription._gap_cursor)
                return
        overflow = subscription._dispatch(frame)
        if overflow is not None:
            self._emit("error", overflow)
        if frame.type == "lifecycle" and frame.event == "removed":  # type: ignore[union-attr]
            if self._subscriptions.get(share_data_id) is subscription:
                del self._subscriptions[share_data_id]
            self._awaiting_state.pop(share_data_id, None)
            subscription._detach(None)

    def _answered(self, frame: Union[ProposalResultFrame, PongFrame], kind: str) -> Optional[PendingRequest]:
        correlation_id = frame.correlation_id
        request = self._in_flight.get(correlation_id)
        if request is None:
            if correlation_id in self._abandoned:
                del self._abandoned[correlation_id]
            else:
                self._emit(
                    "error",
                    ProtocolError(f"{frame.type} for unknown correlationId {correlation_id!r} skipped", frame),
                )
            return None
        if request.kind != kind:
            self._emit(
                "error",
                ProtocolError(
                    f"{frame.type} for correlationId {correlation_id!r} skipped: that request is a {request.kind}",
                    frame,
                ),
            )
            return None
        del self._in_flight[correlation_id]
        return request

    def _on_error_frame(self, frame: ErrorFrame) -> None:
        if frame.correlation_id is not None:
            request = self._in_flight.pop(frame.correlation_id, None)
            if request is not None:
                request._settle(error=ServerError(frame))
                return
        if frame.code in ("unknown-share-data", "unauthorized-subscribe"):
            culprit = self._subscribe_culprit(frame)
            if culprit is not None:
                # The server answers subscribes in order, so this refusal
                # belongs to the named id, or else to the oldest unanswered.
                self._reject(culprit, frame.code, frame.message)
                if frame.code == "unknown-share-data":
                    self._culprit_dropped = True
                return
        self._emit("error", ServerError(frame))

    def _subscribe_culprit(self, frame: ErrorFrame) -> Optional[str]:
        message = frame.message
        named: Optional[str] = None
        if frame.code == "unknown-share-data":
            if message.startswith(_UNKNOWN_PREFIX) and message.endswith(_UNKNOWN_SUFFIX):
                named = message[len(_UNKNOWN_PREFIX) : -len(_UNKNOWN_SUFFIX)]
        elif message.startswith(_UNAUTHORIZED_PREFIX):
            named = message[len(_UNAUTHORIZED_PREFIX) :]
        if named is not None:
            # Named: it is that one or, if it is no longer awaited, none.
            return named if named in self._awaiting_state else None
        return next(iter(self._awaiting_state), None)


def _same(error: BaseException) -> Callable[[], BaseException]:
    """A factory that rebuilds ``error`` for each waiter it fails.

    Every waiter gets its own exception object, so tracebacks do not pile up
    on one shared instance; the original is the ``__cause__`` of each.
    """

    def make() -> BaseException:
        fresh: BaseException
        if isinstance(error, Unauthorized):
            fresh = Unauthorized(str(error), code=error.code, status=error.status)
        elif isinstance(error, ConnectionFailed):
            fresh = ConnectionFailed(str(error), status=error.status)
        elif isinstance(error, ConnectionClosed):
            fresh = ConnectionClosed(error.code, error.reason, str(error))
        else:
            fresh = ClientClosed(f"client stopped: {error}")
        fresh.__cause__ = error
        return fresh

    return make
