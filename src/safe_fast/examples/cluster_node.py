"""One node of a cluster that shares its ShareData through a store.

Every node runs the same code (the share functions are code); the store
holds the state and the history, Redis carries the live fan-out:

    python -m safe_fast.examples.cluster_node --port 8001 \\
        --store postgresql://postgres@127.0.0.1:5432/app --redis redis://127.0.0.1:6379/0
    python -m safe_fast.examples.cluster_node --port 8002 \\
        --store postgresql://postgres@127.0.0.1:5432/app --redis redis://127.0.0.1:6379/0

A single durable node needs neither PostgreSQL nor Redis:

    python -m safe_fast.examples.cluster_node --port 8001 --store sqlite:///app.db

``app`` is the same application for ``safe-fast serve`` (which adds health,
metrics, workers and a graceful shutdown):

    safe-fast serve safe_fast.examples.cluster_node:app --store-url sqlite:///app.db

The store URL may also come from the environment variable ``SAFE_FAST_STORE``.
Stop a node with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any, Optional

from .. import (
    RedisChannelRegistry,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
    open_store,
    use_uvloop,
)


def increment(current: Any, proposed: Any) -> bool:
    """Accept only an increment by exactly one."""
    return isinstance(proposed, dict) and proposed.get("count") == current.get("count", 0) + 1


def share_data() -> list[ShareData]:
    """The ShareData definitions: the same on every node."""
    return [ShareData("counter", current_state={"count": 0}, functions=[ShareFunction("increment", increment)])]


async def app(manager: ShareDataManager) -> dict[str, Any]:
    """Register the ShareData (created by the first node, loaded by the others); the server's hooks."""
    for one in share_data():
        await manager.register(one)
    return {
        "authenticate": lambda request: {"subject": "anonymous"},  # replace with real authentication
        "resolve_function": create_id_based_function_resolver(manager),
    }


async def run(store_url: str, redis_url: Optional[str], host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async with open_store(store_url) as store:
        manager = ShareDataManager(store=store)
        hooks = await app(manager)

        registry: Any = None
        redis_client: Any = None
        if redis_url:
            import redis.asyncio as redis

            redis_client = redis.Redis.from_url(redis_url)
            registry = RedisChannelRegistry(redis_client)

        server = await attach_realtime_server(
            manager=manager,
            registry=registry,  # None: fan-out within this process only
            host=host,
            port=port,
            **hooks,
        )
        print(f"serving {server.url} over {store_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()
            if registry is not None:
                await registry.close()
                await redis_client.aclose()
            manager.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.environ.get("SAFE_FAST_STORE", "sqlite:///safe_fast.db"))
    parser.add_argument("--redis", default=os.environ.get("SAFE_FAST_REDIS"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    use_uvloop()
    asyncio.run(run(args.store, args.redis, args.host, args.port))


if __name__ == "__main__":
    main()
