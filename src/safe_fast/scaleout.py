"""Scale-out over Redis: cross-node fan-out and a shared replay window.

Two drop-in implementations of the server's extension points, sharing one
Redis with each other and with TypeScript ``@degenerate/realtime`` 0.7.1
nodes (the layout is the one in PROTOCOL.md, "Scale-out layout (Redis)"):

* :class:`RedisChannelRegistry` (a :class:`~safe_fast.registry.ChannelRegistry`):
  live fan-out over the pub/sub channel ``safe:rt:<shareDataId>``.
* :class:`RedisReplayStore` (a :class:`~safe_fast.replay.ReplayStore`): the
  replay window as the sorted set ``safe:replay:<shareDataId>``.

Both take a ``redis.asyncio.Redis`` client (redis-py >= 5, the ``redis``
extra) and never close it: the caller owns it.

Theory of operation of the registry
-----------------------------------

The registry API is synchronous (as in the TypeScript package): ``subscribe``,
``unsubscribe``, ``broadcast``, ``remove_connection`` and ``remove_channel``
update the local ``shareDataId -> {connection}`` map at once and append the
Redis commands they imply to ONE FIFO queue. One worker task per registry
drains it strictly in order, so the commands of a node reach Redis in the
order they were issued:

* runs of consecutive PUBLISHes go out as one pipeline (one round trip);
* a run of SUBSCRIBEs (or UNSUBSCRIBEs) is sent as one command on the
  dedicated pub/sub connection, and the worker waits (bounded) for Redis to
  confirm it before it sends anything else, so a broadcast issued after
  ``subscribe()`` returned is published after the node is subscribed and
  comes back to it.

Delivery is local-first: ``broadcast`` encodes the message into one
WebSocket frame and fans it out to this node's subscribers at once, then
queues the PUBLISH for the other nodes. A Redis that is down or slow
therefore never keeps a node's own transactions from its own clients.

A second task, the reader, owns the reads of the pub/sub connection. Every
payload it receives is validated with :func:`parse_server_message`; the
echo of this node's own PUBLISH is dropped, anything else is encoded into
one frame once and queued on the local subscribers. Own echoes come back in
the order they were published, so each channel keeps the FIFO of what this
node published and is still waiting to see again, keyed by transaction id
(by payload bytes for the rare frame without one: ``lifecycle``). An echo
that is byte for byte the oldest of them, the usual case, is dropped
without being parsed. Rule 4
of STORE.md holds per subscriber: a ``transaction`` frame reaches it at
most once, in order, and never one its snapshot already holds. Per
channel, the highest id delivered (``mark``) drops a frame from Redis that
is not newer (a duplicate, or one overtaken by a newer local one: the
client's gap detection fetches it by replay), and each subscriber keeps its
snapshot's ``lastTransactionId`` so frames at or below it skip it. A
``lifecycle`` frame starts a new epoch (a replaced ShareData may count its
ids from 1 again): the marks are reset. It has no id to compare, so a
``lifecycle`` payload identical to the payload Redis delivered just before
it on the channel is taken for a copy (a PUBLISH retried after a timeout may
land twice): the marks are reset again, but it is not delivered twice.

When the pub/sub connection fails, or stays silent after a PING for longer
than ``command_timeout``, the reader reports it to ``on_error``, waits a
bounded exponential backoff, opens a new pub/sub connection and subscribes
every channel that has local subscribers at that moment; commands still
queued behind it are then applied in order, which converges on the local
map.

Nothing of this ever blocks the caller: a Redis failure becomes an
``on_error`` call (default: a log line) and, for other nodes, a lost frame.
Live delivery across nodes is at-most-once; the replay window and the
client's gap detection are the recovery path (see docs/scaleout.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from typing import Any, Awaitable, Callable, Optional

import orjson

from ._backend import core
from .messages import InvalidMessage, ServerMessage, decode_json, encode_message, parse_server_message
from .registry import NO_TRANSACTION, forget_snapshots, kind_and_number, recipients, snapshot_number
from .replay import ReplayEntry

__all__ = ["RedisChannelRegistry", "RedisReplayStore", "CorruptReplayEntry"]

logger = logging.getLogger("safe_fast.scaleout")

DEFAULT_CHANNEL_PREFIX = "safe:rt:"
DEFAULT_KEY_PREFIX = "safe:replay:"

_CANONICAL_ID = re.compile(r"(?:0|[1-9][0-9]*)")
_MAX_PIPELINE = 512
"""Commands sent in one pipeline at most (store writes, PUBLISHes)."""
_MAX_EXACT_SCORE = 2**53 - 1
"""Redis scores are doubles: integers beyond this lose precision (as ``Number`` does in JS)."""


def _canonical_seq(value: Any) -> Optional[int]:
    """The integer of a canonical decimal id ("0", "12"), else None.

    "01", "1.0", "+1", "-1", " 1", "1e3" and "" are not canonical: a server
    never hands out such an id, so such a cursor can never be in a window.
    """
    if not isinstance(value, str) or not _CANONICAL_ID.fullmatch(value):
        return None
    seq = int(value)
    return seq if seq <= _MAX_EXACT_SCORE else None


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, (bytes, bytearray)) else str(value)


# -- the replay window -------------------------------------------------------------


class CorruptReplayEntry(ValueError):
    """A replay member in Redis that is not ``{"transactionId": str, "accepted": bool}``."""


# ZADD then trim to the highest-scored `cap` members, in one atomic step.
_RECORD_CAPPED = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, ARGV[3])
return 0
"""


