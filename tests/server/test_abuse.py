"""What hostile and unlucky clients do, on real sockets (127.0.0.1 only).

Bursts larger than the send cap, messages over the size limit followed by
more, thousands of requests pipelined in one write, and frames the server
must never send after its close frame. Each case is one the TypeScript
reference passes on the same input.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest

from safe_fast import ShareData, ShareDataManager, ShareFunction, create_id_based_function_resolver
from server_helpers import OP_CLOSE, OP_PING, OP_TEXT, RawClient, RawClientFactory, client_frame, wait_until

pytestmark = pytest.mark.timeout(90)

DEADLINE = 10.0
"""Upper bound for each wait in this module, the ``raw_clients``' included; reaching it fails the test."""


def frames_until_close(client: RawClient) -> tuple[list[Any], bool]:
    """The data frames received before the close frame, and whether anything at all came after it."""
    before: list[Any] = []
    closed = after = False
    for frame in client.take_received():
        if frame is None:
            break
        _fin, opcode, payload = frame
        if closed:
            after = True
        elif opcode == OP_CLOSE:
            closed = True
        elif opcode == OP_TEXT:
            before.append(json.loads(payload))
    return before, after


async def subscribes_in_one_write_answered_in_order(client: RawClient, count: int) -> None:
    """Subscribe to ``d0`` … ``d<count-1>`` in one write; every ``state`` must come, in order."""
    client.send_raw(
        b"".join(
            client_frame(OP_TEXT, json.dumps({"v": 1, "type": "subscribe", "shareDataId": f"d{i}"}).encode())
            for i in range(count)
        )
    )
    for i in range(count):
        opcode, message = await client.recv_message()
        assert opcode == OP_TEXT and message["type"] == "state" and message["shareDataId"] == f"d{i}", message


# -- bursts larger than the cap -----------------------------------------------------------------


@pytest.mark.parametrize("cap, frames", [(256 * 1024, 32), (1024 * 1024, 70)])
async def test_a_burst_larger_than_the_cap_reaches_every_reader(
    start_server: Any, raw_clients: RawClientFactory, cap: int, frames: int
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("storm", current_state={"i": 0}))
    server = await start_server(manager, max_buffered_bytes=cap)
    overflows: list[Any] = []
    server.on("connection:overflow", overflows.append)
    readers = [await raw_clients(server.port) for _ in range(5)]
    for reader in readers:
        await reader.subscribe("storm")
    share_data = manager.get_share_data_by_id("storm")
    assert share_data is not None
    # One event-loop iteration: ``frames`` frames of 16 KiB, together well past the cap.
    for i in range(frames):
        share_data.current_state = {"i": i, "pad": "x" * 16 * 1024}
        manager.update_share_data(share_data)
    for reader in readers:
        got = []
        for _ in range(frames):
            opcode, message = await reader.recv_message()
            assert opcode == OP_TEXT, (opcode, message)
            got.append(message["currentState"]["i"])
        assert got == list(range(frames))
    assert overflows == []


