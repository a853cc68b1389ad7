"""The SAFE data model: share functions, ShareData and their manager.

A :class:`ShareData` holds a ``current_state`` that changes only through
transactions: a :class:`ShareFunction`'s rule judges each proposal against
the current state, and every outcome, accepted or rejected, is appended to an
unbounded, hash-chained transaction history that serves as an audit log.

:class:`ShareDataManager` owns the ShareData of a process, serializes the
transactions of each one and reports every change to its listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._events import EventEmitter, Listener

if TYPE_CHECKING:
    from .store import ShareDataStore

__all__ = [
    "GENESIS_HASH",
    "RuleError",
    "ShareData",
    "ShareDataEvent",
    "ShareDataManager",
    "ShareFunction",
    "TransactionOutcome",
    "TransactionRecord",
]

#: ``prev_hash`` of the first record of every transaction history.
GENESIS_HASH = "0" * 64

Rule = Callable[[Any, Any], bool | Awaitable[bool]]

_EVENTS = frozenset(
    {
        "share-data:added",
        "share-data:updated",
        "share-data:removed",
        "share-data:transaction",
    }
)


class RuleError(Exception):
    """A share function's rule raised while judging a proposal.

    The original exception is chained as ``__cause__``.
    """


@dataclass(frozen=True, slots=True)
class ShareFunction:
    """A rule deciding whether a proposal may replace the current state.

    ``rule(current_state, proposed_data)`` returns a truthy value to accept;
    it may be a coroutine function. Rules should be pure predicates: see
    :meth:`ShareDataManager.apply_transaction` for when one runs again.
    A function whose ``id`` is ``None`` is not reachable over the wire.
    """

    id: str | None
    rule: Rule
    name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise TypeError("ShareFunction.id must be a non-empty string or None")
        if not callable(self.rule):
            raise TypeError("ShareFunction.rule must be callable")
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError("ShareFunction.name must be a string or None")

    @property
    def label(self) -> str:
        """The name used in messages: ``name``, else ``id``, else the rule's."""
        if self.name:
            return self.name
        if self.id is not None:
            return self.id
        return getattr(self.rule, "__qualname__", None) or repr(self.rule)


@dataclass(frozen=True, slots=True)
class TransactionRecord:
    """One entry of a ShareData's transaction history.

    ``hash`` is the hex SHA-256 of the canonical encoding of every other
    field, ``prev_hash`` included, which chains each record to the previous
    one. ``timestamp`` is in seconds since the epoch.
    """

    transaction_id: str
    function_id: str | None
    proposed_data: Any
    accepted: bool
    timestamp: float
    proof: Any
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class TransactionOutcome:
    """What :meth:`ShareDataManager.apply_transaction` decided."""

    accepted: bool
    transaction_id: str


@dataclass(frozen=True, slots=True)
class ShareDataEvent:
    """The single argument given to :class:`ShareDataManager` listeners.

    ``transaction_id`` and ``accepted`` are set for ``share-data:transaction``
    only; ``current_state`` is the state after the change, and ``None`` for
    ``share-data:removed``; ``share_data`` is the ShareData concerned (for
    ``share-data:removed``, the one that was removed). ``remote`` is true
    for a replacement or removal made by another node of a shared store,
    which this manager learned from the store (that node announced it).
    """

    type: str
    share_data_id: str
    transaction_id: str | None = None
    accepted: bool | None = None
    current_state: Any = None
    share_data: ShareData | None = None
    remote: bool = False


