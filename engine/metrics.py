"""Evaluation (paper section 4.3, Table 1; ``aca eval``): PSNR, SSIM, a temporal measure, and FID / FVD from LOCAL
feature-network weights.

- ``psnr``: 10 log10(MAX^2 / MSE) per frame, averaged over frames.
- ``ssim``: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  covariances, averaged over the valid window positions and channels; equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
- ``temporal_error``: how far the output's frame-to-frame change is from the ground truth's,
  mean |(out_t - out_{t-1}) - (gt_t - gt_{t-1})| in 8-bit levels (0 for a perfect video; flicker and lag raise it).
- FID and FVD (Fréchet distances of Inception-v3 pool features of frames, and of I3D features of 16-frame clips).
  The networks are never downloaded: ``--inception`` and ``--i3d`` take local TorchScript files with the calling
  convention of NVlabs' metric networks (stylegan2-ada-pytorch ``inception-2015-12-05.pt``: uint8 (N, 3, H, W) ->
  ``net(x, return_features=True)`` (N, 2048); StyleGAN-V ``i3d_torchscript.pt``: float (N, 3, T, H, W) in [-1, 1]
  -> ``net(x, rescale=False, resize=True, return_features=True)`` (N, 400)). Without them ``MetricWeightsMissing``.
  With the few test sequences a CPU run affords, FID/FVD are dominated by sampling noise: read them as relative.

Test protocol (paper 4.2): the first 20% of every test sequence is its reference sequence (engine.data
.split_reference); the model drives the rest frame by frame, each frame with the previous output (the first without
one). References: ``random``, m frames of the reference sequence drawn once per sequence from a generator seeded by
(seed, sequence index), so two models evaluated with one seed see the same reference sets; or ``select``, the
appearance-map selection (paper 3.2, engine/selection.py) per frame from the driving frame's head pose.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.data import (
    SequenceData,
    SequenceSource,
    SyntheticSequences,
    VideoFolderSequences,
    split_reference,
    to_image_tensor,
    to_label_tensor,
)
from engine.model.attention import Memory
from engine.model.vid2vid import ACAVid2Vid

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius = int(3.5 * 1.5 + 0.5) = 5: 11 taps, as scikit-image
SSIM_K1, SSIM_K2 = 0.01, 0.03
FVD_CLIP = 16


class MetricWeightsMissing(FileNotFoundError):
    """FID or FVD was asked for without a local file of the feature network's weights."""


# ------------------------------------------------------------------------------------------------ frame metrics


def _as_float(x: np.ndarray | Tensor) -> Tensor:
    return (torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x).to(torch.float64)


