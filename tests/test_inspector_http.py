"""The inspector's HTTP side on a real server: the page, its files, the guarded listing."""

from __future__ import annotations

import asyncio
import gc
import json
import urllib.error
import urllib.request
import warnings
from importlib import resources
from typing import Any, AsyncIterator, Optional

import pytest

from safe_fast import (
    RealtimeServer,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
)
from safe_fast.inspector import LISTING_PATH, share_data_listing

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0


def make_manager() -> ShareDataManager:
    manager = ShareDataManager()
    manager.add_share_data(
        ShareData(
            "doc",
            current_state={"secret": "never listed"},
            functions=[ShareFunction("inc", lambda c, p: True), ShareFunction(None, lambda c, p: True)],
        )
    )
    manager.add_share_data(ShareData("plain", current_state=1))
    return manager


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    servers: list[RealtimeServer] = []

    async def start_server(**options: Any) -> RealtimeServer:
        manager = options.pop("manager", None) or make_manager()
        options.setdefault("authenticate", lambda request: {"subject": "test"})
        options.setdefault("inspector", True)
        server = await attach_realtime_server(
            manager=manager, host="127.0.0.1", port=0, resolve_function=create_id_based_function_resolver(manager), **options
        )
        servers.append(server)
        return server

    yield start_server
    for server in servers:
        await asyncio.wait_for(server.close(), DEADLINE)


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json"
        return json.loads(self.body)


async def get(server: RealtimeServer, target: str, headers: Optional[dict[str, str]] = None) -> Answer:
    def fetch() -> Answer:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}{target}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=DEADLINE) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.headers, error.read())

    return await asyncio.wait_for(asyncio.to_thread(fetch), DEADLINE * 2)


# -- the page and its files ------------------------------------------------------------------------


async def test_the_page_and_its_files_are_served_with_a_strict_policy(start: Any) -> None:
    server = await start(path="/live")
    page = await get(server, "/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    html = page.body.decode()
    assert '<meta name="safe-fast-websocket-path" content="/live">' in html
    assert '<script type="module" src="/inspector/inspector.js"></script>' in html
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self' ws: wss:" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # Nothing is fetched from anywhere else.
    for name in ("index.html", "inspector.js", "inspector.css"):
        text = resources.files("safe_fast.inspector").joinpath("static", name).read_text()
        assert "http://" not in text and "https://" not in text, name

    script = await get(server, "/inspector/inspector.js")
    assert script.status == 200 and script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert b"class InspectorClient" in script.body
    style = await get(server, "/inspector/inspector.css")
    assert style.status == 200 and style.headers["Content-Type"] == "text/css; charset=utf-8"
    assert (await get(server, "/inspector/missing.js")).status == 404
    # The query string does not matter (the page takes ?token= from its URL).
    assert (await get(server, "/?token=abc")).body == page.body


async def test_an_odd_websocket_path_is_escaped_into_the_page(start: Any) -> None:
    server = await start(path='/a"b<c>')
    html = (await get(server, "/")).body.decode()
    assert '<meta name="safe-fast-websocket-path" content="/a&quot;b&lt;c&gt;">' in html


async def test_the_inspector_is_off_by_default(start: Any) -> None:
    server = await start(inspector=False)
    assert (await get(server, "/")).status == 404
    assert (await get(server, LISTING_PATH)).status == 404


# -- the listing ------------------------------------------------------------------------------------------


async def test_the_listing_names_ids_and_wire_function_ids_only(start: Any) -> None:
    manager = make_manager()
    server = await start(manager=manager)
    answer = await get(server, LISTING_PATH)
    assert answer.status == 200
    assert answer.json() == {
        "shareData": [{"id": "doc", "functionIds": ["inc"]}, {"id": "plain", "functionIds": []}]
    }
    # Built from the manager at each request.
    manager.add_share_data(ShareData("later", functions=[ShareFunction("go", lambda c, p: True)]))
    manager.remove_share_data_by_id("plain")
    assert (await get(server, LISTING_PATH)).json() == {
        "shareData": [{"id": "doc", "functionIds": ["inc"]}, {"id": "later", "functionIds": ["go"]}]
    }


async def test_the_listing_answers_401_where_the_upgrade_would(start: Any) -> None:
    seen: list[Any] = []

    def authenticate(request: Any) -> Any:
        seen.append(request)
        if request.query.get("token") == "good" or request.headers.get("Authorization") == "Bearer good":
            return {"subject": "alice"}
        if request.query.get("token") == "boom":
            raise RuntimeError("verifier down")
        return None

    server = await start(authenticate=authenticate)
    for target in (LISTING_PATH, f"{LISTING_PATH}?token=bad", f"{LISTING_PATH}?token=boom"):
        refused = await get(server, target)
        assert refused.status == 401, target
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json()["error"].startswith("unauthorized")
    assert (await get(server, f"{LISTING_PATH}?token=good")).status == 200
    assert (await get(server, LISTING_PATH, {"Authorization": "Bearer good"})).status == 200
    assert seen[-1].route == LISTING_PATH
    # The page itself needs no token: it is what asks for one.
    assert (await get(server, "/")).status == 200


async def test_the_listing_leaves_out_what_the_caller_may_not_subscribe_to(start: Any) -> None:
    def authorize_subscribe(context: Any, share_data_id: str) -> bool:
        if share_data_id == "plain":
            raise RuntimeError("no")
        return context["subject"] == "alice" and share_data_id == "doc"

    server = await start(
        authenticate=lambda request: {"subject": request.query.get("user", "")},
        authorize_subscribe=authorize_subscribe,
    )
    assert (await get(server, f"{LISTING_PATH}?user=alice")).json() == {"shareData": [{"id": "doc", "functionIds": ["inc"]}]}
    assert (await get(server, f"{LISTING_PATH}?user=bob")).json() == {"shareData": []}


def test_an_awaitable_verdict_hides_the_id_without_a_warning() -> None:
    async def authorize_subscribe(context: Any, share_data_id: str) -> bool:
        return True

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert share_data_listing(make_manager(), {"subject": "x"}, authorize_subscribe) == []
        gc.collect()


async def test_a_coroutine_authenticate_makes_the_listing_answer_501(start: Any) -> None:
    async def authenticate(request: Any) -> Any:
        return {"subject": "alice"}

    server = await start(authenticate=authenticate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer = await get(server, LISTING_PATH)
        gc.collect()
    assert answer.status == 501
    assert "coroutine function" in answer.json()["error"]
    assert (await get(server, "/")).status == 200
