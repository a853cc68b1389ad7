"""The client's decisions, driven in memory: no sockets, no event loop.

``ClientProtocol`` takes frames and connection events in and hands frames to
send, events and reconnect decisions out; these tests assert on exactly that.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from safe_fast.client import (
    Backoff,
    ClientClosed,
    ConnectionClosed,
    ConnectionFailed,
    ProposalResult,
    ProtocolError,
    QueueFull,
    RealtimeError,
    RequestTimeout,
    ServerError,
    SubscriptionRejected,
    Unauthorized,
)
from safe_fast.client._state import (
    CLOSE_POLICIES,
    DEFAULT_CLOSE_POLICY,
    HTTP_401_POLICY,
    ClientProtocol,
    Reconnect,
    Stop,
    close_policy,
)
from safe_fast.messages import (
    CLOSE_FELL_BEHIND,
    CLOSE_INVALID_MESSAGE,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_SHARE_DATA,
    EncodeError,
    LifecycleFrame,
    StateFrame,
    TransactionFrame,
)


class Harness:
    """A protocol object with its outputs captured.

    ``random`` is fixed at 0.5, so every backoff delay is exactly its base.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.events: list[tuple[Any, ...]] = []
        kwargs.setdefault("backoff", Backoff(min=1.0, max=8.0, factor=2.0, jitter=0.2))
        self.core = ClientProtocol(emit=lambda *event: self.events.append(event), random=lambda: 0.5, **kwargs)

    def sent(self) -> list[dict[str, Any]]:
        return [json.loads(data) for data in self.core.data_to_send()]

    def feed(self, message: Any, now: float = 0.0, *, binary: bool = False) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.core.receive(data, now, binary=binary)

    def open(self, now: float = 0.0) -> None:
        if self.core.state in ("idle", "closed"):
            assert self.core.connect() is True
        assert self.core.connection_opened(now) is True

    def take(self, name: str) -> list[tuple[Any, ...]]:
        found = [event[1:] for event in self.events if event[0] == name]
        self.events = [event for event in self.events if event[0] != name]
        return found

    def errors(self) -> list[BaseException]:
        return [args[0] for args in self.take("error")]


def state(share_data_id: str, last: Any = None, current: Any = None) -> dict[str, Any]:
    return {"v": 1, "type": "state", "shareDataId": share_data_id, "currentState": current, "lastTransactionId": last}


def transaction(share_data_id: str, tid: str, *, replayed: bool = False, current: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"v": 1, "type": "transaction", "shareDataId": share_data_id, "transactionId": tid, "accepted": True}
    if replayed:
        frame["replayed"] = True
    else:
        frame["currentState"] = current
    return frame


def lifecycle(share_data_id: str, event: str, current: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"v": 1, "type": "lifecycle", "shareDataId": share_data_id, "event": event}
    if event == "updated":
        frame["currentState"] = current
    return frame


def result(cid: str, accepted: bool = True, tid: str | None = "1", error: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"v": 1, "type": "proposal-result", "correlationId": cid, "accepted": accepted}
    if tid is not None:
        frame["transactionId"] = tid
    if error is not None:
        frame["error"] = error
    return frame


def pong(cid: str) -> dict[str, Any]:
    return {"v": 1, "type": "pong", "correlationId": cid}


def error_frame(code: str, message: str, cid: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"v": 1, "type": "error", "code": code, "message": message}
    if cid is not None:
        frame["correlationId"] = cid
    return frame


# -- the connection machine ------------------------------------------------------------------


def test_starts_idle_and_connect_starts_one_run() -> None:
    h = Harness()
    assert h.core.state == "idle"
    assert h.core.connect() is True
    assert h.core.state == "connecting"
    assert h.core.connect() is False  # already under way
    h.core.connection_opened(1.0)
    assert h.core.state == "open"
    assert h.core.connect() is False
    assert h.take("open") == [()]


