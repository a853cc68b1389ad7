"""``postgresql://user@host:port/db``: ShareData shared by every node of a cluster.

Needs the ``postgres`` extra (``asyncpg``).

* **Commits** are one statement each batch: a data-modifying CTE that
  advances the ShareData row only where it still ends at the record's
  predecessor (id, head hash, incarnation) and inserts the records of the
  rows it advanced. Concurrent commits of different ids go in one statement
  (group commit, one round trip and one WAL flush for all); a commit is
  acknowledged once that statement's implicit transaction committed.
* **Conflicts** between nodes: a commit that finds the row moved on is not
  recorded and gets the newer records back; ``hold`` takes the row lock
  (``SELECT ... FOR UPDATE``) so the retry that follows cannot lose again.
* **Other nodes' replacements and removals** are announced with
  ``NOTIFY safe_fast_changes`` in the same transaction; every store LISTENs
  on a dedicated connection (reconnected with a backoff; after a reconnect
  watchers are told that anything may have changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

from ..sharedata import GENESIS_HASH, TransactionRecord
from ._base import StoreBase, not_open, redacted
from ._batch import GroupCommitter
from ._codec import (
    SCHEMA_VERSION,
    StoredShareData,
    check_schema_version,
    decode_stored,
    encode_json,
    new_incarnation,
    record_row,
)
from .errors import StoreError, StoreUnavailable

__all__ = ["PostgresStore"]

logger = logging.getLogger("safe_fast.store")

CHANNEL = "safe_fast_changes"
_SCHEMA_LOCK = 0x5AFEFA57
_MAX_NOTIFY_PAYLOAD = 7000
_DEADLOCK_RETRIES = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS safe_fast_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS safe_fast_share_data (
    id TEXT PRIMARY KEY,
    incarnation TEXT NOT NULL,
    public_key TEXT,
    state TEXT NOT NULL,
    last_id BIGINT NOT NULL,
    head_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS safe_fast_transactions (
    share_data_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    function_id TEXT,
    proposed_data TEXT NOT NULL,
    accepted BOOLEAN NOT NULL,
    timestamp DOUBLE PRECISION NOT NULL,
    proof TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (share_data_id, seq)
);
"""

_RECORD_COLUMNS = "seq, function_id, proposed_data, accepted, timestamp, proof, prev_hash, hash"

_COMMIT = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::boolean[],
                         $7::float8[], $8::text[], $9::text[], $10::text[], $11::text[])
        AS t(id, incarnation, seq, function_id, proposed_data, accepted, ts, proof, prev_hash, hash, state)
), advanced AS (
    UPDATE safe_fast_share_data AS s
    SET state = i.state, last_id = i.seq, head_hash = i.hash
    FROM input AS i
    WHERE s.id = i.id AND s.incarnation = i.incarnation AND s.last_id = i.seq - 1 AND s.head_hash = i.prev_hash
    RETURNING s.id
), inserted AS (
    INSERT INTO safe_fast_transactions (share_data_id, seq, function_id, proposed_data, accepted, timestamp,
                                        proof, prev_hash, hash)
    SELECT i.id, i.seq, i.function_id, i.proposed_data, i.accepted, i.ts, i.proof, i.prev_hash, i.hash
    FROM input AS i JOIN advanced AS a ON a.id = i.id
    RETURNING share_data_id
)
SELECT share_data_id FROM inserted
"""

# One statement, one snapshot: the row and the records after the cursor
# (after 0 when the incarnation is another one).
_CHANGES = f"""
SELECT s.incarnation, s.public_key, s.state, s.last_id, s.head_hash,
       t.{", t.".join(_RECORD_COLUMNS.split(", "))}
FROM safe_fast_share_data AS s
LEFT JOIN safe_fast_transactions AS t
    ON t.share_data_id = s.id AND t.seq > CASE WHEN s.incarnation = $2 THEN $3 ELSE 0 END
