"""A shared task list: a ShareData with a richer state and three functions.

State::

    {"tasks": [{"id": 1, "title": "Water the plants", "done": false}, ...], "nextId": 2}

As everywhere in SAFE, a proposal is the whole next state, and each function
is a rule that accepts one kind of change and nothing else:

* ``add``: the same tasks plus one new task at the end, with id ``nextId``,
  a title of 1 to 200 characters and ``done: false``; ``nextId`` grows by one.
  At most :data:`MAX_TASKS` tasks.
* ``complete``: the same tasks with exactly one of the open ones marked done.
* ``remove``: the same tasks less exactly one.

:func:`added`, :func:`completed` and :func:`removed` build those proposals
from a state. ``app(manager)`` registers the list and returns the server
options that make it reachable over the wire.
"""

from __future__ import annotations

from typing import Any, Optional

from ..server import create_id_based_function_resolver
from ..sharedata import ShareData, ShareDataManager, ShareFunction

__all__ = [
    "TASKS_ID",
    "MAX_TASKS",
    "MAX_TITLE_LENGTH",
    "add_rule",
    "complete_rule",
    "remove_rule",
    "added",
    "completed",
    "removed",
    "make_task_list",
    "app",
]

TASKS_ID = "tasks"
MAX_TASKS = 50
MAX_TITLE_LENGTH = 200


# -- rules ------------------------------------------------------------------------------


def add_rule(current: Any, proposed: Any) -> bool:
    """One new open task appended, with the next id."""
    before, after = _tasks(current), _tasks(proposed)
    if before is None or after is None or len(before) >= MAX_TASKS or len(after) != len(before) + 1:
        return False
    next_id = current["nextId"]
    new = after[-1]
    return (
        after[:-1] == before
        and proposed["nextId"] == next_id + 1
        and new["id"] == next_id
        and new["done"] is False
        and 1 <= len(new["title"].strip()) <= MAX_TITLE_LENGTH
    )


def complete_rule(current: Any, proposed: Any) -> bool:
    """Exactly one open task marked done, nothing else changed."""
    before, after = _tasks(current), _tasks(proposed)
    if before is None or after is None or len(after) != len(before) or proposed["nextId"] != current["nextId"]:
        return False
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    if len(changed) != 1:
        return False
    old, new = changed[0]
    return old["done"] is False and new == {**old, "done": True}


def remove_rule(current: Any, proposed: Any) -> bool:
    """Exactly one task taken out, the others kept in order."""
    before, after = _tasks(current), _tasks(proposed)
    if before is None or after is None or len(after) != len(before) - 1 or proposed["nextId"] != current["nextId"]:
        return False
    return any(before[:i] + before[i + 1 :] == after for i in range(len(before)))


# -- proposals ----------------------------------------------------------------------------


def added(state: Any, title: str) -> dict[str, Any]:
    """The proposal ``add`` accepts: ``state`` plus an open task called ``title``."""
    next_id = state["nextId"]
    return {"tasks": [*state["tasks"], {"id": next_id, "title": title, "done": False}], "nextId": next_id + 1}


def completed(state: Any, task_id: int) -> dict[str, Any]:
    """The proposal ``complete`` accepts: task ``task_id`` marked done."""
    tasks = [{**task, "done": True} if task["id"] == task_id else task for task in state["tasks"]]
    return {"tasks": tasks, "nextId": state["nextId"]}


def removed(state: Any, task_id: int) -> dict[str, Any]:
    """The proposal ``remove`` accepts: task ``task_id`` taken out."""
    return {"tasks": [task for task in state["tasks"] if task["id"] != task_id], "nextId": state["nextId"]}


def make_task_list(share_data_id: str = TASKS_ID, titles: tuple[str, ...] = ()) -> ShareData:
    """A task list ShareData holding one open task per title."""
    state: dict[str, Any] = {"tasks": [], "nextId": 1}
    for title in titles:
        state = added(state, title)
    return ShareData(
        share_data_id,
        current_state=state,
        functions=[ShareFunction("add", add_rule), ShareFunction("complete", complete_rule), ShareFunction("remove", remove_rule)],
    )


def app(manager: ShareDataManager) -> dict[str, Any]:
    """Register the task list on ``manager``; the server options it needs."""
    manager.add_share_data(make_task_list(titles=("Try the inspector", "Propose from the form")))
    return {"resolve_function": create_id_based_function_resolver(manager)}


# -- shape checks -----------------------------------------------------------------------------


def _tasks(state: Any) -> Optional[list[dict[str, Any]]]:
    """The task list of a well-formed state, else None (a rule then rejects)."""
    if not isinstance(state, dict) or set(state) != {"tasks", "nextId"} or type(state["nextId"]) is not int:
        return None
    tasks = state["tasks"]
    if not isinstance(tasks, list):
        return None
    for task in tasks:
        if not (
            isinstance(task, dict)
            and set(task) == {"id", "title", "done"}
            and type(task["id"]) is int
            and isinstance(task["title"], str)
            and isinstance(task["done"], bool)
        ):
            return None
    return tasks