def test_open_resubscribes_then_flushes_the_queue_in_order() -> None:
    h = Harness()
    a = h.core.subscribe("a")
    h.core.subscribe("b")
    p1 = h.core.propose("a", "f", {"x": 1}, None, 30.0, now=0.0)
    p2 = h.core.ping(30.0, now=0.0)
    assert h.sent() == []  # nothing can be sent before the open
    assert (p1.status, p2.status) == ("queued", "queued")
    h.open(now=2.0)
    sent = h.sent()
    assert [m["type"] for m in sent] == ["subscribe", "subscribe", "propose", "ping"]
    assert sent[0] == {"v": 1, "type": "subscribe", "shareDataId": "a"}
    assert sent[2] == {
        "v": 1,
        "type": "propose",
        "shareDataId": "a",
        "functionId": "f",
        "proposedData": {"x": 1},
        "correlationId": "c-1",
    }
    assert sent[3] == {"v": 1, "type": "ping", "correlationId": "c-2"}
    assert p1.sent_at == 2.0 and p1.status == "sent"
    # Later reconnects resubscribe with the cursor.
    h.feed(state("a", "7"))
    assert a.last_transaction_id == "7"
    h.core.connection_lost(1006, "", now=3.0)
    h.core.connection_opened(4.0)
    sent = h.sent()
    assert sent == [
        {"v": 1, "type": "subscribe", "shareDataId": "a", "since": "7"},
        {"v": 1, "type": "subscribe", "shareDataId": "b"},
    ]


def test_subscribe_while_open_is_sent_at_once_and_handle_is_reused() -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    assert h.core.subscribe("doc") is sub
    assert h.sent() == [{"v": 1, "type": "subscribe", "shareDataId": "doc"}]
    with pytest.raises(ValueError):
        h.core.subscribe("")


def test_unsubscribe_sends_once_and_detaches() -> None:
    outputs: list[int] = []
    h = Harness(on_output=lambda: outputs.append(1))
    h.open()
    sub = h.core.subscribe("doc")
    h.sent()
    sub.unsubscribe()
    sub.unsubscribe()
    assert h.sent() == [{"v": 1, "type": "unsubscribe", "shareDataId": "doc"}]
    assert outputs == [1]  # the adapter is told to write
    assert sub.is_detached
    assert "doc" not in h.core.subscriptions
    # Frames the server sent before it processed the unsubscribe are expected: no error.
    h.feed(transaction("doc", "3"))
    assert h.errors() == []
    # A new subscribe gives a new handle, which starts from its own state.
    again = h.core.subscribe("doc")
    assert again is not sub
    h.feed(transaction("doc", "4"))  # still a leftover of the old subscription
    assert again.last_transaction_id is None
    h.feed(state("doc", "4"))
    h.feed(transaction("doc", "5"))
    assert again.last_transaction_id == "5"
    assert h.errors() == []


def test_unsubscribe_while_disconnected_sends_nothing() -> None:
    h = Harness()
    sub = h.core.subscribe("doc")
    sub.unsubscribe()
    h.open()
    assert h.sent() == []


# -- cursor rules ---------------------------------------------------------------------------------


def test_cursor_rules() -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    seen: list[Any] = []
    for kind in ("state", "transaction", "lifecycle"):
        sub.on(kind, seen.append)
    assert sub.last_transaction_id is None

    h.feed(state("doc", "3", {"n": 3}))
    assert sub.last_transaction_id == "3"  # state sets it
    h.feed(transaction("doc", "4", current={"n": 4}))
    assert sub.last_transaction_id == "4"  # live advances it
    h.feed(transaction("doc", "2", replayed=True))
    assert sub.last_transaction_id == "4"  # replayed never does
    h.feed(lifecycle("doc", "updated", {"n": 0}))
    assert sub.last_transaction_id == "4"  # updated leaves it
    h.feed(state("doc", None))
    assert sub.last_transaction_id is None  # a state with null resets it

    h.feed(transaction("doc", "1"))  # after an empty history: 1 comes next
    h.feed(lifecycle("doc", "removed"))
    assert sub.last_transaction_id is None  # removed resets it
    assert sub.is_detached
    assert "doc" not in h.core.subscriptions  # and drops the subscription

    assert [type(f) for f in seen] == [
        StateFrame,
        TransactionFrame,
        TransactionFrame,
        LifecycleFrame,
        StateFrame,
        TransactionFrame,
        LifecycleFrame,
    ]
    assert seen[2].replayed is True and seen[1].replayed is False
    # The channel is gone: a later frame for it is unexpected.
    h.feed(transaction("doc", "10"))
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
    # subscribe() after removal builds a fresh handle.
    assert h.core.subscribe("doc") is not sub