WHERE s.id = $1
ORDER BY t.seq
"""

CommitItem = tuple[str, str, tuple[Any, ...], str]


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StoreError(
            "the PostgreSQL store needs asyncpg: pip install 'safe-fast[postgres]'"
        ) from None
    return asyncpg


def _is_connection_error(exc: BaseException) -> bool:
    asyncpg = _import_asyncpg()
    return isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.QueryCanceledError,
        ),
    )


class PostgresStore(StoreBase):
    """The PostgreSQL store.

    ``pool_size`` connections at most (plus one for LISTEN);
    ``command_timeout`` bounds every statement (a database that stops
    answering fails the call instead of hanging it); ``connect_timeout``
    bounds opening a connection.
    """

    durable = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        command_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        listen: bool = True,
    ) -> None:
        super().__init__(url)
        self.pool_size = pool_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.listen = listen
        self._token = uuid.uuid4().hex
        self._pool: Any = None
        self._listener: Any = None
        self._listen_task: Optional[asyncio.Task[None]] = None
        self._closed = False
        self._committer: GroupCommitter[CommitItem] = GroupCommitter(self._commit_batch, "PostgresStore committer")

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        asyncpg = _import_asyncpg()
        self._closed = False
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    command_timeout=self.command_timeout,
                    timeout=self.connect_timeout,
                ),
                self.connect_timeout * 2,
            )
        except Exception as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL at {redacted(self.url)}: {exc!r}") from exc
        try:
            async with pool.acquire() as connection:
                async with connection.transaction():
                    # Nodes starting together: one creates the schema, the others wait.
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    await connection.execute(_SCHEMA)
                    version = await connection.fetchval("SELECT max(version) FROM safe_fast_schema")
                    if version is None:
                        await connection.execute("INSERT INTO safe_fast_schema (version) VALUES ($1)", SCHEMA_VERSION)
                    else:
                        check_schema_version(version, redacted(self.url))
            if self.listen:
                await self._connect_listener()
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreUnavailable(f"PostgreSQL at {redacted(self.url)}: {exc!r}") from exc
        self._pool = pool

    async def close(self) -> None:
        if self._pool is None:
            return
        self._closed = True
        await self._committer.close()
        task, self._listen_task = self._listen_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), self.connect_timeout)
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), self.command_timeout)
        except Exception:
            pool.terminate()

    # -- notifications ----------------------------------------------------------------

    async def _connect_listener(self) -> None:
        asyncpg = _import_asyncpg()
        connection = await asyncpg.connect(self.url, timeout=self.connect_timeout)
        await connection.add_listener(CHANNEL, self._on_notification)
        connection.add_termination_listener(self._on_listener_lost)
        self._listener = connection

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            by, share_data_id = message["by"], message["id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed %s notification: %r", CHANNEL, payload)
            return
        if by != self._token:
            self._notify(share_data_id if isinstance(share_data_id, str) else None)

    def _on_listener_lost(self, connection: Any) -> None:
        if self._closed or connection is not self._listener:
            return
        self._listener = None
        logger.warning("lost the notification connection to %s; reconnecting", redacted(self.url))
        self._listen_task = asyncio.get_running_loop().create_task(self._reconnect_listener())

    async def _reconnect_listener(self) -> None:
        delay = 0.05
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._connect_listener()
            except Exception as exc:
                logger.warning("reconnecting to %s for notifications failed: %r", redacted(self.url), exc)
                delay = min(delay * 2, 2.0)
                continue
            # Notifications sent meanwhile are lost: anything may have changed.
            self._notify(None)
            return

    async def _announce(self, connection: Any, share_data_id: str) -> None:
        payload = json.dumps({"by": self._token, "id": share_data_id})
        if len(payload.encode()) > _MAX_NOTIFY_PAYLOAD:
            payload = json.dumps({"by": self._token, "id": None})
        await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    # -- reads -----------------------------------------------------------------------

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise not_open(self)
        return self._pool

    async def _run(self, what: str, operation: Any) -> Any:
        """Run ``operation(connection)`` on a pooled connection; database failures become StoreErrors."""
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.command_timeout) as connection:
                return await operation(connection)
        except (StoreError, KeyError, ValueError):
            raise
        except Exception as exc:
            raise _store_error(what, self.url, exc) from exc

    async def load(self, share_data_id: str) -> Optional[StoredShareData]:
        return await self._run("load", lambda c: _changes(c, share_data_id, "", 0))

    async def changes_after(self, share_data_id: str, incarnation: str, after: int) -> Optional[StoredShareData]:
        return await self._run("read", lambda c: _changes(c, share_data_id, incarnation, after))

    # -- writes ----------------------------------------------------------------------

    async def create(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: Sequence[TransactionRecord] = ()
    ) -> StoredShareData:
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        rows = [(share_data_id, *record_row(record)) for record in history]

        async def create(connection: Any) -> StoredShareData:
            async with connection.transaction():
                created = await connection.fetchval(
                    "INSERT INTO safe_fast_share_data (id, incarnation, public_key, state, last_id, head_hash)"
                    " VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (id) DO NOTHING RETURNING true",
                    share_data_id,
                    new_incarnation(),
                    public_key,
                    state_text,
                    GENESIS_HASH,
                )
                if rows:
                    # A history of its own goes in, also over an empty stored
                    # one: checked under the row lock, so no commit lands
                    # between the check and the write.
                    last_id = await connection.fetchval(
                        "SELECT last_id FROM safe_fast_share_data WHERE id = $1 FOR UPDATE", share_data_id
                    )
                    if last_id == 0:
                        await _write_whole(connection, share_data_id, new_incarnation(), public_key, state_text, rows)
                        if not created:
                            await self._announce(connection, share_data_id)
                stored = await _changes(connection, share_data_id, "", 0)
            if stored is None:  # removed in between by another node
                raise StoreError(f"ShareData {share_data_id!r} was removed while it was being created")
            return stored

        return await self._run("create", create)

    async def _commit_batch(self, batch: list[CommitItem]) -> list[Any]:
        results = await self._run("commit", lambda c: _commit_on(c, batch))
        return [self._read_error(result) for result in results]

    def _read_error(self, result: Any) -> Any:
        """A lost item's failed read as a StoreError (a decoding error, CorruptShareData, stays as it is)."""
        if isinstance(result, Exception) and not isinstance(result, (StoreError, KeyError, ValueError)):
            return _store_error("read", self.url, result)
        return result

    @contextlib.asynccontextmanager
    async def hold(self, share_data_id: str) -> AsyncIterator[Any]:
        """The row lock of ``share_data_id`` until the commit made through the yielded store (or the exit)."""
        pool = self._require_pool()
        try:
            connection = await pool.acquire(timeout=self.command_timeout)
        except Exception as exc:
            raise _store_error("lock", self.url, exc) from exc
        held = _Held(self, connection)
        try:
            try:
                await held.transaction.start()
                await connection.execute("SELECT 1 FROM safe_fast_share_data WHERE id = $1 FOR UPDATE", share_data_id)
            except Exception as exc:
                raise _store_error("lock", self.url, exc) from exc
            yield held
        finally:
            # Shielded: a cancellation arriving now (or a second one) must not
            # keep the connection out of the pool for good.
            await asyncio.shield(_let_go(pool, held))

    async def replace(
        self, share_data_id: str, public_key: Optional[str], current_state: Any, history: list[TransactionRecord]
    ) -> str:
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        rows = [(share_data_id, *record_row(record)) for record in history]
        incarnation = new_incarnation()

        async def replace(connection: Any) -> None:
            async with connection.transaction():
                await _write_whole(connection, share_data_id, incarnation, public_key, state_text, rows)
                await self._announce(connection, share_data_id)

        await self._run("replace", replace)
        return incarnation

    async def remove(self, share_data_id: str) -> bool:
        async def remove(connection: Any) -> bool:
            async with connection.transaction():
                # The ShareData row first, as in replace: no commit lands in between.
                status = await connection.execute("DELETE FROM safe_fast_share_data WHERE id = $1", share_data_id)
                await connection.execute("DELETE FROM safe_fast_transactions WHERE share_data_id = $1", share_data_id)
                removed = status == "DELETE 1"
                if removed:
                    await self._announce(connection, share_data_id)
                return removed

        return bool(await self._run("remove", remove))


