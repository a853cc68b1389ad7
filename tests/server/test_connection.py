"""The sans-I/O connection protocol (``safe_fast.server.connection``), no sockets.

A real :class:`ShareDataManager`, :class:`InMemoryChannelRegistry`,
:class:`InMemoryReplayStore` and ``core.Flusher`` on the test's event loop;
each :class:`ServerConnection` writes to a recording transport and a
recording control object that share one log, so the tests see every frame
(decoded from the raw bytes written), every close and every ping, in order.

Each decision of PROTOCOL.md is checked here at this level; the socket-level
twin is ``test_protocol.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any, AsyncIterator, Callable, Optional, Union

import pytest

from safe_fast import (
    InMemoryChannelRegistry,
    InMemoryReplayStore,
    ReplayEntry,
    ShareDataManager,
    ShareFunction,
    create_id_based_function_resolver,
)
from safe_fast._backend import core
from safe_fast.server.connection import MAX_PENDING_MESSAGES, ServerConnection, ServerHub

from server_helpers import (
    DEADLINE,
    apply_transactions,
    decode_frames,
    frame_json,
    make_doc,
    propose,
    subscribe,
    wire,
)

pytestmark = pytest.mark.timeout(30)

_ids = itertools.count(1)


# -- the recording seams ------------------------------------------------------------------


class Recorder:
    """The write transport *and* the control seam of one connection, in one log.

    Log entries: ``("frame", fin, opcode, payload)`` for every frame written
    (decoded from the raw bytes), ``("write",)`` marking each
    ``transport.write`` call, ``("close", code, reason)``,
    ``("disconnect", graceful)`` and ``("ping",)``.
    """

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.buffered = 0
        self.hold = False
        """When true the peer reads nothing: every write stays in the transport's buffer."""
        self.closing = False
        self.disconnected = asyncio.Event()
        self.transport = _Transport(self)
        self.control = _Control(self)

    def messages(self) -> list[dict[str, Any]]:
        return [frame_json(entry[1:]) for entry in self.log if entry[0] == "frame"]

    def closes(self) -> list[tuple[int, bytes]]:
        return [(entry[1], entry[2]) for entry in self.log if entry[0] == "close"]

    def count(self, kind: str) -> int:
        return sum(1 for entry in self.log if entry[0] == kind)


class _Transport:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def write(self, data: bytes) -> None:
        self.recorder.log.append(("write",))
        if self.recorder.hold:
            self.recorder.buffered += len(data)
        for fin, opcode, payload in decode_frames(data):
            self.recorder.log.append(("frame", fin, opcode, payload))

    def get_write_buffer_size(self) -> int:
        return self.recorder.buffered

    def is_closing(self) -> bool:
        return self.recorder.closing


class _Control:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def send_close(self, code: int, reason: bytes) -> None:
        self.recorder.log.append(("close", code, reason))

    def disconnect(self, graceful: bool = True) -> None:
        self.recorder.log.append(("disconnect", graceful))
        self.recorder.disconnected.set()

    def send_ping(self) -> None:
        self.recorder.log.append(("ping",))

    def send_pong(self, payload: bytes) -> None:
        self.recorder.log.append(("pong", payload))

    def pause_reading(self) -> None:
        self.recorder.log.append(("pause_reading",))

    def resume_reading(self) -> None:
        self.recorder.log.append(("resume_reading",))


class Peer:
    """One ServerConnection plus its recorder, with bounded waits."""

    def __init__(self, hub: ServerHub, **kwargs: Any) -> None:
        self.rec = Recorder()
        self.conn = ServerConnection(hub, self.rec.control, self.rec.transport, **kwargs)
        self.conn.opened()
        self.seen = 0

    def send(self, message: Union[dict[str, Any], str, bytes], *, binary: bool = False) -> None:
        if isinstance(message, dict):
            message = json.dumps({"v": 1, **message})
        payload = message.encode() if isinstance(message, str) else message
        self.conn.receive_message(payload, binary)

    async def until(self, predicate: Callable[[], bool], what: str, iterations: int = 2000) -> None:
        async def poll() -> None:
            for _ in range(iterations):
                if predicate():
                    return
                await asyncio.sleep(0)
            raise AssertionError(f"never happened: {what}")

        await asyncio.wait_for(poll(), DEADLINE)

    async def next(self, count: int = 1) -> list[dict[str, Any]]:
        """The next ``count`` messages not returned yet."""
        await self.until(lambda: len(self.rec.messages()) >= self.seen + count, f"{count} more message(s)")
        new = self.rec.messages()[self.seen : self.seen + count]
        self.seen += count
        return new

    async def barrier(self) -> list[dict[str, Any]]:
        """Ping; return every message not returned yet that came before the pong."""
        correlation_id = f"barrier-{next(_ids)}"
        pong = {"v": 1, "type": "pong", "correlationId": correlation_id}
        self.send({"type": "ping", "correlationId": correlation_id})
        await self.until(lambda: pong in self.rec.messages(), "the barrier pong")
        messages = self.rec.messages()
        index = messages.index(pong)
        before = messages[self.seen : index]
        self.seen = index + 1
        return before

    async def closed(self) -> tuple[int, bytes]:
        await self.until(lambda: bool(self.rec.closes()), "a close frame")
        (close,) = self.rec.closes()
        return close


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def make_hub(manager: ShareDataManager) -> AsyncIterator[Callable[..., ServerHub]]:
    hubs: list[ServerHub] = []

    def make(**kwargs: Any) -> ServerHub:
        kwargs.setdefault("registry", InMemoryChannelRegistry())
        kwargs.setdefault("replay_store", InMemoryReplayStore(100))
        kwargs.setdefault("resolve_function", create_id_based_function_resolver(manager))
        hub = ServerHub(manager=manager, flusher=core.Flusher(asyncio.get_running_loop()), **kwargs)
        hub.attach()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.detach()
        for connection in list(hub.connections.values()):
            connection.disconnected(1006, "")


@pytest.fixture
async def hub(make_hub: Callable[..., ServerHub]) -> ServerHub:
    return make_hub()


# -- ping and invalid messages ------------------------------------------------------------


