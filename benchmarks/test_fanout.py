"""End-to-end fan-out over real sockets, as a pytest-benchmark: deliveries/s.

    pytest --benchmark-only                      # from the repository root: every benchmark
    pytest benchmarks/test_fanout.py --benchmark-only

One broadcast goes to S subscribers over real WebSocket connections on
loopback. For each server of the comparison (ours on the compiled core, ours
on the pure core, ``websockets.broadcast``) a server process and a load
generator process are started with ``_harness.py`` (the machinery of
``fanout_e2e.py``: a real handshake and subscribe per connection, frames
counted by their headers, every round verified frame by frame). A round is
M broadcasts of a 250-byte JSON state, k per event-loop iteration;
pytest-benchmark times whole rounds, and ``extra_info["deliveries_per_s"]``
is S×M over the time from each round's first broadcast to its last frame
arriving (one monotonic clock in both processes), summed over the rounds.
The summary at the end of the run puts the servers side by side.

``fanout_e2e.py`` is the full comparison (more S and k, the raw limits,
repetitions, CPU per delivery); this one is the quick, always-available view.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402

SUBSCRIBERS = 500
BROADCASTS_PER_ROUND = 100
ROUNDS = 5
ROUND_BOUND = 60.0
"""Seconds one round may take; more fails the benchmark (a stall, not a slow run)."""


@dataclass(frozen=True)
class Server:
    name: str
    kind: str
    env: dict[str, str | None]
    core: str | None  # what core_backend() must say in the server process, for ours


SERVERS = [
    Server("safe_fast compiled", "safe_fast", {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1"}, "cython"),
    Server("safe_fast pure", "safe_fast", {"SAFE_FAST_PURE_PYTHON": "1", "SAFE_FAST_REQUIRE_COMPILED": None}, "python"),
    Server("websockets.broadcast", "websockets", {}, None),
]


def compiled_core_available() -> bool:
    try:
        from safe_fast import _core  # noqa: F401
    except ImportError:
        return False
    return True


def pinned_cpus() -> tuple[str, str] | None:
    """Server on one CPU, generator on another, when there are two."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (str(cpus[0]), str(cpus[1])) if len(cpus) >= 2 else None


@dataclass
class Rig:
    """A server process with S subscribed connections from a generator process."""

    server: Server
    loop: asyncio.AbstractEventLoop
    children: list[h.Child] = field(default_factory=list)
    port: int = 0
    core: str = ""
    deliveries: int = 0
    seconds: float = 0.0

    def env(self, cpu: str | None) -> dict[str, str]:
        return h.child_env({**self.server.env, "BENCH_CPUS": cpu})

    async def start(self) -> None:
        cpus = pinned_cpus()
        process = await h.Child.start(self.server.name, ["server", self.server.kind], self.env(cpus and cpus[0]))
        self.children.append(process)
        port, info = (await process.expect("READY", 60))[:2]
        self.port, self.core = int(port), info
        if self.server.core is not None and info != self.server.core:
            raise h.ChildError(f"{self.server.name}: core_backend() is {info!r}, expected {self.server.core!r}")
        generator = await h.Child.start("generator", ["generator"], self.env(cpus and cpus[1]))
        self.children.append(generator)
        await generator.send(f"connect {self.port} {SUBSCRIBERS} 64 60")
        connected = int((await generator.expect("CONNECTED", 75))[0])
        if connected != SUBSCRIBERS:
            raise h.ChildError(f"{self.server.name}: {connected}/{SUBSCRIBERS} connections subscribed")
        for _ in range(200):  # the server registers a subscribe after answering it: bounded wait
            if int((await process.ask("subs", "SUBS"))[0]) == SUBSCRIBERS:
                return
            await asyncio.sleep(0.05)
        raise h.ChildError(f"{self.server.name}: the server does not count {SUBSCRIBERS} subscribers")

    async def one_round(self, k: int) -> None:
        process, generator = self.children
        count = BROADCASTS_PER_ROUND
        await generator.send(f"expect {count} {ROUND_BOUND} 32 {h.FRAME_SIZE} {self.port}")
        await generator.expect("ARMED", 10)
        started = float((await process.ask(f"burst {k} {count}", "BURST", ROUND_BOUND))[0])
        total, least, most, last, _cpu, received_bytes = (await generator.expect("GOT", ROUND_BOUND + 10))[:6]
        expected = SUBSCRIBERS * count
        if not (int(total) == expected and int(least) == int(most) == count and int(received_bytes) == expected * h.FRAME_SIZE):
            raise AssertionError(
                f"{self.server.name}: {total} frames arrived (per connection {least}..{most}), expected {expected}"
            )
        self.deliveries += expected
        self.seconds += float(last) - started

    def run(self, k: int) -> None:
        self.loop.run_until_complete(self.one_round(k))

    def stop(self) -> None:
        async def stop_all() -> None:
            for child in reversed(self.children):
                await child.stop()

        self.loop.run_until_complete(stop_all())


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    server: Server = request.param
    if server.core == "cython" and not compiled_core_available():
        pytest.skip("compiled core not built")
    loop = asyncio.new_event_loop()
    ready = Rig(server, loop)
    try:
        loop.run_until_complete(asyncio.wait_for(ready.start(), 120))
        yield ready
    finally:
        ready.stop()
        loop.close()


@pytest.mark.parametrize("k", [1, 10], ids=["k=1", "k=10"])
@pytest.mark.parametrize("rig", SERVERS, ids=[s.name for s in SERVERS], indirect=True)
def test_fanout_deliveries_per_second(benchmark: Any, rig: Rig, k: int, fanout_results: list[dict[str, Any]]) -> None:
    """M broadcasts to S subscribers over real sockets, k per loop iteration."""
    benchmark.group = f"fan-out S={SUBSCRIBERS} k={k}"
    rig.run(k)  # warm-up, not counted
    rig.deliveries = 0
    rig.seconds = 0.0
    benchmark.pedantic(rig.run, args=(k,), rounds=ROUNDS, iterations=1)
    assert rig.deliveries == ROUNDS * SUBSCRIBERS * BROADCASTS_PER_ROUND and rig.seconds > 0
    result = {
        "server": rig.server.name,
        "core": rig.core if rig.server.core else "-",
        "subscribers": SUBSCRIBERS,
        "broadcasts_per_round": BROADCASTS_PER_ROUND,
        "k": k,
        "deliveries_per_s": round(rig.deliveries / rig.seconds),
    }
    benchmark.extra_info.update(result)
    fanout_results.append(result)
