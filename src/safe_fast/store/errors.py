"""The errors a ShareData store raises."""

from __future__ import annotations

__all__ = ["StoreError", "StoreUnavailable", "CorruptShareData", "SchemaVersionError"]


class StoreError(Exception):
    """A store could not do what was asked; nothing is assumed recorded."""


class StoreUnavailable(StoreError, ConnectionError):
    """The database cannot be reached (at start-up or since)."""


class CorruptShareData(StoreError, ValueError):
    """What the store holds for an id does not decode or its chain does not verify.

    ``share_data_id`` names the id; the data is not trusted.
    """

    def __init__(self, share_data_id: str, problem: str) -> None:
        super().__init__(f"ShareData {share_data_id!r} in the store is corrupt: {problem}")
        self.share_data_id = share_data_id
        self.problem = problem


class SchemaVersionError(StoreError):
    """The database was written by a newer version of the layout than this code knows."""