async def test_ping_answers_pong_with_the_same_correlation_id(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send({"type": "ping", "correlationId": "c-42"})
    assert await peer.next() == [{"v": 1, "type": "pong", "correlationId": "c-42"}]
    assert peer.rec.closes() == []


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"not json", "message: not valid JSON"),
        (b"[1, 2]", "message: must be a JSON object"),
        (b'{"type": "ping", "correlationId": "x"}', "v: required"),
        (b'{"v": true, "type": "ping", "correlationId": "x"}', "v: must be 1"),
        (b'{"v": "1", "type": "ping", "correlationId": "x"}', "v: must be 1"),
        (b'{"v": 2, "type": "ping", "correlationId": "x"}', "v: must be 1"),
        (b'{"v": 1}', "type: required"),
        (b'{"v": 1, "type": "pong", "correlationId": "x"}', "type: must be one of subscribe, unsubscribe, propose, ping"),
        (b'{"v": 1, "type": "subscribe", "shareDataId": ""}', "shareDataId: must be a non-empty string"),
        (b'{"v": 1, "type": "subscribe", "shareDataId": 7}', "shareDataId: must be a non-empty string"),
        (b'{"v": 1, "type": "subscribe", "shareDataId": "doc", "since": 1}', "since: must be a string"),
        (b'{"v": 1, "type": "unsubscribe"}', "shareDataId: required"),
        (b'{"v": 1, "type": "ping", "correlationId": ""}', "correlationId: must be a non-empty string"),
        (
            b'{"v": 1, "type": "propose"}',
            "shareDataId: required; functionId: required; correlationId: required",
        ),
        (
            b'{"v": 1, "type": "propose", "shareDataId": "doc", "functionId": "inc", "correlationId": "c", "proof": 3}',
            "proof: must be an object",
        ),
        (b'{"v": 2, "type": "nope"}', "v: must be 1; type: must be one of subscribe, unsubscribe, propose, ping"),
        (b'{"v": 1, "type": "ping", "correlationId": "x", "n": NaN}', "message: not valid JSON"),
        (b'{"v": 1, "type": "ping", "correlationId": "x", "n": 1e400}', "message: not valid JSON"),
        (b'{"v": 1, "type": "ping", "correlationId": "x", "n": ' + b"[" * 2000 + b"]" * 2000 + b"}", "message: not valid JSON"),
    ],
)
async def test_invalid_message_sends_error_then_closes_4004(hub: ServerHub, payload: bytes, text: str) -> None:
    peer = Peer(hub)
    peer.send(payload)
    assert await peer.closed() == (4004, b"invalid message")
    assert peer.rec.messages() == [{"v": 1, "type": "error", "code": "invalid-message", "message": text}]
    # The error frame was written before the close frame.
    kinds = [entry[0] for entry in peer.rec.log]
    assert kinds.index("frame") < kinds.index("close")
    assert peer.conn.is_closing


