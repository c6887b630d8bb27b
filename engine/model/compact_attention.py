"""Adaptive Compact Attention (Huang et al. 2020, section 3.1; DESIGN.md 2.2-2.3).

Basis extraction (once per reference set), an EM-style iteration as in EMANet, repeated s times::

    A_b   = softmax(X_l B_l^T)              over the p bases                      (eq. 1)
    B_new = norm(A_b^T X_l)                 responsibility-normalised, then L2    (eq. 2)
    B_l  := (1 - lambda) B_l + lambda B_new                                       (eq. 3)
    B_a   = norm(A_b^T X_a)                 with the last attention map           (eq. 4)

Basis aggregation (once per frame)::

    A_in    = softmax(X_in B_l^T)           (hw x p)                              (eq. 5)
    X_basis = A_in B_a                      (hw x c)                              (eq. 6)

``norm`` is EMANet's: ``z_ = z / (1e-6 + sum_pixels z)``, ``mu = z_^T X``, ``mu / (1e-6 + ||mu||_c)``.

Gradients through the EM loop. EMANet runs all its iterations under ``no_grad`` (its authors found gradients
through them slightly worse), but then the encoder in front of the bases learns nothing through them. Here that
encoder is E_l, and X_l reaches the output only through the bases, so we truncate instead: the first s - 1
iterations run without gradients (they only move the starting point, and backpropagating through softmax chains
is costly and unstable), the last iteration runs with gradients. E_l then learns through B_new (eq. 2, into B_l
and so A_in) and through the last A_b (eq. 4); E_a through eq. 4; E_in through eq. 5. The initial bases B_0 are a
buffer, not a parameter: like EMANet's ``mu`` they are a moving average (momentum 0.9) of the batch's final B_l,
updated in training mode, so inference is deterministic.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from engine.model.attention import (
    Memory,
    ReferenceAttention,
    check_reference_features,
    flatten_input,
    unflatten_input,
)

EPS = 1e-6
#: EMANet's moving-average momentum for the initial bases buffer (train.py: 0.9 * mu + 0.1 * new).
BASES_MOMENTUM = 0.9


@dataclasses.dataclass
class Bases(Memory):
    """The compact memory of a reference set."""

    B_l: Tensor  # (B, p, c) semantic bases
    B_a: Tensor  # (B, p, c) appearance bases
    ref_share: Tensor  # (B, p, m): share of each basis's responsibility that came from each reference


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    return x / (EPS + x.norm(dim=dim, keepdim=True))


def responsibility_bases(AtX: Tensor, mass: Tensor) -> Tensor:
    """``norm(A^T X)`` of eqs 2 and 4 from its accumulated parts.

    AtX (B, p, c) = A^T X summed over pixels; mass (B, p) = each basis's total responsibility. Dividing by the mass is
    EMANet's ``z / (1e-6 + sum_pixels z)``; the L2 normalisation over channels follows.
    """
    return l2_normalize(AtX / (EPS + mass.unsqueeze(-1)))  # (B, p, c)


def em_pass(X_l: Tensor, B_l: Tensor, X_a: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """One E-step (eq. 1) and the sums of the M-step (eqs 2, 4), one reference at a time.

    X_l, X_a (B, m, c, hw); B_l (B, p, c) -> A_b^T X_l (B, p, c), A_b^T X_a (B, p, c) or None, mass (B, m, p).
    Working per reference keeps the attention map at hw x p instead of mhw x p (the fused kernel goes further and
    never stores it); the result is the same as the paper's single hmw x c reshape.
    """
    AtX_l: Tensor | None = None
    AtX_a: Tensor | None = None
    masses = []
    for j in range(X_l.shape[1]):
        A_t = torch.softmax(B_l @ X_l[:, j], dim=1)  # (B, p, hw): A_b^T for reference j, softmax over p (eq. 1)
        part = A_t @ X_l[:, j].transpose(1, 2)  # (B, p, c)
        AtX_l = part if AtX_l is None else AtX_l + part
        if X_a is not None:
            part_a = A_t @ X_a[:, j].transpose(1, 2)
            AtX_a = part_a if AtX_a is None else AtX_a + part_a
        masses.append(A_t.sum(dim=-1))  # (B, p)
    assert AtX_l is not None
    return AtX_l, AtX_a, torch.stack(masses, dim=1)


def extract_bases(X_l: Tensor, X_a: Tensor, B_0: Tensor, s: int, lambda_: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs 1-4: the reference path every kernel is checked against.

    X_l, X_a (B, m, c, hw); B_0 (p, c) -> B_l (B, p, c), B_a (B, p, c), ref_share (B, p, m).
    """
    from engine import kernels  # the one place that picks the fused kernel or this file's reference pass

    B_l = B_0.unsqueeze(0).expand(X_l.shape[0], -1, -1)
    needs_grad = torch.is_grad_enabled() and (X_l.requires_grad or X_a.requires_grad)
    with torch.no_grad():
        pass_ = kernels.em_pass_for(X_l, needs_grad=False)
        for _ in range(s - 1):
            AtX_l, _, mass = pass_(X_l, B_l)
            B_l = (1.0 - lambda_) * B_l + lambda_ * responsibility_bases(AtX_l, mass.sum(dim=1))  # eqs 2-3
    # The last iteration carries gradients (module docstring) and shares its map A_b with eq. 4.
    B_l = B_l.detach()
    AtX_l, AtX_a, mass = kernels.em_pass_for(X_l, needs_grad)(X_l, B_l, X_a)
    assert AtX_a is not None
    total = mass.sum(dim=1)  # (B, p)
    B_l = (1.0 - lambda_) * B_l + lambda_ * responsibility_bases(AtX_l, total)  # eqs 2-3
    B_a = responsibility_bases(AtX_a, total)  # eq. 4
    ref_share = (mass / (EPS + total.unsqueeze(1))).transpose(1, 2)  # (B, p, m)
    return B_l, B_a, ref_share


