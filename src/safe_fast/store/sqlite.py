"""``sqlite:///path.db``: ShareData in an embedded, durable SQLite database.

The standard library's ``sqlite3`` on one connection owned by one dedicated
thread, so the event loop never waits on the disk. WAL journal with
``synchronous=FULL``: a transaction is on disk when ``COMMIT`` returns, and
a commit is acknowledged only then. Commits submitted while another is in
flight are written together in one transaction (group commit).

One process should write a database file: several processes on one file
stay correct (every commit is conditional, SQLite serializes writers), but
they learn of each other's replacements and removals only when they read an
id again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from ..sharedata import GENESIS_HASH, TransactionRecord
from ._base import StoreBase, not_open
from ._batch import GroupCommitter
from ._codec import SCHEMA_VERSION, StoredShareData, check_schema_version, decode_stored, encode_json, new_incarnation, record_row
from .errors import StoreError, StoreUnavailable

__all__ = ["SQLiteStore"]

Result = TypeVar("Result")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS safe_fast_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS safe_fast_share_data (
        id TEXT PRIMARY KEY,
        incarnation TEXT NOT NULL,
        public_key TEXT,
        state TEXT NOT NULL,
        last_id INTEGER NOT NULL,
        head_hash TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS safe_fast_transactions (
        share_data_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        function_id TEXT,
        proposed_data TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        timestamp REAL NOT NULL,
        proof TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (share_data_id, seq)
    )""",
)

_RECORD_COLUMNS = "seq, function_id, proposed_data, accepted, timestamp, proof, prev_hash, hash"


def _path_of(url: str) -> str:
    if not url.lower().startswith("sqlite:///"):
        raise ValueError(f"sqlite store url must be sqlite:///relative.db or sqlite:////absolute.db, got {url!r}")
    path = url[len("sqlite:///") :].partition("?")[0]
    if not path:
        raise ValueError(f"sqlite store url {url!r} names no file")
    return path


