"""The reference-attention interface shared by compact (ACA) and pixel-wise (few-shot vid2vid) attention.

Both implementations split the work by cache lifetime (DESIGN.md section 4): ``extract`` runs once per reference
set and returns a *memory*; ``aggregate`` runs once per frame against that memory. ``build_attention`` is the one
place that picks the implementation from the config (DESIGN.md habit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from engine.config import ModelConfig

M = TypeVar("M", bound="Memory")


@dataclasses.dataclass
class Memory:
    """What ``extract`` caches for a reference set: tensors whose first axis is the batch."""

    n_refs: int

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "n_refs"}

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors().values())).shape[0])

    def map(self: M, fn: Callable[[Tensor], Tensor]) -> M:
        """A copy with ``fn`` applied to every tensor (``.map(lambda t: t.to(dev))``, ``.map(Tensor.detach)``)."""
        changes: dict[str, Any] = {k: fn(v) for k, v in self.tensors().items()}
        return dataclasses.replace(self, **changes)

    def select(self: M, index: Tensor | Sequence[int]) -> M:
        """The samples at ``index`` along the batch axis."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.map(lambda t: t.index_select(0, idx.to(t.device)))

    @classmethod
    def cat(cls: type[M], items: Sequence[M]) -> M:
        """Stack memories of several reference sets into one batch (they must have the same number of references)."""
        if not items:
            raise ValueError("cannot concatenate an empty list of memories")
        n_refs = {item.n_refs for item in items}
        if len(n_refs) != 1:
            raise ValueError(f"memories with different numbers of references cannot share a batch: {sorted(n_refs)}")
        first = items[0]
        fields: dict[str, Any] = {k: torch.cat([getattr(item, k) for item in items], dim=0) for k in first.tensors()}
        return dataclasses.replace(first, **fields)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class ReferenceAttention(nn.Module):
    """Attend from the input label's features to the references' features.

    ``extract(X_l, X_a)``: X_l, X_a (B, m, c, h, w) -> memory, once per reference set.
    ``aggregate(X_in, memory)``: X_in (B, c, h, w) -> (X_basis (B, c, h, w), ref_weights (B, m)), once per frame;
    ``ref_weights`` is the share of attention each reference received (rows sum to 1): its argmax is the reference
    the flow network warps.
    """

    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory:
        raise NotImplementedError

    def aggregate(self, X_in: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, X_in: Tensor, X_l: Tensor, X_a: Tensor) -> tuple[Tensor, Tensor]:
        return self.aggregate(X_in, self.extract(X_l, X_a))


def check_reference_features(X_l: Tensor, X_a: Tensor) -> None:
    if X_l.dim() != 5 or X_l.shape != X_a.shape:
        raise ValueError(f"X_l and X_a must both be (B, m, c, h, w); got {tuple(X_l.shape)} and {tuple(X_a.shape)}")


def flatten_references(X: Tensor) -> Tensor:
    """(B, m, c, h, w) -> (B, m*h*w, c): every reference pixel becomes a row, as the paper reshapes X_l to hmw x c."""
    B, m, c, h, w = X.shape
    return X.permute(0, 1, 3, 4, 2).reshape(B, m * h * w, c)


def flatten_input(X_in: Tensor) -> Tensor:
    """(B, c, h, w) -> (B, h*w, c)."""
    return X_in.flatten(2).transpose(1, 2)


def unflatten_input(X: Tensor, like: Tensor) -> Tensor:
    """(B, h*w, c) -> (B, c, h, w) with the spatial shape of ``like``."""
    B, c, h, w = like.shape
    # contiguous: convolutions pick their algorithm by memory layout, and a strided view made batched and single
    # runs differ by ~1e-3 on an untrained model.
    return X.transpose(1, 2).reshape(B, c, h, w).contiguous()


def build_attention(cfg: ModelConfig) -> ReferenceAttention:
    """The one place that maps ``cfg.attention`` to an implementation."""
    from engine.model.compact_attention import CompactAttention
    from engine.model.pixel_attention import PixelAttention

    if cfg.attention == "compact":
        return CompactAttention(c=cfg.c, p=cfg.p, s=cfg.s, lambda_=cfg.lambda_)
    if cfg.attention == "pixel":
        return PixelAttention()
    raise ValueError(f"unknown attention kind {cfg.attention!r}")
