"""Both brokers against one contract: queue, states, events, cancellation, at-least-once redelivery, bounded
retries, heartbeats. The Redis cases run on a real Redis (marker ``redis``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from server_helpers import REDIS_URL

from server.broker.base import Broker
from server.errors import QueueFull
from server.schemas import ErrorDetail, IngestJob, RenderJob, WorkerInfo
from server.settings import Settings

IDLE = 0.6


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Callable[..., Broker]]:
    """A factory of brokers sharing one store (for Redis: one key prefix), so two 'workers' can compete."""
    from server.broker.base import make_broker

    made: list[Broker] = []
    prefix = None
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
    shared: dict[str, Broker] = {}

    def factory(**overrides: Any) -> Broker:
        s = Settings(data_dir=tmp_path, redis_url=REDIS_URL if prefix else None, redis_prefix=prefix or "aca",
                     job_idle_timeout_s=IDLE, job_max_deliveries=2, queue_max_depth=3, heartbeat_ttl_s=5,
                     **overrides)
        if prefix is None:  # in-process: every "worker" shares the one broker object
            if "memory" not in shared:
                shared["memory"] = make_broker(s)
            return shared["memory"]
        b = make_broker(s)
        made.append(b)
        return b

    yield factory
    for b in made:
        b.close()


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())


def _ingest(i: int = 0) -> IngestJob:
    return IngestJob(job_id=f"idn_{i:020x}", identity_id=f"idn_{i:020x}")


def test_lifecycle_events_and_depth(make: Callable[..., Broker]) -> None:
    b = make()

    async def scenario() -> None:
        job = RenderJob(job_id="rnd_1", render_id="rnd_1", identity_id="idn_1")
        st = await b.submit(job)
        assert st.state == "queued" and await b.depth() == 1
        assert (await b.submit(job)).job_id == "rnd_1" and await b.depth() == 1  # idempotent submit
        [d] = b.fetch("w1", 4, 1.0)
        assert d.job == job
        running = b.begin(d, "w1")
        assert running is not None and running.state == "running" and running.deliveries == 1

        def later() -> None:
            time.sleep(0.2)
            b.update("rnd_1", frames_done=3, frames_total=10, progress=0.3)

        t0 = time.monotonic()
        waited, _ = await asyncio.gather(b.wait("rnd_1", running.version, 10.0), asyncio.to_thread(later))
        assert waited is not None and waited.frames_done == 3 and waited.frames_total == 10
        assert 0.15 < time.monotonic() - t0 < 5  # woken by the event, not by the timeout
        b.finish(d, "done", frames_done=10, timings={"model_s": 1.5})
        final = await b.get("rnd_1")
        assert final is not None and final.state == "done" and final.timings == {"model_s": 1.5}
        assert await b.depth() == 0
        assert b.fetch("w1", 4, 0.0) == []
        # A wait on a settled job returns at once.
        assert (await b.wait("rnd_1", final.version, 10.0)).state == "done"  # type: ignore[union-attr]
        await b.aclose()

    run(scenario)


def test_queue_limit(make: Callable[..., Broker]) -> None:
    b = make()

    async def scenario() -> None:
        for i in range(3):
            await b.submit(_ingest(i))
        with pytest.raises(QueueFull):
            await b.submit(_ingest(99))
        assert await b.get(_ingest(99).job_id) is None and await b.depth() == 3
        await b.aclose()

    run(scenario)


def test_cancel_queued_and_running(make: Callable[..., Broker]) -> None:
    b = make()

    async def scenario() -> None:
        await b.submit(_ingest(1))
        await b.submit(_ingest(2))
        st = await b.cancel(_ingest(1).job_id)
        assert st is not None and st.state == "cancelled" and await b.depth() == 1
        started = [d for d in b.fetch("w1", 4, 1.0) if b.begin(d, "w1") is not None]
        assert [d.job.job_id for d in started] == [_ingest(2).job_id]
        assert b.cancelled([_ingest(2).job_id]) == set()
        st = await b.cancel(_ingest(2).job_id)
        assert st is not None and st.state == "running" and st.cancel_requested
        assert b.cancelled([_ingest(2).job_id, "idn_gone"]) == {_ingest(2).job_id, "idn_gone"}
        b.finish(started[0], "cancelled")
        assert (await b.get(_ingest(2).job_id)).state == "cancelled"  # type: ignore[union-attr]
        assert await b.depth() == 0
        await b.aclose()

    run(scenario)


def test_abandoned_job_is_redelivered_then_failed(make: Callable[..., Broker]) -> None:
    """A worker that dies holding a job (no heartbeat, no ack) loses it to another worker after the idle timeout;
    past job_max_deliveries (2) the job fails with internal_error instead of looping forever."""
    a, b2, c = make(), make(), make()

    async def scenario() -> None:
        await a.submit(_ingest(7))
        [d1] = a.fetch("dead-1", 1, 1.0)
        assert a.begin(d1, "dead-1") is not None
        assert b2.fetch("dead-2", 1, 0.0) == []  # not idle long enough yet
        time.sleep(IDLE + 0.3)
        [d2] = b2.fetch("dead-2", 1, 1.0)
        assert d2.job == d1.job
        st = b2.begin(d2, "dead-2")
        assert st is not None and st.deliveries == 2
        time.sleep(IDLE + 0.3)
        [d3] = c.fetch("alive", 1, 1.0)
        assert c.begin(d3, "alive") is None
        final = await a.get(_ingest(7).job_id)
        assert final is not None and final.state == "failed" and final.error is not None
        assert final.error.code == "internal_error" and await a.depth() == 0
        await a.aclose()

    run(scenario)


def test_heartbeat_keeps_a_long_job_and_lists_the_worker(make: Callable[..., Broker]) -> None:
    a, other = make(), make()

    async def scenario() -> None:
        await a.submit(_ingest(3))
        [d] = a.fetch("busy", 1, 1.0)
        assert a.begin(d, "busy") is not None
        for _ in range(4):  # longer than the idle timeout in total, refreshed all along
            now = time.time()
            a.heartbeat(WorkerInfo(worker_id="busy", pid=1, host="h", started_at=now, last_seen=now), [d])
            time.sleep(IDLE / 3)
            assert other.fetch("thief", 1, 0.0) == []
        assert [w.worker_id for w in await a.workers()] == ["busy"]
        a.worker_stopped("busy")
        assert await a.workers() == []
        await a.aclose()

    run(scenario)


def test_internal_error_retries_then_fails(make: Callable[..., Broker]) -> None:
    b = make()

    async def scenario() -> None:
        await b.submit(_ingest(5))
        err = ErrorDetail(code="internal_error", message="boom")
        [d] = b.fetch("w", 1, 1.0)
        assert b.begin(d, "w") is not None
        assert b.retry(d, err) is True
        assert (await b.get(_ingest(5).job_id)).state == "queued"  # type: ignore[union-attr]
        [d] = b.fetch("w", 1, 1.0)
        assert b.begin(d, "w") is not None
        assert b.retry(d, err) is False
        final = await b.get(_ingest(5).job_id)
        assert final is not None and final.state == "failed" and final.error == err and final.deliveries == 2
        assert await b.depth() == 0 and b.fetch("w", 1, 0.0) == []
        await b.aclose()

    run(scenario)


def test_shared_metrics(make: Callable[..., Broker]) -> None:
    b = make()
    b.add_metrics({"aca_frames_synthesized_total": 3.0})
    b.add_metrics({"aca_frames_synthesized_total": 2.0})
    assert run(b.shared_metrics)["aca_frames_synthesized_total"] == 5.0