def test_resubscribe_after_replay_keeps_newest_live_cursor() -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    h.feed(state("doc", "2"))
    h.feed(transaction("doc", "3"))
    h.core.connection_lost(1001, "going away", now=1.0)
    h.core.connection_opened(2.0)
    assert h.sent()[-1] == {"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "3"}
    h.feed(state("doc", "5"))
    h.feed(transaction("doc", "4", replayed=True))
    h.feed(transaction("doc", "5", replayed=True))
    assert sub.last_transaction_id == "5"
    h.feed(transaction("doc", "6"))
    assert sub.last_transaction_id == "6"


def test_a_live_frame_that_skips_ahead_resubscribes_from_the_cursor() -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    h.sent()
    seen: list[Any] = []
    for kind in ("state", "transaction", "lifecycle"):
        sub.on(kind, seen.append)
    h.feed(state("doc", "2"))
    h.feed(transaction("doc", "3"))
    h.feed(transaction("doc", "3"))  # a duplicate: dropped
    h.feed(transaction("doc", "1"))  # older than the cursor: dropped
    assert h.sent() == []
    h.feed(transaction("doc", "6"))  # 4 and 5 were lost on the way
    assert h.sent() == [{"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "3"}]
    assert sub.last_transaction_id == "3"
    h.feed(transaction("doc", "7"))  # sent before the server took the resubscribe
    h.feed(state("doc", "7"))
    for tid in ("4", "5", "6", "7"):
        h.feed(transaction("doc", tid, replayed=True))
    h.feed(transaction("doc", "8"))
    assert [(f.type, getattr(f, "transaction_id", None), getattr(f, "replayed", None)) for f in seen] == [
        ("state", None, None),
        ("transaction", "3", False),
        ("state", None, None),
        ("transaction", "4", True),
        ("transaction", "5", True),
        ("transaction", "6", True),
        ("transaction", "7", True),
        ("transaction", "8", False),
    ]
    assert sub.last_transaction_id == "8"
    assert h.sent() == [] and h.errors() == []


def subscribed_to_transactions() -> tuple[Harness, Any, list[Any]]:
    """An open harness subscribed to ``doc`` (its subscribe taken), and the transactions its listener sees."""
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    h.sent()
    seen: list[Any] = []
    sub.on("transaction", seen.append)
    return h, sub, seen


def test_gap_detection_needs_a_numeric_cursor_and_restarts_after_updated() -> None:
    h, sub, seen = subscribed_to_transactions()
    h.feed(state("doc", "x"))  # a cursor that is not a number: nothing to compare with
    h.feed(transaction("doc", "5"))
    h.feed(transaction("doc", "6"))
    h.feed(lifecycle("doc", "updated", {"n": 0}))
    h.feed(transaction("doc", "1"))  # a replaced ShareData counts from 1 again
    h.feed(transaction("doc", "2"))
    h.feed(transaction("doc", "x"))  # not a number: taken as it comes
    h.feed(transaction("doc", "y"))
    assert h.sent() == []
    assert sub.last_transaction_id == "y"
    h.feed(transaction("doc", "9"))
    assert [f.transaction_id for f in seen] == ["5", "6", "1", "2", "x", "y", "9"]
    assert h.sent() == [] and h.errors() == []


def test_after_the_state_of_an_empty_history_the_first_live_id_must_be_1() -> None:
    h, sub, seen = subscribed_to_transactions()
    h.feed(state("doc", None))
    h.feed(transaction("doc", "3"))  # 1 and 2 were lost on the way
    # "0": before the first transaction, so the replay can bring 1 and 2.
    assert h.sent() == [{"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "0"}]
    assert seen == [] and sub.last_transaction_id is None
    h.feed(state("doc", "3"))
    for tid in ("1", "2", "3"):
        h.feed(transaction("doc", tid, replayed=True))
    h.feed(transaction("doc", "4"))
    assert [(f.transaction_id, f.replayed) for f in seen] == [("1", True), ("2", True), ("3", True), ("4", False)]
    # A reconnect resumes from the cursor as usual; "0" is only for filling a gap.
    h.core.connection_lost(1001, "going away", now=1.0)
    h.core.connection_opened(2.0)
    assert h.sent()[-1] == {"v": 1, "type": "subscribe", "shareDataId": "doc", "since": "4"}
    # An empty history whose first live frame is 1: in order, no resubscribe.
    fresh = h.core.subscribe("other")
    h.sent()
    h.feed(state("other", None))
    h.feed(transaction("other", "1"))
    assert fresh.last_transaction_id == "1" and h.sent() == [] and h.errors() == []


def test_every_parsed_frame_reaches_message_listeners_typed() -> None:
    h = Harness()
    h.open()
    h.core.subscribe("doc")
    h.feed(state("doc", None))
    h.feed(pong("c-99"))
    messages = [args[0] for args in h.take("message")]
    assert [m.type for m in messages] == ["state", "pong"]
    assert isinstance(messages[0], StateFrame)


# -- requests ------------------------------------------------------------------------------------


def test_correlation_ids_and_out_of_order_answers() -> None:
    h = Harness()
    h.open()
    requests = [h.core.propose("doc", "f", i, None, 30.0, now=0.0) for i in range(3)]
    ping = h.core.ping(30.0, now=1.0)
    assert [r.correlation_id for r in requests] + [ping.correlation_id] == ["c-1", "c-2", "c-3", "c-4"]
    assert [m["correlationId"] for m in h.sent()] == ["c-1", "c-2", "c-3", "c-4"]
    h.feed(result("c-3", tid="30"))
    h.feed(pong("c-4"), now=1.25)
    h.feed(result("c-1", accepted=False, tid="10"))
    h.feed(result("c-2", accepted=False, tid=None, error="unknown functionId f for shareDataId doc"))
    assert requests[0].result == ProposalResult(False, "10", None)
    assert requests[1].result == ProposalResult(False, None, "unknown functionId f for shareDataId doc")
    assert requests[2].result == ProposalResult(True, "30", None)
    assert ping.result == pytest.approx(0.25)
    assert h.core.in_flight == 0
    assert h.errors() == []


def test_answer_of_the_wrong_kind_or_unknown_id_is_reported_and_skipped() -> None:
    h = Harness()
    h.open()
    request = h.core.propose("doc", "f", 1, None, 30.0, now=0.0)
    h.feed(pong("c-1"))
    h.feed(result("c-77"))
    errors = h.errors()
    assert len(errors) == 2 and all(isinstance(e, ProtocolError) for e in errors)
    assert not request.done
    h.feed(result("c-1"))
    assert request.done and request.result.accepted


def test_ping_rtt_counts_from_the_send_not_the_call() -> None:
    h = Harness()
    h.core.connect()
    ping = h.core.ping(30.0, now=0.0)
    h.core.connection_opened(5.0)
    h.feed(pong(ping.correlation_id), now=5.5)
    assert ping.result == pytest.approx(0.5)


def test_queue_limit_fails_at_once_naming_the_limit() -> None:
    h = Harness(max_queue_size=2)
    h.core.ping(30.0, now=0.0)
    h.core.ping(30.0, now=0.0)
    with pytest.raises(QueueFull, match=r"^outbound queue full \(limit 2\)$") as info:
        h.core.propose("doc", "f", 1, None, 30.0, now=0.0)
    assert info.value.limit == 2 and isinstance(info.value, RealtimeError)
    assert h.core.queued == 2
    # While open nothing is queued, so the limit does not apply.
    h.open()
    for _ in range(5):
        h.core.ping(30.0, now=0.0)
    assert h.core.in_flight == 7


def test_unencodable_data_fails_the_call_and_takes_no_slot() -> None:
    h = Harness()
    with pytest.raises(EncodeError):
        h.core.propose("doc", "f", {1, 2}, None, 30.0, now=0.0)
    assert h.core.queued == 0
    with pytest.raises(TypeError):
        h.core.propose("doc", "f", 1, "not-a-dict", 30.0, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        h.core.propose("", "f", 1, None, 30.0, now=0.0)


def test_proof_is_sent_when_given() -> None:
    h = Harness()
    h.open()
    h.core.propose("doc", "f", None, {"sig": "x"}, 30.0, now=0.0)
    assert h.sent() == [
        {"v": 1, "type": "propose", "shareDataId": "doc", "functionId": "f", "proposedData": None, "proof": {"sig": "x"}, "correlationId": "c-1"}
    ]


def test_timeout_of_a_queued_request_removes_it() -> None:
    h = Harness()
    h.core.connect()
    request = h.core.propose("doc", "f", 1, None, 2.0, now=0.0)
    h.core.request_timed_out(request)
    assert isinstance(request.error, RequestTimeout)
    assert isinstance(request.error, TimeoutError)
    assert request.error.queued is True
    assert "while queued" in str(request.error)
    assert h.core.queued == 0
    h.core.connection_opened(1.0)
    assert h.sent() == []  # never sent


def test_timeout_of_a_sent_request_ignores_its_late_answer() -> None:
    h = Harness()
    h.open()
    request = h.core.propose("doc", "f", 1, None, 2.0, now=0.0)
    h.core.request_timed_out(request)
    assert isinstance(request.error, RequestTimeout) and request.error.queued is False
    h.feed(result(request.correlation_id))
    assert h.errors() == []  # expected late answer, not an error
    assert request.result is None


def test_abandoned_requests_are_not_sent() -> None:
    h = Harness()
    h.core.connect()
    request = h.core.ping(30.0, now=0.0)
    h.core.abandon(request)
    h.core.connection_opened(1.0)
    assert h.sent() == []


def test_connection_loss_fails_in_flight_but_keeps_the_queue() -> None:
    h = Harness()
    h.open()
    in_flight = [h.core.ping(30.0, now=0.0) for _ in range(3)]
    decision = h.core.connection_lost(1006, "", now=1.0)
    assert isinstance(decision, Reconnect)
    for request in in_flight:
        assert isinstance(request.error, ConnectionClosed)
        assert (request.error.code, request.error.reason) == (1006, "")
        assert str(request.error) == "connection closed: 1006 "
    assert len({id(r.error) for r in in_flight}) == 3  # one exception object each
    queued = h.core.ping(30.0, now=1.5)
    assert queued.status == "queued"
    h.core.connection_opened(2.0)
    assert [m["correlationId"] for m in h.sent()][-1] == queued.correlation_id
    assert h.take("close") == [(1006, "")]


def test_requests_on_a_stopped_client_fail_at_once() -> None:
    h = Harness(backoff=Backoff(disabled=True))
    h.open()
    h.core.connection_lost(1001, "bye", now=1.0)
    assert h.core.state == "closed"
    with pytest.raises(ClientClosed):
        h.core.ping(30.0, now=2.0)


# -- close() ----------------------------------------------------------------------------------------


def test_close_is_sticky_and_fails_everything() -> None:
    h = Harness()
    sub = h.core.subscribe("doc")
    queued = h.core.ping(30.0, now=0.0)
    h.open()
    in_flight = h.core.ping(30.0, now=0.0)
    assert h.core.close() is True
    assert h.core.state == "closed"
    assert isinstance(in_flight.error, ClientClosed)
    assert queued.done and isinstance(queued.error, ClientClosed)  # it was in flight
    assert sub.is_detached
    assert h.core.close() is False  # idempotent
    for call in (lambda: h.core.ping(1.0, now=0.0), lambda: h.core.subscribe("x"), h.core.connect):
        with pytest.raises(ClientClosed):
            call()
    # The socket closing afterwards reports close and stops.
    decision = h.core.connection_lost(1000, "client closed", now=1.0)
    assert decision == Stop(None)
    assert h.take("close") == [(1000, "client closed")]
    assert h.take("reconnecting") == []


def test_close_fails_queued_requests() -> None:
    h = Harness()
    h.core.connect()
    queued = [h.core.ping(30.0, now=0.0) for _ in range(3)]
    assert h.core.close() is True
    assert all(isinstance(r.error, ClientClosed) for r in queued)
    # A connection that opens after close() is refused.
    assert h.core.connection_opened(1.0) is False


# -- the close-code policy table ------------------------------------------------------------------


def test_policy_table() -> None:
    assert close_policy(CLOSE_FELL_BEHIND).name == "resume" and close_policy(CLOSE_FELL_BEHIND).immediate
    assert close_policy(CLOSE_UNAUTHORIZED).unauthorized
    assert close_policy(CLOSE_UNKNOWN_SHARE_DATA).drop_subscription
    assert close_policy(CLOSE_UNKNOWN_SHARE_DATA).immediate
    assert close_policy(CLOSE_INVALID_MESSAGE).report and not close_policy(CLOSE_INVALID_MESSAGE).immediate
    assert HTTP_401_POLICY is CLOSE_POLICIES[CLOSE_UNAUTHORIZED]
    for code in (1000, 1001, 1006, 1009, 1011, 4000, 4999):
        assert close_policy(code) is DEFAULT_CLOSE_POLICY


@pytest.mark.parametrize(
    "code, first_delay",
    [(1000, 1.0), (1001, 1.0), (1006, 1.0), (1011, 1.0), (CLOSE_INVALID_MESSAGE, 1.0), (CLOSE_FELL_BEHIND, 0.0)],
)
def test_reconnect_delays_per_close_code(code: int, first_delay: float) -> None:
    h = Harness()
    h.open(now=0.0)
    decision = h.core.connection_lost(code, "r", now=0.1)
    assert decision == Reconnect(first_delay, 1)
    assert h.core.state == "reconnecting"
    assert h.take("reconnecting") == [(1, first_delay)]
    assert h.take("close") == [(code, "r")]


def test_4001_resumes_at_once_only_once_in_a_streak() -> None:
    h = Harness()
    h.open(now=0.0)
    assert h.core.connection_lost(CLOSE_FELL_BEHIND, "", now=1.0) == Reconnect(0.0, 1)
    h.core.connection_opened(1.0)
    # Closed again before it was stable: the streak goes on, with backoff.
    assert h.core.connection_lost(CLOSE_FELL_BEHIND, "", now=1.5) == Reconnect(2.0, 2)
    h.core.connection_opened(3.5)
    assert h.core.connection_lost(CLOSE_FELL_BEHIND, "", now=4.0) == Reconnect(4.0, 3)
    # Stable for stable_after (5 s): the streak is over, at once again.
    h.core.connection_opened(8.0)
    assert h.core.connection_lost(CLOSE_FELL_BEHIND, "", now=13.0) == Reconnect(0.0, 1)


def test_attempt_counter_resets_only_after_a_stable_connection() -> None:
    h = Harness(stable_after=5.0)
    h.open(now=0.0)
    delays = []
    now = 0.0
    for _ in range(5):
        # Accepted, then closed at once: the server cannot cause a tight loop.
        now += 0.01
        decision = h.core.connection_lost(1000, "", now=now)
        assert isinstance(decision, Reconnect)
        delays.append(decision.delay)
        now += decision.delay
        h.core.connection_opened(now)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    now += 5.0
    assert h.core.connection_lost(1000, "", now=now).delay == 1.0


def test_failed_attempts_continue_the_streak() -> None:
    h = Harness()
    h.open(now=0.0)
    h.core.connection_lost(1006, "", now=10.0)
    failure = ConnectionFailed("refused")
    assert h.core.attempt_failed(failure, now=11.0) == Reconnect(2.0, 2)
    assert h.core.attempt_failed(failure, now=13.0) == Reconnect(4.0, 3)
    assert h.errors() == [failure, failure]  # each failed attempt is reported
    assert h.core.state == "reconnecting"


def test_4002_with_a_fixed_token_stops() -> None:
    h = Harness()
    sub = h.core.subscribe("doc")
    h.open()
    in_flight = h.core.ping(30.0, now=0.0)
    decision = h.core.connection_lost(CLOSE_UNAUTHORIZED, "token expired", now=1.0)
    assert isinstance(decision, Stop) and isinstance(decision.error, Unauthorized)
    assert decision.error.code == CLOSE_UNAUTHORIZED
    assert h.core.state == "closed"
    assert isinstance(in_flight.error, ConnectionClosed) and in_flight.error.code == 4002
    assert sub.is_detached
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], Unauthorized)
    assert h.take("reconnecting") == []
    # Not sticky: connect() may start again.
    assert h.core.connect() is True


def test_4002_with_a_refreshable_token_reconnects_with_backoff() -> None:
    h = Harness(token_refreshable=True)
    sub = h.core.subscribe("doc")
    h.open()
    assert h.core.connection_lost(CLOSE_UNAUTHORIZED, "token expired", now=1.0) == Reconnect(1.0, 1)
    assert not sub.is_detached
    assert h.errors() == []


def test_http_401_on_reconnect() -> None:
    fixed = Harness()
    fixed.open()
    fixed.core.connection_lost(1001, "", now=1.0)
    decision = fixed.core.attempt_failed(Unauthorized("401", status=401), now=2.0)
    assert isinstance(decision, Stop) and isinstance(decision.error, Unauthorized)
    assert fixed.core.state == "closed"

    refreshable = Harness(token_refreshable=True)
    refreshable.open()
    refreshable.core.connection_lost(1001, "", now=1.0)
    assert isinstance(refreshable.core.attempt_failed(Unauthorized("401", status=401), now=2.0), Reconnect)


def test_first_attempt_failure_stops_the_run_and_fails_the_queue() -> None:
    h = Harness()
    sub = h.core.subscribe("doc")
    queued = h.core.ping(30.0, now=0.0)
    h.core.connect()
    failure = ConnectionFailed("refused")
    decision = h.core.attempt_failed(failure, now=0.1)
    assert decision == Stop(failure)
    assert h.core.state == "closed"
    assert isinstance(queued.error, ConnectionFailed) and queued.error.__cause__ is failure
    assert sub.is_detached
    assert h.errors() == []  # raised by connect(), not reported twice
    assert h.core.connect() is True  # may be tried again


def test_4003_drops_the_first_unanswered_subscribe() -> None:
    h = Harness()
    a = h.core.subscribe("a")
    b = h.core.subscribe("b")
    c = h.core.subscribe("c")
    h.open()
    h.sent()
    h.feed(state("a", "1"))
    # b is unknown: the server closes at it, before it ever reads c.
    decision = h.core.connection_lost(CLOSE_UNKNOWN_SHARE_DATA, "unknown shareDataId", now=1.0)
    assert decision == Reconnect(0.0, 1)
    assert b.is_detached and not a.is_detached and not c.is_detached
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], SubscriptionRejected)
    assert errors[0].share_data_id == "b" and errors[0].code == "unknown-share-data"
    h.core.connection_opened(1.0)
    assert h.sent() == [
        {"v": 1, "type": "subscribe", "shareDataId": "a", "since": "1"},
        {"v": 1, "type": "subscribe", "shareDataId": "c"},
    ]


def test_4003_culprit_named_by_the_error_frame() -> None:
    h = Harness()
    h.open()
    a = h.core.subscribe("a")
    b = h.core.subscribe("b")
    h.feed(error_frame("unknown-share-data", "shareDataId b not found"))
    assert b.is_detached and not a.is_detached
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], SubscriptionRejected) and errors[0].share_data_id == "b"
    # The close that follows drops nothing more and reconnects at once.
    assert h.core.connection_lost(CLOSE_UNKNOWN_SHARE_DATA, "unknown shareDataId", now=1.0) == Reconnect(0.0, 1)
    assert not a.is_detached
    assert h.errors() == []


