"""Procedural talking heads: frames, exact landmarks and the true head pose, with nothing from outside.

Training data, the demo's reference and driving videos and many tests come from here (DESIGN.md section 3). An
``Identity`` (drawn by ``random_identity(seed)``) fixes face shape, skin, hair, eyes, clothes, background, light
and framing; ``render`` draws it in a ``Pose`` with an ``Expression``; ``motion`` and ``sequence`` make smooth
talking-head clips; ``write_video`` encodes a clip as H.264 mp4 through engine/video.py.

The head is a 3D model, not a 2D puppet:

- **Face**: a frontal 478-point face in mediapipe's face-mesh topology, measured once with mediapipe on
  scikit-image's astronaut (``bench/make_face_template.py`` -> ``assets/face_template.npz``: 468 mesh points, 10 iris
  points, 852 triangles with holes at the eyes and the inner lips). Each identity deforms it (face and jaw width,
  face length, chin, nose size and width, eye size and spacing, mouth width, brow height). Per frame the jaw rotates
  about a hinge in front of the ears (plus the small forward glide of the condyle) to open the mouth, and the upper
  eyelids slide down to the lower ones to blink. The landmarks ARE these vertices projected, so they are exact.
- Behind the face: a skull (an ellipsoid pushed behind the face where they overlap) with hair as a raised,
  textured cap, a skirt under the jaw, ears, a neck that bends with part of the head rotation, shoulders in
  clothes, long hair hanging behind the back for some identities, eyeballs (sclera, iris, pupil) and a mouth
  cavity (teeth, tongue) seen through the holes of the face mesh.
- **Pose**: ``engine.geometry.rotation_matrix(pose)`` turns the head about a pivot in the upper neck, so the sign
  convention is exactly the one engine/faces.py estimates. The pose is the head's rotation in the camera frame.
- **Camera**: a pinhole with focal length ``FOCAL * size`` pixels looking at the face centroid; the identity's
  ``offset`` shifts the principal point off the image centre (a crop, not a move of the head, so the head stays on
  the optical axis and its apparent pose is its true pose: compare with ``engine.faces.head_pose`` without
  ``focal``). The face (forehead to chin) spans about ``FACE_FRACTION`` of the frame height at frontal pose (times
  a per-identity ``scale`` in 0.92..1.08).
- **Rendering**: painter's algorithm in layers (hair hanging at the back, neck, torso, head, face), triangles
  back-face culled and sorted far-to-near within a layer, each drawn with ``cv2.fillConvexPoly`` into a triangle-id
  buffer; the eye and mouth holes of the face show a second buffer (eyeballs and mouth cavity) drawn the same
  way. Then every covered pixel interpolates its triangle's texture coordinates and normal (barycentric, in screen
  space), samples the identity's texture atlas (procedural noise, gradients, stripes, checks, strands) and is
  shaded Lambert + ambient + a Blinn-Phong highlight under the identity's directional light. Rendering at
  ``SUPERSAMPLE`` times the size and area-averaging down anti-aliases the edges.

Landmarks follow mediapipe: (478, 3) float32 pixels, x right, y down, z the depth relative to the face's centroid
scaled like x (f / Z of that centroid), smaller = nearer the camera; 468..472 are the right iris (the person's
right, on the image's left: centre, then 4 boundary points), 473..477 the left iris. ``Expression.blink_left`` is
the person's left eye (mediapipe's LEFT_EYE, landmarks 263..., the image's right).

Speed (bench/synthetic.py, one thread of this shared 2-core machine; docs/benchmarks.md, section "synthetic"):
about 100 frames/s at 128x128 and 28 at 256x256 with 2x supersampling (about 90 at 256x256 without); a new
identity costs 60-120 ms once (geometry, texture atlas), cached after (``functools.lru_cache`` on the frozen
``Identity``).

mediapipe's FaceMesh sees these heads: on 256x256 renders of 24 identities in random poses within the motion
ranges it found a face in 96 of 96, with its landmarks a median 1.6-1.9 px from the true ones (bench/synthetic.py;
``test_mediapipe_detects_renders``, slow, checks at least 3 in 4). engine.faces.head_pose reads the true pose
from the rendered landmarks within 1.5 degrees (``test_faces_head_pose_reads_the_true_pose`` allows 5).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engine.geometry import Pose, rotation_matrix

N_LANDMARKS = 478
#: Focal length in units of the image size (a moderate telephoto, ~28 degrees field of view: mild perspective).
FOCAL = 2.0
#: Face height (landmark 10 to 152) over the frame height at frontal pose, before the identity's ``scale``.
FACE_FRACTION = 0.5
#: Render at this multiple of the output size, then area-average down (anti-aliasing).
SUPERSAMPLE = 2

_ASSET = Path(__file__).resolve().parent / "assets" / "face_template.npz"

# Mediapipe face-mesh topology (mediapipe.solutions.face_mesh_connections), hard-coded so the runtime does not
# import mediapipe. "Right" is the person's right (the image's left).
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
RIGHT_BROW = ((70, 63, 105, 66, 107), (46, 53, 52, 65, 55))
LEFT_BROW = ((300, 293, 334, 296, 336), (276, 283, 282, 295, 285))
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
#: The face oval below the ears (93 ... chin ... 323): the jaw line the under-jaw skirt hangs from.
JAW_LINE = (93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323)
RIGHT_IRIS = (468, 469, 470, 471, 472)
LEFT_IRIS = (473, 474, 475, 476, 477)

# Texture atlas: one RGBA-like float image per identity; channels are albedo RGB, specular strength, part label.
_AT = 512
_REGIONS: dict[str, tuple[int, int, int, int]] = {  # name -> (x0, y0, width, height) in atlas texels
    "face": (0, 0, 256, 256),
    "head": (256, 0, 256, 256),
    "cloth": (0, 256, 256, 256),
    "eye": (256, 256, 128, 128),
    "mouth": (384, 256, 128, 128),
    "skin": (256, 384, 64, 128),
    "neck": (320, 384, 64, 128),
    "hair": (384, 384, 128, 128),
}
#: Part labels of ``Frame.parts``.
PARTS = {"background": 0, "face": 1, "hair": 2, "eye": 3, "mouth": 4, "skin": 5, "clothes": 6}
# Face texture window in template units (x right, y down; face height 1).
_FACE_UV_X = (-0.5, 0.5)
_FACE_UV_Y = (-0.55, 0.55)

# Painter's layers, drawn in this order into the main buffer; _INNER goes to the buffer seen through the holes.
_L_HAIR_BACK, _L_NECK, _L_TORSO, _L_HEAD, _L_FACE, _INNER = 0, 1, 2, 3, 4, 5

# Jaw (mouth opening): rotation about a hinge in front of the ears plus a forward glide, at mouth_open = 1.
_JAW_HINGE = np.array([0.0, -0.06, 0.40])
_JAW_MAX_RAD = 0.30
_JAW_GLIDE = np.array([0.0, 0.02, -0.18])  # per radian: the condyle slides forward as the jaw opens
_PIVOT = np.array([0.0, 0.25, 0.45])  # head rotation centre (upper neck), template units


# ------------------------------------------------------------------------------------------------------- API types


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person look like themselves. Multipliers are around 1, offsets are in
    face heights; colours are RGB in [0, 1]. Frozen and hashable: renders cache their geometry and textures by it."""

    seed: int
    face_width: float = 1.0
    face_length: float = 1.0
    jaw_width: float = 1.0
    chin: float = 0.0
    nose_size: float = 1.0
    nose_width: float = 1.0
    eye_size: float = 1.0
    eye_spacing: float = 0.0
    mouth_width: float = 1.0
    brow_height: float = 0.0
    head_size: float = 1.0
    neck_width: float = 1.0
    shoulder_width: float = 1.0
    skin: tuple[float, float, float] = (0.85, 0.66, 0.55)
    lip: tuple[float, float, float] = (0.72, 0.38, 0.38)
    hair: tuple[float, float, float] = (0.2, 0.13, 0.08)
    eye: tuple[float, float, float] = (0.35, 0.22, 0.1)
    clothes: tuple[float, float, float] = (0.2, 0.3, 0.6)
    clothes2: tuple[float, float, float] = (0.9, 0.9, 0.9)
    hair_style: int = 1  # 0 shaved, 1 short, 2 medium, 3 long (hangs behind the back)
    hairline: float = 0.0  # how far the front hairline has receded, face heights
    hair_volume: float = 0.03
    lid: float = 0.15  # resting droop of the upper lids (0 = as wide open as the template)
    beard: float = 0.0  # 0 none .. 1 full stubble
    clothes_pattern: int = 0  # 0 plain, 1 horizontal stripes, 2 vertical stripes, 3 checks, 4 dots, 5 open jacket
    neckline: int = 0  # 0 crew, 1 V
    background: int = 0  # 0 gradient, 1 room, 2 wallpaper, 3 bokeh
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)  # face centre offset, fractions of the frame
    light: tuple[float, float, float] = (0.3, -0.4, -0.87)  # direction towards the light, camera frame
    ambient: float = 0.4
    light_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Expression:
    """mouth_open 0 (lips touch) .. 1 (wide open); blink 0 (open) .. 1 (closed), left = the person's left eye."""

    mouth_open: float = 0.0
    blink_left: float = 0.0
    blink_right: float = 0.0


@dataclass
class Frame:
    image: np.ndarray  # (S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (478, 3) float32 pixels (see the module docstring)
    pose: Pose
    parts: np.ndarray | None = None  # (S, S) uint8 part labels (PARTS), sampled at pixel centres


@dataclass
class Clip:
    images: np.ndarray  # (T, S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (T, 478, 3) float32 pixels
    poses: np.ndarray  # (T, 3) float32 pitch, yaw, roll in degrees
    fps: float
    expressions: list[Expression] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- identities


