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

A second task, the reader, owns the reads of the pub/sub connection. Every
payload it receives is validated with :func:`parse_server_message`, encoded
into one WebSocket frame once and queued on every local subscriber; a node
delivers to its own subscribers ONLY through this path (its own publishes
come back to it), so there is one delivery path and no duplicate. When the
pub/sub connection fails, the reader reports the error to ``on_error``,
waits a bounded exponential backoff, opens a new pub/sub connection and
subscribes every channel that has local subscribers at that moment; commands
still queued behind it are then applied in order, which converges on the
local map.

Nothing of this ever blocks the caller: a Redis failure becomes an
``on_error`` call (default: a log line) and, for live frames, a lost frame.
Live delivery across nodes is at-most-once; the replay window is the
recovery path (see docs/scaleout.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from typing import Any, Callable, Optional

import orjson

from ._backend import core
from .messages import InvalidMessage, ServerMessage, decode_json, encode_message, parse_server_message
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
    window. All methods are coroutines.

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

    async def record(self, share_data_id: str, entry: ReplayEntry) -> None:
        """Add ``entry`` (ZADD) and trim the window to the cap, atomically.

        Raises ValueError for a transaction id that is not a canonical
        decimal integer (it could not be scored, nor found again).
        """
        seq = _canonical_seq(entry.transaction_id)
        if seq is None:
            raise ValueError(
                f"transaction id {entry.transaction_id!r} is not a canonical decimal integer"
                f" <= {_MAX_EXACT_SCORE}; it cannot be scored in the replay window"
            )
        member = self.encode_member(entry)
        await self._write(self.key(share_data_id), [str(seq), member, self._trim_stop])

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

    async def forget(self, share_data_id: str) -> None:
        """Drop the whole window (DEL), after the records issued before it."""
        await self._write(self.key(share_data_id), None)

    # group commit

    async def _write(self, key: str, record_args: Optional[list[Any]]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._writes.append((key, record_args, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending(), name=f"RedisReplayStore writer {self.key_prefix}")
        await done

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
_ECHO_LOOKAHEAD = 8
"""Own PUBLISHes an echo may overtake: ones whose loss was not seen."""


def _log_error(error: BaseException) -> None:
    logger.warning("redis channel registry: %r", error, exc_info=error)


class RedisChannelRegistry:
    """A channel registry whose broadcasts reach subscribers on every node.

    ``redis_client`` is a ``redis.asyncio.Redis``; PUBLISHes go through it and
    the subscriptions through one dedicated pub/sub connection
    (``redis_client.pubsub()``). ``on_error(exception)`` is called for every
    Redis failure and every invalid payload received (default: log a
    warning); it must not raise.

    Keyword options: ``max_pending_publishes`` bounds the PUBLISHes waiting
    for Redis (beyond it a broadcast is dropped and reported, so a dead
    Redis cannot eat the memory); ``reconnect_min_delay`` /
    ``reconnect_max_delay`` bound the pub/sub reconnection backoff (doubling
    from min to max); ``confirm_timeout`` bounds how long the command queue
    waits for Redis to confirm a SUBSCRIBE/UNSUBSCRIBE.

    Use it from inside the event loop (its tasks start on first use) and
    ``await registry.close()`` when done.
    """

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
        self.redis = redis_client
        self.channel_prefix = channel_prefix
        self.on_error: Callable[[BaseException], Any] = on_error if on_error is not None else _log_error
        self.max_pending_publishes = max_pending_publishes
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.confirm_timeout = confirm_timeout

        # Local subscribers, as in InMemoryChannelRegistry; each maps to the
        # count of this node's PUBLISHes when it subscribed.
        self._local: dict[str, dict[Any, int]] = {}
        # Subscribers of a removed channel, kept until Redis confirms its
        # UNSUBSCRIBE so that the frames published before it (the
        # `lifecycle removed` one) still reach them.
        self._draining: dict[str, dict[Any, int]] = {}
        # This node's PUBLISHes so far, and those of channels with local
        # subscribers whose echo from Redis has not come back yet, as
        # (number, payload). A subscriber's snapshot already holds what this
        # node published before it subscribed: those echoes skip it.
        self._published = 0
        self._echoes: dict[str, deque[tuple[int, bytes, float]]] = {}
        # Per channel, the count when its newest local subscriber subscribed.
        self._newest: dict[str, int] = {}

        self._ops: deque[tuple[Any, ...]] = deque()
        self._pending_publishes = 0
        self._wake_worker = asyncio.Event()
        self._wake_reader = asyncio.Event()
        self._worker: Optional[asyncio.Task[None]] = None
        self._reader: Optional[asyncio.Task[None]] = None

        self._pubsub: Any = None
        self._pubsub_lock = asyncio.Lock()
        self._broken = False
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
        if subscribers is None:
            subscribers = self._local[share_data_id] = {}
            self._enqueue((_SUBSCRIBE, self._channel(share_data_id)))
        # Again for a subscriber already here (it keeps its place): it has just
        # taken a new snapshot.
        subscribers[connection] = self._newest[share_data_id] = self._published

    def unsubscribe(self, share_data_id: str, connection: Any) -> None:
        subscribers = self._local.get(share_data_id)
        if subscribers is not None and connection in subscribers:
            del subscribers[connection]
            if not subscribers:
                del self._local[share_data_id]
                self._enqueue((_UNSUBSCRIBE, self._channel(share_data_id)))

    def broadcast(self, share_data_id: str, message: ServerMessage | dict[str, Any]) -> None:
        """PUBLISH ``message`` (always; local subscribers get it back from Redis).

        Raises :class:`~safe_fast.messages.EncodeError` at once if the message
        cannot be JSON; everything later is reported to ``on_error``.
        """
        payload = encode_message(message)
        if self._closed:
            return
        if self._pending_publishes >= self.max_pending_publishes:
            self._report(
                RuntimeError(
                    f"{self._pending_publishes} PUBLISHes already wait for Redis;"
                    f" dropping a {getattr(message, 'type', 'message')} frame for {share_data_id!r}"
                )
            )
            return
        self._enqueue((_PUBLISH, self._channel(share_data_id), payload))
        self._pending_publishes += 1
        self._published += 1
        if share_data_id in self._local:
            now = time.monotonic()
            echoes = self._echoes.get(share_data_id)
            if echoes is None:
                echoes = self._echoes[share_data_id] = deque()
            else:
                self._expire(echoes, now)
            echoes.append((self._published, payload, now))

    def remove_connection(self, connection: Any) -> None:
        for share_data_id in [i for i, subs in self._local.items() if connection in subs]:
            self.unsubscribe(share_data_id, connection)
        for subscribers in self._draining.values():
            subscribers.pop(connection, None)

    def remove_channel(self, share_data_id: str) -> None:
        """Drop every local subscriber of ``share_data_id`` and UNSUBSCRIBE.

        Frames published before this call (the ``lifecycle removed`` that
        precedes it) still reach those subscribers: they are kept until Redis
        confirms the UNSUBSCRIBE, which comes after them on the connection.
        """
        subscribers = self._local.pop(share_data_id, None)
        if subscribers is None:
            return
        if not self._closed:
            previous = self._draining.get(share_data_id)
            if previous:
                previous.update(subscribers)
            else:
                self._draining[share_data_id] = subscribers
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
            self._draining.clear()
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
        while True:
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
                    await self._publish(batch)
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
                if kind == _PUBLISH:
                    self._no_echo(batch)
                self._report(exc)

    def _no_echo(self, batch: list[tuple[Any, ...]]) -> None:
        """These PUBLISHes failed: no echo of theirs will come back."""
        for _, channel, payload in batch:
            echoes = self._echoes.get(self._share_data_id(channel))
            if echoes:
                for index, (_, mine, _) in enumerate(echoes):
                    if mine is payload:
                        del echoes[index]
                        break

    async def _publish(self, batch: list[tuple[Any, ...]]) -> None:
        if len(batch) == 1:
            _, channel, payload = batch[0]
            await self.redis.publish(channel, payload)
            return
        pipe = self.redis.pipeline(transaction=False)
        for _, channel, payload in batch:
            pipe.publish(channel, payload)
        await pipe.execute()

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
                    # No pub/sub connection: nothing is subscribed, nothing to drain.
                    self._stop_draining(channels)
                    return
                pubsub = self._pubsub = self.redis.pubsub()
            waiting: list[tuple[tuple[int, str], asyncio.Future[None]]] = []
            for channel in channels:
                confirmed: asyncio.Future[None] = loop.create_future()
                self._confirmations.setdefault((kind, channel), []).append(confirmed)
                waiting.append(((kind, channel), confirmed))
            try:
                if kind == _SUBSCRIBE:
                    await pubsub.subscribe(*channels)
                else:
                    await pubsub.unsubscribe(*channels)
            except BaseException:
                for key, confirmed in waiting:
                    self._forget_confirmation(key, confirmed)
                if kind == _UNSUBSCRIBE:
                    self._stop_draining(channels)
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
                self._stop_draining(late)
            verb = "SUBSCRIBE" if kind == _SUBSCRIBE else "UNSUBSCRIBE"
            self._report(
                TimeoutError(f"Redis did not confirm {verb} {' '.join(late)} within {self.confirm_timeout}s")
            )

    def _stop_draining(self, channels: list[str]) -> None:
        for channel in channels:
            self._draining.pop(self._share_data_id(channel), None)

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
        while True:
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
            if message is not None:
                self._delay = self.reconnect_min_delay
                try:
                    self._on_pubsub_message(message)
                except Exception as exc:  # never let one message stop the reader
                    self._report(exc)

    async def _reconnect(self) -> None:
        """Back off, then a fresh pub/sub connection subscribed to what the local map holds."""
        delay = self._delay
        self._delay = min(delay * 2, self.reconnect_max_delay)
        await asyncio.sleep(delay)
        async with self._pubsub_lock:
            old, self._pubsub = self._pubsub, None
            if old is not None:
                await self._close_pubsub(old)
            # Frames published before a pending UNSUBSCRIBE may be lost with
            # the connection: nothing more can be delivered to these. Echoes
            # under way are lost with it too.
            self._draining.clear()
            self._echoes.clear()
            wanted = [self._channel(share_data_id) for share_data_id in self._local]
            if wanted:
                pubsub = self.redis.pubsub()
                try:
                    await pubsub.subscribe(*wanted)
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
                share_data_id = self._share_data_id(channel)
                self._draining.pop(share_data_id, None)
                if share_data_id not in self._local:
                    self._echoes.pop(share_data_id, None)
                    self._newest.pop(share_data_id, None)
            self._confirm(_UNSUBSCRIBE, channel)

    def _expire(self, echoes: deque[tuple[int, bytes, float]], now: float) -> None:
        """Stop waiting for echoes that will not come (lost in a failure or a reconnect)."""
        horizon = now - self.confirm_timeout
        while echoes and (echoes[0][2] < horizon or len(echoes) >= self.max_pending_publishes):
            echoes.popleft()

    def _own_echo(self, share_data_id: str, payload: bytes) -> Optional[int]:
        """The number of this node's PUBLISH that ``payload`` echoes; None for another node's."""
        echoes = self._echoes.get(share_data_id)
        if not echoes:
            return None
        self._expire(echoes, time.monotonic())
        for index, (number, mine, _) in enumerate(echoes):
            if mine == payload:
                for _ in range(index + 1):  # any before it will not come back
                    echoes.popleft()
                if not echoes:
                    del self._echoes[share_data_id]
                return number
            if index == _ECHO_LOOKAHEAD:
                break
        return None

    def _deliver(self, channel: str, payload: Any) -> None:
        """One payload from Redis -> one frame -> every local subscriber."""
        if not channel.startswith(self.channel_prefix):
            return
        share_data_id = self._share_data_id(channel)
        targets = self._local.get(share_data_id)
        draining = self._draining.get(share_data_id)
        if draining:
            if targets:
                targets = {**draining, **targets}
            else:
                targets = draining
        if not targets:
            return
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif not isinstance(payload, bytes):
            payload = bytes(payload)
        try:
            parse_server_message(payload)
        except InvalidMessage as exc:
            self._report(InvalidMessage([f"payload on {channel}: {exc}"]))
            return
        number = self._own_echo(share_data_id, payload)
        if number is not None and self._newest.get(share_data_id, -1) >= number:
            # Someone subscribed after this node published it: their state
            # frame already holds it, so it would go backwards for them.
            targets = {connection: start for connection, start in targets.items() if start < number}
        try:
            frame = core.encode_frame(payload)
            delivered = core.fanout(frame, targets)
            if self.fanout_observer is not None:
                self.fanout_observer(delivered, len(frame))
        except Exception as exc:
            self._report(exc)
