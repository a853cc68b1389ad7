"""Two real server processes on one PostgreSQL and one Redis.

300 proposals sent concurrently through each node to one id: the ids are
exactly 1..600, every subscriber (a RealtimeClient, subscribed to the empty
history) on both nodes receives those 600 transactions once each, in order
(the registry drops what is out of order and the client's gap detection
fetches it by replay, from "before the first" when it is the first ones
that are missing), and both nodes end on the same state; a snapshot on one node holds what the other just acknowledged; a
removal on one node reaches the other node's subscribers and manager.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from safe_fast import RealtimeClient
from store_helpers import DEADLINE, NodeProcess, postgres_database
from test_scaleout import REDIS_SERVER, RedisProcess

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PER_NODE = 300
PROPOSERS_PER_NODE = 10
SUBSCRIBERS_PER_NODE = 2


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))


async def subscribe(ws: ClientConnection, share_data_id: str = "counter") -> dict[str, Any]:
    await ws.send(json.dumps({"v": 1, "type": "subscribe", "shareDataId": share_data_id}))
    return await recv(ws)


async def propose_many(url: str, node: str, proposer: int, count: int) -> list[dict[str, Any]]:
    """Send ``count`` proposals at once on one connection; their results."""
    async with ws_connect(url, open_timeout=DEADLINE) as ws:
        for k in range(count):
            await ws.send(
                json.dumps(
                    {
                        "v": 1,
                        "type": "propose",
                        "shareDataId": "counter",
                        "functionId": "put",
                        "proposedData": {"node": node, "proposer": proposer, "k": k},
                        "correlationId": f"{node}-{proposer}-{k}",
                    }
                )
            )
        results = []
        while len(results) < count:
            frame = await recv(ws)
            if frame["type"] == "proposal-result":
                results.append(frame)
        return results


async def subscribed_client(url: str) -> tuple[RealtimeClient, list[Any]]:
    """A RealtimeClient subscribed to ``counter``; the transactions its application sees."""
    client = RealtimeClient(url, request_timeout=DEADLINE)
    await client.connect()
    subscription = client.subscribe("counter")
    states: list[Any] = []
    seen: list[Any] = []
    subscription.on("state", states.append)
    subscription.on("transaction", seen.append)
    deadline = time.monotonic() + DEADLINE
    while not states:
        assert time.monotonic() < deadline, "no state frame"
        await asyncio.sleep(0.01)
    assert states[0].last_transaction_id is None  # the empty history: every id comes after it
    return client, seen


async def test_two_nodes_one_sequence_one_order(tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (CI installs it: apt-get install redis-server)")
    import redis.asyncio as redis_asyncio

    async for url in postgres_database():
        redis_server = RedisProcess(tmp_path)
        redis_server.start()
        nodes = [
            NodeProcess(url, tmp_path, redis_url=redis_server.url, name="a"),
            NodeProcess(url, tmp_path, redis_url=redis_server.url, name="b"),
        ]
        redis_client = redis_asyncio.Redis.from_url(redis_server.url)
        try:
            for node in nodes:
                node.start()
            node_a, node_b = nodes
            subscribers = []
            received: list[list[Any]] = []
            for node in nodes:
                for _ in range(SUBSCRIBERS_PER_NODE):
                    client, seen = await subscribed_client(node.url)
                    subscribers.append(client)
                    received.append(seen)
            # Both nodes subscribed in Redis before anything is proposed.
            deadline = time.monotonic() + DEADLINE
            while (await redis_client.pubsub_numsub("safe:rt:counter"))[0][1] < 2:
                assert time.monotonic() < deadline, "the nodes did not SUBSCRIBE in Redis"
                await asyncio.sleep(0.02)

            batches = await asyncio.gather(
                *(
                    propose_many(node.url, name, proposer, PER_NODE // PROPOSERS_PER_NODE)
                    for node, name in ((node_a, "a"), (node_b, "b"))
                    for proposer in range(PROPOSERS_PER_NODE)
                )
            )
            results = [result for batch in batches for result in batch]
            assert all(result["accepted"] for result in results), [r.get("error") for r in results if not r["accepted"]][:3]
            expected = list(range(1, 2 * PER_NODE + 1))
            assert sorted(int(result["transactionId"]) for result in results) == expected

            deadline = time.monotonic() + 60
            while any(len(seen) < 2 * PER_NODE for seen in received):
                assert time.monotonic() < deadline, [
                    sorted(set(expected) - {int(f.transaction_id) for f in seen}) for seen in received
                ]
                await asyncio.sleep(0.02)
            sequences = [[frame.transaction_id for frame in frames] for frames in received]
            for sequence in sequences:
                assert sorted(map(int, sequence)) == expected, "a transaction missing or twice"
                assert sequence == sequences[0], "subscribers saw different orders"
                assert [int(x) for x in sequence] == expected, "not in numeric order"
            by_id = {frame.transaction_id: frame.current_state for frame in received[0]}
            final_state = by_id[str(expected[-1])]
            assert final_state is not None
            for node in nodes:
                async with ws_connect(node.url, open_timeout=DEADLINE) as ws:
                    state = await subscribe(ws)
                    assert (state["lastTransactionId"], state["currentState"]) == (str(expected[-1]), final_state)

            # Read your cluster's writes: acknowledged on A, in B's next snapshot.
            for round_ in range(10):
                (result,) = await propose_many(node_a.url, "a", 100 + round_, 1)
                async with ws_connect(node_b.url, open_timeout=DEADLINE) as ws:
                    state = await subscribe(ws)
                    assert int(state["lastTransactionId"]) >= int(result["transactionId"])

            # Removal on A reaches B's subscribers and B's manager.
            async with ws_connect(node_b.url, open_timeout=DEADLINE) as on_b:
                assert (await subscribe(on_b, "doc"))["type"] == "state"
                node_a.signal(signal.SIGUSR1)
                frame = await recv(on_b)
                assert (frame["type"], frame["shareDataId"], frame["event"]) == ("lifecycle", "doc", "removed")
            deadline = time.monotonic() + DEADLINE
            while True:
                async with ws_connect(node_b.url, open_timeout=DEADLINE) as ws:
                    answer = await subscribe(ws, "doc")
                if answer["type"] == "error":
                    assert answer["code"] == "unknown-share-data"
                    break
                assert time.monotonic() < deadline, "node B still serves the removed ShareData"
                await asyncio.sleep(0.05)
            for client in subscribers:
                await client.close()
        finally:
            await redis_client.aclose()
            for node in nodes:
                node.stop()
            redis_server.stop()
