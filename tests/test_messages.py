"""The wire protocol module: parsing, validation texts, encoding."""

from __future__ import annotations

import json

import orjson
import pytest

from safe_fast import messages as m
from safe_fast.messages import (
    EncodeError,
    ErrorFrame,
    InvalidMessage,
    LifecycleFrame,
    Ping,
    PongFrame,
    ProposalResultFrame,
    Propose,
    StateFrame,
    Subscribe,
    TransactionFrame,
    Unsubscribe,
    encode_message,
    parse_client_message,
    parse_server_message,
)


def j(**fields: object) -> bytes:
    return orjson.dumps(fields)


# -- client messages: valid ----------------------------------------------------------

VALID_CLIENT = [
    (j(v=1, type="subscribe", shareDataId="doc"), Subscribe("doc")),
    (j(v=1, type="subscribe", shareDataId="doc", since="7"), Subscribe("doc", "7")),
    (j(v=1, type="subscribe", shareDataId="doc", since=""), Subscribe("doc", "")),
    (j(v=1.0, type="subscribe", shareDataId="doc"), Subscribe("doc")),
    (j(v=1, type="subscribe", shareDataId="doc", extra={"x": 1}, more=[1]), Subscribe("doc")),
    (j(v=1, type="unsubscribe", shareDataId="doc"), Unsubscribe("doc")),
    (
        j(v=1, type="propose", shareDataId="doc", functionId="inc", proposedData={"n": 1}, correlationId="c-1"),
        Propose("doc", "inc", {"n": 1}, "c-1"),
    ),
    (
        j(v=1, type="propose", shareDataId="doc", functionId="inc", correlationId="c-1"),
        Propose("doc", "inc", None, "c-1"),
    ),
    (
        j(v=1, type="propose", shareDataId="doc", functionId="inc", proposedData=None, correlationId="c"),
        Propose("doc", "inc", None, "c"),
    ),
    (
        j(v=1, type="propose", shareDataId="d", functionId="f", proposedData=[1, "a"], proof={"sig": "x"}, correlationId="c"),
        Propose("d", "f", [1, "a"], "c", {"sig": "x"}),
    ),
    (j(v=1, type="ping", correlationId="c-9"), Ping("c-9")),
    ('{"v":1,"type":"ping","correlationId":"é"}', Ping("é")),
]


@pytest.mark.parametrize(("data", "expected"), VALID_CLIENT)
def test_parse_valid_client_messages(data: bytes | str, expected: object) -> None:
    assert parse_client_message(data) == expected


def test_parse_accepts_decoded_dicts_and_memoryviews() -> None:
    assert parse_client_message({"v": 1, "type": "ping", "correlationId": "x"}) == Ping("x")
    assert parse_client_message(memoryview(j(v=1, type="ping", correlationId="x"))) == Ping("x")
    assert parse_client_message(bytearray(j(v=1, type="ping", correlationId="x"))) == Ping("x")


# -- client messages: invalid, with the exact text ---------------------------------------

