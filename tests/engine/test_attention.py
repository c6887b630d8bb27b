"""Compact (eqs 1-6) and pixel-wise attention against a direct NumPy implementation, and their interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.model.attention import Memory, build_attention
from engine.model.compact_attention import Bases, CompactAttention
from engine.model.pixel_attention import PixelAttention, PixelMemory


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_norm(A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """EMANet's norm(A^T X) written out: responsibilities over pixels, then L2 over channels."""
    z = A / (1e-6 + A.sum(axis=0, keepdims=True))
    mu = z.T @ X
    return mu / (1e-6 + np.linalg.norm(mu, axis=1, keepdims=True))


def np_compact(X_l, X_a, X_in, B_0, s, lam):
    """One sample: X_l, X_a (m, c, h, w), X_in (c, h, w), B_0 (p, c), written from the paper's equations."""
    m, c, h, w = X_l.shape
    Xl = X_l.transpose(0, 2, 3, 1).reshape(m * h * w, c)  # hmw x c
    Xa = X_a.transpose(0, 2, 3, 1).reshape(m * h * w, c)
    B_l = B_0.copy()
    for _ in range(s):
        A_b = np_softmax(Xl @ B_l.T)  # eq. 1
        B_new = np_norm(A_b, Xl)  # eq. 2
        B_l = (1 - lam) * B_l + lam * B_new  # eq. 3
    B_a = np_norm(A_b, Xa)  # eq. 4
    Xq = X_in.reshape(c, h * w).T
    A_in = np_softmax(Xq @ B_l.T)  # eq. 5
    X_basis = A_in @ B_a  # eq. 6
    return B_l, B_a, X_basis.T.reshape(c, h, w)


def np_pixel(X_l, X_a, X_in):
    m, c, h, w = X_l.shape
    keys = X_l.transpose(0, 2, 3, 1).reshape(-1, c)
    values = X_a.transpose(0, 2, 3, 1).reshape(-1, c)
    A = np_softmax(X_in.reshape(c, h * w).T @ keys.T)
    return (A @ values).T.reshape(c, h, w)


