"""RealtimeClient against this project's real server, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any

import pytest

from safe_fast.client import (
    Backoff,
    ClientClosed,
    ConnectionFailed,
    ProposalResult,
    ProtocolError,
    QueueFull,
    RealtimeClient,
    RequestTimeout,
    SubscriptionRejected,
    Unauthorized,
)
from safe_fast.client._state import ClientProtocol, PendingRequest
from safe_fast.registry import InMemoryChannelRegistry
from safe_fast.replay import InMemoryReplayStore, ReplayEntry
from safe_fast.server import attach_realtime_server, create_id_based_function_resolver
from safe_fast.sharedata import ShareData, ShareFunction

from client_helpers import DEADLINE, Recorder, apply, eventually, make_manager

pytestmark = pytest.mark.timeout(30)

FAST = Backoff(min=0.05, max=0.2, factor=2.0, jitter=0.0)
"""Quick reconnects for tests that restart the server."""


async def start_server(manager: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("authenticate", lambda request: {"subject": "test"})
    kwargs.setdefault("resolve_function", create_id_based_function_resolver(manager))
    return await attach_realtime_server(manager=manager, host="127.0.0.1", **kwargs)


def channel_recorder(sub: Any) -> list[Any]:
    frames: list[Any] = []
    for kind in ("state", "transaction", "lifecycle"):
        sub.on(kind, frames.append)
    return frames


async def consume(sub: Any, into: list[Any]) -> None:
    async for frame in sub:
        into.append(frame)


async def reconnecting_client(manager: Any, clients: Any) -> tuple[RealtimeClient, int]:
    """A client that connected to a server on ``manager`` which then went away: it is reconnecting.

    Returns it and the port, where :func:`start_server` can bring the server back.
    """
    server = await start_server(manager)
    client = RealtimeClient(server.url, backoff=FAST)
    clients(client)
    await client.connect()
    await server.close()
    await eventually(lambda: client.state == "reconnecting", what="disconnect")
    return client, server.port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_subscribe_state_live_lifecycle_and_iteration(clients: Any) -> None:
    manager = make_manager("doc")
    async with await start_server(manager) as server:
        client = RealtimeClient(server.url)
        clients(client)
        recorder = Recorder(client)
        await client.connect()
        assert client.state == "open"
        assert recorder.of("open") == [()]

        sub = client.subscribe("doc")
        assert client.subscribe("doc") is sub
        heard = channel_recorder(sub)
        iterated: list[Any] = []
        consumer = asyncio.ensure_future(consume(sub, iterated))

        await eventually(lambda: len(heard) == 1, what="state")
        assert heard[0].type == "state"
        assert heard[0].current_state == {"n": 0} and heard[0].last_transaction_id is None
        assert sub.last_transaction_id is None

        for i in range(1, 4):
            await apply(manager, "doc", {"n": i})
        await eventually(lambda: len(heard) == 4, what="live transactions")
        assert [f.transaction_id for f in heard[1:]] == ["1", "2", "3"]
        assert [f.current_state for f in heard[1:]] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert all(f.replayed is False for f in heard[1:])
        assert sub.last_transaction_id == "3"

        manager.update_share_data(ShareData("doc", current_state={"n": 100}, functions=[]))
        await eventually(lambda: len(heard) == 5, what="lifecycle updated")
        assert (heard[4].type, heard[4].event, heard[4].current_state) == ("lifecycle", "updated", {"n": 100})
        assert sub.last_transaction_id == "3"

        manager.remove_share_data_by_id("doc")
        await eventually(lambda: len(heard) == 6, what="lifecycle removed")
        assert (heard[5].type, heard[5].event) == ("lifecycle", "removed")
        assert sub.is_detached and sub.last_transaction_id is None
        assert "doc" not in client.subscriptions

        await asyncio.wait_for(consumer, DEADLINE)  # the iterator ended by itself
        assert iterated == heard
        messages = [args[0] for args in recorder.of("message")]
        assert messages == heard
        assert recorder.errors() == []
        await client.close()
        assert client.state == "closed"


async def test_propose_and_ping(clients: Any) -> None:
    manager = make_manager("doc")
    manager.get_share_data_by_id("doc").functions.append(ShareFunction("never", lambda c, p: False))
    async with await start_server(manager) as server:
        async with RealtimeClient(server.url) as client:
            clients(client)
            accepted = await client.propose("doc", "set", {"n": 1})
            assert accepted == ProposalResult(True, "1", None)
            rejected = await client.propose("doc", "never", {"n": 2})
            assert rejected == ProposalResult(False, "2", None)
            unknown = await client.propose("doc", "missing")
            assert unknown.accepted is False and unknown.transaction_id is None
            assert unknown.error == "unknown functionId missing for shareDataId doc"
            rtt = await client.ping()
            assert rtt > 0, "a real round trip takes some time, even on loopback"


@pytest.mark.timeout(60)
async def test_server_restart_resumes_from_the_cursor(clients: Any) -> None:
    manager = make_manager("doc")
    store = InMemoryReplayStore(100)
    server = await start_server(manager, replay_store=store)
    port = server.port
    client = RealtimeClient(server.url, backoff=FAST)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    sub = client.subscribe("doc")
    heard = channel_recorder(sub)
    iterated: list[Any] = []
    consumer = asyncio.ensure_future(consume(sub, iterated))
    await eventually(lambda: len(heard) == 1, what="state")
    for i in (1, 2, 3):
        await apply(manager, "doc", {"n": i})
    await eventually(lambda: sub.last_transaction_id == "3", what="live 1..3")

    await server.close()
    await eventually(lambda: client.state == "reconnecting", what="the client to notice")
    assert recorder.of("close")[0][0] == 1001

    # While no server runs, transactions go on; the replay store is shared
    # (as a Redis store is between nodes), so whoever applies them records
    # them there: here a stand-in listener, for the duration of the outage.
    def record(event: Any) -> None:
        store.record(event.share_data_id, ReplayEntry(event.transaction_id, event.accepted))

    manager.on("share-data:transaction", record)
    for i in (4, 5, 6):
        await apply(manager, "doc", {"n": i})
    manager.off("share-data:transaction", record)

    # Requests made while disconnected are queued...
    queued = [asyncio.ensure_future(client.propose("doc", "set", {"n": i})) for i in (7, 8)]
    ping = asyncio.ensure_future(client.ping())
    await asyncio.sleep(0.3)  # a few refused attempts
    assert client.state == "reconnecting" and not any(q.done() for q in queued)

    server = await start_server(manager, replay_store=store, port=port)
    try:
        # ... and sent after the resubscribe once it is back.
        results = await asyncio.wait_for(asyncio.gather(*queued), DEADLINE)
        assert [r.transaction_id for r in results] == ["7", "8"] and all(r.accepted for r in results)
        assert isinstance(await asyncio.wait_for(ping, DEADLINE), float)
        await apply(manager, "doc", {"n": 9})
        await eventually(lambda: sub.last_transaction_id == "9", what="live 9")

        after = heard[4:]
        assert after[0].type == "state" and after[0].last_transaction_id == "6"
        assert after[0].current_state == {"n": 6}
        replayed = [f.transaction_id for f in after if f.type == "transaction" and f.replayed]
        assert replayed == ["4", "5", "6"]
        live = [f.transaction_id for f in heard if f.type == "transaction" and not f.replayed]
        assert live == ["1", "2", "3", "7", "8", "9"]  # none twice, in order
        seen = [f.transaction_id for f in heard if f.type == "transaction"]
        assert sorted(seen, key=int) == [str(i) for i in range(1, 10)]  # none missed
        assert len(set(seen)) == len(seen)
        assert sub.last_transaction_id == "9"
        assert [args[0] for args in recorder.of("reconnecting")][0] == 1
        await eventually(lambda: len(iterated) == len(heard), what="the iterator")
        assert iterated == heard
        assert not [e for e in recorder.errors() if not isinstance(e, ConnectionFailed)]
    finally:
        await client.close()
        await asyncio.wait_for(consumer, DEADLINE)
        await server.close()


async def test_full_queue_fails_at_once(clients: Any) -> None:
    client = RealtimeClient(f"ws://127.0.0.1:{free_port()}/realtime", max_queue_size=3)
    clients(client)
    waiting = [asyncio.ensure_future(client.ping()) for _ in range(3)]
    await asyncio.sleep(0)
    # "At once": the call fails on its first step, without ever suspending.
    call = client.propose("doc", "set", 1)
    with pytest.raises(QueueFull, match=r"outbound queue full \(limit 3\)"):
        call.send(None)
    await client.close()
    for request in waiting:
        with pytest.raises(ClientClosed):
            await request


async def test_timeout_counts_from_the_call_while_queued(clients: Any) -> None:
    manager = make_manager("doc")
    client, port = await reconnecting_client(manager, clients)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout) as info:
        await client.propose("doc", "set", 1, timeout=0.3)
    # It never left the queue, so the 0.3 s ran from the call (a timer never fires early).
    assert loop.time() - started >= 0.25
    assert info.value.queued is True
    assert isinstance(info.value, asyncio.TimeoutError)
    # The timed-out request is never sent: nothing is applied once back.
    server = await start_server(manager, port=port)
    try:
        await client.connect()
        assert await client.ping() >= 0
        assert manager.get_share_data_by_id("doc").last_transaction_id is None
    finally:
        await server.close()


class RequestTimerSpy:
    """Records the request timeouts the client arms on ``loop``, and their firing.

    A timeout reaches the client's core only as ``ClientProtocol.request_timed_out``
    (see ``_state.py``), so every timer with that callback is a request's
    timeout. ``call_later`` goes through ``call_at`` on asyncio's loops, so
    wrapping ``call_at`` sees both; were that ever not so, ``armed`` would
    stay empty and the test using the spy would fail, not pass vacuously.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.armed: list[tuple[asyncio.TimerHandle, PendingRequest]] = []
        self.fired: list[tuple[PendingRequest, bool]] = []
        """``(request, request.done right after its timeout callback ran)``."""

    def __enter__(self) -> "RequestTimerSpy":
        real_call_at = self.loop.call_at

        def call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            if getattr(callback, "__func__", None) is not ClientProtocol.request_timed_out:
                return real_call_at(when, callback, *args, **kwargs)
            (request,) = args

            def fire(request: PendingRequest) -> None:
                callback(request)
                self.fired.append((request, request.done))

            handle = real_call_at(when, fire, request, **kwargs)
            self.armed.append((handle, request))
            return handle

        self.loop.call_at = call_at  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        del self.loop.call_at  # back to the class's method


