"""The generator side of the ACA model (engine/model): shapes on every preset, gradients, batching and caching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.config import PRESETS, preset
from engine.model import ACAVid2Vid, Outputs, RefFeatures
from engine.model.attention import Memory
from engine.model.encoders import Encoder
from engine.model.flow import warp
from engine.model.generator import SPADE
from engine.model.weight_generator import per_sample_conv1x1

KINDS = ("compact", "pixel")
FIELDS = [f.name for f in dataclasses.fields(Outputs)]
PREV_FIELDS = ("prev_warp", "mask_prev", "flow_prev")


def run(model: ACAVid2Vid, x, prev: bool = True, prev_valid: torch.Tensor | None = None) -> Outputs:
    with torch.no_grad():
        return model(
            x.label, x.ref_images, x.ref_labels,
            x.prev_image if prev else None, x.prev_label if prev else None, prev_valid,
        )


def assert_outputs_close(got: Outputs, want: Outputs, b: int | None, atol: float, fields=FIELDS) -> None:
    """``got`` (sample b of a batch, or all of it when b is None) equals ``want`` field by field."""
    for name in fields:
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        g = g[b : b + 1] if b is not None else g
        if g.dtype == torch.int64:
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=lambda s, n=name: f"{n}: {s}")


#: ref_weights of a batch and of separate runs differ by rounding (about 6e-8 here); a gap between the two most
#: attended references well above that makes their argmax (ref_index) comparable between runs.
ARGMAX_MARGIN = 1e-5


def top2_margin(ref_weights: torch.Tensor) -> float:
    """Gap between the two most attended references, the smallest over the batch."""
    top = ref_weights.topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_shapes_and_values(name, kind, make_model, make_inputs):
    cfg = preset(name, attention=kind)
    B, m = (1, 2) if cfg.image_size >= 256 else (2, 3)  # the 256 presets take about 1 s per forward on CPU
    H, L = cfg.image_size, cfg.label_nc
    model = make_model(cfg, kind)
    x = make_inputs(cfg, B, m)
    out = run(model, x, prev=True, prev_valid=torch.ones(B))

    for name_ in ("image", "raw", "ref_warp", "prev_warp"):
        assert getattr(out, name_).shape == (B, 3, H, H), name_
    for name_ in ("mask_ref", "mask_prev"):
        assert getattr(out, name_).shape == (B, 1, H, H), name_
    for name_ in ("flow_ref", "flow_prev"):
        assert getattr(out, name_).shape == (B, 2, H, H), name_
    assert out.ref_weights.shape == (B, m) and out.ref_index.shape == (B,) and out.ref_index.dtype == torch.int64
    for name_ in FIELDS:
        assert torch.isfinite(getattr(out, name_).float()).all(), name_
    assert out.image.abs().max() <= 1 and out.raw.abs().max() <= 1
    for mask in (out.mask_ref, out.mask_prev):
        assert ((mask >= 0) & (mask <= 1)).all()
    torch.testing.assert_close(out.ref_weights.sum(dim=1), torch.ones(B))
    assert torch.equal(out.ref_index, out.ref_weights.argmax(dim=1))
    # Label channels enter where the config says: encoders E_l and E_in read L channels.
    assert model.E_in.net[0].in_channels == L and model.E_a.net[0].in_channels == 3

    # Untrained, the flow heads are zero: both warps are the identity on the chosen reference and previous frame.
    assert not out.flow_ref.any() and not out.flow_prev.any()
    chosen = x.ref_images[torch.arange(B), out.ref_index]  # (B, 3, H, W)
    torch.testing.assert_close(out.ref_warp, chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.prev_warp, x.prev_image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind, make_model, make_inputs, tiny_cfg):
    model = make_model(tiny_cfg, kind).train()
    x = make_inputs(tiny_cfg, B=2, m=2)
    out = model(x.label, x.ref_images, x.ref_labels, x.prev_image, x.prev_label, torch.ones(2))
    loss = (out.image - x.prev_image).abs().mean()
    loss.backward()

    no_grad = [
        n for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert no_grad == []
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_state_that_does_not_learn_by_gradient_is_pinned(kind, make_model, make_inputs, tiny_cfg):
    """Everything outside ``parameters()`` and why: these are the only tensors a backward must not reach.

    - attention.bases_init (compact only): the initial bases B_0 are a moving average of converged bases, updated
      in training mode by extract (EMANet's scheme), never by gradient, so that inference is deterministic.
    - the spectral-norm power-iteration vectors (_u, _v) of the weight generator's Linear layers.
    """
    model = make_model(tiny_cfg, kind).train()
    expected = {
        f"weight_generator.layers.{i}.trunk.{j}.parametrizations.weight.0.{v}"
        for i in range(tiny_cfg.n_adaptive_layers) for j in (0, 2) for v in ("_u", "_v")
    }
    if kind == "compact":
        expected.add("attention.bases_init")
    assert {n for n, _ in model.named_buffers()} == expected

    before = {n: b.clone() for n, b in model.named_buffers()}
    x = make_inputs(tiny_cfg, B=2, m=2)
    out = model(x.label, x.ref_images, x.ref_labels, x.prev_image, x.prev_label, torch.ones(2))
    out.image.mean().backward()
    for n, b in model.named_buffers():
        assert not b.requires_grad and b.grad is None, n
    if kind == "compact":  # the moving average moved in training mode
        assert not torch.equal(before["attention.bases_init"], model.attention.bases_init)


# An untrained compact model's X_basis is nearly constant over space (its appearance bases B_a all sit near the mean
# of X_a until E_a and E_l learn to agree), and the generator's InstanceNorm divides that small variation by its small
# std: float32 rounding differences between batch shapes (~1e-7) come out of the generator near 1e-3. float64 keeps
# these checks about logic (no sample sees another) rather than about an untrained model's conditioning; the pixel
# baseline, better conditioned at initialisation, is checked in float32 as well.
BATCH_CASES = [
    pytest.param("compact", torch.float64, id="compact-float64"),
    pytest.param("pixel", torch.float64, id="pixel-float64"),
    pytest.param("pixel", torch.float32, id="pixel-float32"),
]


@pytest.mark.parametrize(("kind", "dtype"), BATCH_CASES)
def test_batch_equals_separate_runs(kind, dtype, make_model, make_inputs, tiny_cfg):
    model = make_model(tiny_cfg, kind).to(dtype)
    B = 3
    x = make_inputs(tiny_cfg, B=B, m=3, seed=1).to(dtype)
    batched = run(model, x, prev=True, prev_valid=torch.ones(B, dtype=dtype))
    assert top2_margin(batched.ref_weights) > ARGMAX_MARGIN, "inputs too symmetric: argmax could flip on rounding"
    for b in range(B):
        single = run(model, x.sample(b), prev=True, prev_valid=torch.ones(1, dtype=dtype))
        assert_outputs_close(batched, single, b, atol=1e-5)


@pytest.mark.parametrize(("kind", "dtype"), BATCH_CASES)
def test_mixed_prev_valid_equals_separate_runs(kind, dtype, make_model, make_inputs, tiny_cfg):
    """Streams at their first frame (v = 0) and later frames (v = 1) share one pass."""
    model = make_model(tiny_cfg, kind).to(dtype)
    valid = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype)
    x = make_inputs(tiny_cfg, B=4, m=2, seed=2).to(dtype)
    batched = run(model, x, prev=True, prev_valid=valid)
    assert top2_margin(batched.ref_weights) > ARGMAX_MARGIN
    for b in range(4):
        if valid[b]:
            single = run(model, x.sample(b), prev=True, prev_valid=torch.ones(1, dtype=dtype))
            assert_outputs_close(batched, single, b, atol=1e-5)
        else:
            single = run(model, x.sample(b), prev=False)
            assert_outputs_close(batched, single, b, atol=1e-5, fields=[f for f in FIELDS if f not in PREV_FIELDS])
    # The valid samples really used their previous frame.
    no_prev = run(model, x, prev=False)
    assert (batched.image[1] - no_prev.image[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_cached_memory_equals_forward(kind, make_model, make_inputs, tiny_cfg):
    """Extract once per reference set, synthesize many frames: the same numbers as a full forward each time."""
    model = make_model(tiny_cfg, kind)
    refs = make_inputs(tiny_cfg, B=2, m=3, seed=3)
    with torch.no_grad():
        memory = model.extract(model.encode_references(refs.ref_images, refs.ref_labels))
        for seed in (4, 5, 6):
            frame = make_inputs(tiny_cfg, B=2, m=3, seed=seed)
            cached = model.synthesize(
                frame.label, memory, refs.ref_images, refs.ref_labels, frame.prev_image, frame.prev_label,
            )
            full = model(frame.label, refs.ref_images, refs.ref_labels, frame.prev_image, frame.prev_label)
            assert_outputs_close(cached, full, None, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_sets_cached_separately_batch_together(kind, make_model, make_inputs, tiny_cfg):
    """The serving path: per-identity features, a reference set picked from them, memories of streams batched.

    In float64, for the reason given at BATCH_CASES."""
    model = make_model(tiny_cfg, kind).double()
    a = make_inputs(tiny_cfg, B=1, m=5, seed=7).to(torch.float64)
    b = make_inputs(tiny_cfg, B=1, m=5, seed=8).to(torch.float64)
    pick = [3, 0, 4]
    with torch.no_grad():
        feats_a = model.encode_references(a.ref_images, a.ref_labels).select_refs(pick)
        direct = model.encode_references(a.ref_images[:, pick], a.ref_labels[:, pick])
        torch.testing.assert_close(feats_a.X_a, direct.X_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(feats_a.X_l, direct.X_l, atol=1e-5, rtol=0)

        feats_b = model.encode_references(b.ref_images, b.ref_labels).select_refs(pick)
        memories = [model.extract(feats_a), model.extract(feats_b)]
        batched_memory = type(memories[0]).cat(memories)
        assert isinstance(batched_memory, Memory) and batched_memory.batch_size == 2
        torch.testing.assert_close(model.extract(RefFeatures.cat([feats_a, feats_b])).tensors(),
                                   batched_memory.tensors(), atol=1e-5, rtol=0)

        ri = torch.cat([a.ref_images[:, pick], b.ref_images[:, pick]])
        rl = torch.cat([a.ref_labels[:, pick], b.ref_labels[:, pick]])
        label = torch.cat([a.label, b.label])
        batched = model.synthesize(label, batched_memory, ri, rl)
        for i, (mem, x) in enumerate(zip(memories, (a, b), strict=True)):
            single = model.synthesize(x.label, mem, x.ref_images[:, pick], x.ref_labels[:, pick])
            assert_outputs_close(batched, single, i, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_is_deterministic(kind, make_model, make_inputs, tiny_cfg):
    model = make_model(tiny_cfg, kind)
    x = make_inputs(tiny_cfg, B=2, m=3)
    first = run(model, x, prev=True, prev_valid=torch.tensor([1.0, 0.0]))
    second = run(model, x, prev=True, prev_valid=torch.tensor([1.0, 0.0]))
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", range(1, 9))
def test_one_to_eight_references(m, kind, make_model, make_inputs, tiny_cfg):
    model = make_model(tiny_cfg, kind)
    x = make_inputs(tiny_cfg, B=1, m=m, seed=m)
    out = run(model, x, prev=False)
    H = tiny_cfg.image_size
    assert out.image.shape == (1, 3, H, H) and torch.isfinite(out.image).all()
    assert out.ref_weights.shape == (1, m) and 0 <= int(out.ref_index) < m
    torch.testing.assert_close(out.ref_weights.sum(dim=1), torch.ones(1))
    assert out.prev_warp is None and out.mask_prev is None and out.flow_prev is None


def test_prev_image_needs_prev_label(make_model, make_inputs, tiny_cfg):
    model = make_model(tiny_cfg)
    x = make_inputs(tiny_cfg, B=1, m=2)
    with pytest.raises(ValueError, match="prev_label"):
        model(x.label, x.ref_images, x.ref_labels, x.prev_image, None)


def test_encoders_share_one_architecture(tiny_cfg, make_model):
    """Section 3.1: k conv layers, the same output shape c x h x w for E_a, E_l and E_in."""
    cfg = tiny_cfg
    model = make_model(cfg)
    strides = [1] + [2] * cfg.feat_downsample + [1] * (cfg.k - 1 - cfg.feat_downsample)
    shapes = []
    for enc in (model.E_a, model.E_l, model.E_in):
        convs = [mod for mod in enc.modules() if isinstance(mod, torch.nn.Conv2d)]
        assert [c.stride[0] for c in convs] == strides and convs[-1].out_channels == cfg.c
        assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in enc.modules())
        shapes.append([tuple(p.shape) for p in enc.parameters()][1:])  # all but the stem (its input differs)
    assert shapes[0] == shapes[1] == shapes[2]
    feats = Encoder(5, cfg)(torch.rand(2, 5, cfg.image_size, cfg.image_size))
    assert feats.shape == (2, cfg.c, cfg.feat_size, cfg.feat_size)


def test_generator_adapts_only_the_finest_layers(make_model):
    cfg = preset("face-128")
    model = make_model(cfg)
    blocks = list(model.generator.blocks)
    flags = [b.adaptive for b in blocks]
    assert flags == [False] * (len(blocks) - cfg.n_adaptive_layers) + [True] * cfg.n_adaptive_layers
    for block in blocks:
        spades = [mod for mod in block.modules() if isinstance(mod, SPADE)]
        assert spades and all((s.mlp_gamma is None) == block.adaptive for s in spades)
    x = torch.randn(2, cfg.c, cfg.feat_size, cfg.feat_size)
    theta = model.weight_generator(x)
    for spec, layer in zip(model.generator.adaptive_specs, theta, strict=True):
        for o, w in zip(spec, layer, strict=True):
            assert w.gamma_w.shape == w.beta_w.shape == (2, o, cfg.spade_hidden)
            assert w.gamma_b.shape == w.beta_b.shape == (2, o)
    # The generated weights are per sample: two different X_basis give two different convs.
    assert not torch.allclose(theta[0][0].gamma_w[0], theta[0][0].gamma_w[1])


def test_per_sample_conv1x1_matches_conv2d():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 6, generator=gen)
    w = torch.randn(3, 7, 5, generator=gen)
    b = torch.randn(3, 7, generator=gen)
    got = per_sample_conv1x1(x, w, b)
    want = torch.cat([F.conv2d(x[i : i + 1], w[i, :, :, None, None], b[i]) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_warp_pixel_offsets():
    """flow is in pixels: out[y, x] = image[y + fy, x + fx], borders repeat (REFERENCES.md)."""
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 9, 12, generator=gen)
    zero = torch.zeros(2, 2, 9, 12)
    torch.testing.assert_close(warp(img, zero), img, atol=1e-5, rtol=0)

    flow = zero.clone()
    flow[:, 0] = 1.0  # sample one pixel to the right
    flow[:, 1] = -2.0  # and two pixels up
    out = warp(img, flow)
    want = torch.empty_like(img)
    for y in range(9):
        for x in range(12):
            want[..., y, x] = img[..., max(y - 2, 0), min(x + 1, 11)]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)

    half = zero.clone()
    half[:, 0] = 0.5
    torch.testing.assert_close(
        warp(img, half)[..., :-1], (img[..., :-1] + img[..., 1:]) / 2, atol=1e-5, rtol=0
    )
