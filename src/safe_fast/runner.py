"""One server process of ``safe-fast serve``: built from :class:`~safe_fast.config.Settings`, run until a signal.

Theory of operation
-------------------

:func:`prepare` does everything that can fail because of a setting before
anything listens: it imports the application, opens the store, calls the
application with the manager, builds the JWT issuers and the Redis client.
A failure there is a :class:`~safe_fast.config.ConfigError` (exit status 2),
or, when something it names cannot be reached now (the store, or the app's
own connections), :class:`~safe_fast.config.TemporarilyUnavailable` (75:
starting again later may work). Whatever was opened is closed again.

:func:`start` then attaches the server, the health routes and the metrics,
and :func:`run_until_signal` waits for SIGTERM or SIGINT. The graceful
shutdown, all within ``shutdown_timeout``:

1. ``/readyz`` answers 503 (for ``shutdown_delay`` seconds the server keeps
   accepting, so load balancers see it before connections are refused);
2. the listener closes; proposals under way finish and are answered;
3. every client gets what is queued for it, then a 1001 close;
4. the Redis registry sends what it still holds, then Redis and the store
   close (what was opened is closed in the reverse order).

Exit status 0 when that finished in time, 1 when it had to drop
connections. A second signal ends the process at once (status 128 +
signal), except in a worker: its supervisor forwards the signal it got, and
a process manager may have signalled the worker too, so a worker goes on
with its graceful shutdown (the supervisor kills it if that takes too
long). A signal that arrives while the process is still starting stops the
start, closes what was opened and exits 0. A worker also stops when its
supervisor goes away (on Linux the kernel sends it SIGTERM then).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import logging
import os
import signal
import socket
import sqlite3
import ssl as ssl_module
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional

from .config import ConfigError, Settings, TemporarilyUnavailable, mask_url
from .health import Readiness
from .registry import InMemoryChannelRegistry
from .replay import InMemoryReplayStore
from .server import RealtimeServer, attach_realtime_server, create_id_based_function_resolver
from .sharedata import ShareDataManager

__all__ = ["App", "HOOKS", "load_app", "prepare", "start", "run_until_signal", "serve"]

logger = logging.getLogger("safe_fast.serve")

HOOKS = ("authenticate", "authorize_subscribe", "authorize_propose", "resolve_function")
"""What an application may return (as a mapping or as attributes)."""

App = Callable[[ShareDataManager], Any]
"""``app(manager)``, plain or ``async``: registers the ShareData, may return hooks."""


def load_app(spec: str) -> App:
    """The callable named by ``module:attribute`` (the working directory is importable, as with uvicorn)."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("app", f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError("app", f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError("app", f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ConfigError("app", f"{spec} is not callable (it must be a function taking the ShareDataManager)")
    return target


async def open_manager(
    store_url: str, closers: list[Callable[[], Awaitable[Any]]], source: str = ""
) -> ShareDataManager:
    """The manager for ``store_url``: ``memory://`` keeps ShareData in this process only (and
    the app may use the synchronous methods); any other opens that store (docs/store.md)."""
    if store_url.partition("://")[0].lower() == "memory":
        return ShareDataManager()
    from .store import StoreError, StoreUnavailable, open_store

    store = open_store(store_url)
    try:
        await store.open()
    except StoreError as exc:
        if isinstance(exc, StoreUnavailable) and _passing(exc):
            raise TemporarilyUnavailable("store_url", str(exc), source) from None
        raise ConfigError("store_url", str(exc), source) from None
    manager = ShareDataManager(store=store)

    async def close_store() -> None:
        manager.close()
        await store.close()

    closers.append(close_store)
    return manager


_PASSING_ERRNOS = frozenset(
    (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)
)
# asyncpg's refusals that mean "not now" (a database starting up, its connections all taken).
_PASSING_ERROR_NAMES = frozenset(("CannotConnectNowError", "TooManyConnectionsError"))


def _passing(error: Optional[BaseException]) -> bool:
    """Whether ``error`` is a failure to reach something that may answer later.

    A connection refused, reset or timed out, a name the resolver could not
    look up just now, a database starting up or full, an SQLite file locked
    by another writer. Not: a wrong password or database name, a missing
    directory, a permission: starting again would only fail again.
    """
    for _ in range(8):  # the error, then what it was raised from (a StoreUnavailable's cause)
        if error is None:
            return False
        if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
            return True
        if isinstance(error, socket.gaierror):
            return error.errno == socket.EAI_AGAIN
        if isinstance(error, OSError) and error.errno in _PASSING_ERRNOS:
            return True
        if type(error).__name__ in _PASSING_ERROR_NAMES:
            return True
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return True
        error = error.__cause__
    return False


