"""Prometheus metrics of a running server, served at ``GET /metrics``.

Theory of operation
-------------------

:class:`ServerMetrics` holds the series (listed in docs/deploy.md) and
:meth:`ServerMetrics.install` wires them to a
:class:`~safe_fast.server.RealtimeServer` through what the server already
reports, so nothing here runs per delivery:

* the server's events: ``connection:opened`` / ``connection:closed`` (the
  connection gauge, closes by code), ``connection:overflow``,
  ``replay:write-failed``, ``replay:timeout``;
* the manager's events: one broadcast per transaction, update or removal
  made on this node (one another node made, which its manager learns from
  the shared store, that node broadcasts);
* the registry's ``fanout_observer``: called once per fan-out with the
  number of subscribers reached, so a broadcast to 1,000 subscribers costs
  the same as one to a single subscriber;
* the hub's ``propose_observer`` (outcome and duration of each proposal) and
  ``send_observer`` (bytes of frames sent to one connection);
* a thin wrapper around the replay store's ``entries_since`` (replayed or
  not found);
* the Redis registry's ``on_error`` (wrapped, so its log line stays).

The broadcast path only adds to plain integers (broadcasts, deliveries,
bytes); they are moved into the Prometheus counters when scraped (and every
second with several workers), as is the subscription gauge (a sum over the
open connections). So the fan-out never takes prometheus-client's locks.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set, as
``safe-fast serve --workers N`` does), prometheus-client keeps each
process's values in a shared directory and any worker's ``/metrics``
answers for all of them: counters summed, gauges summed over live workers.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .server.http import HttpResponse

__all__ = ["ServerMetrics", "PROPOSE_BUCKETS"]

PROPOSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Histogram buckets of ``safe_fast_propose_seconds``: a rule is usually sub-millisecond."""


