"""PROTOCOL.md, row by row, over real sockets on 127.0.0.1.

The server is :func:`attach_realtime_server`; the client is the
``websockets`` library used as a raw protocol client, so every assertion is
on what actually crossed the wire (the JSON text, its keys, close codes and
HTTP statuses). The sans-I/O twin of these tests is ``test_connection.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from safe_fast import (
    CLOSE_INVALID_MESSAGE,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_SHARE_DATA,
    InMemoryReplayStore,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
)
from server_helpers import (
    DEADLINE,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClientFactory,
    ServerFactory,
    allow_everybody,
    apply_transactions,
    barrier,
    client_frame,
    closed_with,
    connect,
    make_doc,
    propose,
    recv_json,
    recv_raw,
    subscribe,
    wait_until,
    wire,
)

pytestmark = pytest.mark.timeout(30)


async def subscribed(ws: Any, share_data_id: str = "doc") -> dict[str, Any]:
    """Subscribe and return the state frame."""
    await ws.send(subscribe(share_data_id))
    state = await recv_json(ws)
    assert state["type"] == "state", state
    return state


async def until(predicate: Any, what: str) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded in count and time)."""

    async def poll() -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never happened: {what}")

    await asyncio.wait_for(poll(), DEADLINE)


# -- framing -----------------------------------------------------------------------------


async def test_ping_pong_exact_text(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="c-7"))
        assert await recv_raw(ws) == '{"v":1,"type":"pong","correlationId":"c-7"}'


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        ("hello", "message: not valid JSON"),
        ('"just a string"', "message: must be a JSON object"),
        ('{"v": true, "type": "ping", "correlationId": "x"}', "v: must be 1"),
        ('{"v": "1", "type": "ping", "correlationId": "x"}', "v: must be 1"),
        ('{"v": 2, "type": "ping", "correlationId": "x"}', "v: must be 1"),
        ('{"type": "ping", "correlationId": "x"}', "v: required"),
        ('{"v": 1, "type": "dance"}', "type: must be one of subscribe, unsubscribe, propose, ping"),
        ('{"v": 1, "type": "subscribe", "shareDataId": ""}', "shareDataId: must be a non-empty string"),
        ('{"v": 1, "type": "unsubscribe", "shareDataId": null}', "shareDataId: must be a non-empty string"),
        ('{"v": 1, "type": "ping"}', "correlationId: required"),
        (
            '{"v": 1, "type": "propose", "shareDataId": "doc", "functionId": "", "correlationId": 5}',
            "functionId: must be a non-empty string; correlationId: must be a non-empty string",
        ),
        ('{"v": 1, "type": "ping", "correlationId": "x", "n": NaN}', "message: not valid JSON"),
        ('{"v": 1, "type": "ping", "correlationId": "x", "n": 1e400}', "message: not valid JSON"),
        ('{"v": 1, "type": "ping", "correlationId": "x", "n": ' + "[" * 5000 + "]" * 5000 + "}", "message: not valid JSON"),
    ],
)
async def test_invalid_message_error_then_close_4004(server_factory: ServerFactory, payload: str, text: str) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(payload)
        code, reason, received = await closed_with(ws)
    assert code == CLOSE_INVALID_MESSAGE == 4004
    assert reason == "invalid message"
    assert [json.loads(m) for m in received] == [{"v": 1, "type": "error", "code": "invalid-message", "message": text}]


async def test_v_float_one_accepted_and_unknown_keys_ignored(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send('{"v": 1.0, "type": "ping", "correlationId": "a", "shiny": [1, {"x": null}]}')
        assert await recv_json(ws) == {"v": 1, "type": "pong", "correlationId": "a"}
        await ws.send('{"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "", "future": true}')
        assert (await recv_json(ws))["type"] == "state"
        assert await barrier(ws) == []


async def test_binary_frame_holding_json_is_processed_like_text(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="bin").encode())
        raw = await recv_raw(ws)
        assert isinstance(raw, str)  # answered with a text frame
        assert json.loads(raw) == {"v": 1, "type": "pong", "correlationId": "bin"}


