"""The SPADE generator that renders the intermediate image I_int^t (Huang et al. 2020, section 3.1 step 4).

As in few-shot vid2vid, the decoder starts from the attended reference bottleneck X_basis (B, c, h, w), not from
the label map; the input label I_l^t conditions every SPADE norm, resized to each scale. There is one SPADE
residual block per scale: at h, then after each of the ``cfg.feat_downsample`` 2x upsamplings, so the last block
runs at image_size. Channels follow few-shot vid2vid's ``ch[i] = min(max, ngf * 2**i)`` at i downsamplings from
full resolution (``gen_channels``).

SPADE (Park et al. 2019): ``out = norm(x) * (1 + gamma) + beta`` with a parameter-free per-sample InstanceNorm and
gamma, beta predicted from the label through a shared conv + ReLU. In the finest ``cfg.n_adaptive_layers`` blocks
the gamma and beta 1x1 convs come per sample from the weight generator (``engine.model.weight_generator``); the
other blocks have ordinary learned 3x3 convs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig
from engine.model.encoders import LEAKY_SLOPE, instance_norm
from engine.model.weight_generator import SpadeWeights, Theta, spade_modulation


def gen_channels(cfg: ModelConfig) -> list[int]:
    """Channels of the block at i downsamplings from full resolution, i = 0 .. feat_downsample."""
    return [min(cfg.gen_max_channels, cfg.ngf * 2**i) for i in range(cfg.feat_downsample + 1)]


def label_pyramid(label: Tensor, levels: int) -> list[Tensor]:
    """[label at full size, 1/2, ..., 1/2**levels] by 2x2 average pooling.

    Average pooling (not nearest) keeps thin strokes of the edge-map labels as soft values instead of dropping them.
    label (B, L, H, W) -> [(B, L, H / 2**i, W / 2**i) for i in 0..levels]
    """
    out = [label]
    for _ in range(levels):
        out.append(F.avg_pool2d(out[-1], kernel_size=2))
    return out


class SPADE(nn.Module):
    """Spatially-adaptive normalisation of x (B, norm_nc, h, w) by a label at the same size (B, L, h, w)."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int, adaptive: bool) -> None:
        super().__init__()
        self.adaptive = adaptive
        self.norm = instance_norm(norm_nc, affine=False)  # param-free, per sample
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        # Adaptive norms have no gamma/beta parameters: the weight generator provides them per sample.
        self.mlp_gamma = None if adaptive else nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = None if adaptive else nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x: Tensor, label: Tensor, weights: SpadeWeights | None = None) -> Tensor:
        actv = self.mlp_shared(label)  # (B, hidden, h, w)
        if self.mlp_gamma is not None and self.mlp_beta is not None:
            gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        else:
            if weights is None:
                raise ValueError("an adaptive SPADE layer needs generated weights")
            gamma, beta = spade_modulation(actv, weights)
        return self.norm(x) * (1 + gamma) + beta  # (B, norm_nc, h, w)


class SPADEResBlock(nn.Module):
    """SPADE residual block (Park et al. 2019): two SPADE-LeakyReLU-conv3x3 steps plus a (learned) shortcut.

    ``out_bias``: whether conv_1 has a bias. Only useful when the output reaches something other than a per-channel
    norm (the image conv, or the next block's identity shortcut); in front of norms alone it cancels and never learns.
    """

    def __init__(self, fin: int, fout: int, cfg: ModelConfig, adaptive: bool, out_bias: bool = True) -> None:
        super().__init__()
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.adaptive = adaptive
        L, k = cfg.label_nc, cfg.spade_hidden
        self.norm_0 = SPADE(fin, L, k, adaptive)
        self.conv_0 = nn.Conv2d(fin, fmiddle, kernel_size=3, padding=1, bias=False)  # norm_1 follows: no bias
        self.norm_1 = SPADE(fmiddle, L, k, adaptive)
        self.conv_1 = nn.Conv2d(fmiddle, fout, kernel_size=3, padding=1, bias=out_bias)
        self.norm_s = SPADE(fin, L, k, adaptive) if self.learned_shortcut else None
        self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False) if self.learned_shortcut else None
        # Channels of each SPADE norm, in the order the weight generator produces their weights.
        self.norm_channels = [fin, fmiddle] + ([fin] if self.learned_shortcut else [])

    def forward(self, x: Tensor, label: Tensor, weights: list[SpadeWeights] | None = None) -> Tensor:
        w: list[SpadeWeights | None] = list(weights) if weights is not None else [None] * len(self.norm_channels)
        x_s = x
        if self.norm_s is not None and self.conv_s is not None:
            x_s = self.conv_s(self.norm_s(x, label, w[2]))  # (B, fout, h, w)
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, label, w[0]), LEAKY_SLOPE))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, label, w[1]), LEAKY_SLOPE))
        return x_s + dx  # (B, fout, h, w)


class SPADEGenerator(nn.Module):
    """X_basis (B, c, h, w), label (B, L, H, W), Theta -> I_int (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.levels = cfg.feat_downsample
        ch = gen_channels(cfg)
        n_blocks = self.levels + 1
        n_fixed = n_blocks - cfg.n_adaptive_layers
        widths = [cfg.c] + [ch[level] for level in range(self.levels, -1, -1)]  # block j: widths[j] -> widths[j+1]
        blocks = []
        for j in range(n_blocks):  # coarse (h) to fine (image_size)
            fin, fout = widths[j], widths[j + 1]
            # The output reaches a non-norm if this is the last block or the next one has an identity shortcut.
            out_bias = j == n_blocks - 1 or widths[j + 2] == fout
            blocks.append(SPADEResBlock(fin, fout, cfg, adaptive=j >= n_fixed, out_bias=out_bias))
        self.blocks = nn.ModuleList(blocks)
        self.n_fixed = n_fixed
        self.conv_img = nn.Conv2d(ch[0], cfg.image_nc, kernel_size=3, padding=1)
        #: Per adaptive block (coarse to fine), the channels of its SPADE norms: what WeightGenerator must produce.
        self.adaptive_specs: list[list[int]] = [list(b.norm_channels) for b in blocks if b.adaptive]

    def forward(self, X_basis: Tensor, label: Tensor, theta: Theta) -> Tensor:
        if len(theta) != len(self.adaptive_specs):
            raise ValueError(f"expected generated weights for {len(self.adaptive_specs)} blocks, got {len(theta)}")
        labels = label_pyramid(label, self.levels)  # [(B, L, H/2**i, W/2**i)]
        x = X_basis  # (B, c, h, w)
        for j, block in enumerate(self.blocks):
            level = self.levels - j
            if j > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2h', 2w')
            weights = theta[j - self.n_fixed] if j >= self.n_fixed else None
            x = block(x, labels[level], weights)  # (B, ch[level], H/2**level, W/2**level)
        return self.conv_img(F.leaky_relu(x, LEAKY_SLOPE)).tanh()  # (B, 3, H, W)


__all__ = ["SPADE", "SPADEGenerator", "SPADEResBlock", "gen_channels", "label_pyramid"]
