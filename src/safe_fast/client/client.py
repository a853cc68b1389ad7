"""The picows adapter: the client's sockets and timers.

Every decision (what to send on open, what a close code means, which
request an answer belongs to, where a frame goes) is made by
:class:`~safe_fast.client._state.ClientProtocol`. This module resolves the
token, opens WebSockets with ``picows.ws_connect``, feeds what arrives into
the protocol object, writes what it wants written, sleeps the delays it
decides and arms the request timeouts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Union
from urllib.parse import quote

import picows

from .._events import EventEmitter, Listener
from ._state import CLOSED, CONNECTING, OPEN, ClientProtocol, Decision, PendingRequest, ProposalResult, Reconnect, Stop
from .backoff import DEFAULT_BACKOFF, Backoff
from .errors import ClientClosed, ConnectionFailed, ProtocolError, RealtimeError, Unauthorized
from .subscription import Subscription

__all__ = ["RealtimeClient", "TokenSource"]

logger = logging.getLogger("safe_fast.client")

TokenSource = Union[None, str, Callable[[], Union[Optional[str], Awaitable[Optional[str]]]]]
"""A fixed token, or a (sync or async) callable asked before every attempt."""

_TEXT = picows.WSMsgType.TEXT
_BINARY = picows.WSMsgType.BINARY
_CONTINUATION = picows.WSMsgType.CONTINUATION
_CLOSE = picows.WSMsgType.CLOSE

_CLOSE_NORMAL = 1000
_CLOSE_NO_STATUS = 1005
_CLOSE_ABNORMAL = 1006

_EVENTS = ("open", "close", "reconnecting", "error", "message")

_URI_COMPONENT_SAFE = "!~*'()"
"""What encodeURIComponent leaves alone besides letters, digits and ``-_.``."""


def _code(value: Any) -> int:
    """picows hands close codes as WSCloseCode members or, for 4xxx, plain ints."""
    return int(getattr(value, "value", value))


def url_with_token(url: str, token: Optional[str]) -> str:
    """``url`` with ``token`` appended as the ``token`` query parameter.

    Encoded like JavaScript's ``encodeURIComponent``, as the reference client
    does; a ``#fragment`` stays last.
    """
    if not token:
        return url
    base, hash_mark, fragment = url.partition("#")
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}token={quote(token, safe=_URI_COMPONENT_SAFE)}{hash_mark}{fragment}"


class _Listener(picows.WSListener):  # type: ignore[misc]
    """One WebSocket connection attempt and, if it opens, its connection."""

    def __init__(self, client: "RealtimeClient") -> None:
        super().__init__()
        self.client = client
        self.transport: Optional[picows.WSTransport] = None
        self.abandoned = False
        self.opened = False
        self.accepted = False
        self.lost = False
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.fragments: Optional[bytearray] = None
        self.fragments_binary = False
        self.fragments_too_big = False
        self.done: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

    def abandon(self) -> None:
        """The attempt was given up (timeout, cancel): never let it open."""
        self.abandoned = True
        if self.transport is not None and not self.opened:
            self.transport.disconnect(False)

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport
        # picows keeps why it dropped the connection (e.g. a frame over
        # max_message_size) for wait_disconnected(); unread, asyncio would log it.
        asyncio.ensure_future(transport.wait_disconnected()).add_done_callback(self._dropped_by_picows)
        if self.abandoned:
            transport.disconnect(False)
            return
        self.opened = True
        try:
            self.client._connection_opened(self)
        except Exception:  # pragma: no cover - defensive: picows would disconnect
            logger.exception("client failed to handle the open connection")

    def _dropped_by_picows(self, future: "asyncio.Future[Any]") -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None and self.opened:
            self.client._report(ProtocolError(f"connection failed by the WebSocket layer: {error!r}"))

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if not self.opened or self.lost:
            return
        try:
            self._frame(transport, frame)
        except Exception:  # never let picows tear the connection down for our bug
            logger.exception("client failed to handle a frame")

    def _frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        msg_type = frame.msg_type
        client = self.client
        if msg_type == _TEXT or msg_type == _BINARY:
            if self.fragments is not None:
                self.fragments = None
                client._report(ProtocolError("a new message began before the previous one was complete"))
            if frame.fin:
                client._message(frame.get_payload_as_bytes(), msg_type == _BINARY)
            else:
                self.fragments = bytearray(frame.get_payload_as_memoryview())
                self.fragments_binary = msg_type == _BINARY
                self.fragments_too_big = False
        elif msg_type == _CONTINUATION:
            if self.fragments is None:
                client._report(ProtocolError("continuation frame without a message to continue skipped"))
                return
            if not self.fragments_too_big:
                self.fragments += frame.get_payload_as_memoryview()
                if len(self.fragments) > client.max_message_size:
                    self.fragments_too_big = True
                    self.fragments.clear()
            if frame.fin:
                payload, self.fragments = bytes(self.fragments), None
                if self.fragments_too_big:
                    client._report(
                        ProtocolError(f"message larger than max_message_size ({client.max_message_size}) skipped")
                    )
                else:
                    client._message(payload, self.fragments_binary)
        elif msg_type == _CLOSE:
            code = _code(frame.get_close_code())
            if code == 0:
                code = _CLOSE_NO_STATUS
            self.close_code = code
            try:
                self.close_reason = frame.get_close_reason() or ""
            except UnicodeDecodeError:
                self.close_reason = ""
            if not transport.is_close_frame_sent:
                # Echo the peer's code (RFC 6455 section 5.5.1).
                echo = code if code >= 1000 and code != _CLOSE_NO_STATUS else _CLOSE_NORMAL
                transport.send_close(echo)  # type: ignore[arg-type]  # 4xxx codes are plain ints
            transport.disconnect()
        # PING is answered by picows (enable_auto_pong); PONG needs nothing.

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.opened or self.lost:
            return
        self.lost = True
        if not self.accepted:
            # Opened after the client was closed: it never existed for the core.
            if not self.done.done():
                self.done.set_result(Stop(None))
            return
        code, reason = self.close_code, self.close_reason
        if code is None:
            handshake = transport.close_handshake
            info = handshake.recv if handshake is not None else None
            if info is not None:
                code, reason = _code(info.code) or _CLOSE_NO_STATUS, info.reason or ""
            else:
                code, reason = _CLOSE_ABNORMAL, ""
        try:
            decision = self.client._connection_lost(self, code, reason)
        except Exception as exc:  # pragma: no cover - defensive
            logger.exception("client failed to handle a lost connection")
            decision = Stop(exc)
        if not self.done.done():
            self.done.set_result(decision)


class RealtimeClient:
    """An asyncio client of the SAFE realtime protocol (``@degenerate/realtime`` 0.7.1).

    ::

        async with RealtimeClient("ws://127.0.0.1:3000/realtime", token=get_token) as client:
            sub = client.subscribe("doc-1")
            result = await client.propose("doc-1", "increment", {"count": 1})
            async for frame in sub:
                ...

    Options:

    ``token``
        ``None``, a string, or a callable (plain or ``async``) returning the
        current token; appended to the URL as the ``token`` query parameter,
        URL-encoded. A callable is asked before every connection attempt, and
        makes 4002 / HTTP 401 a reason to reconnect rather than to stop.
    ``request_timeout``
        Default timeout of ``propose`` and ``ping``, in seconds, counted
        from the call (queueing included).
    ``max_queue_size``
        Requests that may wait for a connection; beyond it they fail at once
        with :class:`QueueFull`.
    ``backoff``
        A :class:`Backoff`; ``Backoff(disabled=True)`` never reconnects.
    ``stable_after``
        Seconds a connection must stay open before the backoff starts over
        from its first delay.
    ``subscription_queue_size``
        Frames each subscription buffers for ``async for`` (see
        :class:`Subscription` for what happens when a consumer falls behind).
    ``connect_timeout``
        Bound of one connection attempt (TCP and the upgrade), in seconds.
    ``close_timeout``
        How long ``close()`` waits for the server to answer the close
        handshake before dropping the connection.
    ``max_message_size``
        Largest server message accepted. A message fragmented into frames
        that together pass it is reported (``error``) and skipped; a single
        frame that passes it closes the connection with 1009, reported the
        same way, and the client reconnects as after any other close.
    ``extra_headers``
        HTTP headers for the upgrade request (e.g. ``Authorization``).
    ``ssl_context``
        For ``wss://`` URLs.

    Events (``on``/``off``): ``open()``, ``close(code, reason)``,
    ``reconnecting(attempt, delay)``, ``error(exc)`` and ``message(frame)``
    (every well-formed server frame, typed, before it is dispatched). An
    ``error`` without listeners is logged on the ``safe_fast.client`` logger,
    never raised. Listeners may be coroutine functions.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource = None,
        request_timeout: float = 30.0,
        max_queue_size: int = 100,
        backoff: Optional[Backoff] = None,
        stable_after: float = 5.0,
        subscription_queue_size: int = 1000,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        max_message_size: int = 8 * 1024 * 1024,
        extra_headers: Optional[Any] = None,
        ssl_context: Optional[Any] = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError("url must be a ws:// or wss:// URL")
        if token is not None and not isinstance(token, str) and not callable(token):
            raise TypeError("token must be None, a string, or a callable returning one")
        for name, value in (
            ("request_timeout", request_timeout),
            ("connect_timeout", connect_timeout),
            ("close_timeout", close_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if isinstance(max_message_size, bool) or not isinstance(max_message_size, int) or max_message_size < 1:
            raise ValueError("max_message_size must be a positive int")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError("backoff must be a Backoff")
        self.url = url
        """The endpoint, without the token."""
        self.request_timeout = float(request_timeout)
        self.connect_timeout = float(connect_timeout)
        self.close_timeout = float(close_timeout)
        self.max_message_size = max_message_size
        self._token = token
        self._extra_headers = extra_headers
        self._ssl_context = ssl_context
        self._events = EventEmitter()
        self._core = ClientProtocol(
            emit=self._emit,
            backoff=backoff if backoff is not None else DEFAULT_BACKOFF,
            max_queue_size=max_queue_size,
            stable_after=stable_after,
            token_refreshable=callable(token),
            subscription_queue_size=subscription_queue_size,
            on_output=self._flush,
        )
        self._current: Optional[_Listener] = None
        self._run_task: Optional[asyncio.Task[None]] = None
        self._open_waiters: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<RealtimeClient {self.url} {self.state}>"

    # -- public surface ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"idle"``, ``"connecting"``, ``"open"``, ``"reconnecting"`` or ``"closed"``."""
        return self._core.state

    @property
    def backoff(self) -> Backoff:
        return self._core.backoff

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The live subscriptions by ``shareDataId`` (a copy)."""
        return self._core.subscriptions

    def on(self, event: str, listener: Listener) -> Listener:
        """Register ``listener`` for ``open``, ``close``, ``reconnecting``,
        ``error`` or ``message``; returns it (usable as a decorator)."""
        if event not in _EVENTS:
            raise ValueError(f"unknown client event {event!r}; expected one of {', '.join(_EVENTS)}")
        return self._events.on(event, listener)

    def off(self, event: str, listener: Listener) -> None:
        """Remove a listener registered with :meth:`on`."""
        self._events.off(event, listener)

    async def connect(self) -> None:
        """Open the connection; return once it is open.

        If the first attempt fails, raise that failure (:class:`Unauthorized`
        for an HTTP 401, :class:`ConnectionFailed` otherwise) and leave the
        client ``closed``, without retrying in the background; requests
        queued meanwhile fail with it too. ``connect()`` may then be called
        again. Once open, lost connections are re-established automatically.
        When a reconnect is already under way, wait for it. Raises
        :class:`ClientClosed` after :meth:`close`.

        A server that decides on the token only after the upgrade (an
        asynchronous ``authenticate``) answers a refused one with close 4002
        once the connection is open: ``connect()`` has then returned, and
        the refusal is handled like any 4002: with a fixed token it is
        reported (``error``, :class:`Unauthorized`) and stops the client; with
        a token callable the client reconnects with a fresh token.
        """
        core = self._core
        if core.state == OPEN:
            return
        loop = asyncio.get_running_loop()
        start = core.connect()
        waiter: asyncio.Future[None] = loop.create_future()
        self._open_waiters.append(waiter)
        if start:
            self._run_task = loop.create_task(self._run())
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._open_waiters:
                self._open_waiters.remove(waiter)
            run = self._run_task
            if core.state == CONNECTING and not self._open_waiters and run is not None and not run.done():
                # Nobody waits for the first connection any more: give it up.
                run.cancel()
            raise

    async def close(self) -> None:
        """Close for good (sticky): no reconnect, and every later call raises
        :class:`ClientClosed`. Queued and in-flight requests fail with
        :class:`ClientClosed`; subscriptions are detached and their iterators
        end. Idempotent."""
        core = self._core
        core.close()
        self._fail_waiters(lambda: ClientClosed("client closed"))
        listener = self._current
        if listener is not None and listener.transport is not None and not listener.lost:
            transport = listener.transport
            transport.send_close(picows.WSCloseCode.OK, b"client closed")
            try:
                await asyncio.wait_for(asyncio.shield(listener.done), self.close_timeout)
            except asyncio.TimeoutError:
                transport.disconnect(False)
                try:
                    await asyncio.wait_for(asyncio.shield(listener.done), 1.0)
                except asyncio.TimeoutError:  # pragma: no cover - picows always reports
                    pass
        run = self._run_task
        if run is not None and not run.done() and run is not asyncio.current_task():
            run.cancel()
            await asyncio.wait([run])

    async def __aenter__(self) -> "RealtimeClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def subscribe(self, share_data_id: str) -> Subscription:
        """The :class:`Subscription` for ``share_data_id``.

        The same handle while it is live; subscribed now if the connection is
        open, else on the next open. Raises :class:`ClientClosed` after
        :meth:`close`.
        """
        subscription = self._core.subscribe(share_data_id)
        self._flush()
        return subscription

    async def propose(
        self,
        share_data_id: str,
        function_id: str,
        proposed_data: Any = None,
        *,
        proof: Optional[dict[str, Any]] = None,
        timeout: Optional[float] = None,
    ) -> ProposalResult:
        """Ask the server to apply ``proposed_data`` through ``function_id``.

        Returns the server's :class:`ProposalResult` (a rule's rejection is a
        result, not an exception). Raises :class:`RequestTimeout` after
        ``timeout`` (default ``request_timeout``) seconds from this call,
        :class:`ConnectionClosed` if the connection is lost after sending,
        :class:`QueueFull`, :class:`ClientClosed`, or
        :class:`~safe_fast.EncodeError` for data that is not JSON.
        """
        timeout = self._timeout(timeout)
        request = self._core.propose(share_data_id, function_id, proposed_data, proof, timeout, self._now())
        self._flush()
        result: ProposalResult = await self._wait(request, timeout)
        return result

    async def ping(self, *, timeout: Optional[float] = None) -> float:
        """Round trip of an application-level ``ping``, in seconds.

        Measured from the moment it is written (not the call), like the
        reference client; queued and timed out like :meth:`propose`.
        """
        timeout = self._timeout(timeout)
        request = self._core.ping(timeout, self._now())
        self._flush()
        rtt: float = await self._wait(request, timeout)
        return rtt

    # -- requests ----------------------------------------------------------------------------

    def _timeout(self, timeout: Optional[float]) -> float:
        if timeout is None:
            return self.request_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        return float(timeout)

    async def _wait(self, request: PendingRequest, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(done: PendingRequest) -> None:
            if future.done():
                return
            if done.error is not None:
                future.set_exception(done.error)
            else:
                future.set_result(done.result)

        if request.done:
            settle(request)
        else:
            request.on_settle = settle
        timer = loop.call_later(timeout, self._core.request_timed_out, request)
        try:
            return await future
        except asyncio.CancelledError:
            self._core.abandon(request)
            raise
        finally:
            timer.cancel()

    # -- the run: attempts, connections, delays ----------------------------------------------

    @staticmethod
    def _now() -> float:
        # Not loop.time(): uvloop's is cached per iteration at millisecond
        # resolution, and a loopback ping round trip is well under that.
        return time.monotonic()

    async def _run(self) -> None:
        core = self._core
        try:
            while True:
                decision = await self._attempt()
                if isinstance(decision, Stop):
                    if self._run_task is asyncio.current_task():  # not superseded by a new connect()
                        self._fail_waiters(_raiser(decision.error))
                    return
                assert isinstance(decision, Reconnect)
                if decision.delay > 0:
                    await asyncio.sleep(decision.delay)
                if core.closed_by_user or core.state == CLOSED:
                    return
        except asyncio.CancelledError:
            if not core.closed_by_user and core.state == CONNECTING:
                error = ConnectionFailed("connection attempt cancelled")
                stop = core.attempt_failed(error, self._now())
                self._fail_waiters(_raiser(stop.error if isinstance(stop, Stop) else error))
            raise
        except Exception as exc:  # pragma: no cover - a bug of ours; do not die silently
            logger.exception("realtime client run failed")
            self._fail_waiters(_raiser(exc))

    async def _attempt(self) -> Decision:
        core = self._core
        try:
            token = await asyncio.wait_for(self._resolve_token(), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            error = ConnectionFailed(f"token callable did not answer within {self.connect_timeout:g} s")
            error.__cause__ = exc
            return core.attempt_failed(error, self._now())
        except Exception as exc:
            error = ConnectionFailed(f"token callable failed: {exc!r}")
            error.__cause__ = exc
            return core.attempt_failed(error, self._now())
        listener = _Listener(self)
        kwargs: dict[str, Any] = {}
        if self._extra_headers is not None:
            kwargs["extra_headers"] = self._extra_headers
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        try:
            await asyncio.wait_for(
                picows.ws_connect(
                    lambda: listener,
                    url_with_token(self.url, token),
                    websocket_handshake_timeout=self.connect_timeout,
                    max_frame_size=self.max_message_size,
                    enable_auto_pong=True,
                    logger_name="safe_fast.client.picows",
                    **kwargs,
                ),
                self.connect_timeout,
            )
        except asyncio.CancelledError:
            if listener.opened and listener.transport is not None:
                listener.transport.disconnect(False)
            listener.abandon()
            raise
        except Exception as exc:
            if listener.opened:
                # It opened, then the attempt still failed: treat it as a loss.
                if listener.transport is not None:
                    listener.transport.disconnect(False)
                return await listener.done
            listener.abandon()
            return core.attempt_failed(self._classify(exc), self._now())
        if not listener.opened:  # pragma: no cover - picows opens before returning
            listener.abandon()
            return core.attempt_failed(ConnectionFailed("connection closed during the upgrade"), self._now())
        return await listener.done

    async def _resolve_token(self) -> Optional[str]:
        source = self._token
        value: Any = source() if callable(source) else source
        if inspect.isawaitable(value):
            value = await value
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise TypeError(f"token must be a string, got {type(value).__name__}")
        return value

    def _classify(self, exc: BaseException) -> RealtimeError:
        error: RealtimeError
        if isinstance(exc, picows.WSHandshakeError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status", None)
            status = int(status) if status is not None else None
            if status == 401:
                error = Unauthorized(f"unauthorized: {self.url} answered the upgrade with HTTP 401", status=401)
            elif status is not None:
                error = ConnectionFailed(f"{self.url} answered the upgrade with HTTP {status}", status=status)
            else:
                error = ConnectionFailed(f"WebSocket upgrade with {self.url} failed: {exc}")
        elif isinstance(exc, asyncio.TimeoutError):
            error = ConnectionFailed(f"connecting to {self.url} timed out after {self.connect_timeout:g} s")
        else:
            error = ConnectionFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}")
        error.__cause__ = exc
        return error

    # -- callbacks from the listener -----------------------------------------------------------

    def _connection_opened(self, listener: _Listener) -> None:
        # Current before the core opens: its "open" listeners may subscribe or
        # propose, and what they queue must find this connection.
        self._current = listener
        if not self._core.connection_opened(self._now()):
            self._current = None
            assert listener.transport is not None
            listener.transport.send_close(picows.WSCloseCode.OK, b"client closed")
            listener.transport.disconnect()
            return
        listener.accepted = True
        self._flush()
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _connection_lost(self, listener: _Listener, code: int, reason: str) -> Decision:
        if self._current is listener:
            self._current = None
        decision = self._core.connection_lost(code, reason, self._now())
        if isinstance(decision, Stop):
            # Now, not when the run wakes up: a connect() made in between
            # starts a new run, and its waiter must not get this stop.
            self._fail_waiters(_raiser(decision.error))
        return decision

    def _message(self, payload: bytes, binary: bool) -> None:
        self._core.receive(payload, self._now(), binary=binary)
        self._flush()

    def _report(self, error: RealtimeError) -> None:
        self._emit("error", error)

    def _flush(self) -> None:
        listener = self._current
        transport = listener.transport if listener is not None else None
        if transport is None:
            # Not connected: what the core holds stays there until it is.
            return
        data = self._core.data_to_send()
        if not data:
            return
        for frame in data:
            transport.send(_TEXT, frame)

    def _fail_waiters(self, make_error: Callable[[], BaseException]) -> None:
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(make_error())

    def _emit(self, event: str, *args: Any) -> None:
        if event == "error" and not self._events.has_listeners("error"):
            error = args[0] if args else None
            logger.warning("realtime client error (no 'error' listener): %s", error)
            return
        self._events.emit(event, *args)


def _raiser(error: Optional[BaseException]) -> Callable[[], BaseException]:
    # connect() raises the failure itself, cause chain and all; requests and
    # subscriptions get copies instead (``_state._same``), one per waiter.
    def make() -> BaseException:
        if error is None:
            return ClientClosed("client closed")
        return error

    return make
