#!/usr/bin/env python3
"""End-to-end fan-out: one broadcast to S subscribers, over real WebSockets on loopback.

    PYTHONPATH=src python benchmarks/fanout_e2e.py            # default: ~5 minutes on 2 cores
    PYTHONPATH=src python benchmarks/fanout_e2e.py --quick    # smoke run, < 60 s
    PYTHONPATH=src python benchmarks/fanout_e2e.py --repeat 3 --subscribers 500 --bursts 10

A cell is (server, S subscribers, bursts of k). For each (S, k), every
server of the comparison is started in its own fresh process (pinned to one
CPU, the generators to the other):

1. each server subprocess starts listening (uvloop);
2. the generator process(es) open S connections to it with a real WebSocket
   handshake and a real subscribe message, and wait for its answer;
3. a short warm-up round; then M broadcasts are measured in ``--chunks``
   rounds per server, the servers taking turns round by round (who goes
   first rotates), so the drift of a shared machine hits all of them alike.
   In a round the server performs its broadcasts k per event-loop iteration
   (k broadcasts, then ``await asyncio.sleep(0)``), each a 250-byte JSON text
   frame;
4. the generators count frames by their headers until every connection of
   that server has them; a round is *verified* when exactly S×count frames
   (and S×count×frame bytes) arrived and no connection got more or fewer;
5. the server reports the CPU time it spent from the start of the round's
   burst until every frame was delivered (``time.process_time()`` inside the
   server process; also split into user/kernel by ``getrusage``) and its
   peak RSS.

deliveries/s = S×M / (time from each round's burst start to its last frame,
summed over the rounds), both read from the same monotonic clock in the two
processes. The grid is repeated (``--repeat``, fresh processes each time);
the table shows medians, and ratios to the coalesced raw-uvloop limit
computed within each repetition, then their median.

Servers: ours on the compiled core and on the pure core (``attach_realtime_server``,
broadcast = ``ShareDataManager.update_share_data`` -> lifecycle ``updated``),
``websockets.broadcast``, naive picows (``WSTransport.send`` per subscriber per
frame), and a raw-uvloop limit server (hand-rolled handshake, pre-framed bytes)
with one write per subscriber per burst ("coalesced") and one write per frame
per subscriber. All send the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str
    env: dict[str, Optional[str]]
    backend: Optional[str] = None  # what core_backend() must say, for ours


SERVERS = [
    ServerSpec("safe_fast compiled", "safe_fast", {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1"}, "cython"),
    ServerSpec("safe_fast pure", "safe_fast", {"SAFE_FAST_PURE_PYTHON": "1", "SAFE_FAST_REQUIRE_COMPILED": None}, "python"),
    ServerSpec("websockets.broadcast", "websockets", {}),
    ServerSpec("picows naive", "picows", {}),
    ServerSpec("raw uvloop coalesced", "raw-coalesced", {}),
    ServerSpec("raw uvloop per-frame", "raw-naive", {}),
]
CANDIDATE = "candidate compiled"
# Opt-in what-if variants (--servers NAME), not part of the default comparison.
EXTRA_SERVERS = [
    ServerSpec(
        "safe_fast compiled, aiofastnet transport",
        "safe_fast",
        {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1", "BENCH_PICOWS_AIOFASTNET": "1"},
        "cython",
    ),
    ServerSpec(
        "safe_fast compiled, metrics",
        "safe_fast",
        {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1", "BENCH_SAFE_FAST_METRICS": "1"},
        "cython",
    ),
    ServerSpec(
        "safe_fast pure, aiofastnet transport",
        "safe_fast",
        {"SAFE_FAST_PURE_PYTHON": "1", "SAFE_FAST_REQUIRE_COMPILED": None, "BENCH_PICOWS_AIOFASTNET": "1"},
        "python",
    ),
]
LIMIT = "raw uvloop coalesced"
SHORT = {
    "safe_fast compiled": "compiled",
    "safe_fast pure": "pure",
    "websockets.broadcast": "websockets",
    "picows naive": "picows",
    "raw uvloop coalesced": "raw-coalesced",
    "raw uvloop per-frame": "raw-naive",
    "safe_fast compiled, aiofastnet transport": "compiled-aiofastnet",
    "safe_fast pure, aiofastnet transport": "pure-aiofastnet",
    "safe_fast compiled, metrics": "compiled-metrics",
}


@dataclass
class Cell:
    server: str
    subscribers: int
    k: int
    m: int
    repeat: int
    deliveries: int = 0
    wall: float = 0.0
    burst_wall: float = 0.0
    server_cpu: float = 0.0
    server_user: float = 0.0
    server_sys: float = 0.0
    burst_cpu: float = 0.0
    peak_rss_kib: int = 0
    rss_kib: int = 0
    gen_cpu: float = 0.0
    gen_busy: float = 0.0  # the busiest generator's CPU / wall
    received: int = 0
    verified: bool = False
    info: str = ""
    error: str = ""

    @property
    def dps(self) -> float:
        return self.deliveries / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.server_cpu / self.deliveries * 1e6 if self.deliveries else 0.0

    @property
    def user_us(self) -> float:
        return self.server_user / self.deliveries * 1e6 if self.deliveries else 0.0

    @property
    def gen_cpu_us(self) -> float:
        return self.gen_cpu / self.deliveries * 1e6 if self.deliveries else 0.0


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class _Live:
    """One running server of a group, and the cell it fills."""

    def __init__(self, spec: ServerSpec, child: h.Child, cell: Cell) -> None:
        self.spec = spec
        self.child = child
        self.cell = cell
        self.port = 0
        self.alive = False
        self.rounds = 0
        self.rounds_ok = 0


def _env_for(spec: ServerSpec, args: argparse.Namespace) -> dict[str, str]:
    env = h.child_env(spec.env)
    if args.pin:
        env["BENCH_CPUS"] = args.pin[0]
    return env


async def run_group(
    specs: list[ServerSpec], s: int, k: int, m: int, rep: int, gens: list[h.Child], args: argparse.Namespace
) -> list[Cell]:
    """Every server of one (S, k) cell at once, their measured rounds interleaved chunk by chunk.

    All servers are started and get their S subscribers first; then the M
    broadcasts are measured in ``--chunks`` rounds per server, the servers
    taking turns round by round (rotating who goes first), so slow drifts of
    a shared machine hit every server alike. Each round is verified on its
    own; CPU, frames and time add up over a server's rounds.
    """
    shares = split(s, len(gens))
    lives: list[_Live] = []
    bursts = split(m // k, max(1, min(args.chunks, m // k)))
    chunk_ms = [b * k for b in bursts if b]

    async def one_round(live: _Live, count: int) -> tuple[list[str], list[list[str]], list[str]]:
        for g, n in zip(gens, shares):
            if n:
                await g.send(f"expect {count} {args.cell_timeout} {args.gen_batch} {h.FRAME_SIZE} {live.port}")
                await g.expect("ARMED", 10)
        burst = await live.child.ask(f"burst {k} {count}", "BURST", args.cell_timeout)
        gots = [await g.expect("GOT", args.cell_timeout + 10) for g, n in zip(gens, shares) if n]
        stats = await live.child.ask("stats", "STATS")
        return burst, gots, stats

    def fail(live: _Live, exc: BaseException) -> None:
        live.alive = False
        text = str(exc).strip()
        live.cell.error = text.splitlines()[0] if text else repr(exc)
        if args.verbose:
            print(f"  {live.spec.name}: {exc}", file=sys.stderr)

    try:
        for spec in specs:
            cell = Cell(spec.name, s, k, sum(chunk_ms), rep)
            live = _Live(spec, await h.Child.start(spec.name, ["server", spec.kind], _env_for(spec, args)), cell)
            lives.append(live)
            try:
                port, info = (await live.child.expect("READY", 60))[:2]
                cell.info = info.replace("_", " ")
                if spec.backend is not None and info != spec.backend:
                    raise h.ChildError(f"{spec.name}: core_backend() is {info!r}, expected {spec.backend!r}")
                live.port = int(port)
                for g, n in zip(gens, shares):
                    await g.send(f"connect {port} {n} {args.connect_concurrency} {args.connect_timeout}")
                ok = 0
                for g in gens:
                    ok += int((await g.expect("CONNECTED", args.connect_timeout + 15))[0])
                if ok != s:
                    raise h.ChildError(f"{spec.name}: only {ok}/{s} connections subscribed")
                deadline = time.monotonic() + 10
                while True:
                    subs = int((await live.child.ask("subs", "SUBS"))[0])
                    if subs == s or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                if subs != s:
                    raise h.ChildError(f"{spec.name}: server counts {subs} subscribers, expected {s}")
                live.alive = True
                warm = min(m, max(k, (m // 50) // k * k))
                await one_round(live, warm)
            except Exception as exc:
                fail(live, exc)

        for chunk, count in enumerate(chunk_ms):
            shift = (rep + chunk) % len(lives)
            for live in lives[shift:] + lives[:shift]:
                if not live.alive:
                    continue
                cell = live.cell
                try:
                    burst, gots, stats = await one_round(live, count)
                except Exception as exc:
                    fail(live, exc)
                    continue
                live.rounds += 1
                t0, t1 = float(burst[0]), float(burst[1])
                total = sum(int(g[0]) for g in gots)
                lo, hi = min(int(g[1]) for g in gots), max(int(g[2]) for g in gots)
                t_last = max(float(g[3]) for g in gots)
                nbytes = sum(int(g[5]) for g in gots)
                if total == s * count and lo == hi == count and nbytes == s * count * h.FRAME_SIZE and t_last > 0:
                    live.rounds_ok += 1
                else:
                    cell.error = (
                        f"round {chunk}: received {total} frames (per connection {lo}..{hi}), "
                        f"{nbytes} bytes; expected {s * count}"
                    )
                wall = t_last - t0 if t_last > 0 else float("nan")
                cell.deliveries += s * count
                cell.received += total
                cell.wall += wall
                cell.burst_wall += t1 - t0
                cell.burst_cpu += float(burst[2])
                cell.server_cpu += float(stats[0])
                cell.rss_kib, cell.peak_rss_kib = int(stats[1]), int(stats[2])
                cell.server_user += float(stats[3])
                cell.server_sys += float(stats[4])
                gen_cpus = [float(g[4]) for g in gots]
                cell.gen_cpu += sum(gen_cpus)
                if wall > 0:
                    cell.gen_busy = max(cell.gen_busy, max(gen_cpus) / wall)
        for live in lives:
            live.cell.verified = live.alive and live.rounds == len(chunk_ms) and live.rounds_ok == live.rounds
    finally:
        for g in gens:
            try:
                await g.ask("close", "CLOSED", 60)
            except Exception as exc:
                print(f"  generator close failed: {exc}", file=sys.stderr)
        for live in lives:
            await live.child.stop()
    return [live.cell for live in lives]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(cells: list[Cell]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Medians per (server, S, k), and per-repetition ratios to the limit (median of them)."""
    by_key: dict[tuple[str, int, int], list[Cell]] = {}
    for c in cells:
        by_key.setdefault((c.server, c.subscribers, c.k), []).append(c)
    limit = {(c.subscribers, c.k, c.repeat): c for c in cells if c.server == LIMIT and c.verified}
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for key, group in by_key.items():
        good = [c for c in group if c.verified]
        dps_ratios, cpu_ratios, user_ratios = [], [], []
        for c in good:
            ref = limit.get((c.subscribers, c.k, c.repeat))
            if ref is not None and ref.dps > 0 and ref.cpu_us > 0:
                dps_ratios.append(c.dps / ref.dps)
                cpu_ratios.append(c.cpu_us / ref.cpu_us)
                if ref.user_us > 0:
                    user_ratios.append(c.user_us / ref.user_us)
        out[key] = {
            "runs": len(group),
            "verified": len(good),
            "m": group[0].m,
            "dps": median([c.dps for c in good]),
            "cpu_us": median([c.cpu_us for c in good]),
            "user_us": median([c.user_us for c in good]),
            "user_x_limit": median(user_ratios),
            "peak_rss_mib": max((c.peak_rss_kib for c in good), default=0) / 1024,
            "gen_cpu_us": median([c.gen_cpu_us for c in good]),
            "gen_busy": max((c.gen_busy for c in good), default=0.0),
            "dps_x_limit": median(dps_ratios),
            "cpu_x_limit": median(cpu_ratios),
            "errors": sorted({c.error for c in group if c.error}),
        }
    return out