def _rgb(rng: np.random.Generator, base: Sequence[float] | np.ndarray, jitter: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(base) * (1.0 + rng.uniform(-jitter, jitter, 3)), 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


_SKIN_TONES = ((0.96, 0.80, 0.69), (0.90, 0.70, 0.58), (0.80, 0.60, 0.46), (0.66, 0.46, 0.33), (0.48, 0.32, 0.22),
               (0.33, 0.22, 0.15))
_HAIR_COLOURS = ((0.06, 0.05, 0.05), (0.18, 0.11, 0.06), (0.35, 0.22, 0.12), (0.72, 0.58, 0.36),
                 (0.50, 0.22, 0.10), (0.62, 0.62, 0.62), (0.20, 0.25, 0.55), (0.70, 0.30, 0.50))
_EYE_COLOURS = ((0.30, 0.17, 0.07), (0.42, 0.30, 0.15), (0.30, 0.42, 0.25), (0.30, 0.45, 0.65), (0.45, 0.50, 0.55))


def random_identity(seed: int) -> Identity:
    """A random identity, deterministic in ``seed``."""
    rng = np.random.default_rng([int(seed), 0x1D])
    u = rng.uniform
    tone = np.asarray(_SKIN_TONES[rng.integers(len(_SKIN_TONES))])
    skin = _rgb(rng, tone, 0.06)
    hair_i = int(rng.choice(len(_HAIR_COLOURS), p=[0.26, 0.24, 0.16, 0.12, 0.07, 0.09, 0.03, 0.03]))
    hair = _rgb(rng, _HAIR_COLOURS[hair_i], 0.12)
    lip = _rgb(rng, np.asarray(skin) * np.array([0.85, 0.55, 0.58]) + np.array([0.08, 0.0, 0.02]), 0.08)
    style = int(rng.choice(4, p=[0.1, 0.35, 0.25, 0.3]))
    light = np.array([u(-0.75, 0.75), u(-0.7, 0.05), -1.0])
    light /= np.linalg.norm(light)
    return Identity(
        seed=int(seed),
        face_width=u(0.9, 1.1),
        face_length=u(0.93, 1.07),
        jaw_width=u(0.85, 1.15),
        chin=u(-0.03, 0.03),
        nose_size=u(0.8, 1.25),
        nose_width=u(0.85, 1.25),
        eye_size=u(0.85, 1.15),
        eye_spacing=u(-0.015, 0.015),
        mouth_width=u(0.88, 1.12),
        brow_height=u(-0.02, 0.02),
        head_size=u(0.96, 1.05),
        neck_width=u(0.85, 1.15),
        shoulder_width=u(0.85, 1.1),
        skin=skin,
        lip=lip,
        hair=hair,
        eye=_rgb(rng, _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))], 0.15),
        clothes=(float(u(0.05, 0.95)), float(u(0.05, 0.95)), float(u(0.05, 0.95))),
        clothes2=(float(u(0.05, 0.95)), float(u(0.05, 0.95)), float(u(0.05, 0.95))),
        hair_style=style,
        hairline=u(0.0, 0.1) if rng.uniform() < 0.3 else 0.0,
        hair_volume=u(0.015, 0.06),
        lid=u(0.05, 0.3),
        beard=u(0.3, 1.0) if rng.uniform() < 0.25 else 0.0,
        clothes_pattern=int(rng.integers(6)),
        neckline=int(rng.integers(2)),
        background=int(rng.integers(4)),
        scale=u(0.92, 1.08),
        offset=(float(u(-0.04, 0.04)), float(u(-0.03, 0.04))),
        light=(float(light[0]), float(light[1]), float(light[2])),
        ambient=u(0.3, 0.5),
        light_rgb=_rgb(rng, (1.0, 0.97, 0.93), 0.05),
    )


# ------------------------------------------------------------------------------------------------ face template


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class _Blink:
    """One eye's blink. Each moved vertex p goes ``P[p] + blink * weight * (C - P[src])`` where the closing point
    ``C = 0.25 * P[upper] + 0.75 * P[lower]`` lies a quarter of the way up from the lower lid (real lids meet low)
    and ``src`` is the contour point whose move it copies (itself for contour points, weight 1)."""

    moved: np.ndarray  # (k,) vertex indices: both lid contours and the rings of lid skin around them
    src: np.ndarray  # (k,)
    upper: np.ndarray  # (k,) upper-lid contour point of the column
    lower: np.ndarray  # (k,) lower-lid contour point of the column
    weight: np.ndarray  # (k,)


@dataclass(frozen=True)
class _Template:
    V: np.ndarray  # (478, 3) frontal face, face height 1, centroid of the 468 mesh points at 0
    tris: np.ndarray  # (852, 3) int, (b - a) x (c - a) points to the camera (-z)
    uv: np.ndarray  # (478, 2) atlas texels of the face region
    jaw_w: np.ndarray  # (478,) how much each vertex follows the jaw
    blinks: tuple[_Blink, _Blink]  # right eye, left eye
    eye_loops: tuple[np.ndarray, np.ndarray]  # closed contour loops (16,) of the right and left eye
    mouth_loop: np.ndarray  # (20,) inner-lip loop


def _loop(upper: Sequence[int], lower: Sequence[int]) -> np.ndarray:
    return np.array(list(upper) + list(lower[-2:0:-1]), dtype=np.int64)


def _adjacency(tris: np.ndarray, n: int) -> list[set[int]]:
    adj: list[set[int]] = [set() for _ in range(n)]
    for a, b, c in tris.tolist():
        adj[a] |= {b, c}
        adj[b] |= {a, c}
        adj[c] |= {a, b}
    return adj


def _blink_rig(V: np.ndarray, adj: list[set[int]], upper: Sequence[int], lower: Sequence[int]) -> _Blink:
    """The lid contours close onto each other (corners stay); two rings of lid skin above follow the upper lid
    with weights 0.55 and 0.2, one ring below follows the lower lid with 0.3, so the closed lid is smooth."""
    up, lo = list(upper[1:-1]), list(lower[1:-1])
    contour = set(upper) | set(lower)
    eye_y = float(V[list(contour), 1].mean())
    rows: list[tuple[int, int, int, int, float]] = []  # (moved, src, upper, lower, weight)
    for u_i, l_i in zip(up, lo, strict=True):
        rows += [(u_i, u_i, u_i, l_i, 1.0), (l_i, l_i, u_i, l_i, 1.0)]

    def ring(seeds: list[int], above: bool, taken: set[int]) -> list[int]:
        out = {n for s in seeds for n in adj[s]} - contour - taken
        return sorted(n for n in out if (V[n, 1] < eye_y) == above)

    def follow(points: list[int], from_upper: bool, w: float) -> None:
        for p in points:
            k = int(np.argmin(np.abs(V[up, 0] - V[p, 0])))  # the lid column nearest in x
            rows.append((p, up[k] if from_upper else lo[k], up[k], lo[k], w))

    r1 = ring(up, True, set())
    r2 = ring(r1, True, set(r1))
    r_low = ring(lo, False, set(r1) | set(r2))
    follow(r1, True, 0.55)
    follow(r2, True, 0.2)
    follow(r_low, False, 0.3)
    a = np.array(rows, dtype=np.float64)
    return _Blink(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
                  a[:, 3].astype(np.int64), a[:, 4])


def _jaw_weights(V: np.ndarray) -> np.ndarray:
    """(478,) weight of the jaw transform per vertex.

    Below the mouth slit (extended from the corners towards the jaw angle) the mandible moves rigidly; the band
    over which the weight rises is narrow between the lips (they part cleanly) and wide on the cheeks (they
    stretch). The lower inner lip follows fully except at the corners, the upper inner lip stays.
    """
    xc = abs(float(V[78, 0]))
    mid_x = V[list(LIPS_INNER_UPPER), 0]
    mid_y = V[list(LIPS_INNER_UPPER), 1]
    order = np.argsort(mid_x)
    ax = np.abs(V[:, 0])
    y_corner = float(V[78, 1])
    slope = (0.05 - y_corner) / (0.42 - xc)  # from the mouth corner to below the ear
    y_slit = np.where(ax <= xc, np.interp(V[:, 0], mid_x[order], mid_y[order]), y_corner + (ax - xc) * slope)
    band = 0.012 + 0.15 * _smoothstep(0.6 * xc, 1.6 * xc, ax)
    w = _smoothstep(0.0, 1.0, (V[:, 1] - y_slit) / band)
    lower = list(LIPS_INNER_LOWER[1:-1])
    w[lower] = 1.0 - (ax[lower] / xc) ** 4
    w[list(LIPS_INNER_UPPER)] = 0.0
    w[468:] = 0.0
    return w


def _face_uv(xy: np.ndarray) -> np.ndarray:
    x0, y0, w, h = _REGIONS["face"]
    u = x0 + (xy[..., 0] - _FACE_UV_X[0]) / (_FACE_UV_X[1] - _FACE_UV_X[0]) * w
    v = y0 + (xy[..., 1] - _FACE_UV_Y[0]) / (_FACE_UV_Y[1] - _FACE_UV_Y[0]) * h
    return np.stack([u, v], axis=-1)


@functools.cache
def _template() -> _Template:
    with np.load(_ASSET) as z:
        V = z["vertices"].astype(np.float64)
        tris = z["triangles"].astype(np.int64)
    adj = _adjacency(tris, 468)
    blinks = (_blink_rig(V, adj, RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), _blink_rig(V, adj, LEFT_EYE_UPPER, LEFT_EYE_LOWER))
    return _Template(
        V=V,
        tris=tris,
        uv=_face_uv(V[:, :2]),
        jaw_w=_jaw_weights(V),
        blinks=blinks,
        eye_loops=(_loop(RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), _loop(LEFT_EYE_UPPER, LEFT_EYE_LOWER)),
        mouth_loop=_loop(LIPS_INNER_UPPER, LIPS_INNER_LOWER),
    )


# ---------------------------------------------------------------------------------------------- identity shape


