"""Few-shot vid2vid's pixel-wise attention: the baseline every ACA claim is measured against (DESIGN.md section 2).

Every query position of the input label attends to all m*h*w reference positions at once::

    energy = X_in X_l^T                 (hw x mhw), no 1/sqrt(c) scaling, as in few-shot vid2vid
    A      = softmax(energy)            over all m*h*w reference positions
    X_out  = A X_a                      (hw x c)

The map is hw x mhw: at 64x64 features and m = 8 it holds 134 M floats (512 MiB fp32) per sample, which is what
compact attention avoids. "Extraction" only flattens the references, so a frame pays the full cost every time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from engine.model.attention import (
    Memory,
    ReferenceAttention,
    check_reference_features,
    flatten_input,
    flatten_references,
    unflatten_input,
)


@dataclasses.dataclass
class PixelMemory(Memory):
    """The pixel-wise memory of a reference set: every reference position is kept."""

    keys: Tensor  # (B, m*h*w, c) from X_l
    values: Tensor  # (B, m*h*w, c) from X_a


def pixel_attend(X_in: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """X_in (B, hw, c), keys/values (B, N, c) -> X_out (B, hw, c) and A (B, hw, N)."""
    A = torch.softmax(X_in @ keys.transpose(1, 2), dim=-1)  # (B, hw, N)
    return A @ values, A


class PixelAttention(ReferenceAttention):
    def extract(self, X_l: Tensor, X_a: Tensor) -> PixelMemory:
        check_reference_features(X_l, X_a)
        return PixelMemory(n_refs=X_l.shape[1], keys=flatten_references(X_l), values=flatten_references(X_a))

    def aggregate(self, X_in: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        if not isinstance(memory, PixelMemory):
            raise TypeError(f"PixelAttention needs PixelMemory, got {type(memory).__name__}")
        X_out, A = pixel_attend(flatten_input(X_in), memory.keys, memory.values)
        B, m = A.shape[0], memory.n_refs
        ref_weights = A.mean(dim=1).reshape(B, m, -1).sum(dim=-1)  # (B, m): attention mass per reference
        return unflatten_input(X_out, X_in), ref_weights