async def test_frames_after_a_close_are_ignored(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(b"garbage")
    await peer.closed()
    peer.send({"type": "ping", "correlationId": "late"})
    peer.send(subscribe())
    for _ in range(10):
        await asyncio.sleep(0)
    assert [m["type"] for m in peer.rec.messages()] == ["error"]
    assert hub.registry.subscribers("doc") == []


async def test_v_as_float_one_and_unknown_keys_are_accepted(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(b'{"v": 1.0, "type": "ping", "correlationId": "f", "extra": {"x": [1]}}')
    assert await peer.next() == [{"v": 1, "type": "pong", "correlationId": "f"}]
    peer.send(b'{"v": 1, "type": "subscribe", "shareDataId": "doc", "whatever": null}')
    assert [m["type"] for m in await peer.next()] == ["state"]


async def test_binary_frame_with_json_is_processed_like_text(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(wire(type="ping", correlationId="bin"), binary=True)
    assert await peer.next() == [{"v": 1, "type": "pong", "correlationId": "bin"}]


async def test_binary_frame_not_utf8_is_invalid_message_4004(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(b'{"v": 1, "type": "ping", "correlationId": "\xff\xfe"}', binary=True)
    assert await peer.closed() == (4004, b"invalid message")
    assert peer.rec.messages() == [
        {"v": 1, "type": "error", "code": "invalid-message", "message": "message: not valid UTF-8"}
    ]


async def test_text_frame_not_utf8_closes_1007_without_an_error_frame(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(b'{"v": 1, "type": "ping", "correlationId": "\xff\xfe"}')
    code, _reason = await peer.closed()
    assert code == 1007
    assert peer.rec.messages() == []


# -- subscribe ----------------------------------------------------------------------------


async def test_subscribe_sends_state_with_null_last_transaction_id(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    assert await peer.next() == [
        {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"count": 0}, "lastTransactionId": None}
    ]
    assert hub.registry.subscribers("doc") == [peer.conn]
    assert peer.conn.subscriptions == {"doc"}


async def test_subscribe_twice_sends_state_twice_but_registers_once(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    peer.send(subscribe())
    assert [m["type"] for m in await peer.next(2)] == ["state", "state"]
    await apply_transactions(manager, 1)
    assert [m["transactionId"] for m in await peer.barrier()] == ["1"]
    assert hub.registry.subscribers("doc") == [peer.conn]


async def test_subscribe_unknown_share_data_sends_error_then_closes_4003(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(subscribe("missing"))
    peer.send({"type": "ping", "correlationId": "after"})
    assert await peer.closed() == (4003, b"unknown shareDataId")
    assert peer.rec.messages() == [
        {"v": 1, "type": "error", "code": "unknown-share-data", "message": "shareDataId missing not found"}
    ]
    kinds = [entry[0] for entry in peer.rec.log]
    assert kinds.index("frame") < kinds.index("close")


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_subscribe_authorizer_false_or_raising_is_not_fatal(make_hub: Callable[..., ServerHub], asynchronous: bool) -> None:
    seen: list[tuple[Any, str]] = []

    def decide(context: Any, share_data_id: str) -> bool:
        seen.append((context, share_data_id))
        if context == "boom":
            raise PermissionError("no entry for you")
        return context == "friend"

    async def decide_async(context: Any, share_data_id: str) -> bool:
        await asyncio.sleep(0)
        return decide(context, share_data_id)

    hub = make_hub(authorize_subscribe=decide_async if asynchronous else decide)
    stranger, boom, friend = Peer(hub, context="stranger"), Peer(hub, context="boom"), Peer(hub, context="friend")
    for peer in (stranger, boom, friend):
        peer.send(subscribe())
    assert await stranger.barrier() == [
        {"v": 1, "type": "error", "code": "unauthorized-subscribe", "message": "not authorized to subscribe to doc"}
    ]
    assert await boom.barrier() == [
        {"v": 1, "type": "error", "code": "unauthorized-subscribe", "message": "authorizer threw: no entry for you"}
    ]
    assert [m["type"] for m in await friend.barrier()] == ["state"]
    assert sorted(seen) == [("boom", "doc"), ("friend", "doc"), ("stranger", "doc")]
    # Still open, and only the authorized one is subscribed.
    assert stranger.rec.closes() == [] and boom.rec.closes() == []
    assert hub.registry.subscribers("doc") == [friend.conn]


async def test_state_last_transaction_id_comes_from_the_full_history(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    store = InMemoryReplayStore(2)
    hub = make_hub(replay_store=store)
    await apply_transactions(manager, 5)
    assert [e.transaction_id for e in store.entries("doc")] == ["4", "5"]
    peer = Peer(hub)
    peer.send(subscribe())
    (state,) = await peer.next()
    assert state["lastTransactionId"] == "5"
    assert state["currentState"] == {"count": 5}


async def test_replay_after_cursor(hub: ServerHub, manager: ShareDataManager) -> None:
    await apply_transactions(manager, 2)
    await apply_transactions(manager, 1, "never")
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    messages = await peer.barrier()
    assert messages == [
        {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"count": 2}, "lastTransactionId": "3"},
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "2", "accepted": True, "replayed": True},
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "3", "accepted": False, "replayed": True},
    ]


async def test_state_and_replay_leave_in_one_write(hub: ServerHub, manager: ShareDataManager) -> None:
    await apply_transactions(manager, 3)
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    assert len(await peer.next(3)) == 3
    assert peer.rec.count("write") == 1


@pytest.mark.parametrize("since", ["", None])
async def test_no_cursor_means_state_only(hub: ServerHub, manager: ShareDataManager, since: Optional[str]) -> None:
    await apply_transactions(manager, 2)
    peer = Peer(hub)
    peer.send(subscribe(since=since))
    assert [m["type"] for m in await peer.barrier()] == ["state"]


@pytest.mark.parametrize("since", ["01", "0", "9", "x", " 1"])
async def test_cursor_not_in_window(hub: ServerHub, manager: ShareDataManager, since: str) -> None:
    await apply_transactions(manager, 2)
    peer = Peer(hub)
    peer.send(subscribe(since=since))
    messages = await peer.barrier()
    assert [m["type"] for m in messages] == ["state", "error"]
    assert messages[1] == {
        "v": 1,
        "type": "error",
        "code": "replay-cursor-not-found",
        "message": f"since={since} not present in retained replay window; skipping replay",
    }
    assert peer.rec.closes() == []


async def test_cursor_with_empty_window_is_not_found(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    assert [(m["type"], m.get("code")) for m in await peer.barrier()] == [
        ("state", None),
        ("error", "replay-cursor-not-found"),
    ]


async def test_evicted_cursor_is_not_found(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    hub = make_hub(replay_store=InMemoryReplayStore(3))
    await apply_transactions(manager, 5)
    peer = Peer(hub)
    peer.send(subscribe(since="2"))
    assert [(m["type"], m.get("code")) for m in await peer.barrier()] == [
        ("state", None),
        ("error", "replay-cursor-not-found"),
    ]
    peer.send(subscribe(since="3"))
    assert [(m["type"], m.get("transactionId")) for m in await peer.barrier()] == [
        ("state", None),
        ("transaction", "4"),
        ("transaction", "5"),
    ]


async def test_newest_cursor_sends_nothing_after_state(hub: ServerHub, manager: ShareDataManager) -> None:
    await apply_transactions(manager, 3)
    peer = Peer(hub)
    peer.send(subscribe(since="3"))
    assert [m["type"] for m in await peer.barrier()] == ["state"]


async def test_replay_store_failure_reads_as_cursor_not_found(make_hub: Callable[..., ServerHub]) -> None:
    class Broken(InMemoryReplayStore):
        def entries_since(self, share_data_id: str, since: str) -> Any:
            raise ConnectionError("store down")

    hub = make_hub(replay_store=Broken())
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    assert [(m["type"], m.get("code")) for m in await peer.barrier()] == [
        ("state", None),
        ("error", "replay-cursor-not-found"),
    ]


async def test_async_replay_store_is_awaited(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    class AsyncStore:
        def __init__(self) -> None:
            self.inner = InMemoryReplayStore(10)

        async def record(self, share_data_id: str, entry: ReplayEntry) -> None:
            self.inner.record(share_data_id, entry)

        async def entries_since(self, share_data_id: str, since: str) -> Any:
            await asyncio.sleep(0)
            return self.inner.entries_since(share_data_id, since)

        async def forget(self, share_data_id: str) -> None:
            self.inner.forget(share_data_id)

    hub = make_hub(replay_store=AsyncStore())
    await apply_transactions(manager, 3)
    for _ in range(5):
        await asyncio.sleep(0)  # let the record() tasks run
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    assert [(m["type"], m.get("transactionId")) for m in await peer.barrier()] == [
        ("state", None),
        ("transaction", "2"),
        ("transaction", "3"),
    ]


class GatedStore:
    """An asynchronous replay store whose reads and writes wait for the test."""

    def __init__(self) -> None:
        self.inner = InMemoryReplayStore(100)
        self.reads_open = asyncio.Event()
        self.writes_open = asyncio.Event()
        self.reading = asyncio.Event()
        self.reads_open.set()
        self.writes_open.set()

    async def record(self, share_data_id: str, entry: ReplayEntry) -> None:
        await asyncio.wait_for(self.writes_open.wait(), DEADLINE)
        self.inner.record(share_data_id, entry)

    async def entries_since(self, share_data_id: str, since: str) -> Any:
        self.reading.set()
        await asyncio.wait_for(self.reads_open.wait(), DEADLINE)
        return self.inner.entries_since(share_data_id, since)

    async def forget(self, share_data_id: str) -> None:
        self.inner.forget(share_data_id)


async def test_a_transaction_during_a_slow_replay_read_comes_once_after_the_state(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager
) -> None:
    store = GatedStore()
    hub = make_hub(replay_store=store, replay_timeout=DEADLINE)  # the test opens the gate, not the bound
    await apply_transactions(manager, 3)
    await hub.writes_landed("doc")
    store.reads_open.clear()
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    await asyncio.wait_for(store.reading.wait(), DEADLINE)
    await apply_transactions(manager, 1)  # transaction 4, while the window is being read
    store.reads_open.set()
    # State, then the replay through the snapshot (4 included, from the
    # ShareData's history), and no live 4 before it or after it.
    messages = await peer.barrier()
    assert [(m["type"], m.get("transactionId"), m.get("replayed")) for m in messages] == [
        ("state", None, None),
        ("transaction", "2", True),
        ("transaction", "3", True),
        ("transaction", "4", True),
    ]
    assert messages[0]["lastTransactionId"] == "4"
    await apply_transactions(manager, 1)
    assert [(m["type"], m.get("transactionId"), m.get("replayed")) for m in await peer.barrier()] == [
        ("transaction", "5", None),
    ]


async def test_a_replay_waits_for_the_store_writes_under_way(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager
) -> None:
    store = GatedStore()
    hub = make_hub(replay_store=store, replay_timeout=DEADLINE)  # the test opens the gate, not the bound
    store.writes_open.clear()
    await apply_transactions(manager, 3)  # three record() calls, all held
    peer = Peer(hub)
    peer.send(subscribe(since="1"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not store.reading.is_set()  # the window is not read while writes are pending
    store.writes_open.set()
    assert [(m["type"], m.get("transactionId")) for m in await peer.barrier()] == [
        ("state", None),
        ("transaction", "2"),
        ("transaction", "3"),
    ]


# -- live frames --------------------------------------------------------------------------


async def test_live_transactions_accepted_and_rejected_reach_subscribers(hub: ServerHub, manager: ShareDataManager) -> None:
    first, second, bystander = Peer(hub), Peer(hub), Peer(hub)
    first.send(subscribe())
    second.send(subscribe())
    await first.next()
    await second.next()
    await apply_transactions(manager, 1)
    await apply_transactions(manager, 1, "never")
    expected = [
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True, "currentState": {"count": 1}},
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "2", "accepted": False, "currentState": {"count": 1}},
    ]
    assert await first.barrier() == expected
    assert await second.barrier() == expected
    assert await bystander.barrier() == []
    # One encoded frame for everybody: the bytes are identical.
    payloads = [[e[3] for e in p.rec.log if e[0] == "frame"][1:3] for p in (first, second)]
    assert payloads[0] == payloads[1]


async def test_unsubscribe_stops_frames(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    peer.send({"type": "unsubscribe", "shareDataId": "doc"})
    peer.send({"type": "unsubscribe", "shareDataId": "never-subscribed"})
    assert await peer.barrier() == []
    await apply_transactions(manager, 2)
    assert await peer.barrier() == []
    assert hub.registry.subscribers("doc") == []
    assert peer.rec.closes() == []


async def test_lifecycle_updated_carries_current_state(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    manager.update_share_data(make_doc(state={"count": 99}))
    assert await peer.barrier() == [
        {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "updated", "currentState": {"count": 99}}
    ]


async def test_lifecycle_removed_is_terminal(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    await apply_transactions(manager, 2)
    assert hub.replay_store.entries_since("doc", "1") == [ReplayEntry("2", True)]
    manager.remove_share_data_by_id("doc")
    assert await peer.barrier() == [
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True, "currentState": {"count": 1}},
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "2", "accepted": True, "currentState": {"count": 2}},
        {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"},
    ]
    assert peer.conn.subscriptions == set()
    assert hub.registry.subscribers("doc") == []
    assert hub.replay_store.entries_since("doc", "1") is None
    # A re-created "doc" starts clean and the old subscriber hears nothing of it.
    manager.add_share_data(make_doc())
    await apply_transactions(manager, 1)
    assert await peer.barrier() == []
    assert hub.replay_store.entries_since("doc", "1") == []


async def test_a_removal_made_by_an_earlier_transaction_listener_comes_after_the_transaction(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager
) -> None:
    def archive_when_done(event: Any) -> None:
        if event.current_state == {"count": 1}:
            manager.remove_share_data_by_id("doc")

    manager.on("share-data:transaction", archive_when_done)  # before the server's listener
    hub = make_hub()
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    await apply_transactions(manager, 1)
    assert await peer.barrier() == [
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True, "currentState": {"count": 1}},
        {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"},
    ]
    # The window was forgotten after the transaction was recorded, not before.
    assert hub.replay_store.entries_since("doc", "1") is None


async def test_a_replacement_with_its_own_history_forgets_the_old_window(
    hub: ServerHub, manager: ShareDataManager
) -> None:
    await apply_transactions(manager, 3)
    # The same object again (its history goes on): the window stays.
    manager.update_share_data(manager.get_share_data_by_id("doc"))
    assert hub.replay_store.entries_since("doc", "1") == [ReplayEntry("2", True), ReplayEntry("3", True)]
    # A fresh ShareData: its ids start again at "1", the old window must go.
    manager.update_share_data(make_doc())
    assert hub.replay_store.entries_since("doc", "1") is None
    await apply_transactions(manager, 2)
    peer = Peer(hub)
    peer.send(subscribe(since="3"))  # a cursor into the old history
    assert [(m["type"], m.get("lastTransactionId"), m.get("code")) for m in await peer.barrier()] == [
        ("state", "2", None),
        ("error", None, "replay-cursor-not-found"),
    ]


class MinimalRegistry:
    """A ChannelRegistry with only the four protocol methods (no ``remove_channel``)."""

    def __init__(self) -> None:
        self.inner = InMemoryChannelRegistry()

    def subscribe(self, share_data_id: str, connection: Any) -> None:
        self.inner.subscribe(share_data_id, connection)

    def unsubscribe(self, share_data_id: str, connection: Any) -> None:
        self.inner.unsubscribe(share_data_id, connection)

    def broadcast(self, share_data_id: str, message: Any) -> None:
        self.inner.broadcast(share_data_id, message)

    def remove_connection(self, connection: Any) -> None:
        self.inner.remove_connection(connection)


async def test_lifecycle_removed_is_terminal_with_a_registry_without_remove_channel(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    registry = MinimalRegistry()
    hub = make_hub(registry=registry)
    peer, other = Peer(hub), Peer(hub)
    peer.send(subscribe())
    other.send(subscribe())
    await peer.next()
    await other.next()
    manager.remove_share_data_by_id("doc")
    assert [m["event"] for m in await peer.barrier()] == ["removed"]
    assert registry.inner.subscribers("doc") == []
    manager.add_share_data(make_doc())
    await apply_transactions(manager, 1)
    assert await peer.barrier() == []
    other.conn.disconnected(1000, "")
    assert registry.inner.channel_count() == 0


async def test_state_beyond_orjson_is_still_broadcast(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    huge = 2**70
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    await manager.apply_transaction("doc", {"n": huge}, share_data.functions[0])
    (frame,) = await peer.barrier()
    assert frame["currentState"] == {"n": huge}
    peer.send(subscribe())
    (state,) = await peer.barrier()
    assert state["currentState"] == {"n": huge}


async def test_unencodable_state_never_breaks_the_broadcast_path(hub: ServerHub, manager: ShareDataManager) -> None:
    manager.add_share_data(make_doc("other"))
    peer = Peer(hub)
    peer.send(subscribe())
    peer.send(subscribe("other"))
    await peer.next(2)
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    # A set is not JSON at all: the manager records it and the hub sends its rendering.
    await manager.apply_transaction("doc", {"s": {1, 2}}, share_data.functions[0])
    other = manager.get_share_data_by_id("other")
    assert other is not None
    await manager.apply_transaction("other", 1, other.functions[0])
    assert [(m["shareDataId"], m["transactionId"], m["currentState"]) for m in await peer.barrier()] == [
        ("doc", "1", {"s": [1, 2]}),
        ("other", "1", 1),
    ]
    # State JSON has no form for, put there by the application: its rendering goes out.
    share_data.current_state = {"when": Opaque(), "tags": {"b", "a"}}
    peer.send(subscribe())
    (state,) = await peer.barrier()
    assert state["type"] == "state" and state["currentState"] == {"when": "opaque!", "tags": ["a", "b"]}
    # A cycle has no rendering at all: null, and the connection stays.
    cycle: list[Any] = []
    cycle.append(cycle)
    share_data.current_state = cycle
    peer.send(subscribe())
    (state,) = await peer.barrier()
    assert state["type"] == "state" and state["currentState"] is None
    assert peer.rec.closes() == []


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


# -- propose ------------------------------------------------------------------------------


async def test_propose_accepted_and_rejected(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    peer.send(propose("inc", {"count": 7}, correlation_id="c-1"))
    peer.send(propose("never", {"count": 8}, correlation_id="c-2"))
    assert await peer.barrier() == [
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "1", "accepted": True, "currentState": {"count": 7}},
        {"v": 1, "type": "proposal-result", "correlationId": "c-1", "accepted": True, "transactionId": "1"},
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "2", "accepted": False, "currentState": {"count": 7}},
        {"v": 1, "type": "proposal-result", "correlationId": "c-2", "accepted": False, "transactionId": "2"},
    ]
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.current_state == {"count": 7}


async def test_propose_passes_proof_and_absent_proposed_data(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(wire(type="propose", shareDataId="doc", functionId="inc", correlationId="p", proof={"sig": "abc"}))
    assert await peer.barrier() == [
        {"v": 1, "type": "proposal-result", "correlationId": "p", "accepted": True, "transactionId": "1"}
    ]
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    (record,) = share_data.transaction_history
    assert record.proof == {"sig": "abc"}
    assert record.proposed_data is None


def _rejection(correlation_id: str, error: str) -> dict[str, Any]:
    return {"v": 1, "type": "proposal-result", "correlationId": correlation_id, "accepted": False, "error": error}


async def test_propose_unknown_share_data(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.send(propose(share_data_id="ghost"))
    assert await peer.barrier() == [_rejection("c-1", "shareDataId ghost not found")]


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_propose_authorizer(make_hub: Callable[..., ServerHub], manager: ShareDataManager, asynchronous: bool) -> None:
    calls: list[tuple[Any, str, str]] = []

    def decide(context: Any, share_data_id: str, function_id: str) -> bool:
        calls.append((context, share_data_id, function_id))
        if function_id == "never":
            raise RuntimeError("rules say no")
        return context == "writer"

    async def decide_async(context: Any, share_data_id: str, function_id: str) -> bool:
        await asyncio.sleep(0)
        return decide(context, share_data_id, function_id)

    resolved: list[str] = []

    def resolve(share_data_id: str, function_id: str) -> Any:
        resolved.append(function_id)
        return create_id_based_function_resolver(manager)(share_data_id, function_id)

    hub = make_hub(authorize_propose=decide_async if asynchronous else decide, resolve_function=resolve)
    reader, writer = Peer(hub, context="reader"), Peer(hub, context="writer")
    reader.send(propose("inc", correlation_id="r1"))
    writer.send(propose("never", correlation_id="w1"))
    writer.send(propose("inc", correlation_id="w2"))
    assert await reader.barrier() == [_rejection("r1", "unauthorized-propose: not allowed to invoke inc on doc")]
    assert await writer.barrier() == [
        _rejection("w1", "unauthorized-propose: rules say no"),
        {"v": 1, "type": "proposal-result", "correlationId": "w2", "accepted": True, "transactionId": "1"},
    ]
    assert ("reader", "doc", "inc") in calls
    # A denied proposal never reaches the resolver.
    assert resolved == ["inc"]


async def test_propose_without_resolver_is_disabled(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    hub = make_hub(resolve_function=None)
    peer = Peer(hub)
    peer.send(propose())
    assert await peer.barrier() == [
        _rejection("c-1", "propose is not enabled on this server (no resolveFunction configured)")
    ]
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []


async def test_propose_resolver_raising_or_returning_nothing(make_hub: Callable[..., ServerHub]) -> None:
    def resolve(share_data_id: str, function_id: str) -> Any:
        if function_id == "explode":
            raise LookupError("index offline")
        return None

    hub = make_hub(resolve_function=resolve)
    peer = Peer(hub)
    peer.send(propose("explode", correlation_id="a"))
    peer.send(propose("missing", correlation_id="b"))
    assert await peer.barrier() == [
        _rejection("a", "resolveFunction threw: index offline"),
        _rejection("b", "unknown functionId missing for shareDataId doc"),
    ]


async def test_propose_with_async_resolver(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    sync_resolve = create_id_based_function_resolver(manager)

    async def resolve(share_data_id: str, function_id: str) -> Any:
        await asyncio.sleep(0)
        return sync_resolve(share_data_id, function_id)

    hub = make_hub(resolve_function=resolve)
    peer = Peer(hub)
    peer.send(propose("inc"))
    assert await peer.barrier() == [
        {"v": 1, "type": "proposal-result", "correlationId": "c-1", "accepted": True, "transactionId": "1"}
    ]


async def test_propose_apply_transaction_raising(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    def bad_rule(current: Any, proposed: Any) -> bool:
        raise ValueError("bad input")

    faulty = ShareFunction("faulty", bad_rule)
    hub = make_hub(resolve_function=lambda share_data_id, function_id: faulty)
    peer = Peer(hub)
    peer.send(propose("faulty"))
    # The wire carries the rule's own message (RuleError wraps it for Python callers).
    assert await peer.barrier() == [_rejection("c-1", "bad input")]
    # An exception without words gives an empty text, as the reference's err.message does.
    def quiet_rule(current: Any, proposed: Any) -> bool:
        raise LookupError()

    hub.resolve_function = lambda share_data_id, function_id: ShareFunction("quiet", quiet_rule)
    peer.send(propose("quiet", correlation_id="c-1b"))
    assert await peer.barrier() == [_rejection("c-1b", "")]
    # A resolver returning something that is not a ShareFunction: apply_transaction's TypeError text.
    hub.resolve_function = lambda share_data_id, function_id: "not a function"
    peer.send(propose("x", correlation_id="c-2"))
    assert await peer.barrier() == [_rejection("c-2", "function must be a ShareFunction, got str")]
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []


async def test_propose_on_a_removed_share_data_reports_the_key_error_words(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    gate = asyncio.Event()

    async def slow_rule(current: Any, proposed: Any) -> bool:
        await gate.wait()
        return True

    slow = ShareFunction("slow", slow_rule)
    hub = make_hub(resolve_function=lambda share_data_id, function_id: slow)
    peer = Peer(hub)
    peer.send(propose("slow"))
    for _ in range(5):
        await asyncio.sleep(0)
    manager.remove_share_data_by_id("doc")
    gate.set()
    # KeyError's text without its quotes.
    assert await peer.barrier() == [_rejection("c-1", "shareDataId doc not found")]


# -- ordering -----------------------------------------------------------------------------


class HeldAuthorizer:
    """An async ``authorize_subscribe`` that admits everybody, but only once released.

    Until :meth:`release`, a subscribe waits inside the hook, so what the
    connection receives meanwhile has to queue behind it.
    """

    def __init__(self) -> None:
        self.entered = asyncio.Event()  # set once a call is waiting in the hook
        self._released = asyncio.Event()

    async def authorize(self, context: Any, share_data_id: str) -> bool:
        self.entered.set()
        await asyncio.wait_for(self._released.wait(), DEADLINE)
        return True

    def release(self) -> None:
        self._released.set()


async def test_messages_of_one_connection_keep_arrival_order_behind_an_async_hook(make_hub: Callable[..., ServerHub]) -> None:
    held = HeldAuthorizer()
    hub = make_hub(authorize_subscribe=held.authorize)
    slow, other = Peer(hub), Peer(hub)
    slow.send(subscribe())
    slow.send({"type": "ping", "correlationId": "after-subscribe"})
    slow.send({"type": "unsubscribe", "shareDataId": "doc"})
    slow.send({"type": "ping", "correlationId": "after-unsubscribe"})
    await asyncio.wait_for(held.entered.wait(), DEADLINE)
    # The other connection is not held up by the slow hook.
    other.send({"type": "ping", "correlationId": "other"})
    assert await other.next() == [{"v": 1, "type": "pong", "correlationId": "other"}]
    assert slow.rec.messages() == []
    held.release()
    assert [(m["type"], m.get("correlationId")) for m in await slow.next(3)] == [
        ("state", None),
        ("pong", "after-subscribe"),
        ("pong", "after-unsubscribe"),
    ]
    # The unsubscribe was applied after the subscribe, not before it.
    assert hub.registry.subscribers("doc") == []
    assert slow.conn.subscriptions == set()


async def test_invalid_message_behind_a_slow_hook_still_waits_its_turn(make_hub: Callable[..., ServerHub]) -> None:
    held = HeldAuthorizer()
    peer = Peer(make_hub(authorize_subscribe=held.authorize))
    peer.send(subscribe())
    peer.send(b"garbage")
    for _ in range(10):
        await asyncio.sleep(0)
    assert peer.rec.log == []
    held.release()
    assert await peer.closed() == (4004, b"invalid message")
    assert [m["type"] for m in peer.rec.messages()] == ["state", "error"]


async def test_a_full_queue_stops_reading_the_socket_until_half_is_handled(make_hub: Callable[..., ServerHub]) -> None:
    held = HeldAuthorizer()
    peer = Peer(make_hub(authorize_subscribe=held.authorize))
    peer.send(subscribe())
    await asyncio.wait_for(held.entered.wait(), DEADLINE)  # the worker now waits inside the hook
    for i in range(MAX_PENDING_MESSAGES - 1):
        peer.send({"type": "ping", "correlationId": f"p{i}"})
    assert peer.rec.count("pause_reading") == 0
    peer.send({"type": "ping", "correlationId": f"p{MAX_PENDING_MESSAGES - 1}"})
    assert peer.rec.log == [("pause_reading",)]
    # What the socket read already delivered still arrives, and is still answered.
    for i in range(MAX_PENDING_MESSAGES, MAX_PENDING_MESSAGES + 10):
        peer.send({"type": "ping", "correlationId": f"p{i}"})
    held.release()
    total = MAX_PENDING_MESSAGES + 10
    await peer.until(lambda: peer.rec.count("frame") >= 1 + total, "every answer", iterations=20 * total)
    messages = peer.rec.messages()
    assert messages[0]["type"] == "state"
    assert [m["correlationId"] for m in messages[1:]] == [f"p{i}" for i in range(total)]
    assert peer.rec.count("resume_reading") == 1 and peer.rec.closes() == []


async def test_a_close_resumes_reading_so_the_peer_close_frame_is_read(make_hub: Callable[..., ServerHub]) -> None:
    held = HeldAuthorizer()
    peer = Peer(make_hub(authorize_subscribe=held.authorize))
    peer.send(subscribe())
    await asyncio.wait_for(held.entered.wait(), DEADLINE)
    for i in range(MAX_PENDING_MESSAGES):
        peer.send({"type": "ping", "correlationId": f"p{i}"})
    peer.conn.close(1001, "going away")
    assert [entry[0] for entry in peer.rec.log] == ["pause_reading", "resume_reading", "close"]
    held.release()


@pytest.mark.parametrize("slow_hook", [False, True])
async def test_a_pipelined_burst_is_answered_in_order_whatever_its_length(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager, slow_hook: bool
) -> None:
    # A client reconnecting with thousands of subscriptions sends them in one
    # write: they arrive together, before any hook ran, and none waits behind one.
    count = 3 * MAX_PENDING_MESSAGES
    for i in range(count):
        manager.add_share_data(make_doc(f"d{i}", {"n": i}))

    async def authorize(context: Any, share_data_id: str) -> bool:
        await asyncio.sleep(0)
        return True

    peer = Peer(make_hub(authorize_subscribe=authorize if slow_hook else None))
    for i in range(count):
        peer.send(subscribe(f"d{i}"))
    await peer.until(lambda: peer.rec.count("frame") >= count, f"{count} answers", iterations=20 * count)
    answers = peer.rec.messages()
    assert [(m["type"], m["shareDataId"]) for m in answers] == [("state", f"d{i}") for i in range(count)]
    assert peer.rec.closes() == []


async def test_an_idle_connection_holds_no_queue_before_or_after_a_busy_spell(make_hub: Callable[..., ServerHub]) -> None:
    held = HeldAuthorizer()
    peer = Peer(make_hub(authorize_subscribe=held.authorize))
    # Memory per idle connection: the message queue and timer list are made on demand.
    assert peer.conn._inbox is None and peer.conn._timers is None
    peer.send(subscribe())
    peer.send({"type": "ping", "correlationId": "behind-the-hook"})
    assert peer.conn._inbox is not None
    held.release()
    assert [(m["type"], m.get("correlationId")) for m in await peer.next(2)] == [
        ("state", None),
        ("pong", "behind-the-hook"),
    ]
    await peer.until(lambda: peer.conn._worker is None, "the worker finished")
    assert peer.conn._inbox is None
    # Idle again, the inline path still answers, and a new busy spell queues anew.
    peer.send({"type": "ping", "correlationId": "inline"})
    assert (await peer.next())[0] == {"v": 1, "type": "pong", "correlationId": "inline"}
    assert peer.conn._inbox is None


# -- async authenticate -------------------------------------------------------------------


async def test_authenticating_connection_queues_until_authenticated(make_hub: Callable[..., ServerHub]) -> None:
    contexts: list[Any] = []

    def authorize(context: Any, share_data_id: str) -> bool:
        contexts.append(context)
        return True

    hub = make_hub(authorize_subscribe=authorize)
    opened: list[Any] = []
    hub.events.on("connection:opened", opened.append)
    peer = Peer(hub, authenticating=True)
    assert peer.conn.is_authenticating
    peer.send({"type": "ping", "correlationId": "early"})
    peer.send(subscribe())
    peer.send({"type": "ping", "correlationId": "later"})
    for _ in range(10):
        await asyncio.sleep(0)
    assert peer.rec.log == [] and opened == [] and contexts == []
    peer.conn.authenticated({"subject": "bob"})
    assert [(event.connection_id, event.context) for event in opened] == [(peer.conn.id, {"subject": "bob"})]
    assert [(m["type"], m.get("correlationId")) for m in await peer.next(3)] == [
        ("pong", "early"),
        ("state", None),
        ("pong", "later"),
    ]
    assert contexts == [{"subject": "bob"}]


async def test_messages_waiting_for_an_async_authenticate_stop_reading_too(make_hub: Callable[..., ServerHub]) -> None:
    peer = Peer(make_hub(), authenticating=True)
    for i in range(MAX_PENDING_MESSAGES):
        peer.send({"type": "ping", "correlationId": f"p{i}"})
    assert peer.rec.log == [("pause_reading",)]
    peer.conn.authenticated({"subject": "late"})
    await peer.until(lambda: peer.rec.count("frame") >= MAX_PENDING_MESSAGES, "every pong", iterations=50_000)
    assert peer.rec.count("resume_reading") == 1 and peer.rec.closes() == []


async def test_a_ping_while_authenticating_is_answered_only_once_open(make_hub: Callable[..., ServerHub]) -> None:
    rejected = Peer(make_hub(), authenticating=True)
    rejected.conn.ping_received(b"hello")
    rejected.conn.close(4002, "unauthorized")
    assert rejected.rec.log == [("close", 4002, b"unauthorized")]  # nothing precedes the 4002
    accepted = Peer(make_hub(), authenticating=True)
    accepted.conn.ping_received(b"first")
    accepted.conn.ping_received(b"latest")
    assert accepted.rec.log == []
    accepted.conn.authenticated({"subject": "ok"})
    assert accepted.rec.log == [("pong", b"latest")]
    accepted.conn.close(1000)
    accepted.conn.ping_received(b"after the close")
    assert accepted.rec.log[-1][0] == "close"


async def test_authenticating_connection_rejected_closes_4002_and_processes_nothing(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    hub = make_hub()
    opened: list[Any] = []
    closed: list[Any] = []
    hub.events.on("connection:opened", opened.append)
    hub.events.on("connection:closed", closed.append)
    peer = Peer(hub, authenticating=True)
    peer.send(subscribe())
    peer.send(propose())
    peer.conn.close(4002, "unauthorized")
    peer.conn.authenticated({"late": True})  # ignored once closing
    for _ in range(10):
        await asyncio.sleep(0)
    assert peer.rec.log == [("close", 4002, b"unauthorized")]
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None and share_data.transaction_history == []
    assert hub.registry.subscribers("doc") == []
    peer.conn.disconnected(4002, "unauthorized")
    # It never opened, so it never closes either (as the reference: no events for a rejected upgrade).
    assert opened == [] and closed == []
    assert peer.conn.id not in hub.connections


# -- lifecycle of a connection ------------------------------------------------------------


async def test_opened_and_closed_events(hub: ServerHub) -> None:
    opened: list[Any] = []
    closed: list[Any] = []
    hub.events.on("connection:opened", opened.append)
    hub.events.on("connection:closed", closed.append)
    peer = Peer(hub, context={"who": "ann"}, connection_id="conn-1")
    assert [(e.connection_id, e.context) for e in opened] == [("conn-1", {"who": "ann"})]
    assert hub.connections == {"conn-1": peer.conn}
    peer.send(subscribe())
    await peer.next()
    peer.conn.disconnected(1000, "bye")
    peer.conn.disconnected(1000, "again")  # once only
    assert [(e.connection_id, e.code, e.reason, e.context) for e in closed] == [("conn-1", 1000, "bye", {"who": "ann"})]
    assert hub.connections == {}
    assert hub.registry.subscribers("doc") == []


async def test_close_flushes_queued_frames_then_sends_close_and_aborts_after_timeout(make_hub: Callable[..., ServerHub]) -> None:
    hub = make_hub(close_timeout=0.01)
    peer = Peer(hub)
    peer.send({"type": "ping", "correlationId": "queued"})
    peer.conn.close(1001, "server shutting down")
    assert [entry[0] for entry in peer.rec.log] == ["write", "frame", "close"]
    assert peer.rec.closes() == [(1001, b"server shutting down")]
    await asyncio.wait_for(peer.rec.disconnected.wait(), DEADLINE)
    assert peer.rec.log[-1] == ("disconnect", False)


# -- backpressure -------------------------------------------------------------------------


async def test_overflow_drops_the_frame_closes_4001_and_spares_the_others(make_hub: Callable[..., ServerHub], manager: ShareDataManager) -> None:
    hub = make_hub(max_buffered_bytes=1000)
    overflows: list[Any] = []
    hub.events.on("connection:overflow", overflows.append)
    slow, fast = Peer(hub, context="slow"), Peer(hub)
    for peer in (slow, fast):
        peer.send(subscribe())
        await peer.next()
    slow.rec.hold = True  # from now on the slow peer reads nothing
    for _ in range(50):
        await apply_transactions(manager, 1)
        await fast.barrier()  # flushes every outbox
        if slow.rec.closes():
            break
    assert await slow.closed() == (4001, b"send buffer exceeded")
    sent = len(manager.get_share_data_by_id("doc").transaction_history)  # type: ignore[union-attr]
    # What the slow peer got is a prefix; the frame that did not fit was dropped, not written.
    got = [m["transactionId"] for m in slow.rec.messages()[1:]]
    assert got == [str(i) for i in range(1, sent)]
    assert slow.rec.buffered <= 1000
    (event,) = overflows
    assert (event.connection_id, event.max_buffered_bytes, event.context) == (slow.conn.id, 1000, "slow")
    assert event.buffered_amount == slow.rec.buffered
    assert hub.registry.subscribers("doc") == [fast.conn]
    assert slow.conn.id in hub.connections  # until the transport reports the disconnect
    # The others keep receiving, in order.
    await apply_transactions(manager, 1)
    await fast.barrier()
    assert [m["transactionId"] for m in fast.rec.messages()[1:] if m["type"] == "transaction"] == [
        str(i) for i in range(1, sent + 2)
    ]
    assert len(overflows) == 1


async def test_a_burst_past_the_cap_reaches_a_peer_that_takes_it(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager
) -> None:
    hub = make_hub(max_buffered_bytes=400)
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    # Five frames in one iteration, together past the cap: what is queued goes
    # to the transport when the cap would be crossed, and this transport takes
    # everything at once (a reader that keeps reading), so nothing is behind.
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    for i in range(5):
        share_data.current_state = {"pad": "x" * 100, "i": i}
        manager.update_share_data(share_data)
    assert [m["currentState"]["i"] for m in await peer.next(5)] == [0, 1, 2, 3, 4]
    assert peer.rec.closes() == []
    # The writes: two early ones where the cap would have been crossed, then the rest at the end of the iteration.
    assert peer.rec.count("write") == 1 + 3


async def test_a_peer_that_takes_nothing_overflows_on_what_the_transport_holds(
    make_hub: Callable[..., ServerHub], manager: ShareDataManager
) -> None:
    hub = make_hub(max_buffered_bytes=400)
    overflows: list[Any] = []
    hub.events.on("connection:overflow", overflows.append)
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    peer.rec.hold = True  # from now on the peer reads nothing
    share_data = manager.get_share_data_by_id("doc")
    assert share_data is not None
    for i in range(3):
        share_data.current_state = {"pad": "x" * 100, "i": i}
        manager.update_share_data(share_data)
    assert await peer.closed() == (4001, b"send buffer exceeded")
    # The first two were handed to the transport (where they stay unsent);
    # the third would have taken its backlog past the cap.
    assert [m.get("currentState", {}).get("i") for m in peer.rec.messages()[1:]] == [0, 1]
    (overflow,) = overflows
    assert overflow.buffered_amount == peer.rec.buffered > 0


# -- heartbeat ----------------------------------------------------------------------------


async def test_an_aborted_connection_gets_nothing_more(hub: ServerHub, manager: ShareDataManager) -> None:
    peer = Peer(hub)
    peer.send(subscribe())
    await peer.next()
    peer.conn.abort()
    assert peer.conn.is_closing and not peer.conn.subscriptions
    peer.conn.close(1001, "server shutting down")  # e.g. server.close() before the disconnect lands
    await apply_transactions(manager, 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert [entry[0] for entry in peer.rec.log if entry[0] != "write"] == ["frame", "disconnect"]


async def test_heartbeat_pings_and_terminates_a_silent_peer(hub: ServerHub) -> None:
    answering, silent = Peer(hub), Peer(hub)
    for peer in (answering, silent):
        peer.conn.heartbeat()
    answering.conn.pong_received()
    for peer in (answering, silent):
        peer.conn.heartbeat()
    assert answering.rec.log == [("ping",), ("ping",)]
    assert silent.rec.log == [("ping",), ("disconnect", False)]
    silent.conn.disconnected(1006, "")
    silent.conn.heartbeat()
    assert silent.rec.log == [("ping",), ("disconnect", False)]
    assert list(hub.connections.values()) == [answering.conn]


async def test_heartbeat_skips_closing_connections(hub: ServerHub) -> None:
    peer = Peer(hub)
    peer.conn.close(1000, "")
    peer.conn.heartbeat()
    assert peer.rec.count("ping") == 0


def test_the_registry_forgets_a_closed_connection_through_its_own_subscriptions() -> None:
    registry = InMemoryChannelRegistry()

    class Counting(dict):  # a channel's subscribers, counting membership checks
        checks = 0

        def __contains__(self, item: object) -> bool:
            Counting.checks += 1
            return super().__contains__(item)

    others = [object() for _ in range(50)]
    for index, other in enumerate(others):
        registry.subscribe(f"c{index}", other)
    registry._channels = {key: Counting(value) for key, value in registry._channels.items()}

    class Subscriber:
        def __init__(self, channels: set[str]) -> None:
            self.subscriptions = channels

    leaving = Subscriber({"c3", "c7"})
    for share_data_id in leaving.subscriptions:
        registry.subscribe(share_data_id, leaving)
    registry.remove_connection(leaving)
    assert all(leaving not in registry.subscribers(f"c{i}") for i in range(50))
    assert Counting.checks == 0  # no scan of every channel
    # Something without a list of its own is still found (by a scan).
    plain = others[5]
    registry.remove_connection(plain)
    assert registry.subscribers("c5") == []
