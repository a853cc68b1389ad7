"""A demo to watch: a server with the inspector page, two ShareData and a bot.

    make demo
    python -m safe_fast.examples.demo [--host 127.0.0.1] [--port 8765]

Starts a server on the in-memory defaults (no Redis, nothing external) with
the counter (``safe_fast.examples.counter``) and a shared task list
(``safe_fast.examples.tasks``), turns the inspector on, and prints its URL.
A bot, an ordinary :class:`RealtimeClient` over the WebSocket, proposes to
both every second: it increments the counter and adds, completes and removes
tasks. Open the URL in two windows to watch both change at once; propose
from the page too. Serves until Ctrl-C (or SIGTERM); with ``DEMO_SECONDS``
set in the environment, stops by itself after that many seconds. Exits 0
after a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from typing import Any, Optional, Sequence

from .. import RealtimeClient, RealtimeError, ShareDataManager, attach_realtime_server, core_backend, use_uvloop
from ..server import RealtimeServer
from . import counter, tasks

__all__ = ["start_demo", "Bot", "main"]

DEFAULT_PORT = 8765
BOT_INTERVAL = 1.0
"""Seconds between two rounds of the bot's proposals."""

_TITLES = (
    "Water the plants",
    "Review the replay window",
    "Write the release notes",
    "Call the plumber",
    "Benchmark the fan-out",
    "Buy coffee",
    "Answer the issue tracker",
    "Rotate the signing key",
)


class Bot:
    """Proposes to the counter and the task list every ``interval`` seconds.

    It follows both ShareData through its own subscriptions and builds each
    proposal from the newest state it received, as any client would; a
    proposal that lost a race against another proposer is simply rejected
    by the rule, and the next round starts from the fresher state.
    """

    def __init__(self, url: str, interval: float = BOT_INTERVAL) -> None:
        self.client = RealtimeClient(url + "?user=bot")
        self.interval = interval
        self.states: dict[str, Any] = {}
        self.rounds = 0
        self.proposals = 0
        self._titles = itertools.cycle(_TITLES)

    async def run(self) -> None:
        await self.client.connect()
        for share_data_id in (counter.COUNTER_ID, tasks.TASKS_ID):
            subscription = self.client.subscribe(share_data_id)
            for event in ("state", "transaction", "lifecycle"):
                subscription.on(event, self._follow)
        while True:
            await asyncio.sleep(self.interval)
            await self.round()

    async def round(self) -> None:
        """One counter increment and one task-list change, from the newest states."""
        proposals = []
        if counter.COUNTER_ID in self.states:
            proposals.append((counter.COUNTER_ID, "increment", counter.incremented(self.states[counter.COUNTER_ID])))
        if tasks.TASKS_ID in self.states:
            proposals.append((tasks.TASKS_ID, *self._next_task_change(self.states[tasks.TASKS_ID])))
        self.rounds += 1
        for share_data_id, function_id, data in proposals:
            try:
                await self.client.propose(share_data_id, function_id, data)
            except RealtimeError as exc:  # e.g. a timeout: the next round tries again
                print(f"bot: {function_id} on {share_data_id} failed: {exc}", flush=True)
            else:
                self.proposals += 1

    def _next_task_change(self, state: Any) -> tuple[str, Any]:
        open_tasks = [task for task in state["tasks"] if not task["done"]]
        done_tasks = [task for task in state["tasks"] if task["done"]]
        if len(done_tasks) >= 3:
            return "remove", tasks.removed(state, done_tasks[0]["id"])
        if len(open_tasks) >= 4 or (open_tasks and self.rounds % 3 == 0):
            return "complete", tasks.completed(state, open_tasks[0]["id"])
        return "add", tasks.added(state, next(self._titles))

    def _follow(self, frame: Any) -> None:
        if frame.type == "lifecycle" and frame.event == "removed":
            self.states.pop(frame.share_data_id, None)
        elif frame.type != "transaction" or not frame.replayed:  # replayed frames carry no state
            self.states[frame.share_data_id] = frame.current_state

    async def close(self) -> None:
        await self.client.close()


async def start_demo(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> RealtimeServer:
    """The demo's server: counter, task list and inspector, on the in-memory defaults."""
    manager = ShareDataManager()
    options: dict[str, Any] = {}
    for example in (counter, tasks):
        options.update(example.app(manager))
    options["authenticate"] = lambda request: {"subject": request.query.get("user", "browser")}
    return await attach_realtime_server(
        manager=manager,
        host=host,
        port=port,
        inspector=True,
        **options,
    )


async def run(host: str, port: int, seconds: Optional[float]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(host, port, seconds, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def serve(host: str, port: int, seconds: Optional[float], stop: asyncio.Event) -> None:
    server = await start_demo(host, port)
    page = f"http://{'[' + server.host + ']' if ':' in server.host else server.host}:{server.port}/"
    print(f"safe_fast demo (core: {core_backend()})", flush=True)
    print(f"  inspector: {page}", flush=True)
    print(f"  WebSocket: {server.url}", flush=True)
    print(
        "Open the inspector in a browser (in two windows to see both change at once) and pick\n"
        "'counter' or 'tasks': the state, a live transaction log and a propose form. A bot\n"
        "proposes to both every second.",
        flush=True,
    )
    print("Ctrl-C stops." if seconds is None else f"Stops after DEMO_SECONDS={seconds:g} s.", flush=True)

    bot = Bot(server.url)
    bot_task = asyncio.ensure_future(bot.run())
    try:
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, bot_task}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if bot_task in done:
            bot_task.result()  # the bot stopped on its own: say why
    finally:
        bot_task.cancel()
        await asyncio.gather(bot_task, return_exceptions=True)
        await bot.close()
        await server.close()
    print(f"demo stopped ({bot.proposals} proposals by the bot)", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safe_fast.examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    arguments = parser.parse_args(argv)
    seconds: Optional[float] = None
    raw = os.environ.get("DEMO_SECONDS", "").strip()
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            parser.error(f"DEMO_SECONDS must be a number of seconds, got {raw!r}")
        if not seconds > 0:
            parser.error(f"DEMO_SECONDS must be positive, got {raw!r}")
    use_uvloop()
    try:
        asyncio.run(run(arguments.host, arguments.port, seconds))
    except OSError as exc:
        print(f"demo could not start: {exc} (pass --port 0 for a free port)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
