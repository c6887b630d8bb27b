"""What the routes ask for, done: store, sniff, register, queue, roll back; and the public views.

The routes in server/api/ stay thin (HTTP in, HTTP out); this module joins the registry (disk) and the broker
(jobs) for them. Blocking work (disk, probing a video, converting landmarks) runs in the thread pool.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from engine.errors import InvalidLandmarks, VideoTooLong
from server.broker.base import Broker
from server.errors import IdentityNotReady, InvalidRequest, QueueFull, RenderNotDone
from server.registry import Registry, new_id
from server.schemas import (
    TERMINAL,
    IdentityPublic,
    IdentityRecord,
    IngestJob,
    JobState,
    RenderJob,
    RenderLandmarksCreate,
    RenderPublic,
    RenderRecord,
)
from server.settings import Settings
from server.uploads import Upload

_MAX_NAME = 200


class Service:
    def __init__(self, settings: Settings, registry: Registry, broker: Broker) -> None:
        self.settings = settings
        self.registry = registry
        self.broker = broker

    # ------------------------------------------------------------------------------------------------ helpers

    async def _check_room(self) -> None:
        """Refuse early, before the upload is stored (``submit`` checks again, atomically)."""
        depth = await self.broker.depth()
        if depth >= self.settings.queue_max_depth:
            raise QueueFull(f"{depth} jobs are waiting; try again later", depth=depth,
                            limit=self.settings.queue_max_depth)

    async def _probe(self, path: Path) -> None:
        from engine.video import probe

        await run_in_threadpool(probe, path, self.settings.decode_limits())

    async def wait_job(self, job_id: str, timeout_s: float) -> JobState | None:
        """Block (on broker events) until the job is terminal or ``timeout_s`` passes."""
        deadline = time.monotonic() + min(timeout_s, self.settings.max_wait_s)
        state = await self.broker.get(job_id)
        while state is not None and not state.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            state = await self.broker.wait(job_id, state.version, left)
        return state

    async def recover(self) -> int:
        """Embedded mode after a restart: the in-process queue is empty, so queue again every identity and render
        the disk says is unfinished (jobs are idempotent). Returns how many were queued."""
        requeued = 0
        for identity in await run_in_threadpool(self.registry.unfinished_identities):
            with contextlib.suppress(QueueFull):
                await self.broker.submit(IngestJob(job_id=identity.id, identity_id=identity.id))
                requeued += 1
        for render in await run_in_threadpool(self.registry.unfinished_renders):
            with contextlib.suppress(QueueFull):
                await self.broker.submit(RenderJob(job_id=render.id, render_id=render.id,
                                                   identity_id=render.identity_id))
                requeued += 1
        return requeued

    # ---------------------------------------------------------------------------------------------- identities

    async def precheck_upload(self) -> None:
        await self._check_room()

    async def create_identity(self, owner: str, upload: Upload) -> IdentityRecord:
        """Sniff the stored upload, publish the identity (atomically, with its upload) and queue its ingest.

        On any failure the upload is removed and the registry is left as it was.
        """
        try:
            await self._probe(upload.path)
            name = (upload.fields.get("name") or "").strip()[:_MAX_NAME] or None
            identity_id = new_id("idn")
            record = await run_in_threadpool(self.registry.create_identity, identity_id, owner, name, upload.path,
                                             upload.size)
        finally:
            with contextlib.suppress(FileNotFoundError):
                upload.path.unlink()  # moved into the identity on success
        try:
            await self.broker.submit(IngestJob(job_id=identity_id, identity_id=identity_id))
        except BaseException:
            await run_in_threadpool(self.registry.delete_identity, identity_id)
            raise
        return record

    async def get_identity(self, identity_id: str, owner: str, wait_s: float = 0.0) -> IdentityPublic:
        record = await run_in_threadpool(self.registry.get_identity, identity_id, owner)
        job = await self.broker.get(identity_id)
        if wait_s > 0 and record.status in ("queued", "processing"):
            job = await self.wait_job(identity_id, wait_s)
            record = await run_in_threadpool(self.registry.get_identity, identity_id, owner)
        return identity_view(record, job)

    async def list_identities(self, owner: str) -> list[IdentityPublic]:
        records = await run_in_threadpool(self.registry.list_identities, owner)
        return [identity_view(r, await self.broker.get(r.id) if r.status in ("queued", "processing") else None)
                for r in records]

    async def delete_identity(self, identity_id: str, owner: str) -> None:
        await run_in_threadpool(self.registry.get_identity, identity_id, owner)
        await self.broker.forget(identity_id)  # a running ingest sees its job gone and stops
        await run_in_threadpool(self.registry.delete_identity, identity_id)

    async def appearance_map(self, identity_id: str, owner: str) -> Path:
        record = await run_in_threadpool(self.registry.get_identity, identity_id, owner)
        path = self.registry.appearance_map_path(identity_id)
        if record.status != "ready" or not path.is_file():
            raise IdentityNotReady(f"identity {identity_id!r} is {record.status}", id=identity_id,
                                   status=record.status)
        return path

    async def ready_identity(self, identity_id: str, owner: str) -> IdentityRecord:
        record = await run_in_threadpool(self.registry.get_identity, identity_id, owner)
        if record.status != "ready" or record.image_size is None:
            raise IdentityNotReady(f"identity {identity_id!r} is {record.status}, not ready", id=identity_id,
                                   status=record.status)
        return record

    # ------------------------------------------------------------------------------------------------ renders

    async def create_render_from_video(self, identity: IdentityRecord, owner: str, upload: Upload) -> RenderRecord:
        try:
            await self._probe(upload.path)
            render_id = new_id("rnd")
            record = await run_in_threadpool(
                lambda: self.registry.create_render(render_id, identity.id, owner, source="video",
                                                    driving=upload.path, fps=None))
        finally:
            with contextlib.suppress(FileNotFoundError):
                upload.path.unlink()
        return await self._queue_render(record)

    async def create_render_from_landmarks(self, identity: IdentityRecord, owner: str, body: Any) -> RenderRecord:
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object {\"landmarks\": [...], \"fps\": 25}")
        await self._check_room()
        try:
            req = RenderLandmarksCreate.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"][:2])
            raise InvalidRequest(f"{loc}: {first['msg']}", errors=e.error_count()) from None
        if req.fps > self.settings.max_render_fps:
            raise InvalidRequest(f"fps must be at most {self.settings.max_render_fps:g}", fps=req.fps)
        if len(req.landmarks) > self.settings.max_render_frames:
            raise VideoTooLong(f"{len(req.landmarks)} landmark frames, more than {self.settings.max_render_frames}",
                               n_frames=len(req.landmarks), limit=self.settings.max_render_frames)
        assert identity.image_size is not None
        crop = await run_in_threadpool(_to_crop, req.landmarks, identity.image_size, req.fps)
        path = self.registry.temp_path(".npy")
        try:
            await run_in_threadpool(_save_npy, path, crop)
            render_id = new_id("rnd")
            record = await run_in_threadpool(
                lambda: self.registry.create_render(render_id, identity.id, owner, source="landmarks", driving=path,
                                                    fps=req.fps, frames_total=int(crop.shape[0])))
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return await self._queue_render(record)

    async def _queue_render(self, record: RenderRecord) -> RenderRecord:
        try:
            await self.broker.submit(RenderJob(job_id=record.id, render_id=record.id, identity_id=record.identity_id))
        except BaseException:
            await run_in_threadpool(self.registry.delete_render, record.id)
            raise
        return record

    async def get_render(self, render_id: str, owner: str, wait_s: float = 0.0) -> RenderPublic:
        record = await run_in_threadpool(self.registry.get_render, render_id, owner)
        job = await self.broker.get(render_id)
        if wait_s > 0 and record.state not in TERMINAL:
            job = await self.wait_job(render_id, wait_s)
            record = await run_in_threadpool(self.registry.get_render, render_id, owner)
        return render_view(record, job)

    async def render_video(self, render_id: str, owner: str) -> Path:
        record = await run_in_threadpool(self.registry.get_render, render_id, owner)
        path = self.registry.output_path(render_id)
        if record.state != "done" or not path.is_file():
            view = render_view(record, await self.broker.get(render_id))
            raise RenderNotDone(f"render {render_id!r} is {view.state}", id=render_id, state=view.state)
        return path

    async def delete_render(self, render_id: str, owner: str) -> RenderPublic | None:
        """Cancel an unfinished render (its view is returned) or delete a finished one (None)."""
        record = await run_in_threadpool(self.registry.get_render, render_id, owner)
        job = await self.broker.get(render_id)
        if record.state not in TERMINAL and (job is None or not job.terminal):
            job = await self.broker.cancel(render_id)
            if job is not None and job.state == "cancelled":
                updated = await run_in_threadpool(lambda: self.registry.update_render(render_id, state="cancelled"))
                record = updated or record
            return render_view(record, job)
        await self.broker.forget(render_id)
        await run_in_threadpool(self.registry.delete_render, render_id)
        return None


def _to_crop(landmarks: list[list[list[float]]], size: int, fps: float) -> np.ndarray:
    from engine.runtime.synthesizer import landmarks_from_normalized

    try:
        arr = np.asarray(landmarks, dtype=np.float32)
    except ValueError as e:  # ragged lists
        raise InvalidLandmarks(f"landmarks must be a (T, 478, 3) array: {e}") from None
    return landmarks_from_normalized(arr, size, fps=fps)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------------------------------- views


def identity_view(record: IdentityRecord, job: JobState | None) -> IdentityPublic:
    status, error, progress = record.status, record.error, 1.0 if record.status == "ready" else 0.0
    if status in ("queued", "processing") and job is not None:
        progress = job.progress
        if job.state == "running":
            status = "processing"
        elif job.state in ("failed", "cancelled"):
            # The broker gave up on the job (deliveries used up) before any worker could record it on disk.
            status, error = "failed", job.error
    report = record.report or {}
    return IdentityPublic(
        id=record.id, name=record.name, status=status, progress=progress, error=error,
        created_at=record.created_at, updated_at=max(record.updated_at, job.updated_at if job else 0.0),
        frames_total=report.get("frames_total"), frames_used=report.get("frames_used"),
        frames_dropped=report.get("frames_dropped"), fps=report.get("fps"), duration_s=report.get("duration_s"),
        n_references=report.get("n_references"), coverage=report.get("coverage"), model_id=record.model_id,
        image_size=record.image_size,
        appearance_map_url=f"/v1/identities/{record.id}/appearance-map.png" if status == "ready" else None,
    )


def render_view(record: RenderRecord, job: JobState | None) -> RenderPublic:
    state, frames_done, frames_total = record.state, record.frames_done, record.frames_total
    timings, error = record.timings, record.error
    if record.state not in TERMINAL and job is not None:
        # Live progress lives in the broker; the disk record only catches up at the end.
        state = "queued" if job.state == "queued" else job.state
        frames_done, frames_total = job.frames_done, max(job.frames_total, record.frames_total)
        timings = job.timings or timings
        error = job.error if job.terminal else None
        if job.state == "done":  # settled after the disk record was written; read it again next time
            state = "done"
    updated = max(record.updated_at, job.updated_at if job else 0.0)
    return RenderPublic(
        id=record.id, identity_id=record.identity_id, state=state, frames_done=frames_done,
        frames_total=frames_total, fps=record.fps, timings=timings, error=error, created_at=record.created_at,
        updated_at=updated, video_url=f"/v1/renders/{record.id}/video" if state == "done" else None,
    )
