"""Races and faults between a store's statements, and between nodes, that STORE.md's rules must survive.

Real stores (SQLite files, a fresh PostgreSQL database per test), two
managers standing for two nodes. The timing that a race needs is forced by
holding one side between two of its database statements (``StatementGate``)
or after its commit (a wrapped ``commit``), never by sleeping; a connection
lost in the middle of an operation is a real asyncpg error raised in its place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from safe_fast import ShareData, ShareDataManager, ShareFunction, open_store
from safe_fast.store import CorruptShareData, StoreUnavailable
from store_helpers import DEADLINE, postgres_database, wait_for

pytestmark = pytest.mark.timeout(120)

SET = ShareFunction("set", lambda state, proposed: True)


def doc(share_data_id: str = "X", state: Any = 0) -> ShareData:
    return ShareData(share_data_id, current_state=state, functions=[SET])


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async for url in postgres_database():
        yield url


class StatementGate:
    """Holds a PostgreSQL store's operation right after its first statement starting with ``prefix``,
    until :meth:`release` (the connection and its transaction stay as they are meanwhile)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.prefix = prefix
        self.reached = asyncio.Event()
        self._released = asyncio.Event()
        run = store._run

        async def gated_run(what: str, operation: Any) -> Any:
            return await run(what, lambda connection: operation(_GatedConnection(connection, self)))

        store._run = gated_run

    def release(self) -> None:
        self._released.set()


class _GatedConnection:
    def __init__(self, connection: Any, gate: StatementGate) -> None:
        self._connection = connection
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def execute(self, query: str, *args: Any) -> Any:
        result = await self._connection.execute(query, *args)
        gate = self._gate
        if query.startswith(gate.prefix) and not gate.reached.is_set():
            gate.reached.set()
            await asyncio.wait_for(gate._released.wait(), DEADLINE)
        return result