def test_4003_without_a_culprit_backs_off() -> None:
    h = Harness()
    h.open()
    assert h.core.connection_lost(CLOSE_UNKNOWN_SHARE_DATA, "", now=1.0) == Reconnect(1.0, 1)


def test_unauthorized_subscribe_drops_that_subscription_only() -> None:
    h = Harness()
    h.open()
    a = h.core.subscribe("a")
    b = h.core.subscribe("b")
    h.feed(error_frame("unauthorized-subscribe", "authorizer threw: boom"))
    assert a.is_detached and not b.is_detached  # the oldest unanswered subscribe
    h.feed(error_frame("unauthorized-subscribe", "not authorized to subscribe to b"))
    assert b.is_detached
    errors = h.errors()
    assert [e.share_data_id for e in errors] == ["a", "b"]  # type: ignore[attr-defined]
    assert h.core.state == "open"


def test_4004_is_reported_and_backs_off() -> None:
    h = Harness()
    h.open()
    assert h.core.connection_lost(CLOSE_INVALID_MESSAGE, "invalid message", now=1.0) == Reconnect(1.0, 1)
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed) and errors[0].code == 4004


def test_reconnect_disabled_stops_and_fails_the_queue() -> None:
    h = Harness(backoff=Backoff(disabled=True))
    sub = h.core.subscribe("doc")
    h.open()
    decision = h.core.connection_lost(CLOSE_FELL_BEHIND, "fell behind", now=1.0)
    assert isinstance(decision, Stop) and isinstance(decision.error, ConnectionClosed)
    assert h.core.state == "closed"
    assert sub.is_detached
    assert h.take("reconnecting") == []


