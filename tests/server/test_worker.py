"""The worker on its own (in-process broker, real model): jobs are idempotent, so a redelivery after a crash that
happened after the work but before the acknowledgement writes the same result again, atomically."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest
from server_helpers import Media, make_settings

from server.broker.memory import MemoryBroker
from server.registry import Registry, new_id
from server.schemas import IngestJob, RenderJob
from server.worker import Worker


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_ingest_and_render_run_twice_give_the_same_result(tmp_path: Path, media: Media) -> None:
    from engine.runtime.synthesizer import landmarks_from_normalized
    from engine.video import decode

    settings = make_settings(tmp_path)
    registry = Registry(settings.data_dir)
    registry.ensure_dirs()
    upload = registry.temp_path()
    upload.write_bytes(media.reference)
    iid = new_id("idn")
    registry.create_identity(iid, "", "x", upload, len(media.reference))

    def run(job: IngestJob | RenderJob, worker: Worker) -> None:
        """A fresh broker each time: the state a restarted embedded server starts from."""
        broker = MemoryBroker(settings)
        worker.broker = broker
        asyncio.run(broker.submit(job))
        worker.run_until_idle()
        state = asyncio.run(broker.get(job.job_id))
        assert state is not None and state.state == "done", state

    worker = Worker(settings, MemoryBroker(settings), registry)
    run(IngestJob(job_id=iid, identity_id=iid), worker)
    record = registry.read_identity(iid)
    assert record is not None and record.status == "ready" and not registry.upload_path(iid).exists()
    first = _digest(registry.assets_dir(iid))
    # Crash after the assets were committed, before the record said ready: the second run keeps the assets.
    registry.update_identity(iid, status="processing")
    run(IngestJob(job_id=iid, identity_id=iid), Worker(settings, MemoryBroker(settings), registry, synth=worker.synth))
    assert registry.read_identity(iid).status == "ready"  # type: ignore[union-attr]
    assert _digest(registry.assets_dir(iid)) == first
    assert [p.name for p in registry.identities.joinpath(iid).iterdir() if p.name.startswith(".")] == []

    crop = landmarks_from_normalized(np.asarray(media.landmarks, np.float32), 64)
    npy = registry.temp_path(".npy")
    np.save(npy, crop)
    rid = new_id("rnd")
    registry.create_render(rid, iid, "", source="landmarks", driving=npy, fps=10.0)
    job = RenderJob(job_id=rid, render_id=rid, identity_id=iid)
    run(job, worker)
    frames = decode(registry.output_path(rid)).frames
    assert frames.shape == (len(media.landmarks), 64, 64, 3)
    registry.update_render(rid, state="running")  # as if the worker died before settling the job
    run(job, Worker(settings, MemoryBroker(settings), registry, synth=worker.synth))
    again = decode(registry.output_path(rid)).frames
    np.testing.assert_array_equal(again, frames)
    assert sorted(p.name for p in (registry.renders / rid).iterdir()) == ["driving.npy", "meta.json", "out.mp4"]
    assert registry.read_render(rid).state == "done"  # type: ignore[union-attr]

    # Storage broken under the worker (not the user's fault): retried, then failed with internal_error.
    (registry.assets_dir(iid) / "assets.npz").write_bytes(b"garbage")
    rid2 = new_id("rnd")
    npy = registry.temp_path(".npy")
    np.save(npy, crop)
    registry.create_render(rid2, iid, "", source="landmarks", driving=npy, fps=10.0)
    broker = MemoryBroker(settings)
    fresh = Worker(settings, broker, registry, synth=worker.synth)  # empty identity LRU: it must load the file
    asyncio.run(broker.submit(RenderJob(job_id=rid2, render_id=rid2, identity_id=iid)))
    fresh.run_until_idle()
    state = asyncio.run(broker.get(rid2))
    assert state is not None and state.state == "failed" and state.deliveries == settings.job_max_deliveries
    assert state.error is not None and state.error.code == "internal_error"
    stored = registry.read_render(rid2)
    assert stored is not None and stored.state == "failed" and stored.error == state.error