async def test_a_queued_request_sent_on_reconnect_keeps_the_timer_armed_at_the_call(clients: Any) -> None:
    timeout = 2.0  # long enough for the reconnect to come first (checked below)
    outage = 0.3  # the request waits in the queue at least this long
    loop = asyncio.get_running_loop()
    release, rule_started, rule_finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held(current: Any, proposed: Any) -> bool:
        # Keeps the proposal in flight (sent, unanswered) until the test releases it.
        rule_started.set()
        try:
            await asyncio.wait_for(release.wait(), DEADLINE)
        finally:
            rule_finished.set()
        return True

    manager = make_manager("doc")
    manager.get_share_data_by_id("doc").functions.append(ShareFunction("held", held))
    client, port = await reconnecting_client(manager, clients)

    with RequestTimerSpy(loop) as spy:
        before_call = loop.time()
        proposal = asyncio.ensure_future(client.propose("doc", "held", 1, timeout=timeout))
        await asyncio.sleep(0)  # lets the call run to its first suspension, past arming its timer
        after_call = loop.time()
        assert client.state == "reconnecting" and not proposal.done()
        assert len(spy.armed) == 1, "the timeout is armed at the call, while the request is queued"
        call_timer, request = spy.armed[0]
        assert request.status == "queued"
        assert before_call + timeout <= call_timer.when() <= after_call + timeout

        await asyncio.sleep(outage)
        server = await start_server(manager, port=port)
        try:
            await eventually(lambda: rule_started.is_set() or proposal.done(), what="the proposal to reach the server")
            assert rule_started.is_set(), "premise: the reconnect must come before the timeout"
            assert request.status == "sent" and not proposal.done()
            # Still the timer from the call, not replaced at the send.
            assert [handle for handle, _ in spy.armed] == [call_timer]
            assert not call_timer.cancelled()

            await eventually(lambda: bool(spy.fired), what="the call's timer to fire")
            assert spy.fired == [(request, True)]  # and its firing settled the request
            with pytest.raises(RequestTimeout) as info:
                await asyncio.wait_for(proposal, DEADLINE)
            assert info.value.queued is False  # it timed out in flight, after being sent
        finally:
            release.set()
            if rule_started.is_set():
                await asyncio.wait_for(rule_finished.wait(), DEADLINE)
            await server.close()


