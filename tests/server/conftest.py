"""Fixtures of the server tests: media made by engine.synthetic, a unique key prefix on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from server_helpers import REDIS_URL, Media, mp4


@pytest.fixture(scope="session")
def media() -> Media:
    from engine.synthetic import random_identity, sequence

    ref = sequence(random_identity(1), 16, seed=1, size=128)
    drv = sequence(random_identity(2), 5, seed=2, size=96)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, size=(8, 64, 64, 3), dtype=np.uint8)
    # Normalised like mediapipe: x, y in [0, 1] of the frame, z on x's scale.
    landmarks = (drv.landmarks / np.float32(96)).astype(np.float32)
    return Media(
        reference=mp4(ref.images), driving=mp4(drv.images), driving_frames=len(drv.images),
        landmarks=landmarks.tolist(), no_face=mp4(noise),
        long=mp4(rng.integers(0, 255, size=(75, 32, 32, 3), dtype=np.uint8)),
    )


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the test Redis; every key under it is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.skip(f"no Redis at {REDIS_URL}: {e}")
    prefix = f"acatest-{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()
