"""Shared helpers for the server tests (the fixtures are in ``conftest.py``).

* ``make_doc(id, state)``: a ShareData with the functions ``"inc"`` (always
  accepts) and ``"never"`` (always rejects); ``allow_everybody``: an
  ``authenticate`` that admits every request.
* ``connect(url_or_server)``: a plain ``websockets`` client (no compression,
  no proxy, no client pings, no size limit on what it receives).
* ``recv_json`` / ``recv_raw`` / ``send_json`` / ``closed_with`` /
  ``barrier``: bounded waits on a client.
* ``decode_frames``: server-to-client (unmasked) WebSocket frames out of raw
  bytes, for the sans-I/O tests.
* ``RawClient``: a hand-rolled WebSocket client on a plain TCP stream, for
  frames a library client will not send (empty close frames, broken
  fragmentation, unanswered pings).

Every wait here is bounded by :data:`DEADLINE`; reaching it fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import struct
from typing import Any, Awaitable, Callable, Optional, Union

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from safe_fast import RealtimeServer, ShareData, ShareFunction

DEADLINE = 5.0
"""Upper bound of any single wait in the server tests (a failure, never a pass)."""

ServerFactory = Callable[..., Awaitable[RealtimeServer]]


# -- the model -------------------------------------------------------------------------


def make_doc(share_data_id: str = "doc", state: Any = None) -> ShareData:
    """A ShareData with ``inc`` (accepts everything) and ``never`` (rejects everything)."""
    return ShareData(
        share_data_id,
        current_state={"count": 0} if state is None else state,
        functions=[
            ShareFunction("inc", lambda current, proposed: True),
            ShareFunction("never", lambda current, proposed: False),
        ],
    )


def allow_everybody(request: Any) -> dict[str, str]:
    return {"subject": "alice"}


# -- a client --------------------------------------------------------------------------


def connect(target: Union[str, RealtimeServer], **kwargs: Any) -> Any:
    """``websockets.connect`` set up as a plain protocol client."""
    url = target if isinstance(target, str) else target.url
    options: dict[str, Any] = {
        "compression": None,
        "proxy": None,
        "ping_interval": None,
        "max_size": None,
        "open_timeout": DEADLINE,
        "close_timeout": DEADLINE,
    }
    options.update(kwargs)
    return ws_connect(url, **options)


async def send_json(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def recv_raw(ws: ClientConnection) -> Union[str, bytes]:
    """The next message exactly as it arrived (``str`` for a text frame)."""
    return await asyncio.wait_for(ws.recv(), DEADLINE)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next message, which must be a text frame holding a JSON object."""
    raw = await recv_raw(ws)
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    message = json.loads(raw)
    assert isinstance(message, dict)
    return message


async def closed_with(ws: ClientConnection) -> tuple[int, str, list[Any]]:
    """Wait for the server to close: ``(code, reason, messages received before the close)``.

    ``code`` is what the server's close frame said (1006 when none arrived).
    """
    received: list[Any] = []

    async def collect() -> None:
        for _ in range(10_000):
            try:
                received.append(await ws.recv())
            except ConnectionClosed:
                return
        raise AssertionError("the server kept sending and never closed")

    await asyncio.wait_for(collect(), DEADLINE)
    await asyncio.wait_for(ws.wait_closed(), DEADLINE)
    frame = ws.protocol.close_rcvd
    if frame is None:
        return 1006, "", received
    return int(frame.code), frame.reason, received


_barrier_ids = itertools.count(1)


async def barrier(ws: ClientConnection) -> list[dict[str, Any]]:
    """Ping and collect every message up to the matching pong.

    The server handles one connection's messages in arrival order, so
    everything it was going to send for the earlier ones comes before this
    pong: the returned list is exactly that.
    """
    correlation_id = f"barrier-{next(_barrier_ids)}"
    await send_json(ws, {"v": 1, "type": "ping", "correlationId": correlation_id})
    before: list[dict[str, Any]] = []
    for _ in range(10_000):
        message = await recv_json(ws)
        if message == {"v": 1, "type": "pong", "correlationId": correlation_id}:
            return before
        before.append(message)
    raise AssertionError("no pong for the barrier ping")


