"""What an idle connection keeps: no ``__dict__``, no copy of the handshake,
picows' buffers given back, and the request still whole for the application.

The bytes themselves are measured by ``benchmarks/memory_per_connection.py``;
these tests pin the layout that figure depends on, and that a connection
whose buffers were trimmed still reads and writes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from safe_fast import UpgradeRequest
from safe_fast.server import picows_buffers
from safe_fast.server.picows_buffers import READ_CAPACITY
from server_helpers import (
    OP_PING,
    OP_PONG,
    OP_TEXT,
    DEADLINE,
    RawClient,
    ServerFactory,
    client_frame,
    propose,
    wait_until,
)


async def open_subscribed(server: Any) -> RawClient:
    client = await RawClient.open(server.port)
    await client.subscribe("doc")
    return client


async def test_a_connection_has_no_instance_dict(server_factory: ServerFactory) -> None:
    server = await server_factory()
    client = await open_subscribed(server)
    try:
        (connection,) = server.connections
        assert not hasattr(connection, "__dict__")
        assert connection.subscriptions == {"doc"}
    finally:
        client.transport.abort()


async def test_picows_keeps_no_handshake_headers_but_authenticate_got_them_whole(server_factory: ServerFactory) -> None:
    seen: list[UpgradeRequest] = []

    def authenticate(request: UpgradeRequest) -> dict[str, Any]:
        seen.append(request)
        return {"request": request}

    server = await server_factory(authenticate=authenticate)
    client = await open_subscribed(server)
    try:
        (connection,) = server.connections
        transport = connection.control.transport  # picows' WSTransport
        assert len(transport.request.headers) == 0 and transport.request.path == b""
        assert len(transport.response.headers) == 0
        # What the application was given (and kept, here in its context) is untouched.
        request = connection.context["request"]
        assert request is seen[0]
        assert request.headers["upgrade"].lower() == "websocket"
        assert request.headers["sec-websocket-version"] == "13"
        assert request.path == "/realtime"
        # The connection still works both ways: ping in, pong out; then a clean close.
        pong = await client.request({"v": 1, "type": "ping", "correlationId": "c1"})
        assert pong == {"v": 1, "type": "pong", "correlationId": "c1"}
        closing = asyncio.ensure_future(server.close())
        code, _reason = await client.close_frame()
        assert code == 1001
        await client.finish_close()
        await asyncio.wait_for(closing, DEADLINE)
    finally:
        client.transport.abort()


# picows' buffers (server/picows_buffers.py)


def buffers(websocket: Any) -> Any:
    """(read buffer capacity, write buffer capacity) of a picows WSTransport."""
    return picows_buffers.buffer_state(websocket)


async def given_back(websocket: Any, what: str = "the read buffer given back") -> None:
    await wait_until(lambda: buffers(websocket) == (READ_CAPACITY, 0), what)


@contextlib.asynccontextmanager
async def trimmed_connection(
    server_factory: ServerFactory, **options: Any
) -> AsyncIterator[tuple[Any, RawClient, Any]]:
    """A server, a subscribed client, and its picows WSTransport once its buffers are trimmed."""
    server = await server_factory(**options)
    client = await open_subscribed(server)
    try:
        (connection,) = server.connections
        websocket = connection.control.transport
        await given_back(websocket, "picows' buffers trimmed")
        yield server, client, websocket
    finally:
        client.transport.abort()


def test_the_installed_picows_is_one_whose_buffers_are_trimmed() -> None:
    # Fails on a picows not in VERIFIED_PICOWS: compare its picows.pxd
    # (MemoryBuffer, WSTransport) and its buffer use with picows_buffers.py first.
    assert picows_buffers.active()


async def test_an_idle_connection_gives_picows_buffers_back_and_control_frames_still_flow(
    server_factory: ServerFactory,
) -> None:
    async with trimmed_connection(server_factory, heartbeat_interval=0.05) as (server, client, websocket):
        # Pongs (echoing the longest payload a ping may have) and the
        # heartbeat's pings are framed by the server, not by picows.
        payload = bytes(range(125))
        client.send(OP_PING, payload)
        for _ in range(100):
            _fin, opcode, data = await client.recv()
            if opcode == OP_PONG:
                assert data == payload
                break
        else:
            raise AssertionError("no pong")
        await wait_until(lambda: client.pings >= 3, "three heartbeat pings")
        assert buffers(websocket) == (READ_CAPACITY, 0)
        assert server.connections, "the heartbeat's pings were answered"
        # The close frame goes through picows' write buffer, allocated again for it.
        closing = asyncio.ensure_future(server.close())
        code, _reason = await client.close_frame()
        assert code == 1001
        await client.finish_close()
        await asyncio.wait_for(closing, DEADLINE)


async def test_a_large_message_grows_the_read_buffer_and_it_is_given_back(server_factory: ServerFactory) -> None:
    async with trimmed_connection(server_factory) as (_server, client, websocket):
        for round_ in range(3):
            result = await client.request(propose("inc", {"pad": "x" * 200_000}, correlation_id=f"big-{round_}"))
            assert result["type"] == "proposal-result" and result["accepted"], result
            assert result["correlationId"] == f"big-{round_}"
            await given_back(websocket)


async def test_pipelined_requests_are_all_answered_and_the_buffer_given_back(server_factory: ServerFactory) -> None:
    async with trimmed_connection(server_factory) as (_server, client, websocket):
        pings = (client_frame(OP_TEXT, b'{"v":1,"type":"ping","correlationId":"p%d"}' % i) for i in range(500))
        client.send_raw(b"".join(pings))
        for i in range(500):
            pong = (await client.recv_message())[1]
            assert pong == {"v": 1, "type": "pong", "correlationId": f"p{i}"}
        await given_back(websocket)


async def test_a_read_buffer_holding_part_of_a_message_is_left_as_it_is(server_factory: ServerFactory) -> None:
    async with trimmed_connection(server_factory) as (_server, client, websocket):
        frame = client_frame(OP_TEXT, propose("inc", {"pad": "y" * 4000}, correlation_id="split").encode())
        client.send_raw(frame[:3000])
        await wait_until(lambda: buffers(websocket)[0] > READ_CAPACITY, "the first part read")
        grown = buffers(websocket)
        assert picows_buffers.trim(websocket) is False  # busy: to be tried again
        for _ in range(10):
            await asyncio.sleep(0)
        assert buffers(websocket) == grown
        client.send_raw(frame[3000:])
        result = await client.request(propose("inc", None, correlation_id="after"))
        # The first message came through whole, then the second.
        assert result["correlationId"] == "split" and result["accepted"], result
        assert (await client.recv_message())[1]["correlationId"] == "after"
        await given_back(websocket)


async def test_a_buffer_busy_when_its_trim_came_is_given_back_with_the_next_message(
    server_factory: ServerFactory,
) -> None:
    async with trimmed_connection(server_factory) as (server, client, websocket):
        # The large message's read also brings the first bytes of the next
        # one, which is short: its trim finds them unread.
        first = client_frame(OP_TEXT, b'{"v":1,"type":"ping","correlationId":"%s"}' % (b"x" * 300_000))
        second = client_frame(OP_TEXT, b'{"v":1,"type":"ping","correlationId":"s"}')
        client.send_raw(first + second[:3])
        assert (await client.recv_message())[1]["type"] == "pong"
        await wait_until(lambda: websocket in server._trimmer.skipped, "the trim put off")
        assert buffers(websocket)[0] > READ_CAPACITY
        client.send_raw(second[3:])
        assert (await client.recv_message())[1] == {"v": 1, "type": "pong", "correlationId": "s"}
        await given_back(websocket)
        assert websocket not in server._trimmer.skipped
