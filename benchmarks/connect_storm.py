#!/usr/bin/env python3
"""Connect storm: N clients connecting at once, timed to the last ``state``.

    PYTHONPATH=src python benchmarks/connect_storm.py                   # 10,000 clients, 3 repetitions
    PYTHONPATH=src python benchmarks/connect_storm.py --clients 2000 --repeat 1
    PYTHONPATH=src python benchmarks/connect_storm.py --servers compiled,node

For each server, in a fresh server process: ``--client-processes`` load
generator processes (``_harness.py generator``) start all N connections at
the same moment, each a TCP connect, a WebSocket upgrade, a subscribe, and
the wait for the server's answer (ours: its real ``state``; the peers: the
same ``state`` bytes). The time is from the orchestrator's "go" to the last
answer, on the monotonic clock all processes share. A connection that gets
no answer within ``--answer-timeout`` seconds of its TCP connect is tried
again (up to three times in all), as a client would; one that never gets
one is counted as failed.

Servers: ours on the compiled core with its default backlog (the system's
``somaxconn``) and, as the what-if of asyncio's and uvloop's own default,
with ``backlog=100``; ``websockets`` (its defaults: backlog 100); Node's
``ws`` (Node's defaults: backlog 511). ``ws`` is installed with npm into
``~/.cache/safe_fast-bench/node`` (``BENCH_NODE_CACHE``) on first use;
without ``node``/``npm`` that server is skipped.

Also reported: the kernel's ``ListenOverflows`` count (``/proc/net/netstat``)
during the storm. It is system-wide: on a quiet loopback it is the storm's.

The server and every generator raise RLIMIT_NOFILE's soft limit to the hard
limit; N must fit under it. Every wait is bounded, every process is killed
on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from fanout_e2e import machine, split  # noqa: E402

@dataclass(frozen=True)
class StormServer:
    name: str
    short: str
    kind: str  # _harness.py server kind, or "node"
    env: dict[str, Optional[str]] = field(default_factory=dict)


COMPILED = {"SAFE_FAST_PURE_PYTHON": None, "SAFE_FAST_REQUIRE_COMPILED": "1"}
SERVERS = [
    StormServer("safe_fast compiled", "compiled", "safe_fast", COMPILED),
    StormServer("safe_fast compiled, backlog 100", "compiled-backlog100", "safe_fast", {**COMPILED, "BENCH_BACKLOG": "100"}),
    StormServer("websockets", "websockets", "websockets"),
    StormServer("Node ws", "node", "node"),
]
BY_SHORT = {s.short: s for s in SERVERS}


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows counter (system-wide), or -1 where unknown."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", -1))
    return -1


async def storm(spec: StormServer, args: argparse.Namespace) -> dict[str, object]:
    env = h.child_env(spec.env)
    result: dict[str, object] = {"server": spec.name}
    gens: list[h.Child] = []
    server = await h.start_server(spec.name, spec.kind, env)
    try:
        for i in range(args.client_processes):
            gens.append(await h.Child.start(f"client-{i}", ["generator", "127.0.0.1", "4096"]))
        port, info = (await server.expect("READY", 60))[:2]
        result["info"] = info.replace("_", " ")
        # Warm-up: the first connections pay for lazily created objects and code paths.
        await gens[0].send(f"connect {port} 20 20 30")
        await gens[0].expect("CONNECTED", 45)
        await gens[0].ask("close", "CLOSED", 30)
        await asyncio.sleep(0.5)

        overflows0 = listen_overflows()
        shares = split(args.clients, len(gens))
        t_go = time.monotonic()
        for g, n in zip(gens, shares):
            await g.send(f"connect {port} {n} {n} {args.timeout} {args.answer_timeout}")
        answers = [await g.expect("CONNECTED", args.timeout + 30) for g in gens]
        overflows1 = listen_overflows()
        ok = sum(int(a[0]) for a in answers)
        failed = sum(int(a[1]) for a in answers)
        t_last = max(float(a[3]) for a in answers if int(a[0])) if ok else float("nan")
        subs = int((await server.ask("subs", "SUBS"))[0])
        result.update(
            seconds=t_last - t_go,
            ok=ok,
            failed=failed,
            server_subscribers=subs,
            p50=statistics.median(float(a[4]) for a in answers if int(a[0])) if ok else float("nan"),
            p99=max(float(a[5]) for a in answers if int(a[0])) if ok else float("nan"),
            overflows=overflows1 - overflows0 if overflows0 >= 0 else -1,
        )
        if ok != args.clients:
            result["error"] = f"{failed} of {args.clients} clients got no answer"
    except Exception as exc:
        result["error"] = str(exc).strip()
    finally:
        for g in gens:
            await g.stop()
        await server.stop()
    return result


async def amain(args: argparse.Namespace) -> int:
    soft, hard = h.raise_nofile()
    if args.clients + 200 > soft:
        print(f"RLIMIT_NOFILE {soft} is too low for {args.clients} connections (the server holds all of them)", file=sys.stderr)
        return 2
    specs = [BY_SHORT[s] for s in args.servers]
    if any(s.kind == "node" for s in specs):
        if h.ensure_node_ws() is None:
            print("# node or npm not found: Node ws skipped", file=sys.stderr)
            specs = [s for s in specs if s.kind != "node"]
    print(f"# connect_storm — {machine()}; RLIMIT_NOFILE {soft}/{hard}", file=sys.stderr)
    runs: dict[str, list[dict[str, object]]] = {s.name: [] for s in specs}
    started = time.monotonic()
    for rep in range(args.repeat):
        order = specs[rep % len(specs) :] + specs[: rep % len(specs)]  # who goes first rotates
        for spec in order:
            r = await storm(spec, args)
            r["rep"] = rep
            runs[spec.name].append(r)
            stamp = f"[{time.monotonic() - started:4.0f}s] rep {rep + 1} {spec.name}"
            if "seconds" in r:
                print(
                    f"{stamp}: {r['seconds']:.2f} s to the last answer, p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, "
                    f"{r['ok']} ok, {r['failed']} failed, ListenOverflows +{r['overflows']}"
                    + (f" — {r['error']}" if "error" in r else ""),
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(f"{stamp}: FAILED: {r.get('error')}", file=sys.stderr, flush=True)

    ours = runs.get(SERVERS[0].name, [])
    print()
    print(f"Connect storm, {args.clients:,} clients at once from {args.client_processes} processes; {machine()}")
    print()
    print(
        "| server | seconds to the last `state` (median) | range | p50 s | p99 s | ListenOverflows (median) | "
        "failed (total) | × ours (median of per-repetition ratios) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    failed_any = False
    for name, rs in runs.items():
        good = [r for r in rs if "seconds" in r]
        if not good:
            failed_any = True
            print(f"| {name} | — | — | — | — | — | — | error: {str(rs[0].get('error', '')).splitlines()[0] if rs else ''} |")
            continue
        secs = [float(r["seconds"]) for r in good]  # type: ignore[arg-type]
        ratios = []
        for r in good:
            mine = [o for o in ours if o.get("rep") == r["rep"] and "seconds" in o]
            if mine:
                ratios.append(float(r["seconds"]) / float(mine[0]["seconds"]))  # type: ignore[arg-type]
        failed = sum(int(r["failed"]) for r in good)  # type: ignore[call-overload]
        failed_any = failed_any or failed > 0 or len(good) < len(rs)
        overflows = [int(r["overflows"]) for r in good]  # type: ignore[call-overload]
        ratio = f"{statistics.median(ratios):.2f}×" if ratios else "—"
        print(
            f"| {name} | {statistics.median(secs):.2f} | {min(secs):.2f}–{max(secs):.2f} | "
            f"{statistics.median(float(r['p50']) for r in good):.2f} | "  # type: ignore[arg-type]
            f"{statistics.median(float(r['p99']) for r in good):.2f} | "  # type: ignore[arg-type]
            f"{statistics.median(overflows):,.0f} | {failed} | {ratio} |"
        )
    return 1 if failed_any else 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--servers", type=lambda t: t.split(","), default=[s.short for s in SERVERS], help="subset of: " + ",".join(BY_SHORT))
    p.add_argument("--client-processes", type=int, default=3, help="generator processes (clients split evenly)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=180, help="bound on one storm")
    p.add_argument("--answer-timeout", type=float, default=30, help="a client's wait for its answer after the TCP connect")
    args = p.parse_args(argv)
    unknown = [s for s in args.servers if s not in BY_SHORT]
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {','.join(BY_SHORT)}")
    return args


def main() -> int:
    return h.run_orchestrator(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
