"""Give back the buffers picows keeps for every idle connection.

Theory of operation
-------------------

picows 2.3 allocates two buffers per connection and never lets either be
smaller: a read buffer of at least 2 KiB (``max(read_buffer_init_size,
2048)``) and a 1 KiB write buffer, allocated up front. At 20,000 idle
connections that is 60 MiB holding nothing, more than everything else a
connection costs. Neither size is an option (``docs/picows-upstream.md``
has the change picows itself would need), so the server trims both, at
moments when picows is not using them:

- **The write buffer** only ever frames a control frame while picows sends
  it: ``send_close`` (the only control frame this server sends through
  picows; pings and pongs it frames itself) copies the frame into the
  transport before it returns. It is freed after the upgrade; a later send
  allocates it again, as picows' own ``MemoryBuffer`` grows from nothing
  (``PyMem_Realloc(NULL, n)`` allocates).
- **The read buffer** is shrunk to :data:`READ_CAPACITY` bytes when it holds
  no unread byte. The check runs outside picows' own call stack (one
  ``call_soon`` batch per loop iteration, :class:`BufferTrimmer`): after the
  upgrade, and after a read that may have made the buffer grow (a message
  of :data:`GROWS_AT` bytes or more, or several messages in one read) and
  left nothing behind. picows grows it again by doubling when a read needs
  more, as it always does. A connection whose buffer was busy (unread bytes
  of the next message, or a write still queued in the transport) is tried
  again with its next frame.

A trim costs a few microseconds (pure Python): once per connection, then
once per message of :data:`GROWS_AT` bytes or more, on the receiving side
only. The broadcast path never touches picows' buffers.

Both buffers are picows ``MemoryBuffer`` objects. Their fields (after the
object header and the Cython vtable pointer: ``size``, ``capacity``,
``data``) are declared in picows' own ``picows.pxd`` for Cython users; they
are read and written here through ``ctypes`` so both cores share one
implementation (none of this is on the broadcast path). The owner holds the
buffer as its only ``MemoryBuffer`` reference (``gc.get_referents``).

Nothing is written unless every check passes: the installed picows is one
whose layout was verified (:data:`VERIFIED_PICOWS`), the buffer type has the
expected size, and the values read are consistent with each other (for the
read buffer, with the memory picows' own ``get_buffer`` hands out). On any
other picows the trimmer does nothing and each server says so in its log;
a test (``tests/server/test_footprint.py``) fails then, so an upgrade of
picows is checked against its ``picows.pxd`` before this list grows.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from typing import Any, Optional

import picows

__all__ = ["BufferTrimmer", "READ_CAPACITY", "GROWS_AT", "VERIFIED_PICOWS", "active", "buffer_state", "trim"]

logger = logging.getLogger("safe_fast.server")

VERIFIED_PICOWS = ("2.3.1",)
"""picows versions whose ``MemoryBuffer`` layout and buffer use were checked against its source."""

_SPARE = 256
"""What picows keeps spare past the part of its read buffer it reads into."""

READ_CAPACITY = 768
"""The trimmed read buffer: 512 bytes picows reads into, and the 256 it keeps
spare for its SIMD parsers. picows doubles it after a read that leaves 256
or fewer of the 512 free: a request shorter than :data:`GROWS_AT` (every
request of this protocol but a large ``propose``) never grows it."""

GROWS_AT = (READ_CAPACITY - _SPARE) - 256 - 6
"""A message this long or longer may have made the read buffer grow: picows
doubles it when a read leaves 256 bytes or fewer of its reading part free,
and a client frame has a header of 6 bytes or more."""

# MemoryBuffer: PyObject_HEAD (16), vtable pointer (8), then these (picows.pxd).
_SIZE, _CAPACITY, _DATA = 24, 32, 40
_BASICSIZE = 48

# Function objects of our own (item access makes new ones; attribute access
# would set the types on ctypes.pythonapi's shared ones, for every module).
_malloc = ctypes.pythonapi["PyMem_Malloc"]
_malloc.restype = ctypes.c_void_p
_malloc.argtypes = (ctypes.c_size_t,)
_free = ctypes.pythonapi["PyMem_Free"]
_free.restype = None
_free.argtypes = (ctypes.c_void_p,)


def _memory_buffer_type() -> Optional[type]:
    if picows.__version__ not in VERIFIED_PICOWS:
        return None
    found = getattr(picows.picows, "MemoryBuffer", None)
    if not isinstance(found, type) or found.__basicsize__ != _BASICSIZE:
        return None
    return found


_MEMORY_BUFFER = _memory_buffer_type()


def active() -> bool:
    """Whether the installed picows is one the trimmer works on."""
    return _MEMORY_BUFFER is not None


def _buffer_of(owner: Any) -> Any:
    """The one MemoryBuffer ``owner`` holds (None if not exactly one)."""
    found = [ref for ref in gc.get_referents(owner) if type(ref) is _MEMORY_BUFFER]
    return found[0] if len(found) == 1 else None


def _fields(buffer: Any) -> tuple[int, int, int]:
    address = id(buffer)
    return (
        ctypes.c_ssize_t.from_address(address + _SIZE).value,
        ctypes.c_ssize_t.from_address(address + _CAPACITY).value,
        ctypes.c_size_t.from_address(address + _DATA).value,
    )


def _set_fields(buffer: Any, size: int, capacity: int, data: int) -> None:
    address = id(buffer)
    ctypes.c_size_t.from_address(address + _DATA).value = data
    ctypes.c_ssize_t.from_address(address + _CAPACITY).value = capacity
    ctypes.c_ssize_t.from_address(address + _SIZE).value = size


def buffer_state(websocket: Any) -> Optional[tuple[int, int]]:
    """(read buffer capacity, write buffer capacity) of a picows ``WSTransport``; None if unknown."""
    if _MEMORY_BUFFER is None:
        return None
    read = _buffer_of(websocket.underlying_transport.get_protocol())
    write = _buffer_of(websocket)
    if read is None or write is None:
        return None
    return _fields(read)[1], _fields(write)[1]


def _release_write_buffer(websocket: Any) -> bool:
    """Free the write buffer; False if it must wait (the transport may still hold a view of it)."""
    buffer = _buffer_of(websocket)
    if buffer is None:
        return True
    size, capacity, data = _fields(buffer)
    if not data or not 0 <= size <= capacity:
        return True
    if websocket.underlying_transport.get_write_buffer_size():
        # A large picows send hands the transport a view of this buffer.
        return False
    _set_fields(buffer, 0, 0, 0)
    _free(data)
    return True


def _shrink_read_buffer(protocol: Any) -> bool:
    """Shrink the read buffer; False if it must wait (it holds unread bytes)."""
    buffer = _buffer_of(protocol)
    if buffer is None:
        return True
    size, capacity, data = _fields(buffer)
    if capacity <= READ_CAPACITY or not data or not size or size + _SPARE > capacity:
        return True  # small already (or the layout is not what it seems: leave it)
    # What picows would read into next: its unread bytes end where this starts.
    free = protocol.get_buffer(-1)
    available = len(free)
    if not available:
        return False  # full of unread bytes
    start = ctypes.c_char.from_buffer(free)
    unread = ctypes.addressof(start) - data
    del start
    free.release()
    if unread != size - available:
        return True  # not picows' buffer as this module knows it: leave it
    if unread:
        return False
    # A new block rather than a realloc: nothing in it needs keeping, and the
    # old block is whole again for the next connection's first read buffer.
    smaller = _malloc(READ_CAPACITY)
    if smaller:
        _set_fields(buffer, READ_CAPACITY - _SPARE, READ_CAPACITY, smaller)
        _free(data)
    return True


def trim(websocket: Any) -> bool:
    """Shrink the idle buffers of one picows connection (a ``WSTransport``); see the module docstring.

    False when a buffer was busy and is worth another try later.
    """
    if _MEMORY_BUFFER is None or websocket.is_disconnected:
        return True
    released = _release_write_buffer(websocket)
    return _shrink_read_buffer(websocket.underlying_transport.get_protocol()) and released


class BufferTrimmer:
    """Trims the connections scheduled during one loop iteration, in one callback after it.

    A connection whose buffer was busy then is kept in :attr:`skipped`; the
    listener schedules it again with its next frame, and forgets it when it
    disconnects.
    """

    __slots__ = ("_loop", "_due", "skipped")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: Optional[set[Any]] = None
        self.skipped: set[Any] = set()
        if _MEMORY_BUFFER is None:
            logger.info(
                "picows %s is not one whose buffers this version can trim (%s): idle connections keep ~2.3 KiB more",
                picows.__version__,
                ", ".join(VERIFIED_PICOWS),
            )

    def schedule(self, websocket: Any) -> None:
        if _MEMORY_BUFFER is None:
            return
        if self._due is None:
            self._due = set()
            self._loop.call_soon(self._run)
        self._due.add(websocket)

    def _run(self) -> None:
        due, self._due = self._due, None
        skipped = self.skipped
        for websocket in due or ():
            try:
                done = trim(websocket)
            except Exception:  # a trim is an optimisation: never the connection's end
                logger.exception("could not trim the buffers of a connection")
                done = True
            if done:
                skipped.discard(websocket)
            else:
                skipped.add(websocket)
