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
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Protocol, Union, runtime_checkable

from ._backend import core
from .messages import ServerMessage, encode_message

__all__ = ["ChannelRegistry", "InMemoryChannelRegistry", "FanoutObserver", "encode_broadcast_frame"]

FanoutObserver = Callable[[int, int], None]
"""Called once per fan-out with the subscribers that took the frame and the frame's size."""


def encode_broadcast_frame(message: ServerMessage | dict[str, Any]) -> bytes:
    """The complete text frame for ``message``, to write to every subscriber."""
    return core.encode_frame(encode_message(message))


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


class InMemoryChannelRegistry:
    """Subscriptions of this process, fan-out in this process."""

    def __init__(self) -> None:
        # An insertion-ordered dict per channel: O(1) add/remove, and frames
        # go out to subscribers in the order they subscribed.
        self._channels: dict[str, dict[Any, None]] = {}
        self.fanout_observer: Optional[FanoutObserver] = None

    def subscribe(self, share_data_id: str, connection: Any) -> None:
        self._channels.setdefault(share_data_id, {})[connection] = None

    def unsubscribe(self, share_data_id: str, connection: Any) -> None:
        subscribers = self._channels.get(share_data_id)
        if subscribers is not None:
            subscribers.pop(connection, None)
            if not subscribers:
                del self._channels[share_data_id]

    def broadcast(self, share_data_id: str, message: Any) -> None:
        subscribers = self._channels.get(share_data_id)
        if subscribers:
            frame = encode_broadcast_frame(message)
            delivered = core.fanout(frame, subscribers)
            if self.fanout_observer is not None:
                self.fanout_observer(delivered, len(frame))

    def broadcast_frame(self, share_data_id: str, frame: bytes) -> None:
        """Fan out an already-encoded frame."""
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

    def subscribers(self, share_data_id: str) -> list[Any]:
        """The connections subscribed to ``share_data_id``."""
        return list(self._channels.get(share_data_id, ()))

    def channel_count(self) -> int:
        return len(self._channels)
