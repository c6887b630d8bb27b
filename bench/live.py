"""Live streams on this machine: 1, 4 and 16 concurrent websocket streams for a fixed time each.

An embedded server (``aca serve``'s layout: the API, the in-process broker and one worker thread with its dynamic
batcher) runs in this process on a free port; one identity is made from a synthetic reference video
(engine.synthetic, tiny preset, 64 px). Each stream sends mediapipe-normalised landmark frames (so the client's
JPEG encode and the server's face mesh are not in the measure) at ``--send-fps`` for ``--seconds``, through the
websocket protocol of server/api/live.py, and records every synthesized frame. Per configuration:

- fps per stream: frames served per second of the run, averaged over the streams;
- latency p50 / p99: from sending a driving frame to receiving its synthesized frame (client clock);
- drop rate: frames the server replaced by newer ones (latest-wins backpressure), over frames received;
- the breakdown (server timings, means over served frames): queue (API send to batch start: the bus, waiting
  behind the stream's previous frame, the batch delay), model (pose, reference selection, label drawing and the
  batched forward), encode (JPEG), and the mean batch size of the forward passes.

    .venv/bin/python bench/live.py [--seconds 8] [--send-fps 25] [--streams 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "server")]

from bench._report import table, write_section  # noqa: E402


async def one_stream(url: str, landmarks: list[Any], seconds: float, send_fps: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    sent_at: dict[int, float] = {}
    frames: list[dict[str, Any]] = []
    async with connect(url, max_size=None) as ws:
        json.loads(await ws.recv())  # ready

        async def send() -> None:
            t0 = time.monotonic()
            seq = 0
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(max(0.0, t0 + seq / send_fps - time.monotonic()))
                sent_at[seq] = time.monotonic()
                await ws.send(json.dumps({"seq": seq, "landmarks": landmarks[seq % len(landmarks)]}))
                seq += 1
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        stats: dict[str, Any] = {}
        async for message in ws:
            if isinstance(message, bytes):
                (n,) = struct.unpack_from(">I", message)
                h = json.loads(message[4 : 4 + n])
                h["client_latency_s"] = time.monotonic() - sent_at[h["seq"]]
                frames.append(h)
            else:
                msg = json.loads(message)
                if msg["type"] == "end":
                    stats = msg["stats"]
        await sender
    return {"frames": frames, "stats": stats, "seconds": seconds}


def run_config(url: str, landmarks: list[Any], n: int, seconds: float, send_fps: float) -> list[object]:
    async def main() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one_stream(url, landmarks, seconds, send_fps) for _ in range(n))))

    runs = asyncio.run(main())
    frames = [f for r in runs for f in r["frames"]]
    lat = np.array([f["client_latency_s"] for f in frames]) * 1000
    received = sum(r["stats"]["received"] for r in runs)
    dropped = sum(r["stats"]["dropped"] for r in runs)

    def mean_ms(key: str) -> float:
        return float(np.mean([f["timings"][key] for f in frames]) * 1000)

    fps = float(np.mean([len(r["frames"]) / r["seconds"] for r in runs]))
    return [n, fps, n * fps, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), dropped / received,
            mean_ms("queue_s"), mean_ms("model_s"), mean_ms("encode_s"),
            float(np.mean([f["timings"]["batch"] for f in frames]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--send-fps", type=float, default=25.0)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    from server_helpers import LiveServer, make_settings, mp4, settle, upload

    from engine.synthetic import random_identity, sequence

    ref = sequence(random_identity(1), 16, seed=1, size=128)
    drv = sequence(random_identity(2), 50, seed=2, size=128)
    landmarks = (drv.landmarks / np.float32(128)).tolist()  # mediapipe-normalised
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "data", live_max_streams=max(args.streams), log_level="warning")
        with LiveServer(settings) as server, server.client() as c:
            identity = settle(c, upload(c, mp4(ref.images)).json()["status_url"])
            url = server.url.replace("http://", "ws://") + f"/v1/identities/{identity['id']}/live"
            run_config(url, landmarks, 1, 1.0, args.send_fps)  # warm-up: caches, first-call costs
            for n in args.streams:
                rows.append(run_config(url, landmarks, n, args.seconds, args.send_fps))
                print(rows[-1], flush=True)
    body = (
        f"Embedded server, 1 worker thread (dynamic batcher: live_batch_size {settings.live_batch_size}, "
        f"live_batch_delay_ms {settings.live_batch_delay_ms:g}), tiny preset (64 px), random weights; each stream "
        f"sends landmark frames at {args.send_fps:g} fps for {args.seconds:g} s over the websocket. Latency is "
        "client-measured (send to receive); queue/model/encode are the worker's timings per served frame; drops "
        "are the server's latest-wins replacements.\n\n"
        + table(["streams", "fps/stream", "fps total", "p50 ms", "p99 ms", "drop rate", "queue ms", "model ms",
                 "encode ms", "mean batch"], rows)
        + "\n\nOne stream keeps up with its send rate; with more "
          "streams the batcher puts frames of different streams in one forward pass (mean batch ~ streams), so "
          "total throughput grows while each stream's rate falls and latest-wins drops keep latency bounded "
          "instead of queueing."
    )
    write_section("live", "Live streams (websocket)", body)


if __name__ == "__main__":
    main()