INVALID_CLIENT = [
    # not JSON / not an object
    (b"", "message: not valid JSON"),
    (b"{", "message: not valid JSON"),
    (b"{'v': 1}", "message: not valid JSON"),
    (b'{"v":1,"type":"ping","correlationId":"c"} trailing', "message: not valid JSON"),
    (b"NaN", "message: not valid JSON"),
    (b'{"v":1,"type":"propose","shareDataId":"d","functionId":"f","proposedData":1e400,"correlationId":"c"}', "message: not valid JSON"),
    (b'{"v":1,"type":"propose","shareDataId":"d","functionId":"f","proposedData":NaN,"correlationId":"c"}', "message: not valid JSON"),
    (b"[" * 2000 + b"]" * 2000, "message: not valid JSON"),
    (b'{"v":1,"type":"ping","correlationId":"\xff\xfe"}', "message: not valid UTF-8"),
    (b"\xc3\x28", "message: not valid UTF-8"),
    (b"[]", "message: must be a JSON object"),
    (b"1", "message: must be a JSON object"),
    (b'"subscribe"', "message: must be a JSON object"),
    (b"null", "message: must be a JSON object"),
    # the envelope
    (j(type="ping", correlationId="c"), "v: required"),
    (j(v=2, type="ping", correlationId="c"), "v: must be 1"),
    (j(v=True, type="ping", correlationId="c"), "v: must be 1"),
    (j(v="1", type="ping", correlationId="c"), "v: must be 1"),
    (j(v=None, type="ping", correlationId="c"), "v: must be 1"),
    (j(v=0, type="ping", correlationId="c"), "v: must be 1"),
    (j(v=1, correlationId="c"), "type: required"),
    (j(v=1, type="publish"), "type: must be one of subscribe, unsubscribe, propose, ping"),
    (j(v=1, type=1), "type: must be one of subscribe, unsubscribe, propose, ping"),
    (j(v=1, type="Subscribe", shareDataId="d"), "type: must be one of subscribe, unsubscribe, propose, ping"),
    (j(type="nope"), "v: required; type: must be one of subscribe, unsubscribe, propose, ping"),
    (j(), "v: required; type: required"),
    # subscribe
    (j(v=1, type="subscribe"), "shareDataId: required"),
    (j(v=1, type="subscribe", shareDataId=""), "shareDataId: must be a non-empty string"),
    (j(v=1, type="subscribe", shareDataId=5), "shareDataId: must be a non-empty string"),
    (j(v=1, type="subscribe", shareDataId=None), "shareDataId: must be a non-empty string"),
    (j(v=1, type="subscribe", shareDataId=["d"]), "shareDataId: must be a non-empty string"),
    (j(v=1, type="subscribe", shareDataId="d", since=7), "since: must be a string"),
    (j(v=1, type="subscribe", shareDataId="d", since=None), "since: must be a string"),
    (j(v=True, type="subscribe", shareDataId="", since=1), "v: must be 1; shareDataId: must be a non-empty string; since: must be a string"),
    # unsubscribe
    (j(v=1, type="unsubscribe"), "shareDataId: required"),
    (j(v=1, type="unsubscribe", shareDataId={}), "shareDataId: must be a non-empty string"),
    # propose
    (j(v=1, type="propose"), "shareDataId: required; functionId: required; correlationId: required"),
    (j(v=1, type="propose", shareDataId="d", functionId="f"), "correlationId: required"),
    (j(v=1, type="propose", shareDataId="d", correlationId="c"), "functionId: required"),
    (j(v=1, type="propose", shareDataId="d", functionId="", correlationId="c"), "functionId: must be a non-empty string"),
    (j(v=1, type="propose", shareDataId="d", functionId=3, correlationId="c"), "functionId: must be a non-empty string"),
    (j(v=1, type="propose", shareDataId="d", functionId="f", correlationId=""), "correlationId: must be a non-empty string"),
    (j(v=1, type="propose", shareDataId="d", functionId="f", correlationId=1), "correlationId: must be a non-empty string"),
    (j(v=1, type="propose", shareDataId="d", functionId="f", correlationId="c", proof="sig"), "proof: must be an object"),
    (j(v=1, type="propose", shareDataId="d", functionId="f", correlationId="c", proof=[1]), "proof: must be an object"),
    (j(v=1, type="propose", shareDataId="d", functionId="f", correlationId="c", proof=None), "proof: must be an object"),
    # ping
    (j(v=1, type="ping"), "correlationId: required"),
    (j(v=1, type="ping", correlationId=""), "correlationId: must be a non-empty string"),
    (j(v=1, type="ping", correlationId=False), "correlationId: must be a non-empty string"),
]


