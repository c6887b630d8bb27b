"""The live bus: how frames of live and streaming sessions travel between the API and the workers.

Jobs (server/broker/base.py) are durable and delivered at least once; live frames are the opposite: short-lived,
addressed to one worker (a stream sticks to the worker that holds its previous frames, like the sequence batcher
of Triton Inference Server routing a correlation id to one model instance) and worthless after a second. So they
get their own, much simpler channel, with one signature and two implementations chosen in ``make_live_bus``:

- ``MemoryLiveBus`` (embedded mode): one deque per worker under a ``threading.Condition``; replies go straight
  into the session's asyncio queue with ``call_soon_threadsafe``. Nothing polls.
- ``RedisLiveBus``: the list ``{p}:live:in:{worker}`` per worker (RPUSH / BLPOP), the list ``{p}:live:out:{stream}``
  per stream (the API BLPOPs it), both with a short TTL so a dead worker's or a dead API's lists vanish, and the
  sorted set ``{p}:live:streams`` (stream id -> last activity) that enforces ``live_max_streams`` across every API
  process; entries of sessions whose API died age out after twice the idle timeout.

A message is a header (``server.schemas.LiveFrameMsg`` / ``LiveReplyMsg``) and a binary payload (landmarks, a
JPEG or raw pixels); over Redis they are packed as ``len(header) (4 bytes, big-endian) + header JSON + payload``.
Losing a message is allowed: the API resends what a worker did not answer when it moves the stream (server/live.py).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from server.schemas import LiveFrameMsg, LiveReplyMsg
from server.settings import Settings

if TYPE_CHECKING:
    from server.broker.base import Broker

FrameItem = tuple[LiveFrameMsg, bytes]
ReplyItem = tuple[LiveReplyMsg, bytes]
M = TypeVar("M", bound=BaseModel)

# Lists of live messages outlive their last write by this long: enough for a slow reader, short enough that a
# dead worker's inbox or an abandoned stream's replies do not linger.
_LIST_TTL_S = 60


def pack(header: BaseModel, payload: bytes) -> bytes:
    head = header.model_dump_json().encode()
    return struct.pack(">I", len(head)) + head + payload


def unpack(raw: bytes, cls: type[M]) -> tuple[M, bytes]:
    (n,) = struct.unpack_from(">I", raw)
    return cls.model_validate_json(raw[4 : 4 + n]), raw[4 + n :]


class LiveBus(abc.ABC):
    """API side (async): open/touch/close a session, send frames to a worker, receive a session's replies.
    Worker side (sync): take frames addressed to the worker, reply to a session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- API side ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self, stream_id: str) -> int | None:
        """Register a session; the number open afterwards, or None when ``live_max_streams`` are open already."""

    @abc.abstractmethod
    async def touch(self, stream_id: str) -> None:
        """The session is still in use (keeps it counted)."""

    @abc.abstractmethod
    async def close(self, stream_id: str) -> None: ...

    @abc.abstractmethod
    async def open_count(self) -> int: ...

    @abc.abstractmethod
    async def send(self, worker_id: str, msg: LiveFrameMsg, payload: bytes = b"") -> None: ...

    @abc.abstractmethod
    async def receive(self, stream_id: str, timeout_s: float) -> list[ReplyItem]:
        """Replies to the session, waiting up to ``timeout_s`` for the first."""

    async def aclose(self) -> None:  # noqa: B027 -- optional hook
        """Release the API side's connections."""

    # --- worker side ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def take(self, worker_id: str, max_n: int, timeout_s: float) -> list[FrameItem]:
        """Up to ``max_n`` frames addressed to the worker, oldest first; blocks up to ``timeout_s`` for the first."""

    @abc.abstractmethod
    def reply(self, msg: LiveReplyMsg, payload: bytes = b"") -> None: ...

    def close_worker_side(self) -> None:  # noqa: B027 -- optional hook
        """Release the worker side's connections."""


