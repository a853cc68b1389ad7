"""Redis scale-out: RedisReplayStore, RedisChannelRegistry, and two server
nodes sharing one Redis. Everything runs against REAL ``redis-server``
processes that these tests start on 127.0.0.1 and stop again.

The Redis layout is checked byte for byte with a plain client, because it
is shared with the TypeScript implementation (PROTOCOL.md, "Scale-out
layout (Redis)"). Every wait is bounded in count and time; reaching a bound
fails the test, it never passes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio", reason="the redis extra (redis-py >= 5) is not installed")
from redis.asyncio.retry import Retry  # noqa: E402
from redis.backoff import ExponentialBackoff, NoBackoff  # noqa: E402
from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402
from redis.exceptions import TimeoutError as RedisTimeoutError  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

from safe_fast import (  # noqa: E402
    RealtimeClient,
    ReplayTimeoutEvent,
    ShareData,
    ShareDataManager,
    ShareFunction,
    attach_realtime_server,
    create_id_based_function_resolver,
)
from safe_fast._backend import core  # noqa: E402
from safe_fast.messages import (  # noqa: E402
    EncodeError,
    InvalidMessage,
    LifecycleFrame,
    TransactionFrame,
    encode_message,
)
from safe_fast.replay import ReplayEntry  # noqa: E402
from safe_fast.scaleout import CorruptReplayEntry, RedisChannelRegistry, RedisReplayStore  # noqa: E402

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0
"""Upper bound of any single wait (a failure, never a pass)."""

REDIS_SERVER = shutil.which("redis-server")


# -- redis-server processes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One ``redis-server`` on 127.0.0.1, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: Optional[int] = None) -> None:
        """Start on ``port`` (a free one when None); waits until it answers PING."""
        assert REDIS_SERVER is not None
        for _attempt in range(3 if port is None else 1):
            self.port = port if port is not None else free_port()
            log = open(self.workdir / f"redis-{self.port}.log", "ab")
            # fmt: off
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            # fmt: on
            log.close()
            for _ in range(200):  # 200 x 0.025 s: bounded
                if self.proc.poll() is not None:
                    break  # exited (port taken?): try another port
                if answers_ping(self.port):
                    return
                time.sleep(0.025)
            self.stop()
        raise RuntimeError(f"redis-server did not come up; see the logs in {self.workdir}")

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing is answered (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process would only act on SIGTERM once continued
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _start_redis(tmp_path_factory: pytest.TempPathFactory) -> RedisProcess:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (CI installs it: apt-get install redis-server)")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server shared by the session; each test flushes it first."""
    server = _start_redis(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server of this test alone (it may stop and restart it)."""
    server = _start_redis(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()


def make_client(server: RedisProcess, **kwargs: Any) -> Any:
    return redis_asyncio.Redis(host="127.0.0.1", port=server.port, **kwargs)


def owned_client(server: RedisProcess, registries: Any, **kwargs: Any) -> Any:
    """A client on ``server`` that the ``registries`` fixture closes at teardown."""
    client = make_client(server, **kwargs)
    registries.clients.append(client)
    return client


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[Any]:
    """A plain client on the shared server, which it flushes first."""
    client = make_client(redis_server)
    await client.flushall()
    yield client
    await client.aclose()


_prefixes = itertools.count(1)


@pytest.fixture
def prefix() -> str:
    """A channel prefix of this test alone (the server outlives the test)."""
    return f"test{next(_prefixes)}:rt:"


class Errors(list[BaseException]):
    """An ``on_error`` that records, with a bounded wait."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def __call__(self, error: BaseException) -> None:
        self.append(error)
        self.event.set()

    async def wait_for(self, predicate: Callable[[list[BaseException]], bool]) -> None:
        async def wait() -> None:
            for _ in range(10_000):
                if predicate(self):
                    return
                self.event.clear()
                await self.event.wait()
            raise AssertionError("too many errors without the expected one")

        await asyncio.wait_for(wait(), DEADLINE)


RegistryFactory = Callable[..., RedisChannelRegistry]


@pytest.fixture
async def registries(redis_client: Any, prefix: str) -> AsyncIterator[RegistryFactory]:
    """``registries(client=None, **kw)``: RedisChannelRegistry objects closed at teardown."""
    made: list[RedisChannelRegistry] = []
    clients: list[Any] = []

    def make(client: Any = None, **kwargs: Any) -> RedisChannelRegistry:
        kwargs.setdefault("channel_prefix", prefix)
        registry = RedisChannelRegistry(client if client is not None else redis_client, **kwargs)
        made.append(registry)
        return registry

    make.clients = clients  # type: ignore[attr-defined]
    yield make
    for registry in made:
        await asyncio.wait_for(registry.close(), DEADLINE)
    for client in clients:
        await client.aclose()


# -- a local subscriber: a real Outbox over a recording transport ----------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.written = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data
        self.written.set()

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def split_frames(data: bytes) -> list[bytes]:
    """Payloads of final, unmasked text frames (what a subscriber was sent)."""
    payloads, pos = [], 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert first == 0x81 and second & 0x80 == 0, "expected final unmasked text frames"
        size, pos = second & 0x7F, pos + 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        payloads.append(bytes(data[pos : pos + size]))
        pos += size
    return payloads


class Sink(core.Outbox):  # type: ignore[misc,name-defined]
    """A connection as the registry sees it, recording every frame it is sent."""

    def __init__(self) -> None:
        self.recorder = RecordingTransport()
        super().__init__(self.recorder, core.Flusher(asyncio.get_running_loop()), 1 << 30)

    @property
    def payloads(self) -> list[bytes]:
        return split_frames(bytes(self.recorder.data))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads]

    async def wait_for_count(self, count: int) -> list[bytes]:
        async def wait() -> None:
            for _ in range(count + 10_000):
                if len(self.payloads) >= count:
                    return
                self.recorder.written.clear()
                await self.recorder.written.wait()
            raise AssertionError("too many writes")

        await asyncio.wait_for(wait(), DEADLINE)
        return self.payloads


async def eventually(check: Callable[[], Awaitable[bool]], what: str, tries: int = 500) -> None:
    """Poll ``check`` (bounded: ``tries`` x 20 ms, and DEADLINE overall)."""

    async def poll() -> None:
        for _ in range(tries):
            if await check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never happened: {what}")

    await asyncio.wait_for(poll(), DEADLINE * 2)


async def next_pubsub_message(pubsub: Any) -> dict[str, Any]:
    """The next ``message`` a plain redis-py pubsub gets (bounded)."""

    async def wait() -> dict[str, Any]:
        for _ in range(1000):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None and message["type"] == "message":
                return message
        raise AssertionError("no pub/sub message")

    return await asyncio.wait_for(wait(), DEADLINE)


async def channels(client: Any, prefix: str) -> list[bytes]:
    return sorted(await client.pubsub_channels(f"{prefix}*"))


async def publish_marker(redis_client: Any, prefix: str) -> bytes:
    """PUBLISH, as another node would, a frame on ``doc`` that only Redis can deliver; its payload."""
    marker = encode_message(tx("doc", "marker", 0))
    await redis_client.publish(f"{prefix}doc", marker)
    return marker


