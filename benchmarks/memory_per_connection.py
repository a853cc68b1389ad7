#!/usr/bin/env python3
"""Server memory per idle subscribed connection.

    PYTHONPATH=src python benchmarks/memory_per_connection.py                      # 20,000 connections, both cores
    PYTHONPATH=src python benchmarks/memory_per_connection.py --connections 1000   # quick
    PYTHONPATH=src python benchmarks/memory_per_connection.py --servers compiled,pure,websockets,picows,raw
    PYTHONPATH=src python benchmarks/memory_per_connection.py --breakdown 2000     # where it goes

For each server (by default ours on the compiled and on the pure core), in a
fresh server process: open a few warm-up connections and close them, read the
server's RSS ("before"), open N connections from the generator process(es) —
each a real WebSocket handshake plus a real subscribe, answered by ``state`` —,
check the server counts N subscribers, read its RSS again ("after", after a
``gc.collect()``). Reported: (after − before) / N in KiB. RSS is what the
process holds in user space; the kernel's socket buffers are not in it.

Both the server and the generators raise their RLIMIT_NOFILE soft limit to
the hard limit; N must fit under it (each generator holds N/generators
sockets). Without ``--connections``, N is 20,000, lowered (with a note) to
what the hard limit allows. Everything is bounded in time and every process
is killed on exit.

``--breakdown N`` measures, in another fresh server process per server,
what N connections allocated, per connection: by source line (tracemalloc;
what C code allocates shows under the last Python line on the stack) and by
object type (``gc``). tracemalloc costs memory of its own, so this pass is
separate from the RSS figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402
from fanout_e2e import EXTRA_SERVERS, SERVERS, SHORT, ServerSpec, machine, split  # noqa: E402

NODE = ServerSpec("Node ws", "node", {})

TARGET_KIB = 5.0
"""Below the TypeScript reference server's 5.0 KiB per connection (marginal, at 20,000)."""
DEFAULT_CONNECTIONS = 20_000


async def measure(spec: "object", args: argparse.Namespace) -> dict[str, object]:
    env = h.child_env(spec.env)  # type: ignore[attr-defined]
    result: dict[str, object] = {"server": spec.name, "connections": args.connections}  # type: ignore[attr-defined]
    gens: list[h.Child] = []
    server = await h.start_server(spec.name, spec.kind, env)  # type: ignore[attr-defined]
    try:
        for i in range(args.generators):
            gens.append(await h.Child.start(f"generator-{i}", ["generator", "127.0.0.1", str(args.recv_buffer)]))
        port, info = (await server.expect("READY", 60))[:2]
        result["info"] = info.replace("_", " ")
        if spec.backend is not None and info != spec.backend:  # type: ignore[attr-defined]
            raise h.ChildError(f"{spec.name}: core_backend() is {info!r}, expected {spec.backend!r}")  # type: ignore[attr-defined]

        # Warm-up: the first connections pay for lazily created objects and code paths.
        await gens[0].send(f"connect {port} {args.warmup} 16 60")
        await gens[0].expect("CONNECTED", 75)
        await gens[0].ask("close", "CLOSED", 30)
        deadline = time.monotonic() + 10
        while True:
            left = int((await server.ask("subs", "SUBS"))[0])
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if left:
            # A baseline taken with warm-up connections still held would hide their cost.
            raise h.ChildError(f"{left} warm-up subscribers still counted after 10 s")
        await asyncio.sleep(0.2)
        before = [int(x) for x in await server.ask("rss", "RSS")]

        t0 = time.monotonic()
        shares = split(args.connections, len(gens))
        for g, n in zip(gens, shares):
            await g.send(f"connect {port} {n} {args.concurrency} {args.timeout}")
        ok = 0
        for g in gens:
            ok += int((await g.expect("CONNECTED", args.timeout + 30))[0])
        connect_s = time.monotonic() - t0
        if ok != args.connections:
            raise h.ChildError(f"only {ok}/{args.connections} connections subscribed")
        deadline = time.monotonic() + 30
        while True:
            subs = int((await server.ask("subs", "SUBS"))[0])
            if subs == args.connections or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if subs != args.connections:
            raise h.ChildError(f"server counts {subs} subscribers, expected {args.connections}")
        await asyncio.sleep(0.5)  # let the last handshakes' buffers settle
        after = [int(x) for x in await server.ask("rss", "RSS")]
        result.update(
            before_kib=before[0],
            after_kib=after[0],
            peak_kib=after[1],
            kib_per_connection=(after[0] - before[0]) / args.connections,
            connect_seconds=connect_s,
        )
    except Exception as exc:
        result["error"] = str(exc).strip()
    finally:
        for g in gens:
            await g.stop()
        await server.stop()
    return result


