"""Redis broker: a Redis Stream with one consumer group, job state in hashes, events on pub/sub.

Keys (prefix ``ACA_REDIS_PREFIX``, default ``aca``):

- ``{p}:jobs``          the stream; one entry per queued delivery (``job`` = the message JSON). Entries are
                         XACKed *and* XDELed when settled, so XLEN is the number of unfinished jobs (queue depth).
- ``{p}:job:{id}``      hash: the JobState fields, plus ``entry`` (the stream entry now carrying the job) and
                         ``msg`` (the message, to requeue it). Expires ``job_ttl_s`` after a terminal state.
- ``{p}:ev:{id}``       pub/sub channel: one message per state change (API waiters block on it).
- ``{p}:worker:{wid}``  the worker's heartbeat (JSON WorkerInfo) with a TTL; ``{p}:workers`` the set of ids.
- ``{p}:metrics``       hash of metric samples the workers add (HINCRBYFLOAT).

At-least-once: XREADGROUP hands an entry to one consumer; it stays in the group's pending list until settled.
A worker's heartbeat XCLAIMs its own entries (JUSTID, idle time back to 0); entries of dead workers go idle and
another worker takes them with XAUTOCLAIM after ``job_idle_timeout_s``. Every state transition is one Lua script,
so a cancellation and a worker's begin/finish cannot interleave.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio as aredis
from pydantic import ValidationError

from server.broker.base import Broker, Delivery
from server.errors import QueueFull
from server.schemas import JOB_ADAPTER, ErrorDetail, IngestJob, JobState, RenderJob, WorkerInfo
from server.settings import Settings

log = logging.getLogger("aca.broker")

_COMMON = """
local function settle() redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2]) end
local function bump()
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
  redis.call('PUBLISH', ARGV[4], '1')
end
local function terminal(st) return st == 'done' or st == 'failed' or st == 'cancelled' end
"""

# KEYS: job, stream. ARGV: max depth, message, field/value pairs...
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then return -1 end
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'entry', id, 'msg', ARGV[2], unpack(ARGV, 3))
return 1
"""

# KEYS: job, stream. ARGV: group, entry, now, channel, ttl, worker, max deliveries, exhausted error JSON.
_BEGIN = _COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then settle(); return 'gone' end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then settle(); return 'stale' end
if terminal(redis.call('HGET', KEYS[1], 'state')) then settle(); return 'settled' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled'); bump(); redis.call('EXPIRE', KEYS[1], ARGV[5]); settle()
  return 'cancelled'
end
local d = tonumber(redis.call('HGET', KEYS[1], 'deliveries') or '0')
if d >= tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[8]); bump(); redis.call('EXPIRE', KEYS[1], ARGV[5])
  settle()
  return 'exhausted'
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[6], 'deliveries', d + 1)
bump()
return 'ok'
"""

# KEYS: job, stream. ARGV: group, entry, now, channel, field/value pairs...
_UPDATE = _COMMON + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
bump()
return 1
"""

# KEYS: job, stream. ARGV: group, entry, now, channel, ttl, field/value pairs (with state)...
_FINISH = _COMMON + """
settle()
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then return 0 end
if terminal(redis.call('HGET', KEYS[1], 'state')) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
bump()
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: job, stream. ARGV: group, entry, now, channel, ttl, max deliveries, error JSON.
_RETRY = _COMMON + """
settle()
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then return 0 end
if terminal(redis.call('HGET', KEYS[1], 'state')) then return 0 end
local d = tonumber(redis.call('HGET', KEYS[1], 'deliveries') or '0')
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' or d >= tonumber(ARGV[6]) then
  local st = 'failed'
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then st = 'cancelled' end
  redis.call('HSET', KEYS[1], 'state', st, 'error', ARGV[7]); bump(); redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 0
end
local id = redis.call('XADD', KEYS[2], '*', 'job', redis.call('HGET', KEYS[1], 'msg'))
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', id, 'error', ARGV[7])
bump()
return 1
"""

# KEYS: job, stream. ARGV: (unused), (unused), now, channel, ttl.
_CANCEL = _COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'state')
if terminal(st) then return 1 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry'))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
bump()
return 1
"""