async def test_a_reader_that_stops_still_falls_behind_within_a_bounded_backlog(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    cap = 256 * 1024
    manager = ShareDataManager()
    manager.add_share_data(ShareData("storm", current_state={"i": 0}))
    server = await start_server(manager, max_buffered_bytes=cap)
    overflows: list[Any] = []
    server.on("connection:overflow", overflows.append)
    reader = await raw_clients(server.port)
    stopped = await raw_clients(server.port, rcvbuf=4096)
    for client in (reader, stopped):
        await client.subscribe("storm")
    stopped.transport.pause_reading()
    share_data = manager.get_share_data_by_id("storm")
    assert share_data is not None
    bursts = 0
    for bursts in range(1, 201):  # 200 bursts of 512 KiB: far more than any kernel buffers
        for i in range(32):
            share_data.current_state = {"burst": bursts, "i": i, "pad": "x" * 16 * 1024}
            manager.update_share_data(share_data)
        await asyncio.sleep(0.01)  # let the active reader read
        if overflows:
            break
    (overflow,) = overflows
    assert overflow.max_buffered_bytes == cap
    # The backlog it is judged on is bytes its socket did not take, at most the cap plus one burst.
    assert cap - 17 * 1024 < overflow.buffered_amount <= cap + 32 * 17 * 1024
    # The active reader was never closed and got every frame, in order.
    for burst in range(1, bursts + 1):
        for i in range(32):
            opcode, message = await reader.recv_message()
            assert opcode == OP_TEXT and (message["currentState"]["burst"], message["currentState"]["i"]) == (burst, i)
    stopped.transport.resume_reading()
    assert (await stopped.close_frame())[0] == 4001


# -- nothing after the server decided to close ---------------------------------------------------


async def test_nothing_received_after_a_1009_is_acted_on(start_server: Any, raw_clients: RawClientFactory) -> None:
    limit = 1024 * 1024
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=0, functions=[ShareFunction("set", lambda s, p: True)]))
    server = await start_server(
        manager, max_message_size=limit, resolve_function=create_id_based_function_resolver(manager)
    )
    watcher = await raw_clients(server.port)
    await watcher.subscribe("doc")
    pad = "x" * limit  # the proposes' JSON is just over the limit
    for attempt in range(10):
        client = await raw_clients(server.port)
        ping = json.dumps({"v": 1, "type": "ping", "correlationId": "big", "pad": "y" * (limit - 100)}).encode()
        assert len(ping) <= limit
        oversize = [
            json.dumps(
                {"v": 1, "type": "propose", "shareDataId": "doc", "functionId": "set", "proposedData": pad,
                 "correlationId": f"p{attempt}-{i}"}
            ).encode()
            for i in range(4)
        ]
        client.send_raw(client_frame(OP_TEXT, ping) + b"".join(client_frame(OP_TEXT, m) for m in oversize))
        client.send(OP_PING, b"after")
        assert (await client.close_frame())[0] == 1009
        await client.eof()
        before, after = frames_until_close(client)
        assert after is False, "a frame came after the close frame"
        assert [m["type"] for m in before] in ([], ["pong"])
    # Not one of the oversize proposes was applied.
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []
    assert await watcher.request({"v": 1, "type": "ping", "correlationId": "end"}) == {
        "v": 1, "type": "pong", "correlationId": "end"
    }


async def test_no_frame_follows_a_close_frame_while_broadcasts_flow(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("feed", current_state=0))
    server = await start_server(manager)
    violations = [
        bytes([0x83, 0x80]) + b"\0\0\0\0",  # reserved opcode: picows closes 1002 itself
        bytes([0x81, 0x02]) + b"{}",  # unmasked: picows closes 1002 itself
        client_frame(OP_TEXT, b"ab", fin=False) + client_frame(OP_TEXT, b"cd", fin=False),  # ours, 1002
        client_frame(OP_TEXT, b"not json"),  # ours, 4004
        client_frame(OP_TEXT, b"\xff\xfe"),  # ours, 1007
    ]
    clients = []
    for index in range(40):
        client = await raw_clients(server.port)
        await client.subscribe("feed")
        clients.append((client, violations[index % len(violations)]))
    share_data = manager.get_share_data_by_id("feed")
    assert share_data is not None
    for round_ in range(20):
        for client, violation in clients[round_ * 2 : round_ * 2 + 2]:
            client.send_raw(violation + client_frame(OP_PING, b"late"))
        for _ in range(5):
            share_data.current_state = round_
            manager.update_share_data(share_data)
            await asyncio.sleep(0.002)
    for client, _ in clients:
        await client.close_frame()
    for client, _ in clients:
        await client.finish_close()
        _before, after = frames_until_close(client)
        assert after is False, "a frame came after the close frame"


# -- pipelining ------------------------------------------------------------------------------


