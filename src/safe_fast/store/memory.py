"""``memory://``: ShareData kept in process memory, shared by the managers that use the store.

Not durable: everything is gone with the process. It keeps the same
contract as the database stores (conditional commits, incarnations,
watchers), so two managers over one ``MemoryStore`` behave as two nodes
over one database. ``ShareDataManager()`` without a store does not use it:
the manager then keeps its ShareData itself, as it always did.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from ..sharedata import GENESIS_HASH, TransactionRecord
from ._base import StoreBase
from ._codec import StoredShareData, new_incarnation

__all__ = ["MemoryStore"]


class _Entry:
    __slots__ = ("incarnation", "public_key", "state", "records")

    def __init__(self, incarnation: str, public_key: Optional[str], state: Any, records: list[TransactionRecord]):
        self.incarnation = incarnation
        self.public_key = public_key
        self.state = state
        self.records = records

    @property
    def head_hash(self) -> str:
        return self.records[-1].hash if self.records else GENESIS_HASH


class MemoryStore(StoreBase):
    """The ``memory://`` store. Records and states are kept by reference."""

    durable = False

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._entries: dict[str, _Entry] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _stored(self, share_data_id: str, entry: _Entry, after: int) -> StoredShareData:
        return StoredShareData(
            share_data_id,
            entry.incarnation,
            entry.public_key,
            entry.state,
            entry.records[after:],
            after,
            len(entry.records),
            entry.head_hash,
        )

    async def load(self, share_data_id: str) -> Optional[StoredShareData]:
        entry = self._entries.get(share_data_id)
        return None if entry is None else self._stored(share_data_id, entry, 0)

    async def create(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: Sequence[TransactionRecord] = ()
    ) -> StoredShareData:
        entry = self._entries.get(share_data_id)
        if entry is None or (history and not entry.records):
            written_over = entry is not None
            entry = self._entries[share_data_id] = _Entry(new_incarnation(), public_key, current_state, list(history))
            if written_over:
                asyncio.get_running_loop().call_soon(self._notify, share_data_id)
        return self._stored(share_data_id, entry, 0)

    async def changes_after(self, share_data_id: str, incarnation: str, after: int) -> Optional[StoredShareData]:
        entry = self._entries.get(share_data_id)
        if entry is None:
            return None
        if entry.incarnation != incarnation:
            return self._stored(share_data_id, entry, 0)
        return self._stored(share_data_id, entry, min(after, len(entry.records)))

    async def commit(
        self, share_data_id: str, incarnation: str, record: TransactionRecord, current_state: Any
    ) -> Optional[StoredShareData]:
        entry = self._entries.get(share_data_id)
        seq = int(record.transaction_id)
        if (
            entry is not None
            and entry.incarnation == incarnation
            and len(entry.records) == seq - 1
            and entry.head_hash == record.prev_hash
        ):
            entry.records.append(record)
            entry.state = current_state
            return None
        changes = await self.changes_after(share_data_id, incarnation, seq - 1)
        if changes is None:
            raise KeyError(f"shareDataId {share_data_id} not found")
        return changes

    async def replace(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: list[TransactionRecord]
    ) -> str:
        incarnation = new_incarnation()
        self._entries[share_data_id] = _Entry(incarnation, public_key, current_state, list(history))
        asyncio.get_running_loop().call_soon(self._notify, share_data_id)
        return incarnation

    async def remove(self, share_data_id: str) -> bool:
        if self._entries.pop(share_data_id, None) is None:
            return False
        asyncio.get_running_loop().call_soon(self._notify, share_data_id)
        return True
