"""The stored history as the replay window.

With a store behind the manager, the transaction history itself answers
``subscribe { since }``: the server reads the id from the store just before
the snapshot (see ``ServerHub.refresh``), so the manager's copy of the
history is the stored one, and the newest ``max_entries_per_share_data``
records of it are the window. Nothing is written twice, the window survives
restarts and is the same on every node, and ``record`` / ``forget`` have
nothing to do (the broadcast path stays free of database work).
"""

from __future__ import annotations

from typing import Any, Optional

from ..replay import ReplayEntry

__all__ = ["HistoryReplayStore"]


class HistoryReplayStore:
    """A :class:`~safe_fast.ReplayStore` reading the manager's (stored) transaction history."""

    def __init__(self, manager: Any, max_entries_per_share_data: int = 100) -> None:
        if isinstance(max_entries_per_share_data, bool) or not isinstance(max_entries_per_share_data, int):
            raise TypeError("max_entries_per_share_data must be an int")
        if max_entries_per_share_data < 1:
            raise ValueError("max_entries_per_share_data must be >= 1")
        self.manager = manager
        self.max_entries_per_share_data = max_entries_per_share_data

    def record(self, share_data_id: str, entry: ReplayEntry) -> None:
        """Nothing to do: the store recorded the transaction before it was announced."""

    def forget(self, share_data_id: str) -> None:
        """Nothing to do: a removed or replaced id takes its history with it."""

    def entries_since(self, share_data_id: str, since: str) -> Optional[list[ReplayEntry]]:
        """The records after ``since``; None unless ``since`` is one of the newest
        ``max_entries_per_share_data`` transaction ids (canonical decimal), or
        ``"0"`` (before the first transaction) while the window still holds the first."""
        share_data = self.manager.get_share_data_by_id(share_data_id)
        if share_data is None or not since.isdigit() or since != str(int(since)):
            return None
        history = share_data.transaction_history
        cursor = int(since)
        oldest = len(history) - self.max_entries_per_share_data + 1  # the oldest id in the window
        if not (0 if oldest <= 1 else oldest) <= cursor <= len(history):
            return None
        return [ReplayEntry(record.transaction_id, record.accepted) for record in history[cursor:]]