# -- frames (sans-I/O) -----------------------------------------------------------------


def decode_frames(data: Union[bytes, bytearray]) -> list[tuple[bool, int, bytes]]:
    """Split server-to-client bytes into ``(fin, opcode, payload)`` frames.

    Server frames must be unmasked (RFC 6455 §5.1); a masked one, a reserved
    bit or a truncated frame fails the assertion.
    """
    frames: list[tuple[bool, int, bytes]] = []
    view = bytes(data)
    pos = 0
    while pos < len(view):
        assert len(view) - pos >= 2, "truncated frame header"
        first, second = view[pos], view[pos + 1]
        assert first & 0x70 == 0, "reserved bits set"
        assert second & 0x80 == 0, "server frames must not be masked"
        size = second & 0x7F
        pos += 2
        if size == 126:
            (size,) = struct.unpack_from("!H", view, pos)
            assert size >= 126, "non-minimal length"
            pos += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", view, pos)
            assert size >= 65536, "non-minimal length"
            pos += 8
        assert len(view) - pos >= size, "truncated frame payload"
        frames.append((bool(first & 0x80), first & 0x0F, view[pos : pos + size]))
        pos += size
    return frames


def frame_json(frame: tuple[bool, int, bytes]) -> dict[str, Any]:
    """The JSON object of one final text frame."""
    fin, opcode, payload = frame
    assert fin and opcode == 0x1, f"expected a final text frame, got fin={fin} opcode={opcode}"
    message = json.loads(payload.decode("utf-8"))
    assert isinstance(message, dict)
    return message


def wire(**fields: Any) -> str:
    """A client message as JSON text, ``v: 1`` included."""
    return json.dumps({"v": 1, **fields})


# -- a raw client (for what a library client will not send) ----------------------------


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One masked client-to-server frame (RFC 6455 §5.2)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head.append(0x80 | size)
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    key = os.urandom(4)
    return bytes(head) + key + _mask(payload, key)


def _mask(payload: bytes, key: bytes) -> bytes:
    # XOR as one big integer: fast enough for multi-megabyte payloads.
    if not payload:
        return b""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 2 * DEADLINE) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.005)


class RawClient:
    """A WebSocket client over a plain TCP stream: frames in and out, nothing hidden."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, target: str = "/realtime") -> "RawClient":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        self.writer.write(client_frame(opcode, payload, fin=fin))

    async def recv(self) -> Optional[tuple[bool, int, bytes]]:
        """The next server frame as ``(fin, opcode, payload)``; None at EOF."""

        async def read() -> Optional[tuple[bool, int, bytes]]:
            try:
                head = await self.reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return None
            size = head[1] & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(size)
            (frame,) = decode_frames(head[:1] + _length(size) + payload)
            return frame

        return await asyncio.wait_for(read(), DEADLINE)

    async def close_frame(self) -> tuple[int, bytes]:
        """Skip data frames until the server's close frame: ``(code, reason)``."""
        for _ in range(1000):
            frame = await self.recv()
            assert frame is not None, "EOF before a close frame"
            if frame[1] == 0x8:
                payload = frame[2]
                return (struct.unpack("!H", payload[:2])[0] if payload else 1005), payload[2:]
        raise AssertionError("no close frame")

    async def eof(self) -> None:
        """Read (and drop) everything until the server drops the connection."""
        for _ in range(1000):
            if await self.recv() is None:
                return
        raise AssertionError("the server never dropped the connection")

    def close(self) -> None:
        self.writer.close()


def _length(size: int) -> bytes:
    if size < 126:
        return bytes([size])
    if size < 65536:
        return bytes([126]) + struct.pack("!H", size)
    return bytes([127]) + struct.pack("!Q", size)
