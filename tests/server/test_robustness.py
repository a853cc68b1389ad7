"""Robustness of the realtime server on real sockets (127.0.0.1 only).

Slow consumers, missed heartbeats, peers that vanish mid-broadcast, garbage
input and application state that cannot be encoded: in every case the
server must keep serving everybody else, in order, and forget the dead.

Its own server fixture (a fresh manager per test, no heartbeat unless asked
for); the peers are mostly :class:`server_helpers.RawClient`, because the
behaviours under test need a peer that does what a library client never
does: stop reading, ignore pings, reset the TCP connection, send malformed
frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import socket
import struct
from typing import Any, Awaitable, Callable, Optional

import pytest
from websockets.asyncio.client import connect as ws_connect

from safe_fast import (
    ShareData,
    ShareDataManager,
    ShareFunction,
    create_id_based_function_resolver,
)
from safe_fast.sharedata import MAX_NESTING
from server_helpers import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RawClient,
    RawClientFactory,
    client_frame,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0
"""Upper bound for each wait in this module, the ``raw_clients``' included
(heavier tests than elsewhere); reaching it fails the test, it never passes it."""


# -- helpers --------------------------------------------------------------------------------


def accept_all() -> ShareFunction:
    return ShareFunction("set", lambda state, proposed: True)


def transaction_ids(frames: list[dict[str, Any]]) -> list[str]:
    return [f["transactionId"] for f in frames]


def consecutive(first: int, last: int) -> list[str]:
    return [str(i) for i in range(first, last + 1)]


class Recorder:
    """Records a server's observability events."""

    def __init__(self, server: Any) -> None:
        self.opened: list[Any] = []
        self.closed: list[Any] = []
        self.overflow: list[Any] = []
        server.on("connection:opened", self.opened.append)
        server.on("connection:closed", self.closed.append)
        server.on("connection:overflow", self.overflow.append)

    def closed_ids(self) -> set[str]:
        return {e.connection_id for e in self.closed}


def safe_fast_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records the server logged: each one is an exception it swallowed."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("safe_fast") and r.levelno >= logging.ERROR
    ]


async def connection_id_of(server: Any, connect: Callable[[], Awaitable[Any]]) -> tuple[Any, str]:
    """Run ``connect`` (which must end subscribed) and return (client, new server connection id)."""
    before = {c.id for c in server.connections}
    client = await connect()
    new = {c.id for c in server.connections} - before
    assert len(new) == 1, new
    return client, new.pop()


# -- 1. one slow consumer among fast ones ----------------------------------------------------


