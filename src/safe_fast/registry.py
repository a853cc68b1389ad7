"""Channel registries: who is subscribed to which ShareData id.

A registry's ``broadcast`` is the fan-out: it encodes the message into one
WebSocket frame **once** and queues the same bytes on every subscribed
connection (see ``_core``: each connection coalesces what it gets in one
event-loop iteration into one write).

Connections handed to a registry are :class:`safe_fast.server.ServerConnection`
objects: ``send_frame(frame_bytes)`` queues an encoded frame,
``send_message(message)`` encodes and queues one message.

The built-in registries call ``fanout_observer(deliveries, frame_bytes)``,
when one is set, once per fan-out (never per subscriber): the metrics count
deliveries through it.

They also keep STORE.md's rule 4, "never a transaction the subscriber's
snapshot already holds": with a store, a subscribe's read-through may bring
a record into the manager before the commit that wrote it is announced, so
the snapshot holds transaction *n* and the announcement of *n* follows. A
registry notes, per subscriber, the number of the last transaction in the
snapshot it took (:func:`snapshot_number`) and, per channel, an upper bound
of those numbers: a transaction above the bound goes to every subscriber
with no work per subscriber; one at or below it (the rare race) skips the
subscribers whose snapshot holds it. A ``lifecycle`` frame starts a new
history (ids may count from 1 again), so it resets the numbers.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Protocol, Union, runtime_checkable

from ._backend import core
from .messages import ServerMessage, encode_message, transaction_number

__all__ = ["ChannelRegistry", "InMemoryChannelRegistry", "FanoutObserver", "encode_broadcast_frame"]

NO_TRANSACTION = -1
"""The number of "no transaction yet" (ids count from 1)."""

FanoutObserver = Callable[[int, int], None]
"""Called once per fan-out with the subscribers that took the frame and the frame's size."""


def encode_broadcast_frame(message: ServerMessage | dict[str, Any]) -> bytes:
    """The complete text frame for ``message``, to write to every subscriber."""
    return core.encode_frame(encode_message(message))


def kind_and_number(message: Any) -> tuple[Any, Optional[int]]:
    """A message's ``type`` and, for a ``transaction``, its id as a number."""
    if isinstance(message, dict):
        kind = message.get("type")
        return kind, transaction_number(message.get("transactionId")) if kind == "transaction" else None
    kind = message.type
    return kind, transaction_number(message.transaction_id) if kind == "transaction" else None


def snapshot_number(connection: Any, share_data_id: str) -> Optional[int]:
    """The ``lastTransactionId`` of the snapshot a server connection is about to get, as a number.

    The server registers a subscriber and takes its ``state`` frame from its
    manager with no ``await`` in between, so the manager holds that snapshot
    now. None when the connection is not a server connection.
    """
    manager = getattr(getattr(connection, "hub", None), "manager", None)
    if manager is None:
        return None
    share_data = manager.get_share_data_by_id(share_data_id)
    if share_data is None:
        return None
    number = transaction_number(share_data.last_transaction_id)
    return NO_TRANSACTION if number is None else number


def recipients(subscribers: dict[Any, int], number: Optional[int], newest: int) -> dict[Any, int]:
    """Who gets a frame: every subscriber, except, for transaction ``number`` at or below
    ``newest`` (the upper bound of their snapshots: the rare race), those whose snapshot holds it."""
    if number is None or number > newest:
        return subscribers
    return {connection: seen for connection, seen in subscribers.items() if seen < number}


def forget_snapshots(subscribers: dict[Any, int]) -> None:
    """A new history (after a ``lifecycle`` frame): no snapshot holds any of its transactions yet."""
    for connection in subscribers:
        subscribers[connection] = NO_TRANSACTION


