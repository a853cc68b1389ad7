"""Where ShareData lives: the store contract and its three implementations.

Theory of operation
-------------------

The store is the truth; a :class:`~safe_fast.ShareDataManager` built with
``store=`` is a cache in front of it. Per ShareData id a store holds the
current state, the whole hash-chained transaction history and an
*incarnation* token that changes whenever the id is created again or
replaced wholesale, so a cache can tell "more transactions" from "a
different history".

Every transaction is committed conditionally: the store records it only if
its history still ends where the evaluation read it (the record's
``transaction_id`` is one past the stored last id, its ``prev_hash`` is the
stored head hash, the incarnation is unchanged). A commit that loses that
race gets back what it lost to, so the caller can catch up and evaluate
again without another round trip (:mod:`safe_fast.store.replica` does that
for the manager). ``hold`` lets a caller that lost once keep other writers
of the id out while it evaluates again, so it cannot lose twice in a row to
a busy peer (PostgreSQL takes the row lock; one-process stores need no lock).

Implementations: :class:`MemoryStore` (``memory://``), :class:`SQLiteStore`
(``sqlite:///relative.db``, ``sqlite:////absolute.db``) and
:class:`PostgresStore` (``postgresql://user@host:port/dbname``, needs the
``postgres`` extra). :func:`open_store` picks one by URL.
"""

from __future__ import annotations

from typing import Any, AsyncContextManager, Optional, Protocol, Sequence, runtime_checkable

from ._base import ChangeListener
from ._codec import SCHEMA_VERSION, StoredShareData
from .errors import CorruptShareData, SchemaVersionError, StoreError, StoreUnavailable

__all__ = [
    "ShareDataStore",
    "StoredShareData",
    "StoreError",
    "StoreUnavailable",
    "CorruptShareData",
    "SchemaVersionError",
    "MemoryStore",
    "SQLiteStore",
    "PostgresStore",
    "open_store",
    "SCHEMA_VERSION",
]

@runtime_checkable
class ShareDataStore(Protocol):
    """The contract every ShareData store keeps. All I/O methods are coroutines.

    Stores are opened and closed with ``async with`` (or ``await
    store.open()`` / ``await store.close()``); ``open`` creates or checks the
    schema. Data kept by a durable store must be plain JSON (dicts with
    string keys, lists, strings, numbers, booleans, null).
    """

    url: str
    durable: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> "ShareDataStore": ...

    async def __aexit__(self, *exc_info: Any) -> None: ...

    async def load(self, share_data_id: str) -> Optional[StoredShareData]:
        """The whole stored ShareData (history verified), or None if absent."""

    async def create(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: Sequence[Any] = ()
    ) -> StoredShareData:
        """Create the id unless it exists; return what the store holds.

        With a ``history`` (the manager passes one only when the registered
        ShareData has one): the id is created with it, and it is also written
        (under a new incarnation, watchers told) over a stored id whose history
        is empty, in one step, so that no commit lands in between.
        """

    async def changes_after(
        self, share_data_id: str, incarnation: str, after: int
    ) -> Optional[StoredShareData]:
        """What the store holds beyond ``after`` transactions of ``incarnation``.

        None if the id is gone. Same incarnation: the records after
        ``after`` (``StoredShareData.after == after``); another incarnation:
        the whole ShareData (``after == 0``).
        """

    async def commit(
        self, share_data_id: str, incarnation: str, record: Any, current_state: Any
    ) -> Optional[StoredShareData]:
        """Record ``record`` and make ``current_state`` the state, conditionally.

        Returns None once committed (durably). Returns the store's changes
        after ``int(record.transaction_id) - 1`` when the history moved on
        (nothing is recorded then). Raises :exc:`KeyError` when the id is
        gone, :exc:`ValueError` for data the store cannot keep (nothing
        sent), :class:`StoreError` when the outcome could not be decided.
        """

    def hold(self, share_data_id: str) -> AsyncContextManager["ShareDataStore"]:
        """Keep other writers of ``share_data_id`` out; yields a store to use meanwhile."""

    async def replace(
        self,
        share_data_id: str,
        public_key: Optional[str],
        current_state: Any,
        history: list[Any],
    ) -> str:
        """Replace the id wholesale (created if absent); returns the new incarnation."""

    async def remove(self, share_data_id: str) -> bool:
        """Delete the id and its history; whether there was one."""

    def watch(self, listener: ChangeListener) -> None:
        """Call ``listener(share_data_id)`` when another writer replaced or removed
        an id, ``listener(None)`` when such news may have been missed."""

    def unwatch(self, listener: ChangeListener) -> None: ...


def open_store(url: str, **options: Any) -> ShareDataStore:
    """The store named by ``url`` (not yet opened: use ``async with``).

    ``memory://``, ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
    ``postgresql://user@host:port/dbname`` (also ``postgres://``). Keyword
    options go to the store's constructor.
    """
    if not isinstance(url, str):
        raise TypeError(f"store url must be a string, got {type(url).__name__}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryStore(url, **options)
    if scheme == "sqlite":
        return SQLiteStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, **options)
    raise ValueError(
        f"unsupported store url {url!r}: expected memory://, sqlite:///path.db or postgresql://user@host:port/db"
    )


from .memory import MemoryStore  # noqa: E402
from .postgres import PostgresStore  # noqa: E402
from .sqlite import SQLiteStore  # noqa: E402
