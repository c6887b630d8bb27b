"""The runtime: ingest a real face video into an identity, then drive it frame by frame in batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InvalidLandmarks, InvalidVideo, NoFaceFound
from engine.runtime.checkpoint import CheckpointError, load_checkpoint, random_model, save_checkpoint
from engine.runtime.identity import IdentityAssets, ingest_video, pick_references
from engine.runtime.synthesizer import (
    FrameRequest,
    Synthesizer,
    driving_landmarks_from_video,
    landmarks_from_normalized,
)
from engine.video import encode_mp4


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer.load(preset="tiny")


@pytest.fixture(scope="module")
def reference_mp4(astronaut_video) -> bytes:
    data = encode_mp4(list(astronaut_video.frames), fps=astronaut_video.fps)
    assert data is not None
    return data


@pytest.fixture(scope="module")
def assets(reference_mp4, synth) -> IdentityAssets:
    return ingest_video(reference_mp4, synth, fps=25.0, max_references=12)


def test_ingest_builds_a_complete_identity(assets, synth):
    n, S = assets.n_refs, synth.image_size
    assert 3 <= n <= 12
    assert assets.images.shape == (n, S, S, 3) and assets.images.dtype == np.uint8
    assert assets.landmarks.shape == (n, 478, 3)
    assert assets.labels.shape == (n, synth.cfg.label_nc, S, S)
    h = synth.cfg.feat_size
    assert assets.X_a.shape == assets.X_l.shape == (n, synth.cfg.c, h, h)
    assert np.isfinite(assets.X_a.astype(np.float32)).all()
    r = assets.report
    assert r.frames_total == 24 and r.frames_used + r.frames_dropped == 24 and r.frames_used >= 20
    assert r.n_references == n and "covered_fraction" in str(r.coverage) or r.coverage
    assert assets.model_id == synth.model_id
    assert assets.appearance_map_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assets_round_trip_through_a_directory(assets, tmp_path):
    assets.save(tmp_path)
    back = IdentityAssets.load(tmp_path)
    for name in ("images", "landmarks", "poses", "labels", "X_a", "X_l"):
        np.testing.assert_array_equal(getattr(back, name), getattr(assets, name))
    assert back.report == assets.report and back.model_id == assets.model_id
    np.testing.assert_array_equal(back.appearance_map.select((0, 5)), assets.appearance_map.select((0, 5)))


def test_pick_references_spreads_over_poses():
    rng = np.random.default_rng(0)
    poses = np.concatenate([rng.normal(0, 1, (200, 3)), [[20, 30, 0], [-20, -30, 0], [0, 40, 0]]])
    keep = pick_references(poses, 6)
    assert len(keep) == 6 and list(keep) == sorted(keep)
    assert {200, 201, 202} <= set(keep.tolist())  # the extreme poses are never left out
    assert len(pick_references(poses[:4], 10)) == 4


def test_render_is_batched_deterministic_and_temporal(assets, synth, reference_mp4):
    driving, fps = driving_landmarks_from_video(reference_mp4, size=synth.image_size)
    assert driving.shape == (24, 478, 3) and fps == pytest.approx(25.0)

    def run(batch: bool) -> list[np.ndarray]:
        states = [synth.new_stream(), synth.new_stream()]
        frames = []
        for t in range(3):
            reqs = [FrameRequest("id-a", assets, driving[t + 5 * s], states[s]) for s in range(2)]
            out = synth.render(reqs) if batch else [synth.render([r])[0] for r in reqs]
            frames += [f.image for f in out]
        return frames

    batched, single = run(True), run(False)
    for a, b in zip(batched, single, strict=True):
        assert a.shape == (synth.image_size, synth.image_size, 3) and a.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batch == separate runs (rounding aside)
    assert run(True)[0].tobytes() == batched[0].tobytes()  # deterministic
    assert synth.bases.hits > 0 and len(synth.bases) >= 1


def test_previous_frame_changes_the_output(assets, synth):
    state = synth.new_stream()
    first = synth.render([FrameRequest("id-a", assets, assets.landmarks[0], state)])[0]
    second = synth.render([FrameRequest("id-a", assets, assets.landmarks[-1], state)])[0]
    fresh = synth.render([FrameRequest("id-a", assets, assets.landmarks[-1], synth.new_stream())])[0]
    assert state.frames == 2 and state.prev_image is not None
    assert not np.array_equal(second.image, fresh.image)  # f_p blends the previous output in
    assert len(first.ref_indices) == min(3, assets.n_refs)


def test_assets_from_another_model_are_reencoded(assets):
    other = Synthesizer.load(preset="tiny", seed=1)
    assert other.model_id != assets.model_id
    copy = IdentityAssets(**{**assets.__dict__})
    other.ensure_features(copy)
    assert copy.model_id == other.model_id and not np.array_equal(copy.X_a, assets.X_a)


def test_bad_driving_input_gets_typed_errors(assets, synth):
    with pytest.raises(InvalidLandmarks):
        synth.render([FrameRequest("id-a", assets, np.full((478, 3), np.nan), synth.new_stream())])
    with pytest.raises(InvalidLandmarks):
        landmarks_from_normalized(np.zeros((2, 10, 3)), size=64)
    with pytest.raises(InvalidVideo):
        driving_landmarks_from_video(b"not a video")
    noise = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    mp4 = encode_mp4(list(noise), fps=8)
    assert mp4 is not None
    with pytest.raises(NoFaceFound):
        driving_landmarks_from_video(mp4)


def test_normalised_landmarks_map_into_the_crop(assets, synth):
    S = synth.image_size
    norm = assets.landmarks[:4] / np.array([S, S, S], dtype=np.float32)
    crop = landmarks_from_normalized(norm, size=S)
    assert crop.shape == (4, 478, 3)
    centre = crop[:, :468, :2].mean(axis=1)
    assert np.all(np.abs(centre - S / 2) < S * 0.2)


def test_checkpoints_round_trip_and_verify(tmp_path):
    loaded = random_model("tiny", seed=3)
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, loaded.model, step=7, meta={"note": "x"})
    back = load_checkpoint(path, expected_sha256=digest)
    assert back.step == 7 and back.model_id == f"sha256:{digest}" and back.model.cfg == loaded.model.cfg
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, expected_sha256="0" * 64)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "bad.pt")
