"""The SAFE realtime wire protocol, version 1: messages, validation, encoding.

Rules of this module:

* No I/O. Everything here turns bytes into typed messages and back, so the
  server, the client and the tests share one definition of the wire.
* Every message is one JSON object ``{"v": 1, "type": ..., ...}`` with
  camelCase keys. Optional keys are *omitted*, never sent as ``null``, unless
  the protocol says the key is present with a null value
  (``lastTransactionId``).
* Parsing never raises anything but :class:`InvalidMessage`, whose text names
  every offending field as ``"<field>: <what is wrong>"``, joined by ``"; "``.
  Problems with the message as a whole use the field name ``message``.
* Unknown extra keys are ignored, as the reference schemas strip them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import orjson

__all__ = [
    "PROTOCOL_VERSION",
    "CLOSE_FELL_BEHIND",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNKNOWN_SHARE_DATA",
    "CLOSE_INVALID_MESSAGE",
    "CLOSE_REASONS",
    "InvalidMessage",
    "EncodeError",
    "Subscribe",
    "Unsubscribe",
    "Propose",
    "Ping",
    "ClientMessage",
    "StateFrame",
    "TransactionFrame",
    "LifecycleFrame",
    "ProposalResultFrame",
    "PongFrame",
    "ErrorFrame",
    "ServerMessage",
    "parse_client_message",
    "parse_server_message",
    "encode_message",
    "encode_json",
    "json_rendering",
    "decode_json",
    "transaction_number",
]

PROTOCOL_VERSION = 1

CLOSE_FELL_BEHIND = 4001
"""The connection's send buffer passed ``max_buffered_bytes``."""
CLOSE_UNAUTHORIZED = 4002
"""Credentials rejected or expired."""
CLOSE_UNKNOWN_SHARE_DATA = 4003
"""Subscribe to a shareDataId that does not exist."""
CLOSE_INVALID_MESSAGE = 4004
"""A frame could not be parsed."""

CLOSE_REASONS: dict[int, str] = {
    CLOSE_FELL_BEHIND: "send buffer exceeded",
    CLOSE_UNAUTHORIZED: "unauthorized",
    CLOSE_UNKNOWN_SHARE_DATA: "unknown shareDataId",
    CLOSE_INVALID_MESSAGE: "invalid message",
}
"""The close reason the server sends with each application close code."""


def transaction_number(transaction_id: Any) -> Optional[int]:
    """The number of a decimal transaction id (``"12"`` -> 12); None for any other id.

    Ids of one ShareData count 1, 2, 3…: compared as numbers, never as strings.
    """
    if type(transaction_id) is str and transaction_id.isdigit() and transaction_id.isascii():
        return int(transaction_id)
    return None


