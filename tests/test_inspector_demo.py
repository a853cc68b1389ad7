"""The watchable demo (``make demo``) and the example ShareData it serves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from safe_fast import ShareDataManager
from safe_fast.examples import counter, tasks

DEADLINE = 20.0


# -- the counter and the task list ----------------------------------------------------------------------


def test_the_counter_accepts_exactly_an_increment_by_one() -> None:
    assert counter.counter_rule({"count": 3}, counter.incremented({"count": 3}))
    for proposed in ({"count": 5}, {"count": 3}, {"count": True}, {"count": 4.0}, {"count": 4, "x": 1}, [4], None):
        assert not counter.counter_rule({"count": 3}, proposed), proposed


def test_the_task_list_functions_accept_their_change_and_nothing_else() -> None:
    empty = tasks.make_task_list().current_state
    assert empty == {"tasks": [], "nextId": 1}
    one = tasks.added(empty, "Write docs")
    assert one == {"tasks": [{"id": 1, "title": "Write docs", "done": False}], "nextId": 2}
    assert tasks.add_rule(empty, one)
    two = tasks.added(one, "Ship")
    assert tasks.add_rule(one, two)
    done = tasks.completed(two, 1)
    assert tasks.complete_rule(two, done)
    gone = tasks.removed(done, 2)
    assert gone == {"tasks": [{"id": 1, "title": "Write docs", "done": True}], "nextId": 3}
    assert tasks.remove_rule(done, gone)

    # Each rule refuses the other kinds of change and malformed states.
    assert not tasks.add_rule(one, done)
    assert not tasks.add_rule(empty, tasks.added(empty, "   "))
    assert not tasks.add_rule(empty, tasks.added(empty, "x" * (tasks.MAX_TITLE_LENGTH + 1)))
    assert not tasks.add_rule(empty, {"tasks": [{"id": 7, "title": "wrong id", "done": False}], "nextId": 2})
    assert not tasks.add_rule(empty, {"tasks": [{"id": 1, "title": "done already", "done": True}], "nextId": 2})
    assert not tasks.complete_rule(done, done)  # nothing changed
    assert not tasks.complete_rule(done, tasks.completed(done, 1))  # already done
    assert not tasks.complete_rule(two, {"tasks": [{**t, "done": True} for t in two["tasks"]], "nextId": 3})
    assert not tasks.complete_rule(two, {**tasks.completed(two, 1), "nextId": 9})
    assert not tasks.remove_rule(two, empty)  # two removed at once
    three = tasks.added(two, "Third")
    first, _, third = three["tasks"]
    assert not tasks.remove_rule(three, {"tasks": [third, first], "nextId": 4})  # one removed, others reordered
    for garbage in (None, [], {"tasks": "x", "nextId": 1}, {"tasks": [{"id": "1", "title": "t", "done": False}], "nextId": 2},
                    {"tasks": [], "nextId": True}, {"tasks": [], "nextId": 1, "extra": 0}):
        for rule in (tasks.add_rule, tasks.complete_rule, tasks.remove_rule):
            assert not rule(garbage, one) and not rule(one, garbage), (rule.__name__, garbage)

    full = tasks.make_task_list(titles=tuple(f"t{i}" for i in range(tasks.MAX_TASKS))).current_state
    assert len(full["tasks"]) == tasks.MAX_TASKS
    assert not tasks.add_rule(full, tasks.added(full, "one too many"))


async def test_app_registers_the_examples_and_returns_the_resolver() -> None:
    manager = ShareDataManager()
    options = {**counter.app(manager), **tasks.app(manager)}
    resolve = options["resolve_function"]
    assert [share_data.id for share_data in manager.get_all_share_data()] == ["counter", "tasks"]
    assert resolve("tasks", "complete").id == "complete" and resolve("counter", "nope") is None
    state = manager.get_share_data_by_id("tasks").current_state
    outcome = await manager.apply_transaction("tasks", tasks.completed(state, 1), resolve("tasks", "complete"))
    assert outcome.accepted


# -- the demo process ------------------------------------------------------------------------------------


def run_demo(**env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "safe_fast.examples.demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def read_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.match(r"  inspector: (http://127\.0\.0\.1:\d+/)$", line.rstrip("\n"))
        if match:
            return match.group(1)
        if not line:
            break
    process.kill()
    pytest.fail(f"the demo printed no inspector URL: {process.communicate(timeout=DEADLINE)}")


@pytest.mark.timeout(60)
def test_the_demo_serves_the_inspector_and_stops_after_demo_seconds() -> None:
    process = run_demo(DEMO_SECONDS="4")
    try:
        url = read_url(process)
        with urllib.request.urlopen(url, timeout=DEADLINE) as page:
            assert page.status == 200 and b"safe_fast inspector" in page.read()
        with urllib.request.urlopen(url + "inspector/share-data.json", timeout=DEADLINE) as listing:
            assert listing.read() == (
                b'{"shareData":[{"id":"counter","functionIds":["increment"]},'
                b'{"id":"tasks","functionIds":["add","complete","remove"]}]}'
            )
        out, err = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    # The bot proposed to both ShareData about every second.
    (summary,) = re.findall(r"demo stopped \((\d+) proposals by the bot\)", out)
    assert int(summary) >= 2, out


@pytest.mark.timeout(60)
def test_the_demo_stops_cleanly_on_ctrl_c() -> None:
    process = run_demo()
    try:
        read_url(process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "demo stopped" in out and "Traceback" not in err


@pytest.mark.timeout(60)
def test_a_bad_demo_seconds_is_refused_by_name() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safe_fast.examples.demo", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, "DEMO_SECONDS": "soon"},
    )
    assert result.returncode == 2 and "DEMO_SECONDS must be a number of seconds" in result.stderr