# -- bad server input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2, 3]",
        b'{"v": 1, "type": "nope"}',
        b'{"v": 2, "type": "pong", "correlationId": "c-1"}',
        b'{"v": true, "type": "pong", "correlationId": "c-1"}',
        b'{"v": 1, "type": "state", "shareDataId": 5, "lastTransactionId": null}',
        b'{"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "", "accepted": true}',
        b'{"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "exploded"}',
        b'{"type": "pong"}',
    ],
)
def test_bad_input_is_reported_and_skipped(payload: bytes) -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    h.feed(state("doc", "1"))
    h.feed(payload)
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
    assert errors[0].data == payload
    assert h.core.state == "open"
    h.feed(transaction("doc", "2"))
    assert sub.last_transaction_id == "2"


def test_binary_frames_are_reported_and_skipped() -> None:
    h = Harness()
    h.open()
    sub = h.core.subscribe("doc")
    h.feed(json.dumps(state("doc", "1")).encode(), binary=True)
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError) and "binary" in str(errors[0])
    assert sub.last_transaction_id is None


def test_frames_for_unknown_subscriptions_are_reported_and_skipped() -> None:
    h = Harness()
    h.open()
    h.feed(transaction("ghost", "1"))
    h.feed(lifecycle("ghost", "removed"))
    errors = h.errors()
    assert len(errors) == 2 and all(isinstance(e, ProtocolError) for e in errors)


def test_server_error_frames() -> None:
    h = Harness()
    h.open()
    request = h.core.ping(30.0, now=0.0)
    h.feed(error_frame("replay-cursor-not-found", "since=4 not present"))
    errors = h.errors()
    assert len(errors) == 1 and isinstance(errors[0], ServerError)
    assert (errors[0].code, errors[0].message) == ("replay-cursor-not-found", "since=4 not present")
    # An error frame that names a request fails that request instead.
    h.feed(error_frame("rate-limited", "slow down", cid=request.correlation_id))
    assert isinstance(request.error, ServerError) and request.error.code == "rate-limited"
    assert h.errors() == []


def test_frames_after_close_are_ignored() -> None:
    h = Harness()
    h.open()
    h.core.close()
    h.feed(b"garbage")
    assert h.errors() == []