async def test_binary_frame_not_utf8_is_invalid_message(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(b'{"v": 1, "type": "ping", "correlationId": "\xc3\x28"}')
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (4004, "invalid message")
    assert [json.loads(m) for m in received] == [
        {"v": 1, "type": "error", "code": "invalid-message", "message": "message: not valid UTF-8"}
    ]


async def test_text_frame_not_utf8_closes_1007(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(b'{"v": 1, "type": "ping", "correlationId": "\xff"}', text=True)
        code, _reason, received = await closed_with(ws)
    assert code == 1007
    assert received == []


async def test_message_over_max_message_size_closes_1009(server_factory: ServerFactory) -> None:
    server = await server_factory(max_message_size=4096)
    closed: list[Any] = []
    server.on("connection:closed", closed.append)
    async with connect(server) as ws:
        await ws.send(propose(data="x" * 5000))
        code, _reason, received = await closed_with(ws)
    assert code == 1009
    assert received == []
    await until(lambda: closed, "connection:closed")
    assert closed[0].code == 1009


async def test_fragmented_message_is_reassembled_and_limited(server_factory: ServerFactory) -> None:
    server = await server_factory(max_message_size=4096)
    async with connect(server) as ws:
        text = wire(type="ping", correlationId="frag")
        await ws.send([text[:5], text[5:20], text[20:]])
        assert await recv_json(ws) == {"v": 1, "type": "pong", "correlationId": "frag"}
        # Each fragment is small, the message is not.
        await ws.send(["x" * 3000, "y" * 3000])
        code, _reason, _received = await closed_with(ws)
    assert code == 1009


async def test_message_over_the_default_limit_closes_1009(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        try:
            await ws.send(propose(data="x" * (8 * 1024 * 1024 + 1)))
        except ConnectionClosed:
            pass  # the server may close while the client is still writing
        code, _reason, _received = await closed_with(ws)
    assert code == 1009


async def test_two_mib_proposed_data_is_accepted_with_the_default_limit(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    blob = "z" * (2 * 1024 * 1024)
    async with connect(server) as ws:
        await ws.send(propose(data={"blob": blob}))
        assert await recv_json(ws) == {
            "v": 1,
            "type": "proposal-result",
            "correlationId": "c-1",
            "accepted": True,
            "transactionId": "1",
        }
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.current_state == {"blob": blob}


async def test_two_mib_state_reaches_subscribers_with_the_default_cap(server_factory: ServerFactory) -> None:
    server = await server_factory()
    blob = "z" * (2 * 1024 * 1024)
    async with connect(server) as subscriber, connect(server) as proposer:
        await subscribed(subscriber)
        await proposer.send(propose(data={"blob": blob}))
        assert (await recv_json(proposer))["accepted"] is True
        frame = await recv_json(subscriber)
        assert frame["type"] == "transaction" and frame["currentState"] == {"blob": blob}
        await subscriber.send(subscribe())
        assert (await recv_json(subscriber))["currentState"] == {"blob": blob}


# -- subscribe ---------------------------------------------------------------------------


async def test_subscribe_unknown_share_data_error_then_4003(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(subscribe("nope"))
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (CLOSE_UNKNOWN_SHARE_DATA, "unknown shareDataId")
    assert received == ['{"v":1,"type":"error","code":"unknown-share-data","message":"shareDataId nope not found"}']


async def test_an_unknown_id_is_checked_before_the_authorizer(server_factory: ServerFactory) -> None:
    server = await server_factory(authorize_subscribe=lambda context, share_data_id: False)
    async with connect(server) as ws:
        await ws.send(subscribe("nope"))
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (CLOSE_UNKNOWN_SHARE_DATA, "unknown shareDataId")
    assert received == ['{"v":1,"type":"error","code":"unknown-share-data","message":"shareDataId nope not found"}']


async def test_subscribe_state_frame_exact_text(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(subscribe())
        assert await recv_raw(ws) == (
            '{"v":1,"type":"state","shareDataId":"doc","currentState":{"count":0},"lastTransactionId":null}'
        )


async def test_unauthorized_subscribe_false_or_raising_keeps_the_connection(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    manager.add_share_data(make_doc("secret"))
    manager.add_share_data(make_doc("cursed"))

    async def authorize(context: Any, share_data_id: str) -> bool:
        if share_data_id == "cursed":
            raise PermissionError("cursed ids are off limits")
        return share_data_id != "secret"

    server = await server_factory(authorize_subscribe=authorize)
    async with connect(server) as ws:
        await ws.send(subscribe("secret"))
        assert await recv_raw(ws) == (
            '{"v":1,"type":"error","code":"unauthorized-subscribe","message":"not authorized to subscribe to secret"}'
        )
        await ws.send(subscribe("cursed"))
        assert await recv_json(ws) == {
            "v": 1,
            "type": "error",
            "code": "unauthorized-subscribe",
            "message": "authorizer threw: cursed ids are off limits",
        }
        # Still open and usable; the refused ids deliver nothing.
        await subscribed(ws)
        await apply_transactions(manager, 1, share_data_id="secret")
        await apply_transactions(manager, 1, share_data_id="doc")
        assert [(m["shareDataId"], m["transactionId"]) for m in await barrier(ws)] == [("doc", "1")]


async def test_state_last_transaction_id_survives_replay_eviction(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory(replay_buffer_size=2)
    await apply_transactions(manager, 5)
    async with connect(server) as ws:
        state = await subscribed(ws)
        assert state["lastTransactionId"] == "5"
        assert state["currentState"] == {"count": 5}
        # The window itself only holds the last two.
        await ws.send(subscribe(since="2"))
        assert (await recv_json(ws))["type"] == "state"
        assert (await recv_json(ws))["code"] == "replay-cursor-not-found"
        await ws.send(subscribe(since="4"))
        assert (await recv_json(ws))["type"] == "state"
        assert [m["transactionId"] for m in await barrier(ws)] == ["5"]


async def test_replay_strictly_after_cursor_marked_replayed_without_state(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    await apply_transactions(manager, 2)
    await apply_transactions(manager, 1, "never")
    async with connect(server) as ws:
        await ws.send(subscribe(since="1"))
        state = await recv_json(ws)
        assert state == {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"count": 2}, "lastTransactionId": "3"}
        assert await recv_raw(ws) == '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"2","accepted":true,"replayed":true}'
        assert await recv_raw(ws) == '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"3","accepted":false,"replayed":true}'
        assert await barrier(ws) == []


async def test_empty_since_means_state_only(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    await apply_transactions(manager, 3)
    async with connect(server) as ws:
        await ws.send(subscribe(since=""))
        assert [m["type"] for m in await barrier(ws)] == ["state"]


@pytest.mark.parametrize("since", ["01", "1.0", "4", "abc"])
async def test_cursor_matches_as_exact_string(server_factory: ServerFactory, manager: ShareDataManager, since: str) -> None:
    server = await server_factory()
    await apply_transactions(manager, 3)
    async with connect(server) as ws:
        await ws.send(subscribe(since=since))
        assert (await recv_json(ws))["type"] == "state"
        assert await recv_raw(ws) == (
            '{"v":1,"type":"error","code":"replay-cursor-not-found",'
            f'"message":"since={since} not present in retained replay window; skipping replay"}}'
        )
        assert await barrier(ws) == []
        # "1" itself is there.
        await ws.send(subscribe(since="1"))
        assert [m.get("transactionId") for m in await barrier(ws)] == [None, "2", "3"]


async def test_cursor_with_empty_window_is_not_found(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(subscribe(since="1"))
        assert [(m["type"], m.get("code")) for m in await barrier(ws)] == [
            ("state", None),
            ("error", "replay-cursor-not-found"),
        ]


async def test_newest_cursor_replays_nothing(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    await apply_transactions(manager, 3)
    async with connect(server) as ws:
        await ws.send(subscribe(since="3"))
        assert [m["type"] for m in await barrier(ws)] == ["state"]


# -- live frames -------------------------------------------------------------------------


async def test_live_transactions_accepted_and_rejected_exact_text(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await subscribed(ws)
        await apply_transactions(manager, 1)
        await apply_transactions(manager, 1, "never")
        assert await recv_raw(ws) == (
            '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"1","accepted":true,"currentState":{"count":1}}'
        )
        assert await recv_raw(ws) == (
            '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"2","accepted":false,"currentState":{"count":1}}'
        )


async def test_unsubscribe_stops_frames(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await subscribed(ws)
        await apply_transactions(manager, 1)
        await ws.send(wire(type="unsubscribe", shareDataId="doc"))
        assert [m["transactionId"] for m in await barrier(ws)] == ["1"]
        await apply_transactions(manager, 3)
        assert await barrier(ws) == []
        # Unsubscribing what is not subscribed is no error, and resubscribing works.
        await ws.send(wire(type="unsubscribe", shareDataId="ghost"))
        assert await barrier(ws) == []
        assert (await subscribed(ws))["lastTransactionId"] == "4"


async def test_lifecycle_updated_carries_current_state(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await subscribed(ws)
        manager.update_share_data(make_doc(state={"count": 41}))
        assert await recv_raw(ws) == (
            '{"v":1,"type":"lifecycle","shareDataId":"doc","event":"updated","currentState":{"count":41}}'
        )


async def test_after_a_replacement_ids_from_1_reach_subscribers_whose_snapshot_was_further(
    server_factory: ServerFactory, manager: ShareDataManager
) -> None:
    server = await server_factory()
    await apply_transactions(manager, 3)
    async with connect(server) as ws:
        assert (await subscribed(ws))["lastTransactionId"] == "3"
        manager.update_share_data(make_doc(state={"count": 0}))  # a new history: ids count from 1 again
        assert json.loads(await recv_raw(ws))["type"] == "lifecycle"
        await apply_transactions(manager, 2)
        assert [json.loads(await recv_raw(ws))["transactionId"] for _ in range(2)] == ["1", "2"]


async def test_lifecycle_removed_is_the_last_frame_and_forgets_the_window(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as first, connect(server) as second:
        await subscribed(first)
        await subscribed(second)
        await apply_transactions(manager, 3)
        manager.remove_share_data_by_id("doc")
        removed = '{"v":1,"type":"lifecycle","shareDataId":"doc","event":"removed"}'
        for ws in (first, second):
            assert [await recv_raw(ws) for _ in range(4)][-1] == removed
        assert server.replay_store.entries_since("doc", "1") is None
        # A re-created id: the old subscribers hear nothing of it, its window starts empty.
        manager.add_share_data(make_doc())
        await apply_transactions(manager, 1)
        for ws in (first, second):
            assert await barrier(ws) == []
        await first.send(subscribe(since="2"))
        assert [(m["type"], m.get("code")) for m in await barrier(first)] == [
            ("state", None),
            ("error", "replay-cursor-not-found"),
        ]


async def test_multiple_subscribers_get_the_same_frames_in_order(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        for ws in (a, b, c):
            await subscribed(ws)
        for i in range(10):
            await c.send(propose("inc" if i % 3 else "never", {"count": i}, correlation_id=f"c-{i}"))
        streams = []
        for ws in (a, b):
            streams.append([await recv_raw(ws) for _ in range(10)])
        # The proposer gets the same broadcast frames, interleaved with its proposal results.
        c_frames = [await recv_raw(c) for _ in range(20)]
        streams.append([f for f in c_frames if '"type":"transaction"' in f])
        assert streams[0] == streams[1] == streams[2]
        assert [json.loads(f)["transactionId"] for f in streams[0]] == [str(i) for i in range(1, 11)]
        assert [json.loads(f)["accepted"] for f in streams[0]] == [bool(i % 3) for i in range(10)]
        for ws in (a, b, c):
            assert await barrier(ws) == []


async def test_optional_keys_are_omitted_never_null(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(subscribe())
        state = await recv_raw(ws)
        await ws.send(propose("inc", 1, correlation_id="ok"))
        live = await recv_raw(ws)
        accepted = await recv_raw(ws)
        await ws.send(propose("missing", 1, correlation_id="bad"))
        rejected = await recv_raw(ws)
        await ws.send(subscribe(since="0"))
        await recv_raw(ws)
        error = await recv_raw(ws)
        await apply_transactions(manager, 1)
        await recv_raw(ws)
        await ws.send(subscribe(since="1"))
        await recv_raw(ws)
        replayed = await recv_raw(ws)
        manager.remove_share_data_by_id("doc")
        removed = await recv_raw(ws)
    keys = {name: set(json.loads(text)) for name, text in [
        ("state", state), ("live", live), ("accepted", accepted), ("rejected", rejected),
        ("error", error), ("replayed", replayed), ("removed", removed),
    ]}
    envelope = {"v", "type"}
    assert keys["state"] == envelope | {"shareDataId", "currentState", "lastTransactionId"}
    assert keys["live"] == envelope | {"shareDataId", "transactionId", "accepted", "currentState"}
    assert keys["accepted"] == envelope | {"correlationId", "accepted", "transactionId"}
    assert keys["rejected"] == envelope | {"correlationId", "accepted", "error"}
    assert keys["error"] == envelope | {"code", "message"}
    assert keys["replayed"] == envelope | {"shareDataId", "transactionId", "accepted", "replayed"}
    assert keys["removed"] == envelope | {"shareDataId", "event"}
    # The only null the protocol has is a state's lastTransactionId.
    assert '"lastTransactionId":null' in state
    for text in (live, accepted, rejected, error, replayed, removed):
        assert "null" not in text, text


async def test_state_beyond_orjson_reaches_subscribers(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    huge = 2**80 + 7
    async with connect(server) as first, connect(server) as second:
        await subscribed(first)
        await subscribed(second)
        share_data = manager.get_share_data_by_id("doc")
        assert share_data is not None
        await manager.apply_transaction("doc", {"n": huge}, share_data.functions[0])
        await apply_transactions(manager, 1)
        for ws in (first, second):
            big = await recv_raw(ws)
            assert f'"currentState":{{"n":{huge}}}' in big
            assert json.loads(await recv_raw(ws))["transactionId"] == "2"
        manager.update_share_data(make_doc(state=[huge]))
        assert json.loads(await recv_raw(first))["currentState"] == [huge]
        await first.send(subscribe())
        assert json.loads(await recv_raw(first))["currentState"] == [huge]


async def test_state_nested_deeper_than_orjson_encodes_reaches_subscribers(server_factory: ServerFactory) -> None:
    server = await server_factory()
    deep = "[" * 300 + "]" * 300
    async with connect(server) as sub, connect(server) as proposer:
        await subscribed(sub)
        await proposer.send(propose(data=json.loads(deep)))
        assert (await recv_json(proposer))["accepted"] is True
        assert json.loads(await recv_raw(sub))["currentState"] == json.loads(deep)


# -- propose -----------------------------------------------------------------------------


def rejection(correlation_id: str, error: str) -> str:
    return json.dumps(
        {"v": 1, "type": "proposal-result", "correlationId": correlation_id, "accepted": False, "error": error},
        separators=(",", ":"),
    )


async def test_propose_accepted_and_rejected(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(propose("inc", {"count": 5}, correlation_id="c-1"))
        assert await recv_raw(ws) == '{"v":1,"type":"proposal-result","correlationId":"c-1","accepted":true,"transactionId":"1"}'
        await ws.send(propose("never", {"count": 6}, correlation_id="c-2"))
        assert await recv_raw(ws) == '{"v":1,"type":"proposal-result","correlationId":"c-2","accepted":false,"transactionId":"2"}'
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    assert share_data.current_state == {"count": 5}
    assert [r.accepted for r in share_data.transaction_history] == [True, False]


async def test_propose_unknown_share_data(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(propose(share_data_id="ghost", correlation_id="x"))
        assert await recv_raw(ws) == rejection("x", "shareDataId ghost not found")


async def test_propose_authorizer_false_or_raising(server_factory: ServerFactory) -> None:
    def authorize(context: Any, share_data_id: str, function_id: str) -> bool:
        assert context == {"subject": "alice"}
        if function_id == "never":
            raise RuntimeError("policy engine down")
        return function_id != "inc"

    server = await server_factory(authorize_propose=authorize)
    async with connect(server) as ws:
        await ws.send(propose("inc", correlation_id="a"))
        assert await recv_raw(ws) == rejection("a", "unauthorized-propose: not allowed to invoke inc on doc")
        await ws.send(propose("never", correlation_id="b"))
        assert await recv_raw(ws) == rejection("b", "unauthorized-propose: policy engine down")
        # The connection stays open.
        assert await barrier(ws) == []


async def test_propose_disabled_without_resolver(server_factory: ServerFactory) -> None:
    server = await server_factory(resolve_function=None)
    async with connect(server) as ws:
        await ws.send(propose(correlation_id="d"))
        assert await recv_raw(ws) == rejection(
            "d", "propose is not enabled on this server (no resolveFunction configured)"
        )


async def test_propose_resolver_raising_or_returning_nothing(server_factory: ServerFactory) -> None:
    async def resolve(share_data_id: str, function_id: str) -> Any:
        if function_id == "boom":
            raise KeyError("catalogue unavailable")
        return None

    server = await server_factory(resolve_function=resolve)
    async with connect(server) as ws:
        await ws.send(propose("boom", correlation_id="r1"))
        result = await recv_json(ws)
        assert result["accepted"] is False and result["correlationId"] == "r1"
        assert result["error"].startswith("resolveFunction threw: ")
        assert result["error"] == "resolveFunction threw: catalogue unavailable"
        await ws.send(propose("nothing", correlation_id="r2"))
        assert await recv_raw(ws) == rejection("r2", "unknown functionId nothing for shareDataId doc")


async def test_propose_apply_transaction_raising(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    def rule(current: Any, proposed: Any) -> bool:
        raise ArithmeticError("cannot count that high")

    manager.add_share_data(ShareData("strict", functions=[ShareFunction("check", rule)]))
    server = await server_factory()
    async with connect(server) as ws:
        await ws.send(propose("check", 1, correlation_id="t", share_data_id="strict"))
        # The rule's own message, as the reference server sends it.
        assert await recv_raw(ws) == rejection("t", "cannot count that high")
        assert await barrier(ws) == []
    share_data = manager.get_share_data_by_id("strict")
    assert share_data is not None and share_data.transaction_history == []


async def test_proposer_subscribed_gets_the_broadcast_and_the_result(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with connect(server) as ws:
        await subscribed(ws)
        await ws.send(propose("inc", {"count": 3}, correlation_id="me"))
        frames = [await recv_json(ws) for _ in range(2)]
    assert sorted(f["type"] for f in frames) == ["proposal-result", "transaction"]
    transaction = next(f for f in frames if f["type"] == "transaction")
    assert transaction["currentState"] == {"count": 3} and "replayed" not in transaction


async def test_id_based_resolver(manager: ShareDataManager, server_factory: ServerFactory) -> None:
    hidden = ShareFunction(None, lambda current, proposed: True, name="internal")
    manager.add_share_data(
        ShareData("pad", functions=[ShareFunction("write", lambda c, p: isinstance(p, str)), hidden])
    )
    resolve = create_id_based_function_resolver(manager)
    assert resolve("pad", "write") is not None and resolve("pad", "write").id == "write"  # type: ignore[union-attr]
    assert resolve("pad", "internal") is None
    assert resolve("nowhere", "write") is None
    server = await server_factory(resolve_function=resolve)
    async with connect(server) as ws:
        await ws.send(propose("write", "hello", correlation_id="w1", share_data_id="pad"))
        assert (await recv_json(ws))["accepted"] is True
        await ws.send(propose("write", 12, correlation_id="w2", share_data_id="pad"))
        assert (await recv_json(ws))["accepted"] is False
        await ws.send(propose("internal", "x", correlation_id="w3", share_data_id="pad"))
        assert await recv_raw(ws) == rejection("w3", "unknown functionId internal for shareDataId pad")


# -- ordering ----------------------------------------------------------------------------


async def test_one_connection_in_order_behind_a_slow_hook_others_not_delayed(server_factory: ServerFactory) -> None:
    entered = asyncio.Event()
    gate = asyncio.Event()

    async def authorize(context: Any, share_data_id: str) -> bool:
        if context == {"subject": "slow"}:
            entered.set()
            await asyncio.wait_for(gate.wait(), DEADLINE)
        return True

    def authenticate(request: Any) -> Any:
        return {"subject": request.query.get("who", "fast")}

    server = await server_factory(authenticate=authenticate, authorize_subscribe=authorize)
    async with connect(server.url + "?who=slow") as slow, connect(server) as fast:
        await slow.send(subscribe())
        await slow.send(wire(type="ping", correlationId="p1"))
        await slow.send(wire(type="unsubscribe", shareDataId="doc"))
        await slow.send(wire(type="ping", correlationId="p2"))
        await asyncio.wait_for(entered.wait(), DEADLINE)
        # The slow connection's hook is pending: the other one is served meanwhile.
        assert (await subscribed(fast))["shareDataId"] == "doc"
        await fast.send(wire(type="ping", correlationId="f"))
        assert await recv_json(fast) == {"v": 1, "type": "pong", "correlationId": "f"}
        gate.set()
        assert [(m["type"], m.get("correlationId")) for m in [await recv_json(slow) for _ in range(3)]] == [
            ("state", None),
            ("pong", "p1"),
            ("pong", "p2"),
        ]
        # The unsubscribe ran after the subscribe: no live frames now.
        await fast.send(propose())
        assert sorted(m["type"] for m in await barrier(fast)) == ["proposal-result", "transaction"]
        assert await barrier(slow) == []


# -- upgrade and authentication ------------------------------------------------------------


@pytest.mark.parametrize("verdict", [None, False, {}, "raise"])
async def test_rejected_upgrade_is_http_401(server_factory: ServerFactory, verdict: Any) -> None:
    def authenticate(request: Any) -> Any:
        if verdict == "raise":
            raise PermissionError("bad credentials")
        return verdict

    opened: list[Any] = []
    server = await server_factory(authenticate=authenticate)
    server.on("connection:opened", opened.append)
    with pytest.raises(InvalidStatus) as info:
        async with connect(server):
            pass
    assert info.value.response.status_code == 401
    assert opened == [] and server.connections == []


@pytest.mark.xfail(
    strict=True,
    reason="picows (2.3.1) hands the listener factory only the parsed request; the peer address "
    "is known to its protocol's connection_made, which its public API does not expose",
)
async def test_authenticate_sees_the_peer_address(server_factory: ServerFactory) -> None:
    requests: list[Any] = []

    def authenticate(request: Any) -> Any:
        requests.append(request)
        return {"subject": "alice"}

    server = await server_factory(authenticate=authenticate)
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="here"))
        assert (await recv_json(ws))["type"] == "pong"
        client_port = ws.local_address[1]
    (request,) = requests
    assert request.remote_address is not None
    assert request.remote_address[0] == "127.0.0.1"
    assert request.remote_address[1] == client_port


async def test_picows_logs_to_one_logger_for_all_connections(server_factory: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    # picows would make a child Logger per connection from a Logger; the server
    # hands it a shared adapter instead, and its records still arrive.
    caplog.set_level(logging.INFO, logger="picows.safe_fast.server.picows")
    server = await server_factory()
    async with connect(server) as first, connect(server) as second:
        for ws in (first, second):
            await ws.send(wire(type="ping", correlationId="log"))
            assert (await recv_json(ws))["type"] == "pong"
    accepted = [r for r in caplog.records if r.getMessage().startswith("New connection accepted")]
    assert len(accepted) == 2
    assert {r.name for r in accepted} == {"picows.safe_fast.server.picows"}


@pytest.mark.parametrize("path", ["/", "/other", "/realtimex", "/realtime/extra", "/Realtime"])
async def test_wrong_path_is_404(server_factory: ServerFactory, path: str) -> None:
    server = await server_factory()
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{server.port}{path}"):
            pass
    assert info.value.response.status_code == 404


async def test_an_unparsable_target_is_404_and_the_server_goes_on(server_factory: ServerFactory) -> None:
    server = await server_factory()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), DEADLINE)
    try:
        writer.write(
            b"GET //[x/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 404 "), head
    async with connect(server.url) as ws:
        await ws.send(wire(type="ping", correlationId="after"))
        assert await recv_json(ws) == {"v": 1, "type": "pong", "correlationId": "after"}


async def test_custom_path_and_query_string(server_factory: ServerFactory) -> None:
    requests: list[Any] = []

    def authenticate(request: Any) -> Any:
        requests.append(request)
        return {"token": request.query.get("token")}

    server = await server_factory(authenticate=authenticate, path="/rt/v1")
    assert server.url == f"ws://127.0.0.1:{server.port}/rt/v1"
    async with connect(server.url + "?token=a%20b&x=1", additional_headers={"X-Probe": "yes"}) as ws:
        await ws.send(wire(type="ping", correlationId="q"))
        assert (await recv_json(ws))["type"] == "pong"
    (request,) = requests
    assert request.path == "/rt/v1?token=a%20b&x=1"
    assert request.query == {"token": "a b", "x": "1"}
    # A repeated key: the first value wins, as URLSearchParams.get has it.
    async with connect(server.url + "?token=first&token=second") as ws:
        await ws.send(wire(type="ping", correlationId="r"))
        assert (await recv_json(ws))["type"] == "pong"
    assert requests[-1].query == {"token": "first"}
    assert request.headers["x-probe"] == "yes"
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{server.port}/realtime"):
            pass
    assert info.value.response.status_code == 404


async def test_coroutine_authenticate_accepted_processes_queued_frames(server_factory: ServerFactory) -> None:
    gate = asyncio.Event()
    contexts: list[Any] = []

    async def authenticate(request: Any) -> Any:
        await asyncio.wait_for(gate.wait(), DEADLINE)
        return {"subject": "carol"}

    def authorize(context: Any, share_data_id: str) -> bool:
        contexts.append(context)
        return True

    opened: list[Any] = []
    server = await server_factory(authenticate=authenticate, authorize_subscribe=authorize)
    server.on("connection:opened", opened.append)
    async with connect(server) as ws:
        await ws.send(subscribe())
        await ws.send(wire(type="ping", correlationId="early"))
        (connection,) = server.connections
        await until(lambda: len(connection._inbox or ()) == 2, "both frames held by the server")
        assert connection.is_authenticating and opened == [] and contexts == []
        gate.set()
        assert [(m["type"], m.get("correlationId")) for m in [await recv_json(ws) for _ in range(2)]] == [
            ("state", None),
            ("pong", "early"),
        ]
    assert contexts == [{"subject": "carol"}]
    assert [e.context for e in opened] == [{"subject": "carol"}]


@pytest.mark.parametrize("verdict", [None, "raise"])
async def test_coroutine_authenticate_rejected_closes_4002_first(server_factory: ServerFactory, manager: ShareDataManager, verdict: Any) -> None:
    gate = asyncio.Event()

    async def authenticate(request: Any) -> Any:
        await asyncio.wait_for(gate.wait(), DEADLINE)
        if verdict == "raise":
            raise PermissionError("expired")
        return verdict

    events: list[Any] = []
    server = await server_factory(authenticate=authenticate)
    server.on("connection:opened", events.append)
    server.on("connection:closed", events.append)
    async with connect(server) as ws:
        await ws.send(propose())
        await ws.send(wire(type="ping", correlationId="nope"))
        (connection,) = server.connections
        await until(lambda: len(connection._inbox or ()) == 2, "both frames held by the server")
        gate.set()
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (CLOSE_UNAUTHORIZED, "unauthorized")
    assert received == []
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []
    await until(lambda: not server.connections, "the connection forgotten")
    assert events == []


async def test_connection_opened_and_closed_events(server_factory: ServerFactory) -> None:
    opened: list[Any] = []
    closed: list[Any] = []

    def authenticate(request: Any) -> Any:
        return {"user": request.query["user"]}

    server = await server_factory(authenticate=authenticate)
    server.on("connection:opened", opened.append)
    server.on("connection:closed", closed.append)
    async with connect(server.url + "?user=dan") as ws:
        assert await barrier(ws) == []
        assert [(e.connection_id, e.context) for e in opened] == [(server.connections[0].id, {"user": "dan"})]
        await ws.close(code=4321, reason="see you")
    await until(lambda: closed, "connection:closed")
    (event,) = closed
    assert (event.connection_id, event.code, event.reason, event.context) == (opened[0].connection_id, 4321, "see you", {"user": "dan"})
    assert server.connections == []
    # A 4003 closed by the server carries the server's code.
    async with connect(server.url + "?user=eve") as ws:
        await ws.send(subscribe("missing"))
        await closed_with(ws)
    await until(lambda: len(closed) == 2, "the second connection:closed")
    assert (closed[1].code, closed[1].context) == (4003, {"user": "eve"})


async def test_close_frame_without_status_is_answered_1000_and_reported_1005(
    server_factory: ServerFactory, raw_clients: RawClientFactory
) -> None:
    closed: list[Any] = []
    server = await server_factory()
    server.on("connection:closed", closed.append)
    raw = await raw_clients(server.port)
    raw.send(OP_CLOSE)
    assert await raw.close_frame() == (1000, b"")
    await raw.eof()
    await until(lambda: closed, "connection:closed")
    assert (closed[0].code, closed[0].reason) == (1005, "")


async def test_close_without_reason_reports_an_empty_string(server_factory: ServerFactory) -> None:
    closed: list[Any] = []
    server = await server_factory()
    server.on("connection:closed", closed.append)
    async with connect(server) as ws:
        assert await barrier(ws) == []
        await ws.close(code=1000)
    await until(lambda: closed, "connection:closed")
    assert (closed[0].code, closed[0].reason) == (1000, "")


@pytest.mark.parametrize("bit", [0x40, 0x20, 0x10])
async def test_reserved_bits_close_1002(server_factory: ServerFactory, raw_clients: RawClientFactory, bit: int) -> None:
    server = await server_factory()
    raw = await raw_clients(server.port)
    frame = bytearray(client_frame(OP_TEXT, wire(type="ping", correlationId="rsv").encode()))
    frame[0] |= bit
    raw.send_raw(bytes(frame))
    assert await raw.close_frame() == (1002, b"reserved bits set")


async def test_ping_between_fragments_is_answered_and_the_message_kept(
    server_factory: ServerFactory, raw_clients: RawClientFactory
) -> None:
    server = await server_factory()
    raw = await raw_clients(server.port)
    ping = wire(type="ping", correlationId="split").encode()
    raw.send(OP_TEXT, ping[:10], fin=False)
    raw.send(OP_PING, b"hb")
    raw.send(OP_CONT, ping[10:])
    assert await raw.recv() == (True, OP_PONG, b"hb")
    fin, opcode, payload = await raw.recv()  # type: ignore[misc]
    assert (fin, opcode, json.loads(payload)) == (True, OP_TEXT, {"v": 1, "type": "pong", "correlationId": "split"})


async def test_heartbeat_keeps_answering_peers_and_drops_silent_ones(
    server_factory: ServerFactory, raw_clients: RawClientFactory
) -> None:
    server = await server_factory(heartbeat_interval=0.2)
    # Both answer pings by hand (or not at all), never on their own.
    answering = await raw_clients(server.port, auto_pong=False)
    silent = await raw_clients(server.port, auto_pong=False)
    for _ in range(3):
        frame = await answering.recv()
        assert frame is not None and frame[1] == OP_PING
        answering.send(OP_PONG, frame[2])
    frame = await silent.recv()
    assert frame is not None and frame[1] == OP_PING
    # Not answered: the next beat drops the TCP connection, without a close handshake.
    assert await silent.recv() is None
    answering.send(OP_TEXT, wire(type="ping", correlationId="alive").encode())
    for _ in range(10):
        frame = await answering.recv()
        assert frame is not None
        if frame[1] == OP_PING:
            answering.send(OP_PONG, frame[2])
            continue
        assert json.loads(frame[2]) == {"v": 1, "type": "pong", "correlationId": "alive"}
        break
    else:
        raise AssertionError("no pong")


# -- server lifecycle --------------------------------------------------------------------


async def test_close_sends_1001_to_every_client_and_is_idempotent(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    server = await server_factory()
    async with connect(server) as a, connect(server) as b:
        await subscribed(a)
        assert await barrier(b) == []
        await asyncio.wait_for(asyncio.gather(server.close(), server.close()), DEADLINE)
        for ws in (a, b):
            code, reason, received = await closed_with(ws)
            assert (code, reason, received) == (1001, "server shutting down", [])
    await asyncio.wait_for(server.close(), DEADLINE)
    assert server.connections == []
    # Detached from the manager (nothing recorded for replay) and no longer listening.
    await apply_transactions(manager, 1)
    assert server.replay_store.entries_since("doc", "1") is None
    with pytest.raises(OSError):
        async with connect(server):
            pass


async def test_async_with_closes_the_server(manager: ShareDataManager) -> None:
    server = await attach_realtime_server(manager=manager, authenticate=allow_everybody)
    async with server:
        async with connect(server) as ws:
            async with server:
                assert await barrier(ws) == []
            code, _reason, _received = await closed_with(ws)
    assert code == 1001
    with pytest.raises(OSError):
        async with connect(server):
            pass


async def test_pre_bound_socket(server_factory: ServerFactory) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = await server_factory(sock=sock)
    assert (server.host, server.port) == ("127.0.0.1", port)
    assert server.url == f"ws://127.0.0.1:{port}/realtime"
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="s"))
        assert await recv_json(ws) == {"v": 1, "type": "pong", "correlationId": "s"}


async def test_invalid_options_are_refused(manager: ShareDataManager) -> None:
    with pytest.raises(TypeError):
        await attach_realtime_server(manager=manager, authenticate=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await attach_realtime_server(manager=manager, authenticate=allow_everybody, path="realtime")
    with pytest.raises(ValueError):
        await attach_realtime_server(manager=manager, authenticate=allow_everybody, max_message_size=0)
    with pytest.raises(ValueError):
        await attach_realtime_server(manager=manager, authenticate=allow_everybody, heartbeat_interval=0)


async def test_replay_buffer_size_and_custom_store(server_factory: ServerFactory, manager: ShareDataManager) -> None:
    store = InMemoryReplayStore(1)
    server = await server_factory(replay_store=store)
    assert server.replay_store is store
    await apply_transactions(manager, 3)
    assert [e.transaction_id for e in store.entries("doc")] == ["3"]


# -- replay store failures ---------------------------------------------------------------


class FailingReplayStore(InMemoryReplayStore):
    """A durable store whose writes fail, at once or inside the coroutine it returns."""

    def __init__(self, fail_async: bool) -> None:
        super().__init__()
        self.fail_async = fail_async

    def record(self, share_data_id: str, entry: Any) -> Any:
        if not self.fail_async:
            raise OSError("disk full")

        async def write() -> None:
            raise OSError("disk full")

        return write()


@pytest.mark.parametrize("fail_async", [False, True], ids=["sync", "async"])
async def test_a_failing_replay_write_is_reported_and_the_broadcast_goes_on(
    server_factory: ServerFactory, fail_async: bool
) -> None:
    server = await server_factory(replay_store=FailingReplayStore(fail_async))
    failed: list[Any] = []
    server.on("replay:write-failed", failed.append)
    async with connect(server) as subscriber, connect(server) as proposer:
        await subscribed(subscriber)
        await proposer.send(propose(data={"count": 1}))
        assert await recv_json(proposer) == {
            "v": 1,
            "type": "proposal-result",
            "correlationId": "c-1",
            "accepted": True,
            "transactionId": "1",
        }
        frame = await recv_json(subscriber)
        assert (frame["type"], frame["transactionId"], frame["currentState"]) == ("transaction", "1", {"count": 1})
        await wait_until(lambda: failed, "replay:write-failed")
    (event,) = failed
    assert (event.share_data_id, event.operation, type(event.error), str(event.error)) == (
        "doc",
        "record",
        OSError,
        "disk full",
    )


# -- order of checks, limits and defaults ----------------------------------------------------


async def test_a_refused_subscribe_with_a_cursor_sends_no_replay(server_factory: ServerFactory) -> None:
    server = await server_factory(authorize_subscribe=lambda context, share_data_id: False)
    async with connect(server) as ws:
        await ws.send(subscribe(since="1"))
        assert [m["code"] for m in await barrier(ws)] == ["unauthorized-subscribe"]


async def test_propose_checks_the_id_then_the_authorizer(server_factory: ServerFactory) -> None:
    server = await server_factory(
        authorize_propose=lambda context, share_data_id, function_id: False, resolve_function=None
    )
    async with connect(server) as ws:
        await ws.send(propose(share_data_id="ghost", correlation_id="a"))
        await ws.send(propose(correlation_id="b"))
        assert await barrier(ws) == [
            {"v": 1, "type": "proposal-result", "correlationId": "a", "accepted": False,
             "error": "shareDataId ghost not found"},
            {"v": 1, "type": "proposal-result", "correlationId": "b", "accepted": False,
             "error": "unauthorized-propose: not allowed to invoke inc on doc"},
        ]


async def test_max_message_size_is_inclusive(server_factory: ServerFactory) -> None:
    server = await server_factory(max_message_size=4096)
    padding = 4096 - len(wire(type="ping", correlationId="").encode())
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="x" * padding))
        assert (await recv_json(ws))["correlationId"] == "x" * padding
        await ws.send(wire(type="ping", correlationId="x" * (padding + 1)))
        code, _, _ = await closed_with(ws)
    assert code == 1009


def test_documented_defaults() -> None:
    parameters = inspect.signature(attach_realtime_server).parameters
    assert parameters["heartbeat_interval"].default == 30.0
    assert parameters["max_buffered_bytes"].default == 1024 * 1024
    assert parameters["max_message_size"].default == 8 * 1024 * 1024
    assert parameters["replay_buffer_size"].default == 100