@pytest.mark.parametrize(("data", "text"), INVALID_CLIENT)
def test_parse_invalid_client_messages(data: bytes, text: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_client_message(data)
    assert str(info.value) == text
    assert info.value.problems == text.split("; ")


def test_invalid_table_is_large_enough() -> None:
    assert len(INVALID_CLIENT) >= 25


def test_deep_nesting_within_decoder_limit_is_accepted() -> None:
    nested = b"[" * 500 + b"]" * 500
    data = b'{"v":1,"type":"propose","shareDataId":"d","functionId":"f","correlationId":"c","proposedData":' + nested + b"}"
    assert isinstance(parse_client_message(data), Propose)


def test_large_proposed_data_parses() -> None:
    blob = "x" * (2 * 1024 * 1024)
    message = parse_client_message(j(v=1, type="propose", shareDataId="d", functionId="f", proposedData=blob, correlationId="c"))
    assert isinstance(message, Propose) and message.proposed_data == blob


# -- server messages ---------------------------------------------------------------

SERVER_FRAMES = [
    (StateFrame("doc", {"n": 1}, "3"), {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"n": 1}, "lastTransactionId": "3"}),
    (StateFrame("doc", None, None), {"v": 1, "type": "state", "shareDataId": "doc", "currentState": None, "lastTransactionId": None}),
    (
        TransactionFrame("doc", "4", True, {"n": 2}),
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "4", "accepted": True, "currentState": {"n": 2}},
    ),
    (
        TransactionFrame("doc", "5", False, None),
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "5", "accepted": False, "currentState": None},
    ),
    (
        TransactionFrame("doc", "4", True, replayed=True),
        {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": "4", "accepted": True, "replayed": True},
    ),
    (
        LifecycleFrame("doc", "updated", [1, 2]),
        {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "updated", "currentState": [1, 2]},
    ),
    (LifecycleFrame("doc", "removed"), {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"}),
    (
        ProposalResultFrame("c-1", True, transaction_id="9"),
        {"v": 1, "type": "proposal-result", "correlationId": "c-1", "accepted": True, "transactionId": "9"},
    ),
    (
        ProposalResultFrame("c-2", False, error="nope"),
        {"v": 1, "type": "proposal-result", "correlationId": "c-2", "accepted": False, "error": "nope"},
    ),
    (PongFrame("c-3"), {"v": 1, "type": "pong", "correlationId": "c-3"}),
    (ErrorFrame("invalid-message", "v: must be 1"), {"v": 1, "type": "error", "code": "invalid-message", "message": "v: must be 1"}),
    (
        ErrorFrame("x", "", correlation_id="c-4"),
        {"v": 1, "type": "error", "code": "x", "message": "", "correlationId": "c-4"},
    ),
]


@pytest.mark.parametrize(("frame", "wire"), SERVER_FRAMES)
def test_encode_server_frames_exact_keys(frame: object, wire: dict) -> None:
    encoded = encode_message(frame)  # type: ignore[arg-type]
    assert json.loads(encoded) == wire
    assert list(json.loads(encoded)) == list(wire), "key order: envelope first"
    assert encoded == orjson.dumps(wire)  # compact, no whitespace
    assert parse_server_message(encoded) == frame


@pytest.mark.parametrize(("data", "_"), VALID_CLIENT)
def test_client_messages_round_trip(data: bytes, _: object) -> None:
    message = parse_client_message(data)
    assert parse_client_message(encode_message(message)) == message


def test_optional_keys_are_omitted_not_null() -> None:
    assert b"null" not in encode_message(ProposalResultFrame("c", False))
    assert b"since" not in encode_message(Subscribe("d"))
    assert b"proof" not in encode_message(Propose("d", "f", 1, "c"))
    assert b"proposedData" in encode_message(Propose("d", "f", None, "c"))
    assert b"correlationId" not in encode_message(ErrorFrame("c", "m"))


INVALID_SERVER = [
    (j(v=1, type="state", shareDataId="d", currentState=1), "lastTransactionId: required"),
    (j(v=1, type="state", shareDataId="d", lastTransactionId=3), "lastTransactionId: must be a string or null"),
    (j(v=1, type="transaction", shareDataId="d", transactionId="", accepted=True), "transactionId: must be a non-empty string"),
    (j(v=1, type="transaction", shareDataId="d", transactionId="1", accepted="yes"), "accepted: must be a boolean"),
    (j(v=1, type="transaction", shareDataId="d", transactionId="1", accepted=1), "accepted: must be a boolean"),
    (j(v=1, type="transaction", shareDataId="d", transactionId="1", accepted=True, replayed=1), "replayed: must be a boolean"),
    (j(v=1, type="lifecycle", shareDataId="d", event="created"), "event: must be one of updated, removed"),
    (j(v=1, type="proposal-result", correlationId="c"), "accepted: required"),
    (j(v=1, type="proposal-result", correlationId="c", accepted=False, error=5), "error: must be a string"),
    (j(v=1, type="pong"), "correlationId: required"),
    (j(v=1, type="error", code="x"), "message: required"),
    (j(v=1, type="error", code="", message="m"), "code: must be a non-empty string"),
    (j(v=1, type="subscribe", shareDataId="d"), "type: must be one of state, transaction, lifecycle, proposal-result, pong, error"),
    (j(v=2, type="pong", correlationId="c"), "v: must be 1"),
    (b"garbage", "message: not valid JSON"),
]


@pytest.mark.parametrize(("data", "text"), INVALID_SERVER)
def test_parse_invalid_server_messages(data: bytes, text: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_server_message(data)
    assert str(info.value) == text


def test_server_parse_tolerates_absent_current_state() -> None:
    frame = parse_server_message(j(v=1, type="state", shareDataId="d", lastTransactionId=None))
    assert frame == StateFrame("d", None, None)


# -- encoding edge cases --------------------------------------------------------------


def test_big_integers_fall_back_to_the_standard_encoder() -> None:
    big = 2**70
    encoded = encode_message(StateFrame("d", {"n": big}, None))
    assert json.loads(encoded)["currentState"]["n"] == big


def test_non_string_keys_fall_back() -> None:
    assert json.loads(encode_message(StateFrame("d", {1: "a"}, None)))["currentState"] == {"1": "a"}


def test_nan_encodes_as_null_like_json_stringify() -> None:
    # JSON has no NaN; the TypeScript server's JSON.stringify sends null too.
    assert json.loads(encode_message(StateFrame("d", [float("nan")], None)))["currentState"] == [None]


@pytest.mark.parametrize("state", [{1, 2}, object(), {"k": {1: float("nan"), "x": {2}}}])
def test_unencodable_state_raises_encode_error(state: object) -> None:
    with pytest.raises(EncodeError, match="cannot encode as JSON"):
        encode_message(StateFrame("d", state, None))


def test_nan_is_null_on_the_standard_library_route_too() -> None:
    # A big integer sends the whole state down the fallback; its NaN must not fail it.
    encoded = encode_message(StateFrame("d", {"big": 2**70, "x": float("nan"), 1: [float("-inf")]}, None))
    assert json.loads(encoded)["currentState"] == {"big": 2**70, "x": None, "1": [None]}


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


def test_json_rendering_of_state_json_has_no_form_for() -> None:
    state = {"tags": {"b", "a"}, "mixed": frozenset({1}), "obj": Opaque(), "x": float("nan"), "big": 2**70, 3: (1, 2)}
    assert m.json_rendering(state) == {"tags": ["a", "b"], "mixed": [1], "obj": "opaque!", "x": None, "big": 2**70, "3": [1, 2]}
    assert m.json_rendering({(1, 2): "pair", None: 0, True: 1}) == {"(1, 2)": "pair", "null": 0, "true": 1}
    assert m.json_rendering({"s": {1, "a"}})["s"] in ([1, "a"], ["a", 1])  # unsortable: as they come
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(EncodeError, match="cannot render as JSON"):
        m.json_rendering(cycle)


# Deeper than any interpreter's stack allows: 3.10/3.11 stop json.dumps at the
# recursion limit (~1,000), 3.12+ at a separate, much higher C-stack bound.
DEEPER_THAN_ANY_STACK = 200_000


def test_nesting_too_deep_for_the_stack_raises_encode_error() -> None:
    state: list[object] = []
    for _ in range(DEEPER_THAN_ANY_STACK):
        state = [state]
    with pytest.raises(EncodeError, match="cannot encode as JSON: RecursionError"):
        encode_message(StateFrame("d", state, None))


def test_close_codes() -> None:
    assert (m.CLOSE_FELL_BEHIND, m.CLOSE_UNAUTHORIZED, m.CLOSE_UNKNOWN_SHARE_DATA, m.CLOSE_INVALID_MESSAGE) == (
        4001,
        4002,
        4003,
        4004,
    )
    assert m.CLOSE_REASONS[m.CLOSE_INVALID_MESSAGE] == "invalid message"
    assert m.CLOSE_REASONS[m.CLOSE_UNKNOWN_SHARE_DATA] == "unknown shareDataId"


def test_message_types() -> None:
    assert [c.type for c in (Subscribe, Unsubscribe, Propose, Ping)] == ["subscribe", "unsubscribe", "propose", "ping"]
    assert [c.type for c in (StateFrame, TransactionFrame, LifecycleFrame, ProposalResultFrame, PongFrame, ErrorFrame)] == [
        "state",
        "transaction",
        "lifecycle",
        "proposal-result",
        "pong",
        "error",
    ]
