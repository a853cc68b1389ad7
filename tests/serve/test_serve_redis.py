"""``safe-fast serve`` with Redis: readiness follows Redis; several workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("redis.asyncio", reason="the redis extra is not installed")

from serve_helpers import DEADLINE, Serve, eventually, http_get, metrics, proposal, recv_type, subscribed, wire  # noqa: E402
from test_scaleout import REDIS_SERVER, RedisProcess  # noqa: E402

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_readyz_is_503_while_redis_is_down_and_200_again_after(redis: RedisProcess, tmp_path: Path) -> None:
    serve = Serve("safe_fast.examples.counter:app", "--redis-url", redis.url, log=tmp_path / "serve.log")
    await asyncio.to_thread(serve.start)
    try:
        assert http_get(serve.http("/readyz"))[0] == 200
        listening, _ = await subscribed(serve.url)  # the registry holds a pub/sub connection
        port = redis.port
        await asyncio.to_thread(redis.stop)
        status, body = await eventually(
            lambda: (lambda answer: answer if answer[0] == 503 else None)(http_get(serve.http("/readyz"))), "readyz 503"
        )
        assert "redis" in json.loads(body)["reasons"]
        assert http_get(serve.http("/healthz"))[0] == 200  # alive all the same
        await eventually(lambda: metrics(serve)["safe_fast_redis_errors_total"] >= 1, "the lost pub/sub counted")
        listening.transport.abort()
        await asyncio.to_thread(redis.start, port)
        await eventually(lambda: http_get(serve.http("/readyz"))[0] == 200, "readyz 200 again")
        # and it serves: a broadcast through the restarted Redis reaches a subscriber
        ws, _ = await subscribed(serve.url)
        await ws.send(proposal("c", {"count": 1}))
        assert (await recv_type(ws, "transaction"))["transactionId"] == "1"
        await ws.close()
    finally:
        await asyncio.to_thread(serve.stop)


def worker_pids(log: Path) -> list[int]:
    """The workers the supervisor started, in order."""
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", log.read_text())]


def serving_pids(log: Path) -> set[int]:
    """The workers that listen."""
    return {int(pid) for pid in re.findall(r"safe-fast serving .* \(pid (\d+),", log.read_text())}


async def test_two_workers_share_the_port_and_every_broadcast_and_a_dead_one_is_restarted(
    redis: RedisProcess, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    # A shutdown that takes a second: the signal the supervisor forwards
    # arrives while the workers are still shutting down.
    serve = Serve("serve_apps:workers", "--workers", "2", "--redis-url", redis.url, "--shutdown-delay", "1", log=log)
    await asyncio.to_thread(serve.start)
    clients: list[Any] = []
    try:
        await eventually(lambda: len(serving_pids(log)) == 2, "two workers listening")
        # Connect until both workers hold clients (the kernel picks the worker).
        seen: dict[int, list[Any]] = {}
        for _ in range(40):
            ws, _ = await subscribed(serve.url, "counter")
            await ws.send(wire(type="subscribe", shareDataId="worker"))
            pid = (await recv_type(ws, "state"))["currentState"]["pid"]
            seen.setdefault(pid, []).append(ws)
            clients.append(ws)
            if len(seen) == 2 and len(clients) >= 4:
                break
        assert set(seen) == set(worker_pids(log)), "connections reached both workers"

        # One client proposes; every client on every worker gets the transaction.
        proposer = clients[0]
        await proposer.send(proposal("w", {"count": 1}))
        for ws in clients:
            frame = await recv_type(ws, "transaction")
            assert frame["currentState"] == {"count": 1}
        # /metrics answers for both workers (whichever one the scrape reaches)
        await eventually(lambda: metrics(serve)["safe_fast_connections"] == len(clients), "connections of both workers")

        # A worker that dies is restarted.
        victim = next(iter(seen))
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: len(serving_pids(log)) == 3, "a third worker listening")
        assert "exited with status -9" in log.read_text()
        for ws in seen[victim]:
            ws.transport.abort()
        await eventually(lambda: http_get(serve.http("/readyz"))[0] == 200, "ready")
    finally:
        for ws in clients:
            ws.transport.abort()
        # As systemd's default KillMode=control-group does: SIGTERM to the
        # supervisor and to every worker; the supervisor forwards one more.
        serve.signal(signal.SIGTERM)
        for pid in serving_pids(log):
            with contextlib.suppress(ProcessLookupError):  # the one killed above
                os.kill(pid, signal.SIGTERM)
        status = await asyncio.to_thread(serve.wait)
        await asyncio.to_thread(serve.stop)
    assert status == 0, log.read_text()
    assert "already shutting down" in log.read_text()
    for pid in worker_pids(log):
        await eventually(lambda: not _alive(pid), f"worker {pid} gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_restarted_worker_that_fails_on_its_way_up_is_restarted_again(
    redis: RedisProcess, tmp_path: Path
) -> None:
    # Status 2 stops the service only from a worker's first start: a
    # restarted worker's was met after its settings served.
    log = tmp_path / "serve.log"
    starts = tmp_path / "starts"
    serve = Serve(
        "serve_apps:fails_its_third_start", "--workers", "2", "--redis-url", redis.url,
        env={"SAFE_FAST_TEST_STARTS": str(starts)}, log=log,
    )  # fmt: skip
    await asyncio.to_thread(serve.start)
    try:
        await eventually(lambda: len(serving_pids(log)) == 2, "two workers listening")
        os.kill(next(iter(serving_pids(log))), signal.SIGKILL)
        await eventually(lambda: len(serving_pids(log)) == 3, "a worker listening again", timeout=DEADLINE * 2)
        text = log.read_text()
        assert "exited with status 2" in text and "found a bad setting" not in text, text
        assert serve.proc is not None and serve.proc.poll() is None
    finally:
        serve.signal(signal.SIGTERM)
        status = await asyncio.to_thread(serve.wait)
        await asyncio.to_thread(serve.stop)
    assert status == 0, log.read_text()