class ShareData:
    """A piece of shared state with its functions and its audit log.

    ``transaction_history`` and the data it refers to must be treated as
    read-only: records keep a reference to the proposed data rather than a
    copy (large states would be copied on every transaction), so mutating a
    state in place afterwards is indistinguishable from tampering and
    :meth:`verify_chain` reports it. Replace states; don't mutate them.
    """

    __slots__ = (
        "id",
        "public_key",
        "current_state",
        "functions",
        "transaction_history",
        "_head_hash",
    )

    def __init__(
        self,
        id: str,
        public_key: str | None = None,
        *,
        current_state: Any = None,
        functions: Iterable[ShareFunction] = (),
    ) -> None:
        if not isinstance(id, str) or not id:
            raise TypeError("ShareData.id must be a non-empty string")
        if public_key is not None and not isinstance(public_key, str):
            raise TypeError("ShareData.public_key must be a string or None")
        if isinstance(functions, (str, bytes)) or not isinstance(functions, Iterable):
            raise TypeError("ShareData.functions must be an iterable of ShareFunction")
        functions = list(functions)
        seen: set[str] = set()
        for index, function in enumerate(functions):
            if not isinstance(function, ShareFunction):
                raise TypeError(
                    f"ShareData.functions[{index}] must be a ShareFunction, "
                    f"got {type(function).__name__}"
                )
            # Functions are resolved by id: a duplicate would make one of
            # them silently unreachable.
            if function.id is not None:
                if function.id in seen:
                    raise ValueError(f"ShareData.functions has duplicate id {function.id!r}")
                seen.add(function.id)

        self.id = id
        self.public_key = public_key
        self.current_state = current_state
        self.functions: list[ShareFunction] = functions
        self.transaction_history: list[TransactionRecord] = []
        # Hash of the last record appended through _append. The chain alone
        # cannot reveal that its tail was cut off; this anchor can.
        self._head_hash = GENESIS_HASH

    def __repr__(self) -> str:
        return f"<ShareData id={self.id!r} transactions={len(self.transaction_history)}>"

    @property
    def last_transaction_id(self) -> str | None:
        """Id of the last record of the history, or ``None`` if it is empty."""
        if not self.transaction_history:
            return None
        return self.transaction_history[-1].transaction_id

    def verify_chain(self) -> bool:
        """Tell whether the history is exactly what was appended to it.

        Detects the edit of any field of any record, reordering, insertion
        and removal, including of the last records.
        """
        prev_hash = GENESIS_HASH
        for index, record in enumerate(self.transaction_history, 1):
            if (
                type(record) is not TransactionRecord
                or record.transaction_id != str(index)
                or record.prev_hash != prev_hash
            ):
                return False
            try:
                expected = _record_hash(record)
            except ValueError:
                # Only data that was edited after the fact can fail to encode:
                # appending it would have failed.
                return False
            if record.hash != expected:
                return False
            prev_hash = record.hash
        return prev_hash == self._head_hash

    def _append(
        self,
        function_id: str | None,
        proposed_data: Any,
        accepted: bool,
        proof: Any,
    ) -> TransactionRecord:
        record = self._next_record(function_id, proposed_data, accepted, proof)
        self._append_record(record)
        return record

    def _next_record(
        self,
        function_id: str | None,
        proposed_data: Any,
        accepted: bool,
        proof: Any,
    ) -> TransactionRecord:
        """The record that would extend the history now (not appended)."""
        transaction_id = str(len(self.transaction_history) + 1)
        timestamp = time.time()
        prev_hash = self._head_hash
        digest = _hash_fields(
            transaction_id, function_id, proposed_data, accepted, timestamp, proof, prev_hash
        )
        return TransactionRecord(
            transaction_id=transaction_id,
            function_id=function_id,
            proposed_data=proposed_data,
            accepted=accepted,
            timestamp=timestamp,
            proof=proof,
            prev_hash=prev_hash,
            hash=digest,
        )

    def _append_record(self, record: TransactionRecord) -> None:
        """Append a record that extends the head (made by _next_record, or verified)."""
        self.transaction_history.append(record)
        self._head_hash = record.hash


class _LockEntry:
    """A per-id lock that lives only as long as someone uses it."""

    __slots__ = ("lock", "users", "owner")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.owner: Any = None


MAX_EVALUATIONS = 8
"""How often ``apply_transaction`` evaluates a rule whose state keeps changing under it."""


