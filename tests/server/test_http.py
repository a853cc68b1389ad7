"""Plain HTTP on the WebSocket port: routes, 404, 426 and what picows writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safe_fast.server.http import HttpResponse

from server_helpers import DEADLINE, ServerFactory, connect, recv_json, wire


async def http_exchange(port: int, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send one raw request; read until the server closes. Returns (status line, headers, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE)
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(-1), DEADLINE)  # the server closes after answering
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def upgrade(path: str = "/realtime", version: str = "13") -> bytes:
    return get(
        path,
        extra="Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n",
    )


async def test_a_route_answers_get_and_sees_the_query(server_factory: ServerFactory) -> None:
    seen: list[Any] = []

    def hello(request: Any) -> HttpResponse:
        seen.append(request)
        return HttpResponse(200, b'{"ok": true}', "application/json", {"X-Probe": "1"})

    server = await server_factory()
    server.add_http_route("/hello", hello)
    status, headers, body = await http_exchange(server.port, get("/hello?x=1"))
    assert status == b"HTTP/1.1 200 OK"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body)) and body == b'{"ok": true}'
    assert headers["x-probe"] == "1" and headers["connection"] == "close"
    assert seen[0].query == {"x": "1"} and seen[0].route == "/hello"
    # The WebSocket endpoint is unaffected.
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="p"))
        assert (await recv_json(ws))["type"] == "pong"


async def test_empty_body_says_content_length_zero(server_factory: ServerFactory) -> None:
    server = await server_factory()
    server.add_http_route("/empty", lambda request: HttpResponse(503))
    status, headers, body = await http_exchange(server.port, get("/empty"))
    assert status.startswith(b"HTTP/1.1 503 ") and headers["content-length"] == "0" and body == b""


async def test_other_methods_are_refused_by_picows(server_factory: ServerFactory) -> None:
    server = await server_factory()
    server.add_http_route("/hello", lambda request: HttpResponse(200, b"hi"))
    status, _, _ = await http_exchange(server.port, get("/hello", "POST", "Content-Length: 0\r\n"))
    assert status.startswith(b"HTTP/1.1 400 ")


async def test_a_raising_handler_is_a_500_and_the_server_goes_on(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: Any) -> HttpResponse:
        raise RuntimeError("handler bug")

    server = await server_factory()
    server.add_http_route("/broken", broken)
    status, _, _ = await http_exchange(server.port, get("/broken"))
    assert status.startswith(b"HTTP/1.1 500 ")
    assert any("HTTP handler for /broken failed" in r.getMessage() for r in caplog.records)
    async with connect(server) as ws:
        await ws.send(wire(type="ping", correlationId="p"))
        assert (await recv_json(ws))["type"] == "pong"


@pytest.mark.parametrize(
    "result, complaint",
    [
        (None, "must return an HttpResponse, got NoneType"),
        (HttpResponse(200, "text, not bytes"), "body must be bytes, got str"),  # type: ignore[arg-type]
        (HttpResponse(599, b"?"), "599"),
        (HttpResponse(101, b"?"), "must be an HTTP status from 200 to 599, got 101"),
    ],
)
async def test_a_bad_handler_result_is_a_plain_500(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture, result: Any, complaint: str
) -> None:
    server = await server_factory()
    server.add_http_route("/bad", lambda request: result)
    status, _, body = await http_exchange(server.port, get("/bad"))
    assert status.startswith(b"HTTP/1.1 500 ") and body == b"500 Internal Server Error"
    assert any(complaint in str(r.exc_info[1]) for r in caplog.records if r.exc_info), caplog.records


async def test_unknown_paths_are_404_and_an_upgrade_to_a_route_is_404(server_factory: ServerFactory) -> None:
    server = await server_factory()
    server.add_http_route("/hello", lambda request: HttpResponse(200, b"hi"))
    for request in (get("/nothing"), upgrade("/hello")):
        status, _, _ = await http_exchange(server.port, request)
        assert status.startswith(b"HTTP/1.1 404 "), (request, status)


async def test_route_arguments_are_checked(server_factory: ServerFactory) -> None:
    server = await server_factory()
    with pytest.raises(ValueError, match="WebSocket path"):
        server.add_http_route("/realtime", lambda request: HttpResponse())
    with pytest.raises(ValueError, match="starting with '/'"):
        server.add_http_route("hello", lambda request: HttpResponse())
    with pytest.raises(TypeError, match="callable"):
        server.add_http_route("/hello", "not callable")  # type: ignore[arg-type]


async def test_the_websocket_path_without_an_upgrade_is_426(server_factory: ServerFactory) -> None:
    server = await server_factory()
    status, headers, _ = await http_exchange(server.port, get("/realtime"))
    assert status.startswith(b"HTTP/1.1 426 ")
    assert headers["sec-websocket-version"] == "13" and headers["upgrade"] == "websocket"


@pytest.mark.parametrize("version", ["8", "7", "12", "14", ""])
async def test_another_websocket_version_is_426_naming_13(server_factory: ServerFactory, version: str) -> None:
    authenticated: list[Any] = []
    server = await server_factory(authenticate=lambda request: authenticated.append(request) or {"ok": True})
    status, headers, _ = await http_exchange(server.port, upgrade(version=version))
    assert status.startswith(b"HTTP/1.1 426 "), status
    assert headers["sec-websocket-version"] == "13"
    assert authenticated == []  # refused before authenticate runs
