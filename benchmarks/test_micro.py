"""Micro benchmarks of the broadcast hot path, each on both cores.

    pytest benchmarks --benchmark-only                 # from the repository root
    pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-sort=name

Every benchmark that touches the core is parametrized over the two core
modules, imported directly (``compiled`` = ``safe_fast._core``, ``pure`` =
``safe_fast._core_py``), so one run compares them side by side in each group.
No sockets: the fan-out writes to in-memory transports whose methods are C
builtins, so what is timed is the core itself, not a fake transport.
"""

from __future__ import annotations

import collections
import itertools
from types import ModuleType
from typing import Any, Callable

import pytest

from safe_fast import _core_py
from safe_fast.messages import PongFrame, encode_message, parse_client_message

try:
    from safe_fast import _core
except ImportError:  # no compiled build: its half of each group is skipped
    _core = None

CORES = [
    pytest.param("compiled", id="compiled", marks=pytest.mark.skipif(_core is None, reason="compiled core not built")),
    pytest.param("pure", id="pure"),
]

PAYLOAD = (
    b'{"v":1,"type":"lifecycle","shareDataId":"bench","event":"updated","currentState":{"seq":"0000000007",'
    b'"symbol":"SAFE-USD","bid":101.25,"ask":101.5,"sizes":[1700,2300,900],"venue":"loopback","open":true,'
    b'"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'
)
assert len(PAYLOAD) == 250


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> ModuleType:
    return _core if request.param == "compiled" else _core_py  # type: ignore[return-value]


class MemoryTransport:
    """A write side with C-builtin methods: ``write`` keeps only the last write."""

    __slots__ = ("last", "write", "get_write_buffer_size", "is_closing")

    def __init__(self) -> None:
        self.last: collections.deque[bytes] = collections.deque(maxlen=1)
        self.write = self.last.append
        self.get_write_buffer_size = itertools.repeat(0).__next__
        self.is_closing = bool  # bool() is False


class ManualLoop:
    """Collects ``call_soon`` callbacks; the benchmark runs the flush itself."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], Any]] = []
        self.call_soon = self.callbacks.append


# -- encode ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [250, 16 * 1024, 70 * 1024], ids=["250B", "16KiB", "70KiB"])
def test_encode_frame(benchmark: Any, core: ModuleType, size: int) -> None:
    """One unmasked text frame (2-, 4- and 10-byte headers)."""
    payload = (PAYLOAD * (size // len(PAYLOAD) + 1))[:size]
    benchmark.group = f"encode_frame {size} B"
    frame = benchmark(core.encode_frame, payload)
    assert frame.endswith(payload) and len(frame) - size in (2, 4, 10)


# -- fan-out --------------------------------------------------------------------------

SUBSCRIBERS = 1000


@pytest.mark.parametrize("k", [1, 10])
def test_fanout_1000(benchmark: Any, core: ModuleType, k: int) -> None:
    """k broadcasts to 1,000 outboxes, then the loop's flush: 1,000×k deliveries, 1,000 writes."""
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    transports = [MemoryTransport() for _ in range(SUBSCRIBERS)]
    outboxes = {core.Outbox(t, flusher, 1 << 30): None for t in transports}  # registry-shaped: a dict
    frame = core.encode_frame(PAYLOAD)
    fanout = core.fanout
    callbacks = loop.callbacks

    def broadcast_round() -> None:
        for _ in range(k):
            fanout(frame, outboxes)
        callbacks.clear()
        flusher.flush_all()

    benchmark.group = f"fanout to {SUBSCRIBERS:,} outboxes, {k} frame(s) per flush"
    benchmark.extra_info["deliveries_per_round"] = SUBSCRIBERS * k
    benchmark(broadcast_round)
    assert all(t.last[0] == frame * k for t in transports)


# -- replay ring ----------------------------------------------------------------------

RING = 100
IDS = [str(i) for i in range(1, 10_001)]


def test_ring_append(benchmark: Any, core: ModuleType) -> None:
    """1,000 appends to a full ring of 100 (every append evicts)."""
    ring = core.ReplayRing(RING)
    for i in IDS[:RING]:
        ring.append(i, (i, True))
    batch = [(i, (i, True)) for i in IDS[RING : RING + 1000]]
    append = ring.append

    def run() -> None:
        for transaction_id, entry in batch:
            append(transaction_id, entry)

    benchmark.group = "ReplayRing.append x1000 (capacity 100, evicting)"
    benchmark(run)
    assert len(ring) == RING


@pytest.mark.parametrize(
    "cursor_back,expect",
    [(10, 9), (RING, RING - 1), (None, None)],
    ids=["hit-9-newer", "hit-oldest-99-newer", "miss"],
)
def test_ring_lookup(benchmark: Any, core: ModuleType, cursor_back: Any, expect: Any) -> None:
    """``entries_since(cursor)``: a recent cursor, the oldest retained one, one not retained."""
    ring = core.ReplayRing(RING)
    for i in IDS[:1000]:
        ring.append(i, (i, True))
    cursor = IDS[1000 - cursor_back] if cursor_back is not None else "evicted-long-ago"
    benchmark.group = f"ReplayRing.entries_since {('miss' if cursor_back is None else f'{expect} newer')}"
    result = benchmark(ring.entries_since, cursor)
    assert (result is None) if expect is None else (len(result) == expect)


# -- client messages --------------------------------------------------------------------

MESSAGES = {
    "subscribe": b'{"v":1,"type":"subscribe","shareDataId":"bench"}',
    "subscribe-since": b'{"v":1,"type":"subscribe","shareDataId":"bench","since":"12345"}',
    "ping": b'{"v":1,"type":"ping","correlationId":"c-17"}',
    "propose": (
        b'{"v":1,"type":"propose","shareDataId":"bench","functionId":"increment",'
        b'"proposedData":{"count":42,"by":"alice"},"correlationId":"c-18"}'
    ),
}


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_parse_client_message(benchmark: Any, kind: str) -> None:
    """``parse_client_message`` (orjson + validation). It does not use the core: one row per message."""
    data = MESSAGES[kind]
    benchmark.group = f"parse_client_message {kind}"
    message = benchmark(parse_client_message, data)
    assert message is not None


def test_ping_reply_path(benchmark: Any, core: ModuleType) -> None:
    """The server's inline ``ping`` path: parse, build ``pong``, encode, frame, queue, flush."""
    loop = ManualLoop()
    flusher = core.Flusher(loop)
    transport = MemoryTransport()
    outbox = core.Outbox(transport, flusher, 1 << 30)
    data = MESSAGES["ping"]
    encode_frame = core.encode_frame

    def run() -> None:
        message = parse_client_message(data)
        outbox.send_frame(encode_frame(encode_message(PongFrame(message.correlation_id))))
        loop.callbacks.clear()
        flusher.flush_all()

    benchmark.group = "ping -> pong (parse + encode + frame + queue + flush)"
    benchmark(run)
    assert transport.last[0].endswith(b'"correlationId":"c-17"}')
