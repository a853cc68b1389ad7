"""The inspector page in a real Chromium, against a real server on 127.0.0.1.

Playwright drives the machine's Chromium (Debian's ``chromium`` package;
Playwright's own browser download is not used). Without Chromium or
Playwright these tests skip, saying why, except under CI (``CI`` set), where
that is a failure. Every wait is bounded by :data:`DEADLINE`; reaching it
fails the test.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from safe_fast import (
    CLOSE_FELL_BEHIND,
    CLOSE_INVALID_MESSAGE,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_SHARE_DATA,
    Backoff,
    InMemoryReplayStore,
    RealtimeClient,
    RealtimeServer,
    ShareDataManager,
    attach_realtime_server,
    create_id_based_function_resolver,
    next_backoff_delay,
)
from safe_fast.auth import AuthorizationAudience, AuthorizedAuthorities, create_share_data_authenticate
from safe_fast.examples import counter, tasks
from safe_fast.examples.demo import Bot, start_demo

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # the browser fixture skips (or fails under CI) and says why
    async_playwright = expect = None

pytestmark = pytest.mark.timeout(120)

DEADLINE = 10.0
"""Upper bound of any single wait, in seconds."""
MS = DEADLINE * 1000

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "inspector.png"

CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> Optional[str]:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    reason = None
    if async_playwright is None:
        reason = "Playwright for Python is not installed (pip install playwright)"
    path = chromium_path()
    if reason is None and path is None:
        reason = "no Chromium on PATH (Debian: apt-get install chromium chromium-driver)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    args = CHROMIUM_FLAGS + (["--no-sandbox"] if os.geteuid() == 0 else [])
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            yield launched
        finally:
            await launched.close()


class Page:
    """A browser page on the inspector, with what it logged and what it sent."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.sent: list[dict[str, Any]] = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))
        page.on("websocket", self._watch_socket)

    def _watch_socket(self, socket: Any) -> None:
        socket.on("framesent", lambda payload: self.sent.append(json.loads(payload)))

    async def open(self, server: RealtimeServer, query: str = "") -> None:
        await self.page.goto(f"http://127.0.0.1:{server.port}/{query}")

    async def expect_connection(self, state: str) -> None:
        await expect(self.page.locator("#connection-state")).to_have_text(state, timeout=MS)

    async def select(self, share_data_id: str) -> None:
        await self.page.locator(f'#share-data-list button[data-id="{share_data_id}"]').click()
        # The heading changes in the same render that clears the previous state.
        await expect(self.page.locator("#selected-heading")).to_have_text(f"ShareData {share_data_id}", timeout=MS)
        await self.expect_state_shown()

    async def expect_state_shown(self) -> None:
        await expect(self.page.locator("#state")).not_to_be_empty(timeout=MS)

    async def shown_state(self) -> Any:
        return json.loads(await self.page.locator("#state").inner_text())

    async def wait_for_state(self, expected: Any) -> None:
        await wait_for(lambda: self.shown_state(), lambda shown: shown == expected, f"state {expected!r} shown")

    async def log_rows(self) -> list[list[str]]:
        return await self.page.locator("#log tr").evaluate_all(
            "rows => rows.map(row => [...row.cells].map(cell => cell.textContent))"
        )

    async def wait_for_row(self, transaction_id: str, outcome: str, how: str) -> None:
        def has_row(rows: list[list[str]]) -> bool:
            return any(row[:3] == [transaction_id, outcome, how] for row in rows)

        await wait_for(self.log_rows, has_row, f"log row {transaction_id} {outcome} {how}")

    async def propose(self, function_id: str, data: str) -> None:
        await self.page.fill("#function-id", function_id)
        await self.page.fill("#proposed-data", data)
        await self.page.click("#propose")

    async def expect_result(self, pattern: str) -> None:
        await expect(self.page.locator("#proposal-result")).to_have_text(re.compile(pattern), timeout=MS)

    def proposals_sent(self) -> list[dict[str, Any]]:
        return [message for message in self.sent if message.get("type") == "propose"]


