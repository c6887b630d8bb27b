"""Face landmarks (mediapipe face mesh), head pose and the face crop (DESIGN.md section 4, "Upload").

Landmarks
    ``mediapipe.solutions.face_mesh`` with ``refine_landmarks=True`` gives ``N_LANDMARKS = 478`` points: the 468-point
    face mesh and two irises of 5 points each (468..472, 473..477). ``FaceMesh.detect`` returns them as pixels:
    x right, y down, and mediapipe's relative depth z scaled by the image width like x, so smaller z is nearer the
    camera and all three axes share one unit. Every function here takes that convention, whoever made the landmarks
    (mediapipe, a client, or engine/synthetic.py).

Head pose
    The paper places each reference frame on the appearance map by its head pose (section 3.2, "Reference
    selection"). ``head_pose`` fits a similarity transform ``L ~ s R T + t`` from a frontal template ``T`` to the
    468 mesh points (weighted Kabsch/Umeyama, then a few robust reweighting steps) and reads pitch, yaw and roll off
    ``R`` with the sign convention of engine/geometry.py. Using the whole mesh in 3D avoids the ~33 degree pitch bias
    of solvePnP against a generic 6-point model (../shared/REFERENCES.md): the template is mediapipe's own
    geometry. It was measured once on scikit-image's astronaut (a frontal portrait), averaged over rescaled and
    mirrored copies, made exactly left-right symmetric, and turned so that its symmetry plane is x = 0; see
    ``build_frontal_template``, which wrote ``assets/face_pose_template.npy``. Yaw and roll of zero therefore mean
    "symmetric about the image's vertical plane"; pitch zero is the astronaut's pose, a face looking into the lens.
    The pose is the face's apparent orientation (weak perspective, as it shows in the crop), which is what reference
    selection compares; pass ``focal`` to refer it to the camera axis instead.

Crop
    As in few-shot vid2vid: a square of side about twice the face width with the face a bit below the centre, so
    that hair and chin fit. The side comes from the RMS radius of the mesh rather than its bounding box so it does
    not grow when the head rolls. ``CropSmoother`` (a One Euro filter, Casiez et al. 2012) keeps it still across
    frames without lagging behind real motion.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from engine.errors import InvalidLandmarks, NoFaceFound
from engine.geometry import Pose, pose_from_matrix, rotation_matrix

N_LANDMARKS = 478
#: The face mesh proper; the irises (468..477) follow the gaze, not the head, and stay out of the pose fit.
N_MESH = 468
#: Outer eye corners, the unit of the template (their distance is 1).
EYE_CORNERS = (33, 263)
#: Mid-line point between the nose and the upper lip: the template's mouth and jaw lie below it.
SUBNASALE = 2

TEMPLATE_PATH = Path(__file__).resolve().parent / "assets" / "face_pose_template.npy"

#: Weight of the mouth and jaw points (below the subnasale) in the pose fit: they move with speech, the upper face
#: does not. Not zero, because the jaw line still constrains pitch and roll.
LOWER_FACE_WEIGHT = 0.3
#: Crop side over the frontal face width (few-shot vid2vid crops about twice the landmark width).
CROP_SCALE = 2.0
#: The crop centre sits this fraction of the side above the mesh centroid (the face sits a bit below the centre).
CROP_RAISE = 0.1


# --------------------------------------------------------------------------------------------------- validation


def validate_landmarks(arr: Any) -> np.ndarray:
    """Landmarks as float32 ``(478, 2|3)`` or ``(T, 478, 2|3)``; ``InvalidLandmarks`` for anything else.

    The server calls it on client-sent landmark frames, so every failure is a user error with a readable message.
    """
    try:
        out = np.asarray(arr, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidLandmarks(f"landmarks are not a numeric array: {exc}") from None
    if out.ndim not in (2, 3) or out.shape[-2] != N_LANDMARKS or out.shape[-1] not in (2, 3):
        raise InvalidLandmarks(
            f"landmarks must have shape ({N_LANDMARKS}, 2 or 3) or (T, {N_LANDMARKS}, 2 or 3), got {out.shape}",
            shape=list(out.shape),
        )
    if out.ndim == 3 and out.shape[0] == 0:
        raise InvalidLandmarks("no landmark frames", shape=list(out.shape))
    if not np.isfinite(out).all():
        raise InvalidLandmarks("landmarks contain NaN or infinite values", shape=list(out.shape))
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------------- detection


class FaceMesh:
    """mediapipe's face mesh with iris refinement; one face, landmarks in pixels (see the module docstring).

    ``static_image_mode=True`` detects afresh in every image; ``False`` (videos) tracks the face from the previous
    frame, which is faster and steadier. The graphs are created on first use and released by ``close`` or the
    ``with`` block. One instance is not thread-safe: give each worker thread its own.

    Small faces: the face mesh finds faces with its short-range detector, which misses faces narrower than about a
    tenth of the image (a person a few metres back in a 720p frame). With ``small_faces`` (default), when the mesh
    finds nothing, the face is looked for in a ``SMALL_FACE_CROP`` square around the previous frame's face (video)
    or around what mediapipe's full-range detector finds, and the mesh runs on that square. Frames without any
    face pay for the full-range detector too (about 10 ms at 720p).
    """

    #: Side of the square the mesh sees in the small-face path, and how much larger than the face it is.
    SMALL_FACE_CROP = 256
    SMALL_FACE_MARGIN = 2.0

    def __init__(
        self,
        static_image_mode: bool = False,
        *,
        small_faces: bool = True,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
    ) -> None:
        self.static_image_mode = static_image_mode
        self.small_faces = small_faces
        self.min_detection_confidence = min_detection_confidence
        self.min_tracking_confidence = min_tracking_confidence
        self._graph: Any = None  # the face mesh on whole frames (tracking unless static_image_mode)
        self._crop_graph: Any = None  # the face mesh on small-face squares (always static: the square moves)
        self._detector: Any = None  # the full-range face detector
        self._previous: np.ndarray | None = None  # the last frame's landmarks (video only)

    def _face_mesh(self, static: bool) -> Any:
        # Imported here: mediapipe takes about a second to import and loads its model files.
        from mediapipe.python.solutions import face_mesh as mp_face_mesh

        return mp_face_mesh.FaceMesh(
            static_image_mode=static,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=self.min_detection_confidence,
            min_tracking_confidence=self.min_tracking_confidence,
        )

    @staticmethod
    def _landmarks(graph: Any, image: np.ndarray) -> np.ndarray | None:
        h, w = image.shape[:2]
        result = graph.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return None
        points = result.multi_face_landmarks[0].landmark
        out = np.array([(p.x, p.y, p.z) for p in points], dtype=np.float32)  # (478, 3) normalised
        # mediapipe's z has the scale of x (normalised by the width): scale it by the width too.
        out *= np.array([w, h, w], dtype=np.float32)
        return out

    def detect(self, image: np.ndarray) -> np.ndarray | None:
        """(478, 3) float32 landmarks in pixels of ``image`` (RGB uint8 HxWx3), or None when it shows no face."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if self._graph is None:
            self._graph = self._face_mesh(self.static_image_mode)
        found = self._landmarks(self._graph, image)
        if found is None and self.small_faces:
            found = self._detect_small(image)
        if not self.static_image_mode:
            self._previous = found
        return found

    def _detect_small(self, image: np.ndarray) -> np.ndarray | None:
        """The small-face path (see the class docstring): the mesh on a square around the face, mapped back."""
        if self._previous is not None:
            xy = self._previous[:N_MESH, :2]
            centre, size = (xy.min(axis=0) + xy.max(axis=0)) / 2, float(np.ptp(xy, axis=0).max())
        else:
            if self._detector is None:
                from mediapipe.python.solutions import face_detection as mp_face_detection

                # model_selection=1: the full-range model (faces up to about 5 m), shipped in the wheel.
                self._detector = mp_face_detection.FaceDetection(
                    model_selection=1, min_detection_confidence=self.min_detection_confidence
                )
            result = self._detector.process(np.ascontiguousarray(image))
            if not result.detections:
                return None
            h, w = image.shape[:2]
            rel = result.detections[0].location_data.relative_bounding_box
            centre = np.array([(rel.xmin + rel.width / 2) * w, (rel.ymin + rel.height / 2) * h])
            size = max(rel.width * w, rel.height * h)
        box = (float(centre[0]), float(centre[1]), self.SMALL_FACE_MARGIN * size)
        if self._crop_graph is None:
            self._crop_graph = self._face_mesh(static=True)
        found = self._landmarks(self._crop_graph, crop(image, box, self.SMALL_FACE_CROP))
        return None if found is None else from_crop(found, box, self.SMALL_FACE_CROP)

    def close(self) -> None:
        for graph in (self._graph, self._crop_graph, self._detector):
            if graph is not None:
                graph.close()
        self._graph = self._crop_graph = self._detector = None
        self._previous = None

    def __enter__(self) -> FaceMesh:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------- template


