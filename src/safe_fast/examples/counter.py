"""The counter demo as a ``safe-fast serve`` application.

    safe-fast serve safe_fast.examples.counter:app

One ShareData, ``counter``, whose state is ``{"count": n}``, and one share
function, ``increment``, that accepts only ``{"count": n + 1}``. Every
connection is accepted (the subject is the ``user`` query parameter): a
demo, not a deployment. A real application returns an ``authenticate`` hook
that checks something, or leaves it out and configures ``jwt_issuers``.

An application is any callable taking the :class:`~safe_fast.ShareDataManager`
(plain or ``async``). It registers its ShareData and returns ``None`` or a
mapping of hooks: ``authenticate``, ``authorize_subscribe``,
``authorize_propose``, ``resolve_function`` (default: functions by id).
"""

from __future__ import annotations

from typing import Any

from .. import ShareData, ShareDataManager, ShareFunction, UpgradeRequest

__all__ = ["app", "increment_by_one"]


def increment_by_one(current: Any, proposed: Any) -> bool:
    """Accept only an increment by exactly one."""
    return isinstance(proposed, dict) and proposed.get("count") == current.get("count", 0) + 1


def accept_everyone(request: UpgradeRequest) -> dict[str, str]:
    return {"subject": request.query.get("user", "anonymous")}


def app(manager: ShareDataManager) -> dict[str, Any]:
    manager.add_share_data(
        ShareData("counter", current_state={"count": 0}, functions=[ShareFunction("increment", increment_by_one)])
    )
    return {"authenticate": accept_everyone}
