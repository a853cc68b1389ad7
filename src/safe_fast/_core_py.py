"""The broadcast hot path in pure Python: the twin of ``_core.pyx``.

Both modules export the same names with the same behaviour; ``safe_fast._backend``
picks one at import time. Keep them in step: the parity tests drive both with
the same random operations.

What lives here, and why it is the hot path:

* :func:`encode_frame` turns a payload into one complete, unmasked WebSocket
  frame. A broadcast is encoded once and the same ``bytes`` object is queued
  for every subscriber.
* :class:`Outbox` is one connection's write side. Frames queued during one
  event-loop iteration leave in a single ``transport.write`` (one system call)
  when the :class:`Flusher` runs, before the loop sleeps again. It accounts the
  bytes it holds plus what the transport still buffers. When a frame would
  take that total past ``max_buffered_bytes``, the queued frames go to the
  socket at once, and the frame is refused only if what the socket did not
  take, plus the frame, is still past the cap: "buffered" means bytes the
  peer has not taken, so a burst larger than the cap reaches a reader that
  keeps reading. With nothing buffered, one frame larger than the cap goes.
  The compiled twin also sends straight to a plain socket whose transport
  holds nothing (one ``send(2)``, past the transport's write path); the
  bytes and their order are the same as through ``transport.write``.
* :func:`fanout` queues one frame on many outboxes.
* :class:`ReplayRing` is the bounded per-channel replay window: O(1) append,
  O(1) cursor lookup.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

__all__ = ["encode_frame", "Flusher", "Outbox", "fanout", "ReplayRing", "OPCODE_TEXT", "OPCODE_BINARY"]

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


def encode_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """One final, unmasked frame (server-to-client framing, RFC 6455 §5.2)."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = bytes((first, size))
    elif size < 65536:
        header = bytes((first, 126, size >> 8, size & 0xFF))
    else:
        header = bytes((first, 127)) + size.to_bytes(8, "big")
    return header + payload


class Flusher:
    """Writes every dirty outbox once per event-loop iteration.

    The first frame queued in an iteration schedules one ``call_soon``; all
    outboxes touched until then are flushed by that single callback, which the
    loop runs before it next waits for I/O.
    """

    __slots__ = ("loop", "_dirty", "_scheduled", "_in_round", "_joined_frames", "_joined")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._in_round = False
        # The last frame sequence joined in this round and its bytes: after a
        # fan-out, every subscriber holds the same frames, so they are joined
        # once per round rather than once per subscriber. Kept only during a
        # round, so nothing outlives it.
        self._joined_frames: list[bytes] = []
        self._joined = b""

    def mark(self, outbox: "Outbox") -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        # Swap first: a flush may queue more (an overflow close frame), which
        # then belongs to the next round.
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        self._in_round = True
        error: Optional[Exception] = None
        try:
            for outbox in dirty:
                # One failing transport must not strand the others: an outbox
                # left holding frames is never marked dirty again.
                try:
                    outbox.flush()
                except Exception as exc:
                    if error is None:
                        error = exc
        finally:
            self._in_round = False
            self._joined_frames, self._joined = [], b""
        if error is not None:
            raise error

    def join(self, frames: list[bytes]) -> bytes:
        """``b"".join(frames)``, reusing this round's previous result for the same frames.

        Also before the round, once it is scheduled: a burst past the cap sends
        the subscribers' (shared) queued frames early, and the round that
        follows drops the memo.
        """
        if not (self._in_round or self._scheduled):
            return b"".join(frames)
        # List equality checks identity first: for a fan-out's shared frames
        # this is k pointer comparisons.
        if frames != self._joined_frames:
            self._joined_frames, self._joined = frames, b"".join(frames)
        return self._joined


