"""Shared machinery of the end-to-end benchmarks (fanout_e2e.py, memory_per_connection.py).

Three roles, each a process:

* **server** (``python _harness.py server <kind>``): one WebSocket server of
  the comparison (ours on either core, ``websockets.broadcast``, naive picows,
  the raw-uvloop limit), driven by one-line commands on stdin, answering one
  line on stdout (see :func:`server_main`).
* **generator** (``python _harness.py generator``): the load generator. Raw
  uvloop ``BufferedProtocol`` connections that do a real WebSocket handshake,
  send a real (masked) subscribe frame, then *count* frames by walking their
  headers. No JSON is parsed, no payload is copied out of the receive buffer.
* the **orchestrator** (the benchmark script), which starts both, talks to
  them through :class:`Child` and owns every process it started: each is
  killed on any error, timeout or interrupt.

Everything listens and connects on 127.0.0.1 only. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).resolve()


def ensure_importable() -> None:
    """Make ``import safe_fast`` work from a source checkout (the compiled core is built in place)."""
    try:
        import safe_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


# -- the broadcast payload ------------------------------------------------------------

SHARE_DATA_ID = "bench"
WS_PATH = "/realtime"
PAYLOAD_SIZE = 250
SUBSCRIBE = b'{"v":1,"type":"subscribe","shareDataId":"bench"}'
# What the peer servers answer to a subscribe (ours answers its real `state`).
PEER_ACK = b'{"v":1,"type":"state","shareDataId":"bench","currentState":null,"lastTransactionId":null}'


def _state(i: int, pad: str) -> dict[str, Any]:
    return {
        "seq": f"{i:010d}",
        "symbol": "SAFE-USD",
        "bid": 101.25,
        "ask": 101.5,
        "sizes": [1700, 2300, 900],
        "venue": "loopback",
        "open": True,
        "pad": pad,
    }


def envelope(state: Any) -> dict[str, Any]:
    """The exact wire dict of safe_fast's ``lifecycle updated`` frame (same key order)."""
    return {"v": 1, "type": "lifecycle", "shareDataId": SHARE_DATA_ID, "event": "updated", "currentState": state}


def _pad_for(size: int) -> str:
    import orjson

    base = len(orjson.dumps(envelope(_state(0, ""))))
    if base > size:
        raise ValueError("payload size too small for the envelope")
    return "x" * (size - base)


_PAD: Optional[str] = None


def make_state(i: int) -> dict[str, Any]:
    """The application state of broadcast ``i``; its frame payload is exactly PAYLOAD_SIZE bytes."""
    global _PAD
    if _PAD is None:
        _PAD = _pad_for(PAYLOAD_SIZE)
    return _state(i, _PAD)


def frame_header(size: int, opcode: int = 0x1) -> bytes:
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return bytes((0x80 | opcode, 126, size >> 8, size & 0xFF))
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")


FRAME_SIZE = len(frame_header(PAYLOAD_SIZE)) + PAYLOAD_SIZE
"""Bytes on the wire per delivered broadcast frame."""

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client-to-server (masked) frame."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126, size >> 8, size & 0xFF))
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return header + mask + body


# -- process helpers ------------------------------------------------------------------


