#!/usr/bin/env python3
"""Proposals through a real server over each ShareData store, and fan-out with one attached.

    PYTHONPATH=src python benchmarks/store_bench.py             # the whole grid, ~3 minutes
    PYTHONPATH=src python benchmarks/store_bench.py --quick     # 1 s cells
    PYTHONPATH=src python benchmarks/store_bench.py --stores memory,sqlite

For each store (``memory`` = ``ShareDataManager()`` without a store, the
baseline; ``sqlite`` = a file in a temporary directory; ``postgresql`` = a
database created for the run on ``SAFE_FAST_BENCH_POSTGRES``, default
``postgresql://postgres@127.0.0.1:5432/test``, dropped afterwards) a server
process is started (uvloop, 256 ShareData ``b0``..``b255`` whose function
``put`` accepts everything), then, from this process:

* **proposals**: P concurrent proposers (P = 1, 16, 256), each its own
  ``RealtimeClient`` connection, proposer i proposing to id ``b(i mod K)``
  (K = 1 or 256) one proposal after the other for ``--seconds``: accepted
  proposals per second, and the p50 / p99 of the ``propose`` round trip;
* **fan-out**: 1024 subscribers (raw WebSocket connections that count
  frames by their headers, nothing decoded) spread over 16 ids, 64 per id,
  and 64 proposers, 4 per id, proposing as fast as their round trips allow:
  transaction frames delivered per second, and per accepted proposal (each
  transaction reaches the 64 subscribers of its id). Twice: unpaced (the
  stores' commit rates differ, so the deliveries do too), and paced at
  ``--fanout-rate`` proposals/s in all (default 400), a rate every store
  sustains: there the deliveries/s of every store should match the memory
  row, since the store is not on the broadcast path.

The machine is shared by the server and the clients (2 cores here), so the
absolute numbers are lower bounds; the ratios to the memory row are the
point.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve()
IDS = 256
POSTGRES = os.environ.get("SAFE_FAST_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


# -- the server process ------------------------------------------------------------------


async def serve(store_url: str) -> None:
    from safe_fast import (
        ShareData,
        ShareDataManager,
        ShareFunction,
        attach_realtime_server,
        create_id_based_function_resolver,
        open_store,
    )

    put = ShareFunction("put", lambda state, proposed: True)
    store = None if store_url == "none" else open_store(store_url)
    if store is not None:
        await store.open()
    manager = ShareDataManager(store=store)
    for index in range(IDS):
        await manager.register(ShareData(f"b{index}", current_state={"n": 0}, functions=[put]))
    server = await attach_realtime_server(
        manager=manager,
        authenticate=lambda request: {"subject": "bench"},
        resolve_function=create_id_based_function_resolver(manager),
        heartbeat_interval=None,
        max_buffered_bytes=64 * 1024 * 1024,
    )
    print(json.dumps({"port": server.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.close()
    if store is not None:
        await store.close()


# -- proposers --------------------------------------------------------------------------


async def proposals(url: str, proposers: int, ids: int, seconds: float, rate: float = 0.0) -> dict[str, float]:
    """``rate`` > 0: each proposer proposes at most ``rate / proposers`` times per second."""
    from safe_fast import RealtimeClient

    clients = [RealtimeClient(url, request_timeout=30.0) for _ in range(proposers)]
    await asyncio.gather(*(client.connect() for client in clients))
    rtts: list[float] = []
    accepted = 0
    stop_at = 0.0

    async def run(index: int, client: Any) -> None:
        nonlocal accepted
        share_data_id = f"b{index % ids}"
        interval = proposers / rate if rate else 0.0
        next_at = time.perf_counter() + interval * index / proposers
        k = 0
        while time.perf_counter() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            started = time.perf_counter()
            result = await client.propose(share_data_id, "put", {"by": index, "k": k})
            rtts.append(time.perf_counter() - started)
            accepted += bool(result.accepted)
            k += 1

    # A short warm-up, then the measured window.
    stop_at = time.perf_counter() + min(0.5, seconds / 4)
    await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    warm_up = accepted
    rtts.clear()
    accepted = 0
    begin = time.perf_counter()
    stop_at = begin + seconds
    await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - begin
    await asyncio.gather(*(client.close() for client in clients))
    rtts.sort()
    return {
        "total": warm_up + accepted,
        "per_s": accepted / elapsed,
        "p50_ms": 1000 * rtts[len(rtts) // 2],
        "p99_ms": 1000 * rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
    }


# -- counting subscribers ----------------------------------------------------------------


class CountingSubscriber(asyncio.Protocol):
    """A raw WebSocket client: handshake, one subscribe, then count frames by their headers."""

    def __init__(self, share_data_id: str) -> None:
        self.share_data_id = share_data_id
        self.buffer = b""
        self.upgraded = False
        self.frames = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                "GET /realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.upgraded = True
            self.buffer = rest
            payload = json.dumps({"v": 1, "type": "subscribe", "shareDataId": self.share_data_id}).encode()
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.transport.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        buffer = self.buffer
        offset = 0
        while len(buffer) - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if len(buffer) - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                start = offset + 4
            elif length == 127:
                if len(buffer) - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                start = offset + 10
            if len(buffer) - start < length:
                break
            offset = start + length
            self.frames += 1
            if not self.ready.done():
                self.ready.set_result(None)  # the state frame
        self.buffer = buffer[offset:]


async def fanout(
    port: int, url: str, seconds: float, rate: float = 0.0, subscribers: int = 1024, ids: int = 16, proposers: int = 64
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    subs = []
    for index in range(subscribers):
        _, protocol = await loop.create_connection(lambda i=index: CountingSubscriber(f"b{i % ids}"), "127.0.0.1", port)
        subs.append(protocol)
    await asyncio.wait_for(asyncio.gather(*(s.ready for s in subs)), 30)
    before = sum(s.frames for s in subs)
    begin = time.perf_counter()
    result = await proposals(url, proposers, ids, seconds, rate)
    # Every accepted transaction reaches the subscribers of its id: wait for the last frame.
    expected = result["total"] * (subscribers // ids)
    for _ in range(3000):
        if sum(s.frames for s in subs) - before >= expected:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - begin
    delivered = sum(s.frames for s in subs) - before
    for s in subs:
        s.transport.close()
    return {
        "deliveries_per_s": delivered / elapsed,
        "proposals_per_s": result["total"] / elapsed,
        "per_proposal": delivered / result["total"],
    }


# -- orchestration -----------------------------------------------------------------------


async def with_server(store_url: str, work: Any) -> Any:
    process = subprocess.Popen(
        [sys.executable, str(BENCH), "serve", "--store", store_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, process.stdout.readline), 60)
        port = json.loads(line)["port"]
        return await work(port, f"ws://127.0.0.1:{port}/realtime")
    finally:
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def postgres_database() -> tuple[str, Any]:
    import asyncpg

    admin = await asyncpg.connect(POSTGRES, timeout=5)
    name = f"safe_fast_bench_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')

    async def drop() -> None:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    return f"{POSTGRES.rpartition('/')[0]}/{name}", drop


async def amain(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, Any]] = []
    fanouts: dict[str, dict[str, float]] = {}
    for store in args.stores:
        drop = None
        tmp = tempfile.TemporaryDirectory()
        if store == "memory":
            url = "none"
        elif store == "sqlite":
            url = f"sqlite:///{tmp.name}/bench.db"
        else:
            try:
                url, drop = await postgres_database()
            except Exception as exc:
                print(f"skipping postgresql: {exc!r}", file=sys.stderr)
                continue
        try:
            for proposers in (1, 16, 256):
                for ids in (1, 256):
                    result = await with_server(url, lambda port, ws, p=proposers, k=ids: proposals(ws, p, k, args.seconds))
                    rows.append((store, f"{proposers}x{ids}", result))
                    print(store, proposers, ids, {k: round(v, 2) for k, v in result.items()}, file=sys.stderr)
            fanouts[store] = await with_server(url, lambda port, ws: fanout(port, ws, args.seconds))
            fanouts[f"{store}, paced"] = await with_server(
                url, lambda port, ws: fanout(port, ws, args.seconds, args.fanout_rate)
            )
            print(store, "fan-out", fanouts[store], fanouts[f"{store}, paced"], file=sys.stderr)
        finally:
            if drop is not None:
                await drop()
            tmp.cleanup()
    print(table(rows, fanouts))


def table(rows: list[tuple[str, str, Any]], fanouts: dict[str, dict[str, float]]) -> str:
    memory = {cell: result for store, cell, result in rows if store == "memory"}
    lines = [
        "| store | proposers x ids | accepted/s | vs memory | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for store, cell, result in rows:
        base = memory.get(cell)
        ratio = f"{result['per_s'] / base['per_s']:.2f}" if base else "-"
        lines.append(
            f"| {store} | {cell} | {result['per_s']:,.0f} | {ratio} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} |"
        )
    lines += ["", "| store | fan-out deliveries/s | vs memory | proposals/s | deliveries per proposal |", "|---|---:|---:|---:|---:|"]
    for store, result in fanouts.items():
        base = fanouts.get("memory, paced" if store.endswith("paced") else "memory")
        ratio = f"{result['deliveries_per_s'] / base['deliveries_per_s']:.2f}" if base else "-"
        lines.append(
            f"| {store} | {result['deliveries_per_s']:,.0f} | {ratio} | {result['proposals_per_s']:,.0f}"
            f" | {result['per_proposal']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--store", required=True)
    parser.add_argument("--stores", default="memory,sqlite,postgresql", type=lambda s: s.split(","))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fanout-rate", type=float, default=400.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.command == "serve":
        asyncio.run(serve(args.store))
        return
    if args.quick:
        args.seconds = 1.0
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
