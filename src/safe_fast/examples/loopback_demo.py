"""A loopback walk through the whole protocol surface.

Boots a server on an ephemeral port of 127.0.0.1 with the in-memory defaults,
connects a client, and walks subscribe -> live update -> proposal (accepted
and rejected) -> ping -> lifecycle updated -> lifecycle removed, printing
each step.
Exits 0 when every step saw what it expected, 1 otherwise.

    python -m safe_fast.examples.loopback_demo
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from .. import (
    RealtimeClient,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    core_backend,
    create_id_based_function_resolver,
    use_uvloop,
)

STEP_TIMEOUT = 5.0


def step(text: str) -> None:
    print(f"  -> {text}", flush=True)


async def next_frame(queue: "asyncio.Queue[Any]") -> Any:
    return await asyncio.wait_for(queue.get(), STEP_TIMEOUT)


def counter_rule(current: Any, proposed: Any) -> bool:
    """Accept only an increment by exactly one."""
    return isinstance(proposed, dict) and proposed.get("count") == current.get("count", 0) + 1


async def demo() -> None:
    manager = ShareDataManager()
    manager.add_share_data(
        ShareData("counter", current_state={"count": 0}, functions=[ShareFunction("increment", counter_rule)])
    )
    server = await attach_realtime_server(
        manager=manager,
        authenticate=lambda request: {"subject": request.query.get("user", "demo")},
        host="127.0.0.1",
        port=0,
        resolve_function=create_id_based_function_resolver(manager),
    )
    print(f"safe_fast loopback demo: server at {server.url} (core: {core_backend()})")
    events: list[str] = []
    server.on("connection:opened", lambda e: events.append("opened"))
    server.on("connection:closed", lambda e: events.append(f"closed {e.code}"))
    async with server:
        client = RealtimeClient(server.url + "?user=alice")
        async with client:
            await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
            print("1. connected")

            frames: asyncio.Queue[Any] = asyncio.Queue()
            sub = client.subscribe("counter")
            for kind in ("state", "transaction", "lifecycle"):
                sub.on(kind, frames.put_nowait)
            state = await next_frame(frames)
            assert state.type == "state" and state.current_state == {"count": 0}, state
            print(f"2. subscribed: state {state.current_state}, cursor {state.last_transaction_id}")

            counter = manager.get_share_data_by_id("counter")
            assert counter is not None
            outcome = await manager.apply_transaction("counter", {"count": 1}, counter.functions[0])
            live = await next_frame(frames)
            assert live.type == "transaction" and live.transaction_id == outcome.transaction_id, live
            print(f"3. live update from the server side: transaction {live.transaction_id} -> {live.current_state}")

            result = await client.propose("counter", "increment", {"count": 2})
            live = await next_frame(frames)
            assert result.accepted and live.transaction_id == result.transaction_id == "2", (result, live)
            print(f"4. proposal accepted as transaction {result.transaction_id}; broadcast {live.current_state}")

            rejected = await client.propose("counter", "increment", {"count": 7})
            live = await next_frame(frames)
            assert not rejected.accepted and live.accepted is False, (rejected, live)
            print(f"5. proposal rejected by the rule: transaction {rejected.transaction_id} (accepted=false), cursor {sub.last_transaction_id}")

            rtt = await client.ping()
            print(f"6. ping round trip: {rtt * 1000:.2f} ms")

            manager.update_share_data(
                ShareData("counter", current_state={"count": 100}, functions=[ShareFunction("increment", counter_rule)])
            )
            updated = await next_frame(frames)
            assert updated.type == "lifecycle" and updated.event == "updated", updated
            print(f"7. lifecycle updated: {updated.current_state}")

            manager.remove_share_data_by_id("counter")
            removed = await next_frame(frames)
            assert removed.type == "lifecycle" and removed.event == "removed", removed
            print(f"8. lifecycle removed; subscription detached: {sub.is_detached}")
        print("9. client closed")
    print(f"10. server closed (server events: {', '.join(events)})")
    print("demo complete")


def main() -> int:
    use_uvloop()
    try:
        asyncio.run(asyncio.wait_for(demo(), 60))
    except Exception as exc:  # the demo's verdict, with what went wrong
        print(f"demo FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
