"""The listening socket: the backlog reaches ``listen()``, and running out of descriptors is logged.

The backlog of a listening socket is what ``ss -ltn`` shows in its Send-Q
column (the kernel's ``sk_max_ack_backlog``). The out-of-descriptors tests
run the server in a real subprocess with a lowered RLIMIT_NOFILE, on uvloop
and on asyncio's own loop (they fail differently: uvloop closes what it
cannot accept, asyncio leaves it in the backlog).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Optional

import pytest

from safe_fast.server.listen import FALLBACK_BACKLOG, AcceptFailureLog, resolve_backlog, system_backlog
from server_helpers import DEADLINE, RawClient, ServerFactory

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss to read a listen backlog")


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:``port``, as the kernel holds it."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, f"expected one listening socket on port {port}: {out!r}"
    # State Recv-Q Send-Q Local Peer: for a listening socket Send-Q is the backlog.
    return int(rows[0][2])


# -- the backlog ------------------------------------------------------------------------


def test_system_backlog_reads_somaxconn(tmp_path: Any) -> None:
    path = tmp_path / "somaxconn"
    path.write_text("1234\n")
    assert system_backlog(str(path)) == 1234
    for unusable in ("", "0", "-5", "many"):
        path.write_text(unusable)
        assert system_backlog(str(path)) == FALLBACK_BACKLOG
    assert system_backlog(str(tmp_path / "missing")) == FALLBACK_BACKLOG


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "128"])
def test_backlog_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="backlog"):
        resolve_backlog(bad)


async def test_attach_rejects_a_bad_backlog(server_factory: ServerFactory) -> None:
    with pytest.raises(ValueError, match="backlog must be a positive int or None"):
        await server_factory(backlog=0)


@needs_ss
async def test_default_backlog_is_the_systems(server_factory: ServerFactory) -> None:
    server = await server_factory()
    expected = system_backlog()
    assert server.backlog == expected
    # The kernel caps a listen backlog at somaxconn; asyncio and uvloop would ask for 100.
    assert listen_backlog(server.port) == expected
    if os.path.exists("/proc/sys/net/core/somaxconn"):
        assert expected == int(open("/proc/sys/net/core/somaxconn").read())


@needs_ss
async def test_explicit_backlog_reaches_listen(server_factory: ServerFactory) -> None:
    server = await server_factory(backlog=321)
    assert listen_backlog(server.port) == 321


@needs_ss
@pytest.mark.parametrize("backlog", [None, 321])
async def test_backlog_reaches_listen_on_a_given_socket(server_factory: ServerFactory, backlog: Optional[int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)  # the loop must listen again with the server's backlog
    port = sock.getsockname()[1]
    assert listen_backlog(port) == 5
    server = await server_factory(sock=sock, backlog=backlog)
    assert server.port == port
    assert listen_backlog(port) == (system_backlog() if backlog is None else backlog)
    client = await RawClient.open(port)
    try:
        await client.subscribe("doc")
    finally:
        client.transport.abort()


# -- in a subprocess: a stopped server, and one out of descriptors ------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    loop_kind, nofile, backlog = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    if loop_kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from safe_fast import ShareData, ShareDataManager, attach_realtime_server

    async def main():
        manager = ShareDataManager()
        manager.add_share_data(ShareData("doc", current_state={"count": 0}))
        server = await attach_realtime_server(
            manager=manager, authenticate=lambda request: True, host="127.0.0.1", port=0,
            heartbeat_interval=None, backlog=None if backlog == "default" else int(backlog),
        )
        print(server.port, flush=True)
        await asyncio.get_running_loop().connect_read_pipe(asyncio.Protocol, sys.stdin)
        while not sys.stdin.closed:
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


class ServerProcess:
    """The server above in a subprocess; its stderr collected line by line."""

    def __init__(self, loop_kind: str, nofile: int = 0, backlog: str = "default") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, loop_kind, str(nofile), backlog],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        self.stderr: list[str] = []

    async def port(self) -> int:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), DEADLINE * 4)
        if not line:
            raise AssertionError(f"server exited: {self.read_stderr()}")
        return int(line)

    def read_stderr(self) -> str:
        return "".join(self.stderr)

    async def wait_for_log(self, text: str, timeout: float = DEADLINE * 2) -> str:
        """The first stderr line containing ``text`` (bounded wait)."""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.proc.stderr.read()
            if chunk:
                self.stderr.append(chunk.decode(errors="replace"))
            for line in self.read_stderr().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the server's log within {timeout} s: {self.read_stderr()[-2000:]!r}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


UPGRADE = (
    b"GET /realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def open_sockets(port: int, count: int) -> list[socket.socket]:
    """Start ``count`` non-blocking connects (not waited for)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


def connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_a_stopped_server_keeps_a_storm_in_its_backlog(loop_kind: str) -> None:
    """600 connects while the server is stopped: the kernel completes them all, and all upgrade after.

    With asyncio's and uvloop's own backlog of 100, the kernel would complete
    about 100 and leave the rest retrying their SYN.
    """
    count = 600
    if system_backlog() < count:
        pytest.skip(f"somaxconn {system_backlog()} is below {count}")
    server = ServerProcess(loop_kind)
    socks: list[socket.socket] = []
    try:
        port = await server.port()
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            socks = open_sockets(port, count)
            deadline = time.monotonic() + DEADLINE * 2
            while sum(connected(s) for s in socks) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sum(connected(s) for s in socks) == count
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        for sock in socks:
            sock.send(UPGRADE)
        upgraded = 0
        deadline = time.monotonic() + DEADLINE * 4
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            still = []
            for sock in pending:
                try:
                    head = sock.recv(4096)
                except BlockingIOError:
                    still.append(sock)
                    continue
                assert head.startswith(b"HTTP/1.1 101 "), head[:100]
                upgraded += 1
            pending = still
            await asyncio.sleep(0.02)
        assert upgraded == count
    finally:
        for sock in socks:
            sock.close()
        server.stop()


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_running_out_of_descriptors_is_logged(loop_kind: str) -> None:
    """More connections than RLIMIT_NOFILE allows: one warning naming EMFILE, and the server recovers."""
    nofile = 120
    server = ServerProcess(loop_kind, nofile=nofile)
    socks: list[socket.socket] = []
    try:
        port = await server.port()
        socks = open_sockets(port, nofile + 60)
        deadline = time.monotonic() + DEADLINE
        while sum(connected(s) for s in socks) < len(socks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for sock in socks:
            try:
                sock.send(UPGRADE)
            except OSError:
                pass  # closed by a loop that could not accept it
        line = await server.wait_for_log("cannot accept new connections")
        assert "EMFILE" in line and f"RLIMIT_NOFILE soft limit {nofile}" in line, line
        assert "connections open" in line, line
        # Rate-limited: with far more refusals than that, one warning (the interval is 10 s).
        await asyncio.sleep(0.5)
        await server.wait_for_log("cannot accept new connections")
        assert server.read_stderr().count("cannot accept new connections") == 1, server.read_stderr()[-2000:]

        for sock in socks:
            sock.close()
        socks = []
        # Descriptors are back: a new client is served (the server still listens).
        deadline = time.monotonic() + DEADLINE * 2
        while True:
            try:
                client = await RawClient.open(port)
                break
            except (OSError, AssertionError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            await client.subscribe("doc")
        finally:
            client.transport.abort()
    finally:
        for sock in socks:
            sock.close()
        server.stop()


# -- the rate limit --------------------------------------------------------------------


async def test_failures_are_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    import errno

    loop = asyncio.get_running_loop()
    log = AcceptFailureLog(logging.getLogger("safe_fast.test_listen"), loop, lambda: 7, interval=0.3)
    caplog.set_level(logging.WARNING, logger="safe_fast.test_listen")
    try:
        for _ in range(5):
            log.failed(errno.EMFILE)
        assert len(caplog.records) == 1
        first = caplog.records[0].getMessage()
        assert "EMFILE" in first and "7 connections open" in first and "more failure" not in first
        deadline = time.monotonic() + DEADLINE
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(caplog.records) == 2
        assert "4 more failures in the last 0.3 s" in caplog.records[1].getMessage()
        assert log.failures == 5
        log.failed(errno.ENFILE)  # inside the new window: counted, not logged yet
        assert len(caplog.records) == 2
    finally:
        log.close()


async def test_the_loop_handler_takes_only_accept_failures_of_its_socket() -> None:
    import errno

    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: seen.append(context))
    listener = socket.socket()
    other = socket.socket()
    log = AcceptFailureLog(logging.getLogger("safe_fast.test_listen"), loop, lambda: 0, interval=60)
    try:
        log.watch(listener.fileno())
        too_many = OSError(errno.EMFILE, "Too many open files")
        loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": too_many, "socket": listener})
        assert log.failures == 1 and seen == []
        loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": too_many, "socket": other})
        loop.call_exception_handler({"message": "something else", "exception": RuntimeError("x")})
        assert log.failures == 1 and len(seen) == 2
        log.close()
        # The previous handler is back.
        loop.call_exception_handler({"message": "after", "exception": too_many, "socket": listener})
        assert len(seen) == 3 and log.failures == 1
    finally:
        log.close()
        loop.set_exception_handler(previous)
        listener.close()
        other.close()
