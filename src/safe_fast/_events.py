"""A small event emitter shared by the model, the server and the client.

Listeners may be plain functions or coroutine functions. A listener that
raises (or whose coroutine raises) is logged and never disturbs the emitter
or the other listeners: observability must not be able to break delivery.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Any, Callable, Optional

__all__ = ["EventEmitter", "Listener"]

logger = logging.getLogger("safe_fast")

Listener = Callable[..., Any]


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("async event listener failed", exc_info=task.exception())


class EventEmitter:
    """``on`` / ``off`` / ``emit`` with isolated, possibly async, listeners.

    With ``in_order=True``, an event emitted by a listener while another
    event is being delivered waits until that delivery has reached every
    listener: all listeners then see events in the order they happened.
    (Without it, a listener that, say, removes a ShareData in reaction to a
    transaction would make the listeners after it see the removal before
    the transaction.)
    """

    __slots__ = ("_listeners", "_backlog", "_delivering")

    def __init__(self, *, in_order: bool = False) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        # None: deliver nested events at once; else the events waiting for
        # the delivery under way (empty when none is).
        self._backlog: Optional[deque[tuple[str, tuple[Any, ...]]]] = deque() if in_order else None
        self._delivering = False

    def on(self, event: str, listener: Listener) -> Listener:
        """Register *listener* for *event*; returns it, so it can decorate."""
        self._listeners.setdefault(event, []).append(listener)
        return listener

    def off(self, event: str, listener: Listener) -> None:
        """Remove one registration of *listener*; unknown ones are ignored."""
        listeners = self._listeners.get(event)
        if listeners and listener in listeners:
            listeners.remove(listener)

    def has_listeners(self, event: str) -> bool:
        return bool(self._listeners.get(event))

    def emit(self, event: str, *args: Any) -> None:
        backlog = self._backlog
        if backlog is None:
            self._deliver(event, args)
            return
        backlog.append((event, args))
        if self._delivering:
            return  # the delivery under way takes it next
        self._delivering = True
        escaped: Optional[BaseException] = None
        try:
            while backlog:
                try:
                    self._deliver(*backlog.popleft())
                except BaseException as exc:
                    # Past the listeners' isolation (not an Exception): what
                    # is queued still happened, so it is delivered first.
                    if escaped is None:
                        escaped = exc
        finally:
            self._delivering = False
        if escaped is not None:
            raise escaped

    def _deliver(self, event: str, args: tuple[Any, ...]) -> None:
        listeners = self._listeners.get(event)
        if not listeners:
            return
        # Copy: a listener may call on/off while we iterate.
        for listener in tuple(listeners):
            try:
                result = listener(*args)
            except Exception:
                logger.exception("listener for %r raised", event)
                continue
            if result is not None and inspect.isawaitable(result):
                try:
                    task = asyncio.ensure_future(result)
                except RuntimeError:
                    # No running loop: nothing can await it; close it quietly.
                    if inspect.iscoroutine(result):
                        result.close()
                    logger.error("async listener for %r needs a running event loop", event)
                    continue
                task.add_done_callback(_log_task_failure)
