"""Workers: load the model once, run ingest and render jobs from the broker (DESIGN.md section 4).

One ``Worker`` owns one ``Synthesizer`` (not thread-safe), an LRU of loaded ``IdentityAssets``, and the render
jobs it is stepping. Render jobs are stepped together: each forward pass takes the next frame of up to
``batch_size`` jobs (frames of one job cannot share a pass, each needs its previous output), so concurrent
renders of different identities share the model's batch dimension. An idle worker that receives a job waits
``batch_delay_ms`` for more before the first pass (Triton's max_queue_delay).

Jobs are idempotent, so a redelivery after a crash is harmless: ingest commits its assets directory with one
rename and keeps an existing one; a render writes its mp4 with engine.video.encode_mp4 (temp + os.replace) and a
finished render is not redone. Every job settles exactly one way: done, failed with a user error's code (the
input's fault, no retry), cancelled, or, after an internal error, queued again until ``job_max_deliveries``.

``aca worker`` runs one Worker in its own process (Redis mode); ``WorkerPool`` runs N in threads of the API
process (embedded mode).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import UserError, VideoTooLong
from server.broker.base import Broker, Delivery
from server.errors import IdentityNotFound, IdentityNotReady
from server.metrics import BATCH_BUCKETS, Metrics
from server.registry import Registry, dump_report
from server.schemas import ErrorDetail, IngestJob, RenderJob, WorkerInfo
from server.settings import Settings

if TYPE_CHECKING:
    from engine.runtime.identity import IdentityAssets
    from engine.runtime.synthesizer import StreamState, Synthesizer

log = logging.getLogger("aca.worker")

# How long a blocking fetch waits before the loop looks at its stop flag again.
_FETCH_TIMEOUT_S = 1.0


def model_checkpoint(s: Settings) -> Path | None:
    """The checkpoint a worker serves: ``model_path``; else, unless a random ``preset`` is asked for, the shipped
    model ``model`` (sha256 and config verified); None means a seeded random model of the preset."""
    if s.model_path is not None:
        return s.model_path
    if s.preset is not None:
        return None
    from engine.runtime.checkpoint import shipped_model_path

    return shipped_model_path(s.model)


class JobCancelled(Exception):
    """The job's cancellation was requested (or its resource deleted) while it ran."""


def _error(exc: BaseException) -> ErrorDetail:
    if isinstance(exc, UserError):
        return ErrorDetail(code=exc.code, message=exc.message, details=_plain(exc.details))
    return ErrorDetail(code="internal_error", message=f"{type(exc).__name__}: {exc}"[:500])


def _plain(details: dict[str, object]) -> dict[str, object]:
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v) for k, v in details.items()}


@dataclass
class RenderTask:
    """A render job being stepped: its driving landmarks, stream state and frames written so far."""

    delivery: Delivery
    job: RenderJob
    assets: IdentityAssets
    landmarks: np.ndarray  # (T, 478, 3) crop pixels
    fps: float
    stream: StreamState
    frames: np.ndarray  # (T, S, S, 3) uint8 memmap on disk (bounded memory for long renders)
    scratch: Path
    started: float
    t: int = 0
    last_report: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.landmarks.shape[0])