def fmt(value: float, digits: int = 2) -> str:
    if value != value:
        return "—"
    return f"{value:,.{digits}f}"


def table(summary: dict[tuple[str, int, int], dict[str, Any]], servers: list[str]) -> str:
    lines = [
        "| S | k | server | deliveries/s | × limit | server CPU µs/delivery | × limit | of which user µs "
        "| peak RSS MiB | gen CPU µs/delivery (busiest gen) | verified |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s, k in sorted({(key[1], key[2]) for key in summary}):
        for name in servers:
            row = summary.get((name, s, k))
            if row is None:
                continue
            lines.append(
                f"| {s:,} | {k} | {name} | {fmt(row['dps'], 0)} | {fmt(row['dps_x_limit'])} | "
                f"{fmt(row['cpu_us'], 3)} | {fmt(row['cpu_x_limit'])} | {fmt(row['user_us'], 3)} | "
                f"{fmt(row['peak_rss_mib'], 1)} | "
                f"{fmt(row['gen_cpu_us'], 3)} ({row['gen_busy']:.0%}) | {row['verified']}/{row['runs']} |"
            )
    return "\n".join(lines)


def per_repeat_ratio(cells: list[Cell], a: str, b: str, s: int, k: int, metric: str) -> float:
    """Median over repetitions of a's metric / b's metric at (S, k), within each repetition."""
    return median(per_repeat_ratios(cells, a, b, s, k, metric))


def per_repeat_ratios(cells: list[Cell], a: str, b: str, s: int, k: int, metric: str) -> list[float]:
    ratios: list[float] = []
    index = {(c.server, c.repeat): c for c in cells if c.subscribers == s and c.k == k and c.verified}
    for rep in sorted({c.repeat for c in cells}):
        ca, cb = index.get((a, rep)), index.get((b, rep))
        if ca is None or cb is None:
            continue
        va, vb = getattr(ca, metric), getattr(cb, metric)
        if vb > 0:
            ratios.append(va / vb)
    return ratios


def targets(cells: list[Cell], subscribers: list[int], bursts: list[int]) -> str:
    C, P, W, PN = "safe_fast compiled", "safe_fast pure", "websockets.broadcast", "picows naive"
    rows = []

    def add(what: str, a: str, b: str, s: int, k: int, metric: str, goal: float, at_most: bool) -> None:
        ratios = per_repeat_ratios(cells, a, b, s, k, metric)
        r = median(ratios)
        if r != r:
            rows.append(f"| {what} | — | {'≤' if at_most else '≥'} {goal:g} | not measured | — | — |")
            return
        met = r <= goal if at_most else r >= goal
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else "one run"
        if at_most:
            margin = f"{(goal / r - 1) * 100:.0f}% under the bound" if met else f"{(r / goal - 1) * 100:.0f}% over the bound"
        else:
            margin = f"{(r / goal - 1) * 100:.0f}% above the goal" if met else f"{(1 - r / goal) * 100:.0f}% short of the goal"
        verdict = "met" if met else "NOT met"
        rows.append(f"| {what} | {r:.2f} | {'≤' if at_most else '≥'} {goal:g} | {verdict} | {margin} | {spread} |")

    if 500 in subscribers and 10 in bursts:
        add("compiled S=500 k=10: server CPU/delivery ÷ coalesced raw limit", C, LIMIT, 500, 10, "cpu_us", 1.3, True)
        add("compiled S=500 k=10: deliveries/s ÷ websockets.broadcast", C, W, 500, 10, "dps", 10, False)
    if 1 in bursts:
        for s in subscribers:
            add(f"compiled S={s:,} k=1: deliveries/s ÷ naive picows", C, PN, s, 1, "dps", 1, False)
            add(f"compiled S={s:,} k=1: deliveries/s ÷ websockets.broadcast", C, W, s, 1, "dps", 2, False)
    if 10 in bursts:
        for s in subscribers:
            add(f"pure S={s:,} k=10: deliveries/s ÷ websockets.broadcast", P, W, s, 10, "dps", 3, False)
    head = [
        "| target | measured (median ratio) | goal | verdict | by how much | per-repetition range |",
        "|---|---:|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def machine() -> str:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for mod in ("picows", "uvloop", "websockets", "orjson"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod)}")
        except Exception:
            pass
    return (
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), load avg {load[0]:.2f}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; " + ", ".join(versions)
    )