async def test_timeout_of_a_sent_request(clients: Any) -> None:
    async def slow(current: Any, proposed: Any) -> bool:
        await asyncio.sleep(2)
        return True

    manager = make_manager("doc")
    manager.get_share_data_by_id("doc").functions.append(ShareFunction("slow", slow))
    async with await start_server(manager) as server:
        client = RealtimeClient(server.url)
        clients(client)
        recorder = Recorder(client)
        await client.connect()
        with pytest.raises(RequestTimeout) as info:
            await client.propose("doc", "slow", 1, timeout=0.2)
        assert info.value.queued is False
        # The late answer is ignored quietly, and the connection keeps working.
        await asyncio.sleep(2.1)
        assert (await client.propose("doc", "set", 2)).accepted
        assert recorder.errors() == []


async def test_explicit_close_is_sticky_and_fails_the_queue(clients: Any) -> None:
    manager = make_manager("doc")
    server = await start_server(manager)
    port = server.port
    client = RealtimeClient(server.url, backoff=FAST)
    clients(client)
    recorder = Recorder(client)
    await client.connect()
    sub = client.subscribe("doc")
    await server.close()
    await eventually(lambda: client.state == "reconnecting", what="disconnect")
    queued = [asyncio.ensure_future(client.propose("doc", "set", i)) for i in range(3)]
    await asyncio.sleep(0.05)
    await client.close()
    assert client.state == "closed"
    for request in queued:
        with pytest.raises(ClientClosed):
            await request
    assert sub.is_detached
    with pytest.raises(ClientClosed):
        await client.connect()
    with pytest.raises(ClientClosed):
        await client.ping()
    with pytest.raises(ClientClosed):
        client.subscribe("doc")
    await client.close()  # idempotent

    opened: list[Any] = []
    server = await start_server(manager, port=port)
    server.on("connection:opened", opened.append)
    try:
        await asyncio.sleep(0.5)  # several backoff periods: nobody comes back
        assert opened == []
        reconnects = len(recorder.of("reconnecting"))
        await asyncio.sleep(0.2)
        assert len(recorder.of("reconnecting")) == reconnects
    finally:
        await server.close()


