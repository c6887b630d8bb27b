"""Fused compact-attention basis extraction in Triton (paper eqs 1, 2 and 4 without the attention map).

One program handles one chunk of one reference's pixels. For each tile of BLOCK_N pixels it loads X (C x BLOCK_N),
computes the logits B_l X (P x BLOCK_N), the softmax over the p bases (eq. 1), and accumulates the M-step sums
A^T X (P x C) and the responsibility mass sum_pixels A (P) in registers; with WITH_A it also accumulates A^T X_a
in the same pass (eq. 4 shares eq. 1's map). The (m*h*w) x p attention map is never written to memory.

Partial sums go to a small (B, m, n_chunks, P, C) buffer and are reduced by torch, in a fixed order, so results
are deterministic (no atomics). The M-step's normalisation and momentum (eqs 2-3) act on p x c values and stay in
torch: engine/model/compact_attention.py.extract_bases takes this pass in place of its reference ``em_pass``.

``_extract_kernel`` (``extract_bases_triton``) instead runs the whole extraction, all s iterations with the M-step
in registers, in ONE launch of one program per sample: the form TensorRT's ahead-of-time plugin needs
(engine/runtime/tensorrt_backend.py ``compile_extract_ptx``).

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


# ------------------------------------------------------------------------------------- whole extraction, one launch


@triton.jit
def _extract_e_step(
    Xl_ptr,
    Xa_ptr,
    share_ptr,
    Bl,
    b,
    M,
    HW,
    C_REAL,
    P_REAL,
    P: tl.constexpr,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAST: tl.constexpr,
):
    """One E-step (eq. 1) of sample b over all m references, with the M-step sums of eqs 2 and 4.

    Same tile math as ``_em_pass_kernel``. Returns A^T X_l (P, C), A^T X_a (P, C) (zeros unless LAST) and the total
    mass (P,). With LAST, each reference's mass (P,) is written, unnormalised, to ref_share[b, :, j]."""
    offs_p = tl.arange(0, P)
    offs_c = tl.arange(0, C)
    mask_c = offs_c < C_REAL
    valid_p = offs_p < P_REAL
    acc = tl.zeros((P, C), dtype=tl.float32)
    acc_a = tl.zeros((P, C), dtype=tl.float32)
    total = tl.zeros((P,), dtype=tl.float32)
    for j in range(0, M):
        # X (B, m, c, hw) contiguous: reference j of sample b starts at ((b * m + j) * c) * hw; int64 offsets.
        x_base = Xl_ptr + (b * M + j).to(tl.int64) * C_REAL * HW
        xa_base = Xa_ptr + (b * M + j).to(tl.int64) * C_REAL * HW
        mass = tl.zeros((P,), dtype=tl.float32)
        for n0 in range(0, HW, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < HW
            x_mask = mask_c[:, None] & mask_n[None, :]
            x = tl.load(x_base + offs_c[:, None] * HW + offs_n[None, :], mask=x_mask, other=0.0)  # (C, BN)
            logits = tl.dot(Bl, x, input_precision="ieee")  # (P, BN): X_l B_l^T, transposed
            logits = tl.where(valid_p[:, None], logits, float("-inf"))  # padded bases take no share
            mx = tl.max(logits, axis=0)  # (BN,)
            e = tl.exp(logits - mx[None, :])
            A = e / tl.sum(e, axis=0)[None, :]  # softmax over the p bases (eq. 1)
            A = tl.where(mask_n[None, :] & valid_p[:, None], A, 0.0)
            acc += tl.dot(A, tl.trans(x), input_precision="ieee")  # (P, C): A^T X_l (eq. 2's sum)
            if LAST:
                xa = tl.load(xa_base + offs_c[:, None] * HW + offs_n[None, :], mask=x_mask, other=0.0)
                acc_a += tl.dot(A, tl.trans(xa), input_precision="ieee")  # A^T X_a (eq. 4's sum)
            mass += tl.sum(A, axis=1)
        total += mass
        if LAST:
            # ref_share (B, p, m): column j of sample b; normalised by the total mass once all m are summed.
            tl.store(share_ptr + (b * P_REAL + offs_p).to(tl.int64) * M + j, mass, mask=valid_p)
    return acc, acc_a, total


@triton.jit
def _responsibility_bases(acc, mass):
    """``norm(A^T X)`` of eqs 2 and 4 in registers: (P, C) / (1e-6 + mass), then / (1e-6 + ||row||_2), as
    compact_attention.responsibility_bases and l2_normalize (same eps placement)."""
    z = acc / (1e-6 + mass[:, None])
    norm = tl.sqrt(tl.sum(z * z, axis=1))  # (P,)
    return z / (1e-6 + norm[:, None])


@triton.jit
def _extract_kernel(
    Xl_ptr,
    Xa_ptr,
    B0_ptr,
    M,
    HW,
    C_REAL,
    P_REAL,
    Bl_out,
    Ba_out,
    share_out,
    P: tl.constexpr,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,
    LAMBDA: tl.constexpr,
):
    """The whole basis extraction (eqs 1-4, s EM iterations) of one sample per program; grid (B,).

    Arguments are ordered inputs, int32 scalars, outputs: the order TensorRT's ``@trtp.aot_impl`` launches with
    (engine/runtime/tensorrt_backend.py), which is also why s and lambda are constexprs (its scalar arguments are
    int32 shape expressions only). Inputs X_l, X_a (B, m, c, hw) and B_0 (p, c) and outputs B_l, B_a (B, p, c),
    ref_share (B, p, m) are contiguous fp32 at their real sizes; the kernel pads p, c to the powers of two P, C.
    """
    b = tl.program_id(0)
    offs_p = tl.arange(0, P)
    offs_c = tl.arange(0, C)
    valid_p = offs_p < P_REAL
    pc_mask = valid_p[:, None] & (offs_c < C_REAL)[None, :]
    # B_l (P, C) lives in registers for all s iterations; padded rows and columns are zero.
    Bl = tl.load(B0_ptr + offs_p[:, None] * C_REAL + offs_c[None, :], mask=pc_mask, other=0.0)
    for _ in range(S - 1):
        acc, _unused, mass = _extract_e_step(
            Xl_ptr, Xa_ptr, share_out, Bl, b, M, HW, C_REAL, P_REAL, P, C, BLOCK_N, False
        )
        Bl = (1.0 - LAMBDA) * Bl + LAMBDA * _responsibility_bases(acc, mass)  # eqs 2-3
    # The last iteration shares its attention map with eq. 4 (extract_bases: same order, from the same B_l).
    acc, acc_a, total = _extract_e_step(Xl_ptr, Xa_ptr, share_out, Bl, b, M, HW, C_REAL, P_REAL, P, C, BLOCK_N, True)
    Bl = (1.0 - LAMBDA) * Bl + LAMBDA * _responsibility_bases(acc, total)  # eqs 2-3
    Ba = _responsibility_bases(acc_a, total)  # eq. 4
    out = (b * P_REAL + offs_p[:, None]).to(tl.int64) * C_REAL + offs_c[None, :]
    tl.store(Bl_out + out, Bl, mask=pc_mask)
    tl.store(Ba_out + out, Ba, mask=pc_mask)
    # The per-reference masses were stored by the last E-step; make them visible to every thread of this program
    # before rereading them (the layout that stored a value need not be the one that loads it).
    tl.debug_barrier()
    for j in range(0, M):
        ptrs = share_out + (b * P_REAL + offs_p).to(tl.int64) * M + j
        mass_j = tl.load(ptrs, mask=valid_p, other=0.0)
        tl.store(ptrs, mass_j / (1e-6 + total), mask=valid_p)


def extract_num_warps(p: int, c: int) -> int:
    """Warps for ``_extract_kernel``: its three P x C fp32 tiles (B_l and the two sums) are 192 KiB at p = c = 128,
    which needs 8 warps to fit in registers without heavy spilling; 4 below that."""
    return 8 if _pow2(p) * _pow2(c) >= 128 * 128 else 4


def extract_bases_triton(
    X_l: Tensor, X_a: Tensor, B_0: Tensor, s: int, lambda_: float, block_n: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """Drop-in for compact_attention.extract_bases (eqs 1-4) in ONE kernel launch, no gradients.

    X_l, X_a (B, m, c, hw); B_0 (p, c) -> B_l (B, p, c), B_a (B, p, c), ref_share (B, p, m), fp32. One program per
    sample runs all s iterations with B_l in registers: it suits the AOT TensorRT plugin (one launch) rather than
    large batches of long sequences, where em_pass_triton spreads the pixels over every SM."""
    if s < 1:
        raise ValueError("s (EM iterations) must be at least 1")
    B, m, c, hw = X_l.shape
    p = B_0.shape[0]
    X_l = X_l.float().contiguous()
    X_a = X_a.float().contiguous()
    B_0 = B_0.float().contiguous()
    B_l = torch.empty(B, p, c, device=X_l.device, dtype=torch.float32)
    B_a = torch.empty_like(B_l)
    ref_share = torch.empty(B, p, m, device=X_l.device, dtype=torch.float32)
    _extract_kernel[(B,)](
        X_l, X_a, B_0, m, hw, c, p, B_l, B_a, ref_share,
        P=_pow2(p), C=_pow2(c), BLOCK_N=block_n, S=int(s), LAMBDA=float(lambda_),
        num_warps=extract_num_warps(p, c),
    )
    return B_l, B_a, ref_share