async def test_slow_consumer_is_cut_off_and_fast_subscribers_get_every_frame(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    max_buffered = 64 * 1024
    fast_count = 50
    window = 8  # frames a fast client may lag behind: 8 * ~3 KiB stays far below the cap
    max_frames = 400
    after_overflow = 30  # keep broadcasting this long after the cut, to show nobody else stalls

    manager = ShareDataManager()
    manager.add_share_data(ShareData("feed", current_state=None))
    function = accept_all()

    # Linux hands the listener's SO_SNDBUF to accepted sockets and turns
    # autotuning off for them: the kernel then holds a few KiB per connection
    # instead of up to 4 MiB, so the cap is reached after ~100 KiB instead of
    # megabytes per subscriber.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server = await start_server(manager, sock=listener, max_buffered_bytes=max_buffered)
    events = Recorder(server)

    async def slow_connect() -> RawClient:
        client = await raw_clients(server.port, rcvbuf=4096)
        await client.subscribe("feed")
        return client

    slow, slow_id = await connection_id_of(server, slow_connect)
    slow.transport.pause_reading()  # from now on it never reads

    received: list[list[dict[str, Any]]] = [[] for _ in range(fast_count)]
    unexpected: list[Any] = []
    fast: list[Any] = []
    readers: list[asyncio.Task[None]] = []

    largest_frame = 0

    async def read(ws: Any, sink: list[dict[str, Any]]) -> None:
        nonlocal largest_frame
        async for raw in ws:
            largest_frame = max(largest_frame, len(raw.encode()) + 4)  # + the 4-byte header of a 126..65535 frame
            message = json.loads(raw)
            if message.get("type") == "transaction":
                sink.append(message)
            else:
                unexpected.append(message)

    try:
        for index in range(fast_count):
            ws = await ws_connect(server.url, ping_interval=None, max_size=None, open_timeout=DEADLINE)
            fast.append(ws)
            await ws.send(json.dumps({"v": 1, "type": "subscribe", "shareDataId": "feed"}))
            state = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
            assert state["type"] == "state", state
            readers.append(asyncio.ensure_future(read(ws, received[index])))
        assert len(server.connections) == fast_count + 1

        sent = 0
        overflowed_at: Optional[int] = None
        for i in range(1, max_frames + 1):
            payload = {"i": i, "pad": "x" * 3000}
            outcome = await manager.apply_transaction("feed", payload, function)
            assert outcome.transaction_id == str(i)
            sent = i
            if overflowed_at is None and events.overflow:
                overflowed_at = i
            if overflowed_at is not None and i >= overflowed_at + after_overflow:
                break
            await asyncio.sleep(0)  # one loop turn per frame: flush, read
            await wait_until(
                lambda: min(len(r) for r in received) >= i - window,
                f"every fast subscriber within {window} frames of {i}",
            )
        assert overflowed_at is not None, f"no overflow after {sent} frames of ~3 KiB with a 64 KiB cap"

        # The fast ones got everything, in order, nothing else.
        await wait_until(lambda: all(len(r) == sent for r in received), "fast subscribers to catch up")
        for frames in received:
            assert transaction_ids(frames) == consecutive(1, sent)
            assert [f["currentState"]["i"] for f in frames] == list(range(1, sent + 1))
            assert all(f["shareDataId"] == "feed" and f["accepted"] is True for f in frames)
        assert unexpected == []

        # The slow one overflowed exactly once, and only it.
        assert len(events.overflow) == 1, events.overflow
        overflow = events.overflow[0]
        assert overflow.connection_id == slow_id
        assert overflow.max_buffered_bytes == max_buffered
        assert overflow.context == {"subject": "tester"}
        # What it held, plus the frame that was refused, passes the cap.
        assert 3000 < largest_frame < 4096
        assert overflow.buffered_amount + largest_frame > max_buffered
        assert overflow.buffered_amount > max_buffered // 2

        # It is closed with 4001 (it never reads the close frame, so the server
        # drops it after close_timeout) and forgotten.
        await wait_until(lambda: slow_id in events.closed_ids(), "connection:closed for the slow consumer")
        (closed,) = [e for e in events.closed if e.connection_id == slow_id]
        assert closed.code == 4001
        assert slow_id not in {c.id for c in server.connections}
        assert len(server.connections) == fast_count
        assert events.closed_ids() == {slow_id}, "no fast subscriber was closed"

        # On the slow side: a gap-free prefix of the feed, then the end of TCP.
        slow.transport.resume_reading()
        await asyncio.wait_for(asyncio.shield(slow.lost), DEADLINE)
        prefix = [
            json.loads(frame[2]) for frame in slow.take_received() if frame is not None and frame[1] == OP_TEXT
        ]
        assert transaction_ids(prefix) == consecutive(1, len(prefix))
        assert len(prefix) < sent
        assert slow.problems == []
    finally:
        for ws in fast:
            await ws.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# -- 2. heartbeats -------------------------------------------------------------------------------


async def test_heartbeat_terminates_a_silent_peer_and_keeps_live_ones(start_server: Any, raw_clients: RawClientFactory) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=1))
    server = await start_server(manager, heartbeat_interval=0.2)
    events = Recorder(server)

    async def silent_connect() -> RawClient:
        client = await raw_clients(server.port, auto_pong=False)
        await client.subscribe("doc")
        return client

    async def answering_connect() -> RawClient:
        client = await raw_clients(server.port, auto_pong=True)
        await client.subscribe("doc")
        return client

    silent, silent_id = await connection_id_of(server, silent_connect)
    answering, answering_id = await connection_id_of(server, answering_connect)
    # websockets answers pings on its own.
    async with ws_connect(server.url, ping_interval=None, open_timeout=DEADLINE) as library_client:
        await wait_until(lambda: len(events.opened) == 3, "the library client to be registered")
        library_id = events.opened[2].connection_id
        assert library_id not in (silent_id, answering_id)

        # The silent peer gets pinged, does not answer, and is dropped without a close handshake.
        await wait_until(lambda: silent_id in events.closed_ids(), "the silent peer to be terminated")
        assert silent.pings >= 1
        (closed,) = [e for e in events.closed if e.connection_id == silent_id]
        assert closed.code == 1006
        await asyncio.wait_for(asyncio.shield(silent.lost), DEADLINE)
        assert silent_id not in {c.id for c in server.connections}

        # The answering peers live through several more heartbeats.
        await wait_until(lambda: answering.pings >= 5, "five heartbeats on the answering peer", timeout=15)
        assert {answering_id, library_id} <= {c.id for c in server.connections}
        assert events.closed_ids() == {silent_id}
        pong = await answering.request({"v": 1, "type": "ping", "correlationId": "still-here"})
        assert pong == {"v": 1, "type": "pong", "correlationId": "still-here"}
        await library_client.send(json.dumps({"v": 1, "type": "ping", "correlationId": "lib"}))
        assert json.loads(await asyncio.wait_for(library_client.recv(), DEADLINE)) == {
            "v": 1,
            "type": "pong",
            "correlationId": "lib",
        }
        assert not answering.lost.done()


# -- 3. peers that vanish mid-broadcast ------------------------------------------------------


