"""The listening socket: how many connections may wait, and what the server says when it cannot take them.

Theory of operation
-------------------

**Backlog.** When many clients connect at once, the kernel queues the
completed TCP handshakes until the event loop accepts them. The queue holds
``listen()``'s backlog; past it, the kernel drops the client's handshake and
the client retries only after a SYN timeout (1 s, then 3 s, ...), so an
overflow turns a burst of a few seconds into tens of seconds. asyncio and
uvloop both listen with 100. The server asks for the system's own limit
(``net.core.somaxconn``; the kernel caps any larger value to it anyway), and
passes it to the event loop, which calls ``listen()`` with it also for a
socket given as ``sock=`` (uvloop listens again on such a socket).

**Out of descriptors.** Each connection holds a file descriptor. When the
process has none left, ``accept()`` fails with EMFILE (ENFILE: the system
has none). The event loops deal with that differently, and neither tells the
application in a way it would notice:

* asyncio's loop stops accepting for one second and reports
  ``socket.accept() out of system resource`` to the loop's exception
  handler, once per attempt. The clients wait in the backlog.
* uvloop (libuv) reports nothing: it frees a descriptor it keeps in reserve
  for this, accepts every waiting connection and closes it at once, and
  takes the reserve back. Those clients see their connection closed during
  the upgrade.

So the server watches for both. On asyncio's loop it takes the loop's
accept reports for its own listening socket; on any loop, every request it
receives first checks that one more descriptor could be opened (a ``dup``
of the listening socket, closed at once: the process is full exactly when
that fails, and then every new connection is refused). Either way
:class:`AcceptFailureLog` writes one warning, and after it at most one per
``interval`` seconds, with the number of failures since the previous one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Callable, Optional

try:
    import resource
except ImportError:  # Windows has no resource module
    resource = None  # type: ignore[assignment]

__all__ = ["FALLBACK_BACKLOG", "system_backlog", "resolve_backlog", "AcceptFailureLog"]

FALLBACK_BACKLOG = 4096
"""The backlog where the system does not say its own (Linux's default ``somaxconn`` since 5.4)."""

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
# What asyncio's loop reports as "out of system resource" on accept.
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def system_backlog(path: str = SOMAXCONN_PATH) -> int:
    """The system's largest listen backlog (``somaxconn``), or :data:`FALLBACK_BACKLOG` where unknown."""
    try:
        with open(path, "rb") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def resolve_backlog(backlog: Optional[int]) -> int:
    """The backlog to listen with: ``backlog`` checked, or the system's when it is None."""
    if backlog is None:
        return system_backlog()
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
        raise ValueError(f"backlog must be a positive int or None, not {backlog!r}")
    return backlog


def _nofile_limit() -> Optional[int]:
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class AcceptFailureLog:
    """Says, rate-limited, that connections cannot be accepted for lack of descriptors.

    ``open_connections()`` gives the count the warning quotes. The first
    failure is logged at once; later ones are counted and logged together at
    most once per ``interval`` seconds (a timer logs the count of a window
    that ends quietly).
    """

    def __init__(
        self,
        logger: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        open_connections: Callable[[], int],
        *,
        interval: float = 10.0,
    ) -> None:
        self.logger = logger
        self.loop = loop
        self.open_connections = open_connections
        self.interval = interval
        self.failures = 0
        """Failures seen since the server started."""
        self._unreported = 0
        self._last_error = 0
        self._window_end = float("-inf")
        self._flush: Optional[asyncio.TimerHandle] = None
        self._listen_fd = -1
        self._previous_handler: Any = None
        self._installed: Optional[Callable[..., None]] = None

    # sources

    def watch(self, listen_fd: int) -> None:
        """Watch the listening socket ``listen_fd``; on asyncio's loop, take its accept reports too."""
        self._listen_fd = listen_fd
        # uvloop reports nothing there today; the handler costs nothing when it stays silent.
        self._previous_handler = self.loop.get_exception_handler()
        self._installed = self._on_loop_exception
        self.loop.set_exception_handler(self._installed)

    def check_descriptors(self) -> None:
        """Count a failure when not one more descriptor can be opened (then no accept can succeed)."""
        if self._listen_fd < 0:
            return
        try:
            os.close(os.dup(self._listen_fd))
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self.failed(exc.errno)

    def close(self) -> None:
        """Stop watching; give back the loop's exception handler if it is still ours."""
        self._listen_fd = -1
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._installed is not None:
            if self.loop.get_exception_handler() is self._installed:
                self.loop.set_exception_handler(self._previous_handler)
            self._installed = None

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        if (
            self._listen_fd >= 0
            and isinstance(exc, OSError)
            and exc.errno in _ACCEPT_RESOURCE_ERRORS
            and sock is not None
            and getattr(sock, "fileno", lambda: -1)() == self._listen_fd
        ):
            self.failed(exc.errno)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # the log

    def failed(self, code: int) -> None:
        """One failure to accept (or to be able to accept), with its errno."""
        self.failures += 1
        self._last_error = code
        now = self.loop.time()
        if now >= self._window_end:
            self._window_end = now + self.interval
            self._log(1, first=True)
            return
        self._unreported += 1
        if self._flush is None:
            self._flush = self.loop.call_at(self._window_end, self._report_window)

    def _report_window(self) -> None:
        self._flush = None
        if self._unreported:
            count, self._unreported = self._unreported, 0
            self._window_end = self.loop.time() + self.interval
            self._log(count, first=False)

    def _log(self, count: int, *, first: bool) -> None:
        code = self._last_error
        name = errno.errorcode.get(code, str(code))
        if code == errno.EMFILE:
            limit = _nofile_limit()
            cause = f"{name}: the process has no file descriptor left"
            if limit is not None:
                cause += f", RLIMIT_NOFILE soft limit {limit}"
        elif code == errno.ENFILE:
            cause = f"{name}: the system has no file descriptor left"
        else:
            cause = f"{name}: out of system resources"
        repeated = "" if first else f"; {count} more failure{'s' if count != 1 else ''} in the last {self.interval:g} s"
        self.logger.warning(
            "cannot accept new connections (%s)%s; %d connections open, new ones are refused until some close",
            cause,
            repeated,
            self.open_connections(),
        )
