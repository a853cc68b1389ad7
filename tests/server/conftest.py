"""Fixtures of the server tests (helpers live in ``server_helpers.py``).

* ``manager``: a :class:`ShareDataManager` holding one ShareData ``"doc"``
  (state ``{"count": 0}``) with the functions ``"inc"`` (always accepts) and
  ``"never"`` (always rejects).
* ``server_factory``: ``await server_factory(**overrides)`` starts
  :func:`attach_realtime_server` on 127.0.0.1 (ephemeral port) with the
  ``manager`` fixture, an ``authenticate`` that admits everybody and the
  id-based resolver on that manager; keyword arguments override any of them.
  Every server it started is closed at teardown.
* ``start_server``: ``await start_server(manager, **options)`` starts
  :func:`attach_realtime_server` on 127.0.0.1 for the robustness tests: an
  ``authenticate`` that admits everybody, no heartbeat, a 1 s close timeout
  unless the options say otherwise; every server it started is closed.
* ``raw_clients``: ``await raw_clients(port, **options)`` opens a
  :class:`RawClient` (options as :meth:`RawClient.open`; its waits are bound
  by the test module's ``DEADLINE`` if it has one); every one still open is
  aborted at teardown.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from safe_fast import RealtimeServer, ShareDataManager, attach_realtime_server, create_id_based_function_resolver
from server_helpers import DEADLINE, RawClient, RawClientFactory, ServerFactory, allow_everybody, make_doc


@pytest.fixture
def manager() -> ShareDataManager:
    manager = ShareDataManager()
    manager.add_share_data(make_doc())
    return manager


@pytest.fixture
async def server_factory(manager: ShareDataManager) -> AsyncIterator[ServerFactory]:
    servers: list[RealtimeServer] = []

    async def start(**overrides: Any) -> RealtimeServer:
        options: dict[str, Any] = {
            "manager": manager,
            "authenticate": allow_everybody,
            "host": "127.0.0.1",
            "port": 0,
        }
        options.update(overrides)
        if "resolve_function" not in overrides:
            options["resolve_function"] = create_id_based_function_resolver(options["manager"])
        server = await attach_realtime_server(**options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.close(), DEADLINE * 2)


@pytest.fixture
async def raw_clients(request: pytest.FixtureRequest) -> AsyncIterator[RawClientFactory]:
    made: list[RawClient] = []
    # A module with heavier tests sets its own, longer DEADLINE; its clients wait that long.
    deadline = getattr(request.module, "DEADLINE", DEADLINE)

    async def open_client(port: int, **options: Any) -> RawClient:
        options.setdefault("deadline", deadline)
        client = await RawClient.open(port, **options)
        made.append(client)
        return client

    yield open_client
    for client in made:
        if client.transport is not None and not client.transport.is_closing():
            client.transport.abort()
    await asyncio.sleep(0)  # let the aborted transports call connection_lost


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[RealtimeServer]]]:
    """``await start_server(manager, **options)``; every server is closed afterwards."""
    started: list[RealtimeServer] = []

    async def start(manager: ShareDataManager, **options: Any) -> RealtimeServer:
        options.setdefault("authenticate", lambda request: {"subject": "tester"})
        options.setdefault("heartbeat_interval", None)
        options.setdefault("close_timeout", 1.0)
        if "sock" not in options:
            options.setdefault("host", "127.0.0.1")
            options.setdefault("port", 0)
        server = await attach_realtime_server(manager=manager, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        await asyncio.wait_for(server.close(), 15)
