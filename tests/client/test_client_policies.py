"""Close-code policies, reconnect pacing and bad server input, on real
sockets against a scripted raw picows server (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from safe_fast.client import (
    Backoff,
    ClientClosed,
    ConnectionClosed,
    ConnectionFailed,
    ProtocolError,
    RealtimeClient,
    SubscriptionRejected,
    Unauthorized,
)

from client_helpers import DEADLINE, Recorder, ScriptedConnection, eventually

pytestmark = pytest.mark.timeout(30)

STEADY = Backoff(min=0.05, max=5.0, factor=2.0, jitter=0.0)
"""No jitter, so delays can be compared exactly."""


def close_at_once(code: int, reason: str = ""):
    def on_connect(connection: ScriptedConnection) -> None:
        connection.close(code, reason)

    return on_connect


@pytest.mark.parametrize("code, first", [(1000, 0.05), (4001, 0.0), (4003, 0.05)])
async def test_a_server_that_closes_at_once_meets_growing_delays(scripted_server: Any, clients: Any, code: int, first: float) -> None:
    server = await scripted_server()
    server.on_connect = close_at_once(code)
    client = RealtimeClient(server.url, backoff=STEADY, stable_after=5.0)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    await eventually(lambda: len(server.upgrades) >= 6, what="six connections")
    await client.close()
    delays = [args[1] for args in recorder.of("reconnecting")][:5]
    assert delays == pytest.approx([first, 0.1, 0.2, 0.4, 0.8])
    times = [t for t, _ in server.upgrades]
    gaps = [b - a for a, b in zip(times, times[1:])][:5]
    for gap, delay in zip(gaps, delays):
        assert gap >= delay - 0.01  # each attempt waited its (growing) delay: no tight loop
    assert [args[0] for args in recorder.of("reconnecting")][:5] == [1, 2, 3, 4, 5]


async def test_a_stable_connection_restarts_the_backoff(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()

    def close_later(connection: ScriptedConnection) -> None:
        server.loop.call_later(0.15, connection.close, 1000, "")

    server.on_connect = close_later
    client = RealtimeClient(server.url, backoff=STEADY, stable_after=0.1)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    await eventually(lambda: len(recorder.of("reconnecting")) >= 4, what="four reconnects")
    await client.close()
    assert [args for args in recorder.of("reconnecting")][:4] == [(1, 0.05)] * 4


async def test_bad_server_input_never_crashes_the_client(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    connection = await server.next_connection()
    sub = client.subscribe("doc")
    await connection.recv_type("subscribe")
    await eventually(lambda: len(recorder.of("message")) == 1, what="state")

    def frame(message: dict[str, Any]) -> bytes:
        return json.dumps(message).encode()

    bad: list[tuple[bytes, dict[str, Any]]] = [
        (b"garbage{", {}),
        (b"\xff\xfe\xfd", {}),
        (b"42", {}),
        (frame({"v": 1, "type": "surprise", "shareDataId": "doc"}), {}),
        (frame({"v": 2, "type": "pong", "correlationId": "c-1"}), {}),
        (frame({"v": 1, "type": "transaction", "shareDataId": "doc"}), {}),
        (frame({"v": 1, "type": "transaction", "shareDataId": "elsewhere", "transactionId": "1", "accepted": True}), {}),
        (frame({"v": 1, "type": "lifecycle", "shareDataId": "elsewhere", "event": "removed"}), {}),
        (frame({"v": 1, "type": "proposal-result", "correlationId": "c-404", "accepted": True}), {}),
        (frame({"v": 1, "type": "pong", "correlationId": "c-405"}), {}),
        (frame({"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True}), {"binary": True}),
        (b"", {}),
    ]
    for data, options in bad:
        connection.send_raw(data, **options)
    # A fragmented but valid message is assembled.
    good = frame({"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True, "currentState": 1})
    connection.send_raw(good[:10], fin=False)
    connection.send_raw(good[10:20], fin=False, continuation=True)
    connection.send_raw(good[20:], continuation=True)

    await eventually(lambda: sub.last_transaction_id == "1", what="the good frame after the bad ones")
    errors = recorder.errors()
    assert len(errors) == len(bad)
    assert all(isinstance(e, ProtocolError) for e in errors)
    assert client.state == "open"
    assert isinstance(await asyncio.wait_for(client.ping(), DEADLINE), float)
    assert len(server.upgrades) == 1  # never even reconnected
    assert recorder.of("close") == []


async def test_an_error_without_listener_is_logged_not_raised(scripted_server: Any, clients: Any, caplog: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url)
    clients(client)
    await client.connect()
    connection = await server.next_connection()
    with caplog.at_level(logging.WARNING, logger="safe_fast.client"):
        connection.send_raw(b"not json")
        connection.send({"v": 1, "type": "error", "code": "something", "message": "went wrong"})
        assert await asyncio.wait_for(client.ping(), DEADLINE) >= 0
    texts = [record.getMessage() for record in caplog.records if record.name == "safe_fast.client"]
    assert any("not valid JSON" in text for text in texts)
    assert any("something: went wrong" in text for text in texts)
    assert client.state == "open"


async def test_4001_reconnects_at_once_and_resumes(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    server.last_ids["doc"] = "5"
    server.answer_proposals = False
    client = RealtimeClient(server.url, backoff=Backoff(min=2.0, jitter=0.0))
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    sub = client.subscribe("doc")
    assert await first.recv_type("subscribe") == {"v": 1, "type": "subscribe", "shareDataId": "doc"}
    await eventually(lambda: sub.last_transaction_id == "5", what="state")
    first.send({"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "6", "accepted": True, "currentState": 6})
    await eventually(lambda: sub.last_transaction_id == "6", what="live 6")
    in_flight = asyncio.ensure_future(client.propose("doc", "set", 1))
    await first.recv_type("propose")

    first.close(4001, "send buffer exceeded")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(in_flight, DEADLINE)
    assert (info.value.code, info.value.reason) == (4001, "send buffer exceeded")
    assert str(info.value) == "connection closed: 4001 send buffer exceeded"

    second = await server.next_connection()
    assert await second.recv_type("subscribe") == {"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "6"}
    assert recorder.of("close") == [(4001, "send buffer exceeded")]
    assert recorder.of("reconnecting") == [(1, 0.0)]
    assert not sub.is_detached


async def test_4002_with_a_fixed_token_stops(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, token="fixed", backoff=STEADY)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    connection = await server.next_connection()
    assert connection.query["token"] == "fixed"
    sub = client.subscribe("doc")
    await connection.recv_type("subscribe")
    server.auto_answer = False
    in_flight = asyncio.ensure_future(client.ping())
    await connection.recv_type("ping")
    connection.close(4002, "unauthorized")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(in_flight, DEADLINE)
    assert info.value.code == 4002
    await eventually(lambda: client.state == "closed", what="the stop")
    errors = [e for e in recorder.errors() if isinstance(e, Unauthorized)]
    assert len(errors) == 1 and errors[0].code == 4002
    assert sub.is_detached
    with pytest.raises(ClientClosed):
        await client.ping()
    await asyncio.sleep(0.4)
    assert len(server.upgrades) == 1
    assert recorder.of("reconnecting") == []


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_4002_with_a_token_callable_refreshes_and_reconnects(scripted_server: Any, clients: Any, kind: str) -> None:
    server = await scripted_server()
    issued: list[str] = []

    def next_token() -> str:
        issued.append(f"t{len(issued) + 1}")
        return issued[-1]

    async def next_token_async() -> str:
        await asyncio.sleep(0)
        return next_token()

    client = RealtimeClient(server.url, token=next_token if kind == "sync" else next_token_async, backoff=STEADY)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    assert first.query["token"] == "t1"
    sub = client.subscribe("doc")
    await first.recv_type("subscribe")
    first.close(4002, "token expired")
    second = await server.next_connection()
    assert second.query["token"] == "t2"  # asked again before the attempt
    await second.recv_type("subscribe")
    assert client.state == "open" and not sub.is_detached
    assert not [e for e in recorder.errors() if isinstance(e, Unauthorized)]
    assert recorder.of("close")[0] == (4002, "token expired")


async def test_http_401_on_reconnect_with_a_fixed_token_stops(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, token="good", backoff=STEADY)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    connection = await server.next_connection()
    server.reject = lambda query: 401
    connection.close(1001, "going away")
    await eventually(lambda: client.state == "closed", what="the stop")
    errors = [e for e in recorder.errors() if isinstance(e, Unauthorized)]
    assert len(errors) == 1 and errors[0].status == 401
    await asyncio.sleep(0.4)
    assert len(server.upgrades) == 2  # the first connection and one rejected attempt


async def test_http_401_with_a_token_callable_keeps_trying(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    tokens = iter(["good-1", "stale", "stale", "good-2", "good-3"])
    client = RealtimeClient(server.url, token=lambda: next(tokens), backoff=STEADY)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    server.reject = lambda query: None if query.get("token", "").startswith("good") else 401
    first.close(1001, "going away")
    second = await server.next_connection()
    assert second.query["token"] == "good-2"
    # The server has the connection before the client has read the upgrade answer.
    await eventually(lambda: client.state == "open", what="the reconnect")
    errors = [e for e in recorder.errors() if isinstance(e, Unauthorized)]
    assert [e.status for e in errors] == [401, 401]
    assert [args[0] for args in recorder.of("reconnecting")] == [1, 2, 3]


async def test_http_error_status_at_connect(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    server.reject = lambda query: 503
    client = RealtimeClient(server.url, backoff=STEADY)
    clients(client)
    with pytest.raises(ConnectionFailed) as info:
        await client.connect()
    assert info.value.status == 503
    assert client.state == "closed"


async def test_4004_is_reported_and_retried_with_backoff(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, backoff=Backoff(min=0.2, jitter=0.0))
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    first.close(4004, "invalid message")
    await server.next_connection()
    assert loop.time() - closed_at >= 0.19
    assert recorder.of("reconnecting") == [(1, 0.2)]
    reported = [e for e in recorder.errors() if isinstance(e, ConnectionClosed)]
    assert len(reported) == 1 and reported[0].code == 4004 and reported[0].reason == "invalid message"


async def test_4003_without_an_error_frame_drops_the_first_unanswered(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    server.auto_answer = False
    client = RealtimeClient(server.url, backoff=Backoff(min=2.0, jitter=0.0))
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    a = client.subscribe("a")
    b = client.subscribe("b")
    await first.recv_type("subscribe")
    await first.recv_type("subscribe")
    first.send({"v": 1, "type": "state", "shareDataId": "a", "currentState": None, "lastTransactionId": "3"})
    await eventually(lambda: a.last_transaction_id == "3", what="state of a")
    first.close(4003, "unknown shareDataId")
    second = await server.next_connection()
    resubscribe_a = {"v": 1, "type": "subscribe", "shareDataId": "a", "since": "3"}
    assert await second.recv() == resubscribe_a
    # Barrier: the resubscribes are written at the open, before this ping can
    # be; the connection is ordered, so once the server has the ping it has
    # everything the client sent before it, including any subscribe for b.
    barrier = asyncio.ensure_future(client.ping())
    ping = await second.recv()
    assert ping["type"] == "ping"
    assert second.all_received == [resubscribe_a, ping]  # b is not subscribed again
    second.answer(ping)  # auto_answer is off; answered, the ping leaves nothing pending
    await asyncio.wait_for(barrier, DEADLINE)
    assert b.is_detached and not a.is_detached
    rejected = [e for e in recorder.errors() if isinstance(e, SubscriptionRejected)]
    assert [e.share_data_id for e in rejected] == ["b"]
    assert recorder.of("reconnecting") == [(1, 0.0)]


async def test_reconnect_disabled_fails_queued_requests_at_once(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, backoff=Backoff(disabled=True))
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    connection = await server.next_connection()
    connection.close(1001, "going away")
    await eventually(lambda: client.state == "closed", what="the stop")
    with pytest.raises(ClientClosed):
        await client.ping()
    assert recorder.of("reconnecting") == []
    await asyncio.sleep(0.2)
    assert len(server.upgrades) == 1


async def test_cancelling_connect_gives_the_attempt_up(clients: Any) -> None:
    import socket

    # A listening socket that never answers the upgrade.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        client = RealtimeClient(f"ws://127.0.0.1:{port}/realtime", connect_timeout=5.0)
        clients(client)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.connect(), 0.2)
        await eventually(lambda: client.state == "closed", what="the run to end")
    finally:
        listener.close()


async def test_a_failing_token_callable_is_an_attempt_failure(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("identity provider down")
        return f"t{len(calls)}"

    client = RealtimeClient(server.url, token=token, backoff=STEADY)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    first = await server.next_connection()
    first.close(1001, "going away")
    second = await server.next_connection()
    assert second.query["token"] == "t3"
    failures = [e for e in recorder.errors() if isinstance(e, ConnectionFailed)]
    assert len(failures) == 1 and isinstance(failures[0].__cause__, RuntimeError)

    broken = RealtimeClient(server.url, token=lambda: 1 / 0)
    clients(broken)
    with pytest.raises(ConnectionFailed) as info:
        await broken.connect()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


async def test_close_during_the_first_attempt(clients: Any) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        client = RealtimeClient(f"ws://127.0.0.1:{port}/realtime", connect_timeout=5.0)
        clients(client)
        connecting = asyncio.ensure_future(client.connect())
        await asyncio.sleep(0.1)
        assert client.state == "connecting"
        await asyncio.wait_for(client.close(), DEADLINE)
        with pytest.raises(ClientClosed):
            await connecting
        assert client.state == "closed"
    finally:
        listener.close()