async def amain(args: argparse.Namespace) -> int:
    specs = [s for s in SERVERS if args.servers is None or SHORT[s.name] in args.servers or s.name in args.servers]
    specs += [s for s in EXTRA_SERVERS if args.servers is not None and (SHORT[s.name] in args.servers or s.name in args.servers)]
    if args.candidate:
        cand = os.path.abspath(args.candidate)
        specs.insert(
            1,
            ServerSpec(
                CANDIDATE,
                "safe_fast",
                {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1", "BENCH_SAFE_FAST_SRC": cand},
                "cython",
            ),
        )
        print(f"# candidate: safe_fast imported from {cand}", file=sys.stderr)
    if not any(s.name == LIMIT for s in specs):
        print("note: the coalesced raw limit is not in --servers; no ratios", file=sys.stderr)
    print(f"# fanout_e2e — {machine()}", file=sys.stderr)
    print(
        f"# S={args.subscribers} k={args.bursts} ~{args.deliveries:,} deliveries/cell, repeat={args.repeat}, "
        f"generators={args.generators}, pin={'/'.join(args.pin) if args.pin else 'none'}, "
        f"gen batch={args.gen_batch} frames, frame={h.FRAME_SIZE} B (payload {h.PAYLOAD_SIZE} B)",
        file=sys.stderr,
    )
    started = time.monotonic()
    gens: list[h.Child] = []
    cells: list[Cell] = []
    try:
        for i in range(args.generators):
            env = dict(os.environ)
            if args.pin:
                env["BENCH_CPUS"] = args.pin[1]
            gens.append(await h.Child.start(f"generator-{i}", ["generator", "127.0.0.1"], env))
        plan = []
        for rep in range(args.repeat):
            for s in args.subscribers:
                m = max(args.min_broadcasts, args.deliveries // s)
                for k in args.bursts:
                    plan.append((rep, s, k, max(k, m // k * k)))
        for index, (rep, s, k, m) in enumerate(plan, 1):
            if time.monotonic() - started > args.max_seconds:
                print(f"# stopping: --max-seconds {args.max_seconds} reached", file=sys.stderr)
                break
            shift = rep % len(specs)
            group = await run_group(specs[shift:] + specs[:shift], s, k, m, rep, gens, args)
            cells.extend(group)
            for cell in group:
                status = "ok" if cell.verified else f"FAILED: {cell.error}"
                print(
                    f"[{index}/{len(plan)} {time.monotonic() - started:5.0f}s] rep {rep} S={s} k={k} M={cell.m} "
                    f"{cell.server}: {cell.dps:,.0f} dlv/s, {cell.cpu_us:.3f} µs CPU/dlv ({cell.user_us:.3f} user), "
                    f"peak RSS {cell.peak_rss_kib / 1024:.0f} MiB, gen {cell.gen_busy:.0%} busy — {status}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for g in gens:
            await g.stop()
    elapsed = time.monotonic() - started
    summary = summarize(cells)
    names = [s.name for s in specs]
    print()
    print(f"End-to-end fan-out, {machine()}; {elapsed:.0f} s, repeat={args.repeat}, one run.")
    print()
    print(table(summary, names))
    print()
    print(targets(cells, args.subscribers, args.bursts))
    failures = [c for c in cells if not c.verified]
    if failures:
        print()
        print(f"{len(failures)} cell(s) failed verification or errored:")
        for c in failures:
            print(f"- {c.server} S={c.subscribers} k={c.k} rep {c.repeat}: {c.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "args": vars(args),
                    "cells": [asdict(c) | {"dps": c.dps, "cpu_us": c.cpu_us, "user_us": c.user_us} for c in cells],
                },
                f,
                indent=1,
            )
    return 1 if failures else 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s): S=50,500, ~100k deliveries per cell")
    p.add_argument("--repeat", type=int, default=None, help="repetitions of the whole grid (default 2; --quick 1)")
    p.add_argument("--subscribers", type=ints, default=None, help="comma list of S (default 50,500,2000)")
    p.add_argument("--bursts", type=ints, default=[1, 10], help="comma list of k (default 1,10)")
    p.add_argument("--deliveries", type=int, default=None, help="target S×M per cell (default 400,000; --quick 100,000)")
    p.add_argument("--min-broadcasts", type=int, default=100, help="M is at least this")
    p.add_argument("--servers", type=lambda t: t.split(","), default=None, help="subset: " + ",".join(SHORT.values()))
    p.add_argument("--generators", type=int, default=1, help="load generator processes (connections split evenly)")
    p.add_argument(
        "--gen-batch",
        type=int,
        default=32,
        help="generator sets SO_RCVLOWAT to this many frames while counting, so the kernel wakes it "
        "per batch rather than per write, like a remote reader (0: wake on every byte)",
    )
    p.add_argument(
        "--pin",
        default=None,
        help='CPU pinning "SERVER_CPUS/GENERATOR_CPUS" (e.g. "0/1", "0/1,2"); "none" to not pin; '
        "default: 0/1 on a machine with at least 2 CPUs",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=4,
        help="measured rounds per server and cell; the servers of a cell take turns round by round",
    )
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--connect-timeout", type=float, default=60)
    p.add_argument("--cell-timeout", type=float, default=120, help="bound on one burst round")
    p.add_argument("--max-seconds", type=float, default=1800, help="stop starting cells after this long")
    p.add_argument(
        "--candidate",
        metavar="DIR",
        help='also run "candidate compiled": safe_fast imported from DIR (a copy of src/ with a changed, '
        "built core), interleaved with the others, to A/B a change",
    )
    p.add_argument("--json", help="also write every cell to this JSON file")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.subscribers = args.subscribers or [50, 500]
        args.deliveries = args.deliveries or 100_000
        args.repeat = args.repeat or 1
    if args.pin is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        args.pin = [str(cpus[0]), str(cpus[1])] if len(cpus) >= 2 else None
    elif args.pin == "none":
        args.pin = None
    else:
        args.pin = args.pin.split("/")
        if len(args.pin) != 2:
            p.error("--pin wants SERVER_CPUS/GENERATOR_CPUS")
    args.subscribers = args.subscribers or [50, 500, 2000]
    args.deliveries = args.deliveries or 400_000
    args.repeat = args.repeat or 2
    return args


def main() -> int:
    return h.run_orchestrator(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