def _hooks_of(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, Mapping):
        unknown = sorted(set(result) - set(HOOKS))
        if unknown:
            raise ConfigError("app", f"returned unknown hook {unknown[0]!r} (known: {', '.join(HOOKS)})")
        hooks = dict(result)
    else:
        hooks = {name: getattr(result, name) for name in HOOKS if getattr(result, name, None) is not None}
        if not hooks:
            raise ConfigError(
                "app", f"returned a {type(result).__name__}; return None or a mapping of hooks ({', '.join(HOOKS)})"
            )
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise ConfigError("app", f"hook {name} is not callable")
    return {name: hook for name, hook in hooks.items() if hook is not None}


@dataclass
class Prepared:
    """What :func:`prepare` built; nothing listens yet."""

    settings: Settings
    manager: ShareDataManager
    hooks: dict[str, Any]
    redis: Any = None
    ssl: Optional[ssl_module.SSLContext] = None
    issuers: Any = None
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


def _issuers(settings: Settings) -> Any:
    from .issuers import build_issuer_authenticate

    return build_issuer_authenticate(
        settings.jwt_issuers,
        audience=settings.jwt_audience,
        leeway=settings.jwt_leeway,
        require_exp=settings.jwt_require_exp,
    )


def check_without_starting(settings: Settings) -> None:
    """What ``safe-fast config`` checks without calling the app or the network.

    The app's import, the issuers' key files and secret variables, the certificate.
    """
    load_app(settings.app)
    if settings.jwt_issuers:
        _issuers(settings)
    if settings.ssl_certfile:
        _server_ssl_context(settings)


async def prepare(settings: Settings) -> Prepared:
    """Import and call the application, open the store, Redis and the issuers; ConfigError if any is wrong."""
    app = load_app(settings.app)
    closers: list[Callable[[], Awaitable[Any]]] = []
    manager = await open_manager(settings.store_url, closers, settings.sources.get("store_url", ""))
    try:
        return await _prepare_app(settings, app, manager, closers)
    except BaseException:
        await close_all(closers)
        raise