async def _write_whole(
    connection: Any,
    share_data_id: str,
    incarnation: str,
    public_key: Optional[str],
    state_text: str,
    rows: list[tuple[Any, ...]],
) -> None:
    """The id as a whole (row and history), inside the caller's transaction."""
    # The ShareData row first: its lock keeps every commit out until the
    # transaction ends (one already under way finishes first, and the DELETE
    # below, a later statement, sees its record).
    await connection.execute(
        "INSERT INTO safe_fast_share_data (id, incarnation, public_key, state, last_id, head_hash)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET incarnation = $2,"
        " public_key = $3, state = $4, last_id = $5, head_hash = $6",
        share_data_id,
        incarnation,
        public_key,
        state_text,
        len(rows),
        rows[-1][8] if rows else GENESIS_HASH,
    )
    await connection.execute("DELETE FROM safe_fast_transactions WHERE share_data_id = $1", share_data_id)
    if rows:
        await connection.executemany(
            f"INSERT INTO safe_fast_transactions (share_data_id, {_RECORD_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            rows,
        )


async def _let_go(pool: Any, held: "_Held") -> None:
    """End the held transaction (unless its commit did) and give its connection back to the pool."""
    try:
        if not held.finished:
            with contextlib.suppress(Exception):
                await held.transaction.rollback()
    finally:
        await pool.release(held.connection)


