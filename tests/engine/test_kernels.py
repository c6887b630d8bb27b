"""The fused kernels against the reference path (DESIGN.md habit 3).

The Triton kernel runs on CPU under TRITON_INTERPRET=1 (about 1000x slower than compiled: small sizes only). The
variable must be set before Triton is imported: tests/conftest.py does it. On a CUDA machine the `gpu` tests run
the compiled kernel at real sizes.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from engine import kernels
from engine.model.compact_attention import CompactAttention, aggregate_bases, em_pass, extract_bases


@pytest.fixture(scope="module")
def triton_kernel():
    """The kernel module, interpreted on CPU: tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported
    on machines without an NVIDIA GPU (the interpreter is chosen when Triton's own functions are decorated)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("compiled Triton runs in the gpu tests; the interpreter needs TRITON_INTERPRET=1 at start-up")
    return importlib.import_module("engine.kernels.compact_triton")


def feats(B, m, c, hw, p, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X_l = torch.randn(B, m, c, hw, generator=g).to(device)
    X_a = torch.randn(B, m, c, hw, generator=g).to(device)
    B_l = torch.nn.functional.normalize(torch.randn(B, p, c, generator=g), dim=-1).to(device)
    return X_l, X_a, B_l


@pytest.mark.parametrize(
    "B,m,c,hw,p",
    [(1, 2, 16, 64, 16), (2, 3, 16, 100, 8), (1, 1, 24, 40, 20)],  # pow2 sizes; padding of p, c; ragged tiles
)
def test_triton_em_pass_matches_the_reference(triton_kernel, B, m, c, hw, p):
    X_l, X_a, B_l = feats(B, m, c, hw, p)
    ref = em_pass(X_l, B_l, X_a)
    got = triton_kernel.em_pass_triton(X_l, B_l, X_a, block_n=16, chunk=32)
    for r, g in zip(ref, got, strict=True):
        assert g is not None and r is not None and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    no_a = triton_kernel.em_pass_triton(X_l, B_l, None, block_n=16, chunk=32)
    assert no_a[1] is None
    torch.testing.assert_close(no_a[0], ref[0], rtol=1e-4, atol=1e-4)


def test_triton_extraction_gives_the_same_bases(triton_kernel):
    X_l, X_a, _ = feats(1, 2, 16, 64, 16, seed=1)
    B_0 = torch.nn.functional.normalize(torch.randn(16, 16), dim=-1)
    with torch.no_grad():
        ref = extract_bases(X_l, X_a, B_0, s=3, lambda_=0.5)
        kernels_pass = triton_kernel.em_pass_triton
        # Run the same M-step with the kernel's pass, through the dispatch hook the CUDA path uses.
        orig = kernels.em_pass_for
        kernels.em_pass_for = lambda x, needs_grad: kernels_pass  # type: ignore[assignment]
        try:
            got = extract_bases(X_l, X_a, B_0, s=3, lambda_=0.5)
        finally:
            kernels.em_pass_for = orig  # type: ignore[assignment]
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_reference_path_is_used_on_cpu_and_with_gradients():
    x = torch.zeros(1)
    assert kernels.em_pass_for(x, needs_grad=False) is em_pass
    assert not kernels.use_fused(x, needs_grad=False)
    X_in, B_l, B_a = torch.randn(2, 10, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    share = torch.softmax(torch.randn(2, 4, 3), dim=-1)
    X_basis, w = kernels.aggregate(X_in, B_l, B_a, share)
    ref, A = aggregate_bases(X_in, B_l, B_a)
    torch.testing.assert_close(X_basis, ref)
    torch.testing.assert_close(w, A @ share)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,size", [(1, 32), (8, 64)])
def test_cuda_fused_attention_matches_reference(m, size):
    torch.manual_seed(0)
    att = CompactAttention(c=128, p=128).cuda().eval()
    X_l, X_a = torch.randn(2, m, 128, size, size, device="cuda"), torch.randn(2, m, 128, size, size, device="cuda")
    X_in = torch.randn(2, 128, size, size, device="cuda")
    with torch.no_grad():
        kernels.set_fused(False)
        ref_mem = att.extract(X_l, X_a)
        ref = att.aggregate(X_in, ref_mem)
        kernels.set_fused(True)
        mem = att.extract(X_l, X_a)
        got = att.aggregate(X_in, mem)
    for k in ("B_l", "B_a", "ref_share"):
        torch.testing.assert_close(getattr(mem, k), getattr(ref_mem, k), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[1], ref[1], rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_aggregation_uses_sdpa_and_matches():
    g = torch.Generator(device="cuda").manual_seed(0)
    X_in = torch.randn(2, 4096, 128, device="cuda", generator=g)
    B_l = torch.nn.functional.normalize(torch.randn(2, 128, 128, device="cuda", generator=g), dim=-1)
    B_a = torch.nn.functional.normalize(torch.randn(2, 128, 128, device="cuda", generator=g), dim=-1)
    share = torch.softmax(torch.randn(2, 128, 3, device="cuda", generator=g), dim=-1)
    ref, A = aggregate_bases(X_in, B_l, B_a)
    with torch.no_grad():
        got, w = kernels.aggregate(X_in.bfloat16(), B_l.bfloat16(), B_a.bfloat16(), share.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=3e-2)
    torch.testing.assert_close(w.float(), A @ share, rtol=0, atol=3e-2)


# ------------------------------------------------------------------ the single-launch extraction (_extract_kernel)


@pytest.mark.parametrize(
    "B,m,c,hw,p,s,lam",
    [
        (2, 2, 16, 40, 8, 3, 0.5),  # padding of p (8 -> 16), ragged last tile
        (1, 2, 16, 64, 16, 3, 0.3),  # powers of two throughout
        (2, 3, 24, 33, 20, 1, 0.5),  # s = 1: only the last iteration; padding of c and p
    ],
)
def test_triton_single_launch_extraction_matches_extract_bases(triton_kernel, B, m, c, hw, p, s, lam):
    X_l, X_a, _ = feats(B, m, c, hw, p, seed=2)
    g = torch.Generator().manual_seed(3)
    B_0 = torch.nn.functional.normalize(torch.randn(p, c, generator=g), dim=-1)
    with torch.no_grad():
        want = extract_bases(X_l, X_a, B_0, s=s, lambda_=lam)
    got = triton_kernel.extract_bases_triton(X_l, X_a, B_0, s, lam)
    for name, g_, w in zip(("B_l", "B_a", "ref_share"), got, want, strict=True):
        assert g_.shape == w.shape, name
        torch.testing.assert_close(g_, w, rtol=1e-4, atol=1e-4, msg=name)
    # ref_share: each basis's responsibility split over the m references sums to one.
    torch.testing.assert_close(got[2].sum(dim=-1), torch.ones(B, p), rtol=0, atol=1e-4)


def test_triton_single_launch_extraction_iterates(triton_kernel):
    """s and lambda reach the kernel: more iterations, or another momentum, move the bases as the reference does."""
    X_l, X_a, _ = feats(1, 2, 16, 32, 16, seed=4)
    B_0 = torch.nn.functional.normalize(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    one = triton_kernel.extract_bases_triton(X_l, X_a, B_0, 1, 0.5)[0]
    three = triton_kernel.extract_bases_triton(X_l, X_a, B_0, 3, 0.5)[0]
    slow = triton_kernel.extract_bases_triton(X_l, X_a, B_0, 3, 0.1)[0]
    assert (three - one).abs().max() > 1e-3 and (three - slow).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(slow, extract_bases(X_l, X_a, B_0, 3, 0.1)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_single_launch_extraction_matches_reference():
    from engine.kernels.compact_triton import extract_bases_triton

    X_l, X_a, _ = feats(2, 8, 128, 4096, 128, seed=6, device="cuda")
    B_0 = torch.nn.functional.normalize(torch.randn(128, 128, device="cuda"), dim=-1)
    with torch.no_grad():
        kernels.set_fused(False)  # the PyTorch reference, not the fused E-step pass
        try:
            want = extract_bases(X_l, X_a, B_0, s=3, lambda_=0.5)
        finally:
            kernels.set_fused(True)
    got = extract_bases_triton(X_l, X_a, B_0, 3, 0.5)
    for name, g_, w in zip(("B_l", "B_a", "ref_share"), got, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-3, atol=1e-3, msg=name)