async def test_close_while_open_sends_a_normal_close(clients: Any) -> None:
    manager = make_manager("doc")
    async with await start_server(manager) as server:
        closed: list[Any] = []
        server.on("connection:closed", closed.append)
        client = RealtimeClient(server.url)
        clients(client)
        recorder = Recorder(client)
        await client.connect()
        in_flight = asyncio.ensure_future(client.ping())
        await client.close()
        with pytest.raises(ClientClosed):
            await in_flight
        assert recorder.of("close") == [(1000, "")]
        await eventually(lambda: len(closed) == 1, what="the server to see the close")
        assert closed[0].code == 1000


@pytest.mark.timeout(60)
async def test_a_thousand_concurrent_proposals(clients: Any) -> None:
    manager = make_manager("doc")
    async with await start_server(manager) as server:
        async with RealtimeClient(server.url) as client:
            clients(client)
            results = await asyncio.wait_for(
                asyncio.gather(*(client.propose("doc", "set", {"i": i}) for i in range(1000))), 45
            )
            assert all(r.accepted for r in results)
            ids = [r.transaction_id for r in results]
            assert sorted(ids, key=int) == [str(n) for n in range(1, 1001)]
            history = manager.get_share_data_by_id("doc").transaction_history
            for i, result in enumerate(results):
                # Each answer went to the call that made the proposal.
                assert history[int(result.transaction_id) - 1].proposed_data == {"i": i}