async def subscribed_at_redis(registries: "RegistryFactory") -> tuple[Any, Sink, Errors]:
    """A registry (its errors collected) with one Sink subscribed to ``doc``, confirmed by Redis."""
    errors = Errors()
    registry = registries(on_error=errors)
    sink = Sink()
    registry.subscribe("doc", sink)
    await registry.flush()
    return registry, sink, errors


def tx(share_data_id: str, transaction_id: str, count: int) -> TransactionFrame:
    return TransactionFrame(share_data_id, transaction_id, True, {"count": count})


# == RedisReplayStore =====================================================================


def ts_member(transaction_id: str, accepted: bool) -> bytes:
    """The member exactly as the TypeScript store writes it (``JSON.stringify``)."""
    return ('{"transactionId":"%s","accepted":%s}' % (transaction_id, "true" if accepted else "false")).encode()


async def test_store_layout_is_byte_for_byte_the_typescript_one(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client)
    await store.record("doc", ReplayEntry("1", True))
    await store.record("doc", ReplayEntry("2", False))
    await store.record("doc", ReplayEntry("10", True))

    assert await redis_client.keys("*") == [b"safe:replay:doc"]
    assert await redis_client.type("safe:replay:doc") == b"zset"
    # Numeric scores: "10" sorts after "2", which a lexical order would not do.
    assert await redis_client.zrange("safe:replay:doc", 0, -1, withscores=True) == [
        (b'{"transactionId":"1","accepted":true}', 1.0),
        (b'{"transactionId":"2","accepted":false}', 2.0),
        (b'{"transactionId":"10","accepted":true}', 10.0),
    ]
    assert RedisReplayStore.encode_member(ReplayEntry("3", True)) == ts_member("3", True)

    # Re-recording is idempotent, whether a Python or a TypeScript node wrote it first.
    await store.record("doc", ReplayEntry("2", False))
    await redis_client.zadd("safe:replay:doc", {ts_member("11", True): 11})
    await store.record("doc", ReplayEntry("11", True))
    assert await redis_client.zcard("safe:replay:doc") == 4
    assert await store.entries("doc") == [
        ReplayEntry("1", True),
        ReplayEntry("2", False),
        ReplayEntry("10", True),
        ReplayEntry("11", True),
    ]


async def test_store_custom_key_prefix(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client, 5, key_prefix="app:window:")
    await store.record("a/b", ReplayEntry("7", True))
    assert await redis_client.keys("*") == [b"app:window:a/b"]
    assert store.key("a/b") == "app:window:a/b"
    assert await store.entries_since("a/b", "7") == []


async def test_store_trims_to_the_cap(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client, max_entries_per_share_data=3)
    for i in range(1, 6):
        await store.record("doc", ReplayEntry(str(i), i % 2 == 0))
        assert await redis_client.zcard("safe:replay:doc") == min(i, 3)
    assert await redis_client.zrange("safe:replay:doc", 0, -1, withscores=True) == [
        (ts_member("3", False), 3.0),
        (ts_member("4", True), 4.0),
        (ts_member("5", False), 5.0),
    ]
    assert await store.entries_since("doc", "2") is None  # evicted
    assert await store.entries_since("doc", "3") == [ReplayEntry("4", True), ReplayEntry("5", False)]
    # A late, lower id lands below the window and is trimmed at once.
    await store.record("doc", ReplayEntry("1", True))
    assert [e.transaction_id for e in await store.entries("doc")] == ["3", "4", "5"]


async def test_store_cap_holds_under_concurrent_records(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client, max_entries_per_share_data=10)
    await asyncio.wait_for(
        asyncio.gather(*(store.record("doc", ReplayEntry(str(i), True)) for i in range(1, 201))),
        DEADLINE,
    )
    assert [e.transaction_id for e in await store.entries("doc")] == [str(i) for i in range(191, 201)]


async def test_store_records_a_burst_with_one_writer_task(redis_client: Any) -> None:
    # The server records every transaction it broadcasts: no task per record.
    store = RedisReplayStore(redis_client)
    before = len(asyncio.all_tasks())
    writes = [store.record("doc", ReplayEntry(str(i), True)) for i in range(1, 101)] + [store.forget("other")]
    assert len(asyncio.all_tasks()) - before == 1
    await asyncio.wait_for(asyncio.gather(*writes), DEADLINE)
    assert [e.transaction_id for e in await store.entries("doc")] == [str(i) for i in range(1, 101)]
    with pytest.raises(ValueError, match="canonical"):
        store.record("doc", ReplayEntry("01", True))  # at once, before anything is awaited


async def test_store_writes_keep_call_order_and_fail_one_by_one(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client)
    await redis_client.set("safe:replay:broken", b"a string, not a sorted set")
    calls = [
        store.record("doc", ReplayEntry("1", True)),
        store.record("doc", ReplayEntry("2", True)),
        store.record("broken", ReplayEntry("1", True)),
        store.forget("doc"),
        store.record("doc", ReplayEntry("3", False)),
    ]
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), DEADLINE)
    assert [r is None for r in results] == [True, True, False, True, True]
    assert "WRONGTYPE" in str(results[2])
    # The forget did not overtake the records before it, nor the one after it.
    assert await redis_client.zrange("safe:replay:doc", 0, -1, withscores=True) == [(ts_member("3", False), 3.0)]


async def test_entries_since_rules(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client, max_entries_per_share_data=4)
    for i in range(1, 9):
        await store.record("doc", ReplayEntry(str(i), True))
    # retained: 5, 6, 7, 8
    assert await store.entries_since("doc", "4") is None  # below the lowest
    assert await store.entries_since("doc", "9") is None  # above the highest
    assert await store.entries_since("doc", "5") == [ReplayEntry(str(i), True) for i in (6, 7, 8)]
    assert await store.entries_since("doc", "6") == [ReplayEntry("7", True), ReplayEntry("8", True)]
    assert await store.entries_since("doc", "8") == []  # exact newest: nothing missed
    # Not canonical decimal integers: never an id a server handed out.
    for cursor in ("", "abc", "06", "6.0", "+6", "-6", " 6", "6 ", "6e0", "0x6", "NaN", "Infinity", "٦"):
        assert await store.entries_since("doc", cursor) is None, cursor
    assert await store.entries_since("doc", str(2**53)) is None  # beyond exact doubles
    # Empty window: unknown id.
    assert await store.entries_since("other", "1") is None


async def test_entries_since_with_a_gap_in_the_scores(redis_client: Any) -> None:
    # As a TypeScript node (or a lost write) may leave it: 1, 2, 5, 9.
    for i, accepted in ((1, True), (2, False), (5, True), (9, False)):
        await redis_client.zadd("safe:replay:doc", {ts_member(str(i), accepted): i})
    store = RedisReplayStore(redis_client)
    assert await store.entries_since("doc", "3") == [ReplayEntry("5", True), ReplayEntry("9", False)]
    assert await store.entries_since("doc", "2") == [ReplayEntry("5", True), ReplayEntry("9", False)]
    assert await store.entries_since("doc", "6") == [ReplayEntry("9", False)]
    assert await store.entries_since("doc", "0") is None
    assert await store.entries_since("doc", "10") is None


