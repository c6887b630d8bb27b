"""In-process broker: the embedded mode (no ACA_REDIS_URL).

Worker threads and the API's event loop share one lock-protected store. Workers block on a ``threading.Condition``
for new jobs; API waiters park on asyncio futures that the worker threads resolve with ``call_soon_threadsafe``:
nothing polls. Jobs do not survive the process (the durable state is on disk; see server/registry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from server.broker.base import Broker, Delivery
from server.errors import QueueFull
from server.metrics import Metrics
from server.schemas import TERMINAL, ErrorDetail, IngestJob, JobState, RenderJob, WorkerInfo
from server.settings import Settings


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._cond = threading.Condition()
        self._queue: deque[Delivery] = deque()
        self._states: dict[str, JobState] = {}
        self._jobs: dict[str, IngestJob | RenderJob] = {}
        # token -> (worker id, delivery, monotonic time of the last refresh)
        self._held: dict[str, tuple[str, Delivery, float]] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._tokens = itertools.count(1)
        self._metrics = Metrics()

    # ------------------------------------------------------------------------------------------------ helpers

    def _deliver(self, job: IngestJob | RenderJob) -> None:
        self._queue.append(Delivery(job=job, token=str(next(self._tokens))))
        self._cond.notify_all()

    def _changed(self, job: JobState, /, **fields: Any) -> None:
        """Apply ``fields``, bump the version and wake the async waiters of the job (lock held)."""
        for k, v in fields.items():
            setattr(job, k, v)
        job.version += 1
        job.updated_at = time.time()
        for loop, fut in self._waiters.pop(job.job_id, []):
            # RuntimeError: the waiter's loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut)

    def _settle(self, delivery: Delivery) -> None:
        self._held.pop(delivery.token, None)

    def _reclaim_stale(self) -> None:
        """Requeue deliveries whose worker stopped refreshing them (the in-process XAUTOCLAIM)."""
        limit = time.monotonic() - self.settings.job_idle_timeout_s
        for token, (_, delivery, seen) in list(self._held.items()):
            if seen < limit:
                del self._held[token]
                self._queue.appendleft(Delivery(job=delivery.job, token=str(next(self._tokens))))

    # ---------------------------------------------------------------------------------------------- API side

    async def submit(self, job: IngestJob | RenderJob) -> JobState:
        with self._cond:
            existing = self._states.get(job.job_id)
            if existing is not None:
                return existing.model_copy(deep=True)
            depth = sum(1 for s in self._states.values() if s.state not in TERMINAL)
            if depth >= self.settings.queue_max_depth:
                raise QueueFull(f"{depth} jobs are waiting; try again later", depth=depth,
                                limit=self.settings.queue_max_depth)
            state = JobState(job_id=job.job_id, kind=job.kind)
            self._states[job.job_id] = state
            self._jobs[job.job_id] = job
            self._deliver(job)
            return state.model_copy(deep=True)

    async def get(self, job_id: str) -> JobState | None:
        with self._cond:
            state = self._states.get(job_id)
            return state.model_copy(deep=True) if state is not None else None

    async def cancel(self, job_id: str) -> JobState | None:
        with self._cond:
            state = self._states.get(job_id)
            if state is None:
                return None
            if state.state == "queued":
                self._changed(state, cancel_requested=True, state="cancelled")
            elif state.state == "running":
                self._changed(state, cancel_requested=True)
            return state.model_copy(deep=True)

    async def wait(self, job_id: str, seen_version: int, timeout_s: float) -> JobState | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            state = self._states.get(job_id)
            if state is None or state.version > seen_version or state.terminal:
                return state.model_copy(deep=True) if state is not None else None
            self._waiters.setdefault(job_id, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout=timeout_s)
        except TimeoutError:
            with self._cond:
                waiters = self._waiters.get(job_id, [])
                if (loop, fut) in waiters:
                    waiters.remove((loop, fut))
        return await self.get(job_id)

    async def forget(self, job_id: str) -> None:
        with self._cond:
            state = self._states.pop(job_id, None)
            self._jobs.pop(job_id, None)
            if state is not None:
                self._changed(state, cancel_requested=True)

    async def depth(self) -> int:
        with self._cond:
            return sum(1 for s in self._states.values() if s.state not in TERMINAL)

    async def workers(self) -> list[WorkerInfo]:
        limit = time.time() - self.settings.heartbeat_ttl_s
        with self._cond:
            return [w.model_copy() for w in self._workers.values() if w.last_seen >= limit]

    async def ping(self) -> bool:
        return True

    async def shared_metrics(self) -> dict[str, float]:
        return self._metrics.snapshot()

    # ------------------------------------------------------------------------------------------- worker side

    def fetch(self, worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._reclaim_stale()
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out: list[Delivery] = []
            now = time.monotonic()
            while self._queue and len(out) < max_n:
                d = self._queue.popleft()
                self._held[d.token] = (worker_id, d, now)
                out.append(d)
            return out

    def begin(self, delivery: Delivery, worker_id: str) -> JobState | None:
        with self._cond:
            state = self._states.get(delivery.job.job_id)
            if state is None or state.terminal:
                self._settle(delivery)
                return None
            if state.cancel_requested:
                self._changed(state, state="cancelled")
                self._settle(delivery)
                return None
            if state.deliveries >= self.settings.job_max_deliveries:
                self._changed(state, state="failed", error=_exhausted(state.deliveries))
                self._settle(delivery)
                return None
            self._changed(state, state="running", worker=worker_id, deliveries=state.deliveries + 1)
            return state.model_copy(deep=True)

    def update(self, job_id: str, **fields: Any) -> None:
        with self._cond:
            state = self._states.get(job_id)
            if state is not None and state.state == "running":
                self._changed(state, **fields)

    def finish(self, delivery: Delivery, state: str, *, error: ErrorDetail | None = None, **fields: Any) -> None:
        with self._cond:
            self._settle(delivery)
            current = self._states.get(delivery.job.job_id)
            if current is not None and not current.terminal:
                self._changed(current, state=state, error=error, **fields)

    def retry(self, delivery: Delivery, error: ErrorDetail) -> bool:
        with self._cond:
            self._settle(delivery)
            current = self._states.get(delivery.job.job_id)
            if current is None or current.terminal:
                return False
            if current.deliveries >= self.settings.job_max_deliveries or current.cancel_requested:
                self._changed(current, state="cancelled" if current.cancel_requested else "failed", error=error)
                return False
            self._changed(current, state="queued", error=error)
            self._deliver(delivery.job)
            return True

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        with self._cond:
            return {j for j in job_ids if (s := self._states.get(j)) is None or s.cancel_requested}

    def heartbeat(self, info: WorkerInfo, held: list[Delivery]) -> None:
        now = time.monotonic()
        with self._cond:
            self._workers[info.worker_id] = info.model_copy()
            for d in held:
                entry = self._held.get(d.token)
                if entry is not None:
                    self._held[d.token] = (entry[0], entry[1], now)

    def worker_stopped(self, worker_id: str) -> None:
        with self._cond:
            self._workers.pop(worker_id, None)

    def add_metrics(self, deltas: dict[str, float]) -> None:
        self._metrics.add(deltas)

    def wake_all(self) -> None:
        """Wake blocked ``fetch`` calls and live-frame ``take`` calls (shutdown)."""
        with self._cond:
            self._cond.notify_all()
        if self._live is not None:
            self._live.wake_all()  # type: ignore[attr-defined]  # always a MemoryLiveBus here


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _exhausted(deliveries: int) -> ErrorDetail:
    return ErrorDetail(
        code="internal_error",
        message=f"the job was abandoned by its worker {deliveries} times (workers died or were stopped)",
        details={"deliveries": deliveries},
    )
