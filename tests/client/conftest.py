"""Fixtures of the client tests (helpers live in ``client_helpers.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from client_helpers import ScriptedServer


@pytest.fixture
async def scripted_server():
    """A factory of started :class:`ScriptedServer` objects, closed at teardown."""
    servers: list[ScriptedServer] = []

    async def make(port: int = 0) -> ScriptedServer:
        server = await ScriptedServer().start(port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def clients():
    """Registers clients to close at teardown, whatever the test did."""
    made: list[Any] = []
    yield made.append
    for client in made:
        await client.close()
