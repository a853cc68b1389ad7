# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The broadcast hot path, compiled: the twin of ``_core_py.py``.

Same names, same behaviour; see that module for the why of each piece. Only
what runs per frame or per subscriber is here.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from libc.string cimport memcpy

import socket as socket_module
import sys

cdef extern from *:
    """
    #if defined(_WIN32)
    static Py_ssize_t safe_fast_try_send(int fd, const char *buf, Py_ssize_t len) { return -1; }
    #else
    #include <errno.h>
    #include <sys/socket.h>
    /* One non-blocking send(2): the bytes sent, 0 if the socket would block,
       -1 on any other error (the transport then meets it and reports it). */
    static Py_ssize_t safe_fast_try_send(int fd, const char *buf, Py_ssize_t len) {
        ssize_t n;
        /* CPython ignores SIGPIPE, but an embedding program may not. */
        #ifdef MSG_NOSIGNAL
        const int flags = MSG_DONTWAIT | MSG_NOSIGNAL;
        #else
        const int flags = MSG_DONTWAIT;
        #endif
        do {
            n = send(fd, buf, (size_t)len, flags);
        } while (n < 0 && errno == EINTR);
        if (n >= 0) return (Py_ssize_t)n;
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    }
    #endif
    """
    Py_ssize_t safe_fast_try_send(int fd, const char *buf, Py_ssize_t len) nogil

__all__ = ["encode_frame", "Flusher", "Outbox", "fanout", "ReplayRing", "OPCODE_TEXT", "OPCODE_BINARY"]

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


cpdef bytes encode_frame(bytes payload, int opcode=0x1):
    """One final, unmasked frame (server-to-client framing, RFC 6455 §5.2)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header
    cdef unsigned long long length
    cdef int i
    if size < 126:
        header = 2
    elif size < 65536:
        header = 4
    else:
        header = 10
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, header + size)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    out[0] = 0x80 | (opcode & 0x0F)
    if header == 2:
        out[1] = <unsigned char>size
    elif header == 4:
        out[1] = 126
        out[2] = <unsigned char>(size >> 8)
        out[3] = <unsigned char>(size & 0xFF)
    else:
        out[1] = 127
        length = <unsigned long long>size
        for i in range(8):
            out[9 - i] = <unsigned char>(length & 0xFF)
            length >>= 8
    memcpy(out + header, PyBytes_AS_STRING(payload), size)
    return frame


cdef class Flusher:
    """Writes every dirty outbox once per event-loop iteration."""

    def __init__(self, loop):
        self.loop = loop
        self._dirty = []
        self._scheduled = False
        self._flush_all = self.flush_all
        self._in_round = False
        self._joined_frames = []
        self._joined = b""

    cdef void mark(self, Outbox outbox) except *:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush_all)

    cpdef flush_all(self):
        cdef list dirty = self._dirty
        cdef Py_ssize_t i, n
        cdef object error = None
        self._dirty = []
        self._scheduled = False
        n = PyList_GET_SIZE(dirty)
        self._in_round = True
        try:
            for i in range(n):
                try:
                    (<Outbox>PyList_GET_ITEM(dirty, i))._flush()
                except Exception as exc:
                    if error is None:
                        error = exc
        finally:
            self._in_round = False
            self._joined_frames = []
            self._joined = b""
        if error is not None:
            raise error

    cpdef bytes join(self, list frames):
        """``b"".join(frames)``, reusing this round's previous result for the same frames."""
        cdef list last = self._joined_frames
        cdef Py_ssize_t i, n = PyList_GET_SIZE(frames)
        if not (self._in_round or self._scheduled):
            return b"".join(frames)
        if n == PyList_GET_SIZE(last):
            for i in range(n):
                if PyList_GET_ITEM(frames, i) != PyList_GET_ITEM(last, i):
                    break
            else:
                return self._joined
        # Not the same objects; the pure twin compares by value, and equal
        # frames join to equal bytes, so the result is the same either way.
        self._joined_frames = frames
        self._joined = b"".join(frames)
        return self._joined