class Outbox:
    """The write side of one connection, with coalescing and accounting.

    ``transport`` needs ``write``, ``get_write_buffer_size`` and ``is_closing``
    (any asyncio transport). With ``websocket`` given, nothing is written once
    its ``is_close_frame_sent`` is true. The compiled core looks these methods up once,
    when the outbox is made, so replacing them on the transport afterwards is
    not supported. Subclasses override :meth:`on_overflow`.
    """

    __slots__ = (
        "transport",
        "websocket",
        "flusher",
        "max_buffered_bytes",
        "_head",
        "_frames",
        "_queued",
        "_transport_bytes",
        "_open",
        "__weakref__",
    )

    def __init__(self, transport: Any, flusher: Flusher, max_buffered_bytes: int, websocket: Any = None) -> None:
        self.transport = transport
        # Whose ``is_close_frame_sent`` stops every write (picows' WSTransport):
        # the WebSocket layer may send a close frame on its own (a framing
        # error), and after a close frame nothing else may go out.
        self.websocket = websocket
        self.flusher = flusher
        self.max_buffered_bytes = max_buffered_bytes
        # What is queued: nothing (both None), one frame in ``_head`` (the
        # common case of a quiet connection, which then costs no list), or
        # two or more in ``_frames``.
        self._head: Optional[bytes] = None
        self._frames: Optional[list[bytes]] = None
        self._queued = 0
        # An upper bound of what the transport holds: everything written since
        # it was last measured (it only drains meanwhile). Measured again only
        # when the bound reaches the cap, so a write costs no extra call.
        # (Control frames written to the transport by others, e.g. picows'
        # pongs, are not counted; they are a few bytes, and the measurement
        # at the cap sees them.)
        self._transport_bytes = 0
        self._open = True

    @property
    def is_open(self) -> bool:
        """False once the outbox overflowed or was closed: it takes no frames."""
        return self._open

    @property
    def queued_bytes(self) -> int:
        """Bytes queued here and not yet handed to the transport."""
        return self._queued

    @property
    def buffered_amount(self) -> int:
        """Unsent bytes: queued here plus held by the transport."""
        return self._queued + self.transport.get_write_buffer_size()

    def send_frame(self, frame: bytes) -> bool:
        """Queue one complete frame; False if it was refused.

        A frame that would take the buffered total past ``max_buffered_bytes``
        first sends what is queued; if the transport then still holds so much
        that the frame would cross the cap, the outbox closes and calls
        :meth:`on_overflow` once with the transport's backlog. The cap bounds
        a backlog, not a frame: with nothing buffered, any one frame goes.
        """
        if not self._open:
            return False
        size = len(frame)
        marked = False
        if self._transport_bytes + self._queued + size > self.max_buffered_bytes:
            # Frames merely waiting for the end of this iteration are not
            # behind: hand them to the socket now, and judge by what it did
            # not take. (The normal case keeps its one write per iteration.)
            if self._queued:
                marked = True  # queued frames mean it is in this round already
                backlog = self._queued
                try:
                    self.flush()
                except Exception:
                    # A transport that fails here is gone for this outbox;
                    # the rest of the fan-out goes on.
                    self._open = False
                    self.on_overflow(backlog)
                    return False
            self._transport_bytes = self.transport.get_write_buffer_size()
            total = self._transport_bytes + size
            if total > self.max_buffered_bytes and total != size:
                self._open = False
                self.on_overflow(self._transport_bytes)
                return False
        if self._frames is not None:
            self._frames.append(frame)
        elif self._head is None:
            if not marked:
                self.flusher.mark(self)
            self._head = frame
        else:
            self._frames = [self._head, frame]
            self._head = None
        self._queued += size
        return True

    def flush(self) -> None:
        """Hand everything queued to the transport in one write."""
        head, frames = self._head, self._frames
        if head is None and frames is None:
            return
        self._head = self._frames = None
        self._queued = 0
        if self.transport.is_closing():
            return
        if self.websocket is not None and self.websocket.is_close_frame_sent:
            self._open = False
            self.close_frame_sent()
            return
        data = head if frames is None else self.flusher.join(frames)
        self.transport.write(data)
        self._transport_bytes += len(data)

    def close_outbox(self, flush: bool = True) -> None:
        """Stop taking frames; write what is queued first unless ``flush`` is False."""
        if flush:
            self.flush()
        else:
            self._head = self._frames = None
            self._queued = 0
        self._open = False

    def on_overflow(self, buffered_amount: int) -> None:
        """Called once when a frame is refused for overflow."""

    def close_frame_sent(self) -> None:
        """Called once when a flush finds that ``websocket`` sent a close frame on its own."""


def fanout(frame: bytes, outboxes: Iterable[Outbox]) -> int:
    """Queue ``frame`` on every outbox; returns how many took it.

    Iterates a snapshot, so an overflow handler may change the collection.
    """
    delivered = 0
    for outbox in list(outboxes):
        if outbox.send_frame(frame):
            delivered += 1
    return delivered


class ReplayRing:
    """A fixed-capacity window of (transaction id → entry), oldest evicted first."""

    __slots__ = ("capacity", "_ids", "_entries", "_index", "_next")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: list[str | None] = [None] * capacity
        self._entries: list[Any] = [None] * capacity
        # transaction id -> absolute sequence number of its newest append
        self._index: dict[str, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return min(self._next, self.capacity)

    def append(self, transaction_id: str, entry: Any) -> None:
        seq = self._next
        slot = seq % self.capacity
        if seq >= self.capacity:
            evicted = self._ids[slot]
            if evicted is not None and self._index.get(evicted) == seq - self.capacity:
                del self._index[evicted]
        self._ids[slot] = transaction_id
        self._entries[slot] = entry
        self._index[transaction_id] = seq
        self._next = seq + 1

    def entries_since(self, cursor: str) -> list[Any] | None:
        """Entries strictly after ``cursor``; None if it is not retained."""
        seq = self._index.get(cursor)
        if seq is None:
            return None
        capacity = self.capacity
        entries = self._entries
        return [entries[i % capacity] for i in range(seq + 1, self._next)]

    def entries(self) -> list[Any]:
        """All retained entries, oldest first."""
        start = max(0, self._next - self.capacity)
        return [self._entries[i % self.capacity] for i in range(start, self._next)]