async def close_all(closers: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run ``closers`` newest first (what was opened last closes first), each failure only logged."""
    for close in reversed(closers):
        try:
            await close()
        except Exception as exc:
            logger.warning("closing %s failed: %r", getattr(close, "__qualname__", close), exc)


async def _prepare_app(
    settings: Settings, app: App, manager: ShareDataManager, closers: list[Callable[[], Awaitable[Any]]]
) -> Prepared:
    try:
        result = app(manager)
        if inspect.isawaitable(result):
            result = await result
    except ConfigError:
        raise
    except Exception as exc:
        if not _passing(exc):
            raise ConfigError("app", f"{settings.app} raised {type(exc).__name__}: {exc}") from None
        # A connection of the app's own: it may well work on the next start.
        raise TemporarilyUnavailable("app", f"{settings.app} raised {type(exc).__name__}: {exc}") from None
    hooks = _hooks_of(result)
    prepared = Prepared(settings, manager, hooks, closers=closers)
    if settings.jwt_issuers:
        if "authenticate" in hooks:
            raise ConfigError(
                "jwt_issuers",
                "the app returns its own authenticate hook; configure JWT issuers or return authenticate, not both",
                settings.issuers_source,
            )
        hooks["authenticate"] = prepared.issuers = _issuers(settings)
    elif "authenticate" not in hooks:
        raise ConfigError(
            "jwt_issuers",
            "nothing authenticates connections: configure jwt_issuers or have the app return an authenticate hook",
        )
    hooks.setdefault("resolve_function", create_id_based_function_resolver(manager))
    if settings.ssl_certfile:
        prepared.ssl = _server_ssl_context(settings)
    if settings.redis_url:
        try:
            import redis.asyncio as redis_asyncio
        except ImportError:
            raise ConfigError(
                "redis_url", "needs the redis package: pip install 'safe-fast[redis]'", settings.sources["redis_url"]
            ) from None
        try:
            prepared.redis = redis_asyncio.from_url(settings.redis_url)
        except ValueError as exc:
            raise ConfigError("redis_url", str(exc), settings.sources["redis_url"]) from None
    return prepared


def _server_ssl_context(settings: Settings) -> ssl_module.SSLContext:
    for key in ("ssl_certfile", "ssl_keyfile"):
        if not os.access(settings.values[key], os.R_OK):
            raise ConfigError(key, f"cannot read {settings.values[key]}", settings.sources[key])
    context = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (OSError, ssl_module.SSLError) as exc:
        raise ConfigError(
            "ssl_certfile", f"cannot load the certificate and key: {exc}", settings.sources["ssl_certfile"]
        ) from None
    return context


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, for one of several workers."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def server_options(settings: Settings) -> dict[str, Any]:
    """The ``attach_realtime_server`` keywords that come straight from settings (0 or empty: the server's off)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "path": settings.path,
        "backlog": settings.backlog,
        "max_buffered_bytes": settings.max_buffered_bytes,
        "heartbeat_interval": settings.heartbeat_interval or None,
        "max_message_size": settings.max_message_size,
        "close_on_token_expiry": settings.close_on_token_expiry,
        "close_timeout": settings.close_timeout,
        "replay_timeout": settings.replay_timeout,
        "inspector": settings.inspector,
        "allowed_origins": settings.allowed_origins or None,
        "max_messages_per_second": settings.message_rate_limit or None,
        "message_burst": settings.message_burst,
        "max_connections_per_address": settings.max_connections_per_address or None,
        "trusted_proxies": settings.trusted_proxies,
    }


@dataclass
class Running:
    server: RealtimeServer
    readiness: Readiness
    prepared: Prepared
    metrics: Any = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


async def start(prepared: Prepared, *, reuse_port: bool = False) -> Running:
    """Attach the server with its health and metrics routes; ready once the first checks pass."""
    settings = prepared.settings
    registry: Any
    replay_store: Any
    checks: dict[str, Callable[[], Awaitable[Any]]] = {}
    if prepared.redis is not None:
        from .scaleout import RedisChannelRegistry, RedisReplayStore

        registry = RedisChannelRegistry(prepared.redis)
        replay_store = RedisReplayStore(prepared.redis, settings.replay_buffer_size)
        checks["redis"] = prepared.redis.ping
        # Closed newest first: the registry sends what it holds, then the client closes.
        prepared.closers.append(prepared.redis.aclose if hasattr(prepared.redis, "aclose") else prepared.redis.close)
        prepared.closers.append(registry.close)
    else:
        registry = InMemoryChannelRegistry()
        replay_store = InMemoryReplayStore(settings.replay_buffer_size)
    if prepared.manager.store is not None:
        # The stored history is the replay window: it survives restarts and is the same on every node.
        from .store.history import HistoryReplayStore

        replay_store = HistoryReplayStore(prepared.manager, settings.replay_buffer_size)
    if prepared.issuers is not None:
        await prepared.issuers.refresh_all()
    sock = reuse_port_socket(settings.host, settings.port) if reuse_port else None
    server = await attach_realtime_server(
        manager=prepared.manager,
        sock=sock,
        registry=registry,
        replay_store=replay_store,
        ssl=prepared.ssl,
        **server_options(settings),
        **prepared.hooks,
    )
    readiness = Readiness(checks).install(server)
    running = Running(server, readiness, prepared)
    try:
        if prepared.issuers is not None:
            running.tasks.extend(prepared.issuers.start_periodic_refresh())
        if settings.metrics:
            from .metrics import ServerMetrics

            running.metrics = ServerMetrics().install(server)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                # Another worker may answer the scrape: keep this one's gauges current.
                running.tasks.append(asyncio.ensure_future(_refresh_every(running.metrics.refresh, 1.0)))
        await readiness.check_now()
        readiness.accepting = True
        readiness.start()
    except BaseException:
        for task in running.tasks:
            task.cancel()
        await readiness.close()
        await server.close(timeout=1.0)
        raise
    return running


async def _refresh_every(refresh: Callable[[], None], interval: float) -> None:
    while True:
        refresh()
        await asyncio.sleep(interval)


async def shutdown(running: Running, timeout: float) -> bool:
    """The graceful shutdown (see the module docstring); True when it finished in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settings = running.prepared.settings
    running.readiness.stop_accepting()
    delay = min(settings.shutdown_delay, max(0.0, timeout - 1.0))
    if delay > 0:
        logger.info("shutting down: /readyz answers 503; closing in %gs", delay)
        await asyncio.sleep(delay)
    connections = len(running.server.connections)
    logger.info("shutting down: closing %d connection(s)", connections)
    await running.server.close(timeout=max(0.0, deadline - loop.time()))
    clean = not running.server.connections
    for task in running.tasks:
        task.cancel()
    await running.readiness.close()
    for close in reversed(running.prepared.closers):
        try:
            await asyncio.wait_for(close(), max(0.1, deadline - loop.time()))
        except Exception as exc:
            clean = False
            logger.warning("shutting down: %s failed: %r", getattr(close, "__qualname__", close), exc)
    if loop.time() > deadline:
        clean = False
    return clean


class _StopSignals:
    """SIGTERM/SIGINT (and, for a worker, its supervisor going away) set :attr:`stop`.

    A second signal ends the process at once, except in a worker (see the
    module docstring).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, watch_parent: Optional[int]) -> None:
        self.stop = asyncio.Event()
        self.received: list[int] = []
        self._loop = loop
        self._worker = watch_parent is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._watcher: Optional[asyncio.Task[None]] = None
        if watch_parent is not None:
            _die_with_parent()
            self._watcher = asyncio.ensure_future(_watch_parent(watch_parent, self.stop))

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.received:
            if self._worker:
                logger.info("%s again: already shutting down", name)
                return
            logger.warning("second signal (%s): exiting now", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received.append(signum)
        logger.info("received %s: shutting down gracefully", name)
        self.stop.set()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(signum)
            if self._worker and self.received:
                # Shut down already: the signal the supervisor forwards may
                # still be on its way, and must not turn a clean exit into a kill.
                signal.signal(signum, signal.SIG_IGN)


async def run_until_signal(running: Running, *, watch_parent: Optional[int] = None) -> int:
    """Serve until SIGTERM/SIGINT (or the supervisor ``watch_parent`` goes away); the exit status."""
    signals = _StopSignals(asyncio.get_running_loop(), watch_parent)
    try:
        return await _serve_until_stopped(running, signals)
    finally:
        signals.close()


async def _serve_until_stopped(running: Running, signals: _StopSignals) -> int:
    await signals.stop.wait()
    timeout = running.prepared.settings.shutdown_timeout
    if not await shutdown(running, timeout):
        logger.warning("shutdown did not finish cleanly within %gs", timeout)
        return 1
    logger.info("stopped")
    return 0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died shuts down (it would otherwise hold the port forever)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logger.warning("the supervisor (pid %d) is gone: shutting down", parent)
    stop.set()


def _die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``).

    :func:`_watch_parent` covers the other systems, within a second.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("PR_SET_PDEATHSIG is not available", exc_info=True)


