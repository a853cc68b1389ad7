"""A manager's cache of the ShareData a store holds, and the commit loop.

Theory of operation
-------------------

:class:`StoreReplica` keeps, for each registered id, the manager's
:class:`~safe_fast.ShareData` object (state and history as the store holds
them, up to some point) and the store's incarnation token for it.

* **Commit** (:meth:`StoreReplica.commit_transaction`, called under the
  manager's per-id lock): evaluate the rule against the cached state, build
  the next record, commit it conditionally. Won: the record joins the cache
  and the caller announces it. Lost: the store answered with what it lost
  to; the cache catches up (or learns of a replacement or removal) and the
  rule is evaluated again, at most ``MAX_EVALUATIONS`` times in all. After
  the first loss the retry commits under ``store.hold(id)``, which keeps
  other nodes from committing to that id meanwhile, so a node never starves
  behind a busy peer. The lock is taken once the rule has run again, not
  before: a slow rule does not hold other nodes (and their batches of other
  ids) off; only when the id moved in between does the rule run under it.
* **Refresh** (:meth:`StoreReplica.refresh`): read what the store holds
  beyond the cache and apply it. Concurrent refreshes of one id are
  coalesced, but never onto a read that started before the refresh was
  asked for (a caller is always answered by a read that began after it
  called). Records committed by other nodes join the cache silently (they
  were announced where they were committed); a replacement or a removal by
  another node is announced as ``share-data:updated`` /
  ``share-data:removed`` with ``remote=True``.
* **Records are adopted idempotently**: a refresh and the commit that wrote
  a record may both bring it; the second finds it in place. Every record
  taken from the store extends the cached chain and is verified against it.

Anything that cannot be decided (a store error while committing) marks the
id stale: it is refreshed before it is used again. A history that does not
verify is logged and the id leaves the cache: it is answered as not found
rather than trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from ..sharedata import MAX_EVALUATIONS, ShareData, ShareDataEvent, ShareFunction, TransactionRecord
from ._codec import StoredShareData, verify_tail
from .errors import CorruptShareData

if TYPE_CHECKING:
    from ..sharedata import ShareDataManager

__all__ = ["StoreReplica"]

logger = logging.getLogger("safe_fast.store")

Evaluate = Callable[[ShareFunction, Any, Any], Awaitable[bool]]


class _RefreshRound:
    """Coalescing bookkeeping of one id: tickets asked for and tickets answered."""

    __slots__ = ("lock", "asked", "answered")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.asked = 0
        self.answered = 0


class StoreReplica:
    """The store side of a :class:`~safe_fast.ShareDataManager` built with ``store=``."""

    def __init__(self, store: Any, manager: "ShareDataManager") -> None:
        self.store = store
        self._manager = manager
        self._incarnations: dict[str, str] = {}
        self._stale: set[str] = set()
        self._rounds: dict[str, _RefreshRound] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        store.watch(self._on_store_change)

    @property
    def _cache(self) -> dict[str, ShareData]:
        return self._manager._share_data

    def close(self) -> None:
        self.store.unwatch(self._on_store_change)
        for task in list(self._tasks):
            task.cancel()

    # -- registration and lifecycle ----------------------------------------------------

    async def register(self, share_data: ShareData) -> None:
        """Create ``share_data`` in the store unless it is there; load what the store holds into it."""
        history = share_data.transaction_history
        if history:
            # A ShareData that arrives with a history of its own keeps it, if
            # the store holds none for it (decided by the store, atomically).
            stored = await self.store.create(share_data.id, share_data.public_key, share_data.current_state, history)
        else:
            stored = await self.store.create(share_data.id, share_data.public_key, share_data.current_state)
        _load_into(share_data, stored)
        self._incarnations[share_data.id] = stored.incarnation

    async def replace(self, share_data: ShareData) -> None:
        self._incarnations[share_data.id] = await self.store.replace(
            share_data.id, share_data.public_key, share_data.current_state, share_data.transaction_history
        )
        self._stale.discard(share_data.id)

    async def remove(self, share_data_id: str) -> bool:
        removed = await self.store.remove(share_data_id)
        self._incarnations.pop(share_data_id, None)
        self._stale.discard(share_data_id)
        return removed

    # -- refresh ---------------------------------------------------------------------

    async def refresh(self, share_data_id: str) -> None:
        """Bring the cached ``share_data_id`` up to what the store holds now."""
        if share_data_id not in self._cache:
            return
        round_ = self._rounds.get(share_data_id)
        if round_ is None:
            round_ = self._rounds[share_data_id] = _RefreshRound()
        round_.asked += 1
        ticket = round_.asked
        try:
            async with round_.lock:
                if round_.answered >= ticket:
                    return  # a read that began after this call already answered it
                covers = round_.asked
                await self._refresh_now(share_data_id, self.store)
                round_.answered = max(round_.answered, covers)
        finally:
            if not round_.lock.locked() and round_.answered >= round_.asked:
                self._rounds.pop(share_data_id, None)

    async def _refresh_now(self, share_data_id: str, store: Any) -> None:
        share_data = self._cache.get(share_data_id)
        incarnation = self._incarnations.get(share_data_id)
        if share_data is None or incarnation is None:
            return
        self._stale.discard(share_data_id)
        try:
            changes = await store.changes_after(share_data_id, incarnation, len(share_data.transaction_history))
        except CorruptShareData as exc:
            self._distrust(share_data_id, exc)
            return
        except BaseException:
            self._stale.add(share_data_id)
            raise
        if self._cache.get(share_data_id) is not share_data:
            return  # replaced or removed here meanwhile: that change is newer
        self._apply(share_data, changes)

    def _on_store_change(self, share_data_id: Optional[str]) -> None:
        ids = list(self._cache) if share_data_id is None else [share_data_id]
        for one in ids:
            if one in self._cache:
                task = asyncio.get_running_loop().create_task(self._refresh_quietly(one))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _refresh_quietly(self, share_data_id: str) -> None:
        try:
            await self.refresh(share_data_id)
        except Exception as exc:
            logger.warning("refreshing ShareData %r from %r failed: %r", share_data_id, self.store, exc)

    # -- applying what the store holds ------------------------------------------------

    def _apply(self, share_data: ShareData, changes: Optional[StoredShareData]) -> None:
        share_data_id = share_data.id
        if changes is None:
            self._removed_elsewhere(share_data_id)
            return
        if changes.incarnation != self._incarnations.get(share_data_id):
            self._replaced_elsewhere(share_data, changes)
            return
        history = share_data.transaction_history
        have = len(history)
        if changes.after > have:
            self._stale.add(share_data_id)  # a tail that does not reach the cache: read again
            return
        # Records the cache already holds (a commit of ours brought them): they must be the same.
        overlap = changes.records[: have - changes.after]
        for record in overlap:
            if history[int(record.transaction_id) - 1].hash != record.hash:
                self._distrust(
                    share_data_id, CorruptShareData(share_data_id, "the store's history differs from the one committed")
                )
                return
        if changes.last_id == have and changes.head_hash != share_data._head_hash:
            self._distrust(share_data_id, CorruptShareData(share_data_id, "the stored head hash is not the committed one"))
            return
        if changes.last_id <= have:
            return  # read before commits this cache already holds: nothing newer in it
        fresh = changes.records[len(overlap) :]
        try:
            verify_tail(share_data_id, fresh, have, share_data._head_hash, changes.head_hash)
        except CorruptShareData as exc:
            self._distrust(share_data_id, exc)
            return
        for record in fresh:
            share_data._append_record(record)
        share_data.current_state = changes.current_state

    def _replaced_elsewhere(self, old: ShareData, stored: StoredShareData) -> None:
        replacement = ShareData(old.id, stored.public_key, current_state=stored.current_state, functions=old.functions)
        _load_into(replacement, stored)
        self._incarnations[old.id] = stored.incarnation
        self._cache[old.id] = replacement
        self._manager._announce("share-data:updated", replacement, remote=True)

    def _removed_elsewhere(self, share_data_id: str) -> None:
        share_data = self._cache.pop(share_data_id, None)
        self._incarnations.pop(share_data_id, None)
        self._stale.discard(share_data_id)
        if share_data is not None:
            self._manager._emitter.emit(
                "share-data:removed",
                ShareDataEvent("share-data:removed", share_data_id, share_data=share_data, remote=True),
            )

    def _distrust(self, share_data_id: str, error: CorruptShareData) -> None:
        logger.error("%s; it is no longer served", error)
        self._cache.pop(share_data_id, None)
        self._incarnations.pop(share_data_id, None)
        self._stale.discard(share_data_id)

    # -- the commit loop -----------------------------------------------------------------

    async def commit_transaction(
        self,
        share_data_id: str,
        function: ShareFunction,
        proposed_data: Any,
        proof: Any,
        evaluate: Evaluate,
    ) -> tuple[ShareData, TransactionRecord, Any]:
        """Evaluate and commit one proposal; returns (ShareData, record, state after it).

        Raises KeyError when the id is gone, RuntimeError when the history
        moved under the rule ``MAX_EVALUATIONS`` times, and the store's
        errors when the outcome could not be decided (nothing is assumed
        recorded then; the id is refreshed before its next use).
        """
        async with contextlib.AsyncExitStack() as stack:
            store = self.store
            lost_once = held = False
            for _ in range(MAX_EVALUATIONS):
                if share_data_id in self._stale:
                    await self._refresh_now(share_data_id, store)
                share_data = self._cache.get(share_data_id)
                if share_data is None:
                    raise KeyError(f"shareDataId {share_data_id} not found")
                state = share_data.current_state
                accepted = await evaluate(function, state, proposed_data)
                if lost_once and not held:
                    # Lost once: take the lock now, after the rule ran (its
                    # time is not spent holding other nodes off), and catch
                    # up with what committed before it. Unchanged: the
                    # verdict stands (and, where hold is a row lock, the
                    # commit cannot lose); else the rule runs again, under
                    # the lock this time, so a busy peer cannot starve it.
                    store = await stack.enter_async_context(self.store.hold(share_data_id))
                    held = True
                    await self._refresh_now(share_data_id, store)
                if self._cache.get(share_data_id) is not share_data or share_data.current_state is not state:
                    continue  # changed while the rule ran (or before the lock): judge the new state
                record = share_data._next_record(function.id, proposed_data, accepted, proof)
                after = proposed_data if accepted else state
                try:
                    lost = await store.commit(share_data_id, self._incarnations[share_data_id], record, after)
                except KeyError:
                    self._removed_elsewhere(share_data_id)
                    raise
                except CorruptShareData as exc:
                    # What it lost to does not verify (CorruptShareData is a
                    # ValueError: caught before the clause below).
                    self._distrust(share_data_id, exc)
                    raise
                except ValueError:
                    raise  # refused before anything was sent (not plain JSON)
                except BaseException:
                    self._stale.add(share_data_id)
                    raise
                if lost is None:
                    self._adopt(share_data, record, after)
                    return share_data, record, after
                if self._cache.get(share_data_id) is share_data:
                    self._apply(share_data, lost)
                lost_once = True
        raise RuntimeError(
            f"the history of ShareData {share_data_id!r} moved on while the rule of {function.label!r} ran,"
            f" {MAX_EVALUATIONS} times in a row; nothing recorded"
        )

    def _adopt(self, share_data: ShareData, record: TransactionRecord, state: Any) -> None:
        history = share_data.transaction_history
        seq = int(record.transaction_id)
        if len(history) == seq - 1 and share_data._head_hash == record.prev_hash:
            share_data._append_record(record)
            share_data.current_state = state
        elif not (len(history) >= seq and history[seq - 1].hash == record.hash):
            self._stale.add(share_data.id)


def _load_into(share_data: ShareData, stored: StoredShareData) -> None:
    """Make ``share_data`` hold what ``stored`` (a whole, verified history) holds."""
    share_data.public_key = stored.public_key
    share_data.current_state = stored.current_state
    share_data.transaction_history = list(stored.records)
    share_data._head_hash = stored.head_hash