async def test_peers_reset_mid_broadcast_do_not_disturb_the_rest(
    start_server: Any, raw_clients: RawClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    total, victims_count, rounds = 20, 10, 40
    manager = ShareDataManager()
    manager.add_share_data(ShareData("feed", current_state=None))
    function = accept_all()
    server = await start_server(manager)
    events = Recorder(server)

    clients: list[RawClient] = []
    ids: list[str] = []
    for _ in range(total):

        async def connect() -> RawClient:
            client = await raw_clients(server.port)
            await client.subscribe("feed")
            return client

        client, connection_id = await connection_id_of(server, connect)
        clients.append(client)
        ids.append(connection_id)
    rng = random.Random(20240611)
    order = list(range(total))
    rng.shuffle(order)
    victims = set(order[:victims_count])
    survivors = [i for i in range(total) if i not in victims]
    # Which round kills which victim, and how (victim index mod 3): right
    # after the round's frame is queued but before it is flushed; after the
    # flush; or after not reading for two rounds, so that the server still
    # holds a backlog for it when it resets.
    kill_round = {v: 3 + 3 * n for n, v in enumerate(sorted(victims))}
    got: dict[int, list[dict[str, Any]]] = {i: [] for i in survivors}

    def drain(index: int) -> None:
        for frame in clients[index].take_received():
            assert frame is not None, f"survivor {index} lost its connection"
            _fin, opcode, payload = frame
            assert opcode == OP_TEXT, (opcode, payload[:100])
            got[index].append(json.loads(payload))

    def caught_up(upto: int) -> bool:
        for i in survivors:
            drain(i)
        return all(len(got[i]) >= upto for i in survivors)

    sent = 0
    for r in range(1, rounds + 1):
        for v, at in kill_round.items():
            if at == r + 2 and v % 3 == 2:
                clients[v].transport.pause_reading()
        # Every other frame is big enough to sit in kernel buffers when a peer resets.
        size = 200_000 if r % 2 == 0 else 2_000
        await manager.apply_transaction("feed", {"r": r, "pad": "y" * size}, function)
        sent = r
        for v, at in kill_round.items():
            if at == r:
                if v % 3 == 1:
                    await asyncio.sleep(0)  # flushed first, then gone
                clients[v].reset()
        await asyncio.sleep(0)  # one loop turn per round: flush, read, notice resets
        await wait_until(lambda: caught_up(r - 2), f"survivors to reach frame {r - 2}")

    await wait_until(lambda: caught_up(sent), "survivors to receive every frame")
    for i in survivors:
        assert transaction_ids(got[i]) == consecutive(1, sent), i
        assert [f["currentState"]["r"] for f in got[i]] == list(range(1, sent + 1))
        assert clients[i].problems == []

    victim_ids = {ids[v] for v in victims}
    survivor_ids = {ids[i] for i in survivors}
    await wait_until(lambda: len(server.connections) == len(survivors), "the server to forget every reset peer")
    assert {c.id for c in server.connections} == survivor_ids
    await wait_until(lambda: victim_ids <= events.closed_ids(), "connection:closed for every reset peer")
    assert events.closed_ids() == victim_ids
    assert {e.code for e in events.closed} == {1006}, "lost without a close handshake"
    assert events.overflow == []

    # Still serving: a new subscriber and a new broadcast reach everybody alive.
    newcomer = await raw_clients(server.port)
    await newcomer.subscribe("feed")
    await manager.apply_transaction("feed", {"r": sent + 1, "pad": ""}, function)
    opcode, frame = await newcomer.recv_message(skip_transactions=False)
    assert frame["transactionId"] == str(sent + 1)
    await wait_until(lambda: caught_up(sent + 1), "survivors to receive the last frame")
    assert safe_fast_errors(caplog) == []


# -- 4. garbage in ------------------------------------------------------------------------------

# What the server must answer to one fuzz input.
INVALID = "invalid"  # error{code: invalid-message} naming a field, then close 4004
BAD_TEXT = "bad-text"  # close 1007, nothing before it
PONG = "pong"
STATE = "state"
UNKNOWN = "unknown"  # error{code: unknown-share-data}, then close 4003
RESULT = "result"  # proposal-result with the correlation id

FUZZ_DOC = "fuzz"
NEWS_DOC = "news"
WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, 123456789012345678901234567890, "", "x", [], [1], {}, {"a": 1},
]


class Case:
    """One input: frames to send and the response the protocol demands."""

    def __init__(self, kind: str, frames: list[tuple[int, bytes, bool]], expect: str, **detail: Any) -> None:
        self.kind = kind
        self.frames = frames  # (opcode, payload, fin)
        self.expect = expect
        self.detail = detail

    def __repr__(self) -> str:
        first = self.frames[0][1][:120] if self.frames else b""
        return f"<Case {self.kind} expect={self.expect} {self.detail} {first!r}>"