class ShareDataManager:
    """The ShareData of a process, by id, and the events about them.

    ``ShareDataManager()`` keeps its ShareData itself, in memory.
    ``ShareDataManager(store=store)`` is a cache in front of a
    :class:`~safe_fast.store.ShareDataStore` (see docs/store.md): ShareData
    are registered with ``await register(...)``, every transaction is
    committed to the store before ``apply_transaction`` returns, and the
    synchronous ``add_share_data`` / ``update_share_data`` /
    ``remove_share_data_by_id`` are replaced by ``await register`` /
    ``await replace`` / ``await remove`` (the asynchronous ones work without
    a store too).

    Events (each listener receives one :class:`ShareDataEvent`):
    ``share-data:added``, ``share-data:updated``, ``share-data:removed`` and
    ``share-data:transaction``. Listeners may be coroutine functions; one that
    raises is logged and disturbs neither the manager nor other listeners.
    Every listener sees the events in the order the changes happened: a
    change a listener makes (say, removing a ShareData once a transaction
    finishes it) is announced once the current event has reached every
    listener, still before the call that caused it returns.
    """

    __slots__ = ("_share_data", "_locks", "_emitter", "_replica")

    def __init__(self, store: ShareDataStore | None = None) -> None:
        self._share_data: dict[str, ShareData] = {}
        self._locks: dict[str, _LockEntry] = {}
        # In order: a listener reacting to one change with another (e.g.
        # removing a finished ShareData) must not let the listeners after it
        # see the second change first.
        self._emitter = EventEmitter(in_order=True)
        self._replica: Any = None
        if store is not None:
            from .store import ShareDataStore
            from .store.replica import StoreReplica

            if not isinstance(store, ShareDataStore):
                raise TypeError(f"store must be a ShareDataStore (see safe_fast.open_store), got {type(store).__name__}")
            self._replica = StoreReplica(store, self)

    @property
    def store(self) -> ShareDataStore | None:
        """The :class:`~safe_fast.store.ShareDataStore` behind this manager, or None."""
        return None if self._replica is None else self._replica.store

    @property
    def durable(self) -> bool:
        """Whether what this manager records survives the process (its store is durable)."""
        return self._replica is not None and bool(self._replica.store.durable)

    def close(self) -> None:
        """Stop following the store's changes (the store itself stays open)."""
        if self._replica is not None:
            self._replica.close()

    def on(self, event: str, listener: Listener) -> Listener:
        """Register *listener* for *event*; returns it, so it can decorate."""
        if event not in _EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {sorted(_EVENTS)}")
        return self._emitter.on(event, listener)

    def off(self, event: str, listener: Listener) -> None:
        """Remove one registration of *listener*; unknown ones are ignored."""
        self._emitter.off(event, listener)

    def get_share_data_by_id(self, share_data_id: str) -> ShareData | None:
        return self._share_data.get(share_data_id)

    def get_all_share_data(self) -> list[ShareData]:
        """Every ShareData held, in the order they were added (a snapshot)."""
        return list(self._share_data.values())

    def add_share_data(self, share_data: ShareData) -> None:
        """Add *share_data*; raise :exc:`ValueError` if its id is taken."""
        self._refuse_with_store("add_share_data", "register(share_data)")
        _check_share_data(share_data)
        if share_data.id in self._share_data:
            raise ValueError(f"ShareData {share_data.id!r} already exists")
        self._share_data[share_data.id] = share_data
        self._announce("share-data:added", share_data)

    def update_share_data(self, share_data: ShareData) -> None:
        """Replace the ShareData with the same id wholesale.

        Raise :exc:`KeyError` if there is none.
        """
        self._refuse_with_store("update_share_data", "replace(share_data)")
        _check_share_data(share_data)
        if share_data.id not in self._share_data:
            raise KeyError(_not_found(share_data.id))
        self._share_data[share_data.id] = share_data
        self._announce("share-data:updated", share_data)

    def remove_share_data_by_id(self, share_data_id: str) -> bool:
        """Remove a ShareData; return whether there was one."""
        self._refuse_with_store("remove_share_data_by_id", "remove(share_data_id)")
        return self._forget(share_data_id)

    def _forget(self, share_data_id: str) -> bool:
        share_data = self._share_data.pop(share_data_id, None)
        if share_data is None:
            return False
        self._emitter.emit(
            "share-data:removed",
            ShareDataEvent("share-data:removed", share_data_id, share_data=share_data),
        )
        return True

    async def register(self, share_data: ShareData) -> ShareData:
        """Add *share_data*, through the store when there is one; returns it.

        With a store, the first registration of an id anywhere creates it
        there with *share_data*'s state; otherwise *share_data* takes the
        state and history the store holds (its functions stay: they are
        code). Raise :exc:`ValueError` if the id is already registered here,
        :class:`~safe_fast.store.CorruptShareData` if what the store holds
        does not verify, :class:`~safe_fast.store.StoreError` if the store
        cannot be reached.
        """
        _check_share_data(share_data)
        if self._replica is None:
            self.add_share_data(share_data)
            return share_data
        if share_data.id in self._share_data:
            raise ValueError(f"ShareData {share_data.id!r} already exists")
        _check_history(share_data)
        await self._replica.register(share_data)
        if share_data.id in self._share_data:
            raise ValueError(f"ShareData {share_data.id!r} already exists")
        self._share_data[share_data.id] = share_data
        self._announce("share-data:added", share_data)
        return share_data

    async def replace(self, share_data: ShareData) -> None:
        """Replace the ShareData with the same id wholesale, in the store too.

        Every node sharing the store learns of it. Raise :exc:`KeyError` if
        there is none here.
        """
        if self._replica is None:
            self.update_share_data(share_data)
            return
        _check_share_data(share_data)
        if share_data.id not in self._share_data:
            raise KeyError(_not_found(share_data.id))
        _check_history(share_data)
        # After any transaction of the old history under way: its event must
        # not follow the replacement's.
        async with self._id_lock(share_data.id):
            if share_data.id not in self._share_data:
                raise KeyError(_not_found(share_data.id))  # removed while this waited
            await self._replica.replace(share_data)
            self._share_data[share_data.id] = share_data
            self._announce("share-data:updated", share_data)

    async def remove(self, share_data_id: str) -> bool:
        """Remove a ShareData, from the store too; return whether there was one here."""
        if self._replica is None:
            return self.remove_share_data_by_id(share_data_id)
        if share_data_id not in self._share_data:
            return False
        async with self._id_lock(share_data_id):  # after any transaction under way, as in replace
            if share_data_id not in self._share_data:
                return False  # removed while this waited
            await self._replica.remove(share_data_id)
            return self._forget(share_data_id)

    async def refresh(self, share_data_id: str) -> None:
        """Bring *share_data_id* up to what the store holds (other nodes' commits, replacement, removal).

        Without a store, or for an unknown id, it returns at once.
        """
        if self._replica is not None:
            await self._replica.refresh(share_data_id)

    async def apply_transaction(
        self,
        share_data_id: str,
        proposed_data: Any,
        function: ShareFunction,
        proof: Any = None,
    ) -> TransactionOutcome:
        """Judge *proposed_data* with *function* and record the outcome.

        If the rule accepts, *proposed_data* becomes the current state. The
        record is appended either way, then ``share-data:transaction`` is
        emitted, before any other transaction on that id can be recorded.

        Transactions on one id run one at a time, so each rule sees the state
        its proposal would replace. If, while an async rule runs, the
        ShareData is replaced or its state is changed directly, the verdict
        is about a state that no longer exists: the rule is evaluated again
        against the current object, so nothing is ever recorded on a stale
        verdict. If the ShareData is removed meanwhile, nothing is recorded.

        Raise :exc:`KeyError` if there is no ShareData with this id (or it is
        removed before the outcome is recorded), :exc:`RuleError` if the rule
        raises, :exc:`ValueError` if the proposed data or proof is nested
        deeper than :data:`MAX_NESTING` (or holds a reference cycle), and
        :exc:`RuntimeError` if the state changed under the rule
        :data:`MAX_EVALUATIONS` times in a row; in every case nothing is
        recorded.

        With a store, the outcome is committed to the store first (a commit
        that finds the stored history moved on catches up and evaluates
        again, within the same bound) and this returns only once it is
        durable there; a store failure is raised as
        :class:`~safe_fast.store.StoreError` and nothing is assumed recorded.
        Data a durable store cannot keep (not plain JSON) raises
        :exc:`ValueError`.
        """
        if not isinstance(function, ShareFunction):
            raise TypeError(f"function must be a ShareFunction, got {type(function).__name__}")
        if share_data_id not in self._share_data:
            raise KeyError(_not_found(share_data_id))

        async with self._id_lock(share_data_id):
            if self._replica is not None:
                share_data, record, state = await self._replica.commit_transaction(
                    share_data_id, function, proposed_data, proof, _evaluate
                )
                return self._recorded(share_data, record, state)
            for _ in range(MAX_EVALUATIONS):
                share_data = self._share_data.get(share_data_id)
                if share_data is None:
                    raise KeyError(_not_found(share_data_id))
                state = share_data.current_state
                accepted = await _evaluate(function, state, proposed_data)
                if (
                    self._share_data.get(share_data_id) is share_data
                    and share_data.current_state is state
                ):
                    break
            else:
                raise RuntimeError(
                    f"the state of ShareData {share_data_id!r} changed while the rule of"
                    f" {function.label!r} ran, {MAX_EVALUATIONS} times in a row; nothing recorded"
                )

            # No await from here on: records and events stay in id order.
            record = share_data._append(function.id, proposed_data, accepted, proof)
            if accepted:
                share_data.current_state = proposed_data
            return self._recorded(share_data, record, share_data.current_state)

    def _recorded(self, share_data: ShareData, record: TransactionRecord, state: Any) -> TransactionOutcome:
        """Announce a recorded transaction (``state``: the state after it); its outcome."""
        self._emitter.emit(
            "share-data:transaction",
            ShareDataEvent(
                "share-data:transaction",
                share_data.id,
                transaction_id=record.transaction_id,
                accepted=record.accepted,
                current_state=state,
                share_data=share_data,
            ),
        )
        return TransactionOutcome(record.accepted, record.transaction_id)

    @contextlib.asynccontextmanager
    async def _id_lock(self, share_data_id: str) -> AsyncIterator[None]:
        """One at a time per id: transactions, and (with a store) replacement and removal.

        Re-entered by the task that holds it: a rule may replace or remove
        its own id (its transaction then finds the id changed).
        """
        entry = self._locks.get(share_data_id)
        if entry is None:
            entry = self._locks[share_data_id] = _LockEntry()
        task = asyncio.current_task()
        if entry.owner is task:
            yield
            return
        entry.users += 1
        try:
            async with entry.lock:
                entry.owner = task
                try:
                    yield
                finally:
                    entry.owner = None
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[share_data_id]

    def _announce(self, event: str, share_data: ShareData, *, remote: bool = False) -> None:
        self._emitter.emit(
            event,
            ShareDataEvent(
                event,
                share_data.id,
                current_state=share_data.current_state,
                share_data=share_data,
                remote=remote,
            ),
        )

    def _refuse_with_store(self, method: str, instead: str) -> None:
        if self._replica is not None:
            raise RuntimeError(
                f"this manager keeps its ShareData in {self._replica.store!r}: {method} cannot wait for it;"
                f" use `await manager.{instead}`"
            )


