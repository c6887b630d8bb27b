"""Landmarks -> label images: the input label I_l^t and the reference labels R_l of the paper (section 3).

Few-shot vid2vid draws its face labels as edge maps of the landmark contours (../shared/REFERENCES.md); we do the
same with mediapipe's 478-point face mesh, from its own contour lists in
``mediapipe.solutions.face_mesh_connections``:

========  =====================================================  ==================================================
channel   contours                                               why together
========  =====================================================  ==================================================
0         FACE_OVAL, NOSE                                        head outline and the nose: where the face is/turns
1         LEFT/RIGHT_EYEBROW, LEFT/RIGHT_EYE, LEFT/RIGHT_IRIS    eyes and brows: blinks, gaze, brow raises
2         LIPS (outer and inner loops)                           the mouth, which moves most in speech
========  =====================================================  ==================================================

(``engine.config.LABEL_CHANNELS`` = 3 fixes the count.) Each contour's edge set is chained once into as few
polylines as possible, closed where the contour is a loop. They are drawn (``cv2.polylines``, ``LINE_AA``, 1/16 px
fixed point) at 4x the resolution over the face's bounding box and area-averaged down: that anti-aliases the
strokes and makes their width accurate to a quarter pixel (OpenCV alone only draws odd widths: asked for 2 px it
draws 3.4). The stroke width is ``size / 256 * 2`` pixels, at least 1, so labels at different sizes look alike.
The same code draws labels for mediapipe's landmarks and for engine/synthetic.py's, which share the topology.
Values are in [0, 1]; overlapping strokes in one channel take the maximum.

Landmarks are pixels of the target image in continuous coordinates (pixel i spans [i, i+1), as ``engine.faces``
produces them); OpenCV puts pixel centres on integers, hence the half-pixel shift when drawing.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable

import cv2
import numpy as np

from engine.config import LABEL_CHANNELS

#: Contours of each channel, by their names in mediapipe.solutions.face_mesh_connections.
CHANNEL_CONTOURS: tuple[tuple[str, ...], ...] = (
    ("FACEMESH_FACE_OVAL", "FACEMESH_NOSE"),
    (
        "FACEMESH_LEFT_EYEBROW", "FACEMESH_RIGHT_EYEBROW", "FACEMESH_LEFT_EYE", "FACEMESH_RIGHT_EYE",
        "FACEMESH_LEFT_IRIS", "FACEMESH_RIGHT_IRIS",
    ),
    ("FACEMESH_LIPS",),
)
#: Preview colours (RGB) of the channels in ``label_to_rgb``.
PREVIEW_COLOURS = np.array([[255, 255, 255], [80, 200, 255], [255, 90, 90]], dtype=np.float32)

_SHIFT = 4  # sub-pixel bits for cv2 drawing: coordinates in 1/16 of a (supersampled) pixel
_SUPERSAMPLE = 4  # strokes are drawn at 4x and area-averaged: widths to 1/4 px, 16 levels of anti-aliasing
_N_LANDMARKS = 478

if len(CHANNEL_CONTOURS) != LABEL_CHANNELS or len(PREVIEW_COLOURS) != LABEL_CHANNELS:
    raise ImportError("engine/labels.py draws a different number of channels than engine.config.LABEL_CHANNELS")


def chain_edges(edges: Iterable[tuple[int, int]]) -> list[tuple[np.ndarray, bool]]:
    """Decompose an undirected edge set into polylines ``(indices, closed)`` that together use every edge once.

    Walks start at vertices of odd degree (the ends of open chains and the branch points of the nose), so an open
    chain becomes one polyline; what remains afterwards are cycles, each drawn as one closed polyline.
    """
    adjacency: dict[int, list[int]] = defaultdict(list)
    for a, b in sorted(edges):  # sorted: the same polylines on every run, whatever the set's order
        adjacency[a].append(b)
        adjacency[b].append(a)
    used: set[frozenset[int]] = set()

    def walk(start: int) -> list[int]:
        path = [start]
        while True:
            nxt = next((v for v in adjacency[path[-1]] if frozenset((path[-1], v)) not in used), None)
            if nxt is None:
                return path
            used.add(frozenset((path[-1], nxt)))
            path.append(nxt)

    polylines: list[tuple[np.ndarray, bool]] = []
    odd = [v for v in sorted(adjacency) if len(adjacency[v]) % 2 == 1]
    for start in odd + sorted(adjacency):
        while any(frozenset((start, v)) not in used for v in adjacency[start]):
            path = walk(start)
            closed = len(path) > 2 and path[0] == path[-1]
            polylines.append((np.array(path[:-1] if closed else path, dtype=np.int64), closed))
    return polylines


@functools.cache
def _contour_indices() -> np.ndarray:
    """Every landmark index that some contour uses."""
    return np.unique(np.concatenate([idx for lines in channel_polylines() for idx, _ in lines]))


@functools.cache
def channel_polylines() -> tuple[tuple[tuple[np.ndarray, bool], ...], ...]:
    """The polylines of each channel (indices into the 478 landmarks), built once from mediapipe's contours."""
    # Imported here: mediapipe is slow to import and nothing should load at engine import time.
    from mediapipe.python.solutions import face_mesh_connections as connections

    return tuple(
        tuple(line for name in names for line in chain_edges(getattr(connections, name)))
        for names in CHANNEL_CONTOURS
    )


