"""Redis mode with real worker processes: the API in this process, ``python -m server.cli worker`` in others.
A worker killed with SIGKILL in the middle of a render loses nothing: another worker claims the job after the idle
timeout and finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from server_helpers import REDIS_URL, LiveServer, Media, make_settings, metric, settle, upload, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
N_FRAMES = 16


class Workers:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []  # type: ignore[var-annotated]

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 -- the child owns it
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--worker-id", name], cwd=ROOT,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def redis_stack(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[LiveServer, Workers]]:
    overrides = dict(redis_url=REDIS_URL, redis_prefix=redis_prefix, job_idle_timeout_s=2.0,
                     heartbeat_interval_s=0.3, heartbeat_ttl_s=2.0, progress_interval_s=0.0, job_max_deliveries=3)
    settings = make_settings(tmp_path / "data", **overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACA_")}
    env.update({f"ACA_{k.upper()}": str(v) for k, v in overrides.items()})
    env.update(ACA_DATA_DIR=str(settings.data_dir), ACA_PRESET="tiny", ACA_INGEST_FPS="10", ACA_LOG_LEVEL="info",
               PYTHONPATH=str(ROOT))
    workers = Workers(env, tmp_path)
    with LiveServer(settings) as server:
        try:
            yield server, workers
        finally:
            workers.stop_all()


def test_sigkilled_worker_mid_render_is_replaced_without_loss(redis_stack: tuple[LiveServer, Workers],
                                                              media: Media, redis_prefix: str) -> None:
    server, workers = redis_stack
    first = workers.start("worker-a")
    with server.client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, timeout=90)
        ident = settle(c, upload(c, media.reference).json()["status_url"])
        assert ident["status"] == "ready", ident

        drive = (media.landmarks * 4)[:N_FRAMES]
        rid = c.post(f"/v1/identities/{ident['id']}/renders", json={"landmarks": drive, "fps": 10}).json()["id"]
        # Kill the worker once it has rendered a few frames, well before the end.
        progress = wait_for(lambda: (b := c.get(f"/v1/renders/{rid}").json())["frames_done"] >= 2 and b,
                            timeout=120, interval=0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert progress["state"] == "running" and progress["frames_done"] < N_FRAMES
        time.sleep(1.0)
        assert c.get(f"/v1/renders/{rid}").json()["state"] == "running"  # nobody else has it yet

        workers.start("worker-b")
        done = settle(c, f"/v1/renders/{rid}", timeout=180)
        assert done["state"] == "done", done
        assert done["frames_done"] == done["frames_total"] == N_FRAMES
        video = c.get(f"/v1/renders/{rid}/video").content
        ready = c.get("/readyz").json()
        text = c.get("/metrics").text

    from engine.video import decode

    assert decode(video).frames.shape == (N_FRAMES, 64, 64, 3)
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    job = r.hgetall(f"{redis_prefix}:job:{rid}")
    assert job["state"] == "done" and job["deliveries"] == "2" and job["worker"] == "worker-b"
    assert r.xlen(f"{redis_prefix}:jobs") == 0  # nothing pending, nothing lost
    r.close()
    assert ready["details"]["worker_ids"] == ["worker-b"]  # the killed worker's heartbeat expired
    assert metric(text, "aca_frames_synthesized_total") >= N_FRAMES
    leftovers = [p.name for p in (server.settings.data_dir / "renders" / rid).iterdir()]
    assert sorted(leftovers) == ["driving.npy", "meta.json", "out.mp4"]