class MemoryLiveBus(LiveBus):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._cond = threading.Condition()
        self._inbox: dict[str, deque[FrameItem]] = {}
        self._sessions: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[ReplyItem]]] = {}

    async def open(self, stream_id: str) -> int | None:
        with self._cond:
            if len(self._sessions) >= self.settings.live_max_streams:
                return None
            self._sessions[stream_id] = (asyncio.get_running_loop(), asyncio.Queue())
            return len(self._sessions)

    async def touch(self, stream_id: str) -> None:
        return None

    async def close(self, stream_id: str) -> None:
        with self._cond:
            self._sessions.pop(stream_id, None)

    async def open_count(self) -> int:
        with self._cond:
            return len(self._sessions)

    async def send(self, worker_id: str, msg: LiveFrameMsg, payload: bytes = b"") -> None:
        with self._cond:
            self._inbox.setdefault(worker_id, deque()).append((msg, payload))
            self._cond.notify_all()

    async def receive(self, stream_id: str, timeout_s: float) -> list[ReplyItem]:
        with self._cond:
            entry = self._sessions.get(stream_id)
        if entry is None:
            return []
        queue = entry[1]
        try:
            first = await asyncio.wait_for(queue.get(), timeout=timeout_s)
        except TimeoutError:
            return []
        out = [first]
        while not queue.empty():
            out.append(queue.get_nowait())
        return out

    def take(self, worker_id: str, max_n: int, timeout_s: float) -> list[FrameItem]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            inbox = self._inbox.setdefault(worker_id, deque())
            while not inbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            return [inbox.popleft() for _ in range(min(max_n, len(inbox)))]

    def reply(self, msg: LiveReplyMsg, payload: bytes = b"") -> None:
        with self._cond:
            entry = self._sessions.get(msg.stream_id)
        if entry is None:
            return  # the session is gone: nobody waits for this frame
        loop, queue = entry
        # RuntimeError: the session's loop is closed (the API is shutting down).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (msg, payload))

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


# KEYS: streams zset. ARGV: stream id, now, stale-before, limit.
_OPEN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""


class RedisLiveBus(LiveBus):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url
        self.url = settings.redis_url
        self._p = f"{settings.redis_prefix}:live"
        # Binary clients (payloads are bytes), separate from the broker's text clients. Typed Any as in redis.py.
        self._sync: Any = None
        self._async: Any = None

    @property
    def _streams(self) -> str:
        return f"{self._p}:streams"

    def _in(self, worker_id: str) -> str:
        return f"{self._p}:in:{worker_id}"

    def _out(self, stream_id: str) -> str:
        return f"{self._p}:out:{stream_id}"

    @property
    def r(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis.from_url(self.url, health_check_interval=30)
        return self._sync

    @property
    def ar(self) -> Any:
        if self._async is None:
            import redis.asyncio as aredis

            self._async = aredis.Redis.from_url(self.url, health_check_interval=30)
        return self._async

    async def open(self, stream_id: str) -> int | None:
        now = time.time()
        stale = now - 2 * self.settings.live_idle_timeout_s
        n = int(await self.ar.eval(_OPEN, 1, self._streams, stream_id, repr(now), repr(stale),
                                   self.settings.live_max_streams))
        return None if n < 0 else n

    async def touch(self, stream_id: str) -> None:
        await self.ar.zadd(self._streams, {stream_id: time.time()}, xx=True)

    async def close(self, stream_id: str) -> None:
        pipe = self.ar.pipeline(transaction=False)
        pipe.zrem(self._streams, stream_id)
        pipe.delete(self._out(stream_id))
        await pipe.execute()

    async def open_count(self) -> int:
        return int(await self.ar.zcard(self._streams))

    async def send(self, worker_id: str, msg: LiveFrameMsg, payload: bytes = b"") -> None:
        pipe = self.ar.pipeline(transaction=False)
        pipe.rpush(self._in(worker_id), pack(msg, payload))
        pipe.expire(self._in(worker_id), _LIST_TTL_S)
        await pipe.execute()

    async def receive(self, stream_id: str, timeout_s: float) -> list[ReplyItem]:
        key = self._out(stream_id)
        got = await self.ar.blpop([key], timeout=max(0.01, timeout_s))
        if got is None:
            return []
        raws = [got[1], *(await self.ar.lpop(key, 256) or [])]
        return [unpack(raw, LiveReplyMsg) for raw in raws]

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    def take(self, worker_id: str, max_n: int, timeout_s: float) -> list[FrameItem]:
        key = self._in(worker_id)
        raws: list[bytes] = []
        if timeout_s > 0:
            got = self.r.blpop([key], timeout=max(0.01, timeout_s))
            if got is None:
                return []
            raws.append(got[1])
        if len(raws) < max_n:
            raws += self.r.lpop(key, max_n - len(raws)) or []
        return [unpack(raw, LiveFrameMsg) for raw in raws]

    def reply(self, msg: LiveReplyMsg, payload: bytes = b"") -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self._out(msg.stream_id), pack(msg, payload))
        pipe.expire(self._out(msg.stream_id), _LIST_TTL_S)
        pipe.execute()

    def close_worker_side(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def make_live_bus(broker: Broker) -> LiveBus:
    """The one place the live channel is chosen: it follows the broker (Redis or in-process)."""
    if broker.name == "redis":
        return RedisLiveBus(broker.settings)
    return MemoryLiveBus(broker.settings)
