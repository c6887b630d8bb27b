"""``aca demo``: the README's main job, the whole product on one machine with embedded defaults.

A server starts in this process (no Redis, no GPU: the in-process broker and N worker threads) on a free
port of 127.0.0.1; a synthetic reference video of one procedural face and a driving video of another
(``engine.synthetic.write_demo_videos``) go through the public HTTP API exactly as a remote client's would
(upload, wait ready, render, wait, download), and the result lands in ``out/demo/``: ``out.mp4`` and
``side_by_side.png`` (rows of driving frame | output frame).

``local_server`` is also how the client tests and ``bench/serve_batch.py`` run a real server in-process.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.client import AvatarClient, Identity, Render

if TYPE_CHECKING:
    from rich.console import Console

    from server.settings import Settings

__all__ = ["DemoResult", "local_server", "run_demo", "side_by_side"]

# How long a starting server may take to bind and load the model before we give up on it.
_START_TIMEOUT_S = 120.0


@contextmanager
def local_server(settings: Settings | None = None, **overrides: Any) -> Iterator[str]:
    """Run the API (``server.app.create_app``) under uvicorn in a background thread on a free 127.0.0.1 port
    and yield its base URL; in embedded mode the app's lifespan starts ``settings.workers`` worker threads.
    Stops the server (lifespan shutdown included) on exit.

    ``overrides`` replace fields of ``settings`` (or of the defaults: ``local_server(workers=2)``).
    """
    # The server side is imported only when a server is wanted.
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    if settings is None:
        settings = Settings(**overrides)
    elif overrides:
        settings = settings.model_copy(update=overrides)
    app = create_app(settings)
    # Bind here and hand uvicorn the socket: the port is known before the server starts, and no other process
    # can take it between picking and binding (the race of "find a free port, then start on it").
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="aca-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the in-process server stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server did not start within {_START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class DemoResult:
    video: Path
    side_by_side: Path
    reference: Path
    driving: Path
    identity: Identity
    render: Render
    seconds: dict[str, float] = field(default_factory=dict)


def side_by_side(driving_frames: np.ndarray, output_frames: np.ndarray, rows: int = 4) -> np.ndarray:
    """Rows of (driving frame | output frame) at evenly spaced times, both at the larger of the two sizes.

    driving_frames (T_d, H_d, W_d, 3) and output_frames (T_o, S, S, 3) uint8 may differ in length (the render
    resamples to its fps): row k shows the frames at the same fraction k / rows of each clip.
    Returns (rows * side, 2 * side, 3) uint8.
    """
    from PIL import Image

    side = max(driving_frames.shape[1], output_frames.shape[1])
    n = min(rows, len(driving_frames), len(output_frames))
    picks = (np.arange(n) + 0.5) / n  # centre of each of n equal spans of the clip, in [0, 1)

    def at(frames: np.ndarray, t: float) -> np.ndarray:
        image = Image.fromarray(frames[min(len(frames) - 1, int(t * len(frames)))])
        return np.asarray(image.resize((side, side), Image.Resampling.BICUBIC))  # (side, side, 3)

    # each row (side, 2 * side, 3)
    grid = [np.concatenate([at(driving_frames, t), at(output_frames, t)], axis=1) for t in picks]
    return np.concatenate(grid, axis=0)  # (n * side, 2 * side, 3)


def run_demo(
    out_dir: Path = Path("out/demo"),
    *,
    workers: int = 1,
    size: int = 128,
    seed: int = 0,
    reference_s: float = 4.0,
    driving_s: float = 2.0,
    fps: float = 25.0,
    data_dir: Path | None = None,
    console: Console | None = None,
    **settings: Any,
) -> DemoResult:
    """Make the synthetic videos, start a local server, upload, render, download, write the side-by-side PNG.

    ``data_dir`` None: the server's registry lives in a temporary directory removed at the end. ``settings``
    override further server settings (``preset="face-128"``, ``batch_size=4``, ...).
    """
    from PIL import Image

    from engine.synthetic import write_demo_videos
    from engine.video import DecodeLimits, decode

    say = console.print if console is not None else (lambda *a, **k: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    say(f"making synthetic videos ({size} px): reference {reference_s:g} s, driving {driving_s:g} s ...")
    reference, driving = write_demo_videos(out_dir, seed=seed, size=size, fps=fps, reference_s=reference_s,
                                           driving_s=driving_s)
    seconds["videos"] = time.perf_counter() - t0

    with ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aca-demo-")))
        t0 = time.perf_counter()
        url = stack.enter_context(local_server(data_dir=data_dir, workers=workers, **settings))
        client = stack.enter_context(AvatarClient(url))
        client.wait_until_ready(_START_TIMEOUT_S)
        seconds["server_start"] = time.perf_counter() - t0
        say(f"server on {url} with {workers} in-process worker(s)")

        t0 = time.perf_counter()
        identity = client.upload(reference, name=f"synthetic-{seed}")
        identity = _wait_identity(client, identity.id, console)
        seconds["ingest"] = time.perf_counter() - t0
        say(f"identity {identity.id}: {identity.frames_used} frames used, {identity.frames_dropped} dropped")

        t0 = time.perf_counter()
        job = client.render(identity.id, driving=driving)
        render = _wait_render(client, job.id, console)
        video = client.download_render(render.id, out_dir / "out.mp4")
        seconds["render"] = time.perf_counter() - t0
        say(f"render {render.id}: {render.frames_done} frames")

    limits = DecodeLimits()
    output = decode(video, limits)
    grid = side_by_side(decode(driving, limits).frames, output.frames)
    png = out_dir / "side_by_side.png"
    Image.fromarray(grid).save(png)
    return DemoResult(video=video, side_by_side=png, reference=reference, driving=driving, identity=identity,
                      render=render, seconds=seconds)


def _wait_identity(client: AvatarClient, identity_id: str, console: Console | None) -> Identity:
    if console is None:
        return client.wait_ready(identity_id)
    from clients.cli import wait_identity

    return wait_identity(client, identity_id, timeout=600.0)


def _wait_render(client: AvatarClient, render_id: str, console: Console | None) -> Render:
    if console is None:
        return client.wait_render(render_id)
    from clients.cli import wait_render

    return wait_render(client, render_id, timeout=1800.0)
