"""Training and test data: talking-head sequences, and batches sampled from them as in the paper (section 4.2).

Two sources of sequences, one interface (``SequenceSource``: ``len`` and ``get(i) -> SequenceData``):

- ``SyntheticSequences``: procedural talking heads (engine/synthetic.py) rendered on the fly and kept in a small
  in-memory LRU. Identities are split by a fixed rule on their seed (``is_test_identity``: seed % 10 == 9 is held
  out), so no test identity is ever seen in training, whatever the number of identities asked for.
- ``VideoFolderSequences``: a folder of real talking-head videos (FaceForensics-style: one person per video).
  Each video is decoded and tracked once by engine/faces.py into crops, landmarks and poses, cached on disk as
  one ``.npz`` per video (keyed by the video's name, size and mtime, and the crop size), and reused afterwards.
  The split: ``train/`` and ``test/`` sub-folders when the folder has them, otherwise a stable hash of the file
  name (the same rule as the synthetic seeds: 1 in 10 held out).

Sampling (paper 4.2: "we randomly choose the input image and reference images in the same sequence"):
``ClipSampler`` draws a sequence, ``n_frames`` consecutive input frames (the first is generated without a previous
frame, each next one with the previous output: few-shot vid2vid's recurrent training) and m references from the
same sequence, never one of the input frames.

Test protocol (paper 4.2): the first 20% of each test sequence is its reference sequence (``split_reference``);
the model drives the remaining frames, with references picked at random from it or by reference selection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from engine.labels import draw_labels

#: One identity seed in HOLDOUT_MODULUS is held out for testing (seed % HOLDOUT_MODULUS == HOLDOUT_REMAINDER).
HOLDOUT_MODULUS = 10
HOLDOUT_REMAINDER = 9
#: Share of a test sequence that is its reference sequence (paper 4.2).
REFERENCE_FRACTION = 0.2
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
CACHE_FORMAT = 1


def is_test_identity(seed: int) -> bool:
    """The fixed split rule for synthetic identities: seeds 9, 19, 29, ... are held out."""
    return seed % HOLDOUT_MODULUS == HOLDOUT_REMAINDER


def train_identity_seeds(n: int) -> list[int]:
    """The first ``n`` seeds that are not held out."""
    return [s for s in range(n * HOLDOUT_MODULUS // (HOLDOUT_MODULUS - 1) + 2) if not is_test_identity(s)][:n]


def test_identity_seeds(n: int) -> list[int]:
    """The first ``n`` held-out seeds (9, 19, ...)."""
    return [HOLDOUT_REMAINDER + HOLDOUT_MODULUS * i for i in range(n)]


@dataclasses.dataclass
class SequenceData:
    """One talking-head sequence as the model sees it (crops of ``size`` pixels)."""

    name: str
    images: np.ndarray  # (T, S, S, 3) uint8 RGB
    labels: np.ndarray  # (T, L, S, S) uint8: draw_labels' [0, 1] quantised to 0..255 (4x smaller than float32)
    landmarks: np.ndarray  # (T, 478, 3) float32, crop pixels
    poses: np.ndarray  # (T, 3) float32 pitch, yaw, roll (degrees)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def slice(self, index: Sequence[int] | np.ndarray) -> SequenceData:
        idx = np.asarray(index, dtype=np.int64)
        return SequenceData(self.name, self.images[idx], self.labels[idx], self.landmarks[idx], self.poses[idx])


def quantise_labels(labels: np.ndarray) -> np.ndarray:
    """(T, L, S, S) float in [0, 1] -> uint8 (the anti-aliased strokes need no more than 8 bits)."""
    return np.clip(np.rint(labels * 255.0), 0, 255).astype(np.uint8)


def make_sequence(name: str, images: np.ndarray, landmarks: np.ndarray, poses: np.ndarray) -> SequenceData:
    """Draw the labels of a sequence (engine/labels.py) and wrap it."""
    size = int(images.shape[1])
    return SequenceData(name, images, quantise_labels(draw_labels(landmarks, size)), landmarks.astype(np.float32),
                        poses.astype(np.float32))


class SequenceSource(Protocol):
    def __len__(self) -> int: ...

    def get(self, i: int) -> SequenceData: ...


class _LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[int, SequenceData] = OrderedDict()

    def get(self, key: int) -> SequenceData | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: int, item: SequenceData) -> None:
        self._items[key] = item
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class SyntheticSequences:
    """``clips_per_identity`` clips of ``n_frames`` for each identity seed, rendered on first use.

    Clip j of identity s follows ``synthetic.motion`` with seed ``s * 1000 + j + (split offset)``, so train and
    test clips never share a motion either. At 64 px a 24-frame clip costs about 0.2-0.4 s to render and 0.7 MB
    to keep; the default cache holds every clip of a few hundred identities.
    """

    def __init__(self, seeds: Sequence[int], size: int, n_frames: int = 24, clips_per_identity: int = 1,
                 cache_clips: int = 512, motion_offset: int = 0) -> None:
        if n_frames < 2:
            raise ValueError("a sequence needs at least 2 frames")
        self.seeds = list(seeds)
        self.size, self.n_frames, self.clips = size, n_frames, clips_per_identity
        self.motion_offset = motion_offset
        self._cache = _LRU(cache_clips)

    @classmethod
    def train(cls, n_identities: int, size: int, **kw: int) -> SyntheticSequences:
        return cls(train_identity_seeds(n_identities), size, **kw)

    @classmethod
    def test(cls, n_identities: int, size: int, **kw: int) -> SyntheticSequences:
        # A different motion seed range from training: held-out identities in unseen motion.
        return cls(test_identity_seeds(n_identities), size, motion_offset=500, **kw)

    def __len__(self) -> int:
        return len(self.seeds) * self.clips

    def get(self, i: int) -> SequenceData:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        from engine.synthetic import random_identity, sequence

        seed, j = self.seeds[i // self.clips], i % self.clips
        clip = sequence(random_identity(seed), self.n_frames, seed=seed * 1000 + j + self.motion_offset, size=self.size)
        data = make_sequence(f"synthetic-{seed}-{j}", clip.images, clip.landmarks, clip.poses)
        self._cache.put(i, data)
        return data


def _split_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    if len(rel) > 1 and rel[0] in ("train", "test"):
        return rel[0]
    # Stable across runs and machines (Python's hash() is salted per process).
    return "test" if zlib.crc32(path.name.encode()) % HOLDOUT_MODULUS == HOLDOUT_REMAINDER else "train"


class VideoFolderSequences:
    """Real talking-head videos under ``root``, preprocessed once into ``cache_dir`` (default ``root/.aca-cache``).

    ``split`` is "train", "test" or "all". ``fps`` resamples the videos while decoding (None: native rate).
    Videos in which no face is found are skipped (and listed in ``skipped``).
    """

    def __init__(self, root: Path, size: int, split: str = "train", cache_dir: Path | None = None,
                 fps: float | None = 25.0, cache_clips: int = 64) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
        self.root, self.size, self.fps = Path(root), size, fps
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder of videos")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".aca-cache"
        videos = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                        and self.cache_dir not in p.parents)
        self.videos = [p for p in videos if split == "all" or _split_of(p, self.root) == split]
        self.skipped: list[Path] = []
        self._cache = _LRU(cache_clips)
        self._paths: list[Path] = []

    def cache_path(self, video: Path) -> Path:
        st = video.stat()
        key = f"{video.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}|{self.size}|{self.fps}|{CACHE_FORMAT}"
        return self.cache_dir / f"{video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"

    def preprocess(self) -> list[Path]:
        """Track every video not yet cached; return the cache files of those with a face (in video order)."""
        from engine.errors import NoFaceFound
        from engine.faces import track_video
        from engine.video import iter_frames

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        paths, self.skipped = [], []
        for video in self.videos:
            out = self.cache_path(video)
            if not out.exists():
                try:
                    with iter_frames(video, fps=self.fps) as frames:
                        track = track_video(frames, size=self.size, fps=self.fps or frames.fps or 25.0)
                except NoFaceFound:
                    self.skipped.append(video)
                    continue
                tmp = out.with_suffix(".tmp.npz")
                np.savez(tmp, images=track.crops, landmarks=track.landmarks, poses=track.poses)
                tmp.replace(out)  # atomic: an interrupted run never leaves a half-written cache file
            paths.append(out)
        self._paths = paths
        return paths

    def __len__(self) -> int:
        if not self._paths:
            self.preprocess()
        return len(self._paths)

    def get(self, i: int) -> SequenceData:
        if not self._paths:
            self.preprocess()
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        with np.load(self._paths[i]) as z:
            data = make_sequence(self._paths[i].stem, z["images"], z["landmarks"], z["poses"])
        self._cache.put(i, data)
        return data


# ---------------------------------------------------------------------------------------------------- batches


def to_image_tensor(images: np.ndarray) -> Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32 in [-1, 1] (the model's image range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0).movedim(-1, -3)


def to_label_tensor(labels: np.ndarray) -> Tensor:
    """(..., L, S, S) uint8 -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(labels)).float().div(255.0)


