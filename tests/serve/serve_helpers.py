"""Helpers of the ``safe-fast serve`` tests: the command as a real subprocess, plain HTTP GETs,
Prometheus text parsing, WebSocket clients and bounded waits.

Every server listens on 127.0.0.1; every wait is bounded by :data:`DEADLINE`
(reaching it fails the test).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

DEADLINE = 15.0
"""Upper bound of one wait (a process start included)."""

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a ``safe-fast`` subprocess: no SAFE_FAST_* leaking in, the test apps importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SAFE_FAST_") or k in ("SAFE_FAST_PURE_PYTHON", "SAFE_FAST_REQUIRE_COMPILED")
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def run_command(
    args: Sequence[str], env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None
) -> subprocess.CompletedProcess[str]:
    """``python -m safe_fast ARGS`` to completion (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "safe_fast", *args],
        env=command_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


class Serve:
    """One ``safe-fast serve`` subprocess on 127.0.0.1:``port``."""

    def __init__(
        self,
        app: str,
        *args: str,
        port: Optional[int] = None,
        env: Optional[dict[str, str]] = None,
        log: Optional[Path] = None,
        scheme: str = "http",
    ) -> None:
        self.app = app
        self.scheme = scheme
        self.args = list(args)
        self.port = port or free_port()
        self.env = env
        self.log_path = log
        self.proc: Optional[subprocess.Popen[str]] = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime"

    def http(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def start(self, wait: bool = True) -> "Serve":
        args = ["serve", self.app, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        stderr: Any = subprocess.PIPE
        if self.log_path is not None:
            self._log_file = open(self.log_path, "a")
            stderr = self._log_file
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safe_fast", *args],
            env=command_env(self.env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"safe-fast serve exited with {self.proc.returncode}: {self.output()}")
            if http_get(self.http("/readyz"), context=_UNVERIFIED)[0] == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"safe-fast serve did not become ready: {self.output()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        if self.log_path is not None:
            return self.log_path.read_text() if self.log_path.exists() else ""
        if self.proc is None or self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


_UNVERIFIED = ssl._create_unverified_context()
"""Only to poll a test server's readiness; the TLS test verifies its certificate."""


def http_get(
    url: str, headers: Optional[dict[str, str]] = None, context: Optional[ssl.SSLContext] = None
) -> tuple[int, str]:
    """(status, body) of a GET; (0, why) when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2.0, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def metrics(serve: Serve) -> dict[str, float]:
    """The samples of ``/metrics`` as ``{'name{labels}': value}``."""
    status, body = http_get(serve.http("/metrics"))
    assert status == 200, body
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``predicate`` (plain or async) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- WebSocket clients -----------------------------------------------------------------------


def wire(**fields: Any) -> str:
    return json.dumps({"v": 1, **fields})


def proposal(correlation_id: str, data: Any, function_id: str = "increment", share_data_id: str = "counter") -> str:
    """A ``propose`` message."""
    return wire(
        type="propose",
        shareDataId=share_data_id,
        functionId=function_id,
        proposedData=data,
        correlationId=correlation_id,
    )


async def connect(url: str, **kwargs: Any) -> ClientConnection:
    return await asyncio.wait_for(
        ws_connect(url, compression=None, proxy=None, ping_interval=None, max_size=None, **kwargs), DEADLINE
    )


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (skipping others, bounded)."""
    for _ in range(1000):
        frame = await recv_json(ws)
        if frame["type"] == kind:
            return frame
    raise AssertionError(f"no {kind} frame")


async def subscribed(
    url: str, share_data_id: str = "counter", **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """A client subscribed to ``share_data_id`` and the state frame it got."""
    ws = await connect(url, **kwargs)
    await ws.send(wire(type="subscribe", shareDataId=share_data_id))
    return ws, await recv_type(ws, "state")


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; its (code, reason)."""
    try:
        for _ in range(100_000):
            await asyncio.wait_for(ws.recv(), DEADLINE)
    except Exception:
        pass
    await asyncio.wait_for(ws.wait_closed(), DEADLINE)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""
