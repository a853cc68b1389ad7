"""``safe-fast serve`` as a process: health, metrics after a scripted session, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from safe_fast import Backoff, RealtimeClient, open_store
from safe_fast.config import ConfigError, load_settings
from safe_fast.runner import prepare
from serve_helpers import (
    Serve,
    closed_with,
    connect,
    eventually,
    http_get,
    metrics,
    proposal,
    recv_type,
    subscribed,
    wire,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def counter() -> AsyncIterator[Serve]:
    serve = Serve("serve_apps:erroring", "--max-buffered-bytes", "65536")
    await asyncio.to_thread(serve.start)
    try:
        yield serve
    finally:
        await asyncio.to_thread(serve.stop)


async def test_the_shipped_counter_app_serves_out_of_the_box() -> None:
    serve = Serve("safe_fast.examples.counter:app", "--inspector")
    await asyncio.to_thread(serve.start)
    try:
        assert http_get(serve.http("/healthz")) == (200, '{"status":"ok"}')
        assert http_get(serve.http("/readyz")) == (200, '{"status":"ready"}')
        ws, state = await subscribed(serve.url)
        assert state["currentState"] == {"count": 0}
        await ws.close()
        status, body = http_get(serve.http("/realtime"))
        assert status == 426, body
        status, body = http_get(serve.http("/"))  # the inspector page
        assert status == 200 and "<html" in body.lower()
    finally:
        await asyncio.to_thread(serve.stop)


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def propose(ws: Any, correlation_id: str, data: Any, *target: str) -> dict[str, Any]:
    """Propose (``target``: function id and ShareData id, default the counter's increment) and await the result."""
    await ws.send(proposal(correlation_id, data, *target))
    return await recv_type(ws, "proposal-result")


async def test_metrics_count_a_scripted_session(counter: Serve) -> None:
    before = metrics(counter)
    subscribers = [(await subscribed(counter.url))[0] for _ in range(3)]
    proposer = await connect(counter.url)

    assert (await propose(proposer, "a", {"count": 1}))["accepted"] is True
    assert (await propose(proposer, "r", {"count": 5}))["accepted"] is False
    errored = await propose(proposer, "e", {"count": 2}, "boom")
    assert errored["accepted"] is False and "boom" in errored["error"]
    for ws in subscribers:  # both transactions (accepted and rejected) reach every subscriber
        assert (await recv_type(ws, "transaction"))["transactionId"] == "1"
        assert (await recv_type(ws, "transaction"))["transactionId"] == "2"

    after = metrics(counter)
    assert after["safe_fast_connections"] == 4
    assert after["safe_fast_subscriptions"] == 3
    assert delta(before, after, "safe_fast_broadcasts_total") == 2
    assert delta(before, after, "safe_fast_deliveries_total") == 6
    assert delta(before, after, 'safe_fast_proposals_total{outcome="accepted"}') == 1
    assert delta(before, after, 'safe_fast_proposals_total{outcome="rejected"}') == 1
    assert delta(before, after, 'safe_fast_proposals_total{outcome="error"}') == 1
    assert delta(before, after, "safe_fast_propose_seconds_count") == 3
    # 6 transaction frames, 3 state frames and 3 proposal results, each at least 30 bytes
    assert delta(before, after, "safe_fast_bytes_sent_total") > 12 * 30

    await proposer.send(wire(type="subscribe", shareDataId="counter", since="1"))
    assert (await recv_type(proposer, "transaction"))["replayed"] is True
    await proposer.send(wire(type="subscribe", shareDataId="counter", since="999"))
    assert (await recv_type(proposer, "error"))["code"] == "replay-cursor-not-found"
    for ws in subscribers:
        await ws.close()
    await eventually(lambda: metrics(counter)["safe_fast_connections"] == 1, "three closes counted")
    after = metrics(counter)
    assert delta(before, after, 'safe_fast_replay_requests_total{outcome="replayed"}') == 1
    assert delta(before, after, 'safe_fast_replay_requests_total{outcome="not_found"}') == 1
    assert delta(before, after, 'safe_fast_connections_closed_total{code="1000"}') == 3

    # A subscriber that stops reading falls behind and is closed with 4001.
    slow, _ = await subscribed(counter.url, "big", max_queue=1)
    pad = "x" * 256_000
    for count in range(200):
        assert (await propose(proposer, f"p{count}", {"pad": pad, "n": count}, "set", "big"))["accepted"] is True
        if count % 4 == 0 and delta(before, metrics(counter), "safe_fast_overflow_closes_total") >= 1:
            break
    after = metrics(counter)
    assert delta(before, after, "safe_fast_overflow_closes_total") == 1
    slow.transport.abort()  # it would never answer the close: the server would wait close_timeout
    await eventually(
        lambda: metrics(counter).get('safe_fast_connections_closed_total{code="4001"}', 0) == 1, "4001 counted"
    )
    await proposer.close()


async def test_sigterm_finishes_proposals_closes_with_1001_and_clients_resume(tmp_path: Path) -> None:
    serve = Serve("serve_apps:slow", "--shutdown-delay", "0.5", log=tmp_path / "serve.log")
    await asyncio.to_thread(serve.start)
    client = RealtimeClient(serve.url, backoff=Backoff(min=0.05, max=0.2, jitter=0.0))
    try:
        watchers = [(await subscribed(serve.url))[0] for _ in range(2)]
        closes: list[int] = []
        opens: list[int] = []
        client.on("close", lambda code, reason: closes.append(code))
        client.on("open", lambda: opens.append(1))
        await asyncio.wait_for(client.connect(), 10)
        states: list[Any] = []
        subscription = client.subscribe("counter")
        subscription.on("state", states.append)
        await eventually(lambda: states, "the client's state frame")

        await watchers[0].send(proposal("slow-1", {}, "wait", "slow"))
        await asyncio.sleep(0.1)  # the proposal is being evaluated (it takes 1.2 s)
        serve.signal(signal.SIGTERM)

        status, body = await eventually(
            lambda: (lambda answer: answer if answer[0] == 503 else None)(http_get(serve.http("/readyz"))), "readyz 503"
        )
        assert json.loads(body)["reasons"]["server"] == "not accepting connections"
        result = await recv_type(watchers[0], "proposal-result")
        assert result["accepted"] is True and result["correlationId"] == "slow-1"
        for ws in watchers:
            assert (await closed_with(ws))[0] == 1001
        assert await asyncio.to_thread(serve.wait) == 0
        await eventually(lambda: 1001 in closes, "the RealtimeClient saw 1001")
        assert client.state in ("reconnecting", "connecting")

        # The same port again: the client reconnects on its own and resubscribes.
        restarted = Serve("serve_apps:slow", port=serve.port, log=tmp_path / "serve2.log")
        await asyncio.to_thread(restarted.start)
        try:
            await eventually(lambda: len(opens) >= 2 and len(states) >= 2, "reconnected and resubscribed")
            assert client.state == "open"
            result = await client.propose("counter", "increment", {"count": 1})
            assert result.accepted
        finally:
            await client.close()
            await asyncio.to_thread(restarted.stop)
    finally:
        await client.close()
        await asyncio.to_thread(serve.stop)
    log = (tmp_path / "serve.log").read_text()
    assert "received SIGTERM: shutting down gracefully" in log and "stopped" in log


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    serve = Serve(
        "serve_apps:slow",
        "--shutdown-delay", "5", "--shutdown-timeout", "9", "--log-format", "json",
        env={"SAFE_FAST_PROT": "9000"},  # a typo of a setting's variable
        log=tmp_path / "serve.log",
    )  # fmt: skip
    await asyncio.to_thread(serve.start)
    try:
        serve.signal(signal.SIGTERM)
        await eventually(lambda: http_get(serve.http("/readyz"))[0] == 503, "readyz 503")
        serve.signal(signal.SIGINT)
        assert await asyncio.to_thread(serve.wait, 3.0) == 128 + signal.SIGINT
    finally:
        await asyncio.to_thread(serve.stop)
    records = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]  # JSON lines
    messages = [(record["level"], record["message"]) for record in records]
    assert ("info", "received SIGTERM: shutting down gracefully") in messages
    assert ("warning", "second signal (SIGINT): exiting now") in messages
    assert ("warning", "ignoring SAFE_FAST_PROT: no setting has that name") in messages


