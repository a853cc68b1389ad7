"""Helpers of the client tests: a scriptable raw picows server, the real
server's small SAFE model, event recorders and bounded waits.

The scripted server exists because the behaviours under test need a peer
that does what our server never does on demand: close with 4001/4002/4004
at a chosen moment, answer the upgrade with 401, send garbage. Everything
listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

import picows

from safe_fast.sharedata import ShareData, ShareDataManager, ShareFunction

DEADLINE = 10.0
"""Upper bound of any single wait; reaching it fails the test."""


async def eventually(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Wait (polling) until ``predicate()`` holds; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Recorder:
    """Collects a client's events as ``(name, args)`` tuples, in order."""

    def __init__(self, client: Any, events: tuple[str, ...] = ("open", "close", "reconnecting", "error", "message")) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        for name in events:
            client.on(name, self._make(name))

    def _make(self, name: str) -> Callable[..., None]:
        def listener(*args: Any) -> None:
            self.events.append((name, args))

        return listener

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == name]

    def errors(self) -> list[BaseException]:
        return [args[0] for args in self.of("error")]


# -- the scripted raw server ------------------------------------------------------------------


class ScriptedConnection(picows.WSListener):  # type: ignore[misc]
    """The server side of one client connection, driven by the test."""

    def __init__(self, server: "ScriptedServer", path: str) -> None:
        super().__init__()
        self.server = server
        self.path = path
        self.query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        self.transport: Optional[picows.WSTransport] = None
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.all_received: list[dict[str, Any]] = []
        self.disconnected = asyncio.Event()
        self.close_code: Optional[int] = None

    # picows callbacks

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport
        self.server.connections.append(self)
        self.server.new_connections.put_nowait(self)
        if self.server.on_connect is not None:
            self.server.on_connect(self)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            message = json.loads(frame.get_payload_as_bytes())
            self.all_received.append(message)
            if self.server.auto_answer:
                self.answer(message)
            self.received.put_nowait(message)
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            code = int(getattr(frame.get_close_code(), "value", frame.get_close_code()))
            self.close_code = code
            if not transport.is_close_frame_sent:
                transport.send_close(code if code >= 1000 else 1000)
            transport.disconnect()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.disconnected.set()

    # test controls

    def answer(self, message: dict[str, Any]) -> None:
        """Answer like a well-behaved server: state, pong, proposal-result."""
        kind = message.get("type")
        if kind == "subscribe":
            share_data_id = message["shareDataId"]
            self.send(
                {
                    "v": 1,
                    "type": "state",
                    "shareDataId": share_data_id,
                    "currentState": {"id": share_data_id},
                    "lastTransactionId": self.server.last_ids.get(share_data_id),
                }
            )
        elif kind == "ping":
            self.send({"v": 1, "type": "pong", "correlationId": message["correlationId"]})
        elif kind == "propose" and self.server.answer_proposals:
            self.send(
                {"v": 1, "type": "proposal-result", "correlationId": message["correlationId"], "accepted": True, "transactionId": "1"}
            )

    def send(self, message: Any) -> None:
        self.send_raw(json.dumps(message).encode() if not isinstance(message, bytes) else message)

    def send_raw(self, data: bytes, *, binary: bool = False, fin: bool = True, continuation: bool = False) -> None:
        assert self.transport is not None
        if continuation:
            msg_type = picows.WSMsgType.CONTINUATION
        else:
            msg_type = picows.WSMsgType.BINARY if binary else picows.WSMsgType.TEXT
        self.transport.send(msg_type, data, fin=fin)

    def close(self, code: int, reason: str = "") -> None:
        assert self.transport is not None
        self.transport.send_close(code, reason.encode())
        self.server.loop.call_later(0.5, self.transport.disconnect)

    async def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def recv_type(self, kind: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next received message of type ``kind`` (others are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            message = await self.recv(max(0.001, deadline - loop.time()))
            if message.get("type") == kind:
                return message
        raise AssertionError(f"no {kind!r} message within {timeout}s")


class ScriptedServer:
    """A raw picows WebSocket server on 127.0.0.1 whose behaviour the test sets.

    ``reject(query) -> int | None`` may answer an upgrade with an HTTP error
    status; ``on_connect(conn)`` runs at every open; ``auto_answer`` makes
    connections answer subscribe/ping (and propose when
    ``answer_proposals``). ``upgrades`` records ``(loop time, query)`` of
    every upgrade request, accepted or not.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reject: Optional[Callable[[dict[str, str]], Optional[int]]] = None
        self.on_connect: Optional[Callable[[ScriptedConnection], None]] = None
        self.auto_answer = True
        self.answer_proposals = True
        self.last_ids: dict[str, Optional[str]] = {}
        self.upgrades: list[tuple[float, dict[str, str]]] = []
        self.connections: list[ScriptedConnection] = []
        self.new_connections: asyncio.Queue[ScriptedConnection] = asyncio.Queue()
        self._server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self, port: int = 0) -> "ScriptedServer":
        self._server = await picows.ws_create_server(self._route, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime"

    def _route(self, request: picows.WSUpgradeRequest) -> Any:
        path = request.path.decode("latin-1")
        query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        self.upgrades.append((self.loop.time(), query))
        status = self.reject(query) if self.reject is not None else None
        if status is not None:
            return picows.WSUpgradeResponseWithListener(
                picows.WSUpgradeResponse.create_error_response(status, b"rejected"), None
            )
        return ScriptedConnection(self, path)

    async def next_connection(self, timeout: float = DEADLINE) -> ScriptedConnection:
        return await asyncio.wait_for(self.new_connections.get(), timeout)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in self.connections:
            if connection.transport is not None and not connection.disconnected.is_set():
                connection.transport.disconnect(False)
        await self._server.wait_closed()
        self._server = None


# -- the real server with a small model --------------------------------------------------------


def accept_all(current: Any, proposed: Any) -> bool:
    return True


def make_manager(*ids: str) -> ShareDataManager:
    """A manager with one ShareData per id, each with an accept-all ``set``."""
    manager = ShareDataManager()
    for share_data_id in ids or ("doc",):
        manager.add_share_data(
            ShareData(share_data_id, current_state={"n": 0}, functions=[ShareFunction("set", accept_all)])
        )
    return manager


async def apply(manager: ShareDataManager, share_data_id: str, data: Any) -> str:
    """Apply a transaction through the ShareData's ``set`` function; its id."""
    function = manager.get_share_data_by_id(share_data_id).functions[0]
    outcome = await manager.apply_transaction(share_data_id, data, function)
    return outcome.transaction_id