async def test_4003_from_the_real_server_drops_only_that_subscription(clients: Any) -> None:
    manager = make_manager("doc")
    async with await start_server(manager) as server:
        client = RealtimeClient(server.url)
        clients(client)
        recorder = Recorder(client)
        await client.connect()
        good = client.subscribe("doc")
        heard = channel_recorder(good)
        await eventually(lambda: good.last_transaction_id is None and len(heard) == 1, what="state")
        await apply(manager, "doc", {"n": 1})
        await eventually(lambda: good.last_transaction_id == "1", what="live 1")

        bad = client.subscribe("missing")
        iterated: list[Any] = []
        with pytest.raises(SubscriptionRejected):
            await asyncio.wait_for(consume(bad, iterated), DEADLINE)
        assert bad.is_detached and "missing" not in client.subscriptions
        await eventually(lambda: len(recorder.of("open")) == 2, what="the reconnect")
        assert recorder.of("close")[0][0] == 4003
        assert recorder.of("reconnecting")[0] == (1, 0.0)  # at once
        rejections = [e for e in recorder.errors() if isinstance(e, SubscriptionRejected)]
        assert [e.share_data_id for e in rejections] == ["missing"]

        await apply(manager, "doc", {"n": 2})
        await eventually(lambda: good.last_transaction_id == "2", what="live 2 after the reconnect")
        live = [f.transaction_id for f in heard if f.type == "transaction" and not f.replayed]
        assert live == ["1", "2"]
        assert not good.is_detached


async def test_http_401_at_connect_raises_and_stays_closed(clients: Any) -> None:
    manager = make_manager("doc")
    calls: list[Any] = []

    def deny(request: Any) -> Any:
        calls.append(request.query.get("token"))
        return None

    async with await start_server(manager, authenticate=deny) as server:
        client = RealtimeClient(server.url, token="bad token/=", backoff=FAST)
        clients(client)
        queued = asyncio.ensure_future(client.ping())
        with pytest.raises(Unauthorized) as info:
            await client.connect()
        assert info.value.status == 401
        assert client.state == "closed"
        with pytest.raises(Unauthorized):
            await queued
        await asyncio.sleep(0.4)
        assert calls == ["bad token/="]  # no retries behind the caller's back


async def test_token_is_url_encoded_in_the_query(clients: Any) -> None:
    manager = make_manager("doc")
    seen: list[Any] = []

    def authenticate(request: Any) -> Any:
        seen.append((request.path, request.query.get("token")))
        return {"ok": True}

    async with await start_server(manager, authenticate=authenticate) as server:
        token = "a b+c/d?e&f=g~*'()!"
        async with RealtimeClient(server.url + "?user=alice", token=token) as client:
            clients(client)
            assert client.state == "open"
        path, received = seen[0]
        assert received == token
        assert path == "/realtime?user=alice&token=a%20b%2Bc%2Fd%3Fe%26f%3Dg~*'()!"


async def test_connect_refused_raises_and_does_not_retry(clients: Any) -> None:
    client = RealtimeClient(f"ws://127.0.0.1:{free_port()}/realtime", backoff=FAST)
    clients(client)
    recorder = Recorder(client)
    with pytest.raises(ConnectionFailed):
        await client.connect()
    assert client.state == "closed"
    await asyncio.sleep(0.3)
    assert recorder.of("reconnecting") == []
    # Not sticky: connect() may be tried again (and fails again here).
    with pytest.raises(ConnectionFailed):
        await client.connect()


# -- regressions: what a listener or a quick unsubscribe does on the wire ------------------------


async def test_an_open_listener_that_subscribes_loses_nothing_queued(clients: Any) -> None:
    manager = make_manager("doc", "doc2")
    server = await start_server(manager)
    client = RealtimeClient(server.url)
    clients(client)
    client.on("open", lambda: client.subscribe("doc2"))  # "subscribe once connected"
    doc = client.subscribe("doc")  # made before connect: sent at the open
    doc_frames = channel_recorder(doc)
    proposal = asyncio.ensure_future(client.propose("doc", "set", {"n": 1}, timeout=DEADLINE))
    await asyncio.sleep(0)  # queued while not connected
    try:
        await client.connect()
        # The resubscribe, the queued proposal and the listener's subscribe
        # all reach the server (the listener ran before the connection was
        # current, and its flush used to take everything and drop it).
        assert await asyncio.wait_for(proposal, DEADLINE) == ProposalResult(True, "1", None)
        doc2_frames = channel_recorder(client.subscriptions["doc2"])
        await apply(manager, "doc2", {"n": 7})
        await eventually(lambda: any(f.type == "transaction" for f in doc2_frames), what="doc2's transaction")
        assert [f.type for f in doc_frames][:1] == ["state"]
    finally:
        await server.close()