async def _evaluate(function: ShareFunction, state: Any, proposed_data: Any) -> bool:
    try:
        result = function.rule(state, proposed_data)
        if inspect.isawaitable(result):
            result = await result
        # bool() may raise too (e.g. an ambiguous truth value): the rule's fault.
        return bool(result)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise RuleError(f"rule of function {function.label!r} raised: {detail}") from exc


def _check_share_data(share_data: object) -> None:
    if not isinstance(share_data, ShareData):
        raise TypeError(f"expected a ShareData, got {type(share_data).__name__}")


def _check_history(share_data: ShareData) -> None:
    """A history a store is to keep must verify: every node would distrust it when it reads it back."""
    if share_data.transaction_history and not share_data.verify_chain():
        raise ValueError(f"the history of ShareData {share_data.id!r} does not verify (verify_chain()); nothing stored")


def _not_found(share_data_id: str) -> str:
    return f"shareDataId {share_data_id} not found"


# Canonical encoding of records.


def _record_hash(record: TransactionRecord) -> str:
    return _hash_fields(
        record.transaction_id,
        record.function_id,
        record.proposed_data,
        record.accepted,
        record.timestamp,
        record.proof,
        record.prev_hash,
    )


def _hash_fields(
    transaction_id: str,
    function_id: str | None,
    proposed_data: Any,
    accepted: bool,
    timestamp: float,
    proof: Any,
    prev_hash: str,
) -> str:
    fields = {
        "transaction_id": transaction_id,
        "function_id": function_id,
        "proposed_data": proposed_data,
        "accepted": accepted,
        "timestamp": timestamp,
        "proof": proof,
        "prev_hash": prev_hash,
    }
    if _is_plain_json(fields):
        text = _dumps(fields)
    else:
        # Data that JSON alone would encode ambiguously or not at all (keys
        # that are not strings, sets, tuples, other objects, NaN, cycles):
        # a normalized copy in which every such value is tagged, so no two
        # different values share an encoding. The prefix keeps the two
        # encodings from ever colliding.
        text = "\x00" + _dumps(_normalize(fields, set()))
    # ensure_ascii=False lets lone surrogates through; encode them rather
    # than fail.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