def child_env(overrides: dict[str, Optional[str]]) -> dict[str, str]:
    """This process's environment with ``overrides`` applied (None removes a variable)."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_target = 1 << 20
    else:
        hard_target = hard
    if soft != resource.RLIM_INFINITY and soft < hard_target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kib() -> int:
    """Current resident set size of this process, KiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def maxrss_kib() -> int:
    """Peak resident set size of this process so far, KiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def install_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _out(*fields: Any) -> None:
    sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
    sys.stdout.flush()


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# -- the servers ----------------------------------------------------------------------


class BenchServer:
    """One server of the comparison. ``burst(k, m)``: m broadcasts, k per loop iteration."""

    info = ""

    async def start(self) -> int:
        raise NotImplementedError

    def subscriber_count(self) -> int:
        raise NotImplementedError

    async def burst(self, k: int, m: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class SafeFastServer(BenchServer):
    """Ours: ``attach_realtime_server``; each broadcast is ``manager.update_share_data``.

    That is the ``share-data:updated`` path: a ShareDataManager event ->
    ``LifecycleFrame`` -> the registry encodes it once (orjson + one frame)
    -> ``core.fanout`` to every subscriber's outbox -> one coalesced write per
    connection per loop iteration. The core is whatever SAFE_FAST_PURE_PYTHON
    selected in this process.
    """

    def __init__(self, max_buffered_bytes: int) -> None:
        self.max_buffered_bytes = max_buffered_bytes

    async def start(self) -> int:
        import safe_fast
        from safe_fast import ShareData, ShareDataManager, attach_realtime_server

        if os.environ.get("BENCH_PICOWS_AIOFASTNET") == "1":
            _picows_with_aiofastnet()

        self._ShareData = ShareData
        self.manager = ShareDataManager()
        self.manager.add_share_data(ShareData(SHARE_DATA_ID, current_state=make_state(0)))
        # BENCH_BACKLOG: a what-if listen backlog (connect_storm.py's "backlog 100" variant).
        backlog = os.environ.get("BENCH_BACKLOG")
        options: dict[str, Any] = {"backlog": int(backlog)} if backlog else {}
        self.server = await attach_realtime_server(
            manager=self.manager,
            authenticate=lambda request: True,
            host="127.0.0.1",
            port=0,
            path=WS_PATH,
            heartbeat_interval=None,
            **options,
            # The open-loop driver queues up to m frames per subscriber faster
            # than a reader may drain them; the default 1 MiB cap would close
            # slow readers with 4001 and the run would not verify.
            max_buffered_bytes=self.max_buffered_bytes,
        )
        self.info = safe_fast.core_backend()
        if os.environ.get("BENCH_SAFE_FAST_METRICS") == "1":
            from safe_fast.metrics import ServerMetrics

            ServerMetrics().install(self.server)
        candidate = os.environ.get("BENCH_SAFE_FAST_SRC")
        if candidate and not Path(safe_fast.__file__).resolve().is_relative_to(Path(candidate).resolve()):
            raise RuntimeError(f"candidate {candidate} not imported: safe_fast is {safe_fast.__file__}")
        return self.server.port

    def subscriber_count(self) -> int:
        return len(self.server.registry.subscribers(SHARE_DATA_ID))

    async def burst(self, k: int, m: int) -> None:
        update = self.manager.update_share_data
        ShareData = self._ShareData
        sleep = asyncio.sleep
        i = 0
        while i < m:
            stop = min(i + k, m)
            while i < stop:
                update(ShareData(SHARE_DATA_ID, current_state=make_state(i)))
                i += 1
            await sleep(0)

    async def close(self) -> None:
        await self.server.close()


def _picows_with_aiofastnet() -> None:
    """What-if (opt-in variant "compiled-aiofastnet"): our server on aiofastnet's transport.

    safe_fast runs picows with ``use_aiofastnet=False`` (the event loop's own
    transport: ~5 KiB less per connection); picows' default is aiofastnet's
    transport whenever aiofastnet is installed. safe_fast does not expose the
    option, so this variant forces it in the server process only, to measure
    the CPU side of that trade.
    """
    import functools

    import picows

    original = picows.ws_create_server
    if getattr(original, "_bench_wrapped", False):
        return

    @functools.wraps(original)
    async def ws_create_server(*args: Any, **kwargs: Any) -> Any:
        kwargs["use_aiofastnet"] = True
        return await original(*args, **kwargs)

    ws_create_server._bench_wrapped = True  # type: ignore[attr-defined]
    picows.ws_create_server = ws_create_server


class WebsocketsServer(BenchServer):
    """``websockets`` (asyncio implementation) with ``websockets.asyncio.server.broadcast``."""

    async def start(self) -> int:
        import websockets
        from websockets.asyncio.server import broadcast, serve

        self._broadcast = broadcast
        self.subs: set[Any] = set()

        async def handler(ws: Any) -> None:
            try:
                await ws.recv()  # the subscribe message
                self.subs.add(ws)
                await ws.send(PEER_ACK, text=True)
                await ws.wait_closed()
            except Exception:
                pass
            finally:
                self.subs.discard(ws)

        self.server = await serve(
            handler, "127.0.0.1", 0, compression=None, ping_interval=None, max_queue=None
        )
        self.info = f"websockets {websockets.__version__}"
        return self.server.sockets[0].getsockname()[1]

    def subscriber_count(self) -> int:
        return len(self.subs)

    async def burst(self, k: int, m: int) -> None:
        import orjson

        broadcast, subs, dumps, sleep = self._broadcast, self.subs, orjson.dumps, asyncio.sleep
        i = 0
        while i < m:
            stop = min(i + k, m)
            while i < stop:
                broadcast(subs, dumps(envelope(make_state(i))), text=True)
                i += 1
            await sleep(0)

    async def close(self) -> None:
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 5)
        except asyncio.TimeoutError:
            pass


class PicowsNaiveServer(BenchServer):
    """picows, ``WSTransport.send`` per subscriber per frame (frames and writes each time)."""

    async def start(self) -> int:
        import picows

        self.subs: dict[Any, None] = {}
        subs = self.subs
        text, close = picows.WSMsgType.TEXT, picows.WSMsgType.CLOSE

        class Listener(picows.WSListener):  # type: ignore[misc]
            subscribed = False

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type == text and not self.subscribed:
                    self.subscribed = True
                    subs[transport] = None
                    transport.send(text, PEER_ACK)
                elif frame.msg_type == close:
                    transport.send_close(frame.get_close_code())
                    transport.disconnect()

            def on_ws_disconnected(self, transport: Any) -> None:
                subs.pop(transport, None)

        self.server = await picows.ws_create_server(lambda request: Listener(), "127.0.0.1", 0, enable_auto_pong=True)
        self._text = text
        self.info = f"picows {picows.__version__}" if hasattr(picows, "__version__") else "picows"
        return self.server.sockets[0].getsockname()[1]

    def subscriber_count(self) -> int:
        return len(self.subs)

    async def burst(self, k: int, m: int) -> None:
        import orjson

        subs, text, dumps, sleep = self.subs, self._text, orjson.dumps, asyncio.sleep
        i = 0
        while i < m:
            stop = min(i + k, m)
            while i < stop:
                payload = dumps(envelope(make_state(i)))
                for transport in subs:
                    transport.send(text, payload)
                i += 1
            await sleep(0)

    async def close(self) -> None:
        self.server.close()


class _RawProtocol(asyncio.Protocol):
    """A minimal server-side WebSocket: handshake, one client frame = subscribe, then write-only."""

    __slots__ = ("owner", "transport", "buf", "state")

    def __init__(self, owner: "RawServer") -> None:
        self.owner = owner
        self.transport: Any = None
        self.buf = b""
        self.state = 0  # 0 handshake, 1 awaiting subscribe, 2 subscribed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.state == 2:
            return  # nothing else is expected from the generator
        self.buf += data
        if self.state == 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 16384:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            key = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if key is None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                self.transport.close()
                return
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.state = 1
        if self.state == 1 and len(self.buf) >= 2:
            size = self.buf[1] & 0x7F
            header = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if self.buf[1] & 0x80 else 0)
            if size >= 126:
                if len(self.buf) < header:
                    return
                size = int.from_bytes(self.buf[2 : 4 if size == 126 else 10], "big")
            if len(self.buf) < header + size:
                return
            self.buf = b""
            self.state = 2
            self.owner.subs[self.transport] = None
            self.transport.write(self.owner.ack)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.owner.subs.pop(self.transport, None)


class RawServer(BenchServer):
    """The raw-uvloop limit: pre-framed bytes written straight to each transport.

    ``coalesce=True``: the k frames of a burst are joined once, and each
    subscriber gets one ``write`` per burst. ``coalesce=False``: one ``write``
    per frame per subscriber.
    """

    def __init__(self, coalesce: bool) -> None:
        self.coalesce = coalesce
        self.subs: dict[Any, None] = {}
        self.ack = frame_header(len(PEER_ACK)) + PEER_ACK

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _RawProtocol(self), "127.0.0.1", 0)
        self.info = "uvloop, one write per burst" if self.coalesce else "uvloop, one write per frame"
        return self.server.sockets[0].getsockname()[1]

    def subscriber_count(self) -> int:
        return len(self.subs)

    async def burst(self, k: int, m: int) -> None:
        import orjson

        subs, dumps, sleep = self.subs, orjson.dumps, asyncio.sleep
        header = frame_header(PAYLOAD_SIZE)
        i = 0
        if self.coalesce:
            while i < m:
                stop = min(i + k, m)
                frames = []
                while i < stop:
                    payload = dumps(envelope(make_state(i)))
                    frames.append(header + payload)
                    i += 1
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                for transport in subs:
                    transport.write(data)
                await sleep(0)
        else:
            while i < m:
                stop = min(i + k, m)
                while i < stop:
                    frame = header + dumps(envelope(make_state(i)))
                    for transport in subs:
                        transport.write(frame)
                    i += 1
                await sleep(0)

    async def close(self) -> None:
        self.server.close()
        for transport in list(self.subs):
            transport.abort()


def make_server(kind: str, max_buffered_bytes: int) -> BenchServer:
    if kind == "safe_fast":
        return SafeFastServer(max_buffered_bytes)
    if kind == "websockets":
        return WebsocketsServer()
    if kind == "picows":
        return PicowsNaiveServer()
    if kind == "raw-coalesced":
        return RawServer(coalesce=True)
    if kind == "raw-naive":
        return RawServer(coalesce=False)
    raise SystemExit(f"unknown server kind {kind!r}")


class _AllocationTracer:
    """What the server allocated between ``trace-start`` and ``trace-top``: by source line and by type.

    ``trace-top n`` answers ``TOP bytes blocks file:line`` for the n source
    lines that grew most (tracemalloc; memory allocated by C code shows
    under the last Python line on the stack, often the event loop's
    ``run_until_complete``), then ``TYPE name count`` for the n object
    types (``gc``-tracked objects only) that grew most, then ``TOPEND``.
    """

    def __init__(self) -> None:
        self.snapshot: Any = None
        self.types: Any = None

    def start(self) -> None:
        import collections
        import tracemalloc

        gc.collect()
        self.types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        tracemalloc.start()
        self.snapshot = tracemalloc.take_snapshot()

    def report(self, n: int) -> None:
        import collections
        import tracemalloc

        if self.snapshot is None:
            _out("ERR", "trace-top before trace-start")
            return
        gc.collect()
        stats = tracemalloc.take_snapshot().compare_to(self.snapshot, "lineno")
        for stat in stats[:n]:
            frame = stat.traceback[0]
            _out("TOP", stat.size_diff, stat.count_diff, f"{frame.filename}:{frame.lineno}".replace(" ", "_"))
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        types.subtract(self.types)
        for name, count in types.most_common(n):
            _out("TYPE", name.replace(" ", "_"), count)
        _out("TOPEND")


async def server_main(kind: str, max_buffered_bytes: int) -> None:
    """Serve; obey stdin commands, one answer line each:

    ``subs`` -> ``SUBS n``; ``burst k m`` -> ``BURST t0 t1 cpu rss maxrss``
    (monotonic start/end of the burst loop, CPU seconds spent in it, RSS
    and peak RSS in KiB; frames may still sit in transport buffers); ``stats`` ->
    ``STATS cpu rss maxrss user sys`` (CPU seconds since the last burst
    started — the orchestrator sends it once every frame has arrived, so it
    covers the whole delivery —, current and peak RSS in KiB, and the same
    CPU split into user and kernel time by getrusage); ``rss`` -> ``RSS rss
    maxrss`` after a full collection; ``trace-start`` / ``trace-top n`` (see
    :class:`_AllocationTracer`); ``quit``. EOF on stdin means quit.
    """
    raise_nofile()
    server = make_server(kind, max_buffered_bytes)
    tracer = _AllocationTracer()
    port = await server.start()
    _out("READY", port, server.info.replace(" ", "_") or "-")
    reader = await _stdin_reader()
    cpu0 = time.process_time()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "subs":
                _out("SUBS", server.subscriber_count())
            elif cmd[0] == "burst":
                k, m = int(cmd[1]), int(cmd[2])
                gc.collect()
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                cpu0 = time.process_time()
                t0 = time.monotonic()
                await server.burst(k, m)
                t1 = time.monotonic()
                _out("BURST", repr(t0), repr(t1), repr(time.process_time() - cpu0), rss_kib(), maxrss_kib())
            elif cmd[0] == "stats":
                cpu = time.process_time() - cpu0
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                user, system = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
                _out("STATS", repr(cpu), rss_kib(), maxrss_kib(), repr(user), repr(system))
            elif cmd[0] == "rss":
                gc.collect()
                _out("RSS", rss_kib(), maxrss_kib())
            elif cmd[0] == "trace-start":
                tracer.start()
                _out("TRACING")
            elif cmd[0] == "trace-top":
                tracer.report(int(cmd[1]))
            elif cmd[0] == "quit":
                break
            else:
                _out("ERR", "unknown command", cmd[0])
    finally:
        try:
            await asyncio.wait_for(server.close(), 5)
        except Exception:
            pass


# -- the load generator ---------------------------------------------------------------


class _Gen:
    """Shared counters of one generator process."""

    def __init__(self) -> None:
        self.conns: list["_Counter"] = []
        self.target = 0  # frames per connection for the current round
        self.remaining = 0  # connections that have not reached it
        self.done: Optional[asyncio.Future[None]] = None
        self.t_last = 0.0
        # SO_RCVLOWAT while counting: the kernel wakes a connection only once
        # this many bytes are queued (never more than are still to come).
        self.lowat_bytes = 0
        self.frame_size = 0


class _Counter(asyncio.BufferedProtocol):
    """One client connection; counts server frames by walking their headers.

    The walk has a fast path for runs of frames with identical headers: it
    checks header byte j of *every* frame of the run at once with a strided
    slice (``buf[pos + j : stop : frame_len]``), which is exact — a frame's
    header fixes where the next one starts — and runs in C. Anything that is
    not such a run is walked one frame at a time.
    """

    def __init__(self, gen: _Gen, request: bytes, bufsize: int, port: int) -> None:
        self.gen = gen
        self.port = port
        self.request = request
        self.buf = bytearray(bufsize)
        self.view = memoryview(self.buf)
        self.end = 0
        self.transport: Any = None
        self.handshaken = False
        self.frames = 0
        self.bytes = 0
        self.base = 0
        self.counting = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.slow = 0  # frames to walk one by one before trying the fast path again
        self.sock: Any = None
        self.lowat = 1

    # asyncio protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buf) - self.end < len(self.buf) // 4:
            # A partial frame fills most of the buffer: grow it (a new one,
            # the loop may still hold a view of the old).
            grown = bytearray(2 * len(self.buf))
            grown[: self.end] = self.buf[: self.end]
            self.buf = grown
            self.view = memoryview(grown)
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        pos = 0
        if not self.handshaken:
            head_end = self.buf.find(b"\r\n\r\n", 0, self.end)
            if head_end < 0:
                return
            status = bytes(self.buf[: self.buf.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                self._fail(f"handshake refused: {status!r}")
                return
            self.handshaken = True
            pos = head_end + 4
            self.transport.write(masked_frame(SUBSCRIBE))
        pos = self._walk(pos)
        rest = self.end - pos
        if rest and pos:
            self.buf[:rest] = self.buf[pos : self.end]
        self.end = rest
        if not self.ready.done() and self.frames >= 1:
            self.ready.set_result(None)  # the subscribe's answer (state / ack)
        if self.counting and self.gen.lowat_bytes:
            self._set_lowat()
        if self.counting and self.frames - self.base >= self.gen.target:
            self.counting = False
            gen = self.gen
            gen.remaining -= 1
            if gen.remaining == 0:
                gen.t_last = time.monotonic()
                if gen.done is not None and not gen.done.done():
                    gen.done.set_result(None)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before subscribed: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool:
        return False

    def _set_lowat(self, value: int = 0) -> None:
        """Batch reads with SO_RCVLOWAT, never asking for more than is still to come."""
        if not value:
            gen = self.gen
            left = (gen.target - (self.frames - self.base)) * gen.frame_size - self.end
            value = max(1, min(gen.lowat_bytes, left))
        if value != self.lowat and self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
                self.lowat = value
            except OSError:
                self.sock = None

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.transport.abort()

    # the walk

    def _walk(self, pos: int) -> int:
        buf, end = self.buf, self.end
        frames = 0
        start = pos
        while end - pos >= 2:
            size = buf[pos + 1] & 0x7F
            if size < 126:
                hlen = 2
            elif size == 126:
                if end - pos < 4:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                hlen = 4
            else:
                if end - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hlen = 10
            flen = hlen + size
            if end - pos < flen:
                break
            n = (end - pos) // flen
            if n >= 8 and hlen <= 4 and self.slow == 0:
                stop = pos + n * flen
                run = n
                for j in range(hlen):
                    column = buf[pos + j : stop : flen]
                    mismatch = n - len(column.lstrip(buf[pos + j : pos + j + 1]))
                    if mismatch < run:
                        run = mismatch
                frames += run
                pos += run * flen
                if run < n and run < 16:
                    self.slow = 64
                continue
            if self.slow:
                self.slow -= 1
            frames += 1
            pos += flen
        self.frames += frames
        self.bytes += pos - start
        return pos


async def generator_main(host: str, bufsize: int) -> None:
    """Obey stdin commands, one answer line each (``GOT`` comes when the round ends):

    ``connect port n concurrency timeout [answer_timeout]`` -> ``CONNECTED ok failed seconds t_end p50 p99``
    (``t_end``: monotonic time the last one got its answer; p50/p99: seconds
    from the command to a connection's answer, over those that got one; a
    connection not answered ``answer_timeout`` s (default 10) after its TCP
    connect is tried again, up to three times in all);
    ``expect m timeout [lowat_frames frame_size [port]]`` -> ``ARMED``, later
    ``GOT total min max t_last cpu bytes`` over the connections to ``port``
    (all if 0) (``t_last``: monotonic time the last one reached m frames);
    ``close`` -> ``CLOSED n``; ``quit``. EOF on stdin means quit.
    """
    raise_nofile()
    loop = asyncio.get_running_loop()
    gen = _Gen()
    reader = await _stdin_reader()
    round_task: Optional[asyncio.Task[None]] = None

    async def open_one(port: int, answer_timeout: float = 10.0) -> Optional[_Counter]:
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {WS_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        proto: Optional[_Counter] = None
        last: Optional[BaseException] = None

        def factory() -> _Counter:
            nonlocal proto
            proto = _Counter(gen, request, bufsize, port)
            return proto

        for attempt in range(3):
            try:
                await loop.create_connection(factory, host, port)
                assert proto is not None
                await asyncio.wait_for(asyncio.shield(proto.ready), answer_timeout)
                return proto
            except Exception as exc:
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                proto = None
                last = exc
                await asyncio.sleep(0.05 * (attempt + 1))
        sys.stderr.write(f"generator: connection failed: {last!r}\n")
        return None

    async def connect(port: int, n: int, concurrency: int, timeout: float, answer_timeout: float = 10.0) -> None:
        t0 = time.monotonic()
        sem = asyncio.Semaphore(concurrency)
        ok = failed = 0
        answered: list[float] = []

        async def one() -> None:
            nonlocal ok, failed
            async with sem:
                proto = await open_one(port, answer_timeout)
            if proto is None:
                failed += 1
            else:
                answered.append(time.monotonic())
                gen.conns.append(proto)
                ok += 1

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
            failed = n - ok
        answered.sort()
        t_end = answered[-1] if answered else time.monotonic()

        def quantile(q: float) -> float:
            return answered[min(len(answered) - 1, int(q * len(answered)))] - t0 if answered else float("nan")

        _out("CONNECTED", ok, failed, repr(time.monotonic() - t0), repr(t_end), repr(quantile(0.5)), repr(quantile(0.99)))

    async def expect(m: int, timeout: float, lowat_frames: int, frame_size: int, port: int) -> None:
        cpu0 = time.process_time()
        conns = [c for c in gen.conns if not port or c.port == port]
        gen.lowat_bytes = lowat_frames * frame_size
        gen.frame_size = frame_size
        gen.target = m
        gen.remaining = len(conns)
        gen.done = loop.create_future()
        gen.t_last = 0.0
        for c in conns:
            c.base = c.frames
            c.counting = True
            c.bytes = 0
            if gen.lowat_bytes:
                c._set_lowat()
        if not conns:
            gen.done.set_result(None)
        _out("ARMED")
        try:
            await asyncio.wait_for(asyncio.shield(gen.done), timeout)
        except asyncio.TimeoutError:
            pass
        t_last = gen.t_last
        cpu = time.process_time() - cpu0
        gen.lowat_bytes = 0
        for c in conns:
            c.counting = False
            c._set_lowat(1)
        # A short grace period shows extra frames, if any arrived.
        await asyncio.sleep(0.05)
        counts = [c.frames - c.base for c in conns] or [0]
        _out(
            "GOT",
            sum(counts),
            min(counts),
            max(counts),
            repr(t_last),
            repr(cpu),
            sum(c.bytes for c in conns),
        )

    async def close_all() -> None:
        conns, gen.conns = gen.conns, []
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
        if conns:
            await asyncio.wait([asyncio.ensure_future(asyncio.shield(c.closed)) for c in conns], timeout=10)
        _out("CLOSED", len(conns))

    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "connect":
                await connect(int(cmd[1]), int(cmd[2]), int(cmd[3]), float(cmd[4]), *(float(x) for x in cmd[5:6]))
            elif cmd[0] == "expect":
                if round_task is not None and not round_task.done():
                    round_task.cancel()
                lowat = int(cmd[3]) if len(cmd) > 3 else 0
                size = int(cmd[4]) if len(cmd) > 4 else FRAME_SIZE
                port = int(cmd[5]) if len(cmd) > 5 else 0
                round_task = asyncio.ensure_future(expect(int(cmd[1]), float(cmd[2]), lowat, size, port))
            elif cmd[0] == "close":
                await close_all()
            elif cmd[0] == "rss":
                _out("RSS", rss_kib(), maxrss_kib())
            elif cmd[0] == "quit":
                break
            else:
                _out("ERR", "unknown command", cmd[0])
    finally:
        for c in gen.conns:
            if c.transport is not None:
                c.transport.abort()


# -- the orchestrator's side ---------------------------------------------------------


async def cancel_on_signals(coro: Any) -> Any:
    """Run ``coro``; SIGTERM/SIGHUP cancel it (so its ``finally`` blocks stop the children)."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, task.cancel)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        return await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.remove_signal_handler(sig)
            except Exception:
                pass