class SQLiteStore(StoreBase):
    """The SQLite store. ``busy_timeout`` (seconds) bounds a wait for another process' write lock."""

    durable = True

    def __init__(self, url: str, *, busy_timeout: float = 5.0) -> None:
        super().__init__(url)
        self.path = _path_of(url)
        self.busy_timeout = busy_timeout
        self._executor: Optional[ThreadPoolExecutor] = None
        self._connection: Optional[sqlite3.Connection] = None
        self._committer = GroupCommitter(self._commit_batch, f"SQLiteStore committer {self.path}")

    # -- the thread ------------------------------------------------------------------

    async def _call(self, function: Callable[..., Result], *args: Any) -> Result:
        if self._executor is None:
            raise not_open(self)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"SQLite database {self.path}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None and threading.current_thread().name.startswith("safe_fast-sqlite")
        return self._connection

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safe_fast-sqlite")
        try:
            await self._call(self._open_sync)
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False)
            raise

    def _open_sync(self) -> None:
        path = Path(self.path)
        if self.path != ":memory:" and not path.parent.is_dir():
            raise sqlite3.OperationalError(f"directory {str(path.parent)!r} does not exist")
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=True)
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal" and self.path != ":memory:":
                raise sqlite3.OperationalError(f"cannot switch to WAL journal mode (got {mode})")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    connection.execute(statement)
                row = connection.execute("SELECT max(version) FROM safe_fast_schema").fetchone()
                version = row[0]
                if version is None:
                    connection.execute("INSERT INTO safe_fast_schema (version) VALUES (?)", (SCHEMA_VERSION,))
                else:
                    check_schema_version(version, self.path)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._committer.close()
        try:
            await self._call(self._close_sync)
        finally:
            executor, self._executor = self._executor, None
            # Joined off the event loop: a job still running (a close whose
            # call above was cancelled) must not block the loop meanwhile.
            await asyncio.to_thread(executor.shutdown, True)

    def _close_sync(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    # -- reads -----------------------------------------------------------------------

    async def load(self, share_data_id: str) -> Optional[StoredShareData]:
        return await self._call(self._changes_sync, share_data_id, None, 0)

    async def changes_after(self, share_data_id: str, incarnation: str, after: int) -> Optional[StoredShareData]:
        return await self._call(self._changes_sync, share_data_id, incarnation, after)

    def _changes_sync(self, share_data_id: str, incarnation: Optional[str], after: int) -> Optional[StoredShareData]:
        db = self._db()
        if db.in_transaction:
            return self._read_sync(db, share_data_id, incarnation, after)
        # One read transaction: the row and the records from the same snapshot.
        db.execute("BEGIN")
        try:
            return self._read_sync(db, share_data_id, incarnation, after)
        finally:
            db.execute("COMMIT")

    @staticmethod
    def _read_sync(
        db: sqlite3.Connection, share_data_id: str, incarnation: Optional[str], after: int
    ) -> Optional[StoredShareData]:
        row = db.execute(
            "SELECT incarnation, public_key, state, last_id, head_hash FROM safe_fast_share_data WHERE id = ?",
            (share_data_id,),
        ).fetchone()
        if row is None:
            return None
        stored_incarnation, public_key, state_text, last_id, head_hash = row
        if stored_incarnation != incarnation:
            after = 0
        after = min(after, last_id) if isinstance(last_id, int) else 0
        rows = db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM safe_fast_transactions WHERE share_data_id = ? AND seq > ? ORDER BY seq",
            (share_data_id, after),
        ).fetchall()
        return decode_stored(share_data_id, row, rows, after)

    # -- writes ----------------------------------------------------------------------

    async def create(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: Sequence[TransactionRecord] = ()
    ) -> StoredShareData:
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        rows = [record_row(record) for record in history]
        stored, written_over = await self._call(self._create_sync, share_data_id, public_key, state_text, rows)
        if written_over:
            self._notify_soon(share_data_id)
        return stored

    def _create_sync(
        self, share_data_id: str, public_key: Optional[str], state_text: str, rows: list[Any]
    ) -> tuple[StoredShareData, bool]:
        """Create the id (with ``rows``) unless it exists; with ``rows``, also over an empty history.

        One transaction: no commit can land between the check and the write.
        """
        db = self._db()
        written_over = False
        db.execute("BEGIN IMMEDIATE")
        try:
            existing = db.execute("SELECT last_id FROM safe_fast_share_data WHERE id = ?", (share_data_id,)).fetchone()
            if existing is None or (rows and existing[0] == 0):
                written_over = existing is not None
                self._write_sync(db, share_data_id, new_incarnation(), public_key, state_text, rows)
            stored = self._read_sync(db, share_data_id, None, 0)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        assert stored is not None
        return stored, written_over

    async def _commit_batch(self, batch: list[tuple[str, str, tuple[Any, ...], str]]) -> list[Any]:
        return await self._call(self._commit_batch_sync, batch)

    def _commit_batch_sync(self, batch: list[tuple[str, str, tuple[Any, ...], str]]) -> list[Any]:
        db = self._db()
        results: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for share_data_id, incarnation, row, state_text in batch:
                seq, prev_hash, digest = row[0], row[6], row[7]
                updated = db.execute(
                    "UPDATE safe_fast_share_data SET state = ?, last_id = ?, head_hash = ?"
                    " WHERE id = ? AND incarnation = ? AND last_id = ? AND head_hash = ?",
                    (state_text, seq, digest, share_data_id, incarnation, seq - 1, prev_hash),
                ).rowcount
                if updated == 1:
                    db.execute(
                        f"INSERT INTO safe_fast_transactions (share_data_id, {_RECORD_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (share_data_id, *row),
                    )
                    results.append(None)
                else:
                    try:
                        changes = self._changes_sync(share_data_id, incarnation, seq - 1)
                    except Exception as exc:  # a corrupt row fails this commit only
                        changes = exc  # type: ignore[assignment]
                    results.append(False if changes is None else changes)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return results

    async def replace(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: list[TransactionRecord]
    ) -> str:
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        rows = [record_row(record) for record in history]
        incarnation = new_incarnation()
        await self._call(self._replace_sync, share_data_id, incarnation, public_key, state_text, rows)
        self._notify_soon(share_data_id)
        return incarnation

    def _replace_sync(
        self, share_data_id: str, incarnation: str, public_key: Optional[str], state_text: str, rows: list[Any]
    ) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._write_sync(db, share_data_id, incarnation, public_key, state_text, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_sync(
        db: sqlite3.Connection,
        share_data_id: str,
        incarnation: str,
        public_key: Optional[str],
        state_text: str,
        rows: list[Any],
    ) -> None:
        """The id as a whole (row and history), inside the caller's write transaction."""
        db.execute("DELETE FROM safe_fast_transactions WHERE share_data_id = ?", (share_data_id,))
        db.execute(
            "INSERT OR REPLACE INTO safe_fast_share_data (id, incarnation, public_key, state, last_id, head_hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (share_data_id, incarnation, public_key, state_text, len(rows), rows[-1][7] if rows else GENESIS_HASH),
        )
        db.executemany(
            f"INSERT INTO safe_fast_transactions (share_data_id, {_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(share_data_id, *row) for row in rows],
        )

    async def remove(self, share_data_id: str) -> bool:
        removed = await self._call(self._remove_sync, share_data_id)
        if removed:
            self._notify_soon(share_data_id)
        return removed

    def _remove_sync(self, share_data_id: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM safe_fast_transactions WHERE share_data_id = ?", (share_data_id,))
            removed = db.execute("DELETE FROM safe_fast_share_data WHERE id = ?", (share_data_id,)).rowcount == 1
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return removed

    def _notify_soon(self, share_data_id: str) -> None:
        asyncio.get_running_loop().call_soon(self._notify, share_data_id)

