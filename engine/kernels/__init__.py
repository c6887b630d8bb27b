"""The one place that picks the fused compact-attention kernels or the reference path (DESIGN.md habit 2).

- Basis extraction's E-step pass (eqs 1, 2, 4): the Triton kernel in compact_triton.py on CUDA when no gradient is
  needed through it; otherwise the PyTorch reference ``engine.model.compact_attention.em_pass``.
- Aggregation (eqs 5-6): for half-precision CUDA tensors, torch's fused scaled_dot_product_attention with scale 1
  (a flash kernel: softmax(X_in B_l^T) B_a without storing the hw x p map); otherwise the reference softmax and
  matmul. Measured on an H200 (docs/benchmarks.md, "gpu"): in fp32 the map is small (hw x p, 2 MiB at 64x64) and
  the plain path ran 0.10-0.13 ms against SDPA's 0.18-0.44 ms, so fp32 keeps the plain path.

The reference path is the oracle: tests check every kernel against it (tests/engine/test_kernels.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_fused_enabled = True


def set_fused(enabled: bool) -> None:
    """Turn the fused kernels off (or back on) for this process, e.g. to compare against the reference path."""
    global _fused_enabled
    _fused_enabled = enabled


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_fused(x: Tensor, needs_grad: bool) -> bool:
    return _fused_enabled and x.is_cuda and not needs_grad and triton_available()


def em_pass_for(x: Tensor, needs_grad: bool) -> Callable[..., Any]:
    """The E-step pass implementation for features like ``x``."""
    if use_fused(x, needs_grad):
        from engine.kernels.compact_triton import em_pass_triton

        return em_pass_triton
    from engine.model.compact_attention import em_pass

    return em_pass


def aggregate(X_in: Tensor, B_l: Tensor, B_a: Tensor, ref_share: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs 5-6 and the reference weights. X_in (B, hw, c) -> X_basis (B, hw, c), per-pixel weights (B, hw, m)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (X_in, B_l, B_a))
    if use_fused(X_in, needs_grad) and X_in.dtype in (torch.float16, torch.bfloat16):
        c = B_a.shape[-1]
        # One fused attention over V = [B_a | ref_share]: the same softmax weights give X_basis and, since
        # A_in ref_share is linear in A_in, the per-pixel share of each reference.
        V = torch.cat([B_a, ref_share.to(B_a.dtype)], dim=-1).unsqueeze(1)  # (B, 1, p, c + m)
        out = F.scaled_dot_product_attention(X_in.unsqueeze(1), B_l.unsqueeze(1), V, scale=1.0).squeeze(1)
        return out[..., :c], out[..., c:]
    from engine.model.compact_attention import aggregate_bases

    X_basis, A_in = aggregate_bases(X_in, B_l, B_a)
    return X_basis, A_in @ ref_share