def run_orchestrator(main: Any) -> int:
    """Run an orchestrator coroutine; Ctrl-C or SIGTERM stops it and every child."""
    try:
        return asyncio.run(cancel_on_signals(main))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every child process was stopped", file=sys.stderr)
        return 130


class ChildError(RuntimeError):
    pass


class Child:
    """A subprocess spoken to in lines; always killed by :meth:`stop` (call it in a finally)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, errfile: Any) -> None:
        self.name = name
        self.proc = proc
        self.errfile = errfile

    @classmethod
    async def start(
        cls, name: str, args: list[str], env: Optional[dict[str, str]] = None, command: Optional[list[str]] = None
    ) -> "Child":
        """Start ``python _harness.py *args`` (or ``command + args``: another program speaking the same lines)."""
        errfile = tempfile.TemporaryFile()
        full_env = dict(os.environ if env is None else env)
        # Children import safe_fast from where this process did: the checkout's
        # src (compiled core built in place) or an installed package.
        ensure_importable()
        import safe_fast

        origin = Path(safe_fast.__file__).resolve().parent.parent
        candidate = full_env.get("BENCH_SAFE_FAST_SRC")
        if candidate:
            # A candidate build of safe_fast (fanout_e2e.py --candidate DIR) goes first.
            parts = [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
            full_env["PYTHONPATH"] = os.pathsep.join([candidate] + parts)
        elif origin == (REPO / "src").resolve():
            parts = [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
            if str(origin) not in parts:
                parts.insert(0, str(origin))
            full_env["PYTHONPATH"] = os.pathsep.join(parts)
        proc = await asyncio.create_subprocess_exec(
            *(command or [sys.executable, str(HARNESS)]),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errfile,
            env=full_env,
            start_new_session=True,
        )
        return cls(name, proc, errfile)

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            self.errfile.seek(0)
            data = self.errfile.read()
        except Exception:
            return ""
        return data[-limit:].decode(errors="replace")

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, tag: str, timeout: float) -> list[str]:
        """The fields of the next line starting with ``tag`` (a bounded wait)."""
        return (await self.lines_until(tag, timeout, keep=False))[-1]

    async def lines_until(self, tag: str, timeout: float, *, keep: bool = True) -> list[list[str]]:
        """Every line (as fields) before the next one starting with ``tag``, then that one's
        fields after the tag (a bounded wait; ``keep=False`` drops the lines before)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        lines: list[list[str]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no {tag} within {timeout:.0f}s\n{self.stderr_tail()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except asyncio.TimeoutError:
                continue
            if not line:
                raise ChildError(f"{self.name}: exited (rc={self.proc.returncode}) waiting for {tag}\n{self.stderr_tail()}")
            fields = line.decode().split()
            if fields and fields[0] == tag:
                return lines + [fields[1:]]
            if fields and fields[0] == "ERR":
                raise ChildError(f"{self.name}: {' '.join(fields)}")
            if keep:
                lines.append(fields)

    async def ask(self, line: str, tag: str, timeout: float = 30) -> list[str]:
        await self.send(line)
        return await self.expect(tag, timeout)

    async def stop(self, timeout: float = 5) -> None:
        """Ask it to quit; kill its process group if it does not within ``timeout``."""
        proc = self.proc
        if proc.returncode is None:
            try:
                await self.send("quit")
                if proc.stdin is not None:
                    proc.stdin.close()
            except Exception:
                pass
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except (asyncio.TimeoutError, Exception):
                self.kill()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except Exception:
                    pass
        try:
            self.errfile.close()
        except Exception:
            pass

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, 9)  # its own session: this child and anything it started
            except (ProcessLookupError, PermissionError):
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass


# -- Node's ws, a peer server of some comparisons -------------------------------------

NODE_CACHE = Path(os.environ.get("BENCH_NODE_CACHE", str(Path.home() / ".cache" / "safe_fast-bench" / "node")))
NODE_SERVER = Path(__file__).resolve().parent / "node_ws_server.js"
WS_SPEC = "ws@8"


def ensure_node_ws() -> Optional[str]:
    """NODE_PATH for an installed ``ws`` (npm installs it into NODE_CACHE on first use), or None without node/npm.

    Never into the repository: the cache is ``~/.cache/safe_fast-bench/node``
    unless ``BENCH_NODE_CACHE`` says otherwise.
    """
    import shutil
    import subprocess

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None
    modules = NODE_CACHE / "node_modules"
    if not (modules / "ws" / "package.json").exists():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        print(f"# installing {WS_SPEC} into {NODE_CACHE}", file=sys.stderr)
        subprocess.run(
            [npm, "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund", "--silent", WS_SPEC],
            check=True,
            timeout=300,
        )
    return str(modules)


async def start_server(name: str, kind: str, env: dict[str, str]) -> Child:
    """A server child of ``kind``: one of :func:`make_server`'s, or ``node`` (``node_ws_server.js``)."""
    if kind != "node":
        return await Child.start(name, ["server", kind], env)
    import shutil

    node_path = ensure_node_ws()
    if node_path is None:
        raise ChildError("node or npm not found")
    env = {**env, "NODE_PATH": node_path}
    return await Child.start(name, ["--expose-gc", str(NODE_SERVER)], env, command=[shutil.which("node") or "node"])


def pin_from_env() -> None:
    """Pin this process to the CPUs listed in BENCH_CPUS (e.g. "0" or "1"), if set."""
    cpus = os.environ.get("BENCH_CPUS", "").strip()
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"cannot pin to CPUs {cpus}: {exc}\n")


def main(argv: list[str]) -> None:
    pin_from_env()
    if len(argv) >= 2 and argv[0] == "server":
        kind = argv[1]
        max_buffered = int(argv[2]) if len(argv) > 2 else 256 * 1024 * 1024
        ensure_importable()
        install_uvloop()
        asyncio.run(server_main(kind, max_buffered))
    elif argv and argv[0] == "generator":
        install_uvloop()
        host = argv[1] if len(argv) > 1 else "127.0.0.1"
        bufsize = int(argv[2]) if len(argv) > 2 else 128 * 1024
        asyncio.run(generator_main(host, bufsize))
    else:
        raise SystemExit("usage: _harness.py server <kind> [max_buffered_bytes] | generator [host [recv_buffer_bytes]]")


if __name__ == "__main__":
    main(sys.argv[1:])