async def test_thousands_of_subscribes_in_one_write_are_all_answered(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    count = 3000
    manager = ShareDataManager()
    for i in range(count):
        manager.add_share_data(ShareData(f"d{i}", current_state=i))
    server = await start_server(manager)
    client = await raw_clients(server.port)
    # One large message first: the server's read buffer grows to fit it, so
    # the burst below can arrive in a single socket read.
    big_ping = {"v": 1, "type": "ping", "correlationId": "big", "pad": "x" * 512 * 1024}
    assert (await client.request(big_ping))["type"] == "pong"
    await subscribes_in_one_write_answered_in_order(client, count)
    (connection,) = server.connections
    assert len(connection.subscriptions) == count


async def test_a_close_picows_sends_itself_ends_the_connection_by_close_timeout(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    # A subscriber that stopped reading, then a frame header over the size
    # limit: picows sends 1009 and a graceful disconnect that cannot finish
    # (the peer reads nothing). The server must still drop it after close_timeout.
    manager = ShareDataManager()
    manager.add_share_data(ShareData("feed", current_state=0))
    server = await start_server(manager, max_message_size=1024, close_timeout=0.5)
    closed: list[Any] = []
    server.on("connection:closed", closed.append)
    client = await raw_clients(server.port, rcvbuf=4096)
    await client.subscribe("feed")
    client.transport.pause_reading()
    share_data = manager.get_share_data_by_id("feed")
    assert share_data is not None
    for i in range(20):  # a backlog the kernel holds for the stopped reader
        share_data.current_state = {"i": i, "pad": "x" * 8192}
        manager.update_share_data(share_data)
        await asyncio.sleep(0)
    client.send_raw(bytes([0x81, 0x80 | 126]) + struct.pack("!H", 4096) + b"\0\0\0\0")  # just a header
    (connection,) = server.connections
    await wait_until(lambda: connection.websocket.is_close_frame_sent, "picows' own close frame")
    share_data.current_state = "after"
    manager.update_share_data(share_data)  # the next broadcast finds the close
    await wait_until(lambda: len(closed) == 1, "the connection dropped after close_timeout", timeout=DEADLINE)
    assert server.connections == [] and not connection.subscriptions


async def test_a_ping_during_an_async_authenticate_never_precedes_its_4002(start_server: Any) -> None:
    async def refuse(request: Any) -> Any:
        await asyncio.sleep(0.05)
        return None

    server = await start_server(ShareDataManager(), authenticate=refuse)
    client = await RawClient.open(server.port, deadline=DEADLINE)
    try:
        client.send(OP_PING, b"hi")
        first = await client.recv()
        assert first is not None and first[1] == OP_CLOSE and struct.unpack("!H", first[2][:2])[0] == 4002, first
    finally:
        client.transport.abort()


async def test_a_ping_held_during_authenticate_is_not_answered_after_picows_own_close(start_server: Any) -> None:
    admitted = asyncio.Event()

    async def authenticate(request: Any) -> Any:
        await admitted.wait()
        return {"subject": "late"}

    server = await start_server(ShareDataManager(), authenticate=authenticate)
    client = await RawClient.open(server.port, deadline=DEADLINE)
    try:
        client.send(OP_PING, b"held")  # held while authenticating
        (connection,) = server.connections
        client.send_raw(b"\x81\x00")  # an unmasked frame: picows sends 1002 itself
        await wait_until(lambda: connection.websocket.is_close_frame_sent, "picows' own close frame")
        admitted.set()  # authenticate returns before the connection is dropped
        frames = []
        for _ in range(100):
            frame = await client.recv()
            if frame is None:
                break
            frames.append(frame[1])
        assert frames == [OP_CLOSE], frames
    finally:
        client.transport.abort()


@pytest.mark.parametrize("violation, code", [(b"not json", 4004), (b"\xff\xfe", 1007)])
async def test_a_propose_after_a_violation_in_the_same_write_is_not_applied(
    start_server: Any, raw_clients: RawClientFactory, violation: bytes, code: int
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=0, functions=[ShareFunction("set", lambda s, p: True)]))
    server = await start_server(manager, resolve_function=create_id_based_function_resolver(manager))
    client = await raw_clients(server.port)
    propose = {"v": 1, "type": "propose", "shareDataId": "doc", "functionId": "set", "proposedData": 1,
               "correlationId": "late"}
    client.send_raw(client_frame(OP_TEXT, violation) + client_frame(OP_TEXT, json.dumps(propose).encode()))
    assert (await client.close_frame())[0] == code
    await client.finish_close()
    before, after = frames_until_close(client)
    assert after is False and all(m["type"] == "error" for m in before)
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []


async def test_a_pipelined_burst_behind_an_async_hook_is_answered_in_order(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    # No pre-grown read buffer: the burst arrives over many socket reads while
    # the worker is inside the hook, far more than MAX_PENDING_MESSAGES.
    count = 3000

    async def authorize(context: Any, share_data_id: str) -> bool:
        await asyncio.sleep(0)
        return True

    manager = ShareDataManager()
    for i in range(count):
        manager.add_share_data(ShareData(f"d{i}", current_state=i))
    server = await start_server(manager, authorize_subscribe=authorize)
    client = await raw_clients(server.port)
    await subscribes_in_one_write_answered_in_order(client, count)
