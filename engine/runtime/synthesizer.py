"""The Synthesizer: drives identities frame by frame, batching many streams into one forward pass.

Per frame (DESIGN.md section 4): pose from the driving landmarks -> reference set from the identity's appearance
map (paper 3.2) -> bases for that set (LRU-cached per (identity, model, reference set)) -> one batched synthesis
with each stream's previous frame -> uint8 frames. Caches follow lifetimes: encoder features live in the
IdentityAssets (per identity), bases in the LRU (per reference set), previous frames in StreamState (per stream).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.errors import InvalidLandmarks
from engine.faces import CropSmoother, crop_box, head_pose, to_crop, track_video, validate_landmarks
from engine.labels import draw_label
from engine.model.attention import Memory
from engine.runtime.backends import Backend, make_backend
from engine.runtime.checkpoint import load_checkpoint, random_model
from engine.runtime.identity import IdentityAssets
from engine.video import DecodeLimits, Source, iter_frames


@dataclass
class StreamState:
    """A stream's temporal state: its previous output frame and label (for f_p), as model tensors."""

    prev_image: Tensor | None = None  # (3, S, S) in [-1, 1]
    prev_label: Tensor | None = None  # (L, S, S)
    frames: int = 0

    def reset(self) -> None:
        self.prev_image = self.prev_label = None
        self.frames = 0


@dataclass
class FrameRequest:
    identity_id: str
    assets: IdentityAssets
    landmarks: np.ndarray  # (478, 3) in the assets' crop pixels
    state: StreamState


@dataclass
class RenderedFrame:
    image: np.ndarray  # (S, S, 3) uint8
    ref_indices: tuple[int, ...]
    timings: dict[str, float] = field(default_factory=dict)