@dataclasses.dataclass
class Batch:
    """B samples of ``n_frames`` consecutive input frames and m references from the same sequence."""

    labels: Tensor  # (B, T, L, H, W) in [0, 1]: I_l^t
    images: Tensor  # (B, T, 3, H, W) in [-1, 1]: ground truth
    landmarks: Tensor  # (B, T, 478, 2) crop pixels (for the landmark flow loss)
    ref_images: Tensor  # (B, m, 3, H, W): R_a
    ref_labels: Tensor  # (B, m, L, H, W): R_l
    ref_landmarks: Tensor  # (B, m, 478, 2)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    @property
    def n_frames(self) -> int:
        return int(self.labels.shape[1])


def sample_indices(rng: np.random.Generator, length: int, n_frames: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_frames`` consecutive input frames and m distinct reference frames outside them, from ``length`` frames."""
    if length < n_frames + m:
        raise ValueError(f"a sequence of {length} frames cannot give {n_frames} inputs and {m} other references")
    t0 = int(rng.integers(0, length - n_frames + 1))
    inputs = np.arange(t0, t0 + n_frames)
    others = np.setdiff1d(np.arange(length), inputs)
    return inputs, np.sort(rng.choice(others, size=m, replace=False))


class ClipSampler:
    """Seeded batches from a ``SequenceSource`` (paper 4.2). The generator state is part of a training checkpoint."""

    def __init__(self, source: SequenceSource, m: int, n_frames: int = 2, seed: int = 0) -> None:
        if len(source) == 0:
            raise ValueError("the sequence source is empty")
        self.source, self.m, self.n_frames = source, m, n_frames
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> Batch:
        parts: list[tuple[SequenceData, SequenceData]] = []
        for _ in range(batch_size):
            seq = self.source.get(int(self.rng.integers(len(self.source))))
            inputs, refs = sample_indices(self.rng, len(seq), self.n_frames, self.m)
            parts.append((seq.slice(inputs), seq.slice(refs)))
        return Batch(
            labels=to_label_tensor(np.stack([p[0].labels for p in parts])),  # (B, T, L, S, S)
            images=to_image_tensor(np.stack([p[0].images for p in parts])),  # (B, T, S, S, 3) -> (B, T, 3, S, S)
            landmarks=torch.from_numpy(np.stack([p[0].landmarks[..., :2] for p in parts])),
            ref_images=to_image_tensor(np.stack([p[1].images for p in parts])),
            ref_labels=to_label_tensor(np.stack([p[1].labels for p in parts])),
            ref_landmarks=torch.from_numpy(np.stack([p[1].landmarks[..., :2] for p in parts])),
        )

    def state(self) -> dict[str, object]:
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, object]) -> None:
        self.rng.bit_generator.state = state


def split_reference(length: int, fraction: float = REFERENCE_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Paper 4.2 test protocol: the first ``fraction`` of a test sequence (at least 3 frames) is its reference
    sequence; the rest is driven. Returns (reference indices, driven indices)."""
    n_ref = max(3, int(round(length * fraction)))
    if n_ref >= length:
        raise ValueError(f"a test sequence of {length} frames leaves nothing to drive after {n_ref} references")
    return np.arange(n_ref), np.arange(n_ref, length)


__all__ = [
    "Batch", "ClipSampler", "SequenceData", "SequenceSource", "SyntheticSequences", "VideoFolderSequences",
    "is_test_identity", "make_sequence", "sample_indices", "split_reference", "test_identity_seeds",
    "to_image_tensor", "to_label_tensor", "train_identity_seeds",
]