class RedisReplayStore:
    """The replay window of every ShareData in one shared Redis.

    One sorted set per ShareData, ``<key_prefix><share_data_id>``; score = the
    numeric transaction id, member = the compact JSON
    ``{"transactionId":"3","accepted":true}`` exactly as the TypeScript store
    writes it, so both kinds of node can record the same transaction
    idempotently. There is no per-node cache: every node reads the shared
    window. ``entries_since`` and ``entries`` are coroutines; ``record`` and
    ``forget`` return a future to await, so the broadcast path that records
    every transaction creates no task of its own for it.

    Writes (``record``, ``forget``) are group-committed: the calls made while
    a write is in flight go out together as one pipeline, in call order, on
    one connection. A burst of transactions therefore costs a few round
    trips, not one pooled connection each, and a ``forget`` never overtakes
    a ``record`` issued before it. Each call still resolves (or raises) on
    its own outcome.
    """

    def __init__(
        self,
        redis_client: Any,
        max_entries_per_share_data: int = 100,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        if isinstance(max_entries_per_share_data, bool) or not isinstance(max_entries_per_share_data, int):
            raise TypeError("max_entries_per_share_data must be an int")
        if max_entries_per_share_data < 1:
            raise ValueError("max_entries_per_share_data must be >= 1")
        if not isinstance(key_prefix, str):
            raise TypeError("key_prefix must be a string")
        self.redis = redis_client
        self.max_entries_per_share_data = max_entries_per_share_data
        self.key_prefix = key_prefix
        self._trim_stop = str(-(max_entries_per_share_data + 1))
        self._record_capped = redis_client.register_script(_RECORD_CAPPED)
        # (key, record args or None for DEL, future) waiting for the writer
        self._writes: list[tuple[str, Optional[list[Any]], asyncio.Future[None]]] = []
        self._writer: Optional[asyncio.Task[None]] = None

    def key(self, share_data_id: str) -> str:
        """The Redis key of ``share_data_id``'s window."""
        return f"{self.key_prefix}{share_data_id}"

    @staticmethod
    def encode_member(entry: ReplayEntry) -> bytes:
        """The member bytes of ``entry``, byte-identical to the TypeScript ``JSON.stringify``."""
        accepted = entry.accepted
        if not isinstance(accepted, bool):
            raise TypeError(f"ReplayEntry.accepted must be a bool, got {type(accepted).__name__}")
        return orjson.dumps({"transactionId": entry.transaction_id, "accepted": accepted})

    def record(self, share_data_id: str, entry: ReplayEntry) -> "asyncio.Future[None]":
        """Add ``entry`` (ZADD) and trim the window to the cap, atomically; await the future returned.

        Raises ValueError at once for a transaction id that is not a
        canonical decimal integer (it could not be scored, nor found again).
        """
        seq = _canonical_seq(entry.transaction_id)
        if seq is None:
            raise ValueError(
                f"transaction id {entry.transaction_id!r} is not a canonical decimal integer"
                f" <= {_MAX_EXACT_SCORE}; it cannot be scored in the replay window"
            )
        member = self.encode_member(entry)
        return self._write(self.key(share_data_id), [str(seq), member, self._trim_stop])

    async def entries_since(self, share_data_id: str, since: str) -> Optional[list[ReplayEntry]]:
        """Entries with a transaction id numerically greater than ``since``, oldest first.

        None (cursor not found) when ``since`` is not a canonical decimal
        integer, the window is empty, or ``since`` is below the lowest or
        above the highest retained id. A cursor inside the window that is
        not itself retained (a gap) still answers what follows it, as the
        TypeScript store does. Raises :class:`CorruptReplayEntry` for a member
        that does not decode.
        """
        seq = _canonical_seq(since)
        if seq is None:
            return None
        key = self.key(share_data_id)
        # One MULTI: the bounds and the range come from the same window.
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrange(key, 0, 0, withscores=True)
        pipe.zrange(key, -1, -1, withscores=True)
        pipe.zrangebyscore(key, f"({seq}", "+inf")
        lowest, highest, members = await pipe.execute()
        if not lowest or not highest:
            return None
        if seq < float(lowest[0][1]) or seq > float(highest[0][1]):
            return None
        return [self._decode(key, member) for member in members]

    async def entries(self, share_data_id: str) -> list[ReplayEntry]:
        """The whole retained window of ``share_data_id``, oldest first."""
        key = self.key(share_data_id)
        return [self._decode(key, member) for member in await self.redis.zrange(key, 0, -1)]

    def forget(self, share_data_id: str) -> "asyncio.Future[None]":
        """Drop the whole window (DEL), after the records issued before it; await the future returned."""
        return self._write(self.key(share_data_id), None)

    # group commit

    def _write(self, key: str, record_args: Optional[list[Any]]) -> "asyncio.Future[None]":
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._writes.append((key, record_args, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending(), name=f"RedisReplayStore writer {self.key_prefix}")
        return done

    async def _write_pending(self) -> None:
        while self._writes:
            batch, self._writes = self._writes[:_MAX_PIPELINE], self._writes[_MAX_PIPELINE:]
            try:
                if len(batch) == 1:
                    key, record_args, _ = batch[0]
                    if record_args is None:
                        await self.redis.delete(key)
                    else:
                        await self._record_capped(keys=[key], args=record_args)
                    results: list[Any] = [None]
                else:
                    pipe = self.redis.pipeline(transaction=False)
                    for key, record_args, _ in batch:
                        if record_args is None:
                            pipe.delete(key)
                        else:
                            await self._record_capped(keys=[key], args=record_args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
            except asyncio.CancelledError:
                for _, _, done in batch:
                    done.cancel()
                raise
            except Exception as exc:
                results = [exc] * len(batch)
            for (_, _, done), result in zip(batch, results):
                if done.done():
                    continue  # its caller went away
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(None)

    @staticmethod
    def _decode(key: str, member: Any) -> ReplayEntry:
        try:
            obj = decode_json(member)
        except InvalidMessage as exc:
            raise CorruptReplayEntry(f"corrupt replay member in {key}: {exc}: {member!r}") from None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("transactionId"), str)
            or not isinstance(obj.get("accepted"), bool)
        ):
            raise CorruptReplayEntry(
                f"corrupt replay member in {key}: expected"
                f' {{"transactionId": string, "accepted": boolean}}, got {member!r}'
            )
        return ReplayEntry(obj["transactionId"], obj["accepted"])


# -- the channel registry ----------------------------------------------------------

_PUBLISH, _SUBSCRIBE, _UNSUBSCRIBE, _BARRIER = range(4)
_POLL_SECONDS = 1.0
"""Longest a pub/sub read waits before the reader looks at its state again."""


class _Delivery:
    """What one channel has delivered on this node, and its own echoes still to come."""

    __slots__ = ("mark", "newest", "own", "lifecycle")

    def __init__(self) -> None:
        self.mark = NO_TRANSACTION
        """The highest transaction id delivered here in this epoch."""
        self.lifecycle: Optional[bytes] = None
        """The last payload Redis delivered on the channel (an own echo included), when it was a ``lifecycle`` one."""
        self.newest = NO_TRANSACTION
        """An upper bound of the subscribers' snapshot ids: frames above it go to all."""
        self.own: deque[tuple[Any, bytes, bool]] = deque()
        """This node's PUBLISHes whose echo has not come back: (id, or the payload for a frame
        without one; the payload; whether it is a ``lifecycle`` frame), oldest first."""


def _log_error(error: BaseException) -> None:
    logger.warning("redis channel registry: %r", error, exc_info=error)


class RedisChannelRegistry:
    """A channel registry whose broadcasts reach subscribers on every node.

    This node's subscribers get its broadcasts at once (local-first); the
    other nodes' through Redis. ``redis_client`` is a ``redis.asyncio.Redis``; PUBLISHes go through it and
    the subscriptions through one dedicated pub/sub connection
    (``redis_client.pubsub()``). ``on_error(exception)`` is called for every
    Redis failure and every invalid payload received (default: log a
    warning); it must not raise.

    Keyword options: ``max_pending_publishes`` bounds the PUBLISHes waiting
    for Redis (beyond it a broadcast is dropped and reported, so a dead
    Redis cannot eat the memory); ``reconnect_min_delay`` /
    ``reconnect_max_delay`` bound the pub/sub reconnection backoff (doubling
    from min to max); ``confirm_timeout`` bounds how long the command queue
    waits for Redis to confirm a SUBSCRIBE/UNSUBSCRIBE; ``command_timeout``
    bounds one attempt of a Redis command (a Redis that stopped answering
    fails it instead of stalling the queue); ``retry`` (a
    ``redis.asyncio.retry.Retry``; default: 2 retries, exponential backoff
    from ``reconnect_min_delay`` to ``reconnect_max_delay``) is how often a
    failed PUBLISH is attempted again before its frames are dropped. Every
    failed attempt is reported to ``on_error``.

    Use it from inside the event loop (its tasks start on first use) and
    ``await registry.close()`` when done.
    """

    shared = True
    """Shared by every node: another node's frames, ``lifecycle`` ones included, come through it."""

    def __init__(
        self,
        redis_client: Any,
        channel_prefix: str = DEFAULT_CHANNEL_PREFIX,
        *,
        on_error: Optional[Callable[[BaseException], Any]] = None,
        max_pending_publishes: int = 10_000,
        reconnect_min_delay: float = 0.05,
        reconnect_max_delay: float = 2.0,
        confirm_timeout: float = 5.0,
        command_timeout: float = 1.0,
        retry: Any = None,
    ) -> None:
        if not isinstance(channel_prefix, str):
            raise TypeError("channel_prefix must be a string")
        if isinstance(max_pending_publishes, bool) or not isinstance(max_pending_publishes, int):
            raise TypeError("max_pending_publishes must be an int")
        if max_pending_publishes < 1:
            raise ValueError("max_pending_publishes must be >= 1")
        if not 0 < reconnect_min_delay <= reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if not confirm_timeout > 0:
            raise ValueError("confirm_timeout must be > 0")
        if not command_timeout > 0:
            raise ValueError("command_timeout must be > 0")
        # redis-py is the caller's (the ``redis`` extra): imported only when a registry is made.
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if retry is None:
            retry = Retry(ExponentialBackoff(cap=reconnect_max_delay, base=reconnect_min_delay), retries=2)
        elif not callable(getattr(retry, "call_with_retry", None)):
            raise TypeError("retry must be a redis.asyncio.retry.Retry")
        self.redis = redis_client
        self.channel_prefix = channel_prefix
        self.on_error: Callable[[BaseException], Any] = on_error if on_error is not None else _log_error
        self.max_pending_publishes = max_pending_publishes
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.confirm_timeout = confirm_timeout
        self.command_timeout = command_timeout
        self.retry = retry
        self._timeout_error = RedisTimeoutError

        # Local subscribers, as in InMemoryChannelRegistry; each maps to the
        # lastTransactionId (a number) of the snapshot it took.
        self._local: dict[str, dict[Any, int]] = {}
        # Per channel subscribed (or being subscribed, or unsubscribed) at
        # Redis: what was delivered, and the own echoes still to come.
        self._deliveries: dict[str, _Delivery] = {}

        self._ops: deque[tuple[Any, ...]] = deque()
        self._pending_publishes = 0
        self._wake_worker = asyncio.Event()
        self._wake_reader = asyncio.Event()
        self._worker: Optional[asyncio.Task[None]] = None
        self._reader: Optional[asyncio.Task[None]] = None

        self._pubsub: Any = None
        self._pubsub_lock = asyncio.Lock()
        self._broken = False
        self._ping_sent_at: Optional[float] = None
        self._delay = reconnect_min_delay
        # (kind, channel) -> futures resolved by the reader on Redis' confirmation
        self._confirmations: dict[tuple[int, str], list[asyncio.Future[None]]] = {}
        self._closed = False
        self._closing: Optional[asyncio.Future[None]] = None
        # Called once per local fan-out (see registry.FanoutObserver).
        self.fanout_observer: Optional[Callable[[int, int], None]] = None

    # -- the ChannelRegistry API (synchronous) --------------------------------------

    def subscribe(self, share_data_id: str, connection: Any) -> None:
        subscribers = self._local.get(share_data_id)
        delivery = self._deliveries.get(share_data_id)
        if subscribers is None:
            subscribers = self._local[share_data_id] = {}
            self._enqueue((_SUBSCRIBE, self._channel(share_data_id)))
            if delivery is not None:
                delivery.lifecycle = None  # subscribed again: what came before is no copy to compare with
        if delivery is None:
            delivery = self._deliveries[share_data_id] = _Delivery()
        # Again for a subscriber already here (it keeps its place): it has just
        # taken a new snapshot. Without one to read, what this node delivered
        # so far stands for it.
        snapshot = snapshot_number(connection, share_data_id)
        if snapshot is None:
            snapshot = delivery.mark
        subscribers[connection] = snapshot
        if snapshot > delivery.newest:
            delivery.newest = snapshot

    def unsubscribe(self, share_data_id: str, connection: Any) -> None:
        subscribers = self._local.get(share_data_id)
        if subscribers is not None and connection in subscribers:
            del subscribers[connection]
            if not subscribers:
                del self._local[share_data_id]
                self._enqueue((_UNSUBSCRIBE, self._channel(share_data_id)))

    def broadcast(self, share_data_id: str, message: ServerMessage | dict[str, Any]) -> None:
        """Deliver ``message`` to the local subscribers now, and PUBLISH it for the other nodes.

        Raises :class:`~safe_fast.messages.EncodeError` at once if the message
        cannot be JSON; everything later is reported to ``on_error``.
        """
        payload = encode_message(message)
        if self._closed:
            return
        delivery = self._deliveries.get(share_data_id)
        echo: Any = None
        kind: Any = None
        if delivery is not None:
            kind, sequence = kind_and_number(message)
            echo = payload if sequence is None else sequence
            subscribers = self._local.get(share_data_id)
            if subscribers:
                self._fan_out(delivery, subscribers, core.encode_frame(payload), sequence)
            if sequence is not None:
                if sequence > delivery.mark:
                    delivery.mark = sequence
            elif kind == "lifecycle":
                self._new_epoch(delivery, subscribers)
        if self._pending_publishes >= self.max_pending_publishes:
            self._report(
                RuntimeError(
                    f"{self._pending_publishes} PUBLISHes already wait for Redis;"
                    f" dropping a {getattr(message, 'type', 'message')} frame for {share_data_id!r}"
                )
            )
            return
        if delivery is not None:
            # Subscribed at Redis (or about to be): this PUBLISH comes back.
            own = delivery.own
            own.append((echo, payload, kind == "lifecycle"))
            if len(own) > self.max_pending_publishes:
                own.popleft()  # long lost: never let them pile up
        self._enqueue((_PUBLISH, self._channel(share_data_id), payload, echo))
        self._pending_publishes += 1

    def remove_connection(self, connection: Any) -> None:
        # The connection's own list (a ServerConnection has one) spares a
        # scan of every channel per disconnect.
        channels = getattr(connection, "subscriptions", None)
        if channels is None:
            channels = [i for i, subs in self._local.items() if connection in subs]
        for share_data_id in list(channels):
            self.unsubscribe(share_data_id, connection)

    def remove_channel(self, share_data_id: str) -> None:
        """Drop every local subscriber of ``share_data_id`` and UNSUBSCRIBE.

        The ``lifecycle removed`` frame broadcast just before has already
        reached them: local delivery does not wait for Redis.
        """
        if self._local.pop(share_data_id, None) is not None:
            self._enqueue((_UNSUBSCRIBE, self._channel(share_data_id)))

    # -- inspection and lifecycle --------------------------------------------------

    def subscribers(self, share_data_id: str) -> list[Any]:
        """The local connections subscribed to ``share_data_id``."""
        return list(self._local.get(share_data_id, ()))

    def channel_count(self) -> int:
        """How many channels have local subscribers."""
        return len(self._local)

    @property
    def closed(self) -> bool:
        return self._closed

    async def flush(self) -> None:
        """Wait until every command queued before this call has been handled.

        PUBLISHes acknowledged by Redis, SUBSCRIBE/UNSUBSCRIBE confirmed (or
        their wait timed out), failures reported. Returns at once when closed.
        """
        if self._closed:
            return
        done = asyncio.get_running_loop().create_future()
        self._enqueue((_BARRIER, done))
        await done

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout`` s), then stop.

        Stops the worker and reader tasks and closes the pub/sub connection;
        the Redis client passed in stays open. Idempotent. After it, the
        registry keeps its local map but sends nothing to Redis.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        try:
            worker = self._worker
            if worker is not None and not worker.done():
                drained = loop.create_future()
                self._ops.append((_BARRIER, drained))
                self._wake_worker.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(drained, timeout)
            self._closed = True
            for task in (self._worker, self._reader):
                if task is not None and not task.done():
                    task.cancel()
            for task in (self._worker, self._reader):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self._worker = self._reader = None
            for item in self._ops:
                if item[0] == _BARRIER and not item[1].done():
                    item[1].set_result(None)
            self._ops.clear()
            self._pending_publishes = 0
            self._release_confirmations()
            self._deliveries.clear()
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                await self._close_pubsub(pubsub)
        finally:
            self._closed = True
            self._closing.set_result(None)

    # -- the command queue ---------------------------------------------------------

    def _channel(self, share_data_id: str) -> str:
        return f"{self.channel_prefix}{share_data_id}"

    def _share_data_id(self, channel: str) -> str:
        return channel[len(self.channel_prefix) :]

    def _enqueue(self, op: tuple[Any, ...]) -> None:
        if self._closed:
            if op[0] == _BARRIER:
                op[1].set_result(None)
            return
        if self._worker is None:
            loop = asyncio.get_running_loop()  # RuntimeError outside the event loop
            self._worker = loop.create_task(self._work(), name=f"RedisChannelRegistry worker {self.channel_prefix}")
            self._reader = loop.create_task(self._read(), name=f"RedisChannelRegistry reader {self.channel_prefix}")
        self._ops.append(op)
        self._wake_worker.set()

    def _report(self, error: BaseException) -> None:
        try:
            self.on_error(error)
        except Exception:
            logger.exception("on_error raised while reporting %r", error)

    async def _work(self) -> None:
        ops = self._ops
        while not self._closed:  # (see _read)
            if not ops:
                self._wake_worker.clear()
                await self._wake_worker.wait()
                continue
            op = ops.popleft()
            kind = op[0]
            batch = [op]
            try:
                if kind == _PUBLISH:
                    while ops and ops[0][0] == _PUBLISH and len(batch) < _MAX_PIPELINE:
                        batch.append(ops.popleft())
                    self._pending_publishes -= len(batch)
                    if not await self._publish(batch):
                        self._no_echo(batch)
                elif kind == _BARRIER:
                    if not op[1].done():
                        op[1].set_result(None)
                else:
                    # A run of SUBSCRIBEs (or UNSUBSCRIBEs) is one command.
                    channels = [op[1]]
                    while ops and ops[0][0] == kind and len(channels) < _MAX_PIPELINE:
                        channels.append(ops.popleft()[1])
                    await self._pubsub_command(kind, channels)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._report(exc)

    def _no_echo(self, batch: list[tuple[Any, ...]]) -> None:
        """These PUBLISHes failed: no echo of theirs will come back."""
        for _, channel, payload, echo in batch:
            if echo is not None:
                delivery = self._deliveries.get(self._share_data_id(channel))
                if delivery is not None:
                    for entry in delivery.own:
                        if entry[0] == echo and entry[1] is payload:
                            delivery.own.remove(entry)
                            break

    async def _bounded(self, command: Awaitable[Any], what: str) -> Any:
        """One attempt of a Redis command, failed after ``command_timeout``."""
        try:
            return await asyncio.wait_for(command, self.command_timeout)
        except asyncio.TimeoutError:
            raise self._timeout_error(f"Redis did not answer {what} within {self.command_timeout}s") from None

    async def _publish(self, batch: list[tuple[Any, ...]]) -> bool:
        """PUBLISH ``batch`` with the retry policy; False once every attempt failed (each reported)."""

        def attempt() -> Awaitable[Any]:
            if len(batch) == 1:
                _, channel, payload, _ = batch[0]
                return self._bounded(self.redis.publish(channel, payload), "PUBLISH")
            pipe = self.redis.pipeline(transaction=False)
            for _, channel, payload, _ in batch:
                pipe.publish(channel, payload)
            return self._bounded(pipe.execute(), f"{len(batch)} PUBLISHes")

        reported: Optional[BaseException] = None

        async def failed(error: BaseException) -> None:
            nonlocal reported
            reported = error
            self._report(error)

        try:
            await self.retry.call_with_retry(attempt, failed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if exc is not reported:  # not one the policy retries: reported here
                self._report(exc)
            return False
        return True

    async def _pubsub_command(self, kind: int, channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        async with self._pubsub_lock:
            if self._broken:
                # The reader is reconnecting; it subscribes what the local
                # map holds then, which already includes this command.
                return
            pubsub = self._pubsub
            if pubsub is None:
                if kind == _UNSUBSCRIBE:
                    # No pub/sub connection: nothing is subscribed, no echo to wait for.
                    self._unsubscribed(channels)
                    return
                pubsub = self._pubsub = self.redis.pubsub()
            waiting: list[tuple[tuple[int, str], asyncio.Future[None]]] = []
            for channel in channels:
                confirmed: asyncio.Future[None] = loop.create_future()
                self._confirmations.setdefault((kind, channel), []).append(confirmed)
                waiting.append(((kind, channel), confirmed))
            try:
                if kind == _SUBSCRIBE:
                    await self._bounded(pubsub.subscribe(*channels), "SUBSCRIBE")
                else:
                    await self._bounded(pubsub.unsubscribe(*channels), "UNSUBSCRIBE")
            except BaseException:
                for key, confirmed in waiting:
                    self._forget_confirmation(key, confirmed)
                if kind == _UNSUBSCRIBE:
                    self._unsubscribed(channels)
                self._broken = True
                self._wake_reader.set()
                raise
            self._wake_reader.set()
        try:
            await asyncio.wait_for(asyncio.gather(*(f for _, f in waiting)), self.confirm_timeout)
        except asyncio.TimeoutError:
            late = [key[1] for key, confirmed in waiting if not confirmed.done() or confirmed.cancelled()]
            for key, confirmed in waiting:
                self._forget_confirmation(key, confirmed)
            if kind == _UNSUBSCRIBE:
                self._unsubscribed(late)
            verb = "SUBSCRIBE" if kind == _SUBSCRIBE else "UNSUBSCRIBE"
            self._report(
                TimeoutError(f"Redis did not confirm {verb} {' '.join(late)} within {self.confirm_timeout}s")
            )

    def _unsubscribed(self, channels: list[str]) -> None:
        """No more echoes on these channels: forget what they delivered, unless subscribed again."""
        for channel in channels:
            share_data_id = self._share_data_id(channel)
            if share_data_id not in self._local:
                self._deliveries.pop(share_data_id, None)

    def _forget_confirmation(self, key: tuple[int, str], future: asyncio.Future[None]) -> None:
        waiting = self._confirmations.get(key)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self._confirmations[key]

    def _confirm(self, kind: int, channel: str) -> None:
        for future in self._confirmations.pop((kind, channel), ()):
            if not future.done():
                future.set_result(None)

    def _release_confirmations(self) -> None:
        waiting, self._confirmations = self._confirmations, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    # -- the pub/sub reader --------------------------------------------------------

    async def _read(self) -> None:
        # Until closed, not only until cancelled: redis-py can swallow a
        # cancellation that lands as get_message's own timeout expires.
        while not self._closed:
            if self._broken:
                await self._reconnect()
                continue
            pubsub = self._pubsub
            if pubsub is None or pubsub.connection is None:
                self._wake_reader.clear()
                await self._wake_reader.wait()
                continue
            try:
                message = await pubsub.get_message(timeout=_POLL_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if pubsub is not self._pubsub:
                    continue  # replaced meanwhile
                self._report(exc)
                self._broken = True
                continue
            if message is None:
                await self._check_alive(pubsub)
                continue
            self._delay = self.reconnect_min_delay
            self._ping_sent_at = None  # anything heard shows the connection alive
            try:
                self._on_pubsub_message(message)
            except Exception as exc:  # never let one message stop the reader
                self._report(exc)

    async def _check_alive(self, pubsub: Any) -> None:
        """Send a quiet pub/sub connection a PING; replace it if no answer comes within ``command_timeout``.

        A Redis that stopped (or a network that went silent) closes no
        socket: without this, the node would wait for its channels forever.
        """
        loop = asyncio.get_running_loop()
        if self._ping_sent_at is None:
            self._ping_sent_at = loop.time()
            try:
                async with self._pubsub_lock:
                    if pubsub is self._pubsub and not self._broken:
                        await self._bounded(pubsub.ping(), "PING")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._report(exc)
                self._broken = True
        elif loop.time() - self._ping_sent_at > self.command_timeout:
            self._report(
                self._timeout_error(
                    f"Redis did not answer PING on the pub/sub connection within {self.command_timeout}s"
                )
            )
            self._broken = True
        else:
            return
        if self._broken:
            self._ping_sent_at = None

    async def _reconnect(self) -> None:
        """Back off, then a fresh pub/sub connection subscribed to what the local map holds."""
        delay = self._delay
        self._delay = min(delay * 2, self.reconnect_max_delay)
        await asyncio.sleep(delay)
        async with self._pubsub_lock:
            old, self._pubsub = self._pubsub, None
            if old is not None:
                await self._close_pubsub(old)
            # Channels left without local subscribers are not subscribed again.
            for share_data_id in [i for i in self._deliveries if i not in self._local]:
                del self._deliveries[share_data_id]
            wanted = [self._channel(share_data_id) for share_data_id in self._local]
            if wanted:
                pubsub = self.redis.pubsub()
                try:
                    await self._bounded(pubsub.subscribe(*wanted), "SUBSCRIBE")
                except asyncio.CancelledError:
                    await self._close_pubsub(pubsub)
                    raise
                except Exception as exc:
                    await self._close_pubsub(pubsub)
                    self._report(exc)
                    return  # still broken: the next round backs off further
                self._pubsub = pubsub
            self._broken = False
            # Whatever the queue was waiting for is moot: the subscriptions
            # now match the local map, and later commands apply on top.
            self._release_confirmations()

    @staticmethod
    async def _close_pubsub(pubsub: Any) -> None:
        close = getattr(pubsub, "aclose", None) or pubsub.close
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close(), 2.0)

    def _on_pubsub_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        kind = _text(kind) if kind is not None else ""
        if kind == "message":
            self._deliver(_text(message["channel"]), message["data"])
        elif kind == "subscribe":
            self._confirm(_SUBSCRIBE, _text(message["channel"]))
        elif kind == "unsubscribe":
            channel = _text(message["channel"])
            if channel.startswith(self.channel_prefix):
                self._unsubscribed([channel])
            self._confirm(_UNSUBSCRIBE, channel)

    def _deliver(self, channel: str, payload: Any) -> None:
        """One payload from Redis: an own echo or nothing new is dropped, else one frame -> local subscribers."""
        if not channel.startswith(self.channel_prefix):
            return
        share_data_id = self._share_data_id(channel)
        delivery = self._deliveries.get(share_data_id)
        if delivery is None:
            return  # nobody here, and no echo of ours under way
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif not isinstance(payload, bytes):
            payload = bytes(payload)
        own = delivery.own
        if own and own[0][1] == payload:
            # The next own echo, byte for byte (the common case): no need to parse it.
            _, _, is_lifecycle = own.popleft()
            delivery.lifecycle = payload if is_lifecycle else None
            return
        try:
            message = parse_server_message(payload)
        except InvalidMessage as exc:
            self._report(InvalidMessage([f"payload on {channel}: {exc}"]))
            return
        kind, sequence = kind_and_number(message)
        if own and self._own_echo(own, payload if sequence is None else sequence):
            # Delivered here when it was broadcast.
            delivery.lifecycle = payload if kind == "lifecycle" else None
            return
        subscribers = self._local.get(share_data_id)
        previous, delivery.lifecycle = delivery.lifecycle, (payload if kind == "lifecycle" else None)
        if sequence is not None:
            if sequence <= delivery.mark:
                return  # a copy of one delivered, or older than one delivered
            delivery.mark = sequence
        elif kind == "lifecycle":
            self._new_epoch(delivery, subscribers)
            if payload == previous:
                # Right after the same frame: a PUBLISH retried after a
                # timeout can land twice. Not delivered again (a lifecycle
                # frame carries no id; a real repeat of it changes nothing).
                return
        if subscribers:
            try:
                self._fan_out(delivery, subscribers, core.encode_frame(payload), sequence)
            except Exception as exc:
                self._report(exc)

    @staticmethod
    def _own_echo(own: deque[tuple[Any, bytes, bool]], echo: Any) -> bool:
        """Whether ``echo`` is one of this node's PUBLISHes coming back (then taken off ``own``)."""
        if own[0][0] == echo:
            own.popleft()
            return True
        for index, (mine, _payload, _lifecycle) in enumerate(own):
            if mine == echo:
                for _ in range(index + 1):  # those before it were lost on the way
                    own.popleft()
                return True
        return False

    def _fan_out(self, delivery: _Delivery, subscribers: dict[Any, int], frame: bytes, sequence: Optional[int]) -> None:
        delivered = core.fanout(frame, recipients(subscribers, sequence, delivery.newest))
        if self.fanout_observer is not None:
            self.fanout_observer(delivered, len(frame))

    @staticmethod
    def _new_epoch(delivery: _Delivery, subscribers: Optional[dict[Any, int]]) -> None:
        """After a ``lifecycle`` frame the ids may start again from 1: forget the marks."""
        if subscribers and delivery.newest != NO_TRANSACTION:  # else every mark is NO_TRANSACTION already
            forget_snapshots(subscribers)
        delivery.mark = delivery.newest = NO_TRANSACTION