def stroke_width(size: int) -> float:
    """Line width in pixels for a ``size x size`` label: 2 px at 256, at least 1."""
    return max(1.0, size / 256 * 2)


def draw_label(landmarks: np.ndarray, size: int, thickness: float | None = None) -> np.ndarray:
    """One label image (LABEL_CHANNELS, size, size) float32 in [0, 1] from (478, 2 or 3) landmarks in pixels.

    ``thickness`` (pixels, default ``stroke_width(size)``) is honoured to about 0.25 px: OpenCV's thick lines
    only come in odd widths, so the strokes are drawn at ``_SUPERSAMPLE`` times the resolution over the face's
    bounding box and area-averaged back down, which also gives the anti-aliasing.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != _N_LANDMARKS or lm.shape[1] < 2:
        raise ValueError(f"expected ({_N_LANDMARKS}, 2 or 3) landmarks, got {lm.shape}")
    width = stroke_width(size) if thickness is None else max(1.0, float(thickness))
    out = np.zeros((LABEL_CHANNELS, size, size), dtype=np.float32)
    # The region that can receive ink: the contours' bounding box plus the stroke, clipped to the canvas.
    xy = lm[_contour_indices(), :2]  # (n, 2)
    margin = width / 2 + 1.0
    x0, y0 = (max(0, math.floor(v - margin)) for v in xy.min(axis=0))
    x1, y1 = (min(size, math.ceil(v + margin)) for v in xy.max(axis=0))
    if x1 <= x0 or y1 <= y0:
        return out
    S = _SUPERSAMPLE
    # Continuous image coordinates -> the supersampled region's, OpenCV pixel centres on integers, then fixed
    # point with _SHIFT fractional bits. Clipped well outside the region so int32 cannot overflow.
    region = (lm[:, :2] - (x0, y0)) * S - 0.5
    region = np.clip(region, -4 * S * size, 5 * S * size)
    fixed = np.round(region * (1 << _SHIFT)).astype(np.int32)  # (478, 2)
    # OpenCV's LINE_AA stroke of even thickness t is t + 1 pixels of full ink plus about 0.44 px of fringe (odd t
    # draws the same as t - 1): pick the even t nearest the wanted width in supersampled pixels.
    t = max(1, 2 * round((width * S - 1.44) / 2))
    canvas = np.zeros(((y1 - y0) * S, (x1 - x0) * S), dtype=np.uint8)
    for channel, lines in enumerate(channel_polylines()):
        canvas[:] = 0
        for closed in (False, True):
            pts = [fixed[idx].reshape(-1, 1, 2) for idx, c in lines if c == closed]
            if pts:
                cv2.polylines(canvas, pts, closed, (255,), thickness=t, lineType=cv2.LINE_AA, shift=_SHIFT)
        # Area averaging over S x S blocks: exact box-filter anti-aliasing of the supersampled strokes.
        small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        out[channel, y0:y1, x0:x1] = small.astype(np.float32) / 255.0
    return out


def draw_labels(batch: np.ndarray, size: int, thickness: float | None = None) -> np.ndarray:
    """Labels of T faces: (T, 478, >=2) landmarks -> (T, LABEL_CHANNELS, size, size) float32."""
    batch = np.asarray(batch)
    if batch.ndim != 3:
        raise ValueError(f"expected (T, {_N_LANDMARKS}, 2 or 3) landmarks, got {batch.shape}")
    out = np.empty((len(batch), LABEL_CHANNELS, size, size), dtype=np.float32)
    for i, lm in enumerate(batch):
        out[i] = draw_label(lm, size, thickness)
    return out


def label_to_rgb(label: np.ndarray) -> np.ndarray:
    """A (C, H, W) label as an (H, W, 3) uint8 preview: each channel in its PREVIEW_COLOURS, brightest wins."""
    label = np.asarray(label, dtype=np.float32)
    if label.ndim != 3 or label.shape[0] != LABEL_CHANNELS:
        raise ValueError(f"expected a ({LABEL_CHANNELS}, H, W) label, got {label.shape}")
    # (C, H, W, 1) * (C, 1, 1, 3) -> max over C -> (H, W, 3)
    rgb = (np.clip(label, 0.0, 1.0)[..., None] * PREVIEW_COLOURS[:, None, None, :]).max(axis=0)
    return np.round(rgb).astype(np.uint8)
