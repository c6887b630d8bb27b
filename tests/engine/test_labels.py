"""engine/labels.py: label images drawn from face-mesh contours."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import LABEL_CHANNELS
from engine.faces import frontal_template
from engine.labels import (
    CHANNEL_CONTOURS,
    chain_edges,
    channel_polylines,
    draw_label,
    draw_labels,
    label_to_rgb,
    stroke_width,
)


def _face(size: int, turn: float = 0.0) -> np.ndarray:
    """The frontal template as (478, 3) pixels of a size x size image, face width about 0.45 size."""
    T = frontal_template().copy()
    c, s = np.cos(turn), np.sin(turn)
    T[:, :2] = T[:, :2] @ np.array([[c, -s], [s, c]]).T
    return (T * 0.3 * size + np.array([size / 2, size / 2, 0.0])).astype(np.float32)


def _mesh_indices(*names: str) -> set[int]:
    from mediapipe.python.solutions import face_mesh_connections as connections

    return {v for name in names for edge in getattr(connections, name) for v in edge}


def test_shape_range_and_dtype() -> None:
    label = draw_label(_face(256), 256)
    assert label.shape == (LABEL_CHANNELS, 256, 256) and label.dtype == np.float32
    assert label.min() >= 0.0 and label.max() <= 1.0 and label.max() == 1.0


def test_each_channel_draws_its_contours() -> None:
    lm = _face(256)
    label = draw_label(lm, 256)
    for channel, names in enumerate(CHANNEL_CONTOURS):
        ink = label[channel] > 0.5
        assert ink.sum() > 50, channel
        # Every landmark of the channel's contours lies on its ink, and the ink lies near those landmarks only.
        idx = sorted(_mesh_indices(*names))
        px = np.floor(lm[idx, :2]).astype(int)
        near = np.zeros_like(ink)
        for x, y in px:
            near[y - 1 : y + 2, x - 1 : x + 2] |= ink[y - 1 : y + 2, x - 1 : x + 2]
        assert near[px[:, 1], px[:, 0]].mean() > 0.95, channel
        ys, xs = np.nonzero(ink)
        assert xs.min() >= px[:, 0].min() - 3 and xs.max() <= px[:, 0].max() + 3, channel
        assert ys.min() >= px[:, 1].min() - 3 and ys.max() <= px[:, 1].max() + 3, channel


def test_lips_are_in_the_lips_channel_only() -> None:
    lm = _face(256)
    label = draw_label(lm, 256)
    x, y = np.floor(lm[14, :2]).astype(int)  # the middle of the inner edge of the lower lip
    assert label[2, y, x] > 0.5 and label[0, y, x] == 0.0 and label[1, y, x] == 0.0


def test_anti_aliased_and_sub_pixel() -> None:
    lm = _face(256)
    label = draw_label(lm, 256)
    assert ((label > 0.0) & (label < 1.0)).sum() > 0.3 * (label > 0.0).sum()
    # A quarter-pixel move changes the drawing (positions are not rounded to whole pixels) ...
    moved = draw_label(lm + np.array([0.25, 0.0, 0.0], np.float32), 256)
    assert not np.array_equal(moved, label)
    # ... and moves the ink's centre of mass by about that much.
    xs = np.arange(256) + 0.5
    shift = (moved[0].sum(axis=0) @ xs) / moved[0].sum() - (label[0].sum(axis=0) @ xs) / label[0].sum()
    assert shift == pytest.approx(0.25, abs=0.06)


def test_deterministic_and_batch_equals_single() -> None:
    faces = np.stack([_face(128), _face(128, turn=0.3), _face(128, turn=-0.2)])
    batch = draw_labels(faces, 128)
    assert batch.shape == (3, LABEL_CHANNELS, 128, 128)
    for i in range(3):
        assert np.array_equal(batch[i], draw_label(faces[i], 128))
    assert np.array_equal(draw_labels(faces, 128), batch)
    assert np.array_equal(draw_labels(faces[..., :2], 128), batch)  # z is not used


def test_thickness_scales_with_size() -> None:
    assert [stroke_width(s) for s in (64, 128, 256, 512, 1024)] == [1, 1, 2, 4, 8]
    # Ink grows with the square of the size: lines twice as long and twice as thick.
    ink = {size: draw_label(_face(size), size).sum() for size in (256, 512)}
    assert 3.4 < ink[512] / ink[256] < 4.6
    thin, thick = draw_label(_face(256), 256, thickness=1).sum(), draw_label(_face(256), 256, thickness=4).sum()
    assert 2.5 < thick / thin < 5.0


@pytest.mark.parametrize(("size", "thickness"), [(64, None), (256, None), (512, None), (256, 3.0), (256, 1.5)])
def test_stroke_width_is_honoured(size: int, thickness: float | None) -> None:
    # The face oval laid on a circle (the other landmarks on one point): ink per unit length is the stroke width.
    oval = next(idx for idx, closed in channel_polylines()[0] if len(idx) > 30)
    lm = np.full((478, 2), size / 2, np.float32)
    a = np.linspace(0, 2 * np.pi, len(oval), endpoint=False)
    r = 0.35 * size
    lm[oval] = np.stack([size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)], axis=1)
    length = len(oval) * 2 * r * np.sin(np.pi / len(oval))
    width = draw_label(lm, size, thickness)[0].sum() / length
    assert width == pytest.approx(thickness or stroke_width(size), abs=0.3)


def test_landmarks_off_the_canvas_draw_nothing_and_do_not_fail() -> None:
    far = _face(256) + np.array([1e7, -1e7, 0.0], np.float32)
    assert draw_label(far, 64).max() == 0.0
    with pytest.raises(ValueError):
        draw_label(np.zeros((68, 2)), 64)
    with pytest.raises(ValueError):
        draw_labels(np.zeros((478, 2)), 64)


def test_contours_chain_into_polylines_covering_every_edge_once() -> None:
    from mediapipe.python.solutions import face_mesh_connections as connections

    for names, lines in zip(CHANNEL_CONTOURS, channel_polylines(), strict=True):
        edges = {frozenset(e) for name in names for e in getattr(connections, name)}
        drawn: list[frozenset[int]] = []
        for idx, closed in lines:
            ring = list(idx) + ([idx[0]] if closed else [])
            drawn += [frozenset(p) for p in zip(ring[:-1], ring[1:], strict=True)]
        assert len(drawn) == len(set(drawn)) and set(drawn) == edges
    # Loops come out closed; an open chain stays open; a branching graph still uses every edge once.
    assert [(list(i), c) for i, c in chain_edges([(1, 2), (2, 3), (3, 1)])] == [([1, 2, 3], True)]
    assert [(list(i), c) for i, c in chain_edges([(5, 6), (6, 7)])] == [([5, 6, 7], False)]
    branched = chain_edges([(0, 1), (1, 2), (1, 3), (3, 4)])
    assert sum(len(i) - (0 if c else 1) for i, c in branched) == 4


def test_label_to_rgb_preview() -> None:
    label = draw_label(_face(128), 128)
    rgb = label_to_rgb(label)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    blank = label.max(axis=0) == 0
    assert rgb.max() == 255 and rgb[blank].max() == 0 and rgb[~blank].max(axis=1).min() > 0
    with pytest.raises(ValueError):
        label_to_rgb(np.zeros((2, 8, 8)))