async def _prepare_and_start(settings: Settings, reuse_port: bool) -> Running:
    prepared = await prepare(settings)
    try:
        return await start(prepared, reuse_port=reuse_port)
    except BaseException as exc:
        await close_all(prepared.closers)
        if isinstance(exc, socket.gaierror):
            raise ConfigError("host", f"cannot resolve {settings.host!r}: {exc.strerror or exc}") from None
        if isinstance(exc, OSError):
            raise ConfigError(
                "port", f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        raise


async def serve(settings: Settings, *, reuse_port: bool = False, watch_parent: Optional[int] = None) -> int:
    """Prepare, start and run one server process; ConfigError before anything listens.

    The signals are taken from the start: one that arrives while the server
    is still starting stops the start and closes what it opened (status 0).
    """
    signals = _StopSignals(asyncio.get_running_loop(), watch_parent)
    try:
        starting = asyncio.ensure_future(_prepare_and_start(settings, reuse_port))
        stopping = asyncio.ensure_future(signals.stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            logger.info("stopped before serving")
            return 0
        running = starting.result()
        server = running.server
        logger.info(
            "safe-fast serving %s on %s (pid %d, %s)",
            settings.app,
            server.url,
            os.getpid(),
            "redis " + mask_url(settings.redis_url) if settings.redis_url else "in-memory fan-out",
        )
        return await _serve_until_stopped(running, signals)
    finally:
        signals.close()
