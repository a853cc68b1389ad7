"""The subscription handle: listeners, the cursor rules, the ``async for`` buffer.

No I/O happens here. The client's protocol object (``_state.py``) hands
every frame of a channel to :meth:`Subscription._dispatch`, which applies
the cursor rules, calls the listeners and feeds the iterator's buffer.

Cursor rules (``last_transaction_id``, the ``since`` of the next
resubscribe), as in the reference client:

=====================================  ======================================
frame                                  cursor
=====================================  ======================================
``state``                              set to its ``last_transaction_id``
                                       (may be ``None``)
live ``transaction``                   set to its ``transaction_id``
replayed ``transaction``               unchanged: history, not progress
``lifecycle updated``                  unchanged
``lifecycle removed``                  reset to ``None``; the handle is
                                       dropped from the client (detached)
=====================================  ======================================

Replayed frames follow the ``state`` frame of a resubscribe, which already
moved the cursor to the newest id, so they never need to move it.

Gap detection (:meth:`Subscription._live_order`): transaction ids of one
ShareData are consecutive decimal numbers, so a live ``transaction`` frame
after cursor ``n`` should be ``n + 1``. One at or below the cursor is a
duplicate (dropped); one above ``n + 1`` means frames were lost on the way
(at-most-once fan-out across nodes): the client resubscribes with ``since``
= the cursor instead of delivering it, and the replay brings the missing
ones in order. After a ``state`` of an empty history (``lastTransactionId``
null) the next live frame should be ``1``; one above it is a gap too, and
the resubscribe says ``since: "0"``, "before the first transaction", which a
server whose replay window still reaches back to the first transaction
answers with all of them (the stored-history window does; any other answers
``replay-cursor-not-found`` and its fresh ``state`` covers what was missed).
Without a numeric cursor otherwise (an id that is not a number) or right
after ``lifecycle updated`` (a replaced ShareData may count again from 1),
the next live frame is taken as it comes.

The iterator buffer holds at most ``queue_size`` frames. A consumer that
lets it fill up loses the buffered frames: the buffer is discarded, the
frames that arrive until the consumer comes back are counted and dropped,
and the consumer's next ``__anext__`` raises :class:`SubscriptionOverflow`
(iterating again then continues with new frames). A slow consumer is told at
once that it has a gap, rather than working through a stale backlog.
Listeners are unaffected: they run synchronously for every frame.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Optional, Protocol, Union

from .._events import EventEmitter, Listener
from ..messages import LifecycleFrame, StateFrame, TransactionFrame, transaction_number
from .errors import SubscriptionOverflow

__all__ = ["Subscription", "ChannelFrame", "IN_ORDER", "DUPLICATE", "GAP"]

ChannelFrame = Union[StateFrame, TransactionFrame, LifecycleFrame]
"""The frames a subscription receives."""

_EVENTS = ("state", "transaction", "lifecycle")

IN_ORDER, DUPLICATE, GAP = range(3)
"""Where a live transaction frame stands against the cursor (see the module doc)."""


class _Owner(Protocol):
    def _unsubscribe(self, subscription: "Subscription") -> None: ...


class Subscription:
    """The client's handle on one channel (one ``shareDataId``).

    Obtained from :meth:`RealtimeClient.subscribe`, which returns the same
    handle for the same id while it is live. Events: ``state``,
    ``transaction``, ``lifecycle``, each with one frame argument. ``async for
    frame in subscription`` yields the same frames in the same order and ends
    when the handle is detached (``unsubscribe()``, ``lifecycle removed``,
    ``close()``), or raises the error that detached it (a rejected
    subscription, a client that stopped). Meant for one consumer at a time.
    """

    __slots__ = (
        "share_data_id",
        "_owner",
        "_events",
        "_cursor",
        "_from_start",
        "_renumbered",
        "_detached",
        "_queue",
        "_queue_size",
        "_dropped",
        "_overflowed",
        "_iterating",
        "_end_error",
        "_waiter",
    )

    def __init__(self, share_data_id: str, owner: _Owner, queue_size: int = 1000) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.share_data_id = share_data_id
        """The channel's ``shareDataId``."""
        self._owner = owner
        self._events = EventEmitter()
        self._cursor: Optional[str] = None
        # The last state was of an empty history: the next live id should be "1".
        self._from_start = False
        self._renumbered = False
        self._detached = False
        self._queue: deque[ChannelFrame] = deque()
        self._queue_size = queue_size
        self._dropped = 0
        self._overflowed = False
        self._iterating = False
        self._end_error: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    def __repr__(self) -> str:
        status = "detached" if self._detached else "live"
        return f"<Subscription {self.share_data_id!r} {status} cursor={self._cursor!r}>"

    # -- public surface ------------------------------------------------------

    def on(self, event: str, listener: Listener) -> Listener:
        """Call ``listener(frame)`` on ``state``, ``transaction`` or ``lifecycle``.

        Returns the listener, so this works as a decorator. Listeners may be
        coroutine functions; one that raises is logged and disturbs nothing.
        """
        if event not in _EVENTS:
            raise ValueError(f"unknown subscription event {event!r}; expected one of {', '.join(_EVENTS)}")
        return self._events.on(event, listener)

    def off(self, event: str, listener: Listener) -> None:
        """Remove a listener registered with :meth:`on`."""
        self._events.off(event, listener)

    @property
    def last_transaction_id(self) -> Optional[str]:
        """The cursor: the newest transaction id seen live, or from ``state``.

        Sent as ``since`` when the client resubscribes after a reconnect.
        """
        return self._cursor

    @property
    def is_detached(self) -> bool:
        """True once the handle will receive nothing more (see the class doc)."""
        return self._detached

    def unsubscribe(self) -> None:
        """Send ``unsubscribe`` (when connected) and detach. Idempotent.

        Frames already buffered for ``async for`` are still yielded; then the
        iteration ends.
        """
        if self._detached:
            return
        self._owner._unsubscribe(self)
        self._detach(None)

    def __aiter__(self) -> "Subscription":
        self._iterating = True
        return self

    async def __anext__(self) -> ChannelFrame:
        self._iterating = True
        while True:
            if self._overflowed:
                dropped, self._dropped, self._overflowed = self._dropped, 0, False
                raise SubscriptionOverflow(self.share_data_id, dropped, self._queue_size)
            if self._queue:
                return self._queue.popleft()
            if self._detached:
                if self._end_error is not None:
                    raise self._end_error
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    # -- driven by the client's protocol object --------------------------------

    @property
    def _queued(self) -> int:
        """Frames waiting in the iterator's buffer (for tests and diagnostics)."""
        return len(self._queue)

    def _live_order(self, transaction_id: str) -> int:
        """:data:`IN_ORDER`, :data:`DUPLICATE` or :data:`GAP` for a live transaction with this id."""
        if self._renumbered:
            return IN_ORDER
        last = 0 if self._from_start else transaction_number(self._cursor)
        current = transaction_number(transaction_id)
        if last is None or current is None:
            return IN_ORDER
        if current <= last:
            return DUPLICATE
        return GAP if current > last + 1 else IN_ORDER

    @property
    def _gap_cursor(self) -> Optional[str]:
        """``since`` for the resubscribe that fills a gap (``"0"``: before the first transaction)."""
        return "0" if self._from_start else self._cursor

    def _dispatch(self, frame: ChannelFrame) -> Optional[SubscriptionOverflow]:
        """Apply the cursor rules, call the listeners, buffer for the iterator.

        Returns the overflow to report when this frame made an ``async for``
        consumer overflow (None otherwise, and for consumers that never
        iterated: they are listener-only and nothing is lost for them).
        """
        if self._detached:
            return None
        kind = frame.type
        if kind == "state":
            self._cursor = frame.last_transaction_id  # type: ignore[union-attr]
            self._from_start = self._cursor is None
            self._renumbered = False
        elif kind == "transaction":
            if not frame.replayed:  # type: ignore[union-attr]
                self._cursor = frame.transaction_id  # type: ignore[union-attr]
                self._from_start = self._renumbered = False
        elif kind == "lifecycle":
            self._from_start = False
            if frame.event == "removed":  # type: ignore[union-attr]
                self._cursor = None
            else:
                self._renumbered = True
        self._events.emit(kind, frame)
        return self._buffer(frame)

    def _buffer(self, frame: ChannelFrame) -> Optional[SubscriptionOverflow]:
        if self._overflowed:
            self._dropped += 1
            return None
        if len(self._queue) >= self._queue_size:
            self._dropped = len(self._queue) + 1
            self._queue.clear()
            self._overflowed = True
            self._wake()
            if self._iterating:
                return SubscriptionOverflow(self.share_data_id, self._dropped, self._queue_size)
            return None
        self._queue.append(frame)
        self._wake()
        return None

    def _detach(self, error: Optional[BaseException]) -> None:
        """Stop receiving; the iterator ends (or raises ``error``) once drained."""
        if self._detached:
            return
        self._detached = True
        self._end_error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            try:
                waiter.set_result(None)
            except RuntimeError:  # its event loop is closed: nobody can wait on it
                pass
