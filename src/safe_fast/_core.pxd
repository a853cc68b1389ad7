# Declarations of the compiled hot path, for other Cython code to cimport.

cdef class Flusher:
    cdef readonly object loop
    cdef list _dirty
    cdef bint _scheduled
    cdef object _flush_all
    cdef bint _in_round
    cdef list _joined_frames
    cdef bytes _joined
    cdef void mark(self, Outbox outbox) except *
    cpdef flush_all(self)
    cpdef bytes join(self, list frames)


cdef class Outbox:
    cdef object __weakref__
    cdef readonly object transport
    cdef readonly object websocket
    cdef readonly Flusher flusher
    cdef public Py_ssize_t max_buffered_bytes
    cdef bytes _head
    cdef list _frames
    cdef Py_ssize_t _queued
    cdef Py_ssize_t _transport_bytes
    cdef bint _open
    cdef object _write
    cdef object _get_write_buffer_size
    cdef object _is_closing
    cdef int _fd
    cdef bint _send(self, bytes frame) except -1
    cdef int _flush(self) except -1


cdef class ReplayRing:
    cdef readonly Py_ssize_t capacity
    cdef list _ids
    cdef list _entries
    cdef dict _index
    cdef Py_ssize_t _next

    cpdef append(self, str transaction_id, object entry)
    cpdef object entries_since(self, str cursor)


cpdef bytes encode_frame(bytes payload, int opcode=*)
cpdef Py_ssize_t fanout(bytes frame, object outboxes) except -1