async def wait_for(read: Callable[[], Any], holds: Callable[[Any], bool], what: str) -> Any:
    """Read (awaiting what is awaitable) until ``holds(value)``; fail after :data:`DEADLINE`."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            value = read()
            if inspect.isawaitable(value):
                value = await value
        except (ValueError, json.JSONDecodeError):
            value = None
        if value is not None and holds(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE}s waiting for {what} (last seen: {value!r})")
        await asyncio.sleep(0.02)


@pytest.fixture
def manager() -> ShareDataManager:
    manager = ShareDataManager()
    counter.app(manager)
    tasks.app(manager)
    return manager


@pytest.fixture
async def servers() -> AsyncIterator[list[RealtimeServer]]:
    """Servers to close at teardown."""
    started: list[RealtimeServer] = []
    yield started
    for server in started:
        await asyncio.wait_for(server.close(), DEADLINE)


async def start_server(manager: ShareDataManager, servers: list[RealtimeServer], **options: Any) -> RealtimeServer:
    options.setdefault("resolve_function", create_id_based_function_resolver(manager))
    server = await attach_realtime_server(
        manager=manager,
        authenticate=options.pop("authenticate", lambda request: {"subject": "test"}),
        host="127.0.0.1",
        inspector=True,
        **options,
    )
    servers.append(server)
    return server


@pytest.fixture
async def server(manager: ShareDataManager, servers: list[RealtimeServer]) -> RealtimeServer:
    return await start_server(manager, servers)


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        yield Page(await context.new_page())
    finally:
        await context.close()


def increment(manager: ShareDataManager) -> Any:
    return manager.apply_transaction(
        counter.COUNTER_ID,
        counter.incremented(manager.get_share_data_by_id(counter.COUNTER_ID).current_state),
        manager.get_share_data_by_id(counter.COUNTER_ID).functions[0],
    )


# -- loading, listing, selecting ----------------------------------------------------------------------


async def test_the_page_loads_without_console_errors_and_lists_the_ids(server: RealtimeServer, page: Page) -> None:
    await page.open(server)
    await page.expect_connection("open")
    ids = await page.page.locator("#share-data-list button").evaluate_all("buttons => buttons.map(b => b.dataset.id)")
    assert ids == ["counter", "tasks"]
    assert "add, complete, remove" in await page.page.locator('button[data-id="tasks"]').inner_text()
    await expect(page.page.locator("#rtt")).to_have_text(re.compile(r"^ping \d+\.\d ms$"), timeout=MS)
    assert page.console_errors == []


async def test_selecting_a_share_data_shows_its_state(server: RealtimeServer, page: Page, manager: ShareDataManager) -> None:
    await page.open(server)
    await page.select("tasks")
    assert await page.shown_state() == manager.get_share_data_by_id("tasks").current_state
    assert await page.page.locator("#cursor").inner_text() == "cursor (last transaction id): none"
    assert {"v": 1, "type": "subscribe", "shareDataId": "tasks"} in page.sent
    await page.select("counter")
    assert await page.shown_state() == {"count": 0}
    assert {"v": 1, "type": "unsubscribe", "shareDataId": "tasks"} in page.sent
    assert page.console_errors == []


async def test_a_transaction_by_another_client_appears(server: RealtimeServer, page: Page) -> None:
    await page.open(server)
    await page.select("counter")
    async with RealtimeClient(server.url) as other:
        await asyncio.wait_for(other.connect(), DEADLINE)
        result = await other.propose("counter", "increment", {"count": 1})
        assert result.accepted and result.transaction_id == "1"
    await page.wait_for_row("1", "accepted", "live")
    await page.wait_for_state({"count": 1})
    assert await page.page.locator("#cursor").inner_text() == "cursor (last transaction id): 1"


async def test_a_replacement_and_a_removal_show_in_the_page(
    server: RealtimeServer, page: Page, manager: ShareDataManager
) -> None:
    await page.open(server)
    await page.select("counter")
    manager.update_share_data(counter.make_counter(count=41))
    await page.wait_for_state({"count": 41})
    await wait_for(page.log_rows, lambda rows: rows and rows[0][1:3] == ["updated", "lifecycle"], "the updated row")
    manager.remove_share_data_by_id("counter")
    await expect(page.page.locator("#notice")).to_have_text("ShareData counter was removed", timeout=MS)
    await expect(page.page.locator("#selected-heading")).to_have_text("Select a ShareData", timeout=MS)
    assert await page.page.locator("#state").inner_text() == ""
    assert (await page.log_rows())[0][1:3] == ["removed", "lifecycle"]
    assert await page.page.locator("#connection-state").inner_text() == "open"
    # The list follows: the removed id goes at once, an added one on Refresh.
    ids = page.page.locator("#share-data-list button")
    await expect(ids).to_have_count(1, timeout=MS)
    manager.add_share_data(counter.make_counter("counter-2"))
    await page.page.click("#refresh")
    await expect(ids).to_have_count(2, timeout=MS)
    assert await ids.evaluate_all("buttons => buttons.map(b => b.dataset.id)") == ["tasks", "counter-2"]


# -- proposing --------------------------------------------------------------------------------------------


async def test_a_proposal_from_the_form_is_accepted_and_appears(
    server: RealtimeServer, page: Page, manager: ShareDataManager
) -> None:
    await page.open(server)
    await page.select("tasks")
    proposal = tasks.added(manager.get_share_data_by_id("tasks").current_state, "From the browser")
    await page.propose("add", json.dumps(proposal))
    await page.expect_result(r"^Accepted: transaction 1\.$")
    await page.wait_for_row("1", "accepted", "live")
    await page.wait_for_state(proposal)
    assert manager.get_share_data_by_id("tasks").current_state == proposal
    (sent,) = page.proposals_sent()
    assert sent == {
        "v": 1,
        "type": "propose",
        "shareDataId": "tasks",
        "functionId": "add",
        "proposedData": proposal,
        "correlationId": sent["correlationId"],
    }
    assert re.fullmatch(r"c-\d+", sent["correlationId"])


async def test_invalid_json_is_refused_in_the_page_without_being_sent(
    server: RealtimeServer, page: Page, manager: ShareDataManager
) -> None:
    await page.open(server)
    await page.select("counter")
    await page.propose("increment", '{"count": ')
    await page.expect_result(r"^Not sent: the proposed data is not valid JSON")
    assert await page.page.get_attribute("#proposed-data", "aria-invalid") == "true"
    await page.propose("", "{}")
    await page.expect_result(r"^Not sent: enter a function id\.$")
    assert manager.get_share_data_by_id("counter").transaction_history == []
    # The socket was live all along: the next valid proposal is the only one sent.
    await page.propose("increment", '{"count": 1}')
    await page.expect_result(r"^Accepted: transaction 1\.$")
    assert [m["proposedData"] for m in page.proposals_sent()] == [{"count": 1}]
    assert await page.page.get_attribute("#proposed-data", "aria-invalid") is None


async def test_a_rule_rejection_and_a_server_refusal_show_their_errors(server: RealtimeServer, page: Page) -> None:
    await page.open(server)
    await page.select("counter")
    await page.propose("increment", '{"count": 5}')
    await page.expect_result(r"^Rejected by the rule: transaction 1 recorded with accepted: false\.$")
    await page.wait_for_row("1", "rejected", "live")
    await page.propose("no-such-function", '{"count": 1}')
    await page.expect_result(r"^Refused by the server: unknown functionId no-such-function for shareDataId counter$")
    assert await page.shown_state() == {"count": 0}


# -- reconnecting -----------------------------------------------------------------------------------------


async def test_a_killed_and_restarted_server_is_resumed_from_the_cursor(
    manager: ShareDataManager, servers: list[RealtimeServer], page: Page
) -> None:
    replay_store = InMemoryReplayStore(100)
    first = await start_server(manager, servers, replay_store=replay_store)
    port = first.port
    await page.open(first)
    await page.select("counter")
    await increment(manager)
    await page.wait_for_row("1", "accepted", "live")

    # Killed: every connection dropped without a close frame, nothing listening.
    for connection in first.connections:
        connection.abort()
    await wait_for(lambda: first.connections, lambda open_: not open_, "the aborted connections gone")
    await first.close()
    await page.expect_connection("reconnecting")
    await expect(page.page.locator("#connection-notice")).to_contain_text(
        "Connection closed: 1006 connection lost without a close frame: the server is gone or unreachable", timeout=MS
    )
    # What happens while the page is away: transactions 2..4.
    for _ in range(3):
        await increment(manager)

    await start_server(manager, servers, replay_store=replay_store, port=port)
    await page.expect_connection("open")
    for transaction_id in ("2", "3", "4"):
        await page.wait_for_row(transaction_id, "accepted", "replayed")
    await page.wait_for_state({"count": 4})
    resubscribe = [m for m in page.sent if m.get("type") == "subscribe"][-1]
    assert resubscribe == {"v": 1, "type": "subscribe", "shareDataId": "counter", "since": "1"}
    assert await page.page.locator("#cursor").inner_text() == "cursor (last transaction id): 4"
    # The replayed rows came after the live one, newest first.
    rows = await page.log_rows()
    assert [row[:3] for row in rows] == [
        ["4", "accepted", "replayed"],
        ["3", "accepted", "replayed"],
        ["2", "accepted", "replayed"],
        ["1", "accepted", "live"],
    ]


# -- authentication ----------------------------------------------------------------------------------------

ISSUER = "https://issuer.test"


class Issuer:
    """A real RSA issuer key, trusted by the servers it starts, and its tokens."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.authorities = AuthorizedAuthorities()
        self.authorities.add(
            AuthorizationAudience.SHAREDATA,
            ISSUER,
            self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        )

    def token(self, lifetime: float = 300) -> str:
        now = time.time()
        claims = {"iss": ISSUER, "aud": AuthorizationAudience.SHAREDATA.value, "sub": "alice", "iat": int(now) - 5, "exp": now + lifetime}
        return jwt.encode(claims, self.key, algorithm="RS256")

    async def server(self, manager: ShareDataManager, servers: list[RealtimeServer]) -> RealtimeServer:
        return await start_server(manager, servers, authenticate=create_share_data_authenticate(authorities=self.authorities))


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


