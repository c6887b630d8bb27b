"""engine/data.py: the identity split, the paper-4.2 sampling, the test protocol's reference split and the cached
preprocessing of a folder of real videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import data
from engine.data import (
    ClipSampler,
    SyntheticSequences,
    VideoFolderSequences,
    is_test_identity,
    sample_indices,
    split_reference,
    train_identity_seeds,
)


@pytest.fixture(scope="module")
def tiny_source() -> SyntheticSequences:
    return SyntheticSequences.train(2, 64, n_frames=8)


def test_identity_split_is_disjoint_and_fixed() -> None:
    train, test = train_identity_seeds(50), data.test_identity_seeds(6)  # not imported: pytest would collect it
    assert len(train) == 50 and len(set(train)) == 50
    assert test == [9, 19, 29, 39, 49, 59]
    assert not set(train) & set(test)
    assert all(is_test_identity(s) for s in test) and not any(is_test_identity(s) for s in train)
    # Asking for more training identities never moves a held-out one into training.
    assert not set(train_identity_seeds(500)) & set(data.test_identity_seeds(50))


def test_sample_indices_are_consecutive_inputs_and_other_references() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        inputs, refs = sample_indices(rng, 10, 2, 3)
        assert inputs[1] == inputs[0] + 1 and 0 <= inputs[0] <= 8
        assert len(set(refs.tolist())) == 3 and not set(refs.tolist()) & set(inputs.tolist())
    with pytest.raises(ValueError, match="cannot give"):
        sample_indices(rng, 4, 2, 3)


def test_sampler_batches_come_from_one_sequence(tiny_source: SyntheticSequences) -> None:
    batch = ClipSampler(tiny_source, m=3, n_frames=2, seed=1).sample(3)
    assert batch.labels.shape == (3, 2, 3, 64, 64) and batch.images.shape == (3, 2, 3, 64, 64)
    assert batch.ref_images.shape == (3, 3, 3, 64, 64) and batch.ref_labels.shape == (3, 3, 3, 64, 64)
    assert batch.landmarks.shape == (3, 2, 478, 2) and batch.ref_landmarks.shape == (3, 3, 478, 2)
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and 0 <= batch.labels.min() <= batch.labels.max() <= 1
    # Every reference of a sample is a frame of the sequence its inputs come from.
    for b in range(3):
        seqs = [tiny_source.get(i) for i in range(len(tiny_source))]
        frames = [torch.from_numpy(s.images).float() / 127.5 - 1 for s in seqs]
        owner = [i for i, f in enumerate(frames) if any(torch.equal(batch.images[b, 0], x.permute(2, 0, 1))
                                                         for x in f)]
        assert len(owner) == 1
        for r in batch.ref_images[b]:
            assert any(torch.equal(r, x.permute(2, 0, 1)) for x in frames[owner[0]])
    # Seeded: the same seed gives the same batch.
    again = ClipSampler(tiny_source, m=3, n_frames=2, seed=1).sample(3)
    assert torch.equal(again.images, batch.images) and torch.equal(again.ref_images, batch.ref_images)


def test_synthetic_sequences_are_deterministic_and_cached(tiny_source: SyntheticSequences) -> None:
    a = tiny_source.get(1)
    assert tiny_source.get(1) is a  # LRU hit
    fresh = SyntheticSequences.train(2, 64, n_frames=8).get(1)
    assert np.array_equal(fresh.images, a.images) and np.array_equal(fresh.labels, a.labels)
    assert a.labels.dtype == np.uint8 and a.labels.shape == (8, 3, 64, 64) and a.poses.shape == (8, 3)
    with pytest.raises(IndexError):
        tiny_source.get(2)


def test_split_reference_is_the_first_fifth() -> None:
    ref, drive = split_reference(50)
    assert ref.tolist() == list(range(10)) and drive.tolist() == list(range(10, 50))
    ref, drive = split_reference(10)  # at least 3 references
    assert len(ref) == 3 and drive[0] == 3
    with pytest.raises(ValueError):
        split_reference(3)


@pytest.mark.slow
def test_video_folder_is_tracked_once_and_split(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.synthetic import random_identity, sequence, write_video

    for split, seed in (("train", 1), ("test", 9)):
        (tmp_path / split).mkdir()
        write_video(tmp_path / split / f"person{seed}.mp4", sequence(random_identity(seed), 6, seed=seed, size=256))
    train = VideoFolderSequences(tmp_path, 64, split="train", cache_dir=tmp_path / "cache")
    assert [p.name for p in train.videos] == ["person1.mp4"]
    paths = train.preprocess()
    assert len(paths) == 1 and paths[0].exists()
    mtime = paths[0].stat().st_mtime_ns
    seq = train.get(0)
    assert seq.images.shape[1:] == (64, 64, 3) and len(seq) >= 5 and seq.labels.shape[1:] == (3, 64, 64)
    assert seq.landmarks.shape[1:] == (478, 3) and seq.poses.shape[1] == 3
    # A second reader reuses the cache file instead of tracking the video again.
    again = VideoFolderSequences(tmp_path, 64, split="train", cache_dir=tmp_path / "cache")
    assert again.preprocess() == paths and paths[0].stat().st_mtime_ns == mtime
    test = VideoFolderSequences(tmp_path, 64, split="test", cache_dir=tmp_path / "cache")
    assert [p.name for p in test.videos] == ["person9.mp4"] and len(test) == 1
