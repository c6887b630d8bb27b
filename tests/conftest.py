"""Shared fixtures. Keep this file small and cheap to import: heavy imports go inside the fixtures."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

# Triton kernels run on CPU only under Triton's interpreter, which is chosen when Triton first imports: set it
# before anything imports Triton, on machines without an NVIDIA GPU (tests/engine/test_kernels.py uses it).
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class AstronautVideo:
    """A real face in motion: ``frames`` (T, H, W, 3) uint8 RGB decoded from an H.264 mp4, and per frame the
    in-plane rotation applied to the image (``angles``, degrees, counter-clockwise positive like
    ``PIL.Image.rotate``), its ``scales`` and ``shifts`` (pixels, (T, 2))."""

    frames: np.ndarray
    angles: np.ndarray
    scales: np.ndarray
    shifts: np.ndarray
    fps: float


#: Centre of the astronaut's face in scikit-image's 512x512 astronaut (from mediapipe's landmarks) and the side
#: of the square around it that the video frames show at scale 1.
ASTRONAUT_FACE_CENTRE = (225.0, 130.0)
ASTRONAUT_VIEW = 240.0


def make_astronaut_frames(n: int = 24, size: int = 256, max_angle: float = 25.0) -> tuple[np.ndarray, ...]:
    """Frames of the astronaut's face turned, scaled and shifted in the image plane; no encoding.

    Angles follow one period of a sine (so the sweep goes both ways, as a tracked video would), scale and shift
    vary more slowly. Each frame is one warp of the full 512x512 image, so there are no black borders.
    """
    import cv2
    from skimage import data

    image = data.astronaut()
    t = np.linspace(0.0, 1.0, n, endpoint=False)
    angles = max_angle * np.sin(2 * np.pi * t)
    scales = 1.0 + 0.12 * np.sin(np.pi * t)
    shifts = np.stack([12.0 * np.cos(np.pi * t), 8.0 * np.sin(2 * np.pi * t + 1.0)], axis=1)  # (n, 2)
    cx, cy = ASTRONAUT_FACE_CENTRE
    zoom = size / ASTRONAUT_VIEW
    frames = []
    for angle, scale, (dx, dy) in zip(angles, scales, shifts, strict=True):
        # Rotate and scale about the face centre (OpenCV: positive angle is counter-clockwise on screen), then
        # move the face centre to the frame centre plus the shift.
        M = cv2.getRotationMatrix2D((cx, cy), float(angle), float(scale * zoom))
        M[:, 2] += np.array([size / 2 + dx - cx, size / 2 + dy - cy])
        frames.append(cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return np.stack(frames), angles, scales, shifts


@pytest.fixture(scope="session")
def astronaut_video() -> AstronautVideo:
    """24 frames at 256x256, 25 fps, rotated through -25..+25 degrees, encoded as H.264 mp4 and decoded again."""
    from engine.video import decode, encode_mp4

    frames, angles, scales, shifts = make_astronaut_frames()
    mp4 = encode_mp4(list(frames), fps=25.0)
    assert mp4 is not None
    video = decode(mp4)
    assert video.frames.shape == frames.shape
    return AstronautVideo(frames=video.frames, angles=angles, scales=scales, shifts=shifts, fps=video.fps)