async def test_with_jwt_auth_a_missing_token_shows_401_and_a_good_token_works(
    manager: ShareDataManager, servers: list[RealtimeServer], page: Page, issuer: Issuer
) -> None:
    server = await issuer.server(manager, servers)
    await page.open(server)
    await page.expect_connection("closed")
    await expect(page.page.locator("#connection-notice")).to_have_text(re.compile(r"^401 Unauthorized: the server refused the token"), timeout=MS)
    assert await page.page.locator("#share-data-list button").count() == 0
    assert page.sent == []  # no WebSocket was even opened

    await page.page.fill("#token", issuer.token())
    await page.page.click("#connect")
    await page.expect_connection("open")
    await expect(page.page.locator("#connection-notice")).to_be_hidden(timeout=MS)
    await page.select("counter")
    assert await page.shown_state() == {"count": 0}

    # The token also works from the page's own URL.
    await page.open(server, f"?token={issuer.token()}")
    await page.expect_connection("open")


async def test_a_token_that_expires_closes_with_4002_and_the_page_stops(
    manager: ShareDataManager, servers: list[RealtimeServer], page: Page, issuer: Issuer
) -> None:
    server = await issuer.server(manager, servers)
    await page.open(server, f"?token={issuer.token(lifetime=2)}")
    await page.expect_connection("open")
    await page.expect_connection("closed")
    await expect(page.page.locator("#connection-notice")).to_have_text(
        "Unauthorized: connection closed: 4002 unauthorized: the credentials were rejected or have expired (token expired)",
        timeout=MS,
    )
    # Stopped: the badge says why, not "reconnecting".
    assert await page.page.locator("#connection-detail").inner_text() == (
        "connection closed: 4002 unauthorized: the credentials were rejected or have expired (token expired)"
    )