async def test_a_signal_while_starting_stops_the_start_and_exits_0(tmp_path: Path) -> None:
    marker, log = tmp_path / "called", tmp_path / "serve.log"
    serve = Serve(
        "serve_apps:hangs_at_start",
        "--store-url", f"sqlite:///{tmp_path / 'store.db'}",
        env={"SAFE_FAST_TEST_MARKER": str(marker)},
        log=log,
    )  # fmt: skip
    serve.start(wait=False)
    try:
        await eventually(lambda: marker.exists(), "the app called (the store is open)")
        serve.signal(signal.SIGTERM)
        assert await asyncio.to_thread(serve.wait) == 0, log.read_text()
    finally:
        await asyncio.to_thread(serve.stop)
    text = log.read_text()
    assert "received SIGTERM: shutting down gracefully" in text and "stopped before serving" in text
    assert "Traceback" not in text


def sqlite_threads() -> int:
    return sum(thread.name.startswith("safe_fast-sqlite") for thread in threading.enumerate())


async def test_a_setting_refused_after_the_store_opened_closes_the_store_again(tmp_path: Path) -> None:
    before = sqlite_threads()
    settings = load_settings("serve_apps:durable_no_hooks", {"store_url": f"sqlite:///{tmp_path / 'store.db'}"}, environ={})
    with pytest.raises(ConfigError, match="nothing authenticates connections"):
        await prepare(settings)
    await eventually(lambda: sqlite_threads() == before, "the store's thread gone")
    # The file is not held either: another store opens it and writes at once.
    async with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        await store.create("x", None, 0)


async def test_tls_on_the_listener_serves_wss_and_https_health(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    # fmt: off
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    # fmt: on
    serve = Serve(
        "safe_fast.examples.counter:app", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), scheme="https"
    )
    await asyncio.to_thread(serve.start)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        assert http_get(serve.http("/healthz"), context=context) == (200, '{"status":"ok"}')
        ws, state = await subscribed(serve.url.replace("ws://", "wss://"), ssl=context)
        assert state["currentState"] == {"count": 0}
        await ws.close()
    finally:
        await asyncio.to_thread(serve.stop)
