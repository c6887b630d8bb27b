"""The three feature encoders E_a, E_l and E_in (Huang et al. 2020, section 3.1, "Feature extraction").

All three share one architecture so that their outputs have the same shape ``c x h x w`` and can interact in the
attention (eqs 1-6): E_a encodes the reference appearance images R_a into X_a, E_l the reference labels R_l into
X_l, and E_in the input label I_l^t into X_in. The paper uses k = 5 conv layers; like few-shot vid2vid's reference
encoder we start with a 3x3 stem conv and downsample with stride-2 convs (``cfg.feat_downsample`` of them).
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.config import ModelConfig

#: Slope of every LeakyReLU in the model (few-shot vid2vid uses 0.2 throughout).
LEAKY_SLOPE = 0.2


def instance_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """InstanceNorm as GroupNorm with one group per channel: the same numbers (per sample, per channel), but torch's
    CPU GroupNorm kernel is 3-6x faster than InstanceNorm2d's, and it still exports to ONNX InstanceNormalization."""
    return nn.GroupNorm(channels, channels, affine=affine)


#: Channels per group of the encoders' GroupNorm.
CHANNELS_PER_GROUP = 8


def group_norm(channels: int) -> nn.GroupNorm:
    """Per-sample GroupNorm over groups of CHANNELS_PER_GROUP channels (one group when there are fewer channels)."""
    return nn.GroupNorm(max(1, channels // CHANNELS_PER_GROUP), channels)


def encoder_channels(cfg: ModelConfig) -> list[int]:
    """Output channels of the k layers: ngf * 2**i after the i-th stride-2 conv, capped at c; the last is c."""
    channels = [min(cfg.c, cfg.ngf * 2 ** min(i, cfg.feat_downsample)) for i in range(cfg.k)]
    channels[-1] = cfg.c
    return channels


class Encoder(nn.Module):
    """k conv layers: a 3x3 stem, ``feat_downsample`` stride-2 convs, the rest stride 1.

    (N, in_nc, H, W) -> (N, c, h, w) with h = H / 2**feat_downsample (= ``cfg.feat_size`` at ``cfg.image_size``).

    Every layer is conv -> GroupNorm (affine), and every layer but the last then LeakyReLU(0.2).

    - A per-sample norm, not BatchNorm: a sample's features never depend on the rest of its batch (the serving
      batcher mixes streams).
    - GroupNorm rather than InstanceNorm: InstanceNorm after every layer strips each channel's mean, so E_a would be
      nearly blind to a reference's global colour and the pooled code of the weight generator could not carry it;
      a group keeps the differences between its channels' means.
    - The last layer has no activation: its output is dotted with bases or keys inside a softmax without scaling
      (eqs 1 and 5, as in EMANet and few-shot vid2vid), so it is signed, and normalised to norm about sqrt(c) so
      the attention is neither flat nor one-hot at initialisation (a plain conv gives a norm near 1, and attention
      that is almost uniform over references).
    """

    def __init__(self, in_nc: int, cfg: ModelConfig) -> None:
        super().__init__()
        channels = encoder_channels(cfg)
        layers: list[nn.Module] = []
        fin = in_nc
        for i, fout in enumerate(channels):
            stride = 2 if 1 <= i <= cfg.feat_downsample else 1
            layers += [nn.Conv2d(fin, fout, kernel_size=3, stride=stride, padding=1), group_norm(fout)]
            if i < cfg.k - 1:
                layers.append(nn.LeakyReLU(LEAKY_SLOPE))
            fin = fout
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (N, in_nc, H, W) -> (N, c, h, w)


__all__ = ["LEAKY_SLOPE", "Encoder", "encoder_channels", "group_norm", "instance_norm"]