async def test_an_unknown_id_is_refused_with_4003_and_the_page_resumes(server: RealtimeServer, page: Page) -> None:
    await page.open(server)
    await page.expect_connection("open")
    await page.page.fill("#subscribe-id", "no-such-id")
    await page.page.press("#subscribe-id", "Enter")
    await expect(page.page.locator("#notice")).to_have_text(
        "Subscription to no-such-id refused: unknown-share-data: shareDataId no-such-id not found", timeout=MS
    )
    # The server closed with 4003; the page dropped that subscription and came back at once.
    await wait_for(
        lambda: page.page.locator("#connection-state").inner_text(), lambda text: text == "open", "open again"
    )
    await page.select("counter")
    assert [m["shareDataId"] for m in page.sent if m.get("type") == "subscribe"] == ["no-such-id", "counter"]


async def test_the_page_backs_off_like_the_python_client_and_names_every_close_code(
    server: RealtimeServer, page: Page
) -> None:
    await page.open(server)
    await page.expect_connection("open")
    randoms = [0.0, 0.25, 0.5, 0.999]
    delays, meanings = await page.page.evaluate(
        """async (randoms) => {
            const module = await import("/inspector/inspector.js");
            const delays = [];
            for (let attempt = 0; attempt < 10; attempt += 1)
                for (const r of randoms) delays.push(module.nextBackoffDelay(attempt, module.DEFAULT_BACKOFF, () => r));
            return [delays, module.CLOSE_MEANINGS];
        }""",
        randoms,
    )
    expected = [next_backoff_delay(attempt, Backoff(), lambda r=r: r) for attempt in range(10) for r in randoms]
    assert delays == pytest.approx(expected)
    for code in (CLOSE_FELL_BEHIND, CLOSE_UNAUTHORIZED, CLOSE_UNKNOWN_SHARE_DATA, CLOSE_INVALID_MESSAGE, 1000, 1001, 1006, 1009):
        assert meanings[str(code)], code