cdef class Outbox:
    """The write side of one connection, with coalescing and accounting."""

    def __init__(self, transport, Flusher flusher, Py_ssize_t max_buffered_bytes, websocket=None):
        self.transport = transport
        self.websocket = websocket
        self.flusher = flusher
        self.max_buffered_bytes = max_buffered_bytes
        self._head = None
        self._frames = None
        self._queued = 0
        self._transport_bytes = 0
        self._open = True
        self._write = transport.write
        self._is_closing = transport.is_closing
        self._get_write_buffer_size = transport.get_write_buffer_size
        self._fd = _plain_socket_fd(transport)

    @property
    def is_open(self):
        """False once the outbox overflowed or was closed: it takes no frames."""
        return self._open

    @property
    def queued_bytes(self):
        """Bytes queued here and not yet handed to the transport."""
        return self._queued

    @property
    def buffered_amount(self):
        """Unsent bytes: queued here plus held by the transport."""
        return self._queued + self._get_write_buffer_size()

    def send_frame(self, bytes frame):
        """Queue one complete frame; False if it was refused."""
        return self._send(frame)

    def flush(self):
        """Hand everything queued to the transport in one write."""
        self._flush()

    cdef bint _send(self, bytes frame) except -1:
        cdef Py_ssize_t size, total, backlog
        cdef bint marked = False
        if not self._open:
            return False
        size = PyBytes_GET_SIZE(frame)
        if self._transport_bytes + self._queued + size > self.max_buffered_bytes:
            # Queued frames are not behind: send them now, judge what is left.
            if self._queued:
                marked = True  # queued frames mean it is in this round already
                backlog = self._queued
                try:
                    self._flush()
                except Exception:
                    # A failing transport is gone for this outbox; the fan-out goes on.
                    self._open = False
                    self.on_overflow(backlog)
                    return False
            self._transport_bytes = self._get_write_buffer_size()
            total = self._transport_bytes + size
            # The cap bounds a backlog, not a frame: with nothing buffered,
            # any one frame goes.
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

    cdef int _flush(self) except -1:
        cdef bytes data = self._head
        cdef list frames = self._frames
        cdef Py_ssize_t sent
        if data is None and frames is None:
            return 0
        self._head = None
        self._frames = None
        self._queued = 0
        if self._is_closing():
            return 0
        if self.websocket is not None and self.websocket.is_close_frame_sent:
            self._open = False
            self.close_frame_sent()
            return 0
        if frames is not None:
            data = self.flusher.join(frames)
        if self._fd >= 0 and self._get_write_buffer_size() == 0:
            # Nothing waits in the transport, so sending straight to the socket
            # keeps the byte order, and costs one send(2) instead of the
            # transport's write path. What the kernel does not take now, the
            # transport queues (or, on an error, reports) as usual.
            sent = safe_fast_try_send(self._fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            if sent == PyBytes_GET_SIZE(data):
                return 0
            if sent > 0:
                data = data[sent:]
        self._write(data)
        self._transport_bytes += PyBytes_GET_SIZE(data)
        return 0

    def close_outbox(self, bint flush=True):
        """Stop taking frames; write what is queued first unless ``flush`` is False."""
        if flush:
            self._flush()
        else:
            self._head = None
            self._frames = None
            self._queued = 0
        self._open = False

    def on_overflow(self, buffered_amount):
        """Called once when a frame is refused for overflow."""

    def close_frame_sent(self):
        """Called once when a flush finds that ``websocket`` sent a close frame on its own."""


cdef int _plain_socket_fd(transport) except? -2:
    """The fd of a plain (not TLS) stream socket behind ``transport``, else -1.

    Only such a socket may take bytes directly, bypassing the transport.
    """
    if sys.platform == "win32":
        return -1
    get_extra_info = getattr(transport, "get_extra_info", None)
    if get_extra_info is None or get_extra_info("sslcontext") is not None or get_extra_info("ssl_object") is not None:
        return -1
    sock = get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None and sock.type == socket_module.SOCK_STREAM else -1
    except (AttributeError, OSError):
        return -1


cpdef Py_ssize_t fanout(bytes frame, object outboxes) except -1:
    """Queue ``frame`` on every outbox; returns how many took it."""
    cdef list snapshot = list(outboxes)
    cdef Py_ssize_t i, n = PyList_GET_SIZE(snapshot)
    cdef Py_ssize_t delivered = 0
    cdef object item
    for i in range(n):
        item = <object>PyList_GET_ITEM(snapshot, i)
        # A checked cast: anything but an Outbox is a TypeError, never a crash.
        if (<Outbox?>item)._send(frame):
            delivered += 1
    return delivered


cdef class ReplayRing:
    """A fixed-capacity window of (transaction id -> entry), oldest evicted first."""

    def __init__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids = [None] * capacity
        self._entries = [None] * capacity
        self._index = {}
        self._next = 0

    def __len__(self):
        return self._next if self._next < self.capacity else self.capacity

    cpdef append(self, str transaction_id, object entry):
        cdef Py_ssize_t seq = self._next
        cdef Py_ssize_t slot = seq % self.capacity
        cdef object evicted
        if seq >= self.capacity:
            evicted = self._ids[slot]
            if evicted is not None and self._index.get(evicted) == seq - self.capacity:
                del self._index[evicted]
        self._ids[slot] = transaction_id
        self._entries[slot] = entry
        self._index[transaction_id] = seq
        self._next = seq + 1

    cpdef object entries_since(self, str cursor):
        """Entries strictly after ``cursor``; None if it is not retained."""
        cdef object found = self._index.get(cursor)
        cdef Py_ssize_t i, seq
        if found is None:
            return None
        seq = found
        return [self._entries[i % self.capacity] for i in range(seq + 1, self._next)]

    def entries(self):
        """All retained entries, oldest first."""
        cdef Py_ssize_t i
        cdef Py_ssize_t start = self._next - self.capacity
        if start < 0:
            start = 0
        return [self._entries[i % self.capacity] for i in range(start, self._next)]
