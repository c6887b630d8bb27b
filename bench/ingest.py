"""Ingest throughput: frames per second of each stage that turns an uploaded video into references.

A 10 s, 25 fps, 1280x720 H.264 video of scikit-image's astronaut (her head cut out with a soft mask) moving,
turning and zooming over scikit-image's coffee photo is decoded, then every frame goes through the stages of
DESIGN.md section 4 ("Upload") one after another, each timed on its own: landmarks (mediapipe, tracking mode), head
pose, crop (box, smoothing, resampling to 256x256 and mapping the landmarks), and the label drawing. The last row
runs ``engine.faces.track_video`` (landmarks + pose + crop) end to end.

    .venv/bin/python bench/ingest.py [--seconds 10] [--size 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import table, write_section  # noqa: E402
from engine.faces import CropSmoother, FaceMesh, crop, crop_box, head_pose, to_crop, track_video  # noqa: E402
from engine.labels import draw_label  # noqa: E402
from engine.video import decode, encode_mp4  # noqa: E402

WIDTH, HEIGHT, FPS = 1280, 720, 25.0


def make_video(seconds: float) -> list[np.ndarray]:
    """The astronaut's head (a soft elliptical cut-out) moving over the coffee photo, 1280x720 RGB frames."""
    from skimage import data

    background = cv2.resize(data.coffee(), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    head = data.astronaut()[0:300, 75:375]  # (300, 300, 3) hair, face and neck
    mask = np.zeros((300, 300), np.float32)
    cv2.ellipse(mask, (150, 140), (115, 140), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 8)
    n = round(seconds * FPS)
    frames = []
    for i in range(n):
        t = i / FPS
        # A slow loop around the frame with a sway of the head and a zoom, like someone moving in front of a webcam.
        x = WIDTH / 2 + 320 * np.sin(2 * np.pi * t / 10)
        y = HEIGHT / 2 + 80 * np.sin(2 * np.pi * t / 5)
        angle = 20 * np.sin(2 * np.pi * t / 4)
        scale = 1.4 + 0.4 * np.sin(2 * np.pi * t / 7)
        M = cv2.getRotationMatrix2D((150, 150), angle, scale)
        M[:, 2] += np.array([x - 150, y - 150])
        moved = cv2.warpAffine(head, M, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(mask, M, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)[..., None]
        frames.append((alpha * moved + (1 - alpha) * background).astype(np.uint8))
    return frames


def timed(fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_stages(mp4: bytes, size: int) -> tuple[list[list[object]], int]:
    video, t_decode = timed(decode, mp4)
    frames = list(video.frames)
    n = len(frames)

    # A worker imports mediapipe once, not per video: do that outside the timing. Building the graph is per video
    # and stays in.
    with FaceMesh(static_image_mode=True) as warm:
        warm.detect(frames[0])

    def landmarks() -> list[np.ndarray | None]:
        with FaceMesh(static_image_mode=False) as mesh:
            return [mesh.detect(f) for f in frames]

    found, t_landmarks = timed(landmarks)
    kept = [(f, lm) for f, lm in zip(frames, found, strict=True) if lm is not None]
    _, t_pose = timed(lambda: [head_pose(lm, (WIDTH, HEIGHT)) for _, lm in kept])

    def crops() -> list[np.ndarray]:
        smoother = CropSmoother(fps=FPS)
        out = []
        for frame, lm in kept:
            box = smoother(crop_box(lm))
            crop(frame, box, size)
            out.append(to_crop(lm, box, size))
        return out

    cropped, t_crop = timed(crops)
    _, t_labels = timed(lambda: [draw_label(lm, size) for lm in cropped])
    _, t_track = timed(track_video, frames, size, FPS)

    def row(stage: str, seconds: float, count: int) -> list[object]:
        return [stage, count, seconds, count / seconds, 1000 * seconds / count]

    rows = [
        row("decode (H.264 720p -> RGB)", t_decode, n),
        row("landmarks (mediapipe face mesh, tracking)", t_landmarks, n),
        row("head pose (template fit)", t_pose, len(kept)),
        row(f"crop (box, smoothing, {size}x{size} resample, landmarks)", t_crop, len(kept)),
        row(f"labels ({size}x{size}, 3 channels)", t_labels, len(kept)),
        row("track_video (landmarks + pose + crop)", t_track, n),
    ]
    return rows, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    frames = make_video(args.seconds)
    mp4 = encode_mp4(frames, fps=FPS)
    assert mp4 is not None
    rows, n_kept = run_stages(mp4, args.size)
    body = (
        f"{len(frames)} frames ({args.seconds:g} s at {FPS:g} fps, {WIDTH}x{HEIGHT}, {len(mp4) / 1e6:.2f} MB H.264); "
        f"a face was found in {n_kept}. Each stage runs alone over all frames; single process.\n\n"
        + table(["stage", "frames", "seconds", "frames/s", "ms/frame"], rows)
    )
    write_section("ingest", "Ingest: decode, landmarks, pose, crop, labels", body)


if __name__ == "__main__":
    main()