MAX_NESTING = 400
"""Deepest nesting of proposed data or proof a transaction records (a third
of it for data JSON cannot hold as it stands: sets, tuples, keys that are not
strings, other objects, NaN).

A fixed bound, checked without recursion, so that a record that could be
hashed when it was made can be hashed again from any call depth (and
``verify_chain`` never mistakes a deep stack for tampering).
"""

_NORMALIZED_NESTING = MAX_NESTING // 3
"""The same bound for data only the normalized encoding can hash (see _normalize)."""

_PLAIN_SCALARS = (str, int, bool, type(None))


def _is_plain_json(value: Any) -> bool:
    """True when JSON encodes *value* unambiguously as it stands.

    Raises :exc:`ValueError` when it is nested deeper than :data:`MAX_NESTING`.
    Walks without recursion, so the answer does not depend on the call depth.
    """
    plain = True
    deepest = 0
    on_path: set[int] = set()  # the containers being walked, to tell a cycle
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth < 0:  # leaving a container
            on_path.discard(item)
            continue
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind is float:
            plain = plain and math.isfinite(item)
            continue
        if not isinstance(item, (list, tuple, dict, set, frozenset)):
            plain = False
            continue
        if id(item) in on_path:
            plain = False  # a reference cycle
            continue
        if depth > MAX_NESTING:
            raise ValueError("proposed data or proof is nested too deeply to be hashed")
        deepest = max(deepest, depth)
        on_path.add(id(item))
        stack.append((id(item), -1))
        if kind is dict:
            for key, child in item.items():  # type: ignore[union-attr]
                if type(key) is not str:
                    plain = False
                    stack.append((key, depth + 1))
                stack.append((child, depth + 1))
        else:
            plain = plain and kind is list
            stack.extend((child, depth + 1) for child in item)
    if not plain and deepest > _NORMALIZED_NESTING:
        # The normalized copy wraps containers in tags: up to three JSON
        # levels for one of ours.
        raise ValueError("proposed data or proof is nested too deeply to be hashed")
    return plain


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _normalize(value: Any, active: set[int]) -> Any:
    """A JSON-encodable, deterministic stand-in for *value*; one frame per level.

    Only called on what :func:`_is_plain_json` walked: no deeper than
    :data:`MAX_NESTING`.
    """
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if kind not in (list, tuple, dict, set, frozenset):
        return {"$repr": f"{kind.__module__}.{kind.__qualname__}:{value!r}"}
    if id(value) in active:
        return {"$cycle": True}
    active.add(id(value))
    try:
        items = []
        if kind is dict:
            # Keys become their own canonical text, so 1 and "1" stay apart
            # and keys of any type can be sorted.
            for key, item in value.items():
                items.append([_dumps(_normalize(key, active)), _normalize(item, active)])
            items.sort(key=_first)
            return {"$dict": items}
        for item in value:
            items.append(_normalize(item, active))
        if kind is list:
            return items
        if kind is tuple:
            return {"$tuple": items}
        texts = []
        for item in items:
            texts.append(_dumps(item))
        texts.sort()
        return {"$set": texts}
    finally:
        active.discard(id(value))


def _first(pair: list[Any]) -> Any:
    return pair[0]