# KEYS: job, stream. ARGV: (unused), (unused), now, channel.
_FORGET = _COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if not terminal(redis.call('HGET', KEYS[1], 'state')) then
  redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry'))
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], '1')
return 1
"""


def _encode_fields(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        if isinstance(v, ErrorDetail):
            v = v.model_dump_json()
        elif isinstance(v, dict):
            v = json.dumps(v)
        elif isinstance(v, bool):
            v = "1" if v else "0"
        elif v is None:
            v = ""
        out += [k, str(v)]
    return out


def _decode_state(raw: dict[str, str]) -> JobState | None:
    if not raw or "job_id" not in raw:
        return None
    data: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("entry", "msg")}
    data["cancel_requested"] = raw.get("cancel_requested") == "1"
    data["error"] = json.loads(raw["error"]) if raw.get("error") else None
    data["timings"] = json.loads(raw["timings"]) if raw.get("timings") else {}
    data["worker"] = raw.get("worker") or None
    return JobState.model_validate(data)


class RedisBroker(Broker):
    name = "redis"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url
        self.url = settings.redis_url
        p = settings.redis_prefix
        self.stream = f"{p}:jobs"
        self.group = f"{p}-workers"
        self._p = p
        # Typed Any: redis-py's annotations mix sync and async returns; the replies are checked where used.
        self._sync: Any = None
        self._async: Any = None
        self._group_ready = False

    # -------------------------------------------------------------------------------------------------- keys

    def _job_key(self, job_id: str) -> str:
        return f"{self._p}:job:{job_id}"

    def _channel(self, job_id: str) -> str:
        return f"{self._p}:ev:{job_id}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._p}:worker:{worker_id}"

    @property
    def _workers_set(self) -> str:
        return f"{self._p}:workers"

    @property
    def _metrics_key(self) -> str:
        return f"{self._p}:metrics"

    # ------------------------------------------------------------------------------------------------ clients

    @property
    def r(self) -> Any:
        if self._sync is None:
            self._sync = redis.Redis.from_url(self.url, decode_responses=True, health_check_interval=30)
        return self._sync

    @property
    def ar(self) -> Any:
        if self._async is None:
            self._async = aredis.Redis.from_url(self.url, decode_responses=True, health_check_interval=30)
        return self._async

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _common(self, delivery_entry: str, job_id: str) -> list[str]:
        return [self.group, delivery_entry, repr(time.time()), self._channel(job_id)]

    # ---------------------------------------------------------------------------------------------- API side

    async def submit(self, job: IngestJob | RenderJob) -> JobState:
        state = JobState(job_id=job.job_id, kind=job.kind)
        fields = _encode_fields(state.model_dump(exclude={"v"}))
        rc = await self.ar.eval(
            _SUBMIT, 2, self._job_key(job.job_id), self.stream, self.settings.queue_max_depth,
            job.model_dump_json(), *fields,
        )
        if int(rc) == -1:
            raise QueueFull("too many jobs are waiting; try again later", limit=self.settings.queue_max_depth)
        if int(rc) == 0:
            existing = await self.get(job.job_id)
            if existing is not None:
                return existing
        return state

    async def get(self, job_id: str) -> JobState | None:
        return _decode_state(await self.ar.hgetall(self._job_key(job_id)))

    async def cancel(self, job_id: str) -> JobState | None:
        await self.ar.eval(
            _CANCEL, 2, self._job_key(job_id), self.stream, "", "", repr(time.time()), self._channel(job_id),
            self.settings.job_ttl_s,
        )
        return await self.get(job_id)

    async def wait(self, job_id: str, seen_version: int, timeout_s: float) -> JobState | None:
        pubsub = self.ar.pubsub()
        try:
            # Subscribe before reading, so a change between the read and the subscription is not missed.
            await pubsub.subscribe(self._channel(job_id))
            deadline = time.monotonic() + timeout_s
            while True:
                state = await self.get(job_id)
                if state is None or state.version > seen_version or state.terminal:
                    return state
                left = deadline - time.monotonic()
                if left <= 0:
                    return state
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        finally:
            await pubsub.aclose()

    async def forget(self, job_id: str) -> None:
        await self.ar.eval(
            _FORGET, 2, self._job_key(job_id), self.stream, "", "", repr(time.time()), self._channel(job_id),
        )

    async def depth(self) -> int:
        return int(await self.ar.xlen(self.stream))

    async def workers(self) -> list[WorkerInfo]:
        ids = sorted(await self.ar.smembers(self._workers_set))
        if not ids:
            return []
        raw = await self.ar.mget([self._worker_key(i) for i in ids])
        gone = [i for i, v in zip(ids, raw, strict=True) if v is None]
        if gone:
            await self.ar.srem(self._workers_set, *gone)
        limit = time.time() - self.settings.heartbeat_ttl_s
        infos = [WorkerInfo.model_validate_json(v) for v in raw if v is not None]
        return [w for w in infos if w.last_seen >= limit]

    async def ping(self) -> bool:
        try:
            return bool(await self.ar.ping())
        except (redis.RedisError, OSError):
            return False

    async def shared_metrics(self) -> dict[str, float]:
        raw = await self.ar.hgetall(self._metrics_key)
        return {k: float(v) for k, v in raw.items()}

    async def aclose(self) -> None:
        if self._live is not None:
            await self._live.aclose()
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    # ------------------------------------------------------------------------------------------- worker side

    def _parse(self, entries: Iterable[Any]) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in entries:
            if not fields:  # the entry was deleted (a cancelled or forgotten job) while pending
                self.r.xack(self.stream, self.group, entry_id)
                continue
            try:
                job = JOB_ADAPTER.validate_json(fields["job"])
            except (KeyError, ValidationError) as e:
                log.error("dropping unreadable stream entry %s: %s", entry_id, e)
                self.r.xack(self.stream, self.group, entry_id)
                self.r.xdel(self.stream, entry_id)
                continue
            out.append(Delivery(job=job, token=entry_id))
        return out

    def fetch(self, worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        self._ensure_group()
        idle_ms = int(self.settings.job_idle_timeout_s * 1000)
        # Abandoned entries first: XAUTOCLAIM moves entries idle past the timeout to this consumer.
        _, claimed, deleted = self.r.xautoclaim(self.stream, self.group, worker_id, idle_ms, "0-0", count=max_n)
        if deleted:
            self.r.xack(self.stream, self.group, *deleted)
        out = self._parse(claimed)
        if claimed:
            log.warning("worker %s reclaimed %d abandoned job(s)", worker_id, len(claimed))
        if len(out) < max_n:
            block = None if out else max(1, int(timeout_s * 1000))
            reply = self.r.xreadgroup(self.group, worker_id, {self.stream: ">"}, count=max_n - len(out), block=block)
            for _stream, entries in reply or []:
                out += self._parse(entries)
        return out

    def begin(self, delivery: Delivery, worker_id: str) -> JobState | None:
        job_id = delivery.job.job_id
        exhausted = ErrorDetail(
            code="internal_error",
            message=f"the job was abandoned by its worker {self.settings.job_max_deliveries} times "
                    "(workers died or were stopped)",
            details={"deliveries": self.settings.job_max_deliveries},
        )
        outcome = self.r.eval(
            _BEGIN, 2, self._job_key(job_id), self.stream, *self._common(delivery.token, job_id),
            self.settings.job_ttl_s, worker_id, self.settings.job_max_deliveries, exhausted.model_dump_json(),
        )
        if outcome != "ok":
            log.info("job %s not started: %s", job_id, outcome)
            return None
        return _decode_state(self.r.hgetall(self._job_key(job_id)))

    def update(self, job_id: str, **fields: Any) -> None:
        self.r.eval(_UPDATE, 2, self._job_key(job_id), self.stream, "", "", repr(time.time()), self._channel(job_id),
                    *_encode_fields(fields))

    def finish(self, delivery: Delivery, state: str, *, error: ErrorDetail | None = None, **fields: Any) -> None:
        job_id = delivery.job.job_id
        self.r.eval(
            _FINISH, 2, self._job_key(job_id), self.stream, *self._common(delivery.token, job_id),
            self.settings.job_ttl_s, *_encode_fields({"state": state, "error": error, **fields}),
        )

    def retry(self, delivery: Delivery, error: ErrorDetail) -> bool:
        job_id = delivery.job.job_id
        rc = self.r.eval(
            _RETRY, 2, self._job_key(job_id), self.stream, *self._common(delivery.token, job_id),
            self.settings.job_ttl_s, self.settings.job_max_deliveries, error.model_dump_json(),
        )
        return int(rc) == 1

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for j in ids:
            pipe.hget(self._job_key(j), "cancel_requested")
        flags = pipe.execute()
        # A missing hash means the job was forgotten (its resource deleted): stop working on it too.
        return {j for j, f in zip(ids, flags, strict=True) if f is None or f == "1"}

    def heartbeat(self, info: WorkerInfo, held: list[Delivery]) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self._worker_key(info.worker_id), info.model_dump_json(), px=ttl_ms)
        pipe.sadd(self._workers_set, info.worker_id)
        for d in held:
            pipe.hget(self._job_key(d.job.job_id), "worker")
        owners = pipe.execute()[2:]
        # Refresh only entries this worker still runs: one another worker has reclaimed stays with that worker.
        mine = [d.token for d, owner in zip(held, owners, strict=True) if owner == info.worker_id]
        if mine:
            self.r.xclaim(self.stream, self.group, info.worker_id, 0, mine, justid=True)

    def worker_stopped(self, worker_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self._worker_key(worker_id))
        pipe.srem(self._workers_set, worker_id)
        pipe.execute()

    def add_metrics(self, deltas: dict[str, float]) -> None:
        if not deltas:
            return
        pipe = self.r.pipeline(transaction=False)
        for k, v in deltas.items():
            pipe.hincrbyfloat(self._metrics_key, k, v)
        pipe.execute()

    def close(self) -> None:
        if self._live is not None:
            self._live.close_worker_side()
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def default_worker_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"
