"""Replay windows: what a resubscribing client can catch up on.

The window is deliberately separate from ``ShareData.transaction_history``
(unbounded, the audit chain): it is a bounded per-ShareData buffer of
``(transaction_id, accepted)`` kept by the transport so that a client
resuming with ``since=<cursor>`` gets the outcomes it missed.

The in-memory store is synchronous on purpose: the broadcast path calls
``record`` inline and schedules nothing. A store whose methods are coroutines
(for example :class:`safe_fast.scaleout.RedisReplayStore`) works too; the server
awaits them off the broadcast path.
"""

from __future__ import annotations

from typing import Any, Awaitable, NamedTuple, Protocol, Union, runtime_checkable

from ._backend import core

__all__ = ["ReplayEntry", "ReplayStore", "InMemoryReplayStore"]


class ReplayEntry(NamedTuple):
    """One retained transaction outcome."""

    transaction_id: str
    accepted: bool


@runtime_checkable
class ReplayStore(Protocol):
    """Where the replay window lives. Each method may be a coroutine."""

    def record(self, share_data_id: str, entry: ReplayEntry) -> Union[None, Awaitable[None]]:
        """Append ``entry``, evicting the oldest beyond the store's cap."""

    def entries_since(
        self, share_data_id: str, since: str
    ) -> Union[list[ReplayEntry], None, Awaitable[list[ReplayEntry] | None]]:
        """Entries strictly after ``since``; None if the cursor is not retained."""

    def forget(self, share_data_id: str) -> Union[None, Awaitable[None]]:
        """Drop the whole window of ``share_data_id``."""


class InMemoryReplayStore:
    """A bounded ring per ShareData id, in process memory (lost on restart)."""

    def __init__(self, max_entries_per_share_data: int = 100) -> None:
        if isinstance(max_entries_per_share_data, bool) or not isinstance(max_entries_per_share_data, int):
            raise TypeError("max_entries_per_share_data must be an int")
        if max_entries_per_share_data < 1:
            raise ValueError("max_entries_per_share_data must be >= 1")
        self.max_entries_per_share_data = max_entries_per_share_data
        self._rings: dict[str, Any] = {}

    def record(self, share_data_id: str, entry: ReplayEntry) -> None:
        ring = self._rings.get(share_data_id)
        if ring is None:
            ring = self._rings[share_data_id] = core.ReplayRing(self.max_entries_per_share_data)
        ring.append(entry.transaction_id, entry)

    def entries_since(self, share_data_id: str, since: str) -> list[ReplayEntry] | None:
        ring = self._rings.get(share_data_id)
        if ring is None:
            return None
        return ring.entries_since(since)

    def forget(self, share_data_id: str) -> None:
        self._rings.pop(share_data_id, None)

    def entries(self, share_data_id: str) -> list[ReplayEntry]:
        """The retained window of ``share_data_id``, oldest first."""
        ring = self._rings.get(share_data_id)
        return [] if ring is None else ring.entries()