class InvalidMessage(ValueError):
    """A frame that is not a valid protocol message.

    ``str(exc)`` is the text sent to the peer in the ``invalid-message`` error
    frame; ``problems`` holds its parts.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class EncodeError(TypeError):
    """A message whose content cannot be represented as JSON."""


# -- JSON ------------------------------------------------------------------


def decode_json(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode one JSON document, refusing NaN, infinities and deep nesting.

    Raises :class:`InvalidMessage`.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if not isinstance(data, str):
            try:
                bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidMessage(["message: not valid UTF-8"]) from None
        raise InvalidMessage(["message: not valid JSON"]) from None


def encode_json(obj: Any) -> bytes:
    """Compact JSON bytes for *obj*.

    orjson covers everything on the hot path and writes NaN and infinities
    as ``null`` (as ``JSON.stringify`` does). It refuses integers beyond 64
    bits, non-string keys and nesting deeper than 255, which an application
    may legitimately put in its state, so those take the slower
    standard-library route (with the same ``null`` for NaN) instead of
    failing a broadcast. Content that JSON cannot express at all (a set, an
    arbitrary object, a reference cycle, nesting too deep for the
    interpreter's stack) raises :class:`EncodeError`.
    """
    try:
        return orjson.dumps(obj)
    except TypeError:
        pass
    try:
        try:
            return _stdlib_dumps(obj)
        except ValueError:
            # NaN or an infinity (or a cycle, which fails again below).
            return _stdlib_dumps(_jsonable(obj, lenient=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise EncodeError(f"cannot encode as JSON: {type(exc).__name__}: {exc}") from None


def json_rendering(value: Any) -> Any:
    """*value* as plain JSON types, for state that :func:`encode_json` refuses.

    Sets become lists (sorted when their items can be), keys JSON has no
    form for and any other such object become their ``str()``, and NaN and
    infinities become ``None``. Raises :class:`EncodeError` for what has no
    rendering at all: a reference cycle, or nesting too deep for the
    interpreter's stack.
    """
    try:
        return _jsonable(value, lenient=True)
    except RecursionError:
        raise EncodeError("cannot render as JSON: a reference cycle or nesting too deep") from None


def _stdlib_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _jsonable(value: Any, *, lenient: bool) -> Any:
    """A copy of *value* with NaN and infinities replaced by ``None``.

    ``lenient`` also renders what JSON has no form for: sets as lists (sorted
    when their items can be), such keys and other objects as their
    ``str()``. Otherwise those stay as they are, for the encoder to refuse.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            (_rendered_key(key) if lenient else key): _jsonable(item, lenient=lenient)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, lenient=lenient) for item in value]
    if not lenient:
        return value
    if isinstance(value, (set, frozenset)):
        items = [_jsonable(item, lenient=True) for item in value]
        try:
            return sorted(items)
        except TypeError:  # items of mixed types: their own order
            return items
    return str(value)


def _rendered_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)  # as the encoder writes such keys: 1 -> "1", None -> "null"
    return str(key)


# -- field checks ------------------------------------------------------------

_MISSING: Any = object()