@functools.cache
def frontal_template() -> np.ndarray:
    """(478, 3) float64 frontal face in mediapipe's topology, read-only.

    Centred on the mesh centroid, exactly symmetric about x = 0, outer eye corners 1 apart, x right, y down, the
    nose towards -z (the camera). engine/synthetic.py can use it as the rest shape of its heads, which makes its
    "true" poses and ``head_pose`` share one notion of frontal.
    """
    arr = np.load(TEMPLATE_PATH).astype(np.float64)
    if arr.shape != (N_LANDMARKS, 3):
        raise ValueError(f"{TEMPLATE_PATH} holds {arr.shape}, expected ({N_LANDMARKS}, 3)")
    arr.setflags(write=False)
    return arr


@functools.cache
def mirror_permutation() -> np.ndarray:
    """Index map of the left-right mirror: landmark ``i`` of a face is landmark ``perm[i]`` of its mirror image.

    Use it to flip landmarks with their image (``x -> w - x`` then ``[perm]``), e.g. for flip augmentation.
    """
    perm = _match_mirror(frontal_template())
    perm.setflags(write=False)
    return perm


def _match_mirror(points: np.ndarray, iterations: int = 4) -> np.ndarray:
    """Mirror pairs of a near-frontal face by matching it against its reflection (Hungarian assignment).

    The reflection is re-aligned to the face after each assignment, so a face that is a little turned still
    matches; the result must be an involution that pairs the eye corners, or the face was not frontal enough.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    p = points - points.mean(axis=0)
    mirrored = p * np.array([-1.0, 1.0, 1.0])
    moved = mirrored
    perm = np.arange(len(p))
    for _ in range(iterations):
        _, perm = linear_sum_assignment(cdist(p, moved))
        # Re-align the reflection (with the current pairing) onto the face; a reflection composed with the best
        # rotation is the reflection about the face's own symmetry plane.
        R, s, t = _fit_similarity(mirrored[perm], p, np.ones(len(p)))
        moved = s * mirrored @ R.T + t
    a, b = EYE_CORNERS
    if not (np.array_equal(perm[perm], np.arange(len(p))) and perm[a] == b):
        raise ValueError("could not pair the landmarks with their mirror images: is the face frontal?")
    return np.asarray(perm, dtype=np.int64)


def build_frontal_template(image: np.ndarray | None = None) -> np.ndarray:
    """Measure the frontal template from a frontal portrait (default: scikit-image's astronaut). Dev tool.

    Writes nothing; ``python -c "from engine.faces import *; np.save(TEMPLATE_PATH, build_frontal_template())"``
    regenerates the shipped asset (scikit-image is a dev dependency, imported only when ``image`` is None).

    1. Landmarks of the portrait at three scales, each also from the mirrored image (mirrored back with the mirror
       pairing), Procrustes-aligned and averaged: the mean cancels much of the model's per-image noise and any
       left-right bias.
    2. Symmetrised: averaged with its own reflection aligned onto it.
    3. Turned so the symmetry plane is x = 0. The normal of that plane gives yaw and roll exactly
       (``R e_x = Rz(-roll) Ry(-yaw) e_x``); pitch is not fixed by symmetry and stays the portrait's.
    4. Centred on the mesh centroid and scaled so the outer eye corners are 1 apart.
    """
    if image is None:
        from skimage import data  # dev dependency: only this tool uses it

        image = data.astronaut()
    h, w = image.shape[:2]

    def landmarks(mesh: FaceMesh, img: np.ndarray) -> np.ndarray:
        found = mesh.detect(img)
        if found is None:
            raise NoFaceFound("the template portrait shows no face at one of the scales")
        return found.astype(np.float64)

    estimates: list[np.ndarray] = []
    with FaceMesh(static_image_mode=True) as mesh:
        perm = _match_mirror(landmarks(mesh, image))
        for scale in (1.0, 0.75, 0.5):
            small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            estimates.append(landmarks(mesh, small) / scale)  # back to the portrait's pixels (z scaled like x)
            unflipped = landmarks(mesh, np.ascontiguousarray(small[:, ::-1])) / scale
            unflipped[:, 0] = w - unflipped[:, 0]
            estimates.append(unflipped[perm])
    aligned = []
    for est in estimates:
        R, s, t = _fit_similarity(est, estimates[0], np.ones(N_LANDMARKS))
        aligned.append(s * est @ R.T + t)
    mean = np.mean(aligned, axis=0)  # (478, 3) the portrait's face, pixels

    # 2. Symmetrise: the reflection re-paired and aligned onto the face, then averaged with it.
    reflected = (mean * np.array([-1.0, 1.0, 1.0]))[perm]
    R, s, t = _fit_similarity(reflected, mean, np.ones(N_LANDMARKS))
    sym = 0.5 * (mean + s * reflected @ R.T + t)

    # 3. The symmetry plane's normal: every pair's difference lies along it.
    diffs = sym - sym[perm]  # (478, 3), zero on the mid-line
    normal = np.linalg.svd(diffs, full_matrices=False)[2][0]
    normal *= np.sign(normal[0])
    yaw = math.degrees(math.asin(float(np.clip(normal[2], -1.0, 1.0))))
    roll = -math.degrees(math.atan2(float(normal[1]), float(normal[0])))
    turn = rotation_matrix(Pose(pitch=0.0, yaw=yaw, roll=roll))  # takes e_x to the normal
    centred = sym - sym[:N_MESH].mean(axis=0)
    template = centred @ turn  # each point turned back by turn^T (row vectors)

    # Remove what is left of the asymmetry after the turn (it is at the level of floating-point error).
    template = 0.5 * (template + (template * np.array([-1.0, 1.0, 1.0]))[perm])
    template -= template[:N_MESH].mean(axis=0)
    a, b = EYE_CORNERS
    template /= np.linalg.norm(template[a] - template[b])
    return template.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- head pose


def _fit_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Weighted Umeyama fit: ``R`` (proper rotation), ``s``, ``t`` minimising ``sum w |dst - (s R src + t)|^2``."""
    w = weights / weights.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    cov = (b * w[:, None]).T @ a  # (3, 3) cross-covariance dst x src
    U, S, Vt = np.linalg.svd(cov)
    # A reflection would fit a mirrored face; a head cannot be one, so force det(R) = +1 (Umeyama 1991, eq. 39).
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    R = (U * d) @ Vt
    var_s = float(w @ (a * a).sum(axis=1))
    s = float((S * d).sum()) / var_s
    t = mu_d - s * R @ mu_s
    return R, s, t


@functools.cache
def _rigid_weights() -> np.ndarray:
    """(468,) prior weights of the mesh points in the pose fit: the mouth and jaw count less (they move)."""
    T = frontal_template()[:N_MESH]
    weights = np.ones(N_MESH)
    weights[T[:, 1] > T[SUBNASALE, 1]] = LOWER_FACE_WEIGHT
    weights.setflags(write=False)
    return weights


def fit_template(landmarks: np.ndarray, iterations: int = 3) -> tuple[np.ndarray, float, np.ndarray]:
    """Rotation ``R``, scale ``s`` and translation ``t`` with ``landmarks ~ s R T + t`` over the 468 mesh points.

    After the weighted fit, a few reweighting steps (Cauchy weights on the residuals, in units of their median)
    down-weight points that an expression or a mistaken landmark has moved. Landmarks without z (``(478, 2)``) are
    fitted by alternating: the depth of each point is taken from the current fit, then the 3D fit is redone.
    """
    L = np.asarray(landmarks, dtype=np.float64)[:N_MESH]
    T = frontal_template()[:N_MESH]
    prior = _rigid_weights()
    has_depth = L.shape[1] == 3
    if not has_depth:
        L = np.concatenate([L, np.zeros((N_MESH, 1))], axis=1)  # (468, 3) depth filled in below
    weights = prior.copy()
    R, s, t = _fit_similarity(T, L, weights)
    # Without depth the alternation converges linearly (about 1 degree left after 3 steps at 20 degrees of pitch),
    # so it runs until the rotation settles.
    for _ in range(iterations if has_depth else 20 * iterations):
        fitted = s * T @ R.T + t  # (468, 3)
        if not has_depth:
            L[:, 2] = fitted[:, 2]  # orthographic camera: the fit fixes the depth the image cannot show
        resid = np.linalg.norm(L - fitted, axis=1)
        scale = float(np.median(resid)) + 1e-9
        weights = prior / (1.0 + (resid / (3.0 * scale)) ** 2)
        R_prev = R
        R, s, t = _fit_similarity(T, L, weights)
        if not has_depth and float(np.abs(R - R_prev).max()) < 1e-6:
            break
    return R, s, t


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int], *, focal: float | None = None) -> Pose:
    """Head pose in degrees (engine/geometry.py convention) of one face's landmarks in pixels of an image of
    ``image_size = (w, h)``.

    ``landmarks`` is (478, 3) (or (478, 2): depth is then inferred, which is less certain in pitch and yaw). The
    result is the apparent pose (see the module docstring); with ``focal`` (pixels) the apparent rotation is
    composed with the direction of the camera ray through the face, giving the pose relative to the optical axis
    of a pinhole camera with its principal point at the image centre.
    """
    lm = validate_landmarks(landmarks)
    if lm.ndim != 2:
        raise InvalidLandmarks("head_pose takes one face; call it per frame", shape=list(lm.shape))
    R, _, t = fit_template(lm)
    if focal is not None:
        w, h = image_size
        ray = np.array([(t[0] - w / 2) / focal, (t[1] - h / 2) / focal, 1.0])
        R = _rotation_between(np.array([0.0, 0.0, 1.0]), ray / np.linalg.norm(ray)) @ R
    return pose_from_matrix(R)


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` to unit vector ``b`` (Rodrigues), for |angle| < 180."""
    v = np.cross(a, b)
    c = float(a @ b)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


# --------------------------------------------------------------------------------------------------------- crop


@functools.cache
def _side_per_radius() -> float:
    """Crop side per RMS radius of the mesh: CROP_SCALE face widths for the frontal template."""
    T = frontal_template()[:N_MESH, :2]
    width = float(T[:, 0].max() - T[:, 0].min())
    radius = float(np.sqrt(((T - T.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return CROP_SCALE * width / radius


def crop_box(landmarks: np.ndarray) -> tuple[float, float, float]:
    """Square crop ``(cx, cy, side)`` in pixels around one face (see the module docstring)."""
    xy = validate_landmarks(landmarks)[:N_MESH, :2].astype(np.float64)
    centre = xy.mean(axis=0)
    radius = float(np.sqrt(((xy - centre) ** 2).sum(axis=1).mean()))
    side = _side_per_radius() * radius
    return float(centre[0]), float(centre[1] - CROP_RAISE * side), side


class CropSmoother:
    """One Euro filter (Casiez, Roussel, Vogel 2012) on ``(cx, cy, side)`` across the frames of a video.

    The cut-off frequency rises with the speed of the box, so a still face gets a still crop (jitter of the
    landmarks is filtered hard) while a moving face is followed with little lag. Speeds are measured in crop sides
    per second, which makes the parameters independent of resolution and face size.
    """

    def __init__(self, fps: float = 25.0, min_cutoff: float = 0.5, beta: float = 2.0, d_cutoff: float = 1.0) -> None:
        self.fps = fps
        self.min_cutoff = min_cutoff
        self.beta = beta
        self.d_cutoff = d_cutoff
        self._x: np.ndarray | None = None
        self._dx = np.zeros(3)

    def _alpha(self, cutoff: np.ndarray | float) -> np.ndarray:
        tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, dtype=np.float64))
        return 1.0 / (1.0 + tau * self.fps)

    def reset(self) -> None:
        self._x = None
        self._dx = np.zeros(3)

    def __call__(self, box: tuple[float, float, float]) -> tuple[float, float, float]:
        x = np.asarray(box, dtype=np.float64)
        if self._x is None:
            self._x = x
            return box
        # Speed of the raw box in sides per second, itself low-passed, sets the cut-off of the box filter.
        dx = (x - self._x) * self.fps / self._x[2]
        self._dx = self._dx + self._alpha(self.d_cutoff) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff) * (x - self._x)
        return float(self._x[0]), float(self._x[1]), float(self._x[2])


def _crop_matrix(box: tuple[float, float, float], size: int) -> np.ndarray:
    """2x3 affine from image pixels to crop pixels, in continuous coordinates (pixel i spans [i, i+1))."""
    cx, cy, side = box
    k = size / side
    return np.array([[k, 0.0, (side / 2 - cx) * k], [0.0, k, (side / 2 - cy) * k]])


def crop(image: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """The ``box`` of ``image`` resampled to ``size x size`` (edges replicated where the box leaves the image).

    Large reductions are first done by area averaging over just the box's region (bilinear sampling alone would
    alias), then the exact sub-pixel placement by one affine warp; both steps use the same continuous coordinates
    as ``to_crop``, so landmarks and pixels stay registered.
    """
    cx, cy, side = box
    h, w = image.shape[:2]
    M = _crop_matrix(box, size)
    src = image
    shrink = int(side // (2 * size))
    if shrink >= 2:
        # Region of the box (plus a margin for the bilinear taps), clamped to the image.
        x0 = max(0, math.floor(cx - side / 2) - shrink)
        y0 = max(0, math.floor(cy - side / 2) - shrink)
        x1 = min(w, math.ceil(cx + side / 2) + shrink)
        y1 = min(h, math.ceil(cy + side / 2) + shrink)
        if x1 - x0 >= shrink and y1 - y0 >= shrink:
            region = image[y0:y1, x0:x1]
            rw, rh = max(1, (x1 - x0) // shrink), max(1, (y1 - y0) // shrink)
            src = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
            # Continuous coordinates: u_small = (u - x0) * rw / (x1 - x0); compose with the crop map.
            fx, fy = rw / (x1 - x0), rh / (y1 - y0)
            M = M @ np.array([[1 / fx, 0.0, x0], [0.0, 1 / fy, y0], [0.0, 0.0, 1.0]])
    # warpAffine puts pixel centres at integers: shift continuous coordinates by half a pixel on both sides.
    Mi = M.copy()
    Mi[:, 2] += 0.5 * (M[:, 0] + M[:, 1]) - 0.5
    return cv2.warpAffine(src, Mi, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def to_crop(landmarks: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Landmarks mapped into the pixels of ``crop(image, box, size)``; z scaled by the same factor as x and y."""
    lm = validate_landmarks(landmarks).copy()
    cx, cy, side = box
    k = size / side
    lm[..., 0] = (lm[..., 0] - (cx - side / 2)) * k
    lm[..., 1] = (lm[..., 1] - (cy - side / 2)) * k
    if lm.shape[-1] == 3:
        lm[..., 2] *= k
    return lm


def from_crop(landmarks: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Inverse of ``to_crop``: landmarks in crop pixels back to the pixels of the image the crop came from."""
    lm = validate_landmarks(landmarks).copy()
    cx, cy, side = box
    k = side / size
    lm[..., 0] = lm[..., 0] * k + (cx - side / 2)
    lm[..., 1] = lm[..., 1] * k + (cy - side / 2)
    if lm.shape[-1] == 3:
        lm[..., 2] *= k
    return lm


# -------------------------------------------------------------------------------------------------------- video


@dataclass
class FaceTrack:
    """A video's faces: the frames kept (a face was found), their landmarks in crop pixels, poses and crops."""

    kept: np.ndarray  # (N,) int64 indices into the input frames
    landmarks: np.ndarray  # (N, 478, 3) float32, pixels of the size x size crop
    poses: np.ndarray  # (N, 3) float32 pitch, yaw, roll in degrees
    crops: np.ndarray  # (N, size, size, 3) uint8 RGB
    n_frames: int
    n_dropped: int


def track_video(frames: Iterable[np.ndarray], size: int = 256, fps: float = 25.0) -> FaceTrack:
    """Landmarks, pose and a smoothed square crop of every frame that shows a face; the others are dropped.

    ``NoFaceFound`` when no frame shows a face. ``fps`` sets the time scale of the crop smoother, which carries
    on across dropped frames: a face lost for a frame or two is usually still where it was.
    """
    kept: list[int] = []
    landmarks: list[np.ndarray] = []
    poses: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    smoother = CropSmoother(fps=fps)
    n_frames = 0
    with FaceMesh(static_image_mode=False) as mesh:
        for i, frame in enumerate(frames):
            n_frames += 1
            lm = mesh.detect(frame)
            if lm is None:
                continue
            h, w = frame.shape[:2]
            box = smoother(crop_box(lm))
            kept.append(i)
            poses.append(head_pose(lm, (w, h)).as_array())
            landmarks.append(to_crop(lm, box, size))
            crops.append(crop(frame, box, size))
    if not kept:
        raise NoFaceFound(f"no face found in any of the {n_frames} frames", n_frames=n_frames)
    return FaceTrack(
        kept=np.asarray(kept, dtype=np.int64),
        landmarks=np.stack(landmarks).astype(np.float32),
        poses=np.stack(poses).astype(np.float32),
        crops=np.stack(crops),
        n_frames=n_frames,
        n_dropped=n_frames - len(kept),
    )
