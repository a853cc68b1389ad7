"""The subscription handle's ``async for`` buffer, without sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from safe_fast.client import ClientClosed, Subscription, SubscriptionOverflow, SubscriptionRejected
from safe_fast.client._state import ClientProtocol
from safe_fast.messages import StateFrame, TransactionFrame

pytestmark = pytest.mark.timeout(30)


class Core:
    def __init__(self, queue_size: int = 1000) -> None:
        self.errors: list[BaseException] = []
        self.protocol = ClientProtocol(
            emit=lambda name, *args: self.errors.append(args[0]) if name == "error" else None,
            subscription_queue_size=queue_size,
        )
        self.protocol.connect()
        self.protocol.connection_opened(0.0)

    def feed(self, message: dict[str, Any]) -> None:
        self.protocol.receive(json.dumps(message).encode(), 0.0)

    def state(self, share_data_id: str) -> None:
        """The server's answer to a subscribe: live frames come after it."""
        self.feed({"v": 1, "type": "state", "shareDataId": share_data_id, "currentState": 0, "lastTransactionId": None})

    def live(self, share_data_id: str, tid: int) -> None:
        self.feed(
            {"v": 1, "type": "transaction", "shareDataId": share_data_id, "transactionId": str(tid), "accepted": True, "currentState": tid}
        )


async def collect(sub: Subscription, limit: int = 100) -> list[Any]:
    frames = []
    async for frame in sub:
        frames.append(frame)
        if len(frames) >= limit:
            break
    return frames


async def test_iterator_yields_listener_frames_in_order_and_ends_on_unsubscribe() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    heard: list[Any] = []
    sub.on("state", heard.append)
    sub.on("transaction", heard.append)
    task = asyncio.ensure_future(collect(sub))
    await asyncio.sleep(0)
    core.feed({"v": 1, "type": "state", "shareDataId": "doc", "currentState": 0, "lastTransactionId": None})
    for tid in range(1, 6):
        core.live("doc", tid)
    await asyncio.sleep(0)
    sub.unsubscribe()
    frames = await asyncio.wait_for(task, 5)
    assert frames == heard
    assert isinstance(frames[0], StateFrame)
    assert [f.transaction_id for f in frames[1:]] == ["1", "2", "3", "4", "5"]
    assert all(isinstance(f, TransactionFrame) for f in frames[1:])


async def test_buffered_frames_are_still_yielded_after_detach() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    core.state("doc")
    for tid in range(1, 4):
        core.live("doc", tid)
    sub.unsubscribe()
    assert [getattr(f, "transaction_id", f.type) for f in await collect(sub)] == ["state", "1", "2", "3"]


async def test_frames_before_iteration_starts_are_kept() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    core.feed({"v": 1, "type": "state", "shareDataId": "doc", "currentState": 0, "lastTransactionId": None})
    await asyncio.sleep(0.01)
    iterator = sub.__aiter__()
    first = await asyncio.wait_for(iterator.__anext__(), 5)
    assert first.type == "state"


async def test_removed_is_yielded_then_iteration_ends() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    task = asyncio.ensure_future(collect(sub))
    core.state("doc")
    core.live("doc", 1)
    core.feed({"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"})
    frames = await asyncio.wait_for(task, 5)
    assert [f.type for f in frames] == ["state", "transaction", "lifecycle"]
    assert frames[-1].event == "removed"


async def test_rejected_subscription_iterator_raises_the_rejection() -> None:
    core = Core()
    sub = core.protocol.subscribe("nope")
    task = asyncio.ensure_future(collect(sub))
    await asyncio.sleep(0)
    core.feed({"v": 1, "type": "error", "code": "unknown-share-data", "message": "shareDataId nope not found"})
    with pytest.raises(SubscriptionRejected) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.share_data_id == "nope"


async def test_close_ends_iteration_normally() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    task = asyncio.ensure_future(collect(sub))
    await asyncio.sleep(0)
    core.protocol.close()
    assert await asyncio.wait_for(task, 5) == []
    with pytest.raises(ClientClosed):
        core.protocol.subscribe("doc")


async def test_overflow_while_iterating_raises_once_then_continues() -> None:
    core = Core(queue_size=3)
    sub = core.protocol.subscribe("doc")
    heard: list[Any] = []
    sub.on("transaction", heard.append)
    iterator = sub.__aiter__()
    core.state("doc")
    assert (await iterator.__anext__()).type == "state"
    for tid in range(1, 4):
        core.live("doc", tid)  # fills the buffer
    assert sub._queued == 3 and core.errors == []
    core.live("doc", 4)  # one too many: the buffer is discarded
    core.live("doc", 5)
    assert sub._queued == 0
    assert len(core.errors) == 1 and isinstance(core.errors[0], SubscriptionOverflow)
    with pytest.raises(SubscriptionOverflow) as info:
        await iterator.__anext__()
    assert info.value.dropped == 5 and info.value.limit == 3
    # Listeners lost nothing.
    assert [f.transaction_id for f in heard] == ["1", "2", "3", "4", "5"]
    # Iterating again continues with new frames.
    core.live("doc", 6)
    frame = await asyncio.wait_for(iterator.__anext__(), 5)
    assert frame.transaction_id == "6"
    assert len(core.errors) == 1


async def test_overflow_of_a_listener_only_handle_is_silent_and_bounded() -> None:
    core = Core(queue_size=10)
    sub = core.protocol.subscribe("doc")
    core.state("doc")
    for tid in range(1, 101):
        core.live("doc", tid)
    assert core.errors == []  # nobody iterates: nothing to report
    assert sub._queued <= 10  # memory stays bounded
    # A late consumer learns about the gap first.
    with pytest.raises(SubscriptionOverflow):
        await sub.__aiter__().__anext__()


async def test_waiting_consumer_wakes_on_frames() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    iterator = sub.__aiter__()
    core.state("doc")
    assert (await iterator.__anext__()).type == "state"
    pending = asyncio.ensure_future(iterator.__anext__())
    await asyncio.sleep(0.01)
    assert not pending.done()
    core.live("doc", 1)
    frame = await asyncio.wait_for(pending, 5)
    assert frame.transaction_id == "1"


def test_unknown_event_name_is_refused() -> None:
    core = Core()
    sub = core.protocol.subscribe("doc")
    with pytest.raises(ValueError):
        sub.on("transactions", print)