class FuzzInputs:
    """Seeded generator of garbage and valid client input, with the protocol's answer."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counter = 0

    def cid(self) -> str:
        self.counter += 1
        return f"c-{self.counter}-{self.rng.choice(['', 'é', '😀', ' '])}"

    # valid messages

    def valid(self) -> tuple[dict[str, Any], str, dict[str, Any]]:
        rng = self.rng
        kind = rng.choice(["ping", "subscribe", "subscribe-unknown", "propose", "propose-reject", "propose-deep",
                           "propose-unknown-fn", "propose-unknown-id", "propose-boom"])
        if kind == "ping":
            cid = self.cid()
            return {"v": 1, "type": "ping", "correlationId": cid}, PONG, {"correlation_id": cid}
        if kind == "subscribe":
            message: dict[str, Any] = {"v": rng.choice([1, 1.0]), "type": "subscribe", "shareDataId": FUZZ_DOC}
            if rng.random() < 0.3:
                message["since"] = ""
            return message, STATE, {"share_data_id": FUZZ_DOC}
        if kind == "subscribe-unknown":
            missing = rng.choice(["nope", "FUZZ", "fuzz ", "ünknown", "0"])
            return {"v": 1, "type": "subscribe", "shareDataId": missing}, UNKNOWN, {"share_data_id": missing}
        cid = self.cid()
        function_id, share_data_id = "accept", FUZZ_DOC
        data: Any = self.json_value(3)
        outcome: dict[str, Any] = {"accepted": True}
        if kind == "propose-reject":
            function_id, outcome = "reject", {"accepted": False}
        elif kind == "propose-deep":
            depth = rng.randint(100, 250)
            data = json.loads("[" * depth + "]" * depth)
        elif kind == "propose-unknown-fn":
            function_id = rng.choice(["missing", "ACCEPT"])
            outcome = {"accepted": False, "error": f"unknown functionId {function_id} for shareDataId {FUZZ_DOC}"}
        elif kind == "propose-unknown-id":
            share_data_id = "gone"
            outcome = {"accepted": False, "error": "shareDataId gone not found"}
        elif kind == "propose-boom":
            function_id = "boom"
            outcome = {"accepted": False, "error": "kaboom"}  # the rule's own message, as on the reference
        message = {"v": 1, "type": "propose", "shareDataId": share_data_id, "functionId": function_id,
                   "correlationId": cid}
        if rng.random() < 0.9:
            message["proposedData"] = data
        if rng.random() < 0.3:
            message["proof"] = {"sig": self.json_value(1)}
        if rng.random() < 0.2:
            message["extra"] = self.json_value(2)  # unknown keys are ignored
        return message, RESULT, {"correlation_id": cid, **outcome}

    def json_value(self, depth: int) -> Any:
        rng = self.rng
        choice = rng.randrange(8 if depth > 0 else 6)
        if choice == 0:
            return None
        if choice == 1:
            return rng.choice([True, False])
        if choice == 2:
            return rng.randint(-(2**63), 2**64 - 1)
        if choice == 3:
            return rng.uniform(-1e300, 1e300)
        if choice == 4:
            length = rng.randint(0, 12)
            return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF)])) for _ in range(length))
        if choice == 5:
            return rng.choice(["", "\u0000", "\\", '"', "\U0001F600"])
        if choice == 6:
            return [self.json_value(depth - 1) for _ in range(rng.randint(0, 4))]
        return {f"k{rng.randint(0, 99)}": self.json_value(depth - 1) for _ in range(rng.randint(0, 4))}

    # one input

    def case(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.30:
            message, expect, detail = self.valid()
            case = Case("valid", [(OP_TEXT, json.dumps(message, ensure_ascii=rng.random() < 0.5).encode(), True)],
                        expect, **detail)
        elif roll < 0.55:
            case = self.wrong_field()
        elif roll < 0.65:
            case = self.random_bytes()
        elif roll < 0.72:
            case = self.truncated()
        elif roll < 0.80:
            case = self.undecodable_json()
        elif roll < 0.88:
            case = self.not_a_message()
        elif roll < 0.94:
            case = self.random_text()
        else:
            # An unsubscribe has no answer: follow it with a ping to see it was taken.
            cid = self.cid()
            unsubscribe = {"v": 1, "type": "unsubscribe", "shareDataId": rng.choice([FUZZ_DOC, NEWS_DOC, "nope"])}
            ping = {"v": 1, "type": "ping", "correlationId": cid}
            frames = [(OP_TEXT, json.dumps(unsubscribe).encode(), True), (OP_TEXT, json.dumps(ping).encode(), True)]
            case = Case("unsubscribe+ping", frames, PONG, correlation_id=cid)
        # Any of them may travel as binary (same meaning, except for invalid UTF-8),
        # and any single message may be fragmented.
        if rng.random() < 0.25 and case.frames and case.frames[0][0] == OP_TEXT:
            case.frames[0] = (OP_BINARY,) + case.frames[0][1:]
            if case.expect == BAD_TEXT:
                case.expect, case.detail = INVALID, {"field": "message"}
        if rng.random() < 0.15 and len(case.frames) == 1 and len(case.frames[0][1]) >= 3:
            case.frames = self.fragment(case.frames[0])
        return case

    def fragment(self, frame: tuple[int, bytes, bool]) -> list[tuple[int, bytes, bool]]:
        opcode, payload, _ = frame
        cuts = sorted(self.rng.sample(range(1, len(payload)), 2))
        pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        frames = [(opcode, pieces[0], False)]
        for piece in pieces[1:-1]:
            if self.rng.random() < 0.5:
                frames.append((OP_PING, b"between", True))  # control frames may interleave
            frames.append((OP_CONT, piece, False))
        frames.append((OP_CONT, pieces[-1], True))
        return frames

    def wrong_field(self) -> Case:
        rng = self.rng
        message, _, _ = self.valid()
        field = rng.choice([k for k in message if k not in ("proposedData", "extra")] + ["missing"])
        if field == "missing":
            required = {
                "subscribe": ["shareDataId"],
                "propose": ["shareDataId", "functionId", "correlationId"],
                "ping": ["correlationId"],
            }[message["type"]] + ["v", "type"]
            field = rng.choice(required)
            del message[field]
        elif field == "v":
            message["v"] = rng.choice([True, False, "1", 2, 0, 0.5, None, [], {}, -1, 10**30, 1.0000001])
        elif field == "type":
            message["type"] = rng.choice(["SUBSCRIBE", "", 1, None, [], "pong", "state", "subscribe "])
        elif field == "since":
            message["since"] = rng.choice([v for v in WRONG_VALUES if not isinstance(v, str)])
        elif field == "proof":
            message["proof"] = rng.choice([None, True, 1, "sig", [], [{}]])
        else:  # shareDataId, functionId, correlationId: non-empty strings
            message[field] = rng.choice([v for v in WRONG_VALUES if not (isinstance(v, str) and v)])
        return Case("wrong-field", [(OP_TEXT, json.dumps(message).encode(), True)], INVALID, field=field)

    def random_bytes(self) -> Case:
        rng = self.rng
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            opcode = rng.choice([OP_TEXT, OP_BINARY])
            expect = BAD_TEXT if opcode == OP_TEXT else INVALID
            return Case("random-bytes", [(opcode, payload, True)], expect, field="message")
        return Case("random-bytes", [(OP_TEXT, payload, True)], INVALID, field="message")

    def random_text(self) -> Case:
        rng = self.rng
        alphabet = '{}[]",:0123456789.eE+-truefalsnul \t\n\\ávé😀\u2028'
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):  # astronomically unlikely; keeps the oracle honest
            text = "[" + text
        return Case("random-text", [(OP_TEXT, text.encode(), True)], INVALID, field="message")

    def truncated(self) -> Case:
        message, _, _ = self.valid()
        payload = json.dumps(message, ensure_ascii=False).encode()
        piece = payload[: self.rng.randrange(0, len(payload))]
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:  # cut inside a multi-byte character
            return Case("truncated", [(OP_TEXT, piece, True)], BAD_TEXT)
        return Case("truncated", [(OP_TEXT, piece, True)], INVALID, field="message")

    def undecodable_json(self) -> Case:
        """JSON the decoder must refuse: NaN, infinities, too deep, malformed."""
        rng = self.rng
        body = rng.choice(UNDECODABLE)
        template = rng.choice([
            '{"v":1,"type":"propose","shareDataId":"fuzz","functionId":"accept","correlationId":"x","proposedData":%s}',
            '{"v":%s,"type":"ping","correlationId":"x"}',
        ])
        payload = (template % body).encode("utf-8", "surrogatepass")
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return Case("undecodable", [(OP_TEXT, payload, True)], BAD_TEXT)
        return Case("undecodable", [(OP_TEXT, payload, True)], INVALID, field="message")

    def not_a_message(self) -> Case:
        rng = self.rng
        value = rng.choice([
            [], [1, 2], "subscribe", 1, 1.5, None, True, {}, {"v": 1}, {"type": "ping"},
            {"V": 1, "Type": "ping", "correlationId": "x"}, self.json_value(3),
        ])
        if isinstance(value, dict):
            field = "type" if "v" in value else "v"
        else:
            field = "message"
        return Case("not-a-message", [(OP_TEXT, json.dumps(value).encode(), True)], INVALID, field=field)


UNDECODABLE = [
    "NaN", "-Infinity", "Infinity", "1e400", "-1e999", "[" * 1100 + "]" * 1100,
    '{"a":' * 1100 + "1" + "}" * 1100, "01", "1.", ".5", "+1", "0x10", "'x'", '"\\x00"', "[1,]", "{,}",
    '"\ud800"', "tru", "[1 2]", '{"a" 1}', "",
    # Escaped lone surrogates and raw control characters: valid UTF-8, refused by the decoder.
    '"\\ud800"', '"\\udc00x"', '{"a":1,}', '"a\tb"',
]


async def check_answer(client: RawClient, case: Case) -> bool:
    """Assert the server's answer to ``case``; True if it closed the connection."""
    opcode, message = await client.recv_message()
    where = repr(case)
    if case.expect == BAD_TEXT:
        assert opcode == OP_CLOSE and message[0] == 1007, (where, opcode, message)
        return True
    if case.expect in (INVALID, UNKNOWN):
        code, close_code = ("invalid-message", 4004) if case.expect == INVALID else ("unknown-share-data", 4003)
        assert opcode == OP_TEXT and message["type"] == "error" and message["code"] == code, (where, message)
        assert message["v"] == 1 and isinstance(message["message"], str) and message["message"], (where, message)
        if case.expect == INVALID:
            field = case.detail["field"]
            assert any(p.startswith(f"{field}: ") for p in message["message"].split("; ")), (where, message)
        else:
            assert message["message"] == f"shareDataId {case.detail['share_data_id']} not found", (where, message)
        opcode, close = await client.recv_message()
        assert opcode == OP_CLOSE and close[0] == close_code, (where, close)
        return True
    assert opcode == OP_TEXT, (where, opcode, message)
    if case.expect == PONG:
        assert message == {"v": 1, "type": "pong", "correlationId": case.detail["correlation_id"]}, (where, message)
    elif case.expect == STATE:
        assert message["type"] == "state" and message["shareDataId"] == case.detail["share_data_id"], (where, message)
        assert set(message) == {"v", "type", "shareDataId", "currentState", "lastTransactionId"}, (where, message)
    else:
        assert message["type"] == "proposal-result", (where, message)
        assert message["correlationId"] == case.detail["correlation_id"], (where, message)
        assert message["accepted"] is case.detail["accepted"], (where, message)
        if "error" in case.detail:
            assert message["error"] == case.detail["error"], (where, message)
        else:
            assert "error" not in message and message["transactionId"].isdigit(), (where, message)
    return False


