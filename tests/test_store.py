"""ShareData stores and ShareDataManager(store=...): memory, SQLite, PostgreSQL.

Real databases only: SQLite files in the test's temporary directory, and a
PostgreSQL database created for each test (see ``store_helpers.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from safe_fast import (
    CorruptShareData,
    MemoryStore,
    PostgresStore,
    SchemaVersionError,
    ShareData,
    ShareDataManager,
    ShareDataStore,
    ShareFunction,
    SQLiteStore,
    StoreUnavailable,
    open_store,
)
from store_helpers import postgres_database, store_url_for

pytestmark = pytest.mark.timeout(120)

PUT = ShareFunction("put", lambda state, proposed: True)
BUMP = ShareFunction("bump", lambda state, proposed: proposed == {"n": state["n"] + 1})


def counter(share_data_id: str = "counter") -> ShareData:
    return ShareData(share_data_id, current_state={"n": 0}, functions=[PUT, BUMP])


def peer_store(url: str, store: ShareDataStore) -> ShareDataStore:
    """A second node's store: the same memory store, or a second connection to the database."""
    return store if url.startswith("memory") else open_store(url)


async def raw_sql(url: str, *statements: str) -> None:
    """Run statements directly on the database behind ``url`` (tampering, as an intruder would)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
        try:
            for statement in statements:
                connection.execute(statement)
        finally:
            connection.close()
        return
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


# -- selection by URL ------------------------------------------------------------------


def test_open_store_selects_the_implementation_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    relative = open_store("sqlite:///data/app.db")
    assert isinstance(relative, SQLiteStore) and relative.path == "data/app.db"
    absolute = open_store(f"sqlite:///{tmp_path}/app.db")
    assert isinstance(absolute, SQLiteStore) and absolute.path == f"{tmp_path}/app.db"
    assert isinstance(open_store("postgresql://postgres@127.0.0.1:5432/test"), PostgresStore)
    assert isinstance(open_store("postgres://postgres@127.0.0.1:5432/test"), PostgresStore)
    for store in (open_store("memory://"), relative, open_store("postgresql://u@h/d")):
        assert isinstance(store, ShareDataStore)
    with pytest.raises(ValueError, match="unsupported store url 'mysql://x'"):
        open_store("mysql://x")
    with pytest.raises(ValueError, match="names no file"):
        open_store("sqlite:///")
    with pytest.raises(TypeError, match="store url must be a string"):
        open_store(None)  # type: ignore[arg-type]


async def test_a_store_that_is_not_open_says_so(tmp_path: Path) -> None:
    store = open_store(store_url_for("sqlite", tmp_path))
    with pytest.raises(Exception, match="is not open"):
        await store.load("x")


# -- registration, durability across reopen ---------------------------------------------


async def test_register_creates_once_then_loads_what_the_store_holds(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        assert manager.durable and manager.store is store
        doc = await manager.register(counter())
        for n in range(1, 6):
            outcome = await manager.apply_transaction("counter", {"n": n}, BUMP, proof={"by": "t"})
            assert outcome.accepted and outcome.transaction_id == str(n)
        rejected = await manager.apply_transaction("counter", {"n": 99}, BUMP)
        assert not rejected.accepted and rejected.transaction_id == "6"
        assert doc.current_state == {"n": 5}
        manager.close()

    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        # The initial state given here loses: the store already holds the id.
        reloaded = await manager.register(ShareData("counter", current_state={"n": -1}, functions=[PUT, BUMP]))
        assert reloaded.current_state == {"n": 5}
        assert [r.transaction_id for r in reloaded.transaction_history] == ["1", "2", "3", "4", "5", "6"]
        assert [r.accepted for r in reloaded.transaction_history] == [True] * 5 + [False]
        assert reloaded.transaction_history[0].proof == {"by": "t"}
        assert reloaded.verify_chain()
        assert reloaded.transaction_history == doc.transaction_history
        outcome = await manager.apply_transaction("counter", {"n": 6}, BUMP)
        assert outcome.transaction_id == "7" and outcome.accepted
        manager.close()


async def test_manager_without_store_is_unchanged_and_async_methods_work_on_it() -> None:
    manager = ShareDataManager()
    assert manager.store is None and not manager.durable
    manager.add_share_data(counter())
    await manager.register(counter("other"))
    with pytest.raises(ValueError, match="already exists"):
        await manager.register(counter("other"))
    await manager.replace(counter("other"))
    assert await manager.remove("other")
    assert not await manager.remove("other")
    await manager.refresh("counter")
    assert (await manager.apply_transaction("counter", {"n": 1}, BUMP)).transaction_id == "1"


async def test_synchronous_changes_are_refused_with_a_store() -> None:
    async with open_store("memory://") as store:
        manager = ShareDataManager(store=store)
        with pytest.raises(RuntimeError, match=r"await manager.register\(share_data\)"):
            manager.add_share_data(counter())
        await manager.register(counter())
        with pytest.raises(RuntimeError, match=r"await manager.replace\(share_data\)"):
            manager.update_share_data(counter())
        with pytest.raises(RuntimeError, match=r"await manager.remove\(share_data_id\)"):
            manager.remove_share_data_by_id("counter")
        with pytest.raises(ValueError, match="already exists"):
            await manager.register(counter())
    with pytest.raises(TypeError, match="store must be a ShareDataStore"):
        ShareDataManager(store=object())


async def test_data_a_durable_store_cannot_keep_is_refused_and_nothing_recorded(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        with pytest.raises(ValueError, match="not plain JSON"):
            await manager.register(ShareData("bad", current_state=(1, 2)))
        doc = await manager.register(counter())
        with pytest.raises(ValueError, match="proposed data cannot be kept by a durable store"):
            await manager.apply_transaction("counter", {1, 2}, PUT)
        with pytest.raises(ValueError, match="proof cannot be kept"):
            await manager.apply_transaction("counter", {"n": 1}, PUT, proof=float("nan"))
        assert doc.transaction_history == [] and doc.current_state == {"n": 0}
        assert (await manager.apply_transaction("counter", {"n": 1}, BUMP)).transaction_id == "1"
        manager.close()


# -- rule 1: one sequence per id ---------------------------------------------------------


async def test_a_commit_that_lost_the_race_catches_up_and_evaluates_again(store_url: str) -> None:
    async with open_store(store_url) as store_a:
        store_b = peer_store(store_url, store_a)
        async with store_b if store_b is not store_a else _nothing():
            node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
            doc_a = await node_a.register(counter())
            doc_b = await node_b.register(counter())
            seen_b: list[Any] = []
            node_b.on("share-data:transaction", seen_b.append)

            assert (await node_a.apply_transaction("counter", {"n": 1}, BUMP)).transaction_id == "1"
            # B still holds n=0: its rule would accept {"n": 1}; the store makes it judge n=1.
            assert doc_b.current_state == {"n": 0}
            stale = await node_b.apply_transaction("counter", {"n": 1}, BUMP)
            assert (stale.accepted, stale.transaction_id) == (False, "2")
            fresh = await node_b.apply_transaction("counter", {"n": 2}, BUMP)
            assert (fresh.accepted, fresh.transaction_id) == (True, "3")
            # Only B's own commits are announced by B.
            assert [event.transaction_id for event in seen_b] == ["2", "3"]

            await node_a.refresh("counter")
            assert doc_a.current_state == doc_b.current_state == {"n": 2}
            assert doc_a.transaction_history == doc_b.transaction_history
            assert doc_a.verify_chain() and doc_b.verify_chain()
            node_a.close()
            node_b.close()


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: Any) -> None:
        return None


@pytest.mark.parametrize("kind", ["memory", "postgresql"])
async def test_two_nodes_proposing_concurrently_share_one_sequence(kind: str, tmp_path: Path) -> None:
    urls = postgres_database() if kind == "postgresql" else None
    url = await urls.__anext__() if urls is not None else "memory://"
    try:
        async with open_store(url) as store_a:
            store_b = peer_store(url, store_a)
            async with store_b if store_b is not store_a else _nothing():
                nodes = [ShareDataManager(store=store_a), ShareDataManager(store=store_b)]
                for node in nodes:
                    await node.register(counter())
                outcomes = await asyncio.gather(
                    *(nodes[i % 2].apply_transaction("counter", {"i": i}, PUT) for i in range(200))
                )
                ids = sorted(int(outcome.transaction_id) for outcome in outcomes)
                assert ids == list(range(1, 201))
                for node in nodes:
                    await node.refresh("counter")
                histories = [node.get_share_data_by_id("counter").transaction_history for node in nodes]
                assert histories[0] == histories[1] and len(histories[0]) == 200
                assert all(node.get_share_data_by_id("counter").verify_chain() for node in nodes)
                for node in nodes:
                    node.close()
    finally:
        if urls is not None:
            await urls.aclose()


async def test_commits_on_different_ids_share_a_database_transaction(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        for index in range(64):
            await manager.register(counter(f"c{index}"))
        before = store.commit_batches
        outcomes = await asyncio.gather(
            *(manager.apply_transaction(f"c{index}", {"n": 1}, BUMP) for index in range(64))
        )
        assert all(outcome.accepted and outcome.transaction_id == "1" for outcome in outcomes)
        assert store.commit_batches - before < 64
        manager.close()
    async with open_store(durable_url) as store:
        for index in range(64):
            stored = await store.load(f"c{index}")
            assert stored is not None and stored.current_state == {"n": 1} and stored.last_id == 1


# -- rule 6: replacement and removal reach every node ---------------------------------------


async def test_replacement_and_removal_reach_the_other_node(store_url: str) -> None:
    async with open_store(store_url) as store_a:
        store_b = peer_store(store_url, store_a)
        async with store_b if store_b is not store_a else _nothing():
            node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
            await node_a.register(counter())
            await node_b.register(counter())
            events: list[Any] = []
            node_b.on("share-data:updated", events.append)
            node_b.on("share-data:removed", events.append)
            await node_a.apply_transaction("counter", {"n": 1}, BUMP)

            await node_a.replace(ShareData("counter", current_state={"n": 100}, functions=[PUT, BUMP]))
            if store_url.startswith("sqlite"):
                await node_b.refresh("counter")  # no notifications between SQLite connections
            await _until(lambda: events, "the replacement to reach node B")
            (updated,) = events
            assert (updated.type, updated.remote, updated.current_state) == ("share-data:updated", True, {"n": 100})
            replaced = node_b.get_share_data_by_id("counter")
            assert replaced.transaction_history == [] and replaced.functions == [PUT, BUMP]
            outcome = await node_b.apply_transaction("counter", {"n": 101}, BUMP)
            assert outcome.accepted and outcome.transaction_id == "1"

            assert await node_a.remove("counter")
            if store_url.startswith("sqlite"):
                await node_b.refresh("counter")
            await _until(lambda: len(events) == 2, "the removal to reach node B")
            assert (events[1].type, events[1].remote) == ("share-data:removed", True)
            assert node_b.get_share_data_by_id("counter") is None
            with pytest.raises(KeyError):
                await node_b.apply_transaction("counter", {"n": 1}, PUT)
            node_a.close()
            node_b.close()


async def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- rule 7 and faults ---------------------------------------------------------------------


async def test_a_newer_schema_is_refused(durable_url: str) -> None:
    async with open_store(durable_url):
        pass
    await raw_sql(durable_url, "UPDATE safe_fast_schema SET version = 99")
    with pytest.raises(SchemaVersionError, match="schema version 99.*upgrade safe_fast"):
        async with open_store(durable_url):
            pass


@pytest.mark.parametrize(
    "tampering, problem",
    [
        ("UPDATE safe_fast_transactions SET proposed_data = '{\"n\":7}' WHERE seq = 2", "transaction 2 does not match its hash"),
        ("UPDATE safe_fast_transactions SET proof = 'not json' WHERE seq = 2", "transaction 2: proof does not decode"),
        ("DELETE FROM safe_fast_transactions WHERE seq = 2", "the row says 3 transactions, the history holds 2"),
        ("UPDATE safe_fast_share_data SET state = '{'", "the current state does not decode"),
    ],
    ids=["edited-record", "undecodable-proof", "missing-record", "undecodable-state"],
)
async def test_a_corrupt_row_or_broken_chain_is_reported_naming_the_id(
    durable_url: str, tampering: str, problem: str
) -> None:
    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        await manager.register(counter())
        for n in (1, 2, 3):
            await manager.apply_transaction("counter", {"n": n}, BUMP)
        manager.close()
    await raw_sql(durable_url, tampering)
    async with open_store(durable_url) as store:
        manager = ShareDataManager(store=store)
        with pytest.raises(CorruptShareData, match="ShareData 'counter' in the store is corrupt: ") as caught:
            await manager.register(counter())
        assert caught.value.share_data_id == "counter" and problem in str(caught.value)
        assert manager.get_share_data_by_id("counter") is None
        # Other ids are unaffected.
        await manager.register(counter("other"))
        manager.close()


async def test_an_unreachable_database_fails_at_open_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="does not exist"):
        async with open_store(f"sqlite:///{tmp_path}/missing/dir/store.db"):
            pass
    closed_port = _closed_port()
    with pytest.raises(StoreUnavailable, match=f"cannot reach PostgreSQL at postgresql://postgres:\\*\\*\\*@127.0.0.1:{closed_port}/x"):
        async with open_store(f"postgresql://postgres:secret@127.0.0.1:{closed_port}/x", connect_timeout=2):
            pass


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_lost_notification_connection_is_reopened_and_nothing_missed() -> None:
    import asyncpg

    async for url in postgres_database():
        async with open_store(url) as store_a, open_store(url) as store_b:
            node_a, node_b = ShareDataManager(store=store_a), ShareDataManager(store=store_b)
            for name in ("one", "two"):
                await node_a.register(counter(name))
                await node_b.register(counter(name))
            removed: list[str] = []
            node_b.on("share-data:removed", lambda event: removed.append(event.share_data_id))

            listener = store_b._listener  # the LISTEN connection
            admin = await asyncpg.connect(url)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
                # Removed while B cannot hear about it.
                assert await node_a.remove("one")
            finally:
                await admin.close()
            await _until(lambda: removed == ["one"], "B to catch up after reconnecting")
            await _until(lambda: store_b._listener not in (None, listener), "a new LISTEN connection")
            assert await node_a.remove("two")
            await _until(lambda: removed == ["one", "two"], "B to hear of the next removal")
            node_a.close()
            node_b.close()