async def lock_waiters(url: str) -> int:
    """Sessions of this database waiting for a row lock."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    finally:
        await connection.close()


@pytest.mark.parametrize("operation", ["remove", "replace"])
async def test_a_commit_racing_a_removal_or_replacement_leaves_no_stray_record(
    postgres_url: str, operation: str
) -> None:
    async with open_store(postgres_url) as store_a, open_store(postgres_url) as store_b:
        node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
        await node_a.register(doc())
        await node_b.register(doc())
        for value in (1, 2):
            await node_a.apply_transaction("X", value, SET)
        await node_b.refresh("X")
        # A stops between the statements of its removal or replacement, after
        # it deleted the transactions; B commits meanwhile (or waits for A's lock).
        gate = StatementGate(store_a, "DELETE FROM safe_fast_transactions")
        changing = asyncio.ensure_future(node_a.remove("X") if operation == "remove" else node_a.replace(doc(state=-1)))
        await asyncio.wait_for(gate.reached.wait(), DEADLINE)
        committing = asyncio.ensure_future(node_b.apply_transaction("X", 3, SET))
        for _ in range(int(DEADLINE / 0.02)):
            if committing.done() or await lock_waiters(postgres_url):
                break
            await asyncio.sleep(0.02)
        gate.release()
        await asyncio.wait_for(changing, DEADLINE)
        await asyncio.wait_for(asyncio.gather(committing, return_exceptions=True), DEADLINE)

        # Whatever B's commit became, the store is whole: a node registering
        # the id now loads a history that verifies, and so do both nodes.
        fresh = ShareDataManager(store=store_b)
        loaded = await fresh.register(doc())
        assert loaded.verify_chain()
        for node in (node_a, node_b):
            await node.refresh("X")
        if operation == "replace":
            for node in (node_a, node_b):
                share_data = node.get_share_data_by_id("X")
                assert share_data is not None and share_data.verify_chain()
                assert share_data.last_transaction_id == loaded.last_transaction_id


async def test_a_lost_read_after_a_group_commit_fails_only_the_item_that_lost(postgres_url: str) -> None:
    import asyncpg

    import safe_fast.store.postgres as postgres

    async with open_store(postgres_url) as store_a, open_store(postgres_url) as store_b:
        node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
        for node in (node_a, node_b):
            await node.register(doc("X"))
            await node.register(doc("Y"))
        await node_b.apply_transaction("Y", 1, SET)  # A's copy of Y is one behind: A's next Y commit loses
        announced: list[tuple[str, str]] = []
        node_a.on("share-data:transaction", lambda event: announced.append((event.share_data_id, event.transaction_id)))
        read = postgres._changes

        async def connection_lost(*args: Any) -> Any:
            postgres._changes = read  # once: what Y lost to cannot be read
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")

        postgres._changes = connection_lost
        try:
            on_x = asyncio.ensure_future(node_a.apply_transaction("X", 42, SET))
            on_y = asyncio.ensure_future(node_a.apply_transaction("Y", 43, SET))
            results = await asyncio.wait_for(asyncio.gather(on_x, on_y, return_exceptions=True), DEADLINE)
        finally:
            postgres._changes = read
        assert store_a.commit_batches == 1, "X and Y went out in one batch"
        outcome_x, outcome_y = results
        # X is recorded, so it is acknowledged and announced; Y's outcome is the failed read.
        assert not isinstance(outcome_x, BaseException) and outcome_x.transaction_id == "1", outcome_x
        assert ("X", "1") in announced
        assert isinstance(outcome_y, StoreUnavailable), outcome_y
        stored = await store_b.load("X")
        assert stored is not None and stored.last_id == 1


async def test_a_replacement_waits_for_a_transaction_under_way_and_is_announced_after_it() -> None:
    # The manager's ordering, whatever the store: the memory store answers at once.
    async with open_store("memory://") as store:
        node = ShareDataManager(store=store)
        await node.register(doc())
        await node.apply_transaction("X", 1, SET)
        events: list[tuple[str, Any]] = []
        node.on("share-data:transaction", lambda event: events.append(("transaction", event.transaction_id)))
        node.on("share-data:updated", lambda event: events.append(("updated", event.current_state)))
        committed, answer = asyncio.Event(), asyncio.Event()
        commit = store.commit

        async def commit_then_wait(*args: Any, **kwargs: Any) -> Any:
            result = await commit(*args, **kwargs)
            committed.set()
            await asyncio.wait_for(answer.wait(), DEADLINE)  # the reply is slow to come back
            return result

        store.commit = commit_then_wait  # type: ignore[method-assign]
        proposing = asyncio.ensure_future(node.apply_transaction("X", 2, SET))
        await asyncio.wait_for(committed.wait(), DEADLINE)
        replacing = asyncio.ensure_future(node.replace(doc(state="new")))
        await asyncio.sleep(0)  # replace starts, and waits for the id's lock (it used to go straight on)
        answer.set()
        await asyncio.wait_for(asyncio.gather(proposing, replacing), DEADLINE)
        assert events == [("transaction", "2"), ("updated", "new")]
        assert node.get_share_data_by_id("X").current_state == "new"  # type: ignore[union-attr]


async def test_a_corrupt_row_met_by_a_losing_commit_takes_the_id_out_of_service(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with open_store(f"sqlite:///{path}") as store_a, open_store(f"sqlite:///{path}") as store_b:
        node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
        await node_a.register(doc())
        await node_b.register(doc())
        await node_b.apply_transaction("X", 1, SET)  # A is one behind: its commit loses and reads the row
        with sqlite3.connect(path) as db:
            db.execute("UPDATE safe_fast_share_data SET state = '{not json' WHERE id = 'X'")
        with pytest.raises(CorruptShareData):
            await node_a.apply_transaction("X", 2, SET)
        # Answered as not found from now on (STORE.md rule 7), not served from a stale copy.
        assert node_a.get_share_data_by_id("X") is None
        with pytest.raises(KeyError):
            await node_a.apply_transaction("X", 2, SET)


async def test_a_lock_given_up_under_repeated_cancellation_returns_its_connection(postgres_url: str) -> None:
    async with open_store(postgres_url, pool_size=2, command_timeout=5) as store:
        await ShareDataManager(store=store).register(doc())
        holding = asyncio.Event()

        async def hold() -> None:
            async with store.hold("X"):
                holding.set()
                await asyncio.sleep(DEADLINE)

        holder = asyncio.ensure_future(hold())
        await asyncio.wait_for(holding.wait(), DEADLINE)
        holder.cancel()
        await asyncio.sleep(0)  # the first cancellation is in the exit's rollback now
        holder.cancel()  # and a second one (a shutdown, an outer timeout) lands there
        with pytest.raises(asyncio.CancelledError):
            await holder
        pool = store._pool
        await wait_for(lambda: pool.get_idle_size() == pool.get_size(), "every pooled connection back")
        # The row lock went with the transaction: another hold gets it at once.
        async with store.hold("X"):
            pass


async def test_a_history_registered_while_another_node_commits_loses_no_acknowledged_transaction(
    durable_url: str,
) -> None:
    async with open_store(durable_url) as store_a, open_store(durable_url) as store_b:
        node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
        await node_a.register(doc())
        # B registers the id with a history of its own; A commits while B's
        # registration is still on its way back.
        created, answer = asyncio.Event(), asyncio.Event()
        create = store_b.create

        async def create_then_wait(*args: Any, **kwargs: Any) -> Any:
            result = await create(*args, **kwargs)
            created.set()
            await asyncio.wait_for(answer.wait(), DEADLINE)
            return result

        store_b.create = create_then_wait  # type: ignore[method-assign]
        seeded = doc()
        seeded._append("set", "seed", True, None)
        seeded.current_state = "seed"
        registering = asyncio.ensure_future(node_b.register(seeded))
        await asyncio.wait_for(created.wait(), DEADLINE)
        outcome = await node_a.apply_transaction("X", "A's write", SET)
        answer.set()
        await asyncio.wait_for(registering, DEADLINE)

        # The acknowledged write is in the history every node loads, after the seed.
        fresh = await ShareDataManager(store=store_a).register(doc())
        assert [record.proposed_data for record in fresh.transaction_history] == ["seed", "A's write"]
        assert fresh.transaction_history[-1].transaction_id == outcome.transaction_id == "2"
        assert fresh.verify_chain() and fresh.current_state == "A's write"


async def test_a_history_that_does_not_verify_is_never_stored(store_url: str) -> None:
    async with open_store(store_url) as store:
        node = ShareDataManager(store=store)
        tampered = doc()
        tampered._append("set", "real", True, None)
        tampered.transaction_history[0] = dataclasses.replace(tampered.transaction_history[0], proposed_data="forged")
        with pytest.raises(ValueError, match="does not verify"):
            await node.register(tampered)
        assert await store.load("X") is None
        await node.register(doc())
        with pytest.raises(ValueError, match="does not verify"):
            await node.replace(tampered)
        stored = await store.load("X")
        assert stored is not None and stored.last_id == 0


async def test_a_rule_judging_again_after_a_lost_race_holds_no_other_node_off(postgres_url: str) -> None:
    async with open_store(postgres_url) as store_a, open_store(postgres_url) as store_b:
        judging, judged = asyncio.Event(), asyncio.Event()
        calls = 0

        async def slow_second_look(state: Any, proposed: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 2:  # the evaluation after A's first commit lost
                judging.set()
                await asyncio.wait_for(judged.wait(), DEADLINE)
            return True

        slow = ShareFunction("slow", slow_second_look)
        node_a = ShareDataManager(store=store_a)
        node_b = ShareDataManager(store=store_b)
        for node in (node_a, node_b):
            await node.register(ShareData("X", current_state=0, functions=[SET, slow]))
            await node.register(doc("Y"))
        await node_b.apply_transaction("X", 1, SET)  # A is behind: its first commit loses
        proposing = asyncio.ensure_future(node_a.apply_transaction("X", "A", slow))
        await asyncio.wait_for(judging.wait(), DEADLINE)
        # While A's rule runs again, B commits to X and to another id, in one batch.
        on_x = asyncio.ensure_future(node_b.apply_transaction("X", "B", SET))
        on_y = asyncio.ensure_future(node_b.apply_transaction("Y", "B", SET))
        done, _ = await asyncio.wait([on_x, on_y], timeout=DEADLINE)
        assert done == {on_x, on_y}, "B was held off while A's rule ran"
        judged.set()
        outcome = await asyncio.wait_for(proposing, DEADLINE)
        # X moved under A's second look: A judged again, under the lock, and won.
        assert calls == 3 and outcome.transaction_id == "3"
        stored = await store_b.load("X")
        assert stored is not None and [r.proposed_data for r in stored.records] == [1, "B", "A"]


async def test_a_replacement_waiting_for_a_transaction_does_not_bring_back_an_id_removed_meanwhile() -> None:
    async with open_store("memory://") as store:
        node_a, node_b = ShareDataManager(store=store), ShareDataManager(store=store)
        await node_a.register(doc())
        await node_b.register(doc())
        committing, go = asyncio.Event(), asyncio.Event()
        commit = store.commit

        async def commit_later(*args: Any, **kwargs: Any) -> Any:
            committing.set()
            await asyncio.wait_for(go.wait(), DEADLINE)
            return await commit(*args, **kwargs)

        store.commit = commit_later  # type: ignore[method-assign]
        proposing = asyncio.ensure_future(node_a.apply_transaction("X", 1, SET))
        await asyncio.wait_for(committing.wait(), DEADLINE)  # A's transaction holds the id's lock
        replacing = asyncio.ensure_future(node_a.replace(doc(state="new")))
        assert await node_b.remove("X")  # another node removes it meanwhile
        go.set()
        results = await asyncio.wait_for(asyncio.gather(proposing, replacing, return_exceptions=True), DEADLINE)
        assert all(isinstance(result, KeyError) for result in results), results
        assert await store.load("X") is None and node_a.get_share_data_by_id("X") is None


async def test_a_rule_may_replace_its_own_share_data() -> None:
    async with open_store("memory://") as store:
        node = ShareDataManager(store=store)
        calls = 0

        async def resets_first(state: Any, proposed: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                await node.replace(ShareData("X", current_state="reset", functions=[SET, resetting]))
            return True

        resetting = ShareFunction("reset", resets_first)
        await node.register(ShareData("X", current_state=0, functions=[SET, resetting]))
        outcome = await asyncio.wait_for(node.apply_transaction("X", "after", resetting), DEADLINE)
        # Judged again against the replacement, and recorded on its history.
        assert calls == 2 and outcome.transaction_id == "1"
        assert node.get_share_data_by_id("X").current_state == "after"  # type: ignore[union-attr]