def _shape_face(ident: Identity, T: _Template) -> np.ndarray:
    """(478, 3) the template deformed into this identity's face (rest expression)."""
    V = T.V.copy()
    x, y = V[:, 0], V[:, 1]
    # Nose: protrusion (z in front of the cheek plane) and width, weighted along the nose's mid-line.
    w_n = np.exp(-((x / 0.09) ** 2)) * _smoothstep(-0.26, -0.12, y) * (1.0 - _smoothstep(0.07, 0.12, y))
    V[:, 2] += w_n * (ident.nose_size - 1.0) * np.minimum(V[:, 2], 0.0)
    V[:, 0] *= 1.0 + w_n * (ident.nose_width - 1.0)
    # Eyes: scale each eye region about its centre; spacing shifts it sideways.
    for loop, iris, side in ((T.eye_loops[0], RIGHT_IRIS, -1.0), (T.eye_loops[1], LEFT_IRIS, 1.0)):
        c = T.V[loop, :2].mean(axis=0)
        d = np.linalg.norm(T.V[:, :2] - c, axis=1)
        w_e = np.exp(-((d / 0.1) ** 2))
        w_e[list(iris)] = 1.0
        w_e[list({*LEFT_IRIS, *RIGHT_IRIS} - set(iris))] = 0.0
        V[:, :2] = V[:, :2] + (w_e * (ident.eye_size - 1.0))[:, None] * (T.V[:, :2] - c)
        V[:, 0] += side * ident.eye_spacing * w_e
    # Mouth width, brow height.
    w_m = np.exp(-(((y - 0.2) / 0.09) ** 2)) * np.exp(-((x / 0.3) ** 2))
    V[:, 0] *= 1.0 + w_m * (ident.mouth_width - 1.0)
    w_b = np.exp(-(((y + 0.3) / 0.06) ** 2)) * _smoothstep(0.04, 0.1, np.abs(x)) * (1 - _smoothstep(0.38, 0.45, abs(x)))
    w_b[468:] = 0.0
    V[:, 1] += w_b * ident.brow_height
    # Lower face: jaw width, length below the eyes, chin forward/back.
    V[:, 0] *= 1.0 + (ident.jaw_width - 1.0) * _smoothstep(0.0, 0.45, y)
    V[:, 1] += (ident.face_length - 1.0) * np.maximum(y + 0.17, 0.0)
    V[:, 2] += ident.chin * np.exp(-(((y - 0.48) / 0.1) ** 2) - (x / 0.15) ** 2)
    V[:, 0] *= ident.face_width
    return V


def _orient(V: np.ndarray, tris: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Flip triangles whose normal (b - a) x (c - a) points against ``outward`` (per-triangle direction)."""
    n = np.cross(V[tris[:, 1]] - V[tris[:, 0]], V[tris[:, 2]] - V[tris[:, 0]])
    flip = np.einsum("ij,ij->i", n, outward) < 0
    out = tris.copy()
    out[flip] = out[flip][:, ::-1]
    return out


def _grid_tris(rows: int, cols: int) -> np.ndarray:
    """Two triangles per quad of a (rows, cols) vertex grid, row-major."""
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = (r * cols + c).ravel()
    b, d, e = a + cols, a + cols + 1, a + 1
    return np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, e], 1)])


def _vertex_normals(V: np.ndarray, tris: np.ndarray) -> np.ndarray:
    n = np.cross(V[tris[:, 1]] - V[tris[:, 0]], V[tris[:, 2]] - V[tris[:, 0]])
    vn = np.zeros_like(V)
    for k in range(3):
        np.add.at(vn, tris[:, k], n)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _region_uv(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Atlas texels of region ``name`` for u, v in [0, 1] (kept half a texel inside so nearest never bleeds)."""
    x0, y0, w, h = _REGIONS[name]
    return np.stack([x0 + 0.5 + np.clip(u, 0, 1) * (w - 1), y0 + 0.5 + np.clip(v, 0, 1) * (h - 1)], axis=-1)


@dataclass
class _Part:
    V: np.ndarray  # (n, 3) rest positions, template units
    uv: np.ndarray  # (n, 2) atlas texels
    N: np.ndarray  # (n, 3) rest normals
    tris: np.ndarray  # (m, 3) local indices (already oriented)
    layer: int
    two_sided: np.ndarray | bool = False  # per triangle: drawn from both sides (surfaces folded behind the face)


def _skull(ident: Identity, face: np.ndarray, hair_theta: np.ndarray) -> _Part:
    """Ellipsoid cranium with a raised hair cap, pushed behind the face wherever the face covers it."""
    n_lat, n_lon = 15, 25
    theta = np.linspace(0.0, math.pi, n_lat)[:, None] * np.ones((1, n_lon))  # (lat, lon) polar angle from the top
    phi = np.linspace(-math.pi, math.pi, n_lon)[None, :] * np.ones((n_lat, 1))  # azimuth, 0 = front
    hs = ident.head_size
    # In face heights: the crown ~0.28 above the forehead top (10), the back of the head ~1.0 behind the brows, as
    # wide as the face at the ears (234, 454 lie on it), the front meeting the forehead top's depth.
    c = np.array([0.0, -0.2, 0.38])
    ax = np.array([0.45 * ident.face_width, 0.56, 0.545]) * hs
    unit = np.stack([np.sin(theta) * np.sin(phi), -np.cos(theta), -np.sin(theta) * np.cos(phi)], -1)
    P = c + unit * ax  # (lat, lon, 3)
    normal = unit / ax
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    # Hair volume: a cap above the hairline (hair_theta: the hairline's polar angle per azimuth column).
    h = 1.0 - _smoothstep(-0.35, 0.0, theta - hair_theta[None, :])
    if ident.hair_style > 0:
        P = P + normal * (ident.hair_volume * h)[..., None]
    P = P.reshape(-1, 3)
    normal = normal.reshape(-1, 3)
    # Behind the face: inside the face oval (frontal projection), stay at least 0.03 behind the nearest face point.
    oval = face[list(FACE_OVAL), :2].astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(oval, (float(p[0]), float(p[1])), False) >= 0 for p in P])
    near = np.argmin(((P[:, None, :2] - face[None, :468, :2]) ** 2).sum(-1), axis=1)
    pushed = inside & (P[:, 2] < face[near, 2] + 0.03)
    P[:, 2] = np.where(pushed, face[near, 2] + 0.03, P[:, 2])
    tris = _grid_tris(n_lat, n_lon)
    cen = P[tris].mean(1)
    tris = _orient(P, tris, cen - c)
    uv = _region_uv("head", (phi.ravel() + math.pi) / (2 * math.pi), theta.ravel() / math.pi)
    # Pushed-back triangles may face away from the camera yet fill the seam around the face: draw both sides.
    return _Part(P, uv, normal, tris, _L_HEAD, two_sided=pushed[tris].any(1))


def _hairline_y(ident: Identity, phi: np.ndarray) -> np.ndarray:
    """Height (template y) of the hairline per azimuth (0 front, +-pi back): over the forehead, above the ears,
    down to the nape at the back (lower for longer styles)."""
    front = -0.46 - ident.hairline  # the face mesh ends at the forehead top (10, y = -0.48)
    nape = {0: 0.1, 1: 0.18, 2: 0.3, 3: 0.32}[ident.hair_style]
    ap = np.abs(phi)
    # Knots: forehead, temples (a little lower), above the ear, behind the ear, then down to the nape.
    return np.interp(ap, [0.0, 0.55, 1.15, 1.45, 1.75, 2.2, math.pi],
                     [front, front + 0.04, -0.3, -0.22, -0.22, nape, nape + 0.02])


def _hair_theta(ident: Identity, phi: np.ndarray) -> np.ndarray:
    y = _hairline_y(ident, phi)
    c_y, r_y = -0.2, 0.56 * ident.head_size
    return np.arccos(np.clip((c_y - y) / r_y, -1.0, 1.0))


def _ellipsoid(centre: np.ndarray, axes: np.ndarray, n_lat: int, n_lon: int, region: str, layer: int) -> _Part:
    theta = np.linspace(0.0, math.pi, n_lat)[:, None] * np.ones((1, n_lon))
    phi = np.linspace(-math.pi, math.pi, n_lon)[None, :] * np.ones((n_lat, 1))
    unit = np.stack([np.sin(theta) * np.sin(phi), -np.cos(theta), -np.sin(theta) * np.cos(phi)], -1).reshape(-1, 3)
    P = centre + unit * axes
    normal = unit / axes
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    tris = _grid_tris(n_lat, n_lon)
    tris = _orient(P, tris, P[tris].mean(1) - centre)
    uv = _region_uv(region, (phi.ravel() + math.pi) / (2 * math.pi), theta.ravel() / math.pi)
    return _Part(P, uv, normal, tris, layer)


def _loft(rings: Sequence[tuple[float, float, float, float]], phi: np.ndarray, region: str, layer: int,
          inward: bool = False, power: float = 2.0) -> _Part:
    """A surface through horizontal super-ellipse rings (y, half-width, half-depth, z centre)."""
    rows = []
    for y, rx, rz, zc in rings:
        s, cph = np.sin(phi), np.cos(phi)
        # Super-ellipse |x/rx|^p + |z/rz|^p = 1 (p > 2 is boxier: shoulders).
        x = rx * np.sign(s) * np.abs(s) ** (2.0 / power)
        z = zc - rz * np.sign(cph) * np.abs(cph) ** (2.0 / power)
        rows.append(np.stack([x, np.full_like(x, y), z], -1))
    P = np.concatenate(rows)
    tris = _grid_tris(len(rings), len(phi))
    axis = np.stack([np.zeros(len(P)), P[:, 1], np.array([r[3] for r in rings]).repeat(len(phi))], -1)
    out = P[tris].mean(1) - axis[tris].mean(1)
    tris = _orient(P, tris, -out if inward else out)
    normal = _vertex_normals(P, tris)
    uu = np.tile((phi - phi.min()) / (phi.max() - phi.min()), len(rings))
    vv = np.repeat(np.linspace(0.0, 1.0, len(rings)), len(phi))
    return _Part(P, _region_uv(region, uu, vv), normal, tris, layer)


@dataclass(frozen=True)
class _Eye:
    centre: np.ndarray  # eyeball ellipsoid centre
    axes: np.ndarray
    iris: np.ndarray  # (5, 3) iris centre and 4 boundary points on the eyeball (landmark order)