class _Held:
    """The store seen through one connection that holds a row lock in an open transaction."""

    def __init__(self, store: PostgresStore, connection: Any) -> None:
        self.store = store
        self.connection = connection
        self.transaction = connection.transaction()
        self.finished = False

    async def changes_after(self, share_data_id: str, incarnation: str, after: int) -> Optional[StoredShareData]:
        try:
            return await _changes(self.connection, share_data_id, incarnation, after)
        except (StoreError, KeyError, ValueError):
            raise
        except Exception as exc:
            raise _store_error("read", self.store.url, exc) from exc

    async def commit(
        self, share_data_id: str, incarnation: str, record: TransactionRecord, current_state: Any
    ) -> Optional[StoredShareData]:
        row = record_row(record)
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        try:
            (result,) = await _commit_on(self.connection, [(share_data_id, incarnation, row, state_text)])
            if result is None:
                await self.transaction.commit()
                self.finished = True
        except (StoreError, KeyError, ValueError):
            raise
        except Exception as exc:
            raise _store_error("commit", self.store.url, exc) from exc
        if isinstance(result, BaseException):
            raise self.store._read_error(result)
        if result is False:
            raise KeyError(f"shareDataId {share_data_id} not found")
        return result


async def _changes(connection: Any, share_data_id: str, incarnation: str, after: int) -> Optional[StoredShareData]:
    rows = await connection.fetch(_CHANGES, share_data_id, incarnation, after)
    if not rows:
        return None
    first = rows[0]
    row = (first[0], first[1], first[2], first[3], first[4])
    if row[0] != incarnation:
        after = 0
    records = [tuple(r)[5:] for r in rows if r[5] is not None]
    return decode_stored(share_data_id, row, records, after)


async def _commit_on(connection: Any, batch: list[CommitItem]) -> list[Any]:
    """Commit ``batch`` in one statement; per item None (committed), the changes it lost to,
    False (the id is gone) or the exception reading them raised."""
    asyncpg = _import_asyncpg()
    ordered = sorted(batch, key=lambda item: item[0])  # fewer lock-order deadlocks between batches
    columns: list[list[Any]] = [[] for _ in range(11)]
    for share_data_id, incarnation, row, state_text in ordered:
        for index, value in enumerate((share_data_id, incarnation, *row, state_text)):
            columns[index].append(value)
    for attempt in range(_DEADLOCK_RETRIES):
        try:
            committed = {r[0] for r in await connection.fetch(_COMMIT, *columns)}
            break
        except asyncpg.exceptions.DeadlockDetectedError:
            # The statement rolled back as a whole: nothing of it is recorded.
            if attempt == _DEADLOCK_RETRIES - 1:
                raise
    # The statement is committed: from here on a failure is one item's (what
    # it lost to could not be read), never the batch's, whose winners are recorded.
    results: list[Any] = []
    for share_data_id, incarnation, row, _ in batch:
        if share_data_id in committed:
            results.append(None)
            continue
        try:
            changes = await _changes(connection, share_data_id, incarnation, row[0] - 1)
        except Exception as exc:
            changes = exc  # type: ignore[assignment]
        results.append(False if changes is None else changes)
    return results


def _store_error(what: str, url: str, exc: BaseException) -> StoreError:
    if _is_connection_error(exc):
        return StoreUnavailable(f"PostgreSQL at {redacted(url)} is unreachable ({what}): {exc!r}")
    return StoreError(f"PostgreSQL at {redacted(url)} failed ({what}): {exc!r}")
