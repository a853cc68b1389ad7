"""A server node over a store, run as a subprocess by the store tests.

Registers two ShareData, ``counter`` (function ``put``: accepts anything,
the proposal becomes the state; function ``bump``: accepts ``{"n": n + 1}``)
and ``doc`` (function ``put``), serves them on 127.0.0.1 (free port), and
writes ``{"port": ...}`` to ``--ready-file`` once it listens. With
``--redis`` the fan-out goes through a RedisChannelRegistry. SIGUSR1 removes
``doc`` (``await manager.remove("doc")``); SIGTERM stops the node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any

from safe_fast import (
    RedisChannelRegistry,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
    open_store,
)


def share_data() -> list[ShareData]:
    put = ShareFunction("put", lambda state, proposed: True)
    bump = ShareFunction("bump", lambda state, proposed: proposed == {"n": state["n"] + 1})
    return [
        ShareData("counter", current_state={"n": 0}, functions=[put, bump]),
        ShareData("doc", current_state={"text": ""}, functions=[put]),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--redis")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async with open_store(args.store) as store:
        manager = ShareDataManager(store=store)
        for one in share_data():
            await manager.register(one)
        registry: Any = None
        redis_client: Any = None
        if args.redis:
            import redis.asyncio as redis

            redis_client = redis.Redis.from_url(args.redis)
            registry = RedisChannelRegistry(redis_client)
        server = await attach_realtime_server(
            manager=manager,
            authenticate=lambda request: {"subject": "test"},
            resolve_function=create_id_based_function_resolver(manager),
            registry=registry,
            heartbeat_interval=None,
        )
        removals: set[asyncio.Task[Any]] = set()

        def remove_doc() -> None:
            task = asyncio.ensure_future(manager.remove("doc"))
            removals.add(task)
            task.add_done_callback(removals.discard)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, remove_doc)
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": server.port, "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
        await stop.wait()
        await server.close()
        if registry is not None:
            await registry.close()
            await redis_client.aclose()
        manager.close()


if __name__ == "__main__":
    asyncio.run(main())