def _eye(face: np.ndarray, iris_idx: Sequence[int], size: float) -> tuple[_Eye, _Part]:
    """An eyeball behind the eye hole: an ellipsoid wide enough to fill the hole at every pose in range, whose
    front point is the iris centre; the iris landmarks are points of its surface."""
    ic = face[iris_idx[0]]
    r_iris = float(np.mean(np.linalg.norm(face[list(iris_idx[1:]), :2] - ic[:2], axis=1)))
    axes = np.array([0.11, 0.08, 0.065]) * size
    centre = ic + np.array([0.0, 0.0, axes[2]])
    part = _ellipsoid(centre, axes, 7, 11, "eye", _INNER)
    # Eye texture coordinates: the frontal offset from the iris centre in units of the eyeball half-width.
    R = axes[0]
    part.uv = _region_uv("eye", (part.V[:, 0] - ic[0]) / (2 * R) + 0.5, (part.V[:, 1] - ic[1]) / (2 * R) + 0.5)
    pts = [ic]
    for k in iris_idx[1:]:
        d = face[k, :2] - ic[:2]
        d = d / max(np.linalg.norm(d), 1e-9) * r_iris
        # On the ellipsoid surface at that frontal offset.
        q = 1.0 - (d[0] / axes[0]) ** 2 - (d[1] / axes[1]) ** 2
        pts.append(np.array([ic[0] + d[0], ic[1] + d[1], centre[2] - axes[2] * math.sqrt(max(q, 0.0))]))
    return _Eye(centre, axes, np.array(pts)), part


def _mouth_cavity(face: np.ndarray) -> tuple[_Part, np.ndarray]:
    """A curved sheet behind the lips: upper teeth on the fixed upper jaw, then a row that follows the jaw (the
    interior and tongue stretch between them as the mouth opens), lower teeth. Returns the part and the per-vertex
    jaw weight."""
    xc = abs(float(face[78, 0])) * 1.35
    ys = float(face[13, 1])
    zs = float(face[13, 2])
    cols = np.linspace(-1.0, 1.0, 9)
    # (v texture, rest y offset, jaw weight) per row; two rows at the slit (one fixed, one on the jaw).
    rows = [(0.0, -0.09, 0.0), (0.36, -0.035, 0.0), (0.5, 0.0, 0.0), (0.75, 0.0, 1.0), (0.86, 0.035, 1.0),
            (1.0, 0.09, 1.0)]
    P, uv, jw = [], [], []
    for v, dy, w in rows:
        x = cols * xc
        z = zs + 0.05 + 0.16 * cols**2 + 0.03 * abs(dy) / 0.09
        P.append(np.stack([x, np.full_like(x, ys + dy), z], -1))
        uv.append(_region_uv("mouth", (cols + 1) / 2, np.full_like(cols, v)))
        jw.append(np.full_like(cols, w))
    Pa = np.concatenate(P)
    tris = _grid_tris(len(rows), len(cols))
    tris = _orient(Pa, tris, np.tile([0.0, 0.0, -1.0], (len(tris), 1)))
    normal = np.tile([0.0, 0.0, -1.0], (len(Pa), 1))
    return _Part(Pa, np.concatenate(uv), normal, tris, _INNER), np.concatenate(jw)


# ------------------------------------------------------------------------------------------------ textures


def _noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], octaves: int = 4) -> np.ndarray:
    """Fractal value noise, about unit variance: random grids upsampled (bicubic) and summed over octaves."""
    out = np.zeros((h, w), np.float32)
    total = 0.0
    for o in range(octaves):
        gh, gw = max(2, cells[0] * 2**o), max(2, cells[1] * 2**o)
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        out += 0.55**o * cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
        total += 0.55**o
    return out / total


def _face_texture(ident: Identity, T: _Template, rng: np.random.Generator) -> np.ndarray:
    """(256, 256, 5) face albedo + specular + part in the frontal template's (x, y) (see _FACE_UV_*)."""
    _, _, W, H = _REGIONS["face"]
    skin = np.asarray(ident.skin, np.float32)
    tex = np.ones((H, W, 3), np.float32) * skin
    tex *= (1.0 + 0.05 * _noise(rng, H, W, (6, 6)) + 0.03 * _noise(rng, H, W, (48, 48), 2))[..., None]
    uv = T.uv  # texel coordinates of the landmarks (face region starts at 0, 0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)

    def blob(p: np.ndarray, sx: float, sy: float) -> np.ndarray:
        return np.exp(-(((xx - p[0]) / sx) ** 2) - ((yy - p[1]) / sy) ** 2)

    # Warmer cheeks and nose tip; slightly darker eye sockets.
    red = (blob(uv[205], 22, 18) + blob(uv[425], 22, 18)) * 0.5 + blob(uv[4], 10, 10) * 0.4
    tex *= (1.0 - red[..., None] * np.array([0.0, 0.12, 0.1], np.float32))
    sock = blob(uv[159], 16, 9) + blob(uv[386], 16, 9)
    tex *= (1.0 - 0.12 * sock)[..., None]

    def fill(points: Sequence[int] | np.ndarray, blur: float) -> np.ndarray:
        m = np.zeros((H, W), np.float32)
        cv2.fillPoly(m, [np.round(uv[list(points)] * 4).astype(np.int32)], (1.0,), cv2.LINE_AA, shift=2)
        return cv2.GaussianBlur(m, (0, 0), blur)

    # Lips: the outer contour filled with the lip colour, soft edge.
    lips = fill(list(LIPS_OUTER_UPPER) + list(LIPS_OUTER_LOWER[-2:0:-1]), 1.2)
    lipc = np.asarray(ident.lip, np.float32) * (1.0 + 0.05 * _noise(rng, H, W, (4, 40), 2))[..., None]
    tex = tex * (1 - lips[..., None]) + lipc * lips[..., None]
    spec = 0.08 + 0.25 * lips
    # Beard / stubble: speckle below the nose and along the jaw.
    if ident.beard > 0:
        region = fill(JAW_LINE[1:-1] + (287, 410, 322, 391, 393, 164, 167, 165, 92, 186, 57), 6.0)
        speck = (_noise(rng, H, W, (90, 90), 1) > 0.3).astype(np.float32) * region * (1 - lips) * ident.beard
        speck = cv2.GaussianBlur(speck, (0, 0), 0.7)
        tex = tex * (1 - 0.8 * speck[..., None]) + np.asarray(ident.hair, np.float32) * 0.8 * speck[..., None]
    # Brows: the polygon between the upper and lower brow lines, with hair strands.
    hair = np.asarray(ident.hair, np.float32) * 0.85
    for upper, lower in (RIGHT_BROW, LEFT_BROW):
        m = fill(list(upper) + list(lower[::-1]), 1.5)
        strands = 0.7 + 0.3 * _noise(rng, H, W, (64, 12), 2)
        a = np.clip(m * 0.9 * strands, 0, 1)[..., None]
        tex = tex * (1 - a) + hair * a
    # Lash line on the upper lids, a lighter one on the lower: they move with the lids when blinking.
    lash = np.zeros((H, W), np.float32)
    for up, lo in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        cv2.polylines(lash, [np.round(uv[list(up)] * 4).astype(np.int32)], False, (1.0,), 3, cv2.LINE_AA, 2)
        cv2.polylines(lash, [np.round(uv[list(lo)] * 4).astype(np.int32)], False, (0.4,), 1, cv2.LINE_AA, 2)
    lash_a = cv2.GaussianBlur(lash, (0, 0), 0.6)[..., None]
    tex = tex * (1 - 0.85 * lash_a) + 0.05 * lash_a
    # Nostrils: dark ellipses under the nose tip, between the subnasale (2) and the alae (98, 327).
    nost = np.zeros((H, W), np.float32)
    for k in (98, 327):
        p = 0.45 * uv[k] + 0.55 * uv[2]
        cv2.ellipse(nost, (round(p[0]), round(p[1] - 2)), (4, 2), 0, 0, 360, (1.0,), -1, cv2.LINE_AA)
    nost_a = cv2.GaussianBlur(nost, (0, 0), 1.0)[..., None]
    tex = tex * (1 - 0.7 * nost_a)
    # A few moles.
    for _ in range(int(rng.integers(0, 4))):
        p = uv[int(rng.integers(468))]
        cv2.circle(tex, (int(p[0]), int(p[1])), 1, tuple(float(v) for v in skin * 0.45), -1, cv2.LINE_AA)
    part = np.full((H, W), PARTS["face"], np.float32)
    return np.dstack([tex, spec, part])


def _head_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """(256, 256, 5) skull: skin, and hair above the hairline with strands flowing down (u = azimuth, v = polar
    angle)."""
    _, _, W, H = _REGIONS["head"]
    skin = np.asarray(ident.skin, np.float32)
    tex = np.ones((H, W, 3), np.float32) * skin * (1.0 + 0.05 * _noise(rng, H, W, (6, 12)))[..., None]
    phi = (np.arange(W) + 0.5) / W * 2 * math.pi - math.pi
    theta = (np.arange(H) + 0.5) / H * math.pi
    edge = _hair_theta(ident, phi)[None, :] + 0.04 * _noise(rng, H, W, (4, 60), 2)
    hair_mask = (theta[:, None] < edge).astype(np.float32)
    hair_mask = cv2.GaussianBlur(hair_mask, (0, 0), 1.0)
    strands = _hair_strands(ident, rng, H, W)
    amount = {0: 0.35, 1: 1.0, 2: 1.0, 3: 1.0}[ident.hair_style]
    a = (hair_mask * amount)[..., None]
    tex = tex * (1 - a) + strands * a
    spec = 0.06 + 0.25 * a[..., 0] * (ident.hair_style > 0)
    part = np.where(a[..., 0] > 0.5, PARTS["hair"], PARTS["skin"]).astype(np.float32)
    return np.dstack([tex, spec, part])