def psnr(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, data_range: float = 255.0) -> float:
    """PSNR in dB of one image (any shape; ``inf`` when identical)."""
    mse = float(((_as_float(pred) - _as_float(target)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, data_range: float = 255.0) -> float:
    """SSIM of one (H, W, C) or (H, W) image pair (module docstring); 1 for identical images."""
    a, b = _as_float(pred), _as_float(target)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 2:
        a, b = a[..., None], b[..., None]
    x = torch.stack([a, b]).permute(0, 3, 1, 2)  # (2, H, W, C) -> (2, C, H, W)
    g = _gaussian_taps()
    k = len(g)
    if min(x.shape[-2:]) < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels")
    C = x.shape[1]

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, 'valid' positions only: (N, C, H, W) -> (N, C, H-k+1, W-k+1)
        t = F.conv2d(t, g.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)
        return F.conv2d(t, g.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)

    mu = blur(x)
    mu_a, mu_b = mu[0], mu[1]
    var_a = blur(x[:1] ** 2)[0] - mu_a**2
    var_b = blur(x[1:] ** 2)[0] - mu_b**2
    cov = blur((x[0] * x[1])[None])[0] - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def temporal_error(pred: np.ndarray, target: np.ndarray) -> float:
    """(T, H, W, 3) uint8 videos -> mean |Δpred - Δtarget| over consecutive frames, in 8-bit levels."""
    if len(pred) < 2:
        return 0.0
    p, t = _as_float(pred), _as_float(target)
    return float(((p[1:] - p[:-1]) - (t[1:] - t[:-1])).abs().mean())


# ------------------------------------------------------------------------------------------------- FID and FVD


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _load_torchscript(path: Path | None, what: str, flag: str) -> torch.jit.ScriptModule:
    if path is None or not Path(path).is_file():
        where = f" ({path} does not exist)" if path is not None else ""
        raise MetricWeightsMissing(
            f"{what} needs local weights{where}: pass {flag} PATH to a TorchScript file (see engine/metrics.py). "
            "Nothing is downloaded."
        )
    return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def inception_features(images: np.ndarray, weights: Path | None, batch: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2048) with NVlabs' Inception TorchScript (it resizes to 299 itself)."""
    net = _load_torchscript(weights, "FID", "--inception")
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
        out.append(net(x, return_features=True).double().numpy())
    return np.concatenate(out)


@torch.no_grad()
def i3d_features(videos: list[np.ndarray], weights: Path | None, clip: int = FVD_CLIP) -> np.ndarray:
    """Videos (T, H, W, 3) uint8 -> one (400,) I3D feature per non-overlapping ``clip``-frame window."""
    net = _load_torchscript(weights, "FVD", "--i3d")
    out = []
    for video in videos:
        for s in range(0, len(video) - clip + 1, clip):
            x = to_image_tensor(video[s : s + clip]).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, H, W) in [-1, 1]
            out.append(net(x, rescale=False, resize=True, return_features=True).double().numpy())
    if len(out) < 2:
        raise ValueError(f"FVD needs at least 2 clips of {clip} frames; use longer test sequences")
    return np.concatenate(out)


def fid(real: np.ndarray, fake: np.ndarray, weights: Path | None) -> float:
    return frechet_distance(*feature_statistics(inception_features(real, weights)),
                            *feature_statistics(inception_features(fake, weights)))


def fvd(real: list[np.ndarray], fake: list[np.ndarray], weights: Path | None) -> float:
    return frechet_distance(*feature_statistics(i3d_features(real, weights)),
                            *feature_statistics(i3d_features(fake, weights)))


# ---------------------------------------------------------------------------------------------------- protocol


def test_source(data: str, size: int, identities: int = 8, frames: int = 40) -> SequenceSource:
    """Held-out sequences: synthetic identities of the test split, or the test split of a video folder."""
    if data == "synthetic":
        return SyntheticSequences.test(identities, size, n_frames=frames)
    return VideoFolderSequences(Path(data), size, split="test")


@dataclasses.dataclass
class EvalResult:
    refs: str
    m: int
    per_sequence: list[dict[str, Any]]
    fid: float | None = None
    fvd: float | None = None
    outputs: list[np.ndarray] = dataclasses.field(default_factory=list, repr=False)  # (T, S, S, 3) per sequence
    truths: list[np.ndarray] = dataclasses.field(default_factory=list, repr=False)
    ref_sets: list[list[tuple[int, ...]]] = dataclasses.field(default_factory=list, repr=False)

    def mean(self, key: str) -> float:
        """Frame-weighted mean over sequences (every driven frame counts once)."""
        n = np.array([s["frames"] for s in self.per_sequence], dtype=np.float64)
        return float((np.array([s[key] for s in self.per_sequence]) * n).sum() / n.sum())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refs": self.refs, "m": self.m, "sequences": len(self.per_sequence),
                               "frames": int(sum(s["frames"] for s in self.per_sequence))}
        for key in ("psnr", "ssim", "temporal"):
            out[key] = round(self.mean(key), 4)
        if self.fid is not None:
            out["fid"] = round(self.fid, 3)
        if self.fvd is not None:
            out["fvd"] = round(self.fvd, 3)
        return out


