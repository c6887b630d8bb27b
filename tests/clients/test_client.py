"""AvatarClient against a real server: round trips over HTTP, every error code mapped back to its class."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

import engine.errors as engine_errors
from clients import errors
from clients.client import AsyncAvatarClient, AvatarClient, Identity, Render
from clients.demo import local_server

if TYPE_CHECKING:
    from tests.clients.conftest import Videos

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------- error mapping (no server)


@pytest.mark.parametrize(
    ("code", "status", "cls", "engine_cls"),
    [
        ("no_face_found", 422, errors.NoFaceFound, engine_errors.NoFaceFound),
        ("invalid_video", 422, errors.InvalidVideo, engine_errors.InvalidVideo),
        ("video_too_large", 413, errors.VideoTooLarge, engine_errors.VideoTooLarge),
        ("video_too_long", 422, errors.VideoTooLong, engine_errors.VideoTooLong),
        ("resolution_too_high", 422, errors.ResolutionTooHigh, engine_errors.ResolutionTooHigh),
        ("invalid_landmarks", 422, errors.InvalidLandmarks, engine_errors.InvalidLandmarks),
        ("identity_not_found", 404, errors.IdentityNotFound, engine_errors.UserError),
        ("queue_full", 429, errors.QueueFull, engine_errors.UserError),
    ],
)
def test_codes_map_to_classes_that_engine_handlers_catch(code: str, status: int, cls: type,
                                                         engine_cls: type) -> None:
    body = {"error": {"code": code, "message": "m", "details": {"frames": 3}}}
    err = errors.error_from_response(status, body)
    assert type(err) is cls
    assert isinstance(err, engine_cls) and isinstance(err, errors.ApiError)
    assert (err.code, err.message, err.details, err.status) == (code, "m", {"frames": 3}, status)
    # Every class for an engine code keeps the engine's code and status, so both sides speak one registry.
    if issubclass(engine_cls, engine_errors.UserError) and engine_cls is not engine_errors.UserError:
        assert (cls.code, cls.http_status) == (engine_cls.code, engine_cls.http_status)


def test_unknown_codes_and_foreign_bodies_map_by_status() -> None:
    newer = errors.error_from_response(404, {"error": {"code": "voice_not_found", "message": "no voice"}})
    assert type(newer) is errors.NotFound and newer.code == "voice_not_found" and newer.status == 404
    assert type(errors.error_from_response(429, {"error": {"code": "slow_down", "message": ""}})) is (
        errors.TooManyRequests)
    # FastAPI's default body and a proxy's HTML page.
    detail = errors.error_from_response(422, {"detail": [{"loc": ["body"], "msg": "field required"}]})
    assert type(detail) is errors.InvalidRequest and detail.details["errors"][0]["msg"] == "field required"
    proxy = errors.error_from_response(502, "<html>Bad Gateway</html>")
    assert type(proxy) is errors.ServerError and not isinstance(proxy, engine_errors.UserError)
    assert type(errors.error_from_response(418, None)) is errors.ClientError


def test_errors_pickle_with_their_fields() -> None:
    body = {"error": {"code": "no_face_found", "message": "none", "details": {"n": 1}}}
    err = errors.error_from_response(422, body)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.NoFaceFound
    assert (back.code, back.message, back.details, back.status) == ("no_face_found", "none", {"n": 1}, 422)


def test_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with AvatarClient(f"http://127.0.0.1:{port}", timeout=2.0) as c:
        with pytest.raises(errors.ApiConnectionError):
            c.health()
        assert c.ready() is False


# -------------------------------------------------------------------------------------- against a real server


def _landmarks(size: int, n_frames: int, seed: int = 5) -> np.ndarray:
    """Driving landmarks of a synthetic face, mediapipe-normalised: (T, 478, 3) pixels / size."""
    from engine.synthetic import random_identity, sequence

    return sequence(random_identity(seed), n_frames, seed=seed, size=size).landmarks / size


def test_upload_ready_render_download_round_trip(client: AvatarClient, videos: Videos,
                                                 tmp_path: Path) -> None:
    from engine.video import decode

    created = client.upload(videos.reference, name="round trip")
    assert created.status in ("queued", "processing", "ready")
    seen: list[str] = []
    identity = client.wait_ready(created.id, timeout=120.0, on_progress=lambda i: seen.append(i.status))
    assert identity.status == "ready" and seen[-1] == "ready"
    assert identity.name == "round trip"
    assert identity.frames_used and identity.frames_used > 0 and identity.frames_dropped == 0
    assert created.id in {i.id for i in client.identities()}
    assert client.appearance_map_png(created.id).startswith(PNG_MAGIC)

    job = client.render(identity.id, driving=videos.driving)
    frames: list[int] = []
    render = client.wait_render(job.id, timeout=120.0, on_progress=lambda r: frames.append(r.frames_done))
    assert render.state == "done" and render.identity_id == identity.id
    assert frames == sorted(frames)  # progress never goes backwards
    out = client.download_render(render.id, tmp_path / "nested" / "out.mp4")
    assert out == tmp_path / "nested" / "out.mp4"
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]  # no temporary file left behind
    video = decode(out)
    assert len(video.frames) == render.frames_total == videos.driving_frames
    size = identity.model_extra.get("image_size") if identity.model_extra else None
    assert video.frames.shape[1:3] == (size, size) if size else video.frames.shape[1] == video.frames.shape[2]


def test_render_from_landmarks(client: AvatarClient, ready_identity: str, videos: Videos,
                               tmp_path: Path) -> None:
    from engine.video import decode

    job = client.render(ready_identity, landmarks=_landmarks(videos.size, 6), fps=12.5)
    render = client.wait_render(job.id, timeout=60.0)
    assert render.frames_total == 6
    video = decode(client.download_render(render.id, tmp_path / "lm.mp4"))
    assert len(video.frames) == 6 and video.fps == pytest.approx(12.5)


def test_render_needs_exactly_one_driving_input(client: AvatarClient, ready_identity: str,
                                                videos: Videos) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.render(ready_identity)
    with pytest.raises(ValueError, match="exactly one"):
        client.render(ready_identity, driving=videos.driving, landmarks=np.zeros((1, 478, 3)))


def test_unknown_ids_raise_not_found(client: AvatarClient, videos: Videos, tmp_path: Path) -> None:
    with pytest.raises(errors.IdentityNotFound) as e:
        client.get_identity("does-not-exist")
    assert e.value.code == "identity_not_found" and e.value.status == 404
    with pytest.raises(errors.IdentityNotFound):
        client.render("does-not-exist", driving=videos.driving)
    with pytest.raises(errors.RenderNotFound):
        client.get_render("does-not-exist")
    with pytest.raises(errors.RenderNotFound):
        client.download_render("does-not-exist", tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()
    # An id that tries to climb out of its path segment is still just an unknown id.
    with pytest.raises(errors.NotFound):
        client.get_identity("../renders/x")


def test_bad_uploads_raise_their_engine_error(client: AvatarClient, videos: Videos) -> None:
    before = {i.id for i in client.identities()}
    with pytest.raises(engine_errors.InvalidVideo) as e:
        client.upload(videos.not_a_video)
    assert isinstance(e.value, errors.InvalidVideo)
    assert e.value.code == "invalid_video" and e.value.status == 422
    with pytest.raises(errors.InvalidVideo):
        client.upload(b"")
    with pytest.raises(errors.InvalidVideo):
        client.upload(videos.reference.read_bytes()[:2000])  # the first 2 KB of an mp4: no decodable frame
    assert {i.id for i in client.identities()} == before


def test_video_without_a_face_fails_with_no_face_found(client: AvatarClient, videos: Videos) -> None:
    identity = client.upload(videos.no_face)
    with pytest.raises(engine_errors.NoFaceFound) as e:
        client.wait_ready(identity.id, timeout=60.0)
    assert e.value.code == "no_face_found"
    failed = client.get_identity(identity.id)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "no_face_found"
    with pytest.raises(errors.IdentityNotReady):
        client.render(identity.id, driving=videos.driving)
    client.delete_identity(identity.id)
    with pytest.raises(errors.IdentityNotFound):
        client.get_identity(identity.id)


def test_cancelled_render_has_no_video(client: AvatarClient, ready_identity: str, videos: Videos,
                                       tmp_path: Path) -> None:
    # Long enough (about 20 s of work on this CPU) that the cancel lands while it is queued or running.
    landmarks = np.repeat(_landmarks(videos.size, 2), 150, axis=0)  # (300, 478, 3)
    job = client.render(ready_identity, landmarks=landmarks, fps=25.0)
    client.cancel_render(job.id)
    with pytest.raises(errors.RenderCancelled):
        client.wait_render(job.id, timeout=60.0)
    assert client.get_render(job.id).state == "cancelled"
    with pytest.raises(errors.RenderNotDone):
        client.download_render(job.id, tmp_path / "c.mp4")


def test_wait_timeout_leaves_the_job_running(client: AvatarClient, videos: Videos) -> None:
    identity = client.upload(videos.reference)
    with pytest.raises(errors.WaitTimeout) as e:
        client.wait_ready(identity.id, timeout=0.0)
    assert isinstance(e.value, TimeoutError) and e.value.details["id"] == identity.id
    assert client.wait_ready(identity.id, timeout=120.0).status == "ready"
    client.delete_identity(identity.id)


def test_async_client(server_url: str, ready_identity: str, videos: Videos, tmp_path: Path) -> None:
    from engine.video import decode

    async def main() -> tuple[Identity, Render, Path]:
        async with AsyncAvatarClient(server_url, timeout=30.0) as c:
            assert await c.ready()
            with pytest.raises(errors.IdentityNotFound):
                await c.get_identity("nope")
            with pytest.raises(errors.InvalidVideo):
                await c.upload(videos.not_a_video)
            identity = await c.wait_ready(ready_identity)
            assert ready_identity in {i.id for i in await c.identities()}
            job = await c.render(ready_identity, landmarks=landmarks, fps=25.0)
            render = await c.wait_render(job.id, timeout=120.0)
            return identity, render, await c.download_render(render.id, tmp_path / "async.mp4")

    landmarks = _landmarks(videos.size, 4)
    identity, render, path = asyncio.run(main())
    assert identity.status == "ready" and render.state == "done"
    assert len(decode(path).frames) == 4


def test_api_keys_authenticate_and_isolate_owners(tmp_path: Path, videos: Videos) -> None:
    with local_server(data_dir=tmp_path / "data", workers=0, api_keys=["key-a", "key-b"]) as url:
        with AvatarClient(url) as anonymous:
            assert anonymous.health()  # /healthz stays open
            with pytest.raises(errors.Unauthorized) as e:
                anonymous.identities()
            assert e.value.status == 401
        with AvatarClient(url, api_key="wrong") as wrong, pytest.raises(errors.Unauthorized):
            wrong.identities()
        with AvatarClient(url, api_key="key-a") as a, AvatarClient(url, api_key="key-b") as b:
            mine = a.upload(videos.reference)  # no worker: it stays queued, which is all this test needs
            assert [i.id for i in a.identities()] == [mine.id]
            assert b.identities() == []
            with pytest.raises(errors.IdentityNotFound):
                b.get_identity(mine.id)
            with pytest.raises(errors.IdentityNotFound):
                b.delete_identity(mine.id)
            assert a.get_identity(mine.id).id == mine.id


@pytest.mark.redis
def test_round_trip_over_redis(tmp_path: Path, videos: Videos, redis_url: str) -> None:
    """The same client flow in the production layout: the API with the Redis broker and no workers, and one
    ``aca worker`` process consuming the stream."""
    import os
    import subprocess
    import sys
    import uuid

    from engine.video import decode

    prefix = f"test-clients-{uuid.uuid4().hex[:12]}"
    data = tmp_path / "data"
    env = {**os.environ, "ACA_REDIS_URL": redis_url, "ACA_REDIS_PREFIX": prefix, "ACA_DATA_DIR": str(data),
           "ACA_PRESET": "tiny", "ACA_HEARTBEAT_INTERVAL_S": "0.5"}
    worker = subprocess.Popen([sys.executable, "-m", "clients.cli", "worker"], env=env,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        with local_server(data_dir=data, workers=0, redis_url=redis_url, redis_prefix=prefix,
                          heartbeat_interval_s=0.5) as url, AvatarClient(url) as c:
            c.wait_until_ready(90.0)  # the worker's first heartbeat
            identity = c.wait_ready(c.upload(videos.reference).id, timeout=120.0)
            job = c.render(identity.id, landmarks=_landmarks(videos.size, 4), fps=25.0)
            render = c.wait_render(job.id, timeout=120.0)
            out = c.download_render(render.id, tmp_path / "redis.mp4")
            assert render.frames_total == len(decode(out).frames) == 4
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        _drop_redis_keys(redis_url, prefix)


def _drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)
    finally:
        r.close()