class BasesCache:
    """LRU of reference-set memories (B_l, B_a for compact attention) within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, tuple[int, ...]], Memory] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str, tuple[int, ...]]) -> Memory | None:
        memory = self._items.get(key)
        if memory is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return memory

    def put(self, key: tuple[str, str, tuple[int, ...]], memory: Memory) -> None:
        if key in self._items:
            return
        self._items[key] = memory
        self._bytes += memory.nbytes()
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes()

    def drop_identity(self, identity_id: str) -> None:
        for key in [k for k in self._items if k[0] == identity_id]:
            self._bytes -= self._items.pop(key).nbytes()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


def to_image_tensor(images: np.ndarray) -> Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, -3)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Synthesizer:
    """One loaded model and its caches. Not thread-safe: a worker owns one."""

    def __init__(self, backend: Backend, model_id: str, cache_bytes: int = 256 << 20) -> None:
        self.backend = backend
        self.cfg = backend.model.cfg
        self.model_id = model_id
        self.device = backend.device
        self.bases = BasesCache(cache_bytes)
        # Reference tensors per identity (images and labels as model inputs): small, reused every frame.
        self._refs: OrderedDict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = OrderedDict()
        self._max_identities = 64

    @classmethod
    def load(
        cls,
        model_path: Path | None = None,
        preset: str = "tiny",
        backend: str = "torch",
        device: str = "cpu",
        cache_bytes: int = 256 << 20,
        seed: int = 0,
    ) -> Synthesizer:
        """The model at ``model_path``, or a seeded random model of ``preset`` when there is none."""
        loaded = load_checkpoint(model_path) if model_path is not None else random_model(preset, seed)
        return cls(make_backend(backend, loaded.model, model_id=loaded.model_id, device=device), loaded.model_id,
                   cache_bytes)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # ----------------------------------------------------------------------------------------- per identity

    def encode_references(self, images: np.ndarray, labels: np.ndarray, batch: int = 16) -> tuple[np.ndarray, ...]:
        """R_a (n, S, S, 3) uint8 and R_l (n, L, S, S) -> X_a, X_l (n, c, h, w) float32, in chunks of ``batch``."""
        xs_a, xs_l = [], []
        for i in range(0, len(images), batch):
            X_a, X_l = self.backend.encode(
                to_image_tensor(images[i : i + batch]).to(self.device),
                torch.from_numpy(labels[i : i + batch]).float().to(self.device),
            )
            xs_a.append(X_a.float().cpu().numpy())
            xs_l.append(X_l.float().cpu().numpy())
        return np.concatenate(xs_a), np.concatenate(xs_l)

    def ensure_features(self, assets: IdentityAssets) -> IdentityAssets:
        """Re-encode the references when the assets were made by another model (features are model-specific)."""
        if assets.model_id != self.model_id:
            X_a, X_l = self.encode_references(assets.images, assets.labels.astype(np.float32))
            assets.X_a, assets.X_l, assets.model_id = X_a.astype(np.float16), X_l.astype(np.float16), self.model_id
        return assets

    def forget(self, identity_id: str) -> None:
        self.bases.drop_identity(identity_id)
        self._refs.pop(identity_id, None)

    def _identity_tensors(self, identity_id: str, assets: IdentityAssets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images (n,3,S,S), labels (n,L,S,S), X_a, X_l (n,c,h,w)) as float32 tensors, cached per identity."""
        cached = self._refs.get(identity_id)
        if cached is None:
            dev = self.device
            cached = (
                to_image_tensor(assets.images).to(dev),
                torch.from_numpy(assets.labels.astype(np.float32)).to(dev),
                torch.from_numpy(assets.X_a.astype(np.float32)).to(dev),
                torch.from_numpy(assets.X_l.astype(np.float32)).to(dev),
            )
            self._refs[identity_id] = cached
            while len(self._refs) > self._max_identities:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(identity_id)
        return cached

    # ---------------------------------------------------------------------------------------------- per frame

    def new_stream(self) -> StreamState:
        return StreamState()

    def _memory(self, identity_id: str, refs: tuple[Tensor, ...], indices: tuple[int, ...]) -> Memory:
        key = (identity_id, self.model_id, indices)
        memory = self.bases.get(key)
        if memory is None:
            idx = torch.tensor(indices, device=self.device)
            _, _, X_a, X_l = refs
            memory = self.backend.extract(X_l[idx].unsqueeze(0), X_a[idx].unsqueeze(0))  # (1, m, c, h, w)
            self.bases.put(key, memory)
        return memory

    def render(self, requests: list[FrameRequest]) -> list[RenderedFrame]:
        """One frame for each request, in one batched forward pass per group of equal reference-set size."""
        results: list[RenderedFrame | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(min(self.cfg.n_refs, req.assets.n_refs), []).append(i)
        for members in groups.values():
            for i, frame in zip(members, self._render_group([requests[i] for i in members]), strict=True):
                results[i] = frame
        return [r for r in results if r is not None]

    def _render_group(self, requests: list[FrameRequest]) -> list[RenderedFrame]:
        t_start = time.perf_counter()
        S = self.image_size
        labels, memories, ref_images, ref_labels, chosen = [], [], [], [], []
        for req in requests:
            lm = validate_landmarks(req.landmarks)
            if lm.shape != (478, 3) and lm.shape != (478, 2):
                raise InvalidLandmarks("a driving frame needs (478, 3) landmarks", shape=list(lm.shape))
            refs = self._identity_tensors(req.identity_id, req.assets)
            pose = head_pose(lm, (S, S))
            indices = tuple(int(i) for i in req.assets.appearance_map.select(pose, k=self.cfg.n_refs))
            memories.append(self._memory(req.identity_id, refs, indices))
            idx = torch.tensor(indices, device=self.device)
            ref_images.append(refs[0][idx])
            ref_labels.append(refs[1][idx])
            labels.append(torch.from_numpy(draw_label(lm, S)))
            chosen.append(indices)
        t_prep = time.perf_counter()

        label = torch.stack(labels).to(self.device)  # (B, L, S, S)
        prev_image = torch.stack(
            [
                r.state.prev_image if r.state.prev_image is not None else torch.zeros(3, S, S, device=self.device)
                for r in requests
            ]
        )
        prev_label = torch.stack(
            [r.state.prev_label if r.state.prev_label is not None else torch.zeros_like(label[0]) for r in requests]
        )
        prev_valid = torch.tensor([float(r.state.prev_image is not None) for r in requests], device=self.device)
        memory = type(memories[0]).cat(memories)
        image = self.backend.synthesize(
            label, memory, torch.stack(ref_images), torch.stack(ref_labels), prev_image, prev_label, prev_valid
        )
        t_model = time.perf_counter()

        frames = to_uint8(image)
        out = []
        for b, req in enumerate(requests):
            req.state.prev_image, req.state.prev_label = image[b].clone(), label[b]
            req.state.frames += 1
            timings = {"prepare_s": t_prep - t_start, "model_s": t_model - t_prep, "batch": float(len(requests))}
            out.append(RenderedFrame(image=frames[b], ref_indices=chosen[b], timings=timings))
        return out


# ------------------------------------------------------------------------------------------ driving landmarks


def _hold_missing(track_landmarks: np.ndarray, kept: np.ndarray, n_frames: int) -> np.ndarray:
    """Landmarks for every frame: a frame without a face repeats the nearest earlier face (or the first one)."""
    out = np.empty((n_frames, *track_landmarks.shape[1:]), dtype=np.float32)
    pos = np.searchsorted(kept, np.arange(n_frames), side="right") - 1
    out[:] = track_landmarks[np.clip(pos, 0, len(kept) - 1)]
    return out


def driving_landmarks_from_video(
    src: Source | Path, limits: DecodeLimits = DecodeLimits(), size: int = 256, fps: float | None = None
) -> tuple[np.ndarray, float]:
    """The driving face's landmarks in crop pixels, one row per decoded frame (T, 478, 3), and the frame rate.

    Frames where no face is found hold the previous face, so the output keeps the input's timing. NoFaceFound when
    no frame shows a face.
    """
    stream = iter_frames(src, limits, fps=fps)
    with stream:
        track = track_video(stream, size=size, fps=fps or 25.0)
    return _hold_missing(track.landmarks, track.kept, track.n_frames), float(stream.fps)


def landmarks_from_normalized(
    frames: np.ndarray, size: int, image_size: tuple[int, int] = (1, 1), fps: float = 25.0
) -> np.ndarray:
    """Client landmarks in mediapipe's normalised form (x, y in [0, 1] of a w x h image, z on x's scale) -> crop
    pixels (T, 478, 3), with the same smoothed crop as video ingest."""
    arr = validate_landmarks(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (478, 3):
        raise InvalidLandmarks("landmark frames must be (T, 478, 3)", shape=list(arr.shape))
    w, h = image_size
    px = arr.astype(np.float64) * np.array([w, h, w], dtype=np.float64)
    smoother = CropSmoother(fps=fps)
    return np.stack([to_crop(f, smoother(crop_box(f)), size) for f in px]).astype(np.float32)
