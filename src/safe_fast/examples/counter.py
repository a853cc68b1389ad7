"""The counter: the smallest ShareData worth watching.

Its state is ``{"count": n}`` and its one function, ``increment``, accepts
exactly ``{"count": n + 1}``: a proposal made from a stale state is recorded
as rejected, so two proposers racing each other show up in the log.

``app(manager)`` registers it and returns the server options that make it
reachable over the wire: the function resolver, and an ``authenticate`` that
accepts every connection (the subject is the ``user`` query parameter), so

    safe-fast serve safe_fast.examples.counter:app

serves it as it is. A demo, not a deployment: a real application returns an
``authenticate`` that checks something, or leaves it out and configures
``jwt_issuers`` (see docs/deploy.md).
"""

from __future__ import annotations

from typing import Any

from ..server import UpgradeRequest, create_id_based_function_resolver
from ..sharedata import ShareData, ShareDataManager, ShareFunction

__all__ = ["COUNTER_ID", "counter_rule", "incremented", "make_counter", "accept_everyone", "app"]

COUNTER_ID = "counter"


def counter_rule(current: Any, proposed: Any) -> bool:
    """Accept only an increment by exactly one."""
    count = current.get("count", 0) if isinstance(current, dict) else 0
    if not isinstance(proposed, dict) or set(proposed) != {"count"}:
        return False
    return type(proposed["count"]) is int and proposed["count"] == count + 1


def incremented(state: Any) -> dict[str, int]:
    """The proposal that ``increment`` accepts from ``state``."""
    count = state.get("count", 0) if isinstance(state, dict) else 0
    return {"count": count + 1}


def make_counter(share_data_id: str = COUNTER_ID, count: int = 0) -> ShareData:
    """A fresh counter ShareData at ``count``."""
    return ShareData(share_data_id, current_state={"count": count}, functions=[ShareFunction("increment", counter_rule)])


def accept_everyone(request: UpgradeRequest) -> dict[str, str]:
    """Every connection is welcome; its subject is ``?user=`` (or ``anonymous``)."""
    return {"subject": request.query.get("user", "anonymous")}


def app(manager: ShareDataManager) -> dict[str, Any]:
    """Register the counter on ``manager``; the server options it needs."""
    manager.add_share_data(make_counter())
    return {"authenticate": accept_everyone, "resolve_function": create_id_based_function_resolver(manager)}

