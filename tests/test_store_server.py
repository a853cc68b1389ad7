"""Servers over a store: read-through snapshots, replay from the stored history,
and faults (a database that goes away mid-run, a history corrupted under a
running server). Real servers, real WebSocket clients, real databases; the
database outage is a real TCP proxy cutting the connections.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any, Optional

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from safe_fast import (
    RealtimeServer,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
    open_store,
)
from safe_fast.metrics import ServerMetrics
from store_helpers import DEADLINE, postgres_database, store_url_for

pytestmark = pytest.mark.timeout(120)

PUT = ShareFunction("put", lambda state, proposed: True)


class Node:
    """A server over its own store connection and manager, in this process."""

    def __init__(self, store_url: str, **store_options: Any) -> None:
        self.store = open_store(store_url, **store_options)
        self.manager: Optional[ShareDataManager] = None
        self.server: Optional[RealtimeServer] = None

    async def start(self) -> "Node":
        await self.store.open()
        self.manager = ShareDataManager(store=self.store)
        await self.manager.register(ShareData("doc", current_state={"v": 0}, functions=[PUT]))
        self.server = await attach_realtime_server(
            manager=self.manager,
            authenticate=lambda request: {"subject": "test"},
            resolve_function=create_id_based_function_resolver(self.manager),
            heartbeat_interval=None,
        )
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.manager is not None:
            self.manager.close()
        await self.store.close()

    def connect(self) -> Any:
        assert self.server is not None
        return ws_connect(self.server.url, open_timeout=DEADLINE)


_backlog: dict[int, list[dict[str, Any]]] = {}
"""Frames that arrived while a helper waited for another one, per connection."""


async def recv(ws: ClientConnection) -> dict[str, Any]:
    waiting = _backlog.get(id(ws))
    if waiting:
        return waiting.pop(0)
    return json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))


async def propose(ws: ClientConnection, value: Any, correlation_id: str) -> dict[str, Any]:
    await ws.send(
        json.dumps(
            {
                "v": 1,
                "type": "propose",
                "shareDataId": "doc",
                "functionId": "put",
                "proposedData": value,
                "correlationId": correlation_id,
            }
        )
    )
    for _ in range(1000):
        frame = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
        if frame["type"] == "proposal-result" and frame["correlationId"] == correlation_id:
            return frame
        _backlog.setdefault(id(ws), []).append(frame)
    raise AssertionError("no proposal-result among 1000 frames")


async def subscribe(ws: ClientConnection, since: Optional[str] = None) -> dict[str, Any]:
    message: dict[str, Any] = {"v": 1, "type": "subscribe", "shareDataId": "doc"}
    if since is not None:
        message["since"] = since
    _backlog.pop(id(ws), None)
    await ws.send(json.dumps(message))
    return await recv(ws)


async def test_a_restarted_node_replays_from_the_stored_history(durable_url: str) -> None:
    node = await Node(durable_url).start()
    try:
        async with node.connect() as ws:
            for n in range(1, 6):
                result = await propose(ws, {"v": n}, f"p{n}")
                assert result["accepted"] and result["transactionId"] == str(n)
    finally:
        await node.stop()

    node = await Node(durable_url).start()
    try:
        async with node.connect() as ws:
            state = await subscribe(ws, since="2")
            assert (state["type"], state["lastTransactionId"], state["currentState"]) == ("state", "5", {"v": 5})
            replayed = [await recv(ws) for _ in range(3)]
            assert [(f["type"], f["transactionId"], f["replayed"]) for f in replayed] == [
                ("transaction", "3", True),
                ("transaction", "4", True),
                ("transaction", "5", True),
            ]
            result = await propose(ws, {"v": 6}, "p6")
            assert result["transactionId"] == "6"
            live = await recv(ws)
            assert (live["type"], live["transactionId"], live.get("replayed", False)) == ("transaction", "6", False)
            # A cursor the history never held is not found, after the snapshot.
            async with node.connect() as other:
                assert (await subscribe(other, since="60"))["lastTransactionId"] == "6"
                error = await recv(other)
                assert (error["type"], error["code"]) == ("error", "replay-cursor-not-found")
    finally:
        await node.stop()


async def test_a_snapshot_on_another_node_holds_every_acknowledged_commit(durable_url: str) -> None:
    node_a, node_b = await Node(durable_url).start(), await Node(durable_url).start()
    try:
        async with node_a.connect() as on_a, node_b.connect() as on_b:
            for n in range(1, 21):
                result = await propose(on_a, {"v": n}, f"a{n}")
                assert result["accepted"]
                state = await subscribe(on_b, since=str(n - 1) if n > 1 else None)
                assert state["lastTransactionId"] == result["transactionId"] == str(n)
                assert state["currentState"] == {"v": n}
                if n > 1:
                    replay = await recv(on_b)
                    assert (replay["transactionId"], replay["replayed"]) == (str(n), True)
            # And the other way round: B commits on top of what A did.
            result = await propose(on_b, {"v": "b"}, "b1")
            assert result["transactionId"] == "21"
    finally:
        await node_a.stop()
        await node_b.stop()


async def test_a_snapshot_that_holds_a_commit_does_not_get_it_live_again(store_url: str) -> None:
    """STORE.md rule 4 with the in-memory registry: a subscribe's read-through
    can bring a record before the commit that wrote it is announced."""
    node = await Node(store_url).start()
    committed, announce = asyncio.Event(), asyncio.Event()
    store_commit = node.store.commit

    async def commit_then_wait(*args: Any, **kwargs: Any) -> Any:
        # The record is in the store (durably); its announcement waits.
        lost = await store_commit(*args, **kwargs)
        committed.set()
        await announce.wait()
        return lost

    node.store.commit = commit_then_wait  # type: ignore[method-assign]
    try:
        async with node.connect() as proposer, node.connect() as watcher:
            proposing = asyncio.ensure_future(propose(proposer, {"v": 1}, "p1"))
            await asyncio.wait_for(committed.wait(), DEADLINE)
            state = await subscribe(watcher)
            assert (state["lastTransactionId"], state["currentState"]) == ("1", {"v": 1})
            announce.set()
            assert (await asyncio.wait_for(proposing, DEADLINE))["transactionId"] == "1"
            assert (await propose(proposer, {"v": 2}, "p2"))["transactionId"] == "2"
            live = await recv(watcher)
            assert (live["type"], live["transactionId"], live["currentState"]) == ("transaction", "2", {"v": 2})
    finally:
        await node.stop()


async def test_each_node_counts_only_the_broadcasts_it_makes(durable_url: str) -> None:
    node_a, node_b = await Node(durable_url).start(), await Node(durable_url).start()
    metrics_a, metrics_b = ServerMetrics().install(node_a.server), ServerMetrics().install(node_b.server)
    try:
        await node_a.manager.replace(ShareData("doc", current_state={"v": "new"}, functions=[PUT]))
        await node_a.manager.remove("doc")
        for _ in range(100):  # B learns both from the store and announces them as remote
            await node_b.manager.refresh("doc")
            if node_b.manager.get_share_data_by_id("doc") is None:
                break
            await asyncio.sleep(0.01)
        assert node_b.manager.get_share_data_by_id("doc") is None
        metrics_a.refresh()
        metrics_b.refresh()
        assert metrics_a.registry.get_sample_value("safe_fast_broadcasts_total") == 2
        assert metrics_b.registry.get_sample_value("safe_fast_broadcasts_total") == 0
    finally:
        await node_a.stop()
        await node_b.stop()


async def test_a_replacement_by_another_node_reaches_subscribers_of_an_in_process_registry(
    durable_url: str,
) -> None:
    # No shared registry: this node tells its own subscribers, and its
    # next transactions (ids from 1 again) reach them.
    node_a, node_b = await Node(durable_url).start(), await Node(durable_url).start()
    try:
        async with node_b.connect() as on_b:
            for n in range(1, 4):
                await node_b.manager.apply_transaction("doc", {"v": n}, PUT)
            assert (await subscribe(on_b))["lastTransactionId"] == "3"
            await node_a.manager.replace(ShareData("doc", current_state={"v": "new"}, functions=[PUT]))
            await node_b.manager.refresh("doc")
            lifecycle = await recv(on_b)
            assert (lifecycle["type"], lifecycle["event"], lifecycle["currentState"]) == (
                "lifecycle",
                "updated",
                {"v": "new"},
            )
            for n in (1, 2):
                await node_b.manager.apply_transaction("doc", {"v": f"new-{n}"}, PUT)
            frames = [await recv(on_b) for _ in range(2)]
            assert [(f["type"], f["transactionId"]) for f in frames] == [("transaction", "1"), ("transaction", "2")]
    finally:
        await node_a.stop()
        await node_b.stop()


class TcpProxy:
    """127.0.0.1:<port> -> target. ``cut()`` aborts every connection and refuses
    new ones; ``stall()`` holds every byte (a database that stops answering)
    until ``resume()`` lets what it held through."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = True
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.open = True
        self.flowing.set()

    def cut(self) -> None:
        self.open = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        self.flowing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.parametrize("outage", ["cut", "stall"])
