"""``AvatarClient.live`` (async iterator) and ``aca live`` against the real embedded server of conftest.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import Videos
from typer.testing import CliRunner

from clients.client import AvatarClient
from clients.errors import ApiError
from clients.live import LiveFrame, LiveSummary, video_frames


def test_live_iterates_served_frames_in_order(client: AvatarClient, ready_identity: str, videos: Videos) -> None:
    frames, _ = video_frames(videos.driving)
    images = list(frames)
    summary = LiveSummary()

    async def run() -> list[LiveFrame]:
        return [f async for f in client.live(ready_identity, images, fps=8, summary=summary)]

    out = asyncio.run(run())
    seqs = [f.seq for f in out]
    assert seqs == sorted(seqs) and seqs[-1] == len(images) - 1
    assert summary.stats["received"] == len(images)
    assert summary.stats["served"] == len(out) == len(images) - summary.stats["dropped"]
    first = out[0]
    assert first.image().shape == (64, 64, 3) and 0 < first.latency_s < 10
    assert {"queue_s", "model_s", "encode_s"} <= set(first.timings)


def test_live_unknown_identity_raises(client: AvatarClient) -> None:
    async def run() -> None:
        async for _ in client.live("idn_missing", [np.zeros((478, 3), np.float32)]):
            pass

    with pytest.raises(ApiError) as e:
        asyncio.run(run())
    assert e.value.code == "identity_not_found"


def test_aca_live_writes_mp4_and_prints_fps(server_url: str, ready_identity: str, videos: Videos,
                                            tmp_path: Path) -> None:
    from clients.cli import app
    from engine.video import decode

    out = tmp_path / "live.mp4"
    result = CliRunner().invoke(app, ["live", ready_identity, "--driving", str(videos.driving), "-o", str(out),
                                      "--fps", "8", "--url", server_url])
    assert result.exit_code == 0, result.output
    assert "fps" in result.output and "latency p50" in result.output
    assert decode(out).frames.shape[1:] == (64, 64, 3)