async def breakdown(spec: "object", args: argparse.Namespace) -> None:
    """Print where ``args.breakdown`` connections' memory goes in one server, per connection."""
    n = args.breakdown
    env = h.child_env(spec.env)  # type: ignore[attr-defined]
    server = await h.start_server(spec.name, spec.kind, env)  # type: ignore[attr-defined]
    gen: Optional[h.Child] = None
    try:
        gen = await h.Child.start("generator", ["generator", "127.0.0.1", str(args.recv_buffer)])
        port = (await server.expect("READY", 60))[0]
        await gen.send(f"connect {port} {args.warmup} 16 60")
        await gen.expect("CONNECTED", 75)
        await gen.ask("close", "CLOSED", 30)
        await asyncio.sleep(0.5)
        await server.ask("trace-start", "TRACING")
        await gen.send(f"connect {port} {n} {args.concurrency} {args.timeout}")
        ok = int((await gen.expect("CONNECTED", args.timeout + 30))[0])
        await asyncio.sleep(0.5)
        await server.send("trace-top 25")
        lines = (await server.lines_until("TOPEND", 120))[:-1]
        print(f"\n{spec.name}: {ok:,} connections; per connection:")  # type: ignore[attr-defined]
        total = sum(int(f[1]) for f in lines if f[0] == "TOP")
        print(f"  tracemalloc, top 25 lines: {total / ok:,.0f} B")
        for f in lines:
            if f[0] == "TOP" and abs(int(f[1])) / ok >= 8:
                print(f"  {int(f[1]) / ok:8.1f} B {int(f[2]) / ok:5.2f} blocks  {f[3]}")
        print("  objects (gc-tracked) per connection:")
        print("   " + ", ".join(f"{f[1]} {int(f[2]) / ok:.2f}" for f in lines if f[0] == "TYPE" and int(f[2]) / ok >= 0.5))
    finally:
        if gen is not None:
            await gen.stop()
        await server.stop()


async def amain(args: argparse.Namespace) -> int:
    soft, hard = h.raise_nofile()
    if args.connections is None:
        args.connections = DEFAULT_CONNECTIONS
        if hard != resource.RLIM_INFINITY and args.connections + 500 > hard:
            args.connections = (hard - 500) // 500 * 500
            print(f"# RLIMIT_NOFILE hard limit {hard}: {args.connections:,} connections instead of {DEFAULT_CONNECTIONS:,}", file=sys.stderr)
    per_gen = -(-args.connections // args.generators)
    if hard != resource.RLIM_INFINITY and max(per_gen, args.connections) + 100 > hard:
        print(
            f"RLIMIT_NOFILE hard limit {hard} is too low for {args.connections} connections "
            f"(the server holds all of them); lower --connections or raise the limit",
            file=sys.stderr,
        )
        return 2
    specs = [s for s in SERVERS + EXTRA_SERVERS if SHORT[s.name] in args.servers or s.name in args.servers]
    if "node" in args.servers:
        specs.append(NODE)
    if args.breakdown:
        for spec in specs:
            await breakdown(spec, args)
        return 0
    print(f"# memory_per_connection — {machine()}; RLIMIT_NOFILE {soft}/{hard}", file=sys.stderr)
    results = []
    started = time.monotonic()
    for rep in range(args.repeat):
        for spec in specs:
            r = await measure(spec, args)
            results.append(r)
            if "error" in r:
                print(f"[{time.monotonic() - started:4.0f}s] {spec.name}: FAILED: {r['error']}", file=sys.stderr)
            else:
                print(
                    f"[{time.monotonic() - started:4.0f}s] {spec.name}: {r['kib_per_connection']:.2f} KiB/connection "
                    f"({r['before_kib'] / 1024:.1f} -> {r['after_kib'] / 1024:.1f} MiB, connected in "
                    f"{r['connect_seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print()
    print(f"Memory per idle subscribed connection, {args.connections:,} connections; {machine()}")
    print()
    print("| server | connections | RSS before MiB | RSS after MiB | KiB per connection | target < 5.0 KiB (ours) |")
    print("|---|---:|---:|---:|---:|---|")
    failed = False
    for r in results:
        if "error" in r:
            failed = True
            print(f"| {r['server']} | {args.connections:,} | — | — | — | error: {r['error'].splitlines()[0]} |")
            continue
        kib = float(r["kib_per_connection"])  # type: ignore[arg-type]
        ours = str(r["server"]).startswith("safe_fast")
        verdict = (f"met ({TARGET_KIB / kib:.1f}× under)" if kib < TARGET_KIB else f"NOT met ({kib / TARGET_KIB:.2f}× over)") if ours else "—"
        print(
            f"| {r['server']} | {args.connections:,} | {int(r['before_kib']) / 1024:.1f} | "  # type: ignore[call-overload]
            f"{int(r['after_kib']) / 1024:.1f} | {kib:.2f} | {verdict} |"  # type: ignore[call-overload]
        )
    return 1 if failed else 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=None, help=f"default {DEFAULT_CONNECTIONS:,}, or what RLIMIT_NOFILE allows")
    p.add_argument("--breakdown", type=int, default=0, metavar="N", help="instead: where N connections' memory goes")
    p.add_argument("--servers", type=lambda t: t.split(","), default=["compiled", "pure"], help="subset of: " + ",".join([*SHORT.values(), "node"]))
    p.add_argument("--generators", type=int, default=1, help="generator processes (connections split evenly)")
    p.add_argument("--concurrency", type=int, default=100, help="handshakes in flight per generator")
    p.add_argument("--warmup", type=int, default=20, help="connections opened and closed before 'before'")
    p.add_argument("--recv-buffer", type=int, default=4096, help="generator receive buffer per connection")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=240, help="bound on opening all connections")
    return p.parse_args(argv)


def main() -> int:
    return h.run_orchestrator(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
