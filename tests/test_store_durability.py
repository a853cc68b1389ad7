"""Acknowledged means durable: SIGKILL a real server process in the middle of
a proposal storm, restart it on the same database, and find every
acknowledged transaction there, a history that verifies, and resumed
clients that continue with consecutive ids. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from safe_fast import open_store
from store_helpers import DEADLINE, NodeProcess

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CLIENTS = 8
KILL_AFTER_ACKS = 600


def propose_message(value: Any, correlation_id: str, function_id: str = "put") -> str:
    return json.dumps(
        {
            "v": 1,
            "type": "propose",
            "shareDataId": "counter",
            "functionId": function_id,
            "proposedData": value,
            "correlationId": correlation_id,
        }
    )


async def storm(url: str, client: int, acks: list[tuple[int, int, Any]], stop: asyncio.Event) -> None:
    """Propose until the connection dies; record (client, transaction id, data) of every acknowledgement."""
    try:
        async with ws_connect(url, open_timeout=DEADLINE) as ws:
            for k in range(100_000):
                if stop.is_set():
                    return
                value = {"client": client, "k": k}
                await ws.send(propose_message(value, f"{client}-{k}"))
                result = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
                assert result["type"] == "proposal-result", result
                assert result["accepted"] is True, result
                acks.append((client, int(result["transactionId"]), value))
    except (ConnectionClosed, OSError):
        return  # the node was killed


async def test_sigkill_mid_storm_loses_no_acknowledged_transaction(durable_url: str, tmp_path: Path) -> None:
    node = NodeProcess(durable_url, tmp_path)
    node.start()
    try:
        acks: list[tuple[int, int, Any]] = []
        stop = asyncio.Event()
        storms = [asyncio.ensure_future(storm(node.url, c, acks, stop)) for c in range(CLIENTS)]
        deadline = time.monotonic() + 60
        while len(acks) < KILL_AFTER_ACKS:
            assert time.monotonic() < deadline, f"only {len(acks)} acknowledgements in 60 s:\n{node.log()}"
            assert not all(task.done() for task in storms), node.log()
            await asyncio.sleep(0.005)
        node.kill()  # SIGKILL, proposals in flight
        await asyncio.wait_for(asyncio.gather(*storms), DEADLINE)
        assert len(acks) >= KILL_AFTER_ACKS

        node.start()
        async with open_store(durable_url) as store:
            stored = await store.load("counter")  # raises if the chain does not verify
        assert stored is not None
        records = stored.records
        assert [r.transaction_id for r in records] == [str(i) for i in range(1, len(records) + 1)]
        for client, transaction_id, value in acks:
            record = records[transaction_id - 1]
            assert record.accepted and record.proposed_data == value, (transaction_id, record)
        assert stored.current_state == records[-1].proposed_data
        last = len(records)

        # Resumed clients: replay from their cursor, then consecutive new ids.
        for client in range(CLIENTS):
            cursor = max((t for c, t, _ in acks if c == client), default=None)
            if cursor is None:
                continue
            async with ws_connect(node.url, open_timeout=DEADLINE) as ws:
                await ws.send(json.dumps({"v": 1, "type": "subscribe", "shareDataId": "counter", "since": str(cursor)}))
                state = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
                assert state["lastTransactionId"] == str(last)
                replayed = [json.loads(await asyncio.wait_for(ws.recv(), DEADLINE)) for _ in range(last - cursor)]
                assert [int(f["transactionId"]) for f in replayed] == list(range(cursor + 1, last + 1))
                assert all(f["replayed"] for f in replayed)
        async with ws_connect(node.url, open_timeout=DEADLINE) as ws:
            for offset in range(1, 4):
                await ws.send(propose_message({"after": offset}, f"after-{offset}"))
                result = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
                assert result["transactionId"] == str(last + offset), result
    finally:
        node.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_example_node_keeps_its_counter_across_a_restart(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from safe_fast import RealtimeClient

    port = free_port()
    command = [sys.executable, "-m", "safe_fast.examples.cluster_node", "--port", str(port),
               "--store", f"sqlite:///{tmp_path / 'app.db'}"]  # fmt: skip

    async def started() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), DEADLINE)
        assert line.startswith(b"serving ws://127.0.0.1:"), line
        return proc

    def stopped(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0

    proc = await started()
    try:
        async with RealtimeClient(f"ws://127.0.0.1:{port}/realtime", request_timeout=DEADLINE) as client:
            result = await client.propose("counter", "increment", {"count": 1})
            assert (result.accepted, result.transaction_id) == (True, "1")
    finally:
        stopped(proc)
    proc = await started()
    try:
        async with RealtimeClient(f"ws://127.0.0.1:{port}/realtime", request_timeout=DEADLINE) as client:
            result = await client.propose("counter", "increment", {"count": 2})
            assert (result.accepted, result.transaction_id) == (True, "2")
            stale = await client.propose("counter", "increment", {"count": 1})
            assert (stale.accepted, stale.transaction_id) == (False, "3")
    finally:
        stopped(proc)


def _safe_fast(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "safe_fast", *args]


async def test_safe_fast_serve_keeps_its_state_in_the_store_url_it_is_given(tmp_path: Path) -> None:
    import signal
    import subprocess
    import urllib.request

    from safe_fast import RealtimeClient

    port = free_port()
    store_url = f"sqlite:///{tmp_path / 'served.db'}"
    command = _safe_fast("serve", "safe_fast.examples.cluster_node:app", "--host", "127.0.0.1", "--port", str(port),
                         "--store-url", store_url, "--no-metrics")  # fmt: skip

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    async def served(count: int) -> None:
        log = open(tmp_path / "serve.log", "ab")
        proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        try:
            deadline = time.monotonic() + DEADLINE
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                await asyncio.sleep(0.05)
            async with RealtimeClient(f"ws://127.0.0.1:{port}/realtime", request_timeout=DEADLINE) as client:
                result = await client.propose("counter", "increment", {"count": count})
                assert (result.accepted, result.transaction_id) == (True, str(count))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(DEADLINE) == 0, (tmp_path / "serve.log").read_text()

    await served(1)
    await served(2)  # the count survived the restart


def test_safe_fast_serve_says_an_unreachable_store_is_unavailable_with_exit_75() -> None:
    # 75 (EX_TEMPFAIL): the service manager starts it again later; 2 would stop it for good.
    import subprocess

    closed = free_port()
    result = subprocess.run(
        _safe_fast("serve", "safe_fast.examples.cluster_node:app", "--port", str(free_port()),
                   "--store-url", f"postgresql://postgres:secret@127.0.0.1:{closed}/app"),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 75, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safe-fast: unavailable: store_url (--store-url): "), lines
    assert "cannot reach PostgreSQL" in lines[0] and "secret" not in lines[0]
