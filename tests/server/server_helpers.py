"""Helpers of the server tests (imported by name: tests/ has no packages): a real uvicorn on a free port,
settings, snapshots of the data dir, long-polling."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REDIS_URL = os.environ.get("ACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Media:
    reference: bytes  # mp4, 128 px, a synthetic face turning
    driving: bytes  # mp4, 96 px, another face, DRIVING_FRAMES frames
    driving_frames: int
    landmarks: list[list[list[float]]]  # (T, 478, 3) mediapipe-normalised, from the driving clip
    no_face: bytes  # mp4 of textured noise: a valid video without a face
    long: bytes  # mp4 of 3 s (tiny frames), for the duration limit


def mp4(frames: np.ndarray, fps: float = 25.0) -> bytes:
    from engine.video import encode_mp4

    out = encode_mp4(list(frames), fps=fps)
    assert out is not None
    return out


class LiveServer:
    """The app on a real uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Any) -> None:
        import uvicorn

        from server.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    from server.settings import Settings

    base: dict[str, Any] = dict(data_dir=data_dir, preset="tiny", workers=1, batch_delay_ms=1.0, ingest_fps=10.0,
                                progress_interval_s=0.0, heartbeat_interval_s=0.3, heartbeat_ttl_s=5.0,
                                job_idle_timeout_s=2.0, api_keys=[])
    base.update(overrides)
    return Settings(**base)


def snapshot(data_dir: Path) -> list[str]:
    """Every file under the data dir except tmp/ (which is scratch), as relative paths."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.is_file() and "tmp" not in p.relative_to(data_dir).parts)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def upload(client: httpx.Client, data: bytes, name: str | None = None) -> httpx.Response:
    files = {"file": ("video.mp4", data, "video/mp4")}
    return client.post("/v1/identities", files=files, data={"name": name} if name else None)


def settle(client: httpx.Client, url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Long-poll ``url`` until its resource is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url, params={"wait": 20}).json()
        state = body.get("status", body.get("state"))
        if state in ("ready", "failed", "done", "cancelled") or time.monotonic() > deadline:
            return body




def metric(text: str, sample: str) -> float:
    """The value of one unlabelled sample in a Prometheus exposition."""
    return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[1])