@runtime_checkable
class ChannelRegistry(Protocol):
    """Subscriptions and fan-out. Methods may return awaitables."""

    def subscribe(self, share_data_id: str, connection: Any) -> Union[None, Awaitable[None]]:
        """Add ``connection`` to the subscribers of ``share_data_id``.

        Called again for a connection that is already subscribed each time it
        takes a new snapshot (a repeated subscribe): that must not add it twice.
        """

    def unsubscribe(self, share_data_id: str, connection: Any) -> Union[None, Awaitable[None]]: ...

    def broadcast(self, share_data_id: str, message: Any) -> Union[None, Awaitable[None]]: ...

    def remove_connection(self, connection: Any) -> Union[None, Awaitable[None]]: ...

    # Optional: ``shared = False`` says broadcasts reach this process's
    # subscribers only (then the server announces other nodes' replacements
    # and removals itself); a registry without the attribute counts as shared.


class InMemoryChannelRegistry:
    """Subscriptions of this process, fan-out in this process."""

    shared = False
    """Not shared with other nodes: what another node changes (learnt from a
    shared store) is announced to this registry's subscribers by this node."""

    def __init__(self) -> None:
        # An insertion-ordered dict per channel: O(1) add/remove, and frames
        # go out to subscribers in the order they subscribed. Each subscriber
        # maps to the number of the last transaction its snapshot holds.
        self._channels: dict[str, dict[Any, int]] = {}
        # Per channel, an upper bound of those numbers (see the module doc).
        self._newest: dict[str, int] = {}
        self.fanout_observer: Optional[FanoutObserver] = None

    def subscribe(self, share_data_id: str, connection: Any) -> None:
        # Again for a subscriber already here (it keeps its place): it has just taken a new snapshot.
        snapshot = snapshot_number(connection, share_data_id)
        if snapshot is None:
            snapshot = NO_TRANSACTION
        self._channels.setdefault(share_data_id, {})[connection] = snapshot
        if snapshot > self._newest.get(share_data_id, NO_TRANSACTION):
            self._newest[share_data_id] = snapshot

    def unsubscribe(self, share_data_id: str, connection: Any) -> None:
        subscribers = self._channels.get(share_data_id)
        if subscribers is not None:
            subscribers.pop(connection, None)
            if not subscribers:
                del self._channels[share_data_id]
                self._newest.pop(share_data_id, None)

    def broadcast(self, share_data_id: str, message: Any) -> None:
        subscribers = self._channels.get(share_data_id)
        if not subscribers:
            return
        kind, number = kind_and_number(message)
        if kind == "lifecycle" and self._newest.pop(share_data_id, NO_TRANSACTION) != NO_TRANSACTION:
            forget_snapshots(subscribers)
        frame = encode_broadcast_frame(message)
        delivered = core.fanout(frame, recipients(subscribers, number, self._newest.get(share_data_id, NO_TRANSACTION)))
        if self.fanout_observer is not None:
            self.fanout_observer(delivered, len(frame))

    def broadcast_frame(self, share_data_id: str, frame: bytes) -> None:
        """Fan out an already-encoded frame, to every subscriber (it carries no number to check)."""
        subscribers = self._channels.get(share_data_id)
        if subscribers:
            delivered = core.fanout(frame, subscribers)
            if self.fanout_observer is not None:
                self.fanout_observer(delivered, len(frame))

    def remove_connection(self, connection: Any) -> None:
        # The connection's own list (a ServerConnection has one) spares a
        # scan of every channel per disconnect.
        channels = getattr(connection, "subscriptions", None)
        if channels is None:
            channels = [i for i, subs in self._channels.items() if connection in subs]
        for share_data_id in list(channels):
            self.unsubscribe(share_data_id, connection)

    def remove_channel(self, share_data_id: str) -> None:
        """Drop every subscriber of ``share_data_id`` (after ``lifecycle removed``)."""
        self._channels.pop(share_data_id, None)
        self._newest.pop(share_data_id, None)

    def subscribers(self, share_data_id: str) -> list[Any]:
        """The connections subscribed to ``share_data_id``."""
        return list(self._channels.get(share_data_id, ()))

    def channel_count(self) -> int:
        return len(self._channels)