async def test_entries_since_on_a_window_emptied_by_hand(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client)
    await store.record("doc", ReplayEntry("1", True))
    await redis_client.zrem("safe:replay:doc", ts_member("1", True))
    assert await store.entries_since("doc", "1") is None


async def test_forget_deletes_the_key(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client)
    await store.record("doc", ReplayEntry("1", True))
    await store.record("keep", ReplayEntry("1", True))
    await store.forget("doc")
    assert await redis_client.exists("safe:replay:doc") == 0
    assert await redis_client.keys("*") == [b"safe:replay:keep"]
    assert await store.entries_since("doc", "1") is None
    await store.forget("doc")  # idempotent


async def test_corrupt_members_raise_a_clear_error(redis_client: Any) -> None:
    store = RedisReplayStore(redis_client)
    for bad in (b"not json", b'{"transactionId":2,"accepted":true}', b'{"transactionId":"2"}', b"[1,2]"):
        await redis_client.delete("safe:replay:doc")
        await redis_client.zadd("safe:replay:doc", {ts_member("1", True): 1, bad: 2})
        with pytest.raises(CorruptReplayEntry, match="corrupt replay member in safe:replay:doc"):
            await store.entries_since("doc", "1")
        assert isinstance(CorruptReplayEntry("x"), ValueError)
    # Extra keys are ignored, as the reference schema strips them.
    await redis_client.delete("safe:replay:doc")
    await redis_client.zadd("safe:replay:doc", {b'{"transactionId":"1","accepted":true,"x":1}': 1})
    assert await store.entries("doc") == [ReplayEntry("1", True)]


async def test_store_arguments(redis_client: Any) -> None:
    for cap in (0, -1):
        with pytest.raises(ValueError, match="max_entries_per_share_data must be >= 1"):
            RedisReplayStore(redis_client, cap)
    for cap in (1.5, True, "3"):
        with pytest.raises(TypeError):
            RedisReplayStore(redis_client, cap)  # type: ignore[arg-type]
    store = RedisReplayStore(redis_client)
    for bad_id in ("abc", "01", "", "1.0"):
        with pytest.raises(ValueError, match="not a canonical decimal integer"):
            await store.record("doc", ReplayEntry(bad_id, True))
    with pytest.raises(TypeError):
        await store.record("doc", ReplayEntry("1", 1))  # type: ignore[arg-type]
    assert await redis_client.keys("*") == []


async def test_store_with_decoded_responses(redis_server: RedisProcess, redis_client: Any) -> None:
    client = make_client(redis_server, decode_responses=True)
    try:
        store = RedisReplayStore(client, 2)
        for i in (1, 2, 3):
            await store.record("doc", ReplayEntry(str(i), i != 2))
        assert await store.entries_since("doc", "2") == [ReplayEntry("3", True)]
        assert await redis_client.zrange("safe:replay:doc", 0, -1) == [ts_member("2", False), ts_member("3", True)]
    finally:
        await client.aclose()


# == RedisChannelRegistry ==================================================================