async def test_a_database_that_goes_away_mid_run_gets_answers_not_hangs(outage: str) -> None:
    async for url in postgres_database():
        base, _, database = url.rpartition("/")
        host_port = base.rpartition("@")[2]
        proxy = TcpProxy(int(host_port.rpartition(":")[2]))
        await proxy.start()
        proxied = f"{base.rpartition('@')[0]}@127.0.0.1:{proxy.port}/{database}"
        node = await Node(proxied, command_timeout=2.0, connect_timeout=2.0).start()
        try:
            async with node.connect() as ws:
                await subscribe(ws)
                assert (await propose(ws, {"v": 1}, "before"))["transactionId"] == "1"
                assert (await recv(ws))["transactionId"] == "1"

                proxy.cut() if outage == "cut" else proxy.stall()
                for attempt in range(2):
                    result = await propose(ws, {"v": "lost"}, f"down{attempt}")
                    assert result["accepted"] is False and "transactionId" not in result
                    assert "PostgreSQL" in result["error"], result
                # Subscribing still answers, from the cached copy.
                assert (await subscribe(ws))["lastTransactionId"] == "1"

                proxy.resume()
                for _ in range(100):  # bounded: the pool reconnects on its next use
                    result = await propose(ws, {"v": 2}, "after")
                    if result["accepted"]:
                        break
                    await asyncio.sleep(0.1)
                assert result["accepted"], result
        finally:
            await node.stop()
            await proxy.close()
        async with open_store(url) as store:
            stored = await store.load("doc")  # verifies the chain
        assert stored is not None
        data = [r.proposed_data for r in stored.records]
        assert [r.transaction_id for r in stored.records] == [str(i) for i in range(1, len(data) + 1)]
        assert data[0] == {"v": 1} and data[-1] == {"v": 2} and result["transactionId"] == str(len(data))
        if outage == "cut":
            assert len(data) == 2  # nothing reached the database
        else:
            # A commit held in flight may land once the database answers again
            # (its proposer was told accepted: false, the outcome being unknown);
            # it then sits in the history and the next id follows it.
            assert data[1:-1] in ([], [{"v": "lost"}]), data


