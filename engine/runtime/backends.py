"""Inference backends behind one interface (DESIGN.md habit 2): the one place that maps a backend name to code.

A backend runs the three cached stages of the model (DESIGN.md section 4) on batched tensors:

- ``encode(images, labels)``: per identity, R_a (n, 3, H, W) and R_l (n, L, H, W) -> X_a, X_l (n, c, h, w);
- ``extract(X_l, X_a)``: per reference set, (B, m, c, h, w) each -> a Memory;
- ``synthesize(...)``: per frame, -> the output image (B, 3, H, W) in [-1, 1].

The plain PyTorch model is the oracle every other backend is checked against.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from engine.model.attention import Memory
from engine.model.vid2vid import ACAVid2Vid, RefFeatures


class Backend(Protocol):
    name: str
    model: ACAVid2Vid  # the architecture and weights; other backends run an export of it

    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]: ...

    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory: ...

    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor,
        prev_label: Tensor,
        prev_valid: Tensor,
    ) -> Tensor: ...


class TorchBackend:
    """Eager PyTorch in inference mode."""

    name = "torch"

    def __init__(self, model: ACAVid2Vid) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ref = self.model.encode_references(images.unsqueeze(0), labels.unsqueeze(0))  # m = n, B = 1
        return ref.X_a[0], ref.X_l[0]

    @torch.inference_mode()
    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory:
        return self.model.extract(RefFeatures(X_a=X_a, X_l=X_l))

    @torch.inference_mode()
    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor,
        prev_label: Tensor,
        prev_valid: Tensor,
    ) -> Tensor:
        out = self.model.synthesize(label, memory, ref_images, ref_labels, prev_image, prev_label, prev_valid)
        return out.image


BACKENDS = ("torch",)


def make_backend(name: str, model: ACAVid2Vid) -> Backend:
    """The one place that picks a backend by name."""
    if name == "torch":
        return TorchBackend(model)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