class _Fields:
    """Collects problems while reading fields of one decoded object."""

    __slots__ = ("obj", "problems")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.problems: list[str] = []

    def non_empty_string(self, key: str) -> str:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            self.problems.append(f"{key}: required")
        elif not isinstance(value, str) or not value:
            self.problems.append(f"{key}: must be a non-empty string")
        else:
            return value
        return ""

    def string(self, key: str) -> str:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            self.problems.append(f"{key}: required")
        elif not isinstance(value, str):
            self.problems.append(f"{key}: must be a string")
        else:
            return value
        return ""

    def optional_string(self, key: str) -> str | None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self.problems.append(f"{key}: must be a string")
            return None
        return value

    def optional_non_empty_string(self, key: str) -> str | None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{key}: must be a non-empty string")
            return None
        return value

    def nullable_string(self, key: str) -> str | None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            self.problems.append(f"{key}: required")
        elif value is not None and not isinstance(value, str):
            self.problems.append(f"{key}: must be a string or null")
        else:
            return value
        return None

    def boolean(self, key: str) -> bool:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            self.problems.append(f"{key}: required")
        elif not isinstance(value, bool):
            self.problems.append(f"{key}: must be a boolean")
        else:
            return value
        return False

    def optional_boolean(self, key: str) -> bool | None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, bool):
            self.problems.append(f"{key}: must be a boolean")
            return None
        return value

    def optional_object(self, key: str) -> dict[str, Any] | None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{key}: must be an object")
            return None
        return value

    def one_of(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            self.problems.append(f"{key}: required")
        elif not isinstance(value, str) or value not in choices:
            self.problems.append(f"{key}: must be one of {', '.join(choices)}")
        else:
            return value
        return ""

    def anything(self, key: str) -> Any:
        return self.obj.get(key)


# -- client -> server ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Begin receiving frames for ``share_data_id``; replay after ``since``."""

    type: ClassVar[str] = "subscribe"
    share_data_id: str
    since: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"v": 1, "type": "subscribe", "shareDataId": self.share_data_id}
        if self.since is not None:
            wire["since"] = self.since
        return wire


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop receiving frames for ``share_data_id``."""

    type: ClassVar[str] = "unsubscribe"
    share_data_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"v": 1, "type": "unsubscribe", "shareDataId": self.share_data_id}


@dataclass(frozen=True, slots=True)
class Propose:
    """Ask the server to apply ``proposed_data`` through ``function_id``."""

    type: ClassVar[str] = "propose"
    share_data_id: str
    function_id: str
    proposed_data: Any
    correlation_id: str
    proof: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": 1,
            "type": "propose",
            "shareDataId": self.share_data_id,
            "functionId": self.function_id,
            "proposedData": self.proposed_data,
            "correlationId": self.correlation_id,
        }
        if self.proof is not None:
            wire["proof"] = self.proof
        return wire


@dataclass(frozen=True, slots=True)
class Ping:
    """Application-level round trip, answered by :class:`PongFrame`."""

    type: ClassVar[str] = "ping"
    correlation_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"v": 1, "type": "ping", "correlationId": self.correlation_id}


ClientMessage = Union[Subscribe, Unsubscribe, Propose, Ping]


def _read_subscribe(f: _Fields) -> Subscribe:
    return Subscribe(f.non_empty_string("shareDataId"), f.optional_string("since"))


def _read_unsubscribe(f: _Fields) -> Unsubscribe:
    return Unsubscribe(f.non_empty_string("shareDataId"))


def _read_propose(f: _Fields) -> Propose:
    share_data_id = f.non_empty_string("shareDataId")
    function_id = f.non_empty_string("functionId")
    proposed_data = f.anything("proposedData")
    proof = f.optional_object("proof")
    correlation_id = f.non_empty_string("correlationId")
    return Propose(share_data_id, function_id, proposed_data, correlation_id, proof)


def _read_ping(f: _Fields) -> Ping:
    return Ping(f.non_empty_string("correlationId"))


_CLIENT_READERS: dict[str, Callable[[_Fields], Any]] = {
    "subscribe": _read_subscribe,
    "unsubscribe": _read_unsubscribe,
    "propose": _read_propose,
    "ping": _read_ping,
}


# -- server -> client ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateFrame:
    """The snapshot that starts every accepted subscription."""

    type: ClassVar[str] = "state"
    share_data_id: str
    current_state: Any
    last_transaction_id: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": 1,
            "type": "state",
            "shareDataId": self.share_data_id,
            "currentState": self.current_state,
            "lastTransactionId": self.last_transaction_id,
        }


@dataclass(frozen=True, slots=True)
class TransactionFrame:
    """One transaction outcome.

    Live frames carry ``current_state`` (the state after the transaction);
    replayed frames (``replayed=True``) carry none, so the key is omitted.
    """

    type: ClassVar[str] = "transaction"
    share_data_id: str
    transaction_id: str
    accepted: bool
    current_state: Any = None
    replayed: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": 1,
            "type": "transaction",
            "shareDataId": self.share_data_id,
            "transactionId": self.transaction_id,
            "accepted": self.accepted,
        }
        if self.replayed:
            wire["replayed"] = True
        else:
            wire["currentState"] = self.current_state
        return wire


@dataclass(frozen=True, slots=True)
class LifecycleFrame:
    """A wholesale ``updated`` (with state) or a terminal ``removed``."""

    type: ClassVar[str] = "lifecycle"
    share_data_id: str
    event: str
    current_state: Any = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": 1,
            "type": "lifecycle",
            "shareDataId": self.share_data_id,
            "event": self.event,
        }
        if self.event == "updated":
            wire["currentState"] = self.current_state
        return wire


@dataclass(frozen=True, slots=True)
class ProposalResultFrame:
    """The proposer's own answer, matched by ``correlation_id``."""

    type: ClassVar[str] = "proposal-result"
    correlation_id: str
    accepted: bool
    transaction_id: str | None = None
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": 1,
            "type": "proposal-result",
            "correlationId": self.correlation_id,
            "accepted": self.accepted,
        }
        if self.transaction_id is not None:
            wire["transactionId"] = self.transaction_id
        if self.error is not None:
            wire["error"] = self.error
        return wire


