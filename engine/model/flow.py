"""The flow networks f_r and f_p and backward warping (Huang et al. 2020, section 3; few-shot vid2vid's flow net).

One architecture, used twice: f_r takes the target label with the most attended reference's label and image and
estimates the flow reference -> target; f_p takes the target label with the previous label and previous output and
estimates previous -> target. Each also predicts a soft matting mask (engine.model.vid2vid combines them).

Layout (few-shot vid2vid, with plain residual blocks): a 3x3 stem, ``cfg.flow_downsample`` stride-2 convs,
``cfg.n_flow_blocks`` residual blocks, as many upsampling convs back to full size, then a flow head (2 channels,
pixels, scaled by ``cfg.flow_scale``) and a mask head (1 channel, sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig
from engine.model.encoders import LEAKY_SLOPE, instance_norm


def conv_block(fin: int, fout: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 -> InstanceNorm (per sample, so batching never changes a sample) -> LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Conv2d(fin, fout, kernel_size=3, stride=stride, padding=1, bias=False),  # the norm would cancel a bias
        instance_norm(fout),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_block(ch, ch),
            nn.Conv2d(ch, ch, kernel_size=3, padding=1, bias=False),
            instance_norm(ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FlowNet(nn.Module):
    """(B, 2L + 3, H, W) = cat(target label, source label, source image) -> flow (B, 2, H, W), mask (B, 1, H, W).

    The flow is in pixels, (dx, dy), the offset at which each target pixel samples the source (``warp``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        in_nc = 2 * cfg.label_nc + cfg.image_nc
        ch = [cfg.flow_ngf * 2**i for i in range(cfg.flow_downsample + 1)]
        self.flow_scale = cfg.flow_scale
        self.stem = conv_block(in_nc, ch[0])
        self.down = nn.Sequential(*(conv_block(ch[i], ch[i + 1], stride=2) for i in range(cfg.flow_downsample)))
        self.res = nn.Sequential(*(ResBlock(ch[-1]) for _ in range(cfg.n_flow_blocks)))
        self.up = nn.ModuleList(conv_block(ch[i + 1], ch[i]) for i in reversed(range(cfg.flow_downsample)))
        self.flow_head = nn.Conv2d(ch[0], 2, kernel_size=3, padding=1)
        self.mask_head = nn.Conv2d(ch[0], 1, kernel_size=3, padding=1)
        # Zero flow at initialisation: warps start as the identity and training moves them from there.
        nn.init.zeros_(self.flow_head.weight)
        nn.init.zeros_(self.flow_head.bias)  # type: ignore[arg-type]

    def forward(self, target_label: Tensor, source_label: Tensor, source_image: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([target_label, source_label, source_image], dim=1)  # (B, 2L + 3, H, W)
        x = self.res(self.down(self.stem(x)))  # (B, ch[-1], H / 2**d, W / 2**d)
        for up in self.up:
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # doubles H, W; halves channels
        flow = self.flow_head(x) * self.flow_scale  # (B, 2, H, W), pixels
        mask = torch.sigmoid(self.mask_head(x))  # (B, 1, H, W)
        return flow, mask


def warp(image: Tensor, flow: Tensor) -> Tensor:
    """Backward warp: out[y, x] = image[y + flow_y, x + flow_x], bilinear, border padding (REFERENCES.md).

    image (B, C, H, W), flow (B, 2, H, W) in pixels -> (B, C, H, W). With align_corners=True, -1 and 1 are the
    centres of the first and last pixels, so a pixel offset becomes a grid offset by dividing by (W-1)/2, (H-1)/2.
    """
    B, _, H, W = image.shape
    ys = torch.linspace(-1.0, 1.0, H, dtype=flow.dtype, device=flow.device)
    xs = torch.linspace(-1.0, 1.0, W, dtype=flow.dtype, device=flow.device)
    base_y, base_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    grid_x = base_x + flow[:, 0] / ((W - 1) / 2.0)  # (B, H, W)
    grid_y = base_y + flow[:, 1] / ((H - 1) / 2.0)
    grid = torch.stack([grid_x, grid_y], dim=-1)  # (B, H, W, 2), (x, y) as grid_sample wants
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


__all__ = ["FlowNet", "ResBlock", "conv_block", "warp"]