def features(B=2, m=3, c=16, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X_l = torch.randn(B, m, c, h, w, generator=g, dtype=torch.float64)
    X_a = torch.randn(B, m, c, h, w, generator=g, dtype=torch.float64)
    X_in = torch.randn(B, c, h, w, generator=g, dtype=torch.float64)
    return X_l, X_a, X_in


@pytest.mark.parametrize("s,lam", [(1, 0.5), (3, 0.5), (3, 1.0), (5, 0.2)])
def test_compact_attention_matches_numpy_equations(s, lam):
    X_l, X_a, X_in = features()
    att = CompactAttention(c=16, p=7, s=s, lambda_=lam).double().eval()
    bases = att.extract(X_l, X_a)
    X_basis, _ = att.aggregate(X_in, bases)
    for b in range(X_l.shape[0]):
        B_l, B_a, Xb = np_compact(
            X_l[b].numpy(), X_a[b].numpy(), X_in[b].numpy(), att.bases_init.numpy(), s, lam
        )
        np.testing.assert_allclose(bases.B_l[b].numpy(), B_l, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(bases.B_a[b].numpy(), B_a, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(X_basis[b].detach().numpy(), Xb, rtol=1e-10, atol=1e-10)


def test_pixel_attention_matches_numpy():
    X_l, X_a, X_in = features()
    att = PixelAttention()
    out, weights = att(X_in, X_l, X_a)
    for b in range(X_l.shape[0]):
        np.testing.assert_allclose(out[b].numpy(), np_pixel(X_l[b].numpy(), X_a[b].numpy(), X_in[b].numpy()), 1e-10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64))


def test_bases_are_unit_norm_and_reference_weights_are_distributions():
    X_l, X_a, X_in = features(m=4)
    att = CompactAttention(c=16, p=6).double()
    bases = att.extract(X_l, X_a)
    torch.testing.assert_close(bases.B_a.norm(dim=-1), torch.ones(2, 6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(bases.ref_share.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    _, w = att.aggregate(X_in, bases)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=torch.float64))


def test_reference_weights_find_the_reference_the_input_resembles():
    """If the input label's features are one reference's, that reference gets the most attention in both kinds."""
    X_l, X_a, _ = features(B=1, m=4, c=16, h=6, w=6, seed=3)
    X_l = X_l * 3  # sharper softmax
    for att in (CompactAttention(c=16, p=16).double().eval(), PixelAttention()):
        for j in range(4):
            _, w = att(X_l[:, j], X_l, X_a)
            assert int(w.argmax()) == j, type(att).__name__


def test_cached_bases_equal_recomputed_and_extraction_is_deterministic():
    X_l, X_a, X_in = features()
    att = CompactAttention(c=16, p=8).double().eval()
    bases = att.extract(X_l, X_a)
    again = att.extract(X_l, X_a)
    for k, v in bases.tensors().items():
        assert torch.equal(v, again.tensors()[k]), k
    frames = [att.aggregate(X_in * t, bases)[0] for t in (0.5, 1.0, 2.0)]
    direct = [att(X_in * t, X_l, X_a)[0] for t in (0.5, 1.0, 2.0)]
    for a, b in zip(frames, direct, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["compact", "pixel"])
def test_memory_batches_concatenate_and_select(kind):
    att = build_attention(preset("tiny", attention=kind, c=16)).double().eval()
    X_l, X_a, X_in = features(B=3)
    memory = att.extract(X_l, X_a)
    assert isinstance(memory, Bases if kind == "compact" else PixelMemory)
    parts = [att.extract(X_l[i : i + 1], X_a[i : i + 1]) for i in range(3)]
    joined = type(memory).cat(parts)
    assert joined.batch_size == 3 and joined.n_refs == 3
    torch.testing.assert_close(att.aggregate(X_in, joined)[0], att.aggregate(X_in, memory)[0])
    picked = memory.select([2, 0])
    torch.testing.assert_close(att.aggregate(X_in[[2, 0]], picked)[0], att.aggregate(X_in, memory)[0][[2, 0]])
    assert memory.nbytes() > 0
    with pytest.raises(ValueError, match="different numbers of references"):
        type(memory).cat([parts[0], att.extract(X_l[:1, :2], X_a[:1, :2])])


def test_compact_memory_is_independent_of_the_number_of_reference_pixels():
    """The point of ACA: the per-frame memory is p x c, whatever m*h*w is; pixel-wise memory grows with it."""
    att, pix = CompactAttention(c=16, p=8).double(), PixelAttention()
    small, large = features(m=1), features(m=8)
    assert att.extract(*small[:2]).B_l.shape == att.extract(*large[:2]).B_l.shape
    assert pix.extract(*large[:2]).nbytes() == 8 * pix.extract(*small[:2]).nbytes()


def test_gradients_flow_to_all_three_feature_maps_but_not_the_bases_buffer():
    X_l, X_a, X_in = (t.clone().requires_grad_(True) for t in features())
    att = CompactAttention(c=16, p=8).double()
    X_basis, _ = att(X_in, X_l, X_a)
    X_basis.square().sum().backward()
    for name, t in (("X_l", X_l), ("X_a", X_a), ("X_in", X_in)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert not att.bases_init.requires_grad and att.bases_init.grad is None
    assert list(att.parameters()) == []


def test_only_the_last_em_iteration_carries_gradients():
    """The first s-1 iterations are truncated: the gradient equals that of a 1-iteration run from their result."""
    X_l, X_a, X_in = features(B=1)
    att = CompactAttention(c=16, p=8, s=3).double().eval()
    X1 = X_l.clone().requires_grad_(True)
    att(X_in, X1, X_a)[0].sum().backward()

    two = CompactAttention(c=16, p=8, s=2).double().eval()
    two.bases_init.copy_(att.bases_init)
    with torch.no_grad():
        B = two.extract(X_l, X_a).B_l  # the bases after the first two iterations
    one = CompactAttention(c=16, p=8, s=1).double().eval()
    one.bases_init.copy_(B[0])
    X2 = X_l.clone().requires_grad_(True)
    one(X_in, X2, X_a)[0].sum().backward()
    torch.testing.assert_close(X1.grad, X2.grad)


def test_training_mode_moves_the_initial_bases_and_eval_does_not():
    X_l, X_a, _ = features()
    att = CompactAttention(c=16, p=8).double()
    before = att.bases_init.clone()
    att.eval()
    att.extract(X_l, X_a)
    assert torch.equal(att.bases_init, before)
    att.train()
    bases = att.extract(X_l, X_a)
    assert not torch.allclose(att.bases_init, before)
    torch.testing.assert_close(att.bases_init.norm(dim=-1), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    # The moving average points towards the converged bases.
    target = torch.nn.functional.normalize(bases.B_l.mean(0), dim=-1)
    assert (att.bases_init * target).sum() > (before * target).sum()


def test_bad_shapes_and_wrong_memory_are_rejected():
    att, pix = CompactAttention(c=16, p=8), PixelAttention()
    X_l, X_a, X_in = features()
    with pytest.raises(ValueError, match=r"\(B, m, c, h, w\)"):
        att.extract(X_l[:, 0], X_a[:, 0])
    with pytest.raises(TypeError):
        att.aggregate(X_in, pix.extract(X_l, X_a))
    with pytest.raises(TypeError):
        pix.aggregate(X_in, att.extract(X_l.float(), X_a.float()))
    with pytest.raises(ValueError):
        Memory.cat([])