def reference_sets(seq: SequenceData, refs: str, m: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                            list[tuple[int, ...]]]:
    """Driven frame indices and, per driven frame, the reference set (indices into the reference sequence)."""
    ref_idx, drive_idx = split_reference(len(seq))
    if m > len(ref_idx):
        raise ValueError(f"{m} references wanted but the reference sequence has {len(ref_idx)} frames")
    if refs == "random":
        chosen = tuple(int(i) for i in np.sort(rng.choice(len(ref_idx), size=m, replace=False)))
        return drive_idx, [chosen] * len(drive_idx)
    if refs == "select":
        from engine.selection import AppearanceMap

        amap = AppearanceMap(seq.poses[ref_idx])
        sel = amap.select_many(seq.poses[drive_idx], k=m)  # (T, m)
        return drive_idx, [tuple(int(i) for i in row) for row in sel]
    raise ValueError(f"refs must be 'random' or 'select', not {refs!r}")


@torch.no_grad()
def drive_sequence(model: ACAVid2Vid, seq: SequenceData, drive_idx: np.ndarray,
                   sets: list[tuple[int, ...]]) -> np.ndarray:
    """Synthesize the driven frames one by one, each with the previous output; (T, S, S, 3) uint8."""
    n_ref = int(min(drive_idx))  # the reference sequence is the prefix (split_reference)
    ref_images = to_image_tensor(seq.images[:n_ref]).unsqueeze(0)  # (1, n, 3, S, S)
    ref_labels = to_label_tensor(seq.labels[:n_ref]).unsqueeze(0)  # (1, n, L, S, S)
    feats = model.encode_references(ref_images, ref_labels)  # per identity: every reference frame once
    memories: dict[tuple[int, ...], Memory] = {}
    prev_image = prev_label = None
    frames = []
    for t, refs in zip(drive_idx, sets, strict=True):
        if refs not in memories:  # per reference set
            memories[refs] = model.extract(feats.select_refs(list(refs)))
        idx = torch.tensor(refs)
        label = to_label_tensor(seq.labels[t : t + 1])  # (1, L, S, S)
        out = model.synthesize(label, memories[refs], ref_images[:, idx], ref_labels[:, idx], prev_image, prev_label)
        prev_image, prev_label = out.image, label
        frames.append(out.image)
    images = torch.cat(frames).clamp(-1, 1)  # (T, 3, S, S)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def evaluate_model(model: ACAVid2Vid, source: SequenceSource, refs: str = "random", m: int | None = None,
                   seed: int = 0, inception: Path | None = None, i3d: Path | None = None) -> EvalResult:
    """The paper's test protocol over every sequence of ``source`` (module docstring)."""
    model.eval()
    m = m or model.cfg.n_refs
    result = EvalResult(refs=refs, m=m, per_sequence=[])
    for i in range(len(source)):
        seq = source.get(i)
        drive_idx, sets = reference_sets(seq, refs, m, np.random.default_rng([seed, i]))
        out = drive_sequence(model, seq, drive_idx, sets)
        truth = seq.images[drive_idx]
        result.per_sequence.append({
            "name": seq.name, "frames": len(out),
            "psnr": float(np.mean([psnr(o, g) for o, g in zip(out, truth, strict=True)])),
            "ssim": float(np.mean([ssim(o, g) for o, g in zip(out, truth, strict=True)])),
            "temporal": temporal_error(out, truth),
        })
        result.outputs.append(out)
        result.truths.append(truth)
        result.ref_sets.append(sets)
    if inception is not None:
        result.fid = fid(np.concatenate(result.truths), np.concatenate(result.outputs), inception)
    if i3d is not None:
        result.fvd = fvd(result.truths, result.outputs, i3d)
    return result


__all__ = [
    "EvalResult", "MetricWeightsMissing", "drive_sequence", "evaluate_model", "fid", "frechet_distance", "fvd",
    "i3d_features", "inception_features", "psnr", "reference_sets", "ssim", "temporal_error", "test_source",
]
