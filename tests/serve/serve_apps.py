"""Applications for the ``safe-fast serve`` tests (imported by the subprocesses)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from safe_fast import ShareData, ShareDataManager, ShareFunction
from safe_fast.examples.counter import app as counter_app


async def slow_increment(current: Any, proposed: Any) -> bool:
    """Takes a while to decide: a proposal is in flight when the test signals the server."""
    await asyncio.sleep(1.2)
    return True


def slow(manager: ShareDataManager) -> Any:
    """The counter, plus ``slow`` whose function ``wait`` decides after 1.2 s."""
    hooks = counter_app(manager)
    manager.add_share_data(ShareData("slow", current_state={}, functions=[ShareFunction("wait", slow_increment)]))
    return hooks


def workers(manager: ShareDataManager) -> Any:
    """The counter, plus ``worker`` whose state names the process that serves it."""
    hooks = counter_app(manager)
    manager.add_share_data(ShareData("worker", current_state={"pid": os.getpid()}))
    return hooks


def erroring(manager: ShareDataManager) -> Any:
    """The counter, with an ``authorize_propose`` that raises for the function ``boom``;
    and ``big``, whose function ``set`` accepts any state (large broadcasts on demand)."""
    hooks = dict(counter_app(manager))
    manager.add_share_data(ShareData("big", current_state={}, functions=[ShareFunction("set", lambda old, new: True)]))

    def authorize_propose(context: Any, share_data_id: str, function_id: str) -> bool:
        if function_id == "boom":
            raise RuntimeError("boom")
        return True

    hooks["authorize_propose"] = authorize_propose
    return hooks


def no_hooks(manager: ShareDataManager) -> None:
    """Registers the counter and returns no hooks (nothing authenticates)."""
    counter_app(manager)


async def hangs_at_start(manager: ShareDataManager) -> Any:
    """Says it was called (the file named by ``SAFE_FAST_TEST_MARKER``), then never finishes starting."""
    with open(os.environ["SAFE_FAST_TEST_MARKER"], "w") as marker:
        marker.write(str(os.getpid()))
    await asyncio.sleep(3600)
    return counter_app(manager)


async def durable_no_hooks(manager: ShareDataManager) -> None:
    """Registers a ShareData through the manager's store and returns no hooks (nothing authenticates)."""
    await manager.register(ShareData("counter", current_state={"count": 0}))


def fails_its_third_start(manager: ShareDataManager) -> Any:
    """The workers app, except that the third start counted in ``SAFE_FAST_TEST_STARTS`` (with
    two workers: the first restart) fails as a bad setting would (exit status 2)."""
    path = os.environ["SAFE_FAST_TEST_STARTS"]
    with open(path, "a+") as starts:
        starts.seek(0)
        count = len(starts.read()) + 1
        starts.write("x")
    if count == 3:
        raise RuntimeError("a fault on the way up")
    return workers(manager)


def raises(manager: ShareDataManager) -> None:
    raise RuntimeError("the application failed to start")


async def async_app(manager: ShareDataManager) -> Any:
    return counter_app(manager)


not_callable = 42
