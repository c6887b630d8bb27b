"""Head-pose conventions shared by faces.py (estimation) and synthetic.py (rendering).

Camera frame as in OpenCV: x right, y down, z forward (away from the camera); a frontal face looks along -z.
Angles are degrees, and their signs read off the image:

- yaw > 0: the face turns towards the image's right (the nose tip moves right);
- pitch > 0: the face tilts up (the nose tip moves up);
- roll > 0: the face rotates counter-clockwise as seen in the image (as ``PIL.Image.rotate(+angle)`` turns it).

The rotation is ``R = Rz(-roll) @ Ry(-yaw) @ Rx(-pitch)`` applied to a frontal model: pitch first, roll last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pose:
    pitch: float
    yaw: float
    roll: float

    def as_array(self) -> np.ndarray:
        return np.array([self.pitch, self.yaw, self.roll], dtype=np.float64)


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def rotation_matrix(pose: Pose) -> np.ndarray:
    """3x3 rotation that takes a frontal face model to ``pose`` (see the module docstring)."""
    p, y, r = (math.radians(v) for v in (pose.pitch, pose.yaw, pose.roll))
    return _rz(-r) @ _ry(-y) @ _rx(-p)


def pose_from_matrix(R: np.ndarray) -> Pose:
    """Inverse of ``rotation_matrix`` (yaw in [-90, 90])."""
    # R = Rz(-r) Ry(-y) Rx(-p) = Rz(a) Ry(b) Rx(g) with a = -r, b = -y, g = -p (ZYX Tait-Bryan angles).
    b = math.asin(max(-1.0, min(1.0, -float(R[2, 0]))))
    a = math.atan2(float(R[1, 0]), float(R[0, 0]))
    g = math.atan2(float(R[2, 1]), float(R[2, 2]))
    return Pose(pitch=-math.degrees(g), yaw=-math.degrees(b), roll=-math.degrees(a))
