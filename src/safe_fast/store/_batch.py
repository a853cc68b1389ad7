"""Group commit: the commits submitted while one batch is in flight go together.

A database pays a round trip and a flush to disk per transaction, whatever
it holds. Committing the transactions of many ids in one database
transaction turns N flushes into one, and costs a lone commit nothing (it
goes at once). Every caller still gets its own outcome, and only after the
batch that holds it committed: group commit never acknowledges early.

At most one record per id goes in a batch (a second one of the same id
waits for the next), so the records of one batch never depend on each other.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable, Generic, Optional, TypeVar

__all__ = ["GroupCommitter"]

Item = TypeVar("Item")

MAX_BATCH = 256
"""Records committed in one database transaction at most."""


class GroupCommitter(Generic[Item]):
    """Calls ``run_batch(items)`` (returning one result or exception per item) one batch at a time."""

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[list[Any]]], name: str) -> None:
        self._run_batch = run_batch
        self._name = name
        self._pending: deque[tuple[str, Item, asyncio.Future[Any]]] = deque()
        self._runner: Optional[asyncio.Task[None]] = None
        self.batches = 0
        """Batches sent so far (each one database transaction)."""

    async def submit(self, key: str, item: Item) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._pending.append((key, item, done))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name=self._name)
        return await done

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            # Let what is in flight finish: its callers wait for the outcome.
            await asyncio.wait([runner])

    async def _run(self) -> None:
        pending = self._pending
        while pending:
            batch: list[tuple[str, Item, asyncio.Future[Any]]] = []
            later: list[tuple[str, Item, asyncio.Future[Any]]] = []
            keys: set[str] = set()
            while pending and len(batch) < MAX_BATCH:
                entry = pending.popleft()
                if entry[2].done():
                    continue  # its caller went away before it was sent
                if entry[0] in keys:
                    later.append(entry)
                else:
                    keys.add(entry[0])
                    batch.append(entry)
            pending.extendleft(reversed(later))
            if not batch:
                continue
            self.batches += 1
            try:
                results = await self._run_batch([item for _, item, _ in batch])
            except asyncio.CancelledError:
                for _, _, done in batch:
                    done.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to every caller
                results = [exc] * len(batch)
            for (_, _, done), result in zip(batch, results):
                if done.done():
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)