async def test_a_history_corrupted_under_a_running_server_is_refused_not_served(tmp_path: Path) -> None:
    url = store_url_for("sqlite", tmp_path)
    node = await Node(url).start()
    try:
        async with node.connect() as ws:
            assert (await propose(ws, {"v": 1}, "p1"))["transactionId"] == "1"
            # Another writer appends a record that does not chain.
            connection = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
            try:
                connection.execute(
                    "INSERT INTO safe_fast_transactions VALUES ('doc', 2, 'put', '{}', 1, 0.0, 'null', 'bad', 'bad')"
                )
                connection.execute("UPDATE safe_fast_share_data SET last_id = 2, head_hash = 'bad'")
            finally:
                connection.close()
            async with node.connect() as other:
                error = await subscribe(other)
                assert (error["type"], error["code"]) == ("error", "unknown-share-data")
            result = await propose(ws, {"v": 2}, "p2")
            assert result["accepted"] is False and "not found" in result["error"]
    finally:
        await node.stop()


async def test_the_replay_window_is_the_newest_records_of_the_stored_history(tmp_path: Path) -> None:
    from safe_fast import HistoryReplayStore

    async with open_store(store_url_for("sqlite", tmp_path)) as store:
        manager = ShareDataManager(store=store)
        await manager.register(ShareData("doc", current_state={"v": 0}, functions=[PUT]))
        for n in range(1, 8):
            await manager.apply_transaction("doc", {"v": n}, PUT)
        window = HistoryReplayStore(manager, max_entries_per_share_data=3)
        assert [e.transaction_id for e in window.entries_since("doc", "5")] == ["6", "7"]
        assert window.entries_since("doc", "7") == []
        for cursor in ("4", "8", "0", "05", "x", ""):
            assert window.entries_since("doc", cursor) is None, cursor
        assert window.entries_since("other", "5") is None
        # "0", before the first transaction, while the window still holds the first.
        whole = HistoryReplayStore(manager, max_entries_per_share_data=7)
        assert [e.transaction_id for e in whole.entries_since("doc", "0")] == [str(n) for n in range(1, 8)]
        assert HistoryReplayStore(manager, max_entries_per_share_data=6).entries_since("doc", "0") is None
        server = await attach_realtime_server(
            manager=manager,
            authenticate=lambda request: {"subject": "test"},
            replay_buffer_size=3,
            heartbeat_interval=None,
        )
        try:
            async with ws_connect(server.url, open_timeout=DEADLINE) as ws:
                assert (await subscribe(ws, since="3"))["lastTransactionId"] == "7"
                error = await recv(ws)
                assert (error["type"], error["code"]) == ("error", "replay-cursor-not-found")
                assert (await subscribe(ws, since="5"))["lastTransactionId"] == "7"
                assert [(await recv(ws))["transactionId"] for _ in range(2)] == ["6", "7"]
        finally:
            await server.close()
            manager.close()
