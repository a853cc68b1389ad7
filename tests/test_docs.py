"""The Python code blocks of README.md and docs/*.md run, or say why not.

Every ```python block is preceded (on the line before its fence, blank lines
allowed) by one marker:

- ``<!-- run -->``: a complete program. It is run as a script in a fresh
  interpreter and must exit 0 by itself within the bound.
- ``<!-- run: server -->``: a complete program that serves until interrupted
  and prints its ``ws://`` URL once it listens. The ``<!-- run: client -->``
  blocks after it in the same file run while it serves; then it gets SIGINT
  and must exit 0 without a traceback.
- ``<!-- run: client -->``: a complete program that talks to the server of
  the nearest ``run: server`` block above it and exits 0 by itself. It runs
  twice: a second run must work against the state the first one left.
- ``<!-- no-run: why -->``: a fragment (names defined elsewhere, a ``...``
  placeholder). It must still compile, top-level ``await`` allowed.
- ``<!-- sketch: why -->``: not quite Python (a signature with ``...`` among
  the arguments); neither run nor compiled.

A block without a marker fails the test that lists them. In runnable blocks
the port 3000 is replaced by a free port, so runs never collide. Programs
run on the core under test (the environment is passed on).
"""

from __future__ import annotations

import ast
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

PROGRAM_BOUND = 60.0
"""Seconds a program (or a server's start) may take; reaching it fails the test."""

PYTHON_INFO = {"python", "py", "python3"}
MARKER = re.compile(r"^<!--\s*(run|no-run|sketch)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
DEFAULT_PORT = re.compile(r"\b3000\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    source: str
    marker: str | None  # "run", "run: server", "run: client", "no-run", "sketch", or None
    detail: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening.group(1), opening.group(2).lower()
        end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith(fence)), len(lines))
        if info in PYTHON_INFO:
            previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            found = MARKER.match(previous)
            marker, detail = None, ""
            if found:
                kind, argument = found.group(1), (found.group(2) or "").strip()
                marker = f"run: {argument}" if kind == "run" and argument else kind
                detail = argument
            blocks.append(Block(path, index + 1, "\n".join(lines[index + 1 : end]) + "\n", marker, detail))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]


def test_every_python_block_says_whether_it_runs() -> None:
    unmarked = [block.where for block in ALL_BLOCKS if block.marker is None]
    known = {"run", "run: server", "run: client", "no-run", "sketch"}
    unknown = [f"{block.where} ({block.marker})" for block in ALL_BLOCKS if block.marker not in known | {None}]
    assert not unmarked and not unknown, (
        "put <!-- run -->, <!-- run: server -->, <!-- run: client -->, <!-- no-run: why --> or <!-- sketch: why --> "
        f"on the line before each python block; unmarked: {unmarked}; unknown markers: {unknown}"
    )


def test_the_readme_quick_start_runs() -> None:
    markers = [block.marker for block in python_blocks(REPO / "README.md")]
    assert "run: server" in markers and "run: client" in markers, markers


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.marker in ("no-run", "sketch")], ids=lambda b: b.where)
def test_fragment_compiles(block: Block) -> None:
    assert block.detail, f"{block.where}: say why the block does not run (<!-- {block.marker}: why -->)"
    if block.marker == "sketch":
        return
    compile(block.source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


# -- running ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_program(block: Block, directory: Path, port: int) -> Path:
    program = directory / f"{block.path.stem}_{block.line}.py"
    program.write_text(DEFAULT_PORT.sub(str(port), block.source), encoding="utf-8")
    return program


def run_to_completion(block: Block, directory: Path, port: int) -> None:
    program = write_program(block, directory, port)
    try:
        result = subprocess.run(
            [sys.executable, str(program)], cwd=directory, capture_output=True, text=True, timeout=PROGRAM_BOUND
        )
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"{block.where} did not exit within {PROGRAM_BOUND} s: {timeout.stdout!r}") from None
    assert result.returncode == 0, f"{block.where} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"{block.where}:\n{result.stderr}"


class ServingProgram:
    """A ``run: server`` block as a process; its output collected by a thread."""

    def __init__(self, block: Block, directory: Path, port: int) -> None:
        self.block = block
        program = write_program(block, directory, port)
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(program)],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        # Both pipes are read by threads of their own, to the end: nothing
        # else reads or closes them while those threads run.
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        self.errors.extend(self.process.stderr)

    def wait_for_url(self, port: int) -> None:
        while True:
            try:
                line = self.lines.get(timeout=PROGRAM_BOUND)
            except queue.Empty:
                raise AssertionError(f"{self.block.where} printed no URL within {PROGRAM_BOUND} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"{self.block.where} ended before serving: {self.seen} {self.stderr()}")
            self.seen.append(line)
            if f"ws://127.0.0.1:{port}/" in line:
                return

    def stderr(self) -> str:
        """What the program wrote to stderr, once it has ended ("" while it runs)."""
        if self.process.poll() is None:
            return ""
        for reader in self.readers:
            reader.join(PROGRAM_BOUND)
        return "".join(self.errors)

    def interrupt(self) -> None:
        """SIGINT, as Ctrl-C; the program must end cleanly within the bound."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=PROGRAM_BOUND)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.block.where} did not stop on SIGINT within {PROGRAM_BOUND} s") from None
        errors = self.stderr()
        assert self.process.returncode == 0, f"{self.block.where} exited {self.process.returncode}: {errors}"
        assert "Traceback" not in errors, f"{self.block.where}:\n{errors}"


def runnable_units() -> list[list[Block]]:
    """Each ``run`` block alone; each ``run: server`` block with its clients."""
    units: list[list[Block]] = []
    server_unit: list[Block] | None = None
    current: Path | None = None
    for block in ALL_BLOCKS:
        if block.path != current:
            current, server_unit = block.path, None
        if block.marker == "run":
            units.append([block])
        elif block.marker == "run: server":
            server_unit = [block]
            units.append(server_unit)
        elif block.marker == "run: client":
            if server_unit is None:
                raise pytest.UsageError(f"{block.where}: a `run: client` block with no `run: server` block above it")
            server_unit.append(block)
    return units


@pytest.mark.timeout(PROGRAM_BOUND * 6)
@pytest.mark.parametrize("unit", runnable_units(), ids=lambda unit: unit[0].where)
def test_runnable_block(unit: list[Block], tmp_path: Path) -> None:
    port = free_port()
    first, clients = unit[0], unit[1:]
    if first.marker == "run":
        run_to_completion(first, tmp_path, port)
        return
    if sys.platform == "win32":
        pytest.skip("a server block is stopped by SIGINT, which Windows cannot send to a child process")
    server = ServingProgram(first, tmp_path, port)
    try:
        server.wait_for_url(port)
        assert clients, f"{first.where}: a server block with no client block to run against it"
        for client in clients:
            run_to_completion(client, tmp_path, port)
            run_to_completion(client, tmp_path, port)
    finally:
        server.interrupt()

