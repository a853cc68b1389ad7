"""What an idle connection keeps: no ``__dict__``, no copy of the handshake, and the request still whole for the application.

The bytes themselves are measured by ``benchmarks/memory_per_connection.py``;
these tests pin the layout that figure depends on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from safe_fast import UpgradeRequest
from server_helpers import DEADLINE, RawClient, ServerFactory


async def open_subscribed(server: Any) -> RawClient:
    client = await RawClient.open(server.port)
    await client.subscribe("doc")
    return client


async def test_a_connection_has_no_instance_dict(server_factory: ServerFactory) -> None:
    server = await server_factory()
    client = await open_subscribed(server)
    try:
        (connection,) = server.connections
        assert not hasattr(connection, "__dict__")
        assert connection.subscriptions == {"doc"}
    finally:
        client.transport.abort()


async def test_picows_keeps_no_handshake_headers_but_authenticate_got_them_whole(server_factory: ServerFactory) -> None:
    seen: list[UpgradeRequest] = []

    def authenticate(request: UpgradeRequest) -> dict[str, Any]:
        seen.append(request)
        return {"request": request}

    server = await server_factory(authenticate=authenticate)
    client = await open_subscribed(server)
    try:
        (connection,) = server.connections
        transport = connection.control.transport  # picows' WSTransport
        assert len(transport.request.headers) == 0 and transport.request.path == b""
        assert len(transport.response.headers) == 0
        # What the application was given (and kept, here in its context) is untouched.
        request = connection.context["request"]
        assert request is seen[0]
        assert request.headers["upgrade"].lower() == "websocket"
        assert request.headers["sec-websocket-version"] == "13"
        assert request.path == "/realtime"
        # The connection still works both ways: ping in, pong out; then a clean close.
        pong = await client.request({"v": 1, "type": "ping", "correlationId": "c1"})
        assert pong == {"v": 1, "type": "pong", "correlationId": "c1"}
        closing = asyncio.ensure_future(server.close())
        code, _reason = await client.close_frame()
        assert code == 1001
        await client.finish_close()
        await asyncio.wait_for(closing, DEADLINE)
    finally:
        client.transport.abort()
