"""Training losses of few-shot vid2vid (Wang et al. 2019), which ACA trains with unchanged (paper section 4.2).

Weights follow few-shot vid2vid (REFERENCES.md): hinge GAN x1 on a multi-scale PatchGAN conditioned on the label,
feature matching x10, flow x10, warp x10, mask x10. What differs, and why:

- No VGG perceptual loss by default: its weights would have to be downloaded. ``VGGPerceptualLoss`` takes a local
  torchvision-format VGG19 state dict when the user has one. In its place an L1 image loss x10 on the output and
  on the generator's raw image I_int (which otherwise learns only through the mask).
- The flow teacher: few-shot vid2vid regresses its flows onto FlowNet2's, which needs downloaded weights. Ours is
  the landmarks: at every target landmark the flow must point to the same landmark in the source frame
  (``landmark_flow_loss``), a sparse but exact teacher for synthetic data and mediapipe-accurate for real videos.
  Dense flow between landmarks is learnt through the warp loss.
- Warp-confidence: few-shot vid2vid derives it from FlowNet2's warp error; ours is the warp error itself
  (``warp_confidence``: 1 where the warped source is within ``CONF_THRESHOLD`` of the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

#: Per-pixel L1 (images in [-1, 1], mean over channels) under which a warp counts as good: 0.1 is 5% of the range.
CONF_THRESHOLD = 0.1

DEFAULT_WEIGHTS: dict[str, float] = {
    "gan": 1.0, "fm": 10.0, "l1": 10.0, "l1_raw": 10.0, "warp": 10.0, "flow": 10.0, "mask": 10.0, "vgg": 10.0,
}


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD / few-shot vid2vid): stride-2 4x4 convs with spectral norm, LeakyReLU(0.2), one score
    per patch. Returns every layer's output, for feature matching; the last is the score map (B, 1, h, w)."""

    def __init__(self, in_nc: int, ndf: int = 32, n_layers: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(spectral_norm(nn.Conv2d(in_nc, ndf, 4, 2, 2)), nn.LeakyReLU(0.2))]
        ch = ndf
        for i in range(1, n_layers):
            nxt = min(ch * 2, 512)
            stride = 2 if i < n_layers - 1 else 1
            layers.append(nn.Sequential(spectral_norm(nn.Conv2d(ch, nxt, 4, stride, 2)), nn.LeakyReLU(0.2)))
            ch = nxt
        layers.append(spectral_norm(nn.Conv2d(ch, 1, 4, 1, 2)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``n_scales`` PatchGANs on the input at full, 1/2, 1/4 ... resolution, conditioned on the label:
    D(cat(I_l, image))."""

    def __init__(self, label_nc: int, image_nc: int = 3, ndf: int = 32, n_layers: int = 4, n_scales: int = 2) -> None:
        super().__init__()
        self.nets = nn.ModuleList(PatchDiscriminator(label_nc + image_nc, ndf, n_layers) for _ in range(n_scales))

    def forward(self, label: Tensor, image: Tensor) -> list[list[Tensor]]:
        x = torch.cat([label, image], dim=1)  # (B, L + 3, H, W)
        outs = []
        for i, net in enumerate(self.nets):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)  # halves H, W
            outs.append(net(x))
        return outs


def hinge_d_loss(real: Sequence[Sequence[Tensor]], fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """Discriminator hinge loss, summed over scales: E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    loss = real[0][-1].new_zeros(())
    for r, f in zip(real, fake, strict=True):
        loss = loss + F.relu(1.0 - r[-1]).mean() + F.relu(1.0 + f[-1]).mean()
    return loss


def hinge_g_loss(fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """Generator hinge loss, summed over scales: -E[D(fake)]."""
    return sum((-f[-1].mean() for f in fake), fake[0][-1].new_zeros(()))


def feature_matching_loss(real: Sequence[Sequence[Tensor]], fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """pix2pixHD's feature matching: L1 between D's intermediate features of real and fake, averaged over layers
    and scales (the real features are targets: detached)."""
    loss = fake[0][0].new_zeros(())
    n = 0
    for r_feats, f_feats in zip(real, fake, strict=True):
        for r, f in zip(r_feats[:-1], f_feats[:-1], strict=True):
            loss = loss + F.l1_loss(f, r.detach())
            n += 1
    return loss / max(n, 1)


def warp_confidence(warped: Tensor, target: Tensor, threshold: float = CONF_THRESHOLD) -> Tensor:
    """(B, 3, H, W) x 2 -> (B, 1, H, W) in {0, 1}: 1 where the warped source matches the target (no gradient)."""
    with torch.no_grad():
        return ((warped - target).abs().mean(dim=1, keepdim=True) < threshold).to(warped.dtype)


def mask_loss(mask: Tensor, warped: Tensor, target: Tensor) -> Tensor:
    """Push the matting mask towards the warped source where its warp is good and towards the generated image where
    it is not. ``mask`` is the weight of the generated side (out = gen * mask + warped * (1 - mask)), so its target
    is ``1 - confidence``."""
    return F.l1_loss(mask, 1.0 - warp_confidence(warped, target))


def sample_flow(flow: Tensor, points: Tensor) -> Tensor:
    """flow (B, 2, H, W) in pixels at points (B, N, 2) in pixels (x, y; centres on integers) -> (B, N, 2)."""
    H, W = flow.shape[-2:]
    grid = torch.stack([points[..., 0] * 2 / (W - 1) - 1, points[..., 1] * 2 / (H - 1) - 1], dim=-1)  # align_corners
    out = F.grid_sample(flow, grid.unsqueeze(1).to(flow.dtype), align_corners=True, padding_mode="border")
    return out.squeeze(2).transpose(1, 2)  # (B, 2, 1, N) -> (B, N, 2)


def landmark_flow_loss(flow: Tensor, target_lm: Tensor, source_lm: Tensor) -> Tensor:
    """The landmark teacher: at each target landmark the flow (target -> source sampling offset, engine.model.flow
    .warp) must equal source - target. L1 in units of half the image size (the warp grid's units), so the loss does
    not grow with the resolution. Landmarks outside the frame are ignored.

    flow (B, 2, H, W); target_lm, source_lm (B, N, 2) pixels.
    """
    H, W = flow.shape[-2:]
    pred = sample_flow(flow, target_lm)  # (B, N, 2)
    want = source_lm - target_lm
    inside = ((target_lm >= 0) & (target_lm <= torch.tensor([W - 1, H - 1], device=flow.device))).all(-1)  # (B, N)
    scale = torch.tensor([2.0 / (W - 1), 2.0 / (H - 1)], device=flow.device)
    err = ((pred - want) * scale).abs().sum(-1)  # (B, N)
    return (err * inside).sum() / inside.sum().clamp(min=1)


class VGGPerceptualLoss(nn.Module):
    """Few-shot vid2vid's VGG19 loss (weights 1/32 .. 1 on relu1_1 .. relu5_1), from a LOCAL torchvision-format
    ``vgg19`` state dict (keys ``features.N.weight``). Never downloads anything."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
    TAPS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in torchvision's ``features``
    LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    mean: Tensor
    std: Tensor

    def __init__(self, weights_path: Path) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"VGG19 weights not found at {path}: give a local torchvision vgg19 state dict")
        layers: list[nn.Module] = []
        ch = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                ch = int(v)
        self.features = nn.Sequential(*layers[: self.TAPS[-1] + 1])
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= self.TAPS[-1]})
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        x = torch.cat([fake, real]) * 0.5 + 0.5  # [-1, 1] -> [0, 1]
        x = (x - self.mean) / self.std
        loss = x.new_zeros(())
        k = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                f, r = x.chunk(2)
                loss = loss + self.LAYER_WEIGHTS[k] * F.l1_loss(f, r.detach())
                k += 1
        return loss


__all__ = [
    "DEFAULT_WEIGHTS", "MultiscaleDiscriminator", "PatchDiscriminator", "VGGPerceptualLoss", "feature_matching_loss",
    "hinge_d_loss", "hinge_g_loss", "landmark_flow_loss", "mask_loss", "sample_flow", "warp_confidence",
]
