"""What the three stores share: opening with ``async with``, watchers, a trivial hold."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Callable, Optional

from ._codec import encode_json, record_row

logger = logging.getLogger("safe_fast.store")

ChangeListener = Callable[[Optional[str]], Any]


class StoreBase:
    """``async with``, ``watch``/``unwatch`` and a ``hold`` that needs no lock."""

    url: str
    durable: bool

    def __init__(self, url: str) -> None:
        self.url = url
        self._watchers: list[ChangeListener] = []
        self._committer: Any = None

    @property
    def commit_batches(self) -> int:
        """Database transactions that committed records so far (group commit puts many in one)."""
        return 0 if self._committer is None else self._committer.batches

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    async def commit(self, share_data_id: str, incarnation: str, record: Any, current_state: Any) -> Any:
        """Hand the record to the group committer (the database stores set ``_committer``)."""
        row = record_row(record)
        state_text = encode_json(current_state, f"the state of ShareData {share_data_id!r}")
        result = await self._committer.submit(share_data_id, (share_data_id, incarnation, row, state_text))
        if result is False:
            raise KeyError(f"shareDataId {share_data_id} not found")
        return result

    def watch(self, listener: ChangeListener) -> None:
        """Call ``listener(share_data_id)`` when another writer replaced or removed
        an id; ``listener(None)`` when changes may have been missed (a lost
        notification connection): anything may have changed."""
        self._watchers.append(listener)

    def unwatch(self, listener: ChangeListener) -> None:
        with contextlib.suppress(ValueError):
            self._watchers.remove(listener)

    def _notify(self, share_data_id: Optional[str]) -> None:
        for listener in list(self._watchers):
            try:
                listener(share_data_id)
            except Exception:
                logger.exception("store change listener failed for %r", share_data_id)

    @contextlib.asynccontextmanager
    async def hold(self, share_data_id: str) -> AsyncIterator[Any]:
        """One process writes this store: the caller's own serialization is enough."""
        yield self


def redacted(url: str) -> str:
    """``url`` without a password, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def not_open(store: Any) -> Exception:
    from .errors import StoreError

    return StoreError(f"{store!r} is not open: use `async with open_store(url) as store` or `await store.open()`")
