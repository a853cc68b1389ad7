"""Helpers of the store tests: real databases, real server processes.

* PostgreSQL: every test gets its own database with a unique name, created
  on the server named by ``SAFE_FAST_TEST_POSTGRES`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``) and dropped afterwards.
  When it cannot be reached the test is skipped with the reason, except
  when ``CI`` is set: then it fails, so a skipped cluster suite never looks
  green.
* :class:`NodeProcess`: ``tests/store_node.py`` (a real server over a real
  store) in a subprocess, stopped with a real signal.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import pytest

DEADLINE = 20.0
"""Upper bound of any single wait (reaching it fails the test)."""

POSTGRES_ADMIN_URL = os.environ.get("SAFE_FAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NODE_SCRIPT = Path(__file__).with_name("store_node.py")


def _database_url(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def postgres_database() -> AsyncIterator[str]:
    """Yield the URL of a fresh database; drop it afterwards."""
    asyncpg = pytest.importorskip("asyncpg", reason="the postgres extra (asyncpg) is not installed")
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except Exception as exc:
        reason = f"PostgreSQL is unreachable at {POSTGRES_ADMIN_URL}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run", pytrace=False)
        pytest.skip(reason)
    name = f"safe_fast_test_{uuid.uuid4().hex[:16]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _database_url(name)
    finally:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def store_url_for(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    raise ValueError(kind)


async def wait_for(predicate: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class NodeProcess:
    """``store_node.py`` in a subprocess: a server on 127.0.0.1 over ``store_url``."""

    def __init__(self, store_url: str, workdir: Path, *, redis_url: Optional[str] = None, name: str = "node") -> None:
        self.store_url = store_url
        self.redis_url = redis_url
        self.workdir = workdir
        self.name = name
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        ready = self.workdir / f"{self.name}-{self.starts}.ready"
        command = [sys.executable, str(NODE_SCRIPT), "--store", self.store_url, "--ready-file", str(ready)]
        if self.redis_url:
            command += ["--redis", self.redis_url]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + DEADLINE
        while not ready.exists() or not ready.read_text().strip():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} did not start within {DEADLINE}s:\n{self.log()}")
            time.sleep(0.02)
        self.port = json.loads(ready.read_text())["port"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
