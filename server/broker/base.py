"""The broker interface: one signature, two implementations (memory.py, redis.py), picked in ``make_broker``.

The API side is async (it runs in the event loop): submit, read, cancel, wait for a change, queue depth, worker
liveness, shared metrics. The worker side is synchronous (worker threads or processes): fetch deliveries, begin,
report progress, finish or retry, check cancellation, heartbeat.

Delivery is at least once: a delivered job stays owned by its worker until ``finish``/``retry``; a worker that
dies leaves it to be handed to another worker after ``job_idle_timeout_s`` (Redis: XAUTOCLAIM; heartbeats keep
a live worker's jobs fresh). Every delivery that begins counts; past ``job_max_deliveries`` the job fails with
``internal_error``. Handlers must therefore be idempotent (server/worker.py writes results atomically).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.schemas import ErrorDetail, IngestJob, JobState, RenderJob, WorkerInfo
from server.settings import Settings

if TYPE_CHECKING:
    from server.broker.live import LiveBus

# Guards the lazy creation of ``Broker.live``: the API loop and worker threads must share one bus.
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Delivery:
    """One hand-over of a job to a worker; ``token`` identifies the hand-over (a stream entry id in Redis)."""

    job: IngestJob | RenderJob
    token: str


class Broker(abc.ABC):
    """Job queue, job state and worker registry."""

    name: str = "abstract"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._live: LiveBus | None = None

    @property
    def live(self) -> LiveBus:
        """The channel of live frames that goes with this broker (server/broker/live.py)."""
        with _LIVE_LOCK:
            if self._live is None:
                from server.broker.live import make_live_bus

                self._live = make_live_bus(self)
            return self._live

    # ------------------------------------------------------------------------------------------- API side (async)

    @abc.abstractmethod
    async def submit(self, job: IngestJob | RenderJob) -> JobState:
        """Create the job's state and queue it; ``server.errors.QueueFull`` when ``queue_max_depth`` unfinished
        jobs exist already. Submitting a job id that exists returns its state and queues nothing."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobState | None: ...

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobState | None:
        """Ask for cancellation: a queued job is cancelled at once, a running one when its worker next checks."""

    @abc.abstractmethod
    async def wait(self, job_id: str, seen_version: int, timeout_s: float) -> JobState | None:
        """The job's state once its version exceeds ``seen_version`` (or it is terminal), or after ``timeout_s``;
        waits on events (asyncio / Redis pub/sub), not by polling."""

    @abc.abstractmethod
    async def forget(self, job_id: str) -> None:
        """Drop a job's state (its resource was deleted)."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Unfinished jobs: queued plus running."""

    @abc.abstractmethod
    async def workers(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat is younger than ``heartbeat_ttl_s``."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def shared_metrics(self) -> dict[str, float]:
        """Metric samples the workers added (server/metrics.py format)."""

    async def aclose(self) -> None:  # noqa: B027 -- optional hook
        """Release the API side's connections."""

    # ------------------------------------------------------------------------------------------ worker side (sync)

    @abc.abstractmethod
    def fetch(self, worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_n`` deliveries: abandoned jobs first, then new ones; blocks up to ``timeout_s`` for the
        first one only."""

    @abc.abstractmethod
    def begin(self, delivery: Delivery, worker_id: str) -> JobState | None:
        """Mark the job running and count the delivery. None (and the delivery is settled) when the job was
        cancelled, deleted, already finished, or has used up its deliveries (it is then failed)."""

    @abc.abstractmethod
    def update(self, job_id: str, **fields: Any) -> None:
        """Progress fields (progress, frames_done, frames_total, timings) of a running job; bumps its version."""

    @abc.abstractmethod
    def finish(self, delivery: Delivery, state: str, *, error: ErrorDetail | None = None,
               **fields: Any) -> None:
        """Settle the delivery with a terminal ``state`` (done | failed | cancelled)."""

    @abc.abstractmethod
    def retry(self, delivery: Delivery, error: ErrorDetail) -> bool:
        """Settle the delivery after an internal error: queue the job again (True) or, deliveries used up, fail
        it with ``error`` (False)."""

    @abc.abstractmethod
    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        """Those of ``job_ids`` whose cancellation was asked for (or whose state is gone)."""

    @abc.abstractmethod
    def heartbeat(self, info: WorkerInfo, held: list[Delivery]) -> None:
        """Record the worker alive and keep its held deliveries from being reclaimed."""

    @abc.abstractmethod
    def worker_stopped(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def add_metrics(self, deltas: dict[str, float]) -> None: ...

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release the worker side's connections."""


def make_broker(settings: Settings) -> Broker:
    """The one place the implementation is chosen: Redis when ``ACA_REDIS_URL`` is set, else in-process."""
    if settings.redis_url:
        from server.broker.redis import RedisBroker

        return RedisBroker(settings)
    from server.broker.memory import MemoryBroker

    return MemoryBroker(settings)