@dataclass(frozen=True, slots=True)
class PongFrame:
    """The answer to :class:`Ping`."""

    type: ClassVar[str] = "pong"
    correlation_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"v": 1, "type": "pong", "correlationId": self.correlation_id}


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """A non-fatal protocol or authorization error."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    correlation_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"v": 1, "type": "error", "code": self.code, "message": self.message}
        if self.correlation_id is not None:
            wire["correlationId"] = self.correlation_id
        return wire


ServerMessage = Union[
    StateFrame, TransactionFrame, LifecycleFrame, ProposalResultFrame, PongFrame, ErrorFrame
]


def _read_state(f: _Fields) -> StateFrame:
    return StateFrame(
        f.non_empty_string("shareDataId"),
        f.anything("currentState"),
        f.nullable_string("lastTransactionId"),
    )


def _read_transaction(f: _Fields) -> TransactionFrame:
    return TransactionFrame(
        f.non_empty_string("shareDataId"),
        f.non_empty_string("transactionId"),
        f.boolean("accepted"),
        f.anything("currentState"),
        bool(f.optional_boolean("replayed")),
    )


def _read_lifecycle(f: _Fields) -> LifecycleFrame:
    return LifecycleFrame(
        f.non_empty_string("shareDataId"),
        f.one_of("event", ("updated", "removed")),
        f.anything("currentState"),
    )


def _read_proposal_result(f: _Fields) -> ProposalResultFrame:
    return ProposalResultFrame(
        f.non_empty_string("correlationId"),
        f.boolean("accepted"),
        f.optional_string("transactionId"),
        f.optional_string("error"),
    )


def _read_pong(f: _Fields) -> PongFrame:
    return PongFrame(f.non_empty_string("correlationId"))


def _read_error(f: _Fields) -> ErrorFrame:
    return ErrorFrame(
        f.non_empty_string("code"),
        f.string("message"),
        f.optional_string("correlationId"),
    )


_SERVER_READERS: dict[str, Callable[[_Fields], Any]] = {
    "state": _read_state,
    "transaction": _read_transaction,
    "lifecycle": _read_lifecycle,
    "proposal-result": _read_proposal_result,
    "pong": _read_pong,
    "error": _read_error,
}


# -- parsing and encoding ------------------------------------------------------


def _parse(data: Any, readers: dict[str, Callable[[_Fields], Any]]) -> Any:
    obj = data if isinstance(data, dict) else decode_json(data)
    if not isinstance(obj, dict):
        raise InvalidMessage(["message: must be a JSON object"])
    fields = _Fields(obj)
    version = obj.get("v", _MISSING)
    if version is _MISSING:
        fields.problems.append("v: required")
    # bool is an int subclass: True == 1 must not pass.
    elif isinstance(version, bool) or not isinstance(version, (int, float)) or version != 1:
        fields.problems.append("v: must be 1")
    kind = obj.get("type", _MISSING)
    reader = readers.get(kind) if isinstance(kind, str) else None
    if kind is _MISSING:
        fields.problems.append("type: required")
    elif reader is None:
        fields.problems.append(f"type: must be one of {', '.join(readers)}")
    message = reader(fields) if reader is not None else None
    if fields.problems:
        raise InvalidMessage(fields.problems)
    return message


def parse_client_message(data: bytes | bytearray | memoryview | str | dict[str, Any]) -> ClientMessage:
    """Parse one client-to-server message (JSON text, bytes, or decoded dict).

    Raises :class:`InvalidMessage` naming every bad field.
    """
    return _parse(data, _CLIENT_READERS)


def parse_server_message(data: bytes | bytearray | memoryview | str | dict[str, Any]) -> ServerMessage:
    """Parse one server-to-client message (JSON text, bytes, or decoded dict).

    Raises :class:`InvalidMessage` naming every bad field.
    """
    return _parse(data, _SERVER_READERS)


def encode_message(message: ClientMessage | ServerMessage | dict[str, Any]) -> bytes:
    """Compact JSON bytes for a message object (or an already-built wire dict).

    Raises :class:`EncodeError` when the content cannot be JSON.
    """
    wire = message if isinstance(message, dict) else message.to_wire()
    return encode_json(wire)
