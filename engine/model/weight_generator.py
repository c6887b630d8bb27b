"""Weight generation from X_basis (Huang et al. 2020, section 3.1 step 4; few-shot vid2vid's hyper-network).

The attended reference features X_basis "are further utilized for network weight generation": as in few-shot
vid2vid, only the modulation layers of the finest ``cfg.n_adaptive_layers`` SPADE residual blocks get generated
weights, and only the 1x1 convs that map the SPADE hidden activation to gamma and beta. A generated conv is applied
per sample with one batched einsum (``spade_modulation``), never with a Python loop over the batch.

Per adaptive block the generator is: X_basis -> (shared) conv 3x3 + LeakyReLU -> global average pool -> two
spectral-norm Linear + LeakyReLU(0.2) -> one Linear head per SPADE norm of the block, whose output is split into
the gamma and beta 1x1 conv weights (o x spade_hidden) and biases (o).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from engine.config import ModelConfig
from engine.model.encoders import LEAKY_SLOPE


class SpadeWeights(NamedTuple):
    """Per-sample 1x1 conv weights of one SPADE norm's gamma and beta layers."""

    gamma_w: Tensor  # (B, o, spade_hidden)
    gamma_b: Tensor  # (B, o)
    beta_w: Tensor  # (B, o, spade_hidden)
    beta_b: Tensor  # (B, o)


#: Generated weights of the adaptive blocks, coarse to fine; inside a block, one entry per SPADE norm.
Theta = list[list[SpadeWeights]]


def per_sample_conv1x1(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 conv with a different weight per sample. x (B, c, h, w), weight (B, o, c), bias (B, o) -> (B, o, h, w)."""
    return torch.einsum("boc,bchw->bohw", weight, x) + bias[:, :, None, None]


def spade_modulation(actv: Tensor, weights: SpadeWeights) -> tuple[Tensor, Tensor]:
    """gamma, beta (B, o, h, w) from the SPADE hidden activation actv (B, spade_hidden, h, w)."""
    gamma = per_sample_conv1x1(actv, weights.gamma_w, weights.gamma_b)
    beta = per_sample_conv1x1(actv, weights.beta_w, weights.beta_b)
    return gamma, beta


class AdaptiveLayerHead(nn.Module):
    """The fully connected stack of one adaptive block: embedding (B, e) -> one SpadeWeights per SPADE norm."""

    def __init__(self, embed_dim: int, hidden: int, spade_hidden: int, norm_channels: list[int]) -> None:
        super().__init__()
        self.spade_hidden = spade_hidden
        self.norm_channels = list(norm_channels)
        self.trunk = nn.Sequential(
            spectral_norm(nn.Linear(embed_dim, hidden)),
            nn.LeakyReLU(LEAKY_SLOPE),
            spectral_norm(nn.Linear(hidden, hidden)),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        # Per norm of o channels: gamma and beta, each o*spade_hidden weights and o biases.
        self.heads = nn.ModuleList(nn.Linear(hidden, 2 * o * (spade_hidden + 1)) for o in self.norm_channels)
        # The generated conv should start at the scale of a fan-in initialised conv, whatever spade_hidden is.
        self.weight_scale = 1.0 / math.sqrt(spade_hidden)

    def forward(self, z: Tensor) -> list[SpadeWeights]:
        h = self.trunk(z)  # (B, hidden)
        B, k = z.shape[0], self.spade_hidden
        out: list[SpadeWeights] = []
        for o, head in zip(self.norm_channels, self.heads, strict=True):
            flat = head(h)  # (B, 2*o*(k+1))
            w, b = flat.split([2 * o * k, 2 * o], dim=1)
            w = w.reshape(B, 2, o, k) * self.weight_scale  # (B, gamma|beta, o, k)
            b = b.reshape(B, 2, o)  # (B, gamma|beta, o)
            out.append(SpadeWeights(w[:, 0], b[:, 0], w[:, 1], b[:, 1]))
        return out


class WeightGenerator(nn.Module):
    """X_basis (B, c, h, w) -> Theta: generated SPADE gamma/beta weights of the adaptive blocks.

    ``adaptive_specs`` lists, per adaptive block (coarse to fine), the channel counts of its SPADE norms
    (``SPADEGenerator.adaptive_specs``).
    """

    def __init__(self, cfg: ModelConfig, adaptive_specs: list[list[int]]) -> None:
        super().__init__()
        hidden = cfg.weight_gen_hidden
        self.spade_hidden = cfg.spade_hidden
        self.adaptive_specs = [list(spec) for spec in adaptive_specs]
        # A small conv before pooling lets the embedding see local structure of X_basis, not only channel means.
        self.embed = nn.Sequential(nn.Conv2d(cfg.c, hidden, kernel_size=3, padding=1), nn.LeakyReLU(LEAKY_SLOPE))
        self.layers = nn.ModuleList(
            AdaptiveLayerHead(hidden, hidden, cfg.spade_hidden, spec) for spec in adaptive_specs
        )

    def forward(self, X_basis: Tensor) -> Theta:
        # Global average pool: the generated convs are 1x1 and shared over positions, so they get a global code.
        z = self.embed(X_basis).mean(dim=(2, 3))  # (B, c, h, w) -> (B, hidden, h, w) -> (B, hidden)
        return [layer(z) for layer in self.layers]

    def n_generated(self) -> int:
        """Generated numbers per sample (weights and biases of every adaptive gamma and beta conv)."""
        return sum(2 * o * (self.spade_hidden + 1) for spec in self.adaptive_specs for o in spec)


__all__ = [
    "AdaptiveLayerHead",
    "SpadeWeights",
    "Theta",
    "WeightGenerator",
    "per_sample_conv1x1",
    "spade_modulation",
]
