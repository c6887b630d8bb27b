"""engine/faces.py on a real face (scikit-image's astronaut, through H.264) and on exact template geometry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from engine import faces
from engine.errors import InvalidLandmarks, NoFaceFound
from engine.faces import (
    N_LANDMARKS,
    CropSmoother,
    FaceMesh,
    FaceTrack,
    crop,
    crop_box,
    from_crop,
    frontal_template,
    head_pose,
    mirror_permutation,
    to_crop,
    track_video,
    validate_landmarks,
)
from engine.geometry import Pose, rotation_matrix


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut: np.ndarray) -> np.ndarray:
    with FaceMesh(static_image_mode=True) as mesh:
        lm = mesh.detect(astronaut)
    assert lm is not None
    return lm


@pytest.fixture(scope="module")
def astronaut_track(astronaut_video: Any) -> FaceTrack:
    return track_video(astronaut_video.frames, size=128, fps=astronaut_video.fps)


def _posed(pose: Pose, scale: float = 90.0, centre: tuple[float, float] = (200.0, 150.0)) -> np.ndarray:
    """The template turned to ``pose`` and placed in a 400x300 image, (478, 3) pixels (orthographic)."""
    pts = frontal_template() @ rotation_matrix(pose).T * scale
    return (pts + np.array([centre[0], centre[1], 0.0])).astype(np.float32)


# ------------------------------------------------------------------------------------------------- real face


def test_detect_returns_pixels_with_depth(astronaut: np.ndarray, astronaut_landmarks: np.ndarray) -> None:
    lm = astronaut_landmarks
    assert lm.shape == (N_LANDMARKS, 3) and lm.dtype == np.float32
    # The face is in the upper middle of the 512x512 portrait; the nose tip is the nearest mesh point.
    assert 150 < lm[:, 0].mean() < 300 and 50 < lm[:, 1].mean() < 220
    assert int(np.argmin(lm[: faces.N_MESH, 2])) in (1, 4)
    # z is in pixels like x: the face is deeper than a tenth of its width, shallower than its width.
    width, depth = np.ptp(lm[:468, 0]), np.ptp(lm[:468, 2])
    assert 0.3 * width < depth < 1.0 * width


def test_frontal_astronaut_reads_near_zero(astronaut_landmarks: np.ndarray) -> None:
    pose = head_pose(astronaut_landmarks, (512, 512))
    assert max(abs(pose.pitch), abs(pose.yaw), abs(pose.roll)) < 8.0, pose


def test_roll_follows_the_rotation_of_a_real_video(astronaut_video: Any, astronaut_track: FaceTrack) -> None:
    track = astronaut_track
    assert track.n_frames == len(astronaut_video.frames) and track.n_dropped == 0
    applied = astronaut_video.angles[track.kept]
    roll = track.poses[:, 2]
    slope, offset = np.polyfit(applied, roll, 1)
    assert np.corrcoef(applied, roll)[0, 1] > 0.99
    assert 0.9 < slope < 1.1 and abs(offset) < 8.0
    # An in-plane rotation moves neither pitch nor yaw.
    assert np.ptp(track.poses[:, 0]) < 5.0 and np.ptp(track.poses[:, 1]) < 5.0


def test_track_outputs_are_registered(astronaut_track: FaceTrack) -> None:
    track = astronaut_track
    n = len(track.kept)
    assert track.landmarks.shape == (n, N_LANDMARKS, 3) and track.landmarks.dtype == np.float32
    assert track.crops.shape == (n, 128, 128, 3) and track.crops.dtype == np.uint8
    assert track.poses.shape == (n, 3)
    # The crop frames the face the same way in every frame: centred horizontally, a bit below the middle.
    centre = track.landmarks[:, :468, :2].mean(axis=1)  # (n, 2)
    assert np.all(np.abs(centre[:, 0] - 64) < 8) and np.all((centre[:, 1] > 64) & (centre[:, 1] < 64 + 24))
    # Landmarks found again in the crop agree with the mapped ones: pixels and landmarks are registered.
    with FaceMesh(static_image_mode=True) as mesh:
        again = mesh.detect(track.crops[0])
    assert again is not None
    assert float(np.median(np.linalg.norm(again[:, :2] - track.landmarks[0, :, :2], axis=1))) < 2.0


def test_frames_without_a_face_are_dropped_and_counted(astronaut_video: Any) -> None:
    rng = np.random.default_rng(0)
    frames = list(astronaut_video.frames[:6])
    noise = rng.integers(0, 256, size=frames[0].shape, dtype=np.uint8)
    frames[2] = noise
    frames[4] = noise
    track = track_video(iter(frames), size=64)
    assert track.n_frames == 6 and track.n_dropped == 2
    assert track.kept.tolist() == [0, 1, 3, 5]


def test_noise_has_no_face() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
    with FaceMesh(static_image_mode=True) as mesh:
        assert mesh.detect(noise) is None
    with pytest.raises(NoFaceFound) as info:
        track_video([noise, noise[::-1].copy(), np.zeros_like(noise)])
    assert info.value.code == "no_face_found" and info.value.details["n_frames"] == 3


def test_small_face_in_a_large_frame(astronaut: np.ndarray, astronaut_landmarks: np.ndarray) -> None:
    # The astronaut's head at 0.8x (face about 75 px wide) in a 1280x720 frame: too small for the face mesh's
    # own detector, found through the full-range detector, with landmarks where the paste put them.
    import cv2
    from skimage import data

    scale, x0, y0 = 0.8, 700.0, 300.0
    frame = cv2.resize(data.coffee(), (1280, 720))
    M = np.array([[scale, 0.0, x0], [0.0, scale, y0]])
    head = cv2.warpAffine(astronaut[0:300, 75:375], M, (1280, 720))
    inside = cv2.warpAffine(np.ones((300, 300), np.uint8), M, (1280, 720)) > 0
    frame[inside] = head[inside]
    expected = astronaut_landmarks.astype(np.float64) * scale
    expected[:, 0] += x0 - 75 * scale
    expected[:, 1] += y0
    with FaceMesh(static_image_mode=True, small_faces=False) as mesh:
        assert mesh.detect(frame) is None
    with FaceMesh(static_image_mode=True) as mesh:
        found = mesh.detect(frame)
    assert found is not None
    assert float(np.median(np.linalg.norm(found[:, :2] - expected[:, :2], axis=1))) < 1.5
    assert float(np.median(np.abs(found[:, 2] - expected[:, 2]))) < 1.5  # depth mapped back at the same scale
    pose, reference = head_pose(found, (1280, 720)), head_pose(astronaut_landmarks, (512, 512))
    assert np.allclose(pose.as_array(), reference.as_array(), atol=2.5)


def test_detect_rejects_non_rgb_uint8() -> None:
    mesh = FaceMesh(static_image_mode=True)
    with pytest.raises(ValueError):
        mesh.detect(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError):
        mesh.detect(np.zeros((64, 64, 3), dtype=np.float32))
    mesh.close()


def test_mirrored_image_mirrors_landmarks_and_pose(astronaut: np.ndarray, astronaut_landmarks: np.ndarray) -> None:
    with FaceMesh(static_image_mode=True) as mesh:
        flipped = mesh.detect(astronaut[:, ::-1].copy())
    assert flipped is not None
    perm = mirror_permutation()
    assert np.array_equal(perm[perm], np.arange(N_LANDMARKS)) and perm[33] == 263 and perm[1] == 1
    unflipped = flipped.copy()
    unflipped[:, 0] = 512 - unflipped[:, 0]
    unflipped = unflipped[perm]
    assert float(np.median(np.linalg.norm(unflipped - astronaut_landmarks, axis=1))) < 3.0
    a, b = head_pose(astronaut_landmarks, (512, 512)), head_pose(flipped, (512, 512))
    assert abs(a.yaw + b.yaw) < 1.5 and abs(a.roll + b.roll) < 1.5 and abs(a.pitch - b.pitch) < 1.5


def test_crop_smoother_reduces_jitter_of_real_landmarks(astronaut: np.ndarray) -> None:
    # A still face with sensor noise: the raw crop box jitters with the landmarks, the smoothed one much less.
    rng = np.random.default_rng(2)
    raw, smooth = [], []
    smoother = CropSmoother(fps=25.0)
    with FaceMesh(static_image_mode=True) as mesh:
        for _ in range(16):
            noisy = np.clip(astronaut[:320, 64:384] + rng.normal(0, 6, (320, 320, 3)), 0, 255).astype(np.uint8)
            lm = mesh.detect(noisy)
            assert lm is not None
            box = crop_box(lm)
            raw.append(box)
            smooth.append(smoother(box))
    raw_jitter = np.abs(np.diff(np.array(raw), axis=0)).mean(axis=0)
    smooth_jitter = np.abs(np.diff(np.array(smooth), axis=0)).mean(axis=0)
    assert raw_jitter.sum() > 0.1  # there is jitter to remove
    assert np.all(smooth_jitter < 0.5 * raw_jitter), (raw_jitter, smooth_jitter)


def test_crop_smoother_follows_motion() -> None:
    # A face moving steadily (a quarter side per second) is followed with a lag of a small part of the side.
    smoother = CropSmoother(fps=25.0)
    out = [smoother((100.0 + 2.0 * i, 80.0, 200.0)) for i in range(50)]
    lag = (100.0 + 2.0 * 49) - out[-1][0]
    assert 0.0 <= lag < 0.05 * 200.0
    assert out[-1][1:] == pytest.approx((80.0, 200.0))
    smoother.reset()
    assert smoother((5.0, 6.0, 7.0)) == (5.0, 6.0, 7.0)


# ------------------------------------------------------------------------------------------- exact geometry


@pytest.mark.parametrize(
    "pose", [Pose(0, 0, 0), Pose(20, 0, 0), Pose(0, -35, 0), Pose(0, 0, 40), Pose(-15, 25, -10), Pose(30, -20, 15)]
)
def test_head_pose_reads_posed_template(pose: Pose) -> None:
    # Landmarks in mediapipe's convention from any source (engine/synthetic.py's renders): exact in 3D, close
    # without depth.
    lm = _posed(pose)
    assert np.allclose(head_pose(lm, (400, 300)).as_array(), pose.as_array(), atol=1e-3)
    assert np.allclose(head_pose(lm[:, :2], (400, 300)).as_array(), pose.as_array(), atol=0.5)


def test_head_pose_signs_read_off_the_image() -> None:
    # Built without engine.geometry: turn the template so the nose tip moves right, up, and rotate the image
    # counter-clockwise (y is down, so that is a negative angle in x-y coordinates).
    T = frontal_template().astype(np.float64) * 100
    a = math.radians(20)
    c, s = math.cos(a), math.sin(a)
    turn_right = T @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]]).T
    tilt_up = T @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]]).T
    ccw = T @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]).T
    assert turn_right[1, 0] > T[1, 0] and tilt_up[1, 1] < T[1, 1]
    assert head_pose(turn_right, (1, 1)).yaw == pytest.approx(20, abs=1e-6)
    assert head_pose(tilt_up, (1, 1)).pitch == pytest.approx(20, abs=1e-6)
    assert head_pose(ccw, (1, 1)).roll == pytest.approx(20, abs=1e-6)
    # Counter-clockwise on screen: the eye on the image's right (263) rises above the other (33).
    assert ccw[263, 1] < ccw[33, 1]


def test_head_pose_ignores_an_open_mouth() -> None:
    # Drop the jaw by 15 degrees about an axis behind the cheeks: the head has not moved.
    T = frontal_template().astype(np.float64)
    jaw = T[:, 1] > T[61, 1]
    pivot = np.array([0.0, T[33, 1] + 0.3, 0.7])
    a = math.radians(15)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    opened = T.copy()
    opened[jaw] = (T[jaw] - pivot) @ rx.T + pivot
    assert np.abs(opened - T).max() > 0.1
    pose = Pose(10, -20, 5)
    lm = opened @ rotation_matrix(pose).T * 100
    assert np.allclose(head_pose(lm, (1, 1)).as_array(), pose.as_array(), atol=1.0)


def test_head_pose_with_focal_refers_to_the_optical_axis() -> None:
    centred = _posed(Pose(0, 0, 0), centre=(200, 150))
    assert np.allclose(head_pose(centred, (400, 300), focal=400).as_array(), 0, atol=1e-6)
    # An apparently frontal face at the right edge faces the camera centre: turned left in camera terms.
    right = _posed(Pose(0, 0, 0), centre=(400, 150))
    assert head_pose(right, (400, 300), focal=400).yaw == pytest.approx(-math.degrees(math.atan(0.5)), abs=0.1)
    assert head_pose(right, (400, 300)).yaw == pytest.approx(0, abs=1e-6)


def test_template_is_symmetric_frontal_and_reproducible() -> None:
    T = frontal_template()
    assert T.shape == (N_LANDMARKS, 3) and not T.flags.writeable
    mirrored = (T * np.array([-1, 1, 1]))[mirror_permutation()]
    assert np.allclose(mirrored, T, atol=1e-6)
    assert np.linalg.norm(T[33] - T[263]) == pytest.approx(1.0, abs=1e-6)
    assert T[1, 2] < T[:468, 2].mean()  # the nose points at the camera (-z)
    rebuilt = faces.build_frontal_template()
    assert np.abs(rebuilt - T).max() < 1e-3


# ------------------------------------------------------------------------------------------------------ crop


def test_crop_box_side_is_twice_the_width_and_ignores_roll() -> None:
    frontal = _posed(Pose(0, 0, 0))
    cx, cy, side = crop_box(frontal)
    width = np.ptp(frontal[:468, 0])
    assert side == pytest.approx(2.0 * width, rel=1e-5)
    assert cx == pytest.approx(frontal[:468, 0].mean(), abs=1e-3)
    assert cy < frontal[:468, 1].mean()  # the face sits below the crop centre
    rolled = crop_box(_posed(Pose(0, 0, 30)))
    assert rolled[2] == pytest.approx(side, rel=1e-5)


def test_crop_and_to_crop_agree_to_a_fraction_of_a_pixel() -> None:
    # A Gaussian blob at a sub-pixel position must land where to_crop maps its centre, with or without the
    # area-averaging pre-reduction (box sides 150 and 700 for a 64-pixel crop).
    yy, xx = np.mgrid[0:800, 0:900]
    x0, y0 = 412.3, 377.8
    blob = np.exp(-((xx + 0.5 - x0) ** 2 + (yy + 0.5 - y0) ** 2) / (2 * 20.0**2))
    image = np.repeat((blob * 255).astype(np.uint8)[..., None], 3, axis=2)
    point = np.zeros((N_LANDMARKS, 3), np.float32)
    point[:, :2] = (x0, y0)
    for box in [(400.0, 390.0, 150.0), (450.0, 400.0, 700.0)]:
        out = crop(image, box, 64)[..., 0].astype(np.float64)
        assert out.shape == (64, 64)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        found = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
        expected = to_crop(point, box, 64)[0, :2]
        assert np.linalg.norm(found - expected) < 0.1, (box, found, expected)


def test_to_crop_scales_depth_like_xy() -> None:
    lm = _posed(Pose(10, 10, 0))
    box = crop_box(lm)
    mapped = to_crop(lm, box, 256)
    assert np.allclose(from_crop(mapped, box, 256), lm, atol=1e-3)
    k = 256 / box[2]
    assert np.allclose(np.ptp(mapped, axis=0), np.ptp(lm, axis=0) * k, rtol=1e-4)
    assert np.allclose(head_pose(mapped, (256, 256)).as_array(), head_pose(lm, (400, 300)).as_array(), atol=1e-3)


# ------------------------------------------------------------------------------------------------ validation


def test_validate_landmarks_accepts_frames_and_batches() -> None:
    one = validate_landmarks(np.zeros((N_LANDMARKS, 3), dtype=np.float64).tolist())
    assert one.dtype == np.float32 and one.shape == (N_LANDMARKS, 3)
    assert validate_landmarks(np.ones((N_LANDMARKS, 2))).shape == (N_LANDMARKS, 2)
    assert validate_landmarks(np.ones((5, N_LANDMARKS, 3))).shape == (5, N_LANDMARKS, 3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((477, 3)),
        np.zeros((N_LANDMARKS, 4)),
        np.zeros((N_LANDMARKS,)),
        np.zeros((0, N_LANDMARKS, 3)),
        np.zeros((2, 2, N_LANDMARKS, 3)),
        [["a", "b", "c"]] * N_LANDMARKS,
        [[1.0, 2.0], [3.0]],
    ],
)
def test_validate_landmarks_rejects_wrong_shapes(bad: object) -> None:
    with pytest.raises(InvalidLandmarks) as info:
        validate_landmarks(bad)
    assert info.value.code == "invalid_landmarks" and info.value.http_status == 422


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_validate_landmarks_rejects_non_finite(value: float) -> None:
    lm = np.ones((3, N_LANDMARKS, 3))
    lm[1, 200, 1] = value
    with pytest.raises(InvalidLandmarks, match="NaN or infinite"):
        validate_landmarks(lm)
    with pytest.raises(InvalidLandmarks):
        head_pose(lm[1], (64, 64))