async def test_subscribe_on_first_local_subscriber_unsubscribe_after_last(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    errors = Errors()
    registry = registries(on_error=errors)
    a, b = Sink(), Sink()

    registry.subscribe("doc", a)
    await registry.flush()
    assert await channels(redis_client, prefix) == [f"{prefix}doc".encode()]
    assert await redis_client.pubsub_numsub(f"{prefix}doc") == [(f"{prefix}doc".encode(), 1)]

    registry.subscribe("doc", b)
    registry.subscribe("doc", a)  # again: no second SUBSCRIBE, and a keeps its place
    registry.subscribe("other", b)
    await registry.flush()
    assert await channels(redis_client, prefix) == [f"{prefix}doc".encode(), f"{prefix}other".encode()]
    assert await redis_client.pubsub_numsub(f"{prefix}doc") == [(f"{prefix}doc".encode(), 1)]
    assert registry.subscribers("doc") == [a, b] and registry.channel_count() == 2

    registry.unsubscribe("doc", a)
    await registry.flush()
    assert await channels(redis_client, prefix) == [f"{prefix}doc".encode(), f"{prefix}other".encode()]

    registry.unsubscribe("doc", b)
    registry.unsubscribe("doc", b)  # not subscribed any more: no-op
    await registry.flush()
    assert await channels(redis_client, prefix) == [f"{prefix}other".encode()]

    registry.remove_connection(b)
    await registry.flush()
    assert await channels(redis_client, prefix) == []
    assert registry.channel_count() == 0
    assert errors == []


async def test_many_first_subscribers_at_once(registries: RegistryFactory, redis_client: Any, prefix: str) -> None:
    registry = registries()
    sinks = {f"doc{i}": Sink() for i in range(60)}
    for share_data_id, sink in sinks.items():
        registry.subscribe(share_data_id, sink)
    for share_data_id in sinks:
        registry.broadcast(share_data_id, tx(share_data_id, "1", 1))
    await registry.flush()
    assert await channels(redis_client, prefix) == sorted(f"{prefix}{i}".encode() for i in sinks)
    for share_data_id, sink in sinks.items():
        assert await sink.wait_for_count(1) == [encode_message(tx(share_data_id, "1", 1))]
    for share_data_id, sink in sinks.items():
        registry.remove_connection(sink)
    await registry.flush()
    assert await channels(redis_client, prefix) == []


async def test_broadcast_publishes_even_without_local_subscribers(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry = registries()
    pubsub = redis_client.pubsub()
    try:
        await pubsub.subscribe(f"{prefix}doc")
        await asyncio.wait_for(pubsub.get_message(timeout=DEADLINE), DEADLINE)  # the confirmation

        frame = tx("doc", "1", 1)
        registry.broadcast("doc", frame)
        registry.broadcast("doc", {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"})
        message = await next_pubsub_message(pubsub)
        assert message["channel"] == f"{prefix}doc".encode()
        assert message["data"] == encode_message(frame)
        assert message["data"] == (
            b'{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"1",'
            b'"accepted":true,"currentState":{"count":1}}'
        )
        message = await next_pubsub_message(pubsub)
        assert message["data"] == b'{"v":1,"type":"lifecycle","shareDataId":"doc","event":"removed"}'
        # The registry itself never subscribed: nobody local wanted it.
        assert await redis_client.pubsub_numsub(f"{prefix}doc") == [(f"{prefix}doc".encode(), 1)]
    finally:
        await pubsub.aclose()


async def test_local_delivery_is_at_once_and_the_echo_is_dropped(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    errors = Errors()
    registry = registries(on_error=errors)
    a, b = Sink(), Sink()
    registry.subscribe("doc", a)
    registry.subscribe("doc", b)
    frames = [tx("doc", str(i), i) for i in range(1, 301)] + [LifecycleFrame("doc", "updated", {"count": 0})]
    frames += [tx("doc", "1", 1)]  # a replaced ShareData counts from 1 again
    for frame in frames:
        registry.broadcast("doc", frame)
    expected = [encode_message(frame) for frame in frames]
    # Delivered before Redis saw any of them (the SUBSCRIBE itself is still under way).
    for sink in (a, b):
        assert await sink.wait_for_count(302) == expected
    await registry.flush()  # every PUBLISH acknowledged: Redis has routed the echoes
    # A marker that can only arrive through Redis, after all of them: the
    # echoes in front of it were dropped.
    marker = await publish_marker(redis_client, prefix)
    for sink in (a, b):
        assert await sink.wait_for_count(303) == expected + [marker]
    # One encoded frame, the compact JSON, no re-encoding.
    assert bytes(a.recorder.data).startswith(core.encode_frame(expected[0]))
    assert errors == []


async def test_a_subscriber_gets_nothing_this_node_published_before_it_subscribed(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry, a, errors = await subscribed_at_redis(registries)  # subscribed at Redis: every later PUBLISH echoes back
    early = [tx("doc", str(i), i) for i in (1, 2, 3)]
    for frame in early:
        registry.broadcast("doc", frame)
    b = Sink()
    registry.subscribe("doc", b)  # its state frame would already hold 1-3
    late = tx("doc", "4", 4)
    registry.broadcast("doc", late)
    await registry.flush()
    # Another node's message (or one this node cannot match) reaches everybody.
    marker = await publish_marker(redis_client, prefix)
    assert await a.wait_for_count(5) == [encode_message(f) for f in early + [late]] + [marker]
    assert await b.wait_for_count(2) == [encode_message(late), marker]
    assert errors == []


async def test_resubscribing_gets_nothing_published_before_either_subscribe(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry, a, errors = await subscribed_at_redis(registries)
    early = [tx("doc", str(i), i) for i in (1, 2)]
    for frame in early:
        registry.broadcast("doc", frame)  # a gets them now
    # The same connection subscribes again (a new snapshot, holding 1 and 2),
    # and another one subscribes right after the channel's last one left,
    # while the UNSUBSCRIBE is still on its way: the echoes of 1 and 2 reach
    # neither.
    registry.subscribe("doc", a)
    b = Sink()
    registry.unsubscribe("doc", a)
    registry.subscribe("doc", b)
    registry.subscribe("doc", a)
    late = tx("doc", "3", 3)
    registry.broadcast("doc", late)
    await registry.flush()
    marker = await publish_marker(redis_client, prefix)
    assert await a.wait_for_count(4) == [encode_message(f) for f in early + [late]] + [marker]
    assert await b.wait_for_count(2) == [encode_message(late), marker]
    assert errors == []


async def test_two_registries_deliver_across_nodes(
    registries: RegistryFactory, redis_server: RedisProcess
) -> None:
    clients = [make_client(redis_server), make_client(redis_server)]
    registries.clients.extend(clients)  # type: ignore[attr-defined]
    node_a, node_b = registries(clients[0]), registries(clients[1])
    on_a, on_b, idle = Sink(), Sink(), Sink()
    node_a.subscribe("doc", on_a)
    node_b.subscribe("doc", on_b)
    node_b.subscribe("elsewhere", idle)
    await node_b.flush()
    # One sequence of ids across the nodes, as a shared store hands them out.
    for i in range(1, 4):
        node_a.broadcast("doc", tx("doc", str(i), i))
    await on_b.wait_for_count(3)
    node_b.broadcast("doc", tx("doc", "4", 4))
    expected = [encode_message(tx("doc", str(i), i)) for i in range(1, 5)]
    for sink in (on_a, on_b):
        assert await sink.wait_for_count(4) == expected
    # Exactly once: a marker through Redis comes right after them.
    await node_a.flush()
    await node_b.flush()
    marker = await publish_marker(clients[0], node_a.channel_prefix)
    for sink in (on_a, on_b):
        assert await sink.wait_for_count(5) == expected + [marker]
    assert idle.payloads == []


async def test_frames_from_redis_reach_a_subscriber_at_most_once_in_order_and_after_its_snapshot(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    errors = Errors()
    registry = registries(on_error=errors)
    manager = ShareDataManager()  # this node's manager, where a subscriber's snapshot comes from
    manager.add_share_data(make_doc())
    inc = manager.get_share_data_by_id("doc").functions[0]  # type: ignore[union-attr]
    early, late = Sink(), Sink()
    late.hub = SimpleNamespace(manager=manager)  # as a server connection has
    registry.subscribe("doc", early)
    await registry.flush()
    channel = f"{prefix}doc"

    async def publish(*ids: str) -> None:
        for transaction_id in ids:
            await redis_client.publish(channel, encode_message(tx("doc", transaction_id, int(transaction_id))))

    # Another node's 1 and 2; 2 again (a retried PUBLISH); 1 late (overtaken).
    await publish("1", "2", "2", "1")
    marker = await publish_marker(redis_client, prefix)
    assert await early.wait_for_count(3) == [encode_message(tx("doc", i, int(i))) for i in ("1", "2")] + [marker]
    # A subscriber whose snapshot already holds 4 (with a shared store, the
    # snapshot may be ahead of what Redis delivered): 3 and 4 skip it only.
    for i in range(1, 5):
        await manager.apply_transaction("doc", {"count": i}, inc)
    registry.subscribe("doc", late)
    await publish("3", "4", "5")
    marker2 = await publish_marker(redis_client, prefix)
    newer = [encode_message(tx("doc", i, int(i))) for i in ("3", "4", "5")]
    assert (await early.wait_for_count(7))[3:] == newer + [marker2]
    assert await late.wait_for_count(2) == [encode_message(tx("doc", "5", 5)), marker2]
    assert errors == []


async def test_a_lifecycle_frame_published_twice_reaches_a_subscriber_once(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    # A PUBLISH retried after a timeout may land twice: on this node (its own
    # broadcast, then a second echo) and from another node (two copies).
    registry, sink, errors = await subscribed_at_redis(registries)
    channel = f"{prefix}doc"
    own = {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "updated", "currentState": {"n": 1}}
    registry.broadcast("doc", own)
    await registry.flush()
    await redis_client.publish(channel, encode_message(own))  # the retry's echo
    foreign = encode_message(
        {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "updated", "currentState": {"n": 2}}
    )
    await redis_client.publish(channel, foreign)
    await redis_client.publish(channel, foreign)
    # After a transaction, the same lifecycle frame is news again.
    await redis_client.publish(channel, encode_message(tx("doc", "1", 1)))
    await redis_client.publish(channel, foreign)
    marker = await publish_marker(redis_client, prefix)
    assert await sink.wait_for_count(5) == [
        encode_message(own),
        foreign,
        encode_message(tx("doc", "1", 1)),
        foreign,
        marker,
    ]
    assert errors == []


async def test_foreign_typescript_payload_reaches_local_subscribers(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry, sink, errors = await subscribed_at_redis(registries)
    # JSON.stringify of a TypeScript node's message (it may carry key order or
    # keys of its own: the payload is forwarded as it is).
    payloads = [
        '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"7","accepted":true,"currentState":{"n":"é"}}',
        '{"v":1,"type":"lifecycle","shareDataId":"doc","event":"updated","currentState":[1,2]}',
        '{"v":1,"type":"transaction","shareDataId":"doc","transactionId":"8","accepted":false,"currentState":null}',
    ]
    for payload in payloads:
        await redis_client.publish(f"{prefix}doc", payload)
    assert await sink.wait_for_count(3) == [p.encode() for p in payloads]
    assert errors == []


async def test_garbage_payload_goes_to_on_error_and_is_skipped(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry, sink, errors = await subscribed_at_redis(registries)
    garbage = [b"not json", b'{"v":1,"type":"nope"}', b'{"v":2,"type":"pong","correlationId":"x"}', b"\xff\xfe"]
    for payload in garbage:
        await redis_client.publish(f"{prefix}doc", payload)
    good = encode_message(tx("doc", "1", 1))
    await redis_client.publish(f"{prefix}doc", good)
    assert await sink.wait_for_count(1) == [good]
    await errors.wait_for(lambda e: len(e) >= len(garbage))
    assert len(errors) == len(garbage)
    assert all(isinstance(e, InvalidMessage) for e in errors)
    assert f"payload on {prefix}doc" in str(errors[0])
    registry.broadcast("doc", tx("doc", "2", 2))
    assert await sink.wait_for_count(2) == [good, encode_message(tx("doc", "2", 2))]


async def test_remove_channel_delivers_what_was_published_before_then_unsubscribes(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry = registries()
    a, b, other = Sink(), Sink(), Sink()
    registry.subscribe("doc", a)
    registry.subscribe("doc", b)
    registry.subscribe("other", other)
    await registry.flush()
    # What ServerHub does on share-data:removed: broadcast, then remove_channel.
    removed = LifecycleFrame("doc", "removed")
    registry.broadcast("doc", removed)
    registry.remove_channel("doc")
    assert registry.subscribers("doc") == []
    await registry.flush()
    assert await channels(redis_client, prefix) == [f"{prefix}other".encode()]
    for sink in (a, b):
        assert await sink.wait_for_count(1) == [encode_message(removed)]
    # Later frames of that id reach nobody here (still published for other nodes).
    registry.broadcast("doc", tx("doc", "9", 9))
    registry.broadcast("other", tx("other", "1", 1))
    assert await other.wait_for_count(1) == [encode_message(tx("other", "1", 1))]
    assert a.payloads == [encode_message(removed)] and b.payloads == [encode_message(removed)]
    registry.remove_channel("doc")  # unknown now: no-op
    registry.remove_channel("never")


async def test_decoded_responses_client(registries: RegistryFactory, redis_server: RedisProcess) -> None:
    client = make_client(redis_server, decode_responses=True)
    registries.clients.append(client)  # type: ignore[attr-defined]
    registry = registries(client)
    sink = Sink()
    registry.subscribe("doc", sink)
    frame = TransactionFrame("doc", "1", True, {"s": "ünï"})
    registry.broadcast("doc", frame)
    assert await sink.wait_for_count(1) == [encode_message(frame)]


async def test_reader_resubscribes_after_its_connection_is_killed(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    errors = Errors()
    registry = registries(on_error=errors, reconnect_min_delay=0.01, reconnect_max_delay=0.1)
    sink = Sink()
    registry.subscribe("doc", sink)
    registry.subscribe("other", sink)
    await registry.flush()
    killed = await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 1

    async def resubscribed() -> bool:
        numsub = await redis_client.pubsub_numsub(f"{prefix}doc", f"{prefix}other")
        return [n for _, n in numsub] == [1, 1]

    await eventually(resubscribed, "the registry subscribed its channels again")
    marker = await publish_marker(redis_client, prefix)
    assert await sink.wait_for_count(1) == [marker]


async def test_registry_survives_a_redis_restart(
    own_redis_server: RedisProcess, registries: RegistryFactory
) -> None:
    # No retries inside redis-py: the registry's own backoff does the work.
    client = owned_client(own_redis_server, registries, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1.0)
    errors = Errors()
    registry = registries(
        client, on_error=errors, reconnect_min_delay=0.01, reconnect_max_delay=0.2, retry=Retry(NoBackoff(), 0)
    )
    sink = Sink()
    registry.subscribe("doc", sink)
    registry.broadcast("doc", tx("doc", "1", 1))
    assert await sink.wait_for_count(1) == [encode_message(tx("doc", "1", 1))]

    port = own_redis_server.port
    own_redis_server.stop()
    registry.broadcast("doc", tx("doc", "2", 2))  # the local subscriber gets it all the same
    await errors.wait_for(lambda e: len(e) >= 2)  # the reader's and the publish's

    own_redis_server.start(port)
    plain = make_client(own_redis_server)
    try:

        async def resubscribed() -> bool:
            return await plain.pubsub_numsub(registry.channel_prefix + "doc") == [
                ((registry.channel_prefix + "doc").encode(), 1)
            ]

        await eventually(resubscribed, "the registry resubscribed after the restart", tries=750)
        registry.broadcast("doc", tx("doc", "3", 3))
        marker = await publish_marker(plain, registry.channel_prefix)
    finally:
        await plain.aclose()
    # Every frame of this node once, in order, then the one through Redis.
    assert await sink.wait_for_count(4) == [encode_message(tx("doc", str(i), i)) for i in (1, 2, 3)] + [marker]


async def test_close_is_bounded_with_redis_down_and_the_backlog_is_capped(registries: RegistryFactory) -> None:
    port = free_port()  # nothing listens there
    client = redis_asyncio.Redis(
        host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5
    )
    registries.clients.append(client)  # type: ignore[attr-defined]
    errors = Errors()
    registry = registries(client, on_error=errors, max_pending_publishes=3, reconnect_min_delay=0.01, reconnect_max_delay=0.05)
    sink = Sink()
    registry.subscribe("doc", sink)
    for i in range(10):
        registry.broadcast("doc", tx("doc", str(i), i))  # never blocks; delivered here all the same
    backlog = [e for e in errors if isinstance(e, RuntimeError) and "dropping" in str(e)]
    assert len(backlog) == 7
    # The reader keeps retrying with a bounded backoff, reporting each failure.
    await errors.wait_for(lambda e: len(e) >= 7 + 5)
    await asyncio.wait_for(registry.close(timeout=0.5), DEADLINE)
    assert registry.closed
    registry.broadcast("doc", tx("doc", "after", 0))  # a no-op once closed
    registry.subscribe("doc2", sink)
    await registry.flush()
    assert sink.payloads == [encode_message(tx("doc", str(i), i)) for i in range(10)]


async def test_close_stops_tasks_and_the_pubsub_connection(
    registries: RegistryFactory, redis_client: Any, prefix: str
) -> None:
    registry = registries()
    sink = Sink()
    registry.subscribe("doc", sink)
    registry.broadcast("doc", tx("doc", "1", 1))
    await registry.close()  # sends what was queued first
    await registry.close()  # idempotent
    assert await channels(redis_client, prefix) == []
    assert registry._worker is None and registry._reader is None
    assert all(not t.get_name().startswith("RedisChannelRegistry") for t in asyncio.all_tasks())


async def test_registry_arguments(redis_client: Any) -> None:
    with pytest.raises(ValueError):
        RedisChannelRegistry(redis_client, max_pending_publishes=0)
    with pytest.raises(ValueError):
        RedisChannelRegistry(redis_client, reconnect_min_delay=1.0, reconnect_max_delay=0.5)
    with pytest.raises(ValueError):
        RedisChannelRegistry(redis_client, confirm_timeout=0)
    with pytest.raises(ValueError, match="command_timeout"):
        RedisChannelRegistry(redis_client, command_timeout=0)
    with pytest.raises(TypeError, match="retry"):
        RedisChannelRegistry(redis_client, retry=3)
    with pytest.raises(TypeError):
        RedisChannelRegistry(redis_client, 5)  # type: ignore[arg-type]
    registry = RedisChannelRegistry(redis_client)
    assert registry.channel_prefix == "safe:rt:"
    # Content JSON cannot express fails at once, as with the in-memory registry.
    with pytest.raises(EncodeError):
        registry.broadcast("doc", TransactionFrame("doc", "1", True, {"x": {1, 2}}))
    await registry.close()  # never started: fine


# == two server nodes on one Redis ===========================================================


def make_doc() -> ShareData:
    return ShareData(
        "doc",
        current_state={"count": 0},
        functions=[ShareFunction("inc", lambda current, proposed: True)],
    )


def ws(url: str) -> Any:
    return ws_connect(
        url, compression=None, proxy=None, ping_interval=None, max_size=None,
        open_timeout=DEADLINE, close_timeout=DEADLINE,
    )  # fmt: skip


async def send(conn: Any, **message: Any) -> None:
    await conn.send(json.dumps({"v": 1, **message}))


async def recv(conn: Any) -> dict[str, Any]:
    raw = await asyncio.wait_for(conn.recv(), DEADLINE)
    assert isinstance(raw, str)
    return json.loads(raw)


async def until_pong(conn: Any, correlation_id: str) -> list[dict[str, Any]]:
    """Everything the server sent before the pong of a ping sent now (bounded)."""
    await send(conn, type="ping", correlationId=correlation_id)
    before = []
    for _ in range(1000):
        message = await recv(conn)
        if message == {"v": 1, "type": "pong", "correlationId": correlation_id}:
            return before
        before.append(message)
    raise AssertionError("no pong")


async def test_two_nodes_share_live_fanout_and_the_replay_window(redis_server: RedisProcess) -> None:
    client_a, client_b, plain = make_client(redis_server), make_client(redis_server), make_client(redis_server)
    await plain.flushall()
    managers = {"a": ShareDataManager(), "b": ShareDataManager()}
    for manager in managers.values():
        manager.add_share_data(make_doc())
    inc = managers["a"].get_share_data_by_id("doc").functions[0]  # type: ignore[union-attr]
    errors = Errors()
    registry_a = RedisChannelRegistry(client_a, on_error=errors)
    registry_b = RedisChannelRegistry(client_b, on_error=errors)
    store_a, store_b = RedisReplayStore(client_a), RedisReplayStore(client_b)
    nodes = []
    try:
        for manager, registry, store in ((managers["a"], registry_a, store_a), (managers["b"], registry_b, store_b)):
            nodes.append(
                await attach_realtime_server(
                    manager=manager,
                    authenticate=lambda request: {"subject": "test"},
                    host="127.0.0.1",
                    port=0,
                    resolve_function=create_id_based_function_resolver(manager),
                    registry=registry,
                    replay_store=store,
                    heartbeat_interval=None,
                )
            )
        node_a, node_b = nodes
        assert node_a.port != node_b.port
        async with ws(node_a.url) as on_a, ws(node_b.url) as on_b:
            for conn in (on_a, on_b):
                await send(conn, type="subscribe", shareDataId="doc")
                assert await recv(conn) == {
                    "v": 1, "type": "state", "shareDataId": "doc",
                    "currentState": {"count": 0}, "lastTransactionId": None,
                }  # fmt: skip
            # The first-subscriber gap: wait until both nodes' SUBSCRIBEs are confirmed.
            await registry_a.flush()
            await registry_b.flush()

            for i in range(1, 5):
                outcome = await managers["a"].apply_transaction("doc", {"count": i}, inc)
                assert outcome.transaction_id == str(i)
            # And one proposed over the wire to node A.
            await send(on_a, type="propose", shareDataId="doc", functionId="inc",
                       proposedData={"count": 5}, correlationId="c5")  # fmt: skip

            def live(i: int) -> dict[str, Any]:
                return {
                    "v": 1, "type": "transaction", "shareDataId": "doc",
                    "transactionId": str(i), "accepted": True, "currentState": {"count": i},
                }  # fmt: skip

            got_b = [await recv(on_b) for _ in range(5)]
            assert got_b == [live(i) for i in range(1, 6)]
            got_a = [m for m in [await recv(on_a) for _ in range(6)] if m["type"] == "transaction"]
            assert got_a == [live(i) for i in range(1, 6)]  # the origin node: one path too
            # Exactly once: the next frame after a sentinel transaction is the sentinel.
            await managers["a"].apply_transaction("doc", {"count": 6}, inc)
            assert await recv(on_b) == live(6)
            assert await recv(on_a) == live(6)
            assert await until_pong(on_b, "p1") == []

            # Node A's records are fire-and-forget: wait until the shared window has them.
            async def recorded() -> bool:
                return len(await store_b.entries("doc")) == 6

            await eventually(recorded, "node A recorded 6 transactions in Redis")
            assert await plain.zrange("safe:replay:doc", 0, 1, withscores=True) == [
                (b'{"transactionId":"1","accepted":true}', 1.0),
                (b'{"transactionId":"2","accepted":true}', 2.0),
            ]

            # Resume on node B from cursor 2: replay recorded by node A.
            await send(on_b, type="unsubscribe", shareDataId="doc")
            await send(on_b, type="subscribe", shareDataId="doc", since="2")
            resumed = await until_pong(on_b, "p2")
            assert resumed[0]["type"] == "state"
            assert resumed[1:] == [
                {"v": 1, "type": "transaction", "shareDataId": "doc", "transactionId": str(i),
                 "accepted": True, "replayed": True}
                for i in range(3, 7)
            ]  # fmt: skip
            # An evicted / unknown cursor falls back to the snapshot.
            await send(on_b, type="subscribe", shareDataId="doc", since="99")
            assert await until_pong(on_b, "p3") == [
                {"v": 1, "type": "state", "shareDataId": "doc", "currentState": {"count": 0},
                 "lastTransactionId": None},
                {"v": 1, "type": "error", "code": "replay-cursor-not-found",
                 "message": "since=99 not present in retained replay window; skipping replay"},
            ]  # fmt: skip
            await registry_b.flush()  # node B subscribed again

            # Removal on node A: both nodes' subscribers hear it, the window is forgotten.
            managers["a"].remove_share_data_by_id("doc")
            removed = {"v": 1, "type": "lifecycle", "shareDataId": "doc", "event": "removed"}
            assert await recv(on_a) == removed
            assert await recv(on_b) == removed

            async def forgotten() -> bool:
                return await plain.exists("safe:replay:doc") == 0

            await eventually(forgotten, "the replay window was deleted")
        assert errors == []
    finally:
        for node in nodes:
            await asyncio.wait_for(node.close(), DEADLINE)
        for registry in (registry_a, registry_b):
            await asyncio.wait_for(registry.close(), DEADLINE)
        for client in (client_a, client_b, plain):
            await client.aclose()


# == Redis away: bounded waits, reported attempts ============================================


async def test_a_since_subscribe_gets_state_then_resync_while_redis_is_stopped(
    own_redis_server: RedisProcess,
) -> None:
    # The client as most users build it: redis-py's default retries (a
    # command against a dead Redis can take seconds) and no socket timeout.
    client = make_client(own_redis_server)
    manager = ShareDataManager()
    manager.add_share_data(make_doc())
    inc = manager.get_share_data_by_id("doc").functions[0]  # type: ignore[union-attr]
    store = RedisReplayStore(client)
    timeouts: list[ReplayTimeoutEvent] = []
    server = await attach_realtime_server(
        manager=manager,
        authenticate=lambda request: {"subject": "test"},
        replay_store=store,
        heartbeat_interval=None,
        replay_timeout=0.3,
    )
    server.on("replay:timeout", timeouts.append)
    try:
        for i in (1, 2, 3):
            await manager.apply_transaction("doc", {"count": i}, inc)

        async def recorded() -> bool:
            return len(await store.entries("doc")) == 3

        await eventually(recorded, "3 transactions in the Redis window")
        async with ws(server.url) as conn:
            own_redis_server.pause()
            try:
                # The window read hangs: the answer comes anyway, while Redis is still stopped.
                await send(conn, type="subscribe", shareDataId="doc", since="1")
                assert await recv(conn) == {
                    "v": 1, "type": "state", "shareDataId": "doc",
                    "currentState": {"count": 3}, "lastTransactionId": "3",
                }  # fmt: skip
                assert await recv(conn) == {
                    "v": 1, "type": "error", "code": "replay-cursor-not-found",
                    "message": "since=1 not present in retained replay window; skipping replay",
                }  # fmt: skip
                # A transaction whose record() hangs: the replay waits for it, bounded too.
                await manager.apply_transaction("doc", {"count": 4}, inc)
                assert (await recv(conn))["transactionId"] == "4"
                await send(conn, type="subscribe", shareDataId="doc", since="2")
                answer = await until_pong(conn, "p1")
                assert [(m["type"], m.get("lastTransactionId"), m.get("code")) for m in answer] == [
                    ("state", "4", None),
                    ("error", None, "replay-cursor-not-found"),
                ]
                assert [(t.connection_id, t.share_data_id, t.since, t.timeout) for t in timeouts] == [
                    (server.connections[0].id, "doc", "1", 0.3),
                    (server.connections[0].id, "doc", "2", 0.3),
                ]
            finally:
                own_redis_server.resume()

            # Redis is back: the held write lands and replays work again.
            async def four_recorded() -> bool:
                return len(await store.entries("doc")) == 4

            await eventually(four_recorded, "the held record landed")
            await send(conn, type="subscribe", shareDataId="doc", since="2")
            assert [(m["type"], m.get("transactionId")) for m in await until_pong(conn, "p2")] == [
                ("state", None),
                ("transaction", "3"),
                ("transaction", "4"),
            ]
            assert len(timeouts) == 2
    finally:
        await asyncio.wait_for(server.close(), DEADLINE)
        await client.aclose()


async def test_replay_timeout_option_is_validated() -> None:
    manager = ShareDataManager()
    for bad in (0, -1, True, "1", None):
        with pytest.raises(ValueError, match="replay_timeout"):
            await attach_realtime_server(
                manager=manager, authenticate=lambda request: True, replay_timeout=bad  # type: ignore[arg-type]
            )


async def test_on_error_reports_each_failed_publish_attempt_while_redis_is_down(
    own_redis_server: RedisProcess, registries: RegistryFactory
) -> None:
    client = owned_client(own_redis_server, registries, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    errors = Errors()
    registry = registries(client, on_error=errors, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=3))
    registry.broadcast("doc", tx("doc", "1", 1))
    await registry.flush()
    assert errors == []

    own_redis_server.stop()
    registry.broadcast("doc", tx("doc", "2", 2))
    await registry.flush()  # every attempt made: 1 + 3 retries, each one reported, then dropped
    assert len(errors) == 4, errors
    assert all(isinstance(e, RedisConnectionError) for e in errors), errors
    registry.broadcast("doc", tx("doc", "3", 3))
    await registry.flush()
    assert len(errors) == 8


async def test_a_hung_redis_fails_publish_attempts_instead_of_stalling_them(
    own_redis_server: RedisProcess, registries: RegistryFactory
) -> None:
    client = owned_client(own_redis_server, registries)  # redis-py's default retries: bounded by command_timeout
    errors = Errors()
    registry = registries(
        client, on_error=errors, command_timeout=0.2, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2)
    )
    registry.broadcast("doc", tx("doc", "1", 1))
    await registry.flush()
    own_redis_server.pause()
    try:
        registry.broadcast("doc", tx("doc", "2", 2))
        await registry.flush()  # returns while Redis is still stopped
        assert [type(e) for e in errors] == [RedisTimeoutError] * 3
        assert "did not answer PUBLISH within 0.2s" in str(errors[0])
    finally:
        own_redis_server.resume()
    plain = make_client(own_redis_server)
    try:
        pubsub = plain.pubsub()
        await pubsub.subscribe(registry.channel_prefix + "doc")
        await asyncio.wait_for(pubsub.get_message(timeout=DEADLINE), DEADLINE)  # the confirmation

        async def delivered() -> bool:
            registry.broadcast("doc", tx("doc", "4", 4))
            await registry.flush()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            return message is not None

        await eventually(delivered, "publishing works again once Redis answers")
        await pubsub.aclose()
    finally:
        await plain.aclose()


@pytest.mark.parametrize("outage", ["killed", "stopped"])
async def test_local_subscribers_miss_nothing_while_redis_is_away_under_load(
    own_redis_server: RedisProcess, outage: str
) -> None:
    client = make_client(own_redis_server, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    errors = Errors()
    registry = RedisChannelRegistry(
        client, on_error=errors, reconnect_min_delay=0.01, reconnect_max_delay=0.2, command_timeout=0.3
    )
    manager = ShareDataManager()
    manager.add_share_data(make_doc())
    inc = manager.get_share_data_by_id("doc").functions[0]  # type: ignore[union-attr]
    server = await attach_realtime_server(
        manager=manager, authenticate=lambda request: {"subject": "test"}, registry=registry, heartbeat_interval=None
    )
    total, port = 300, own_redis_server.port
    try:
        async with ws(server.url) as first, ws(server.url) as second:
            for conn in (first, second):
                await send(conn, type="subscribe", shareDataId="doc")
                assert (await recv(conn))["type"] == "state"

            async def load() -> None:
                for i in range(1, total + 1):
                    if i == 100 and outage == "killed":
                        own_redis_server.stop()
                    elif i == 100:
                        own_redis_server.pause()
                    elif i == 200 and outage == "killed":
                        await asyncio.to_thread(own_redis_server.start, port)
                    elif i == 200:
                        own_redis_server.resume()
                    await manager.apply_transaction("doc", {"count": i}, inc)
                    await asyncio.sleep(0.005)

            producer = asyncio.create_task(load())
            try:
                for conn in (first, second):
                    ids = [(await recv(conn))["transactionId"] for _ in range(total)]
                    assert ids == [str(i) for i in range(1, total + 1)]  # every one, once, in order
                await asyncio.wait_for(producer, DEADLINE)
            finally:
                own_redis_server.resume()
            assert errors, "the outage was reported"

            # Once Redis delivers again, a frame through Redis is the next
            # thing they get: no echo of the 300 came through twice.
            plain = make_client(own_redis_server)

            async def publish_markers() -> None:
                for _ in range(200):  # bounded: 10 s
                    await publish_marker(plain, "safe:rt:")
                    await asyncio.sleep(0.05)

            publisher = asyncio.create_task(publish_markers())
            try:
                for conn in (first, second):
                    assert (await recv(conn))["transactionId"] == "marker"
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
                await plain.aclose()
    finally:
        own_redis_server.resume()
        await asyncio.wait_for(server.close(), DEADLINE)
        await asyncio.wait_for(registry.close(), DEADLINE)
        await client.aclose()


async def test_a_silent_pubsub_connection_is_noticed_reported_and_replaced(
    own_redis_server: RedisProcess, registries: RegistryFactory
) -> None:
    client = owned_client(own_redis_server, registries, retry=Retry(NoBackoff(), 0))
    errors = Errors()
    registry = registries(
        client, on_error=errors, command_timeout=0.2, reconnect_min_delay=0.01, reconnect_max_delay=0.1
    )
    sink = Sink()
    registry.subscribe("doc", sink)
    await registry.flush()
    own_redis_server.pause()  # no socket closes: only the missing PONG tells
    try:
        # Nothing is broadcast: the reader alone reports, once per attempt.
        await errors.wait_for(lambda e: len(e) >= 3)
        assert all(isinstance(e, RedisTimeoutError) for e in errors), errors
        assert "did not answer PING on the pub/sub connection within 0.2s" in str(errors[0])
        assert "did not answer SUBSCRIBE within 0.2s" in str(errors[1])
    finally:
        own_redis_server.resume()
    plain = make_client(own_redis_server)
    try:
        # (PUBSUB NUMSUB may still count the abandoned connection for a moment.)
        async def delivered() -> bool:
            await publish_marker(plain, registry.channel_prefix)
            await asyncio.sleep(0.05)
            return bool(sink.payloads)

        await eventually(delivered, "a frame through Redis arrives once Redis answers again", tries=300)
    finally:
        await plain.aclose()
    assert set(sink.payloads) == {encode_message(tx("doc", "marker", 0))}


class FollowerManager:
    """Node B's view of ShareData that node A commits: it reads the same
    state (as a manager in front of a shared store does) but emits nothing,
    so A's transactions reach B's subscribers only through Redis."""

    def __init__(self, leader: ShareDataManager) -> None:
        self.leader = leader

    def get_share_data_by_id(self, share_data_id: str) -> Any:
        return self.leader.get_share_data_by_id(share_data_id)

    def on(self, event: str, listener: Any) -> None:
        pass

    def off(self, event: str, listener: Any) -> None:
        pass


async def test_a_remote_subscriber_fills_the_hole_of_a_redis_outage_by_gap_detection(
    own_redis_server: RedisProcess,
) -> None:
    redis_clients = [make_client(own_redis_server, retry=Retry(NoBackoff(), 0)) for _ in range(2)]
    errors = Errors()
    # Node A keeps at most 2 PUBLISHes waiting: what it broadcasts during the
    # outage beyond them is dropped for the other nodes (and reported).
    registries_ = [
        RedisChannelRegistry(
            c, on_error=errors, command_timeout=0.3, reconnect_min_delay=0.01, reconnect_max_delay=0.2,
            max_pending_publishes=cap,
        )  # fmt: skip
        for c, cap in zip(redis_clients, (2, 10_000))
    ]
    store = RedisReplayStore(redis_clients[0])
    leader = ShareDataManager()
    leader.add_share_data(make_doc())
    inc = leader.get_share_data_by_id("doc").functions[0]  # type: ignore[union-attr]
    nodes = []
    client = None
    try:
        for manager, registry, replay_store in (
            (leader, registries_[0], store),
            (FollowerManager(leader), registries_[1], RedisReplayStore(redis_clients[1])),
        ):
            nodes.append(
                await attach_realtime_server(
                    manager=manager, authenticate=lambda request: {"subject": "test"},
                    registry=registry, replay_store=replay_store, heartbeat_interval=None,
                )  # fmt: skip
            )
        client = RealtimeClient(nodes[1].url)  # on node B
        await client.connect()
        frames: list[Any] = []
        subscription = client.subscribe("doc")
        for kind in ("state", "transaction"):
            subscription.on(kind, frames.append)

        def transactions() -> list[str]:
            return [f.transaction_id for f in frames if f.type == "transaction"]

        async def until_seen(transaction_id: str) -> None:
            async def seen() -> bool:
                return transactions()[-1:] == [transaction_id]

            await eventually(seen, f"transaction {transaction_id} on node B")

        async def subscribed() -> bool:
            return bool(frames)

        await eventually(subscribed, "the state frame")
        await registries_[1].flush()  # node B subscribed at Redis
        for i in range(1, 11):
            await leader.apply_transaction("doc", {"count": i}, inc)
            await registries_[0].flush()
        await until_seen("10")

        own_redis_server.pause()
        try:
            for i in range(11, 31):  # committed on A, most of them never reach B
                await leader.apply_transaction("doc", {"count": i}, inc)
                await asyncio.sleep(0.01)
        finally:
            own_redis_server.resume()
        assert any("dropping a transaction frame" in str(e) for e in errors)

        async def recorded() -> bool:
            return len(await store.entries("doc")) == 30

        await eventually(recorded, "node A's held records landed")
        # The next frames that reach B skip ahead: its client asks B to replay the hole.
        last = 30
        for _ in range(200):  # bounded: until one got through (B may be reconnecting)
            last += 1
            await leader.apply_transaction("doc", {"count": last}, inc)
            await asyncio.sleep(0.02)
            if transactions()[-1:] == [str(last)]:
                break
        await until_seen(str(last))
        assert transactions() == [str(i) for i in range(1, last + 1)]  # every one, once, in order
        assert [f.type for f in frames].count("state") >= 2  # resubscribed on the gap
        assert any(f.replayed for f in frames if f.type == "transaction")  # the hole came by replay
    finally:
        if client is not None:
            await client.close()
        for node in nodes:
            await asyncio.wait_for(node.close(), DEADLINE)
        for registry in registries_:
            await asyncio.wait_for(registry.close(), DEADLINE)
        for redis_client_ in redis_clients:
            await redis_client_.aclose()