async def test_a_refused_subscribe_already_unsubscribed_is_not_blamed_on_the_next(clients: Any) -> None:
    manager = make_manager("good", "secret")
    server = await start_server(manager, authorize_subscribe=lambda context, share_data_id: share_data_id != "secret")
    client = RealtimeClient(server.url)
    clients(client)
    recorder = Recorder(client, ("error",))
    try:
        await client.connect()
        secret = client.subscribe("secret")
        secret.unsubscribe()  # before the server's refusal arrives
        good = client.subscribe("good")
        good_frames = channel_recorder(good)
        await eventually(lambda: bool(good_frames), what="good's state")
        await apply(manager, "good", {"n": 1})
        await eventually(lambda: len(good_frames) == 2, what="good's transaction")
        assert not good.is_detached and list(client.subscriptions) == ["good"]
        assert [f.type for f in good_frames] == ["state", "transaction"]
        assert recorder.errors() == []  # the refusal of an unsubscribed id is expected: no error
    finally:
        await server.close()


async def test_an_unknown_id_already_unsubscribed_does_not_drop_the_next_on_4003(clients: Any) -> None:
    manager = make_manager("good")
    server = await start_server(manager)
    client = RealtimeClient(server.url, backoff=FAST)
    clients(client)
    recorder = Recorder(client, ("open", "close", "error"))
    try:
        await client.connect()
        missing = client.subscribe("missing")
        missing.unsubscribe()
        good = client.subscribe("good")
        await eventually(lambda: len(recorder.of("open")) == 2, what="the reconnect after 4003")
        assert recorder.of("close") == [(4003, "unknown shareDataId")]
        assert not good.is_detached and list(client.subscriptions) == ["good"]
        good_frames = channel_recorder(good)
        await apply(manager, "good", {"n": 1})
        await eventually(lambda: any(f.type == "transaction" for f in good_frames), what="good's transaction")
        assert not any(isinstance(e, SubscriptionRejected) for e in recorder.errors())
    finally:
        await server.close()


async def test_connect_again_after_a_stop_is_not_failed_by_the_old_run(scripted_server: Any, clients: Any) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, backoff=Backoff(disabled=True))
    clients(client)
    await client.connect()
    sub = client.subscribe("doc")
    first = await server.next_connection()
    outcome: dict[str, str] = {}

    async def consume_then_reconnect() -> None:
        try:
            async for _ in sub:
                pass
        except Exception as exc:
            outcome["iteration"] = type(exc).__name__
        # The old run has decided to stop but has not woken up yet.
        await client.connect()
        outcome["connect"] = client.state

    consumer = asyncio.ensure_future(consume_then_reconnect())
    await asyncio.sleep(0)
    first.close(1001, "going away")
    await asyncio.wait_for(consumer, DEADLINE)
    assert outcome == {"iteration": "ConnectionClosed", "connect": "open"}
    await server.next_connection()
    await asyncio.sleep(0)  # the old run's last step
    assert client.state == "open"


async def test_a_frame_over_max_message_size_is_reported_not_logged_by_asyncio(clients: Any) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: unhandled.append(context))
    manager = make_manager("big")
    manager.get_share_data_by_id("big").current_state = "x" * 200_000
    server = await start_server(manager)
    client = RealtimeClient(server.url, max_message_size=64 * 1024, backoff=Backoff(disabled=True))
    clients(client)
    recorder = Recorder(client, ("close", "error"))
    try:
        await client.connect()
        client.subscribe("big")
        await eventually(lambda: client.state == "closed", what="the 1009 teardown")
        await eventually(lambda: any(isinstance(e, ProtocolError) for e in recorder.errors()), what="the report")
        (report,) = [e for e in recorder.errors() if isinstance(e, ProtocolError)]
        assert "MESSAGE_TOO_BIG" in str(report)
        assert recorder.of("close")[0][0] == 1009
        for _ in range(3):  # let any unread future be collected and reported
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == []
    finally:
        loop.set_exception_handler(previous)
        await server.close()


