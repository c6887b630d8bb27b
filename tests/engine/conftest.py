"""Shared fixtures for the engine tests: CPU-sized model inputs and seeded models."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import ModelConfig, preset

if TYPE_CHECKING:
    from engine.model import ACAVid2Vid


@dataclasses.dataclass
class Inputs:
    """One batch for ACAVid2Vid: label (B, L, H, W), refs (B, m, ., H, W), previous frame and label (B, ., H, W)."""

    label: Tensor
    ref_images: Tensor
    ref_labels: Tensor
    prev_image: Tensor
    prev_label: Tensor

    def to(self, dtype: torch.dtype) -> Inputs:
        return Inputs(*(getattr(self, f.name).to(dtype) for f in dataclasses.fields(self)))

    def sample(self, b: int) -> Inputs:
        """Sample b alone, as a batch of one."""
        return Inputs(*(getattr(self, f.name)[b : b + 1] for f in dataclasses.fields(self)))


def smooth_noise(gen: torch.Generator, shape: tuple[int, ...], size: int, cells: int = 4) -> Tensor:
    """Random fields that vary over ``cells`` cells per side: (*shape, size, size).

    Smooth fields rather than white noise so that references differ in structure, as real frames do; with white
    noise every reference has the same statistics and attention splits almost exactly evenly between them.
    """
    coarse = torch.randn(*shape, cells, cells, generator=gen)
    flat = coarse.reshape(-1, 1, cells, cells)
    fine = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False)
    return fine.reshape(*shape, size, size)


def make_inputs_for(cfg: ModelConfig, B: int, m: int, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    H, L, C = cfg.image_size, cfg.label_nc, cfg.image_nc
    return Inputs(
        label=torch.sigmoid(3 * smooth_noise(gen, (B, L), H)),  # labels in [0, 1]
        ref_images=torch.tanh(smooth_noise(gen, (B, m, C), H)),  # images in [-1, 1]
        ref_labels=torch.sigmoid(3 * smooth_noise(gen, (B, m, L), H)),
        prev_image=torch.tanh(smooth_noise(gen, (B, C), H)),
        prev_label=torch.sigmoid(3 * smooth_noise(gen, (B, L), H)),
    )


@pytest.fixture
def make_inputs() -> Callable[..., Inputs]:
    """``make_inputs(cfg, B, m, seed=0)``: a deterministic batch of CPU-sized inputs."""
    return make_inputs_for


def make_model_for(cfg: ModelConfig | str, attention: str = "compact", seed: int = 0) -> ACAVid2Vid:
    """A seeded ACAVid2Vid in eval mode. ``cfg`` is a ModelConfig or a preset name."""
    from engine.model import ACAVid2Vid  # lazily: a broken model must not break every engine test's collection

    base = preset(cfg) if isinstance(cfg, str) else cfg
    torch.manual_seed(seed)
    return ACAVid2Vid(base.with_(attention=attention)).eval()


@pytest.fixture
def make_model() -> Callable[..., ACAVid2Vid]:
    """``make_model(cfg_or_preset_name, attention="compact", seed=0)``: a seeded model in eval mode."""
    return make_model_for


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return preset("tiny")