def _multiprocess_dir() -> Optional[str]:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class ServerMetrics:
    """The safe_fast series in their own ``CollectorRegistry`` (or the multiprocess directory)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, labels, registry=registry)

        def gauge(name: str, documentation: str) -> Gauge:
            # Summed over the live workers when there are several.
            return Gauge(name, documentation, registry=registry, multiprocess_mode="livesum")

        self.connections = gauge("safe_fast_connections", "Open WebSocket connections.")
        self.subscriptions = gauge("safe_fast_subscriptions", "Subscriptions of the open connections.")
        self.connections_closed = counter(
            "safe_fast_connections_closed", "Connections closed, by WebSocket close code.", "code"
        )
        self.broadcasts = counter(
            "safe_fast_broadcasts", "Broadcasts issued by this server (one per change of a ShareData)."
        )
        self.deliveries = counter(
            "safe_fast_deliveries", "Broadcast frames queued to subscribers (one per subscriber reached)."
        )
        self.bytes_sent = counter("safe_fast_bytes_sent", "Bytes of WebSocket data frames queued to clients.")
        self.overflow_closes = counter("safe_fast_overflow_closes", "Connections closed with 4001 for falling behind.")
        self.replay_requests = counter(
            "safe_fast_replay_requests", "Subscribes with a resume cursor, by outcome.", "outcome"
        )
        self.proposals = counter("safe_fast_proposals", "Proposals answered, by outcome.", "outcome")
        self.propose_seconds = Histogram(
            "safe_fast_propose_seconds",
            "Time from a proposal's turn to its answer.",
            buckets=PROPOSE_BUCKETS,
            registry=registry,
        )
        self.redis_errors = counter("safe_fast_redis_errors", "Failures reported by the Redis channel registry.")
        self.replay_write_failures = counter("safe_fast_replay_write_failures", "Replay-store writes that failed.")
        self.replay_timeouts = counter(
            "safe_fast_replay_timeouts", "Resuming subscribes answered without replay: the replay store was too slow."
        )
        self.rate_limited = counter(
            "safe_fast_rate_limited", "Connections closed (1008) for sending messages too fast."
        )
        self.admission_refusals = counter(
            "safe_fast_admission_refusals", "Connections refused by the admission controls, by reason.", "reason"
        )
        # Every labelled series exists from the start (a rate over a series
        # that appears late misses its first increments).
        for outcome in ("replayed", "not_found"):
            self.replay_requests.labels(outcome)
        for outcome in ("accepted", "rejected", "error"):
            self.proposals.labels(outcome)
        for reason in ("origin", "address_cap"):
            self.admission_refusals.labels(reason)
        self._server: Any = None
        # Counted on the broadcast path, moved into the counters by refresh().
        self._broadcasts = 0
        self._deliveries = 0
        self._bytes = 0
        self._observe_propose = self.propose_seconds.observe
        self._proposal_outcomes = {
            outcome: self.proposals.labels(outcome).inc for outcome in ("accepted", "rejected", "error")
        }

    # wiring

    def install(self, server: Any) -> "ServerMetrics":
        """Count what ``server`` does from now on, and answer ``GET /metrics`` on its port."""
        self._server = server
        hub = server._hub
        server.on("connection:opened", self._opened)
        server.on("connection:closed", self._closed)
        server.on("connection:overflow", lambda event: self.overflow_closes.inc())
        server.on("replay:write-failed", lambda event: self.replay_write_failures.inc())
        server.on("replay:timeout", lambda event: self.replay_timeouts.inc())
        server.on("connection:rate-limited", lambda event: self.rate_limited.inc())
        server.on("connection:refused", lambda event: self.admission_refusals.labels(event.reason).inc())
        for event in ("share-data:transaction", "share-data:updated", "share-data:removed"):
            server.manager.on(event, self._broadcast)
        server.registry.fanout_observer = self._fanned_out
        hub.propose_observer = self._proposed
        hub.send_observer = self._sent
        hub.replay_store = _CountingReplayStore(hub.replay_store, self.replay_requests)
        on_error = getattr(server.registry, "on_error", None)
        if on_error is not None:
            server.registry.on_error = self._redis_error_counter(on_error)
        server.add_http_route("/metrics", self.handle)
        return self

    def _opened(self, event: Any) -> None:
        self.connections.inc()

    def _closed(self, event: Any) -> None:
        self.connections.dec()
        self.connections_closed.labels(str(event.code)).inc()

    def _broadcast(self, event: Any) -> None:
        if not getattr(event, "remote", False):
            self._broadcasts += 1

    def _fanned_out(self, deliveries: int, frame_bytes: int) -> None:
        self._deliveries += deliveries
        self._bytes += deliveries * frame_bytes

    def _sent(self, frame_bytes: int) -> None:
        self._bytes += frame_bytes

    def _proposed(self, outcome: str, seconds: float) -> None:
        self._proposal_outcomes[outcome]()
        self._observe_propose(seconds)

    def _redis_error_counter(self, on_error: Callable[[BaseException], Any]) -> Callable[[BaseException], Any]:
        def counted(error: BaseException) -> Any:
            self.redis_errors.inc()
            return on_error(error)

        return counted

    # exposition

    def refresh(self) -> None:
        """Move what the broadcast path counted into the counters; bring the gauges up to date."""
        broadcasts, deliveries, sent = self._broadcasts, self._deliveries, self._bytes
        self._broadcasts = self._deliveries = self._bytes = 0
        if broadcasts:
            self.broadcasts.inc(broadcasts)
        if deliveries:
            self.deliveries.inc(deliveries)
        if sent:
            self.bytes_sent.inc(sent)
        server = self._server
        if server is not None:
            self.subscriptions.set(
                sum(len(connection.subscriptions) for connection in server._hub.connections.values())
            )

    def render(self) -> bytes:
        """The Prometheus text exposition of every series (of every worker, with several)."""
        self.refresh()
        directory = _multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=directory)
        return generate_latest(combined)

    def handle(self, request: Any) -> HttpResponse:
        """The ``GET /metrics`` handler."""
        return HttpResponse(200, self.render(), CONTENT_TYPE_LATEST)


class _CountingReplayStore:
    """A replay store whose ``entries_since`` answers are counted (replayed / not found)."""

    def __init__(self, store: Any, counter: Counter) -> None:
        self._store = store
        self._replayed = counter.labels("replayed").inc
        self._not_found = counter.labels("not_found").inc
        # Bound here: the broadcast path calls them, and __getattr__ is the slow way.
        self.record = store.record
        self.forget = store.forget

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def entries_since(self, share_data_id: str, since: str) -> Any:
        try:
            found = self._store.entries_since(share_data_id, since)
        except BaseException:
            self._not_found()
            raise
        if inspect.isawaitable(found):
            return self._count_later(found)
        self._count(found)
        return found

    async def _count_later(self, pending: Any) -> Any:
        try:
            found = await pending
        except BaseException:
            self._not_found()
            raise
        self._count(found)
        return found

    def _count(self, found: Any) -> None:
        (self._not_found if found is None else self._replayed)()