async def test_garbage_input_gets_protocol_answers_and_the_server_stays_up(
    start_server: Any, raw_clients: RawClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    workers, per_worker = 4, 260  # 1,040 inputs in all

    def boom(state: Any, proposed: Any) -> bool:
        raise RuntimeError("kaboom")

    manager = ShareDataManager()
    manager.add_share_data(ShareData(NEWS_DOC, current_state=0))
    manager.add_share_data(ShareData(FUZZ_DOC, current_state=None, functions=[
        ShareFunction("accept", lambda state, proposed: True),
        ShareFunction("reject", lambda state, proposed: False),
        ShareFunction("boom", boom),
    ]))
    server = await start_server(manager, resolve_function=create_id_based_function_resolver(manager))
    events = Recorder(server)

    observer = await raw_clients(server.port)
    await observer.subscribe(NEWS_DOC)
    news = accept_all()
    done = asyncio.Event()
    news_sent = 0

    async def broadcaster() -> None:
        nonlocal news_sent
        for i in range(1, 5001):
            await manager.apply_transaction(NEWS_DOC, {"i": i}, news)
            news_sent = i
            if done.is_set():
                return
            await asyncio.sleep(0.002)

    connections_made = 0
    answered = {"closing": 0, "open": 0}

    async def worker(seed: int) -> None:
        nonlocal connections_made
        inputs = FuzzInputs(seed)
        client: Optional[RawClient] = None
        for _ in range(per_worker):
            if client is None:
                client = await raw_clients(server.port)
                connections_made += 1
            case = inputs.case()
            for opcode, payload, fin in case.frames:
                client.send(opcode, payload, fin=fin)
            if await check_answer(client, case):
                answered["closing"] += 1
                await client.finish_close()
                client = None
            else:
                answered["open"] += 1
            assert client is None or client.problems == []
        if client is not None:
            client.send(OP_CLOSE, struct.pack("!H", 1000))
            opcode, close = await client.recv_message()
            assert (opcode, close[0]) == (OP_CLOSE, 1000)
            await client.finish_close()

    feeding = asyncio.ensure_future(broadcaster())
    try:
        await asyncio.gather(*(worker(seed) for seed in range(1, workers + 1)))
    finally:
        done.set()
        await asyncio.wait_for(feeding, DEADLINE)

    assert answered["closing"] + answered["open"] == workers * per_worker
    assert answered["closing"] >= 300 and answered["open"] >= 200, answered  # both paths exercised
    # One connection per worker to start with, one more after each close but perhaps the last.
    assert answered["closing"] <= connections_made <= answered["closing"] + workers

    # The observer saw every broadcast, in order, undisturbed.
    news_frames: list[dict[str, Any]] = []
    await wait_until(lambda: observer.frames.qsize() >= news_sent, "the observer to receive every news frame")
    for frame in observer.take_received():
        assert frame is not None, "the observer lost its connection"
        _fin, opcode, payload = frame
        assert opcode == OP_TEXT, (opcode, payload)
        news_frames.append(json.loads(payload))
    assert news_sent > 0
    assert transaction_ids(news_frames) == consecutive(1, news_sent)
    assert [f["currentState"]["i"] for f in news_frames] == list(range(1, news_sent + 1))

    # Every fuzz connection is gone; the server still serves a fresh client.
    await wait_until(lambda: len(server.connections) == 1, "the server to forget every fuzz connection")
    assert len(events.closed) == connections_made
    fresh = await raw_clients(server.port)
    state = await fresh.subscribe(FUZZ_DOC)
    assert state["lastTransactionId"] == manager.get_share_data_by_id(FUZZ_DOC).last_transaction_id
    assert await fresh.request({"v": 1, "type": "ping", "correlationId": "after"}) == {
        "v": 1, "type": "pong", "correlationId": "after"
    }
    assert safe_fast_errors(caplog) == []


# RFC 6455 framing violations; reserved bits (with the close reason) are in test_protocol.py.
_FRAMING_VIOLATIONS = (
    [
        ("reserved opcode", bytes([0x83, 0x80]) + b"\0\0\0\0", 1002),
        ("unmasked frame", bytes([0x81, 0x02]) + b"{}", 1002),
        ("continuation first", client_frame(OP_CONT, b"abc"), 1002),
        ("data frame inside a fragmented message",
         client_frame(OP_TEXT, b"ab", fin=False) + client_frame(OP_TEXT, b"cd"), 1002),
        ("control frame over 125 bytes", client_frame(OP_PING, b"p" * 200), 1002),
        ("a second unfinished data frame inside a fragmented message",
         client_frame(OP_TEXT, b"ab", fin=False) + client_frame(OP_TEXT, b"cd", fin=False), 1002),
        ("reserved bit on a ping", bytes([0x80 | 0x40 | OP_PING]) + client_frame(OP_PING, b"p")[1:], 1002),
        ("reserved bit on a close", bytes([0x80 | 0x10 | OP_CLOSE]) + client_frame(OP_CLOSE, b"")[1:], 1002),
        ("close reason not UTF-8", client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
        ("close with a one-byte payload", client_frame(OP_CLOSE, b"\x03"), 1002),
    ]
    + [
        # Codes a peer may never send (RFC 6455 §7.4): reserved, or meant only for reports.
        (f"close with code {code}", client_frame(OP_CLOSE, struct.pack("!H", code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ]
)


@pytest.mark.parametrize("name, raw, code", _FRAMING_VIOLATIONS, ids=[case[0] for case in _FRAMING_VIOLATIONS])
async def test_websocket_protocol_violations_close_the_offender_only(
    start_server: Any, raw_clients: RawClientFactory, name: str, raw: bytes, code: int
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=0))
    server = await start_server(manager)
    bystander = await raw_clients(server.port)
    await bystander.subscribe("doc")
    offender = await raw_clients(server.port)
    offender.send_raw(raw)
    opcode, close = await offender.recv_message()
    assert (opcode, close[0]) == (OP_CLOSE, code), (name, close)
    await offender.finish_close()
    await wait_until(lambda: len(server.connections) == 1, "the offender to be forgotten")
    await manager.apply_transaction("doc", 1, accept_all())
    opcode, frame = await bystander.recv_message(skip_transactions=False)
    assert frame["type"] == "transaction" and frame["transactionId"] == "1"


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 1012, 1014, 3000, 4001, 4999])
async def test_a_valid_close_code_is_echoed(start_server: Any, raw_clients: RawClientFactory, code: int) -> None:
    server = await start_server(ShareDataManager())
    client = await raw_clients(server.port)
    client.send(OP_CLOSE, struct.pack("!H", code) + b"bye")
    assert (await client.close_frame())[0] == code
    await client.eof()


async def test_a_close_without_a_code_is_answered_with_1000(start_server: Any, raw_clients: RawClientFactory) -> None:
    server = await start_server(ShareDataManager())
    client = await raw_clients(server.port)
    client.send(OP_CLOSE, b"")
    assert (await client.close_frame())[0] == 1000
    await client.eof()


# -- 5. state that JSON cannot express ---------------------------------------------------------


async def test_unencodable_state_never_breaks_the_broadcast_path(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("weird", current_state=0))
    manager.add_share_data(ShareData("fine", current_state=0))
    function = accept_all()
    server = await start_server(manager)
    events = Recorder(server)

    weird_only = await raw_clients(server.port)
    await weird_only.subscribe("weird")
    fine_only = await raw_clients(server.port)
    await fine_only.subscribe("fine")
    both = await raw_clients(server.port)
    await both.subscribe("weird")
    await both.subscribe("fine")

    # Wholesale replacement with a state JSON has no form for: the manager call succeeds.
    manager.update_share_data(ShareData("weird", current_state={"tags": {"a", "b"}}))
    # Transactions whose state cannot be encoded: recorded, and broadcast as rendered.
    for bad in ({1, 2}, object(), {"nested": [frozenset({3})]}):
        await manager.apply_transaction("weird", bad, function)

    # Values orjson refuses but JSON can express go out exactly.
    huge = {"n": 2**80, "neg": -(2**70), 7: "int key"}
    await manager.apply_transaction("fine", huge, function)
    for i in range(2, 6):
        await manager.apply_transaction("fine", {"i": i}, function)

    def check_weird(frames: list[Any]) -> None:
        # Every change reaches the subscribers, its state as JSON can carry it.
        assert [(f["type"], f.get("transactionId")) for f in frames] == [
            ("lifecycle", None),
            ("transaction", "1"),
            ("transaction", "2"),
            ("transaction", "3"),
        ]
        assert frames[0]["currentState"] == {"tags": ["a", "b"]}
        assert frames[1]["currentState"] == [1, 2]
        assert frames[2]["currentState"].startswith("<object object at ")
        assert frames[3]["currentState"] == {"nested": [[3]]}

    weird_frames = []
    for _ in range(4):
        opcode, message = await weird_only.recv_message(skip_transactions=False)
        assert opcode == OP_TEXT, (opcode, message)
        weird_frames.append(message)
    check_weird(weird_frames)

    for client in (fine_only, both):
        frames, weird_frames = [], []
        for _ in range(20):
            if len(frames) == 5:
                break
            opcode, message = await client.recv_message(skip_transactions=False)
            assert opcode == OP_TEXT, (opcode, message)
            if message["shareDataId"] == "fine":
                frames.append(message)
            else:
                weird_frames.append(message)
        if client is both:
            check_weird(weird_frames)
        else:
            assert weird_frames == []
        assert transaction_ids(frames) == consecutive(1, 5)
        assert frames[0]["currentState"] == {"n": 2**80, "neg": -(2**70), "7": "int key"}
        assert [f["currentState"] for f in frames[1:]] == [{"i": i} for i in range(2, 6)]

    # The server is up: the connections are intact, a fresh client can subscribe and ping.
    assert len(server.connections) == 3 and events.closed == []
    fresh = await raw_clients(server.port)
    state = await fresh.subscribe("fine")
    assert state["currentState"] == {"i": 5} and state["lastTransactionId"] == "5"
    answer = await fresh.request({"v": 1, "type": "subscribe", "shareDataId": "weird"})
    assert answer["type"] == "state" and answer["currentState"] == {"nested": [[3]]}, answer
    pong = await fresh.request({"v": 1, "type": "ping", "correlationId": "alive"})
    assert pong == {"v": 1, "type": "pong", "correlationId": "alive"}
    pong = await weird_only.request({"v": 1, "type": "ping", "correlationId": "alive-too"})
    assert pong == {"v": 1, "type": "pong", "correlationId": "alive-too"}

    # The weird channel itself still works: its terminal lifecycle frame goes out.
    assert manager.remove_share_data_by_id("weird") is True
    for client in (weird_only, both):
        opcode, message = await client.recv_message()
        assert message == {"v": 1, "type": "lifecycle", "shareDataId": "weird", "event": "removed"}, message


_TYPE_RE = re.compile(rb'^\{"v":1,"type":"([a-z-]+)"')
_TRANSACTION_ID_RE = re.compile(rb'"transactionId":"([0-9]+)"')


async def transactions_before_pong(client: RawClient, correlation_id: str) -> list[str]:
    """Fence: ping, and return the ids of the transaction frames that arrive before the pong.

    Reads only the head of each frame, so arbitrarily deep states cost nothing here.
    """
    client.send_json({"v": 1, "type": "ping", "correlationId": correlation_id})
    ids: list[str] = []
    for _ in range(10_000):
        frame = await client.recv()
        assert frame is not None, f"connection lost before the pong for {correlation_id}"
        _fin, opcode, payload = frame
        assert opcode == OP_TEXT, (opcode, payload[:200])
        kind = _TYPE_RE.match(payload)
        assert kind is not None, payload[:200]
        if kind.group(1) == b"pong":
            assert json.loads(payload)["correlationId"] == correlation_id
            return ids
        assert kind.group(1) == b"transaction", payload[:200]
        found = _TRANSACTION_ID_RE.search(payload[:200])
        assert found is not None, payload[:200]
        ids.append(found.group(1).decode())
    raise AssertionError(f"no pong for {correlation_id}")


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("bad", [{1, 2}, object()], ids=["set", "object"])
async def test_unencodable_transaction_leaves_no_gap_for_its_subscribers(
    start_server: Any, raw_clients: RawClientFactory, bad: Any
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=0))
    function = accept_all()
    server = await start_server(manager)
    subscriber = await raw_clients(server.port)
    await subscriber.subscribe("doc")

    await manager.apply_transaction("doc", "before", function)
    try:
        await manager.apply_transaction("doc", bad, function)
    except (TypeError, ValueError):
        pass  # a clear failure of the application's call is allowed (then nothing is recorded)...
    await manager.apply_transaction("doc", "after", function)
    recorded = int(manager.get_share_data_by_id("doc").last_transaction_id)
    # ...but whatever was recorded reaches the subscribers, without a gap.
    assert await transactions_before_pong(subscriber, "fence") == consecutive(1, recorded)


async def test_deeply_nested_transaction_leaves_no_gap_for_its_subscribers(
    start_server: Any, raw_clients: RawClientFactory
) -> None:
    manager = ShareDataManager()
    manager.add_share_data(ShareData("doc", current_state=0))
    function = accept_all()
    server = await start_server(manager)
    subscriber = await raw_clients(server.port)
    await subscriber.subscribe("doc")

    # Every depth the manager records, up to its limit, reaches subscribers,
    # including those past what orjson encodes (255), which take the slower
    # route; one level more is refused and records nothing.
    recorded: list[str] = []
    for depth in range(240, MAX_NESTING + 1, 8):
        outcome = await manager.apply_transaction("doc", nested_list(depth), function)
        recorded.append(outcome.transaction_id)
        assert await transactions_before_pong(subscriber, f"depth-{depth}") == [outcome.transaction_id], depth
    outcome = await manager.apply_transaction("doc", nested_list(MAX_NESTING), function)
    assert await transactions_before_pong(subscriber, "at-the-limit") == [outcome.transaction_id]
    with pytest.raises(ValueError, match="nested too deeply"):
        await manager.apply_transaction("doc", nested_list(MAX_NESTING + 1), function)
    assert await transactions_before_pong(subscriber, "past-the-limit") == []
