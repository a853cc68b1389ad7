"""The hot-path core: both implementations, and their parity.

Both cores are imported directly here (whatever SAFE_FAST_PURE_PYTHON says),
so every run checks the compiled one against the pure one.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_fast import _core_py

try:
    from safe_fast import _core as _core_c
except ImportError:  # pragma: no cover - a source tree without a build
    _core_c = None

CORES = [pytest.param(_core_py, id="python")]
if _core_c is not None:
    CORES.append(pytest.param(_core_c, id="cython"))

needs_both = pytest.mark.skipif(_core_c is None, reason="compiled core not built")


# -- test doubles for the I/O around the core -------------------------------------------


class ManualLoop:
    """Runs call_soon callbacks only when told to: one 'loop iteration'."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], Any]] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.ready.append(callback)

    def run_once(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


class RecordingTransport:
    """Records writes; while stalled, everything written stays 'buffered'."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.held = 0
        self.stalled = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.stalled:
            self.held += len(data)

    def get_write_buffer_size(self) -> int:
        return self.held

    def is_closing(self) -> bool:
        return self.closing


def make_outbox(core: Any, max_buffered_bytes: int = 1 << 20):
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    transport = RecordingTransport()
    overflows: list[int] = []

    class Box(core.Outbox):
        def on_overflow(self, buffered_amount: int) -> None:
            overflows.append(buffered_amount)

    return Box(transport, flusher, max_buffered_bytes), transport, loop, overflows


def parse_frame(frame: bytes) -> tuple[int, bool, bytes]:
    """(opcode, fin, payload) of one unmasked frame; asserts it is exactly one frame."""
    first, second = frame[0], frame[1]
    assert second & 0x80 == 0, "server frames are unmasked"
    length, offset = second & 0x7F, 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        offset = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        offset = 10
    assert len(frame) == offset + length
    return first & 0x0F, bool(first & 0x80), frame[offset:]


# -- encode_frame -------------------------------------------------------------------------


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_encode_frame_lengths(core: Any, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = core.encode_frame(payload)
    opcode, fin, body = parse_frame(frame)
    assert (opcode, fin, body) == (1, True, payload)
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert len(frame) == header + size


@pytest.mark.parametrize("core", CORES)
def test_encode_binary_frame(core: Any) -> None:
    assert parse_frame(core.encode_frame(b"\x00\x01", core.OPCODE_BINARY)) == (2, True, b"\x00\x01")


@needs_both
@given(st.binary(max_size=70000), st.sampled_from([1, 2]))
@settings(max_examples=60, deadline=None)
def test_encode_frame_parity(payload: bytes, opcode: int) -> None:
    assert _core_c.encode_frame(payload, opcode) == _core_py.encode_frame(payload, opcode)


# -- Outbox and Flusher ---------------------------------------------------------------------


@pytest.mark.parametrize("core", CORES)
def test_frames_of_one_iteration_leave_in_one_write(core: Any) -> None:
    box, transport, loop, _ = make_outbox(core)
    frames = [core.encode_frame(b"%d" % i) for i in range(10)]
    for frame in frames:
        assert box.send_frame(frame) is True
    assert transport.writes == []
    assert box.queued_bytes == sum(map(len, frames))
    loop.run_once()
    assert transport.writes == [b"".join(frames)]
    assert box.queued_bytes == 0


@pytest.mark.parametrize("core", CORES)
def test_one_frame_is_written_as_is(core: Any) -> None:
    box, transport, loop, _ = make_outbox(core)
    frame = core.encode_frame(b"x")
    box.send_frame(frame)
    loop.run_once()
    assert transport.writes == [frame]


@pytest.mark.parametrize("core", CORES)
def test_one_flush_callback_serves_every_outbox(core: Any) -> None:
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    transports = [RecordingTransport() for _ in range(5)]
    boxes = [core.Outbox(t, flusher, 1 << 20) for t in transports]
    frame = core.encode_frame(b"hello")
    assert core.fanout(frame, boxes) == 5
    assert core.fanout(frame, boxes) == 5
    assert len(loop.ready) == 1
    loop.run_once()
    assert all(t.writes == [frame + frame] for t in transports)


@pytest.mark.parametrize("core", CORES)
def test_a_fanout_round_joins_the_shared_frames_once(core: Any) -> None:
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    transports = [RecordingTransport() for _ in range(4)]
    boxes = [core.Outbox(t, flusher, 1 << 20) for t in transports]
    first, second = core.encode_frame(b"one"), core.encode_frame(b"two")
    core.fanout(first, boxes)
    core.fanout(second, boxes)
    boxes[2].send_frame(core.encode_frame(b"reply"))  # a direct reply: its own bytes
    core.fanout(core.encode_frame(b"three"), boxes[3:])
    loop.run_once()
    writes = [t.writes for t in transports]
    assert writes[0] == writes[1] == [first + second]
    assert writes[0][0] is writes[1][0], "the same frames are joined once per round"
    assert writes[2] == [first + second + core.encode_frame(b"reply")]
    assert writes[3] == [first + second + core.encode_frame(b"three")]


@pytest.mark.parametrize("core", CORES)
def test_overflow_counts_queued_transport_and_new_frame(core: Any) -> None:
    box, transport, loop, overflows = make_outbox(core, max_buffered_bytes=100)
    transport.stalled = True
    frame = b"x" * 40
    assert box.send_frame(frame) and box.send_frame(frame)  # 80 queued
    assert box.send_frame(b"y" * 20) is True  # exactly 100: allowed
    loop.run_once()
    assert transport.held == 100 and box.buffered_amount == 100
    assert box.send_frame(b"z") is False
    assert overflows == [100]
    assert box.is_open is False
    assert box.send_frame(b"z") is False
    assert overflows == [100], "on_overflow fires once"


@pytest.mark.parametrize("core", CORES)
def test_a_frame_larger_than_the_cap_reaches_an_idle_connection(core: Any) -> None:
    box, transport, loop, overflows = make_outbox(core, max_buffered_bytes=100)
    transport.stalled = True
    assert box.send_frame(b"x" * 250) is True  # nothing buffered: it goes
    assert box.send_frame(b"y") is False  # but nothing may stack up behind it
    assert overflows == [250]
    loop.run_once()
    assert transport.writes == [b"x" * 250]


@pytest.mark.parametrize("core", CORES)
def test_drained_transport_is_remeasured_before_refusing(core: Any) -> None:
    box, transport, loop, overflows = make_outbox(core, max_buffered_bytes=100)
    transport.stalled = True
    box.send_frame(b"x" * 90)
    loop.run_once()
    transport.held = 0  # the kernel took it since
    assert box.send_frame(b"y" * 90) is True
    assert overflows == []


@pytest.mark.parametrize("core", CORES)
def test_closing_transport_gets_no_write(core: Any) -> None:
    box, transport, loop, _ = make_outbox(core)
    box.send_frame(b"abc")
    transport.closing = True
    loop.run_once()
    assert transport.writes == []


@pytest.mark.parametrize("core", CORES)
def test_close_outbox_flushes_or_discards(core: Any) -> None:
    box, transport, loop, _ = make_outbox(core)
    box.send_frame(b"abc")
    box.close_outbox()
    assert transport.writes == [b"abc"] and box.is_open is False
    assert box.send_frame(b"more") is False
    box2, transport2, _, _ = make_outbox(core)
    box2.send_frame(b"abc")
    box2.close_outbox(flush=False)
    loop.run_once()
    assert transport2.writes == []


@pytest.mark.parametrize("core", CORES)
def test_a_failing_write_does_not_strand_the_other_outboxes(core: Any) -> None:
    loop = ManualLoop()
    flusher = core.Flusher(loop)

    class BrokenTransport(RecordingTransport):
        def write(self, data: bytes) -> None:
            raise OSError("broken transport")

    broken = core.Outbox(BrokenTransport(), flusher, 1 << 20)
    healthy_transport = RecordingTransport()
    healthy = core.Outbox(healthy_transport, flusher, 1 << 20)
    assert core.fanout(b"one", [broken, healthy]) == 2
    with pytest.raises(OSError, match="broken transport"):
        loop.run_once()
    # The round went on past the failure, and both outboxes are empty, so the
    # next frame schedules a new round (an outbox left holding frames would
    # never be marked dirty again).
    assert healthy_transport.writes == [b"one"]
    assert broken.queued_bytes == 0 and healthy.queued_bytes == 0
    assert core.fanout(b"two", [healthy]) == 1
    loop.run_once()
    assert healthy_transport.writes == [b"one", b"two"]


@pytest.mark.parametrize("core", CORES)
def test_a_frame_refused_by_a_failing_schedule_is_not_queued(core: Any) -> None:
    class ClosedLoop(ManualLoop):
        def call_soon(self, callback: Callable[[], Any]) -> None:
            raise RuntimeError("Event loop is closed")

    transport = RecordingTransport()
    box = core.Outbox(transport, core.Flusher(ClosedLoop()), 1 << 20)
    with pytest.raises(RuntimeError, match="closed"):
        box.send_frame(b"abc")
    assert box.queued_bytes == 0
    box.flush()
    assert transport.writes == []


@pytest.mark.parametrize("core", CORES)
def test_fanout_to_something_that_is_not_an_outbox_raises(core: Any) -> None:
    # A registry bug must be an exception in either core, never a crash of the process.
    with pytest.raises((TypeError, AttributeError)):
        core.fanout(b"frame", [object()])


@pytest.mark.parametrize("core", CORES)
def test_fanout_survives_collection_changes_during_overflow(core: Any) -> None:
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    subscribers: dict[Any, None] = {}

    class Dropping(core.Outbox):
        def on_overflow(self, buffered_amount: int) -> None:
            subscribers.pop(self, None)

    slow_transport = RecordingTransport()
    slow_transport.stalled = True
    slow = Dropping(slow_transport, flusher, 10)
    assert slow.send_frame(b"backlog") is True
    fast = [core.Outbox(RecordingTransport(), flusher, 1 << 20) for _ in range(3)]
    subscribers[slow] = None
    for box in fast:
        subscribers[box] = None
    assert core.fanout(b"x" * 20, subscribers) == 3
    assert slow not in subscribers


# -- Outbox on a real socket -----------------------------------------------------------------


class CountingTransport:
    """A real asyncio transport, with its writes counted."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.inner = transport
        self.writes = 0
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)