def _hair_strands(ident: Identity, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    hair = np.asarray(ident.hair, np.float32)
    # Strands: fast variation across (u), slow along (v); plus clumps.
    s = 0.55 * _noise(rng, h, w, (3, 80), 2) + 0.35 * _noise(rng, h, w, (4, 16), 2)
    return np.clip(hair[None, None, :] * (1.0 + 0.45 * s[..., None]) + 0.03 * s[..., None], 0, 1)


def _cloth_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """(256, 256, 5) torso (u around, 0.5 = front; v down from the neckline)."""
    _, _, W, H = _REGIONS["cloth"]
    c1 = np.asarray(ident.clothes, np.float32)
    c2 = np.asarray(ident.clothes2, np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    pat = ident.clothes_pattern
    period = float(rng.uniform(8, 20))
    if pat == 1:
        m = (np.sin(yy / period * 2 * math.pi) > 0).astype(np.float32)
    elif pat == 2:
        m = (np.sin(xx / period * 2 * math.pi) > 0.3).astype(np.float32)
    elif pat == 3:
        m = 0.5 * ((np.sin(xx / period * 2 * math.pi) > 0).astype(np.float32)
                   + (np.sin(yy / period * 2 * math.pi) > 0).astype(np.float32))
    elif pat == 4:
        m = ((np.sin(xx / period * 2 * math.pi) * np.sin(yy / period * 2 * math.pi)) > 0.6).astype(np.float32)
    elif pat == 5:
        m = (np.abs(xx / W - 0.5) < 0.08).astype(np.float32)  # shirt showing between the lapels
    else:
        m = np.zeros((H, W), np.float32)
    m = cv2.GaussianBlur(m, (0, 0), 0.8)[..., None]
    tex = c1 * (1 - m) + c2 * m
    weave = 1.0 + 0.06 * _noise(rng, H, W, (64, 64), 1) + 0.08 * _noise(rng, H, W, (3, 6), 2)
    tex = tex * weave[..., None]
    # Folds: soft vertical shading bands.
    tex *= (1.0 + 0.1 * _noise(rng, H, W, (2, 10), 1))[..., None]
    # Neckline: skin in a small band (crew) or a V at the front top.
    u = xx / W - 0.5
    v = yy / H
    skin_m = (v < 0.1 + 0.2 * np.maximum(0.0, 0.1 - np.abs(u)) / 0.1) if ident.neckline else (v < 0.05)
    skin_m = skin_m & (np.abs(u) < 0.2)
    skin = np.asarray(ident.skin, np.float32)
    tex = np.where(skin_m[..., None], skin, tex)
    part = np.where(skin_m, PARTS["skin"], PARTS["clothes"]).astype(np.float32)
    return np.dstack([np.clip(tex, 0, 1), np.full((H, W), 0.04, np.float32), part])


def _eye_texture(ident: Identity, T: _Template, rng: np.random.Generator) -> np.ndarray:
    """(128, 128, 5) eyeball: sclera, iris with radial fibres and a dark limbal ring, pupil."""
    _, _, W, H = _REGIONS["eye"]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # Texel -> offset from the iris centre in units of the eyeball half-width (0.11 * eye_size).
    ex = (xx + 0.5) / W * 2 - 1
    ey = (yy + 0.5) / H * 2 - 1
    r = np.hypot(ex, ey)
    ic = T.V[468]
    r_iris = float(np.mean(np.linalg.norm(T.V[469:473, :2] - ic[:2], axis=1))) / 0.11
    sclera = np.array([0.86, 0.82, 0.78], np.float32) * (1 + 0.03 * _noise(rng, H, W, (8, 8), 2))[..., None]
    # The upper lid shades the top of the eyeball.
    sclera = sclera * (1 - 0.3 * _smoothstep(0.0, -0.6, ey))[..., None]
    sclera = sclera * (1 - 0.15 * _smoothstep(0.3, 0.9, np.abs(ex))[..., None] * np.array([0, 0.5, 0.5]))
    ang = np.arctan2(ey, ex)
    fibres = _noise(rng, 1, 256, (1, 48), 2)[0]
    f = fibres[((ang + math.pi) / (2 * math.pi) * 255).astype(int)]
    iris = np.asarray(ident.eye, np.float32) * (0.8 + 0.35 * f[..., None]) * (
        1 - 0.5 * _smoothstep(0.75 * r_iris, r_iris, r))[..., None]
    tex = np.where((r < r_iris)[..., None], iris, sclera)
    tex = np.where((r < 0.4 * r_iris)[..., None], np.array([0.03, 0.03, 0.03], np.float32), tex)
    tex = cv2.GaussianBlur(tex, (0, 0), 0.6)
    return np.dstack([tex, np.full((H, W), 0.6, np.float32), np.full((H, W), PARTS["eye"], np.float32)])


def _mouth_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """(128, 128, 5) mouth cavity rows (v): gum, upper teeth, dark interior with the tongue, lower teeth, gum."""
    _, _, W, H = _REGIONS["mouth"]
    v = (np.arange(H) + 0.5) / H
    u = (np.arange(W) + 0.5) / W
    gum = np.array([0.55, 0.25, 0.25], np.float32)
    dark = np.array([0.12, 0.03, 0.03], np.float32)
    tongue = np.array([0.62, 0.3, 0.3], np.float32)
    tooth = np.array([0.92, 0.9, 0.82], np.float32) * (1 - 0.06 * rng.uniform())
    rows = np.empty((H, 3), np.float32)
    t_in = _smoothstep(0.6, 0.72, v)[:, None]
    rows[:] = dark * (1 - t_in) + tongue * t_in
    rows[v < 0.36] = gum
    rows[(v >= 0.36) & (v < 0.5)] = tooth
    rows[(v >= 0.75) & (v < 0.86)] = tooth
    rows[v >= 0.86] = gum
    tex = np.repeat(rows[:, None, :], W, axis=1)
    # Gaps between teeth, darker towards the corners of the mouth.
    gaps = (np.abs(np.sin((u - 0.5) * math.pi * 9)) < 0.12).astype(np.float32)
    teeth = ((v >= 0.36) & (v < 0.5)) | ((v >= 0.75) & (v < 0.86))
    tex[teeth] *= (1 - 0.35 * gaps)[None, :, None][0]
    tex *= (1 - 0.6 * _smoothstep(0.25, 0.5, np.abs(u - 0.5)))[None, :, None]
    spec = np.where(teeth[:, None], 0.4, 0.1) * np.ones((H, W), np.float32)
    return np.dstack([tex, spec, np.full((H, W), PARTS["mouth"], np.float32)])


def _skin_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    _, _, W, H = _REGIONS["skin"]
    tex = np.asarray(ident.skin, np.float32) * (1.0 + 0.05 * _noise(rng, H, W, (4, 4)))[..., None]
    return np.dstack([tex, np.full((H, W), 0.06, np.float32), np.full((H, W), PARTS["skin"], np.float32)])


def _neck_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """The neck (v = 0 under the jaw .. 1 at the collar), darker at the top: the chin's shadow, which a
    Lambert shader without shadows cannot make."""
    _, _, W, H = _REGIONS["neck"]
    v = (np.arange(H, dtype=np.float32) + 0.5) / H
    shadow = 0.6 + 0.4 * _smoothstep(0.05, 0.5, v)
    tex = np.asarray(ident.skin, np.float32) * (1.0 + 0.05 * _noise(rng, H, W, (4, 4)))[..., None]
    tex = tex * shadow[:, None, None]
    return np.dstack([tex, np.full((H, W), 0.05, np.float32), np.full((H, W), PARTS["skin"], np.float32)])


def _hair_texture(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    _, _, W, H = _REGIONS["hair"]
    tex = _hair_strands(ident, rng, H, W)
    return np.dstack([tex, np.full((H, W), 0.2, np.float32), np.full((H, W), PARTS["hair"], np.float32)])


def _atlas(ident: Identity, T: _Template) -> np.ndarray:
    """(512, 512, 5) float32: albedo RGB, specular strength, part label."""
    atlas = np.zeros((_AT, _AT, 5), np.float32)
    makers = {
        "face": lambda r: _face_texture(ident, T, r),
        "head": lambda r: _head_texture(ident, r),
        "cloth": lambda r: _cloth_texture(ident, r),
        "eye": lambda r: _eye_texture(ident, T, r),
        "mouth": lambda r: _mouth_texture(ident, r),
        "skin": lambda r: _skin_texture(ident, r),
        "neck": lambda r: _neck_texture(ident, r),
        "hair": lambda r: _hair_texture(ident, r),
    }
    for k, (name, make) in enumerate(makers.items()):
        x0, y0, w, h = _REGIONS[name]
        atlas[y0:y0 + h, x0:x0 + w] = make(np.random.default_rng([ident.seed, 0x7E, k]))
    return atlas


def _background(ident: Identity, size: int) -> np.ndarray:
    """(size, size, 3) float32 backdrop: gradient, blurred room, wallpaper or bokeh, each with noise."""
    rng = np.random.default_rng([ident.seed, 0xB6])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = rng.uniform(0.1, 0.9, 3).astype(np.float32), rng.uniform(0.1, 0.9, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang), 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    style = ident.background
    if style == 1:  # a room: shelves, a window, furniture, out of focus
        for _ in range(int(rng.integers(6, 14))):
            x0, y0 = rng.uniform(-0.1, 1.0, 2)
            w, h = rng.uniform(0.05, 0.5, 2)
            box_col = tuple(float(v) for v in rng.uniform(0.05, 0.95, 3))
            cv2.rectangle(img, (int(x0 * size), int(y0 * size)), (int((x0 + w) * size), int((y0 + h) * size)),
                          box_col, -1)
        img = cv2.GaussianBlur(img, (0, 0), size / 90)
    elif style == 2:  # wallpaper: a repeating motif
        period = rng.uniform(0.05, 0.14)
        m = np.sin(xx / period * 2 * math.pi) * np.sin(yy / period * 2 * math.pi + rng.uniform(0, 3))
        img = img * (1 + 0.18 * (m > rng.uniform(-0.3, 0.5)).astype(np.float32))[..., None]
    elif style == 3:  # bokeh: soft bright discs
        for _ in range(int(rng.integers(10, 30))):
            p = rng.uniform(0, 1, 2) * size
            r = rng.uniform(0.02, 0.08) * size
            col = rng.uniform(0.5, 1.0, 3).astype(np.float32)
            disc = np.zeros((size, size), np.float32)
            cv2.circle(disc, (int(p[0]), int(p[1])), max(1, int(r)), (1.0,), -1, cv2.LINE_AA)
            img = img + 0.35 * disc[..., None] * (col - img)
        img = cv2.GaussianBlur(img, (0, 0), size / 200)
    noise = _noise(rng, size, size, (5, 5), 3)[..., None]
    return np.clip(img * (1 + 0.07 * noise), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ the rig


@dataclass(frozen=True)
class _Rig:
    """One identity's geometry (rest pose, template units), textures and light, assembled for rendering."""

    V: np.ndarray  # (N, 3) rest positions of every vertex; the face occupies [0, 478)
    N: np.ndarray  # (N, 3) rest normals
    uv: np.ndarray  # (N, 2) atlas texels
    tris: np.ndarray  # (T, 3)
    layer: np.ndarray  # (T,) painter's layer (_L_* or _INNER)
    hole: np.ndarray  # (T + 1,) bool: id (triangle + 1) is an eye or mouth hole of the face; id 0 is nothing
    head: slice  # vertices that move with the head
    neck: slice  # vertices of the neck, rings of neck_cols
    neck_w: np.ndarray  # (rings,) fraction of the head rotation per neck ring
    neck_cols: int
    fills: np.ndarray  # (3,) vertex index of the centre of each hole fan (right eye, left eye, mouth)
    skirt: slice  # the under-jaw skirt: a copy of the jaw line, then its inner ring (both follow the face)
    mouth: slice  # mouth cavity vertices
    mouth_w: np.ndarray  # their jaw weights
    face: np.ndarray  # (478, 3) rest face (identity shape)
    face_n: np.ndarray  # (478, 3)
    atlas: np.ndarray  # (512, 512, 5)
    light: np.ndarray  # (3,) unit, towards the light
    ambient: float
    light_rgb: np.ndarray
    two_sided: np.ndarray  # (T,) bool: not back-face culled; the normal flips when seen from behind
    lid: float
    hole_group: np.ndarray  # (T,) 0/1/2 for the fans over the right eye, left eye, mouth; -1 otherwise
    inner_group: np.ndarray  # (T,) 0/1/2 for the right eyeball, left eyeball, mouth cavity; -1 otherwise
    uv_box: np.ndarray  # (T, 4) float32 texel bounds of each triangle: u_lo, v_lo, u_hi, v_hi
    atlas_flat: np.ndarray  # (512 * 512, 5) the atlas, flattened for one gather per pixel
    light32: np.ndarray  # (3,) float32 light direction
    half32: np.ndarray  # (3,) float32 Blinn-Phong half vector (light + view, the camera looks along +z)


def _fan(loop: np.ndarray, centre: int) -> np.ndarray:
    return np.stack([loop, np.roll(loop, -1), np.full_like(loop, centre)], 1)


#: The under-jaw skirt's inner ring: the jaw line pulled in and tucked back inside the neck.
_SKIRT_SCALE = np.array([0.65, 1.0, 1.0])
_SKIRT_SHIFT = np.array([0.0, -0.04, 0.32])
_SKIRT_INSIDE = np.array([0.0, -0.3, 0.45])


class _Assembler:
    """Concatenates parts into one vertex array and one triangle array with per-triangle flags."""

    def __init__(self) -> None:
        self.V: list[np.ndarray] = []
        self.N: list[np.ndarray] = []
        self.uv: list[np.ndarray] = []
        self.tris: list[np.ndarray] = []
        self.layer: list[np.ndarray] = []
        self.hole: list[np.ndarray] = []
        self.two_sided: list[np.ndarray] = []
        self.hole_group: list[np.ndarray] = []
        self.inner_group: list[np.ndarray] = []
        self.n = 0

    def vertices(self, V: np.ndarray, N: np.ndarray, uv: np.ndarray) -> slice:
        self.V.append(V)
        self.N.append(N)
        self.uv.append(uv)
        self.n += len(V)
        return slice(self.n - len(V), self.n)

    def triangles(self, tris: np.ndarray, layer: int, hole: bool = False, two_sided: np.ndarray | bool = False,
                  hole_group: np.ndarray | int = -1, inner_group: int = -1) -> None:
        self.tris.append(tris)
        self.layer.append(np.full(len(tris), layer))
        self.hole.append(np.full(len(tris), hole))
        self.two_sided.append(np.broadcast_to(two_sided, (len(tris),)))
        self.hole_group.append(np.broadcast_to(hole_group, (len(tris),)))
        self.inner_group.append(np.full(len(tris), inner_group))

    def part(self, p: _Part, inner_group: int = -1) -> slice:
        sl = self.vertices(p.V, p.N, p.uv)
        self.triangles(p.tris + sl.start, p.layer, two_sided=p.two_sided, inner_group=inner_group)
        return sl


@functools.lru_cache(maxsize=16)  # ~5 MB each (the float32 atlas); a new identity costs ~60 ms to build
def _rig(ident: Identity) -> _Rig:
    T = _template()
    face = _shape_face(ident, T)
    eye_parts = []
    for iris in (RIGHT_IRIS, LEFT_IRIS):
        e, p = _eye(face, iris, ident.eye_size)
        face[list(iris)] = e.iris  # the iris landmarks are points of the rendered eyeball
        eye_parts.append(p)
    face_n = np.zeros_like(face)
    face_n[:468] = _vertex_normals(face[:468], T.tris)
    face_n[468:] = (0.0, 0.0, -1.0)
    fw, nw, sw = ident.face_width, ident.neck_width, ident.shoulder_width

    asm = _Assembler()
    # Head-attached vertices first (one slice turns with the head): the face (= the landmarks), the centres of
    # the fans over its holes (their pixels show the inner buffer: eyeballs, mouth cavity), the skirt under the
    # jaw, the skull, ears, eyeballs, mouth cavity and hanging hair.
    asm.vertices(face, face_n, T.uv)
    asm.triangles(T.tris, _L_FACE)
    loops = (*T.eye_loops, T.mouth_loop)
    fills = asm.vertices(np.stack([face[lp].mean(0) for lp in loops]), np.tile([0.0, 0.0, -1.0], (3, 1)),
                         np.zeros((3, 2)))
    fans = np.concatenate([_fan(lp, fills.start + k) for k, lp in enumerate(loops)])
    all_V = np.concatenate([face, np.stack([face[lp].mean(0) for lp in loops])])
    asm.triangles(_orient(all_V, fans, np.tile([0.0, 0.0, -1.0], (len(fans), 1))), _L_FACE, hole=True,
                  hole_group=np.repeat(np.arange(3), [len(lp) for lp in loops]))
    jaw = np.array(JAW_LINE)
    n_j = len(jaw)
    # Its own copy of the jaw line (texture coordinates in the skin region, not the face's) and an inner ring;
    # both follow the face every frame.
    u_j = np.linspace(0, 1, n_j)
    skirt = asm.vertices(np.concatenate([face[jaw], face[jaw] * _SKIRT_SCALE + _SKIRT_SHIFT]), np.zeros((2 * n_j, 3)),
                         np.concatenate([_region_uv("skin", u_j, np.full(n_j, 0.3)),
                                         _region_uv("skin", u_j, np.full(n_j, 0.7))]))
    outer, ring = np.arange(skirt.start, skirt.start + n_j), np.arange(skirt.start + n_j, skirt.stop)
    skirt_tris = np.concatenate([np.stack([outer[:-1], outer[1:], ring[1:]], 1),
                                 np.stack([outer[:-1], ring[1:], ring[:-1]], 1)])
    skirt_V = np.zeros((skirt.stop, 3))  # positions by global index, only the skirt's are used
    skirt_V[outer] = face[jaw]
    skirt_V[ring] = face[jaw] * _SKIRT_SCALE + _SKIRT_SHIFT
    # Outward is down and away from a point high inside the head (the surface under the jaw faces the floor).
    asm.triangles(_orient(skirt_V, skirt_tris, skirt_V[skirt_tris].mean(1) - _SKIRT_INSIDE), _L_HEAD)
    asm.part(_skull(ident, face, _hair_theta(ident, np.linspace(-math.pi, math.pi, 25))))
    for side in (-1.0, 1.0):
        asm.part(_ellipsoid(np.array([side * 0.445 * fw, -0.1, 0.47]), np.array([0.035, 0.12, 0.075]), 5, 9,
                            "skin", _L_HEAD))
    for k, p in enumerate(eye_parts):
        asm.part(p, inner_group=k)
    cavity, mouth_w = _mouth_cavity(face)
    mouth = asm.part(cavity, inner_group=2)
    if ident.hair_style == 3:
        curtain = [(-0.3, 0.47, 0.47, 0.45), (0.05, 0.5, 0.5, 0.45), (0.45, 0.54, 0.52, 0.5),
                   (0.9, 0.6, 0.52, 0.55), (1.35, 0.64, 0.52, 0.58), (1.6, 0.64, 0.52, 0.58)]
        asm.part(_loft(curtain, np.linspace(1.15, 2 * math.pi - 1.15, 13), "hair", _L_HAIR_BACK, inward=True))
    head = slice(0, asm.n)
    # The neck bends with part of the head's rotation; the torso stays. Its front is well behind the chin.
    neck_w = np.array([1.0, 0.85, 0.55, 0.2, 0.0])
    neck_phi = np.linspace(-math.pi, math.pi, 17)
    neck = asm.part(_loft([(y, 0.27 * nw, 0.28 * nw, 0.58) for y in (0.0, 0.3, 0.55, 0.75, 0.9)], neck_phi,
                          "neck", _L_NECK))
    torso = [(0.72, 0.31 * nw, 0.32 * nw, 0.58), (0.8, 0.5 * sw, 0.36, 0.58), (0.88, 0.78 * sw, 0.4, 0.6),
             (0.98, 0.95 * sw, 0.42, 0.6), (1.13, 1.04 * sw, 0.44, 0.6), (1.45, 1.08 * sw, 0.44, 0.6),
             (2.4, 1.1 * sw, 0.44, 0.6)]
    asm.part(_loft(torso, np.linspace(-math.pi, math.pi, 21), "cloth", _L_TORSO, power=2.6))

    light = np.asarray(ident.light, np.float64)
    light /= np.linalg.norm(light)
    half = light + np.array([0.0, 0.0, -1.0])
    uv = np.concatenate(asm.uv).astype(np.float32)
    tris = np.concatenate(asm.tris).astype(np.int64)
    tri_uv = uv[tris]  # (T, 3, 2)
    atlas = _atlas(ident, T)
    return _Rig(
        V=np.concatenate(asm.V),
        N=np.concatenate(asm.N),
        uv=uv,
        tris=tris,
        layer=np.concatenate(asm.layer),
        hole=np.concatenate([[False], *asm.hole]),
        head=head,
        neck=neck,
        neck_w=neck_w,
        neck_cols=len(neck_phi),
        fills=np.arange(fills.start, fills.stop),
        skirt=skirt,
        mouth=mouth,
        mouth_w=mouth_w,
        face=face,
        face_n=face_n,
        atlas=atlas,
        light=light,
        ambient=float(ident.ambient),
        light_rgb=np.asarray(ident.light_rgb, np.float32),
        two_sided=np.concatenate(asm.two_sided),
        lid=float(ident.lid),
        hole_group=np.concatenate(asm.hole_group),
        inner_group=np.concatenate(asm.inner_group),
        uv_box=np.concatenate([tri_uv.min(1), tri_uv.max(1) - 1e-3], 1).astype(np.float32),
        atlas_flat=atlas.reshape(-1, 5),
        light32=light.astype(np.float32),
        half32=(half / np.linalg.norm(half)).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------- animate


def _jaw(P: np.ndarray, w: np.ndarray, theta: float) -> np.ndarray:
    """Blend each point towards its jaw-transformed position by weight w (rotation about the hinge's x axis)."""
    if theta == 0.0:
        return P
    c, s = math.cos(theta), math.sin(theta)
    d = P - _JAW_HINGE
    # Rotation in the y-z plane: opening moves points in front of the hinge down, points below it back.
    moved = np.stack([d[:, 0], d[:, 1] * c - d[:, 2] * s, d[:, 1] * s + d[:, 2] * c], 1) + _JAW_HINGE
    moved += _JAW_GLIDE * theta
    return P + w[:, None] * (moved - P)


def _pose_face(rig: _Rig, expr: Expression) -> tuple[np.ndarray, np.ndarray]:
    """(478, 3) positions and normals of the face with the expression applied (head frame)."""
    T = _template()
    F = rig.face.copy()
    for blink, amount in zip(T.blinks, (expr.blink_right, expr.blink_left), strict=True):
        # The identity's resting lid droop is where blink = 0 starts; blink = 1 is always shut.
        b = rig.lid + (1.0 - rig.lid) * float(np.clip(amount, 0.0, 1.0))
        if b > 0:
            closing = 0.25 * rig.face[blink.upper] + 0.75 * rig.face[blink.lower]
            F[blink.moved] = rig.face[blink.moved] + (b * blink.weight)[:, None] * (closing - rig.face[blink.src])
    theta = float(np.clip(expr.mouth_open, 0.0, 1.0)) * _JAW_MAX_RAD
    Nf = rig.face_n
    if theta > 0:
        F = _jaw(F, T.jaw_w, theta)
        a = T.jaw_w * theta
        c, s = np.cos(a), np.sin(a)
        Nf = np.stack([Nf[:, 0], Nf[:, 1] * c - Nf[:, 2] * s, Nf[:, 1] * s + Nf[:, 2] * c], 1)
    return F, Nf


def _posed_vertices(rig: _Rig, pose: Pose, expr: Expression) -> tuple[np.ndarray, np.ndarray]:
    """All vertices and normals in the camera-aligned head frame (before the camera translation)."""
    T = _template()
    V = rig.V.copy()
    Nn = rig.N.copy()
    F, Nf = _pose_face(rig, expr)
    V[:N_LANDMARKS] = F
    Nn[:N_LANDMARKS] = Nf
    V[rig.fills] = [F[T.eye_loops[0]].mean(0), F[T.eye_loops[1]].mean(0), F[T.mouth_loop].mean(0)]
    jaw = np.array(JAW_LINE)
    V[rig.skirt] = np.concatenate([F[jaw], F[jaw] * _SKIRT_SCALE + _SKIRT_SHIFT])
    # Skirt normals: the face's own along the jaw line (no seam in the shading), then away from a point high
    # inside the head on the inner ring (the underside of the jaw faces down).
    n_j = len(jaw)
    sn = V[rig.skirt.start + n_j:rig.skirt.stop] - _SKIRT_INSIDE
    Nn[rig.skirt.start:rig.skirt.start + n_j] = Nf[jaw]
    Nn[rig.skirt.start + n_j:rig.skirt.stop] = sn / np.linalg.norm(sn, axis=1, keepdims=True)
    theta = float(np.clip(expr.mouth_open, 0.0, 1.0)) * _JAW_MAX_RAD
    V[rig.mouth] = _jaw(V[rig.mouth], rig.mouth_w, theta)
    R = rotation_matrix(pose)
    V[rig.head] = (V[rig.head] - _PIVOT) @ R.T + _PIVOT
    Nn[rig.head] = Nn[rig.head] @ R.T
    # The neck bends: each ring turns by a fraction of the head pose.
    nv = V[rig.neck].reshape(len(rig.neck_w), rig.neck_cols, 3)
    nn = Nn[rig.neck].reshape(len(rig.neck_w), rig.neck_cols, 3)
    for k, w in enumerate(rig.neck_w):
        if w > 0:
            Rk = rotation_matrix(Pose(pose.pitch * w, pose.yaw * w, pose.roll * w))
            nv[k] = (nv[k] - _PIVOT) @ Rk.T + _PIVOT
            nn[k] = nn[k] @ Rk.T
    V[rig.neck] = nv.reshape(-1, 3)
    Nn[rig.neck] = nn.reshape(-1, 3)
    return V, Nn


# ------------------------------------------------------------------------------------------------------ render


@functools.lru_cache(maxsize=16)
def _background8(ident: Identity, size: int) -> np.ndarray:
    """(size * size, 3) uint8 backdrop, flattened for compositing."""
    bg = _background(ident, size)
    return (np.clip(bg, 0.0, 1.0) * 255 + 0.5).astype(np.uint8).reshape(-1, 3)


def _camera(ident: Identity, size: int) -> tuple[float, float, float, float]:
    """(focal, distance, cx, cy) in pixels / template units for an image of ``size``."""
    f = FOCAL * size
    dist = FOCAL / (FACE_FRACTION * ident.scale)  # face height 1 spans FACE_FRACTION * scale * size pixels
    return f, dist, size / 2 + ident.offset[0] * size, size / 2 + ident.offset[1] * size


def _raster(buf: np.ndarray, pts: np.ndarray, ids: np.ndarray) -> None:
    """Painter's algorithm: fill triangles (already sorted far to near) with their id + 1.

    A Python loop over cv2.fillConvexPoly: ~1.5 us per triangle here, cheaper than a vectorised numpy z-buffer
    for the large torso and skull triangles (measured while writing this; see bench/synthetic.py)."""
    fill = cv2.fillConvexPoly
    for p, k in zip(pts, ids.tolist(), strict=True):
        fill(buf, p, k + 1, cv2.LINE_8, 4)


def _rasterize(rig: _Rig, P2: np.ndarray, Z: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangle ids (R, R) int64 (id + 1, 0 = background) after showing the inner buffer through the face's holes;
    also each triangle's doubled signed area ``det`` (T,) and the mask of hole pixels nothing covers (R * R,)."""
    tri = rig.tris
    a = P2[tri[:, 0]]
    e1, e2 = P2[tri[:, 1]] - a, P2[tri[:, 2]] - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # Front faces have (b - a) x (c - a) towards the camera (-z): negative in image coordinates (y down).
    vis = (det < -1e-3) | (rig.two_sided & (det > 1e-3))
    # The eyeballs and the mouth cavity are only drawn when their hole in the face is open (not blinked shut).
    open_holes = np.unique(rig.hole_group[vis & (rig.hole_group >= 0)])
    inner_vis = vis & np.isin(rig.inner_group, open_holes)
    depth = Z[tri].mean(1)
    pts = np.round((P2[tri] - 0.5) * 16).astype(np.int32)  # (T, 3, 2) 4 fractional bits; pixel centres at +0.5
    main = np.zeros((R, R), np.uint16)
    inner = np.zeros((R, R), np.uint16)
    for buf, sel in ((main, vis & (rig.layer != _INNER)), (inner, inner_vis)):
        idx = np.flatnonzero(sel)
        idx = idx[np.lexsort((-depth[idx], rig.layer[idx]))]  # by layer, then far to near
        _raster(buf, pts[idx], idx)
    hole = rig.hole[main]
    ids = np.where(hole, inner, main).astype(np.int64)
    return ids, det, (hole & (inner == 0)).ravel()


@functools.lru_cache(maxsize=8)
def _pixel_centres(R: int) -> tuple[np.ndarray, np.ndarray]:
    """(R * R,) float32 x and y of every pixel centre of an R x R buffer, row-major."""
    i = np.arange(R * R)
    return ((i % R) + 0.5).astype(np.float32), ((i // R) + 0.5).astype(np.float32)


def _shade(rig: _Rig, ids: np.ndarray, P2: np.ndarray, det: np.ndarray, Nn: np.ndarray,
           bg8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Texture and light every covered pixel: (R * R, 3) uint8 colours over the backdrop and (R * R,) parts."""
    R = ids.shape[0]
    out = bg8.copy()
    parts = np.zeros(R * R, np.uint8)
    flat = np.flatnonzero(ids)
    if not flat.size:
        return out, parts
    tri = rig.tris
    # Screen-space barycentric interpolation as a per-triangle affine map of the pixel centre (x, y):
    # attribute = c0 + gx * x + gy * y for u, v, nx, ny, nz. (T, 3, 5) float32, one gather per pixel.
    A = np.concatenate([rig.uv, Nn.astype(np.float32)], 1)  # (N, 5)
    A0, A1, A2 = A[tri[:, 0]], A[tri[:, 1]], A[tri[:, 2]]
    a = P2[tri[:, 0]]
    e1, e2 = P2[tri[:, 1]] - a, P2[tri[:, 2]] - a
    inv = (1.0 / np.where(det == 0, 1.0, det))[:, None]
    gx = ((A1 - A0) * e2[:, 1:2] - (A2 - A0) * e1[:, 1:2]) * inv
    gy = ((A2 - A0) * e1[:, 0:1] - (A1 - A0) * e2[:, 0:1]) * inv
    c0 = A0 - gx * a[:, 0:1] - gy * a[:, 1:2]
    coef = np.stack([c0, gx, gy], 1).astype(np.float32)  # (T, 3, 5)
    # A two-sided triangle seen from behind is shaded with its normal flipped towards the camera.
    coef[det > 0, :, 2:5] *= -1.0
    t = ids.ravel()[flat] - 1
    xc, yc = _pixel_centres(R)
    xy1 = np.stack([np.ones(len(flat), np.float32), xc[flat], yc[flat]], 1)  # (n, 3)
    att = np.einsum("nkc,nk->nc", coef[t], xy1)  # (n, 5) = c0 + gx * x + gy * y
    # Texture lookups stay inside the triangle's own texels (pixels just outside a sliver would extrapolate).
    box = rig.uv_box[t]  # (n, 4) u_lo, v_lo, u_hi, v_hi
    u = np.clip(att[:, 0], box[:, 0], box[:, 2]).astype(np.int32)
    v = np.clip(att[:, 1], box[:, 1], box[:, 3]).astype(np.int32)
    tex = rig.atlas_flat[v * _AT + u]  # (n, 5) albedo RGB, specular, part
    n = att[:, 2:5]
    inv_len = 1.0 / np.sqrt(np.maximum(np.einsum("ij,ij->i", n, n), 1e-12))
    ndl = np.maximum(n @ rig.light32, 0.0) * inv_len
    nh = np.maximum(n @ rig.half32, 0.0) * inv_len
    nh *= nh
    nh *= nh
    nh *= nh  # (n . h)^8: a broad highlight
    spec = tex[:, 3] * nh * nh * nh  # ^24
    shade = rig.ambient + (1.0 - rig.ambient) * ndl
    col = (tex[:, :3] * shade[:, None] + spec[:, None]) * rig.light_rgb
    out[flat] = np.clip(col * 255.0 + 0.5, 0, 255).astype(np.uint8)
    parts[flat] = tex[:, 4].astype(np.uint8)
    return out, parts


def render(identity: Identity, pose: Pose, expression: Expression | None = None, size: int = 256,
           supersample: int = SUPERSAMPLE) -> Frame:
    """Render ``identity`` in ``pose`` with ``expression`` as a (size, size) RGB frame with its landmarks.

    ``supersample`` renders at that multiple of ``size`` and area-averages down (1 turns anti-aliasing off)."""
    expr = expression or Expression()
    rig = _rig(identity)
    ss = max(1, int(supersample))
    R = size * ss
    f, dist, cx, cy = _camera(identity, R)
    V, Nn = _posed_vertices(rig, pose, expr)
    Z = V[:, 2] + dist
    P2 = np.stack([f * V[:, 0] / Z + cx, f * V[:, 1] / Z + cy], 1)  # (N, 2) render-buffer pixels
    ids, det, hole_dark = _rasterize(rig, P2, Z, R)
    out, parts = _shade(rig, ids, P2, det, Nn, _background8(identity, R))
    # A hole pixel the inner buffer leaves uncovered looks deep into the mouth or the eye socket.
    out[hole_dark] = (20, 5, 5)
    parts[hole_dark] = PARTS["mouth"]
    out8 = out.reshape(R, R, 3)
    image = cv2.resize(out8, (size, size), interpolation=cv2.INTER_AREA) if ss > 1 else out8

    # Landmarks: the face vertices in output pixels; z relative to the face centroid, scaled like x there.
    z_ref = float(((np.zeros(3) - _PIVOT) @ rotation_matrix(pose).T + _PIVOT)[2] + dist)
    lm = np.empty((N_LANDMARKS, 3), np.float32)
    lm[:, :2] = P2[:N_LANDMARKS] / ss
    lm[:, 2] = (Z[:N_LANDMARKS] - z_ref) * (f / z_ref) / ss
    return Frame(image=image, landmarks=lm, pose=pose, parts=parts.reshape(R, R)[ss // 2::ss, ss // 2::ss].copy())


# ------------------------------------------------------------------------------------------------------ motion


def _track(rng: np.random.Generator, t: np.ndarray, amp: float) -> np.ndarray:
    """Smooth random angle track within +-amp: keyframes every 0.6-1.8 s joined by a monotone cubic (PCHIP),
    which never overshoots its keys."""
    from scipy.interpolate import PchipInterpolator

    keys_t = [0.0]
    while keys_t[-1] <= t[-1]:
        keys_t.append(keys_t[-1] + rng.uniform(0.6, 1.8))
    keys_v = rng.uniform(-amp, amp, len(keys_t))
    keys_v[0] *= 0.3  # start near frontal
    return np.asarray(PchipInterpolator(keys_t, keys_v)(t))


def _speech(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Mouth opening of speech: syllables at 3-5 Hz (raised-cosine pulses of random height) in phrases of 1-4 s,
    separated by pauses of 0.3-1.5 s."""
    out = np.zeros_like(t)
    now = rng.uniform(0.0, 0.5)
    end = t[-1] + 1.0 if len(t) else 0.0
    while now < end:
        phrase_end = now + rng.uniform(1.0, 4.0)
        while now < phrase_end:
            width = rng.uniform(0.18, 0.3)
            height = rng.uniform(0.2, 1.0)
            pulse = np.where(np.abs(t - now) < width / 2, 0.5 + 0.5 * np.cos(2 * math.pi * (t - now) / width), 0)
            out = np.maximum(out, height * pulse)
            now += 1.0 / rng.uniform(3.0, 5.0)
        now += rng.uniform(0.3, 1.5)
    return np.clip(out, 0.0, 1.0)


def _blinks(rng: np.random.Generator, t: np.ndarray, fps: float) -> np.ndarray:
    """Blinks about every 2-6 s, each ~0.25 s: a fast close (40%) and a slower open, fully shut at a frame."""
    out = np.zeros_like(t)
    now = rng.uniform(0.3, 2.5)
    while len(t) and now < t[-1] + 1.0:
        dur = rng.uniform(0.2, 0.32)
        peak = round(now * fps) / fps
        close, opening = 0.4 * dur, 0.6 * dur
        rise = np.clip(1 - (peak - t) / close, 0, 1) * (t <= peak)
        fall = np.clip(1 - (t - peak) / opening, 0, 1) * (t > peak)
        out = np.maximum(out, _smoothstep(0.0, 1.0, rise + fall))
        now += rng.uniform(2.0, 6.0)
    return out


def motion(n_frames: int, seed: int, fps: float = 25.0, yaw: float = 40, pitch: float = 25,
           roll: float = 15) -> tuple[list[Pose], list[Expression]]:
    """Smooth head motion within +-(pitch, yaw, roll) degrees, speech-like mouth movement and blinks."""
    rng = np.random.default_rng([int(seed), 0x30])
    t = np.arange(n_frames) / fps
    if n_frames == 0:
        return [], []
    p, y, r = (_track(rng, t, amp) for amp in (pitch, yaw, roll))
    mouth = _speech(rng, t)
    blink = _blinks(rng, t, fps)
    # The eyes do not close exactly alike: in this clip the right one closes up to 15% less than the left.
    lag = np.clip(blink * (1 - 0.15 * rng.uniform()), 0, 1)
    poses = [Pose(float(a), float(b), float(c)) for a, b, c in zip(p, y, r, strict=True)]
    exprs = [Expression(float(m), float(bl), float(br)) for m, bl, br in zip(mouth, blink, lag, strict=True)]
    return poses, exprs


def sequence(identity: Identity, n_frames: int, seed: int, size: int = 256, fps: float = 25.0) -> Clip:
    """A talking-head clip of ``identity`` following ``motion(n_frames, seed, fps)``."""
    poses, exprs = motion(n_frames, seed, fps)
    frames = [render(identity, p, e, size) for p, e in zip(poses, exprs, strict=True)]
    return Clip(
        images=np.stack([fr.image for fr in frames]) if frames else np.zeros((0, size, size, 3), np.uint8),
        landmarks=np.stack([fr.landmarks for fr in frames]) if frames else np.zeros((0, N_LANDMARKS, 3), np.float32),
        poses=np.array([[p.pitch, p.yaw, p.roll] for p in poses], np.float32).reshape(-1, 3),
        fps=float(fps),
        expressions=exprs,
    )


def write_video(path: str | os.PathLike[str], clip: Clip) -> None:
    """Write ``clip`` as an H.264 mp4 (engine.video.encode_mp4)."""
    from engine.video import encode_mp4

    encode_mp4(iter(clip.images), clip.fps, path=path)


def write_demo_videos(out_dir: str | os.PathLike[str], seed: int = 0, size: int = 256, fps: float = 25.0,
                      reference_s: float = 6.0, driving_s: float = 4.0) -> tuple[Path, Path]:
    """A reference video (identity ``seed``) and a driving video (another identity, other motion) for demos and
    tests: ``out_dir/reference.mp4``, ``out_dir/driving.mp4``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref, drv = out / "reference.mp4", out / "driving.mp4"
    write_video(ref, sequence(random_identity(seed), round(reference_s * fps), seed, size, fps))
    write_video(drv, sequence(random_identity(seed + 1), round(driving_s * fps), seed + 1, size, fps))
    return ref, drv