# -- rendering ------------------------------------------------------------------------------------------------


async def test_a_burst_renders_at_most_once_per_animation_frame(
    server: RealtimeServer, page: Page, manager: ShareDataManager
) -> None:
    await page.open(server)
    await page.select("counter")
    await page.page.evaluate(
        """() => {
            window.__frames = 0;
            window.__stateWrites = 0;
            const tick = () => { window.__frames += 1; requestAnimationFrame(tick); };
            requestAnimationFrame(tick);
            new MutationObserver(() => { window.__stateWrites += 1; })
                .observe(document.getElementById("state"), { childList: true, characterData: true, subtree: true });
        }"""
    )
    for _ in range(300):
        await increment(manager)
    await page.wait_for_state({"count": 300})
    frames, writes = await page.page.evaluate("[window.__frames, window.__stateWrites]")
    assert 1 <= writes <= frames + 1, (writes, frames)
    # The log keeps the newest 200 entries.
    rows = await page.log_rows()
    assert len(rows) == 200 and rows[0][0] == "300" and rows[-1][0] == "101"


async def test_narrow_screen_and_keyboard_only(server: RealtimeServer, browser: Any) -> None:
    context = await browser.new_context(viewport={"width": 360, "height": 740})
    try:
        page = Page(await context.new_page())
        await page.open(server)
        await page.expect_connection("open")
        width = await page.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, width
        # Tab from the top to the first ShareData, Enter selects it.
        keyboard = page.page.keyboard
        for _ in range(20):
            await keyboard.press("Tab")
            if await page.page.evaluate("document.activeElement.dataset.id === 'counter'"):
                break
        else:
            pytest.fail("the ShareData list is not reachable with Tab")
        await keyboard.press("Enter")
        await page.expect_state_shown()
        await page.page.focus("#function-id")
        await keyboard.type("increment")
        await keyboard.press("Tab")
        await keyboard.type('{"count": 1}')
        await keyboard.press("Control+Enter")
        await page.expect_result(r"^Accepted: transaction 1\.$")
        assert await page.page.evaluate("document.documentElement.scrollWidth") <= 360
        assert page.console_errors == []
    finally:
        await context.close()


async def test_screenshot_of_the_demo(browser: Any, tmp_path: Path) -> None:
    """The README's picture: the demo, with the bot at work, at 1200x800.

    Written to ``docs/images/inspector.png`` when that file is missing or
    ``SAFE_FAST_UPDATE_SCREENSHOT=1`` is set (``make screenshot``), so a test
    run leaves the checkout clean.
    """
    update = os.environ.get("SAFE_FAST_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists()
    shot = SCREENSHOT if update else tmp_path / "inspector.png"
    server = await start_demo(port=0)
    bot = Bot(server.url, interval=0.3)
    bot_task = asyncio.ensure_future(bot.run())
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = Page(await context.new_page())
        await page.open(server)
        await page.select("tasks")
        await wait_for(page.log_rows, lambda rows: len(rows) >= 5, "five log rows")
        # A proposal that changes nothing: the rule of "complete" rejects it.
        await page.page.fill("#function-id", "complete")
        await page.page.click("#use-state")
        await page.page.click("#propose")
        await page.expect_result(r"^Rejected by the rule: transaction \d+ recorded with accepted: false\.$")
        await wait_for(page.log_rows, lambda rows: any(row[1] == "rejected" for row in rows), "the rejection logged")
        shot.parent.mkdir(parents=True, exist_ok=True)
        await page.page.screenshot(path=str(shot))
        assert page.console_errors == []
    finally:
        await context.close()
        bot_task.cancel()
        await asyncio.gather(bot_task, return_exceptions=True)
        await bot.close()
        await server.close()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1200, 800)
    assert len(data) > 20_000, len(data)