def aggregate_bases(X_in: Tensor, B_l: Tensor, B_a: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs 5-6. X_in (B, hw, c) -> X_basis (B, hw, c) and A_in (B, hw, p)."""
    A_in = torch.softmax(X_in @ B_l.transpose(1, 2), dim=-1)  # (B, hw, p), eq. 5
    return A_in @ B_a, A_in  # (B, hw, c), eq. 6


class CompactAttention(ReferenceAttention):
    """ACA: p bases summarise all m*h*w reference positions; a frame attends to p bases instead of m*h*w pixels."""

    bases_init: Tensor

    def __init__(self, c: int, p: int, s: int = 3, lambda_: float = 0.5) -> None:
        super().__init__()
        if s < 1:
            raise ValueError("s (EM iterations) must be at least 1")
        self.c, self.p, self.s, self.lambda_ = c, p, s, lambda_
        # EMANet's initialisation: N(0, sqrt(2/p)), L2-normalised over channels; a buffer, never a parameter.
        B_0 = torch.randn(p, c) * math.sqrt(2.0 / p)
        self.register_buffer("bases_init", l2_normalize(B_0))

    def extract(self, X_l: Tensor, X_a: Tensor) -> Bases:
        check_reference_features(X_l, X_a)
        B, m, c, h, w = X_l.shape
        # clone: the training update below writes the buffer in place after autograd saved it.
        B_l, B_a, ref_share = extract_bases(
            X_l.reshape(B, m, c, h * w), X_a.reshape(B, m, c, h * w), self.bases_init.clone(), self.s, self.lambda_
        )
        if self.training:
            self._update_bases_init(B_l)
        return Bases(n_refs=m, B_l=B_l, B_a=B_a, ref_share=ref_share)

    @torch.no_grad()
    def _update_bases_init(self, B_l: Tensor) -> None:
        """EMANet's moving average of the converged bases (train.py), renormalised."""
        mean = l2_normalize(B_l.detach().mean(dim=0))
        self.bases_init.mul_(BASES_MOMENTUM).add_((1.0 - BASES_MOMENTUM) * mean)
        self.bases_init.copy_(l2_normalize(self.bases_init))

    def aggregate(self, X_in: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        if not isinstance(memory, Bases):
            raise TypeError(f"CompactAttention needs Bases, got {type(memory).__name__}")
        from engine import kernels

        # Share of attention per reference: each basis passes its attention on in proportion to ref_share.
        X_basis, pixel_weights = kernels.aggregate(flatten_input(X_in), memory.B_l, memory.B_a, memory.ref_share)
        ref_weights = pixel_weights.mean(dim=1)  # (B, hw, m) -> (B, m)
        return unflatten_input(X_basis, X_in), ref_weights


__all__ = ["Bases", "CompactAttention", "aggregate_bases", "em_pass", "extract_bases", "l2_normalize"]