class Worker:
    """One model, one loop. ``run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: Settings, broker: Broker, registry: Registry | None = None,
                 worker_id: str | None = None, synth: Synthesizer | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.registry = registry or Registry(settings.data_dir)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident() % 100000}"
        self.synth = synth
        self.metrics = Metrics()
        self.limits = settings.decode_limits()
        self._assets: OrderedDict[str, IdentityAssets] = OrderedDict()
        self._active: dict[str, RenderTask] = {}
        self._held: dict[str, Delivery] = {}
        self._held_lock = threading.Lock()
        self._started = time.time()
        # The model and the identity LRU are shared by render steps (this thread) and the live batcher's thread
        # (server/live_worker.py); a Synthesizer is not thread-safe.
        self.synth_lock = threading.RLock()

    # --------------------------------------------------------------------------------------------- lifecycle

    def load_model(self) -> Synthesizer:
        if self.synth is None:
            from engine.runtime.synthesizer import Synthesizer

            s = self.settings
            if s.torch_threads:
                import torch

                torch.set_num_threads(s.torch_threads)  # process-wide: every worker thread shares it
            self.synth = Synthesizer.load(model_checkpoint(s), preset=s.preset or "tiny", backend=s.backend,
                                          device=s.device, cache_bytes=s.synth_cache_bytes)
            log.info("worker %s loaded model %s", self.worker_id, self.synth.model_id)
        return self.synth

    def run(self, stop: threading.Event) -> None:
        self.load_model()
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(beat_stop,), name=f"{self.worker_id}-hb",
                                daemon=True)
        self._beat()
        beat.start()
        live = self._start_live(beat_stop)
        try:
            while not stop.is_set():
                self._fill()
                if self._active:
                    self._step()
        finally:
            beat_stop.set()
            beat.join(timeout=5)
            live.join(timeout=5)
            self._abandon_active()
            self.broker.add_metrics(self.metrics.drain())
            self.broker.worker_stopped(self.worker_id)

    def _start_live(self, stop: threading.Event) -> threading.Thread:
        """The live batcher (server/live_worker.py) in its own thread, stopped with the heartbeat."""
        from server.live_worker import LiveBatcher

        thread = threading.Thread(target=LiveBatcher(self).run, args=(stop,), name=f"{self.worker_id}-live",
                                  daemon=True)
        thread.start()
        return thread

    def run_until_idle(self, timeout_s: float = 300.0) -> None:
        """Work until no job is queued or running (tests, one-shot batch use); no heartbeat thread."""
        self.load_model()
        deadline = time.monotonic() + timeout_s
        last_beat = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - last_beat >= self.settings.heartbeat_interval_s:
                self._beat()
                last_beat = time.monotonic()
            room = self.settings.batch_size - len(self._active)
            deliveries = self.broker.fetch(self.worker_id, room, 0.0) if room > 0 else []
            for d in deliveries:
                self._accept(d)
            if self._active:
                self._step()
            elif not deliveries:
                return
        raise TimeoutError(f"jobs still running after {timeout_s} s")

    def _abandon_active(self) -> None:
        """On a clean stop, hand unfinished renders back to the queue at once instead of after the idle timeout."""
        for task in list(self._active.values()):
            self.broker.retry(task.delivery, ErrorDetail(code="internal_error", message="the worker stopped"))
            self._drop(task)

    # --------------------------------------------------------------------------------------------- heartbeat

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_interval_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 -- a broker hiccup must not kill the heartbeat thread
                log.exception("heartbeat of %s failed", self.worker_id)

    def _beat(self) -> None:
        with self._held_lock:
            held = list(self._held.values())
        info = WorkerInfo(worker_id=self.worker_id, pid=os.getpid(), host=socket.gethostname(),
                          model_id=self.synth.model_id if self.synth else None, started_at=self._started,
                          last_seen=time.time(), jobs=[d.job.job_id for d in held])
        self.broker.heartbeat(info, held)
        self.broker.add_metrics(self.metrics.drain())

    def _hold(self, d: Delivery) -> None:
        with self._held_lock:
            self._held[d.token] = d

    def _release(self, d: Delivery) -> None:
        with self._held_lock:
            self._held.pop(d.token, None)

    # ------------------------------------------------------------------------------------------------ intake

    def _fill(self) -> None:
        """Take new deliveries while there is room in the batch; block only when there is nothing to step."""
        room = self.settings.batch_size - len(self._active)
        if room <= 0:
            return
        deliveries = self.broker.fetch(self.worker_id, room, 0.0 if self._active else _FETCH_TIMEOUT_S)
        if deliveries and not self._active and self.settings.batch_delay_ms > 0 and len(deliveries) < room:
            time.sleep(self.settings.batch_delay_ms / 1000)
            deliveries += self.broker.fetch(self.worker_id, room - len(deliveries), 0.0)
        for d in deliveries:
            self._accept(d)

    def _accept(self, d: Delivery) -> None:
        running = self._active.get(d.job.job_id)
        if running is not None:
            # Our own job came back (heartbeats stalled past the idle timeout): keep rendering it under the new
            # delivery rather than starting a second copy.
            self._release(running.delivery)
            running.delivery = d
            self._hold(d)
            return
        self._hold(d)
        try:
            if self.broker.begin(d, self.worker_id) is None:
                self._release(d)
                return
            if isinstance(d.job, IngestJob):
                self._ingest(d, d.job)
            else:
                self._start_render(d, d.job)
        except Exception as exc:  # noqa: BLE001 -- every job settles; _settle_error tells user errors from bugs
            self._settle_error(d, exc)

    def _settle_error(self, d: Delivery, exc: BaseException) -> None:
        job = d.job
        if isinstance(exc, JobCancelled):
            self._finish(d, "cancelled")
            return
        err = _error(exc)
        if isinstance(exc, UserError):
            log.info("job %s failed: %s", job.job_id, err.code)
            self._finish(d, "failed", err)
            return
        log.exception("job %s broke the worker", job.job_id, exc_info=exc)
        requeued = self.broker.retry(d, err)
        self._release(d)
        # Requeued: the disk record keeps its state (the view shows the job's); given up: it records the failure.
        if not requeued and isinstance(job, IngestJob):
            self.registry.update_identity(job.identity_id, status="failed", error=err)
            self.registry.drop_upload(job.identity_id)
        elif not requeued and isinstance(job, RenderJob):
            self.registry.update_render(job.render_id, state="failed", error=err)
        self.metrics.inc("aca_jobs_total", {"kind": job.kind, "outcome": "retried" if requeued else "failed"})

    def _finish(self, d: Delivery, state: str, error: ErrorDetail | None = None, **fields: object) -> None:
        """Write the durable record first, then settle the job: whoever sees the job settled finds the files."""
        job = d.job
        if isinstance(job, IngestJob):
            if state != "done":
                self.registry.update_identity(job.identity_id, status="failed", error=error
                                              or ErrorDetail(code="cancelled", message="the ingest was cancelled"))
                self.registry.drop_upload(job.identity_id)
        else:
            self.registry.update_render(job.render_id, state=state, error=error,
                                        **{k: v for k, v in fields.items() if k in ("frames_done", "timings")})
        self.metrics.inc("aca_jobs_total", {"kind": job.kind, "outcome": state})
        self.metrics.observe("aca_job_seconds", time.time() - job.created_at, {"kind": job.kind, "outcome": state})
        self.broker.add_metrics(self.metrics.drain())  # a settled job's frames are counted by the time it shows
        self.broker.finish(d, state, error=error, **fields)
        self._release(d)

    # ------------------------------------------------------------------------------------------------ ingest

    def _ingest(self, d: Delivery, job: IngestJob) -> None:
        from engine.runtime.identity import IdentityAssets, ingest_video

        record = self.registry.read_identity(job.identity_id)
        if record is None:
            raise JobCancelled()
        committed = self.registry.assets_dir(job.identity_id)
        t0 = time.perf_counter()
        if committed.is_dir():
            # A redelivery after a crash that came after the commit: the committed assets are the result.
            assets = IdentityAssets.load(committed)
        else:
            self.registry.update_identity(job.identity_id, status="processing", error=None)
            assets = ingest_video(self.registry.upload_path(job.identity_id), self.load_model(), self.limits,
                                  fps=self.settings.ingest_fps, max_references=self.settings.max_references,
                                  progress=self._ingest_progress(job))
            self.registry.commit_assets(job.identity_id, assets)
        self.registry.update_identity(
            job.identity_id, status="ready", error=None, report=dump_report(assets.report),
            model_id=assets.model_id, image_size=assets.image_size,
        )
        self.registry.drop_upload(job.identity_id)
        self._finish(d, "done", progress=1.0, timings={"ingest_s": time.perf_counter() - t0})

    def _ingest_progress(self, job: IngestJob) -> Callable[[float], None]:
        """Progress callback of ingest_video: reports (throttled) and stops the job when it is cancelled."""
        last = [0.0]

        def progress(fraction: float) -> None:
            if self.broker.cancelled([job.job_id]):
                raise JobCancelled()
            if time.monotonic() - last[0] >= self.settings.progress_interval_s:
                last[0] = time.monotonic()
                self.broker.update(job.job_id, progress=round(float(fraction), 4))

        return progress

    # ------------------------------------------------------------------------------------------------ render

    def identity(self, identity_id: str) -> IdentityAssets:
        """``_identity`` under the model lock (for the live batcher's thread)."""
        with self.synth_lock:
            return self._identity(identity_id)

    def _identity(self, identity_id: str) -> IdentityAssets:
        """Loaded assets from the LRU (features re-encoded when they came from another model)."""
        from engine.runtime.identity import IdentityAssets

        assets = self._assets.get(identity_id)
        if assets is not None:
            self._assets.move_to_end(identity_id)
            return assets
        record = self.registry.read_identity(identity_id)
        if record is None:
            raise IdentityNotFound(f"no identity {identity_id!r}", id=identity_id)
        if record.status != "ready":
            raise IdentityNotReady(f"identity {identity_id!r} is {record.status}", id=identity_id)
        assets = self.load_model().ensure_features(IdentityAssets.load(self.registry.assets_dir(identity_id)))
        self._assets[identity_id] = assets
        while len(self._assets) > self.settings.identity_cache_size:
            evicted, _ = self._assets.popitem(last=False)
            self.load_model().forget(evicted)
        return assets

    def _driving(self, job: RenderJob, source: str, fps: float | None) -> tuple[np.ndarray, float]:
        """Driving landmarks (T, 478, 3) in crop pixels and the output frame rate."""
        from engine.runtime.synthesizer import driving_landmarks_from_video

        path = self.registry.driving_path(job.render_id, source)
        if source == "video":
            landmarks, video_fps = driving_landmarks_from_video(path, self.limits, self.load_model().image_size)
            return landmarks, video_fps or 25.0
        return np.load(path), float(fps or 25.0)

    def _start_render(self, d: Delivery, job: RenderJob) -> None:
        record = self.registry.read_render(job.render_id)
        if record is None:
            raise JobCancelled()
        if record.state == "done" and self.registry.output_path(job.render_id).is_file():
            self._finish(d, "done", frames_done=record.frames_done, frames_total=record.frames_total, progress=1.0)
            return
        t0 = time.perf_counter()
        assets = self.identity(job.identity_id)
        landmarks, fps = self._driving(job, record.source, record.fps)
        if landmarks.shape[0] > self.settings.max_render_frames:
            raise VideoTooLong(f"the driving input has {landmarks.shape[0]} frames, more than "
                               f"{self.settings.max_render_frames}", n_frames=int(landmarks.shape[0]),
                               limit=self.settings.max_render_frames)
        T, S = int(landmarks.shape[0]), assets.image_size
        scratch = self.registry.scratch_path(job.render_id, d.token)
        frames = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(T, S, S, 3))
        task = RenderTask(delivery=d, job=job, assets=assets, landmarks=landmarks, fps=fps,
                          stream=self.load_model().new_stream(), frames=frames, scratch=scratch,
                          started=time.perf_counter(), timings={"prepare_s": time.perf_counter() - t0})
        self.registry.update_render(job.render_id, state="running", frames_total=T, fps=fps, error=None)
        self.broker.update(job.job_id, frames_total=T, frames_done=0)
        self._active[job.job_id] = task

    def _step(self) -> None:
        """One batched forward: the next frame of every active render."""
        from engine.runtime.synthesizer import FrameRequest

        for job_id in self.broker.cancelled(self._active):
            task = self._active[job_id]
            self._drop(task)
            self._finish(task.delivery, "cancelled", frames_done=task.t)
        tasks = list(self._active.values())
        if not tasks:
            return
        requests = [FrameRequest(identity_id=t.job.identity_id, assets=t.assets, landmarks=t.landmarks[t.t],
                                 state=t.stream) for t in tasks]
        t0 = time.perf_counter()
        try:
            with self.synth_lock:
                rendered = self.load_model().render(requests)
        except Exception as exc:  # noqa: BLE001 -- the whole batch settles with the error
            for task in tasks:
                self._drop(task)
                self._settle_error(task.delivery, exc)
            return
        dt = time.perf_counter() - t0
        self.metrics.inc("aca_frames_synthesized_total", n=len(tasks))
        self.metrics.observe("aca_render_batch_size", len(tasks), buckets=BATCH_BUCKETS)
        self.metrics.observe("aca_frame_seconds", dt / len(tasks))
        now = time.monotonic()
        for task, frame in zip(tasks, rendered, strict=True):
            task.frames[task.t] = frame.image
            task.t += 1
            task.timings["model_s"] = task.timings.get("model_s", 0.0) + dt
            if task.t >= task.total:
                self._complete(task)
            elif now - task.last_report >= self.settings.progress_interval_s:
                task.last_report = now
                self.broker.update(task.job.job_id, frames_done=task.t, progress=round(task.t / task.total, 4))

    def _complete(self, task: RenderTask) -> None:
        from engine.video import encode_mp4

        try:
            t0 = time.perf_counter()
            if isinstance(task.frames, np.memmap):
                task.frames.flush()
            encode_mp4(iter(task.frames), task.fps, path=self.registry.output_path(task.job.render_id),
                       crf=self.settings.render_crf)
            task.timings["encode_s"] = time.perf_counter() - t0
            task.timings["total_s"] = time.perf_counter() - task.started + task.timings.get("prepare_s", 0.0)
            task.timings["per_frame_s"] = task.timings["model_s"] / max(1, task.total)
        except Exception as exc:  # noqa: BLE001
            self._drop(task)
            self._settle_error(task.delivery, exc)
            return
        self._drop(task)
        timings = {k: round(v, 6) for k, v in task.timings.items()}
        self._finish(task.delivery, "done", frames_done=task.total, frames_total=task.total, progress=1.0,
                     timings=timings)

    def _drop(self, task: RenderTask) -> None:
        self._active.pop(task.job.job_id, None)
        task.frames = np.zeros((0, 0, 0, 3), np.uint8)  # drop the memmap before its file goes
        with contextlib.suppress(FileNotFoundError):
            task.scratch.unlink()


class WorkerPool:
    """N workers in threads of this process (embedded mode)."""

    def __init__(self, settings: Settings, broker: Broker, registry: Registry) -> None:
        self.workers = [Worker(settings, broker, registry, worker_id=f"embedded-{os.getpid()}-{i}")
                        for i in range(settings.workers)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for w in self.workers:
            t = threading.Thread(target=self._run, args=(w,), name=w.worker_id, daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, worker: Worker) -> None:
        try:
            worker.run(self._stop)
        except Exception:  # noqa: BLE001 -- a worker that cannot start is logged; /readyz shows it missing
            log.exception("worker %s stopped with an error", worker.worker_id)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        wake = getattr(self.workers[0].broker, "wake_all", None) if self.workers else None
        if wake is not None:
            wake()
        for t in self._threads:
            t.join(timeout=timeout_s)
