"""Fused compact-attention basis extraction in Triton (paper eqs 1, 2 and 4 without the attention map).

One program handles one chunk of one reference's pixels. For each tile of BLOCK_N pixels it loads X (C x BLOCK_N),
computes the logits B_l X (P x BLOCK_N), the softmax over the p bases (eq. 1), and accumulates the M-step sums
A^T X (P x C) and the responsibility mass sum_pixels A (P) in registers; with WITH_A it also accumulates A^T X_a
in the same pass (eq. 4 shares eq. 1's map). The (m*h*w) x p attention map is never written to memory.

Partial sums go to a small (B, m, n_chunks, P, C) buffer and are reduced by torch, in a fixed order, so results
are deterministic (no atomics). The M-step's normalisation and momentum (eqs 2-3) act on p x c values and stay in
torch: engine/model/compact_attention.py.extract_bases takes this pass in place of its reference ``em_pass``.

Import this module only where Triton can run: on CUDA, or on CPU with TRITON_INTERPRET=1 set before the import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _em_pass_kernel(
    X_ptr,
    Xa_ptr,
    Bl_ptr,
    AtX_ptr,
    AtXa_ptr,
    mass_ptr,
    M,
    HW,
    C_REAL,
    P_REAL,
    n_chunks,
    stride_xb,
    stride_xm,
    stride_xc,
    P: tl.constexpr,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    WITH_A: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    k = tl.program_id(2)
    offs_p = tl.arange(0, P)
    offs_c = tl.arange(0, C)
    mask_c = offs_c < C_REAL
    valid_p = offs_p < P_REAL
    # B_l (P, C), zero-padded by the host.
    Bl = tl.load(Bl_ptr + b * P * C + offs_p[:, None] * C + offs_c[None, :])
    acc = tl.zeros((P, C), dtype=tl.float32)
    acc_a = tl.zeros((P, C), dtype=tl.float32)
    mass = tl.zeros((P,), dtype=tl.float32)
    x_base = X_ptr + b * stride_xb + j * stride_xm
    xa_base = Xa_ptr + b * stride_xb + j * stride_xm
    start = k * CHUNK
    for n0 in range(start, start + CHUNK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < HW
        x_mask = mask_c[:, None] & mask_n[None, :]
        x = tl.load(x_base + offs_c[:, None] * stride_xc + offs_n[None, :], mask=x_mask, other=0.0)  # (C, BN)
        logits = tl.dot(Bl, x, input_precision="ieee")  # (P, BN): X_l B_l^T, transposed
        logits = tl.where(valid_p[:, None], logits, float("-inf"))
        mx = tl.max(logits, axis=0)  # (BN,)
        e = tl.exp(logits - mx[None, :])
        A = e / tl.sum(e, axis=0)[None, :]  # softmax over the p bases (eq. 1)
        A = tl.where(mask_n[None, :] & valid_p[:, None], A, 0.0)
        acc += tl.dot(A, tl.trans(x), input_precision="ieee")  # (P, C): A^T X_l (eq. 2's sum)
        if WITH_A:
            xa = tl.load(xa_base + offs_c[:, None] * stride_xc + offs_n[None, :], mask=x_mask, other=0.0)
            acc_a += tl.dot(A, tl.trans(xa), input_precision="ieee")  # A^T X_a (eq. 4's sum)
        mass += tl.sum(A, axis=1)
    slot = (b * M + j) * n_chunks + k
    out = slot * P * C + offs_p[:, None] * C + offs_c[None, :]
    tl.store(AtX_ptr + out, acc)
    if WITH_A:
        tl.store(AtXa_ptr + out, acc_a)
    tl.store(mass_ptr + slot * P + offs_p, mass)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _programs_wanted(device: torch.device) -> int:
    """About one program per SM: enough to fill the GPU, few enough that the partial sums stay small.

    Measured on an H200 (X (1, 8, 128, 4096), p = 128): 0.36 ms a pass at 256-pixel chunks (128 programs) against
    1.08 ms at 1024 and 0.42 ms at 64, where the partial sums are 4x larger."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one by one


def em_pass_triton(
    X_l: Tensor, B_l: Tensor, X_a: Tensor | None = None, block_n: int = 16, chunk: int | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Drop-in for compact_attention.em_pass: X_l, X_a (B, m, c, hw); B_l (B, p, c) ->
    A_b^T X_l (B, p, c), A_b^T X_a (B, p, c) or None, mass (B, m, p). fp32 accumulation.

    ``chunk`` (pixels per program, a power of two) defaults to spreading the B*m*hw pixels over about one program
    per SM, so the partial-sum buffer is O(SMs * p * c) whatever the number of pixels. ``block_n`` = 16 pixels a
    tile: the P x C accumulators already fill the registers, and on an H200 tiles of 32 or 64 ran 5-10x slower."""
    B, m, c, hw = X_l.shape
    p = B_l.shape[1]
    P, C = _pow2(p), _pow2(c)
    X_l = X_l.float().contiguous()
    Xa = X_a.float().contiguous() if X_a is not None else X_l
    Bl = torch.zeros(B, P, C, device=X_l.device, dtype=torch.float32)
    Bl[:, :p, :c] = B_l
    if chunk is None:
        chunk = triton.next_power_of_2(triton.cdiv(B * m * hw, _programs_wanted(X_l.device)))
    chunk = min(max(chunk, block_n), max(block_n, triton.next_power_of_2(hw)))
    n_chunks = triton.cdiv(hw, chunk)
    AtX = torch.empty(B, m, n_chunks, P, C, device=X_l.device, dtype=torch.float32)
    AtXa = torch.empty_like(AtX) if X_a is not None else AtX
    mass = torch.empty(B, m, n_chunks, P, device=X_l.device, dtype=torch.float32)
    _em_pass_kernel[(B, m, n_chunks)](
        X_l, Xa, Bl, AtX, AtXa, mass, m, hw, c, p, n_chunks,
        X_l.stride(0), X_l.stride(1), X_l.stride(2),
        P=P, C=C, BLOCK_N=block_n, CHUNK=chunk, WITH_A=X_a is not None,
        num_warps=8 if P * C >= 128 * 128 else 4,
    )
    AtX_l = AtX.sum(dim=(1, 2))[:, :p, :c]
    AtX_a = AtXa.sum(dim=(1, 2))[:, :p, :c] if X_a is not None else None
    return AtX_l, AtX_a, mass.sum(dim=2)[:, :, :p]