async def socket_outbox(core: Any, send_buffer: int) -> tuple[Any, CountingTransport, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    counting = CountingTransport(transport)
    return core.Outbox(counting, core.Flusher(loop), 1 << 30), counting, theirs


async def receive(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    deadline = loop.time() + 10
    while len(received) < size and loop.time() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            break
        received += chunk
    return bytes(received)


@pytest.mark.parametrize("core", CORES)
async def test_real_socket_gets_every_byte_in_order_when_the_kernel_pushes_back(core: Any) -> None:
    box, transport, theirs = await socket_outbox(core, send_buffer=4096)
    frames = [core.encode_frame(bytes([i % 251]) * (i * 37 % 3000)) for i in range(300)]
    for i, frame in enumerate(frames):
        assert box.send_frame(frame) is True
        if i % 7 == 6:
            await asyncio.sleep(0)  # a flush round; the socket is not being read
    await asyncio.sleep(0)
    expected = b"".join(frames)
    assert await receive(theirs, len(expected)) == expected
    assert transport.writes > 0, "what the kernel did not take went through the transport"
    transport.inner.close()
    theirs.close()


@pytest.mark.parametrize("core", CORES)
async def test_compiled_core_sends_straight_to_an_idle_plain_socket(core: Any) -> None:
    box, transport, theirs = await socket_outbox(core, send_buffer=1 << 16)
    frame = core.encode_frame(b"x" * 100)
    for _ in range(5):
        box.send_frame(frame)
        await asyncio.sleep(0)
    assert await receive(theirs, 5 * len(frame)) == frame * 5
    # The same bytes either way; the compiled core skips the transport's
    # write path while the transport holds nothing.
    assert transport.writes == (0 if core is _core_c else 5)
    transport.inner.close()
    theirs.close()


# -- ReplayRing ------------------------------------------------------------------------------


@pytest.mark.parametrize("core", CORES)
def test_ring_entries_strictly_after_cursor(core: Any) -> None:
    ring = core.ReplayRing(3)
    assert ring.entries_since("1") is None
    for i in range(1, 6):
        ring.append(str(i), ("e", i))
    assert len(ring) == 3
    assert ring.entries() == [("e", 3), ("e", 4), ("e", 5)]
    assert ring.entries_since("3") == [("e", 4), ("e", 5)]
    assert ring.entries_since("5") == []
    assert ring.entries_since("2") is None  # evicted
    assert ring.entries_since("03") is None  # exact string match only


@pytest.mark.parametrize("core", CORES)
def test_ring_rejects_bad_capacity(core: Any) -> None:
    with pytest.raises(ValueError):
        core.ReplayRing(0)


class RingModel:
    """The obvious list implementation the ring must agree with."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[tuple[str, Any]] = []

    def append(self, transaction_id: str, entry: Any) -> None:
        self.items.append((transaction_id, entry))
        del self.items[: -self.capacity]

    def entries_since(self, cursor: str) -> list[Any] | None:
        for index in range(len(self.items) - 1, -1, -1):
            if self.items[index][0] == cursor:
                return [entry for _, entry in self.items[index + 1 :]]
        return None


ring_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from([str(i) for i in range(12)])),
        st.tuples(st.just("since"), st.sampled_from([str(i) for i in range(12)] + ["", "01"])),
    ),
    max_size=80,
)


@given(st.integers(min_value=1, max_value=6), ring_ops)
@settings(max_examples=150, deadline=None)
def test_ring_matches_model_and_cores_agree(capacity: int, ops: list[tuple[str, str]]) -> None:
    rings = [core.ReplayRing(capacity) for core in ([_core_py, _core_c] if _core_c else [_core_py])]
    model = RingModel(capacity)
    for step, (op, tid) in enumerate(ops):
        if op == "append":
            for ring in rings:
                ring.append(tid, (tid, step))
            model.append(tid, (tid, step))
        else:
            expected = model.entries_since(tid)
            assert [ring.entries_since(tid) for ring in rings] == [expected] * len(rings)
    assert all(len(ring) == len(model.items) for ring in rings)


# -- Outbox parity under random operation sequences ------------------------------------------

outbox_ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]), st.sampled_from([1, 2])),
        st.tuples(st.just("iterate"), st.just(0), st.just(0)),
        st.tuples(st.just("stall"), st.booleans(), st.just(0)),
        st.tuples(st.just("drain"), st.integers(0, 200_000), st.just(0)),
    ),
    max_size=40,
)


def run_outbox_script(core: Any, cap: int, ops: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    box, transport, loop, overflows = make_outbox(core, max_buffered_bytes=cap)
    accepted = []
    for op, arg, opcode in ops:
        if op == "send":
            # a direct reply (binary opcode) interleaved with broadcast frames
            accepted.append(box.send_frame(core.encode_frame(b"p" * arg, opcode)))
        elif op == "iterate":
            loop.run_once()
        elif op == "stall":
            transport.stalled = arg
        else:
            transport.held = max(0, transport.held - arg)
    loop.run_once()
    return {
        "accepted": accepted,
        "writes": transport.writes,
        "overflows": overflows,
        "open": box.is_open,
        "held": transport.held,
    }


@needs_both
@given(st.integers(min_value=1, max_value=300_000), outbox_ops)
@settings(max_examples=120, deadline=None)
def test_outbox_parity(cap: int, ops: list[tuple[str, Any, Any]]) -> None:
    compiled = run_outbox_script(_core_c, cap, ops)
    pure = run_outbox_script(_core_py, cap, ops)
    assert compiled == pure
    # Order is preserved: the bytes written are the accepted frames, in order.
    frames = [
        _core_py.encode_frame(b"p" * arg, opcode)
        for (op, arg, opcode) in ops
        if op == "send"
    ]
    accepted_frames = [f for f, ok in zip(frames, pure["accepted"]) if ok]
    written = b"".join(pure["writes"])
    if pure["open"]:
        assert written == b"".join(accepted_frames)
    else:
        assert b"".join(accepted_frames).startswith(written)


shared_flusher_ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from([0, 125, 126, 65536])),
        st.tuples(st.just("fanout"), st.sampled_from([0, 125, 126, 65536])),
        st.tuples(st.just("iterate"), st.just(0)),
        st.tuples(st.just("stall"), st.booleans()),
        st.tuples(st.just("drain"), st.integers(0, 200_000)),
        st.tuples(st.just("closing"), st.booleans()),
        st.tuples(st.just("close"), st.booleans()),
    ),
    max_size=40,
)


def run_shared_flusher_script(core: Any, cap: int, ops: list[tuple[str, Any]]) -> dict[str, Any]:
    """Outbox ``a`` takes direct replies, fan-outs, stalls, a closing transport
    and ``close_outbox``; ``b`` shares its flusher and takes only the fan-outs,
    so every round with both dirty goes through the join memo."""
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    overflows: list[int] = []

    class Box(core.Outbox):
        def on_overflow(self, buffered_amount: int) -> None:
            overflows.append(buffered_amount)

    a_transport, b_transport = RecordingTransport(), RecordingTransport()
    a, b = Box(a_transport, flusher, cap), Box(b_transport, flusher, 1 << 30)
    results = []
    for step, (op, arg) in enumerate(ops):
        if op == "send":
            results.append(a.send_frame(core.encode_frame(b"d" * arg, core.OPCODE_BINARY)))
        elif op == "fanout":
            # A fresh frame object per fan-out, as the registry makes one per broadcast.
            results.append(core.fanout(core.encode_frame(b"f%d" % step + b"p" * arg), [a, b]))
        elif op == "iterate":
            loop.run_once()
        elif op == "stall":
            a_transport.stalled = arg
        elif op == "drain":
            a_transport.held = max(0, a_transport.held - arg)
        elif op == "closing":
            a_transport.closing = arg
        else:
            a.close_outbox(flush=arg)
        results.append((a.queued_bytes, b.queued_bytes, a.is_open))
    loop.run_once()
    return {
        "results": results,
        "a_writes": a_transport.writes,
        "b_writes": b_transport.writes,
        "overflows": overflows,
        "held": a_transport.held,
    }


@needs_both
@given(st.integers(min_value=1, max_value=300_000), shared_flusher_ops)
@settings(max_examples=120, deadline=None)
def test_outbox_parity_with_a_shared_flusher(cap: int, ops: list[tuple[str, Any]]) -> None:
    compiled = run_shared_flusher_script(_core_c, cap, ops)
    pure = run_shared_flusher_script(_core_py, cap, ops)
    assert compiled == pure
    # b is never refused, stalled or closed: it got every fan-out, in order.
    fanned_out = [_core_py.encode_frame(b"f%d" % step + b"p" * arg) for step, (op, arg) in enumerate(ops) if op == "fanout"]
    assert b"".join(pure["b_writes"]) == b"".join(fanned_out)


def test_both_cores_export_the_same_names() -> None:
    names = set(_core_py.__all__)
    assert names == {"encode_frame", "Flusher", "Outbox", "fanout", "ReplayRing", "OPCODE_TEXT", "OPCODE_BINARY"}
    if _core_c is not None:
        assert set(_core_c.__all__) == names
        assert all(hasattr(_core_c, name) for name in names)
