"""Shared helpers for the server tests (the fixtures are in ``conftest.py``).

* ``make_doc(id, state)``: a ShareData with the functions ``"inc"`` (always
  accepts) and ``"never"`` (always rejects); ``allow_everybody``: an
  ``authenticate`` that admits every request.
* ``connect(url_or_server)``: a plain ``websockets`` client (no compression,
  no proxy, no client pings, no size limit on what it receives).
* ``recv_json`` / ``recv_raw`` / ``send_json`` / ``closed_with`` /
  ``barrier``: bounded waits on a client.
* ``subscribe`` / ``propose``: client messages as JSON text;
  ``apply_transactions``: transactions straight through a manager.
* ``decode_frames``: server-to-client (unmasked) WebSocket frames out of raw
  bytes, for the sans-I/O tests.
* ``RawClient``: a hand-rolled WebSocket client on a plain TCP connection, for
  what a library client will not do (send malformed or broken frames, ignore
  pings, stop reading, reset the connection).

Every wait here is bounded by :data:`DEADLINE`; reaching it fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import socket
import struct
from typing import Any, Awaitable, Callable, Optional, Union

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from safe_fast import RealtimeServer, ShareData, ShareDataManager, ShareFunction

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


# -- messages and transactions ----------------------------------------------------------


def wire(**fields: Any) -> str:
    """A client message as JSON text, ``v: 1`` included."""
    return json.dumps({"v": 1, **fields})


def subscribe(share_data_id: str = "doc", since: Optional[str] = None) -> str:
    """A ``subscribe`` message; without ``since`` when it is None."""
    if since is None:
        return wire(type="subscribe", shareDataId=share_data_id)
    return wire(type="subscribe", shareDataId=share_data_id, since=since)


def propose(
    function_id: str = "inc", data: Any = None, *, correlation_id: str = "c-1", share_data_id: str = "doc"
) -> str:
    """A ``propose`` message (``proposedData`` is always there: null for None)."""
    return wire(
        type="propose",
        shareDataId=share_data_id,
        functionId=function_id,
        proposedData=data,
        correlationId=correlation_id,
    )


async def apply_transactions(
    manager: ShareDataManager, count: int, function_id: str = "inc", share_data_id: str = "doc"
) -> None:
    """``count`` transactions straight through the manager, proposing ``{"count": 1}``, ``{"count": 2}``, ..."""
    share_data = manager.get_share_data_by_id(share_data_id)
    assert share_data is not None
    function = next(f for f in share_data.functions if f.id == function_id)
    for i in range(count):
        await manager.apply_transaction(share_data_id, {"count": i + 1}, function)


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


Frame = tuple[bool, int, bytes]
"""A WebSocket frame as ``(fin, opcode, payload)``."""


_EXTENDED_LENGTHS = {126: ("!H", 2, 126), 127: ("!Q", 8, 65536)}
"""7-bit length marker -> (struct layout, width, smallest length that needs it) (RFC 6455 §5.2)."""


def parse_server_frame(data: Union[bytes, bytearray], start: int = 0) -> Optional[tuple[Frame, int, list[str]]]:
    """The server-to-client frame at ``data[start:]``: ``(frame, end, problems)``; None if incomplete.

    ``problems`` names what RFC 6455 forbids a server here: a masked frame
    (§5.1), a reserved bit without a negotiated extension, a length not in
    its shortest form (§5.2).
    """
    available = len(data)
    if available - start < 2:
        return None
    first, second = data[start], data[start + 1]
    problems: list[str] = []
    if first & 0x70:
        problems.append("reserved bits set")
    masked = bool(second & 0x80)
    if masked:
        problems.append("server frames must not be masked")
    size = second & 0x7F
    pos = start + 2
    if size in _EXTENDED_LENGTHS:
        layout, width, smallest = _EXTENDED_LENGTHS[size]
        if available < pos + width:
            return None
        (size,) = struct.unpack_from(layout, data, pos)
        pos += width
        if size < smallest:
            problems.append("non-minimal length")
    key = b""
    if masked:
        if available < pos + 4:
            return None
        key = bytes(data[pos : pos + 4])
        pos += 4
    if available < pos + size:
        return None
    payload = bytes(data[pos : pos + size])
    if masked:
        payload = _mask(payload, key)  # already a problem, but keep the frame readable
    return (bool(first & 0x80), first & 0x0F, payload), pos + size, problems


def decode_frames(data: Union[bytes, bytearray]) -> list[Frame]:
    """Split server-to-client bytes into ``(fin, opcode, payload)`` frames.

    Server frames must be unmasked (RFC 6455 §5.1); a masked one, a reserved
    bit, a non-minimal length or a truncated frame fails the assertion.
    """
    frames: list[Frame] = []
    view = bytes(data)
    pos = 0
    while pos < len(view):  # bounded: every frame moves pos forward by 2 bytes at least
        parsed = parse_server_frame(view, pos)
        assert parsed is not None, "truncated frame"
        frame, pos, problems = parsed
        assert problems == [], problems
        frames.append(frame)
    return frames


def frame_json(frame: Frame) -> dict[str, Any]:
    """The JSON object of one final text frame."""
    fin, opcode, payload = frame
    assert fin and opcode == 0x1, f"expected a final text frame, got fin={fin} opcode={opcode}"
    message = json.loads(payload.decode("utf-8"))
    assert isinstance(message, dict)
    return message


# -- a raw client (for what a library client will not do) -------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


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


class RawClient(asyncio.Protocol):
    """A hand-rolled WebSocket client on a plain TCP connection: every frame it gets, nothing hidden.

    Made by :meth:`open` (or the ``raw_clients`` fixture, which also aborts it
    at teardown). Server frames queue up in ``frames`` as ``(fin, opcode,
    payload)``; a None there marks the end of the TCP connection. Pings are
    counted in ``pings`` and answered only when ``auto_pong`` is true.
    ``transport.pause_reading()`` turns it into a peer that stops reading.

    A server frame that breaks RFC 6455 (or is fragmented, which this server
    never does) is noted in ``problems`` and fails the next :meth:`recv`.
    """

    def __init__(self, auto_pong: bool = True, deadline: float = DEADLINE) -> None:
        loop = asyncio.get_running_loop()
        self.auto_pong = auto_pong
        self.deadline = deadline
        """Bound of every wait of this client unless a call gives its own."""
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.lost: asyncio.Future[Optional[BaseException]] = loop.create_future()
        self.frames: asyncio.Queue[Optional[Frame]] = asyncio.Queue()
        self.pings = 0
        self.problems: list[str] = []

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        path: str = "/realtime",
        auto_pong: bool = True,
        rcvbuf: Optional[int] = None,
        deadline: float = DEADLINE,
    ) -> "RawClient":
        """Connect to 127.0.0.1:``port`` and complete the upgrade (101 and a correct accept key)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            # Before connect, so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), deadline)
            _, client = await loop.create_connection(lambda: cls(auto_pong, deadline), sock=sock)
        except BaseException:
            sock.close()
            raise
        key = base64.b64encode(os.urandom(16))
        client.send_raw(
            b"GET " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1:" + str(port).encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        try:
            head = await asyncio.wait_for(client.head, deadline)
            status_line, *header_lines = head.split(b"\r\n")
            assert status_line.startswith(b"HTTP/1.1 101"), head
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            expected_accept = base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())
            assert headers.get(b"sec-websocket-accept") == expected_accept, head
        except BaseException:
            client.transport.abort()  # no fixture knows of it yet
            raise
        return client

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head.set_result(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
        for _ in range(len(self.buffer) // 2 + 1):  # a frame takes at least 2 bytes
            parsed = parse_server_frame(self.buffer)
            if parsed is None:
                return
            frame, end, problems = parsed
            del self.buffer[:end]
            self.problems += problems
            fin, opcode, payload = frame
            if not fin:
                self.problems.append("server sent a fragmented frame")
            if opcode == OP_PING:
                self.pings += 1
                if self.auto_pong and not self.transport.is_closing():
                    self.send(OP_PONG, payload)
            self.frames.put_nowait(frame)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("connection lost before the upgrade response"))
        if not self.lost.done():
            self.lost.set_result(exc)
        self.frames.put_nowait(None)

    # sending

    def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        self.transport.write(client_frame(opcode, payload, fin=fin))

    def send_raw(self, data: bytes) -> None:
        """Bytes exactly as given: for frames :func:`client_frame` would not build."""
        self.transport.write(data)

    def send_json(self, obj: Any) -> None:
        self.send(OP_TEXT, json.dumps(obj).encode())

    # receiving

    async def recv(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next server frame; None once the TCP connection has ended."""
        if self.frames.empty() and self.lost.done():
            return None  # the end-of-connection marker was already taken
        frame = await asyncio.wait_for(self.frames.get(), self.deadline if timeout is None else timeout)
        assert self.problems == [], self.problems
        return frame

    def take_received(self) -> list[Optional[Frame]]:
        """Every frame already queued, without waiting (None: the connection ended there)."""
        return [self.frames.get_nowait() for _ in range(self.frames.qsize())]

    async def recv_message(
        self, *, skip_transactions: bool = True, timeout: Optional[float] = None
    ) -> tuple[Optional[int], Any]:
        """The next data message (decoded) or close frame.

        Skips pings, pongs and (by default) live ``transaction`` broadcasts,
        which may arrive between a request and its reply. Returns ``(opcode,
        value)``: a decoded JSON value for a data frame, ``(code, reason)``
        for a close frame (code None when it has none), ``(None, None)``
        once the TCP connection has ended.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.deadline if timeout is None else timeout)
        for _ in range(10_000):
            frame = await self.recv(max(0.0, deadline - loop.time()))
            if frame is None:
                return None, None
            _fin, opcode, payload = frame
            if opcode in (OP_PONG, OP_PING):
                continue
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return OP_CLOSE, (code, payload[2:].decode("utf-8", "replace"))
            message = json.loads(payload)
            if skip_transactions and message.get("type") == "transaction":
                continue
            return opcode, message
        raise AssertionError("10,000 frames skipped and still no message")

    async def request(self, obj: Any, *, timeout: Optional[float] = None) -> Any:
        """Send ``obj`` (JSON text as is, anything else encoded) and return the
        next data message (see :meth:`recv_message`)."""
        if isinstance(obj, str):
            self.send(OP_TEXT, obj.encode())
        else:
            self.send_json(obj)
        opcode, message = await self.recv_message(timeout=timeout)
        assert opcode in (OP_TEXT, OP_BINARY), (opcode, message)
        return message

    async def subscribe(self, share_data_id: str) -> dict[str, Any]:
        """Subscribe and return the state frame."""
        state = await self.request(subscribe(share_data_id))
        assert state["type"] == "state" and state["shareDataId"] == share_data_id, state
        return state

    async def close_frame(self) -> tuple[int, bytes]:
        """Skip other frames until the server's close frame: ``(code, reason)``, 1005 for no code."""
        for _ in range(1000):
            frame = await self.recv()
            assert frame is not None, "EOF before a close frame"
            _fin, opcode, payload = frame
            if opcode == OP_CLOSE:
                return (struct.unpack("!H", payload[:2])[0] if payload else 1005), payload[2:]
        raise AssertionError("no close frame")

    async def eof(self) -> None:
        """Read (and drop) everything until the server drops the connection."""
        for _ in range(1000):
            if await self.recv() is None:
                return
        raise AssertionError("the server never dropped the connection")

    # ending

    async def finish_close(self) -> None:
        """Answer the server's close frame and wait for the TCP connection to end."""
        if self.transport is not None and not self.transport.is_closing():
            self.send(OP_CLOSE, b"")
            self.transport.close()
        await asyncio.wait_for(asyncio.shield(self.lost), self.deadline)

    def reset(self) -> None:
        """Vanish with a TCP RST (SO_LINGER 0), no close handshake."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


RawClientFactory = Callable[..., Awaitable[RawClient]]
"""The ``raw_clients`` fixture: ``await raw_clients(port, **options of RawClient.open)``."""
