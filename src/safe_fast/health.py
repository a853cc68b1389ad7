"""Liveness and readiness over HTTP: ``GET /healthz`` and ``GET /readyz``.

``/healthz`` answers 200 while the process runs its event loop: a probe that
gets no answer means the process is stuck or gone.

``/readyz`` answers 200 only while the server accepts connections and every
dependency check passed on its last run; otherwise 503 with a JSON body
naming why, e.g. ``{"status": "unavailable", "reasons": {"redis": "ConnectionError: ..."}}``.
The HTTP handlers are synchronous (picows' upgrade path is), so the checks
(``safe-fast serve`` passes one: a Redis ``PING``) run in a background task every
``interval`` seconds, each bounded by ``timeout``, and the handler reads
their last result. A graceful shutdown calls :meth:`Readiness.stop_accepting`
first, so load balancers stop sending clients before any is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable, Optional

import orjson

from .server.http import HttpResponse

__all__ = ["Readiness", "HealthCheck"]

logger = logging.getLogger("safe_fast.health")

HealthCheck = Callable[[], Awaitable[Any]]
"""A dependency check: returns when the dependency answers, raises otherwise."""

_JSON = "application/json"


class Readiness:
    """The answer of ``/readyz``, kept current by a background task."""

    def __init__(
        self, checks: Optional[dict[str, HealthCheck]] = None, *, interval: float = 1.0, timeout: float = 2.0
    ) -> None:
        self.checks = dict(checks or {})
        self.interval = interval
        self.timeout = timeout
        self.accepting = False
        # name -> why it failed on its last run; "not checked yet" until then.
        self.failures: dict[str, str] = {name: "not checked yet" for name in self.checks}
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def ready(self) -> bool:
        return self.accepting and not self.failures

    def reasons(self) -> dict[str, str]:
        reasons = dict(self.failures)
        if not self.accepting:
            reasons["server"] = "not accepting connections"
        return reasons

    async def check_now(self) -> None:
        """Run every check once (concurrently) and keep the results."""
        if not self.checks:
            return
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[name]) for name in names))
        failures = {name: why for name, why in zip(names, results) if why is not None}
        for name in failures.keys() - self.failures.keys():
            logger.warning("readiness: %s is failing: %s", name, failures[name])
        for name in self.failures.keys() - failures.keys():
            logger.info("readiness: %s answers again", name)
        self.failures = failures

    async def _run(self, check: HealthCheck) -> Optional[str]:
        try:
            await asyncio.wait_for(check(), self.timeout)
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = str(exc)
            return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
        return None

    def start(self) -> None:
        """Check every ``interval`` seconds from now on."""
        if self._task is None and self.checks:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken check must not stop the others
                logger.exception("readiness checks failed")
            await asyncio.sleep(self.interval)

    def stop_accepting(self) -> None:
        self.accepting = False

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # the HTTP handlers

    @staticmethod
    def healthz(request: Any) -> HttpResponse:
        return HttpResponse(200, b'{"status":"ok"}', _JSON)

    def readyz(self, request: Any) -> HttpResponse:
        if self.ready:
            return HttpResponse(200, b'{"status":"ready"}', _JSON)
        body = orjson.dumps({"status": "unavailable", "reasons": self.reasons()})
        return HttpResponse(503, body, _JSON)

    def install(self, server: Any) -> "Readiness":
        """Answer ``/healthz`` and ``/readyz`` on ``server``'s port."""
        server.add_http_route("/healthz", self.healthz)
        server.add_http_route("/readyz", self.readyz)
        return self