async def test_a_subscribe_made_by_a_close_listener_is_sent_once_on_the_next_connection(
    scripted_server: Any, clients: Any
) -> None:
    server = await scripted_server()
    client = RealtimeClient(server.url, backoff=FAST)
    clients(client)
    client.on("close", lambda code, reason: client.subscribe("b") if "b" not in client.subscriptions else None)
    await client.connect()
    client.subscribe("a")
    first = await server.next_connection()
    assert await first.recv() == {"v": 1, "type": "subscribe", "shareDataId": "a"}
    first.close(1001, "going away")
    second = await server.next_connection()
    subscribes = [await second.recv(), await second.recv()]
    barrier = asyncio.ensure_future(client.ping())
    assert (await second.recv())["type"] == "ping"  # the connection is ordered: nothing else came before it
    assert sorted(m["shareDataId"] for m in subscribes) == ["a", "b"]
    assert all(m["type"] == "subscribe" for m in subscribes)
    await asyncio.wait_for(barrier, DEADLINE)


async def test_a_refusal_that_names_an_id_is_never_blamed_on_another(clients: Any) -> None:
    manager = make_manager("A", "C")
    server = await start_server(manager, authorize_subscribe=lambda context, share_data_id: share_data_id != "A")
    client = RealtimeClient(server.url)
    clients(client)
    try:
        await client.connect()
        client.subscribe("A").unsubscribe()
        client.subscribe("A")  # two refusals of A are on their way
        c = client.subscribe("C")
        c_frames = channel_recorder(c)
        await eventually(lambda: bool(c_frames), what="C's state")
        await client.ping()  # both refusals have arrived by now
        assert not c.is_detached and list(client.subscriptions) == ["C"]
    finally:
        await server.close()



class LossyRegistry(InMemoryChannelRegistry):
    """Loses the live frames of some transaction ids on their way to one connection.

    As a Redis outage does for a node's remote subscribers: the transactions
    are applied and recorded in the replay window, the frames never arrive.
    """

    def __init__(self, lose: set[str]) -> None:
        super().__init__()
        self.lose = lose
        self.victim: Any = None

    def broadcast(self, share_data_id: str, message: Any) -> None:
        transaction_id = getattr(message, "transaction_id", None)
        if transaction_id not in self.lose:
            super().broadcast(share_data_id, message)
            return
        self.lose.discard(transaction_id)  # lost once: a replay gets it
        for connection in self.subscribers(share_data_id):
            if connection is not self.victim:
                connection.send_message(message)


@pytest.mark.parametrize("paced", [False, True], ids=["burst", "paced"])
async def test_gap_detection_gives_the_application_every_transaction_once_in_order(clients: Any, paced: bool) -> None:
    manager = make_manager("doc")
    registry = LossyRegistry({"3", "4", "9", "15", "16", "17"})
    async with await start_server(manager, registry=registry) as server:
        lossy, control = RealtimeClient(server.url), RealtimeClient(server.url)
        clients(lossy)
        clients(control)
        await lossy.connect()
        await eventually(lambda: len(server.connections) == 1, what="the lossy client's connection")
        registry.victim = server.connections[0]
        await control.connect()
        seen = {"lossy": channel_recorder(lossy.subscribe("doc"))}
        seen["control"] = channel_recorder(control.subscribe("doc"))
        await eventually(lambda: all(len(frames) == 1 for frames in seen.values()), what="state frames")

        for i in range(1, 21):
            await apply(manager, "doc", {"n": i})
            if paced:
                await asyncio.sleep(0.005)

        def transactions(frames: list[Any]) -> list[str]:
            return [f.transaction_id for f in frames if f.type == "transaction"]

        for frames in seen.values():
            await eventually(lambda: transactions(frames)[-1:] == ["20"], what="transaction 20")
        # Both see every transaction once and in order; the lossy one thanks
        # to the replays its gap detection asked for.
        expected = [str(i) for i in range(1, 21)]
        assert transactions(seen["lossy"]) == expected
        assert transactions(seen["control"]) == expected
        assert [f.type for f in seen["control"]].count("state") == 1
        assert [f.type for f in seen["lossy"]].count("state") >= 2  # resubscribed at least once
        assert registry.lose == set()  # every planned loss happened
