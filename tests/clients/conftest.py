"""Fixtures of the client tests: small synthetic videos and a real server in this process (embedded mode).

The server is the real one (``server.app.create_app`` under uvicorn on a free 127.0.0.1 port, the in-process
broker, one worker thread, the tiny preset): the client is tested over HTTP exactly as users run it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clients.client import AvatarClient

# Small enough for 2 busy cores, large enough that mediapipe finds the synthetic faces (checked: 20 of 20).
VIDEO_SIZE = 96


@dataclass(frozen=True)
class Videos:
    size: int  # side of every video, pixels
    reference: Path  # 2 s of identity 0 at 25 fps
    driving: Path  # 0.6 s of identity 1 (another face, other motion) at 25 fps
    driving_frames: int
    no_face: Path  # 1 s of a smooth colour gradient: a valid video without a face
    not_a_video: Path  # text with a .mp4 name


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Videos:
    from engine.synthetic import write_demo_videos
    from engine.video import decode, encode_mp4

    d = tmp_path_factory.mktemp("videos")
    reference, driving = write_demo_videos(d, seed=0, size=VIDEO_SIZE, reference_s=2.0, driving_s=0.6)
    yy, xx = np.mgrid[0:VIDEO_SIZE, 0:VIDEO_SIZE]
    # A drifting colour ramp: (S, S, 3) per frame.
    frames = [np.stack([(2 * xx + 8 * k) % 256, 2 * yy % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
              for k in range(25)]
    no_face = d / "no_face.mp4"
    encode_mp4(frames, 25.0, path=no_face)
    not_a_video = d / "not_a_video.mp4"
    not_a_video.write_text("this is not a video\n" * 100)
    return Videos(VIDEO_SIZE, reference, driving, len(decode(driving).frames), no_face, not_a_video)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis of the ``redis`` tests (CI starts one on 127.0.0.1:6379)."""
    return os.environ.get("ACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded-mode server for the session (identities of one test do not disturb another's: each test
    looks only at the ids it created)."""
    from clients.demo import local_server

    with local_server(data_dir=tmp_path_factory.mktemp("data"), workers=1, preset="tiny") as url:
        yield url


@pytest.fixture()
def client(server_url: str) -> Iterator[AvatarClient]:
    with AvatarClient(server_url, timeout=30.0) as c:
        c.wait_until_ready(60.0)
        yield c


@pytest.fixture(scope="session")
def ready_identity(server_url: str, videos: Videos) -> str:
    """An identity made from ``videos.reference``, ready to drive."""
    with AvatarClient(server_url, timeout=30.0) as c:
        c.wait_until_ready(60.0)
        return c.wait_ready(c.upload(videos.reference, name="fixture").id, timeout=120.0).id
