"""One synthesis step of few-shot video-to-video translation with Adaptive Compact Attention (Huang et al. 2020).

The step is split by cache lifetime (DESIGN.md section 4), so a server never recomputes across one:

- ``encode_references``: per identity. E_a and E_l turn the reference images R_a and labels R_l into X_a, X_l.
- ``extract``: per reference set. Basis extraction (eqs 1-4) or, for the pixel baseline, the flattened keys.
- ``synthesize``: per frame. E_in (X_in), basis aggregation (eqs 5-6) into X_basis, weight generation and the
  SPADE generator (I_int), the flows f_r and f_p with their warps, and matting into the output I_a^t.

Matting (few-shot vid2vid, REFERENCES.md): ``out = raw * m_ref + ref_warp * (1 - m_ref)``, then with the previous
frame ``out = out * m_prev + prev_warp * (1 - m_prev)``. The second blend is weighted per sample by ``prev_valid``
(blend weight ``v * (1 - m_prev)``), so one batch can mix streams at their first frame (v = 0: the output equals a
run without a previous frame) with streams further along (v = 1).

``synthesize`` has no data-dependent Python control flow besides its ``None`` checks, so torch.export and ONNX
can trace it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from engine.config import ModelConfig
from engine.model.attention import Memory, build_attention
from engine.model.encoders import Encoder
from engine.model.flow import FlowNet, warp
from engine.model.generator import SPADEGenerator
from engine.model.weight_generator import WeightGenerator


@dataclasses.dataclass
class RefFeatures:
    """Encoder features of reference frames: the per-identity cache."""

    X_a: Tensor  # (B, m, c, h, w) from E_a(R_a)
    X_l: Tensor  # (B, m, c, h, w) from E_l(R_l)

    @property
    def n_refs(self) -> int:
        return int(self.X_a.shape[1])

    def select_refs(self, index: Tensor | Sequence[int]) -> RefFeatures:
        """The references at ``index`` (along m), for every sample: build a reference set from an identity's frames."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.X_a.device)
        return RefFeatures(X_a=self.X_a.index_select(1, idx), X_l=self.X_l.index_select(1, idx))

    @classmethod
    def cat(cls, items: Sequence[RefFeatures]) -> RefFeatures:
        """Stack several samples' features into one batch (they must have the same number of references)."""
        if not items:
            raise ValueError("cannot concatenate an empty list of reference features")
        return cls(X_a=torch.cat([r.X_a for r in items]), X_l=torch.cat([r.X_l for r in items]))


@dataclasses.dataclass
class Outputs:
    """Everything one step produces. The ``*_prev`` fields are None when no previous frame was given."""

    image: Tensor  # (B, 3, H, W) in [-1, 1]: I_a^t, the output frame
    raw: Tensor  # (B, 3, H, W): I_int^t, the SPADE generator's intermediate image
    ref_warp: Tensor  # (B, 3, H, W): the most attended reference warped by f_r
    prev_warp: Tensor | None  # (B, 3, H, W): the previous output warped by f_p
    mask_ref: Tensor  # (B, 1, H, W) in (0, 1): weight of raw against ref_warp
    mask_prev: Tensor | None  # (B, 1, H, W) in (0, 1): weight of the first blend against prev_warp
    flow_ref: Tensor  # (B, 2, H, W) pixels
    flow_prev: Tensor | None  # (B, 2, H, W) pixels
    ref_index: Tensor  # (B,) int64: the most attended reference (argmax of ref_weights), the one f_r warps
    ref_weights: Tensor  # (B, m): share of attention each reference received


def gather_reference(x: Tensor, index: Tensor) -> Tensor:
    """x (B, m, C, H, W), index (B,) -> x[b, index[b]] (B, C, H, W), by one gather (no loop, traceable)."""
    idx = index.view(-1, 1, 1, 1, 1).expand(-1, 1, *x.shape[2:])  # (B, 1, C, H, W)
    return x.gather(1, idx).squeeze(1)


def check_references(ref_images: Tensor, ref_labels: Tensor) -> None:
    if ref_images.dim() != 5 or ref_labels.dim() != 5 or ref_images.shape[:2] != ref_labels.shape[:2]:
        raise ValueError(
            "ref_images and ref_labels must be (B, m, C, H, W) with the same B and m; "
            f"got {tuple(ref_images.shape)} and {tuple(ref_labels.shape)}"
        )


class ACAVid2Vid(nn.Module):
    """The whole generator: encoders, reference attention, weight generator, SPADE generator, f_r and f_p."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Feature extraction (section 3.1): three encoders of one architecture, separate weights.
        self.E_a = Encoder(cfg.image_nc, cfg)
        self.E_l = Encoder(cfg.label_nc, cfg)
        self.E_in = Encoder(cfg.label_nc, cfg)
        self.attention = build_attention(cfg)
        self.generator = SPADEGenerator(cfg)
        self.weight_generator = WeightGenerator(cfg, self.generator.adaptive_specs)
        self.flow_ref = FlowNet(cfg)  # f_r
        self.flow_prev = FlowNet(cfg)  # f_p

    def encode_references(self, ref_images: Tensor, ref_labels: Tensor) -> RefFeatures:
        """R_a (B, m, 3, H, W) in [-1, 1], R_l (B, m, L, H, W) in [0, 1] -> X_a, X_l (B, m, c, h, w)."""
        check_references(ref_images, ref_labels)
        B, m = ref_images.shape[:2]
        X_a = self.E_a(ref_images.flatten(0, 1))  # (B*m, 3, H, W) -> (B*m, c, h, w)
        X_l = self.E_l(ref_labels.flatten(0, 1))
        return RefFeatures(X_a=X_a.unflatten(0, (B, m)), X_l=X_l.unflatten(0, (B, m)))  # (B, m, c, h, w)

    def extract(self, ref: RefFeatures) -> Memory:
        """Basis extraction (eqs 1-4): once per reference set."""
        return self.attention.extract(ref.X_l, ref.X_a)

    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor | None = None,
        prev_label: Tensor | None = None,
        prev_valid: Tensor | None = None,
    ) -> Outputs:
        """One frame. label I_l^t (B, L, H, W); ref_images/ref_labels (B, m, ., H, W) of the memory's references;
        prev_image I_a^{t-1} (B, 3, H, W) with its label (B, L, H, W); prev_valid (B,) float 0/1 (None: all 1)."""
        X_in = self.E_in(label)  # (B, c, h, w)
        X_basis, ref_weights = self.attention.aggregate(X_in, memory)  # (B, c, h, w), (B, m); eqs 5-6
        raw = self.generator(X_basis, label, self.weight_generator(X_basis))  # I_int (B, 3, H, W)

        # f_r warps the reference the frame attended to most (few-shot vid2vid picks it the same way).
        ref_index = ref_weights.argmax(dim=1)  # (B,) int64
        ref_image = gather_reference(ref_images, ref_index)  # (B, 3, H, W)
        flow_ref, mask_ref = self.flow_ref(label, gather_reference(ref_labels, ref_index), ref_image)
        ref_warp = warp(ref_image, flow_ref)
        image = raw * mask_ref + ref_warp * (1 - mask_ref)

        prev_warp = mask_prev = flow_prev = None
        if prev_image is not None:
            if prev_label is None:
                raise ValueError("prev_label is required with prev_image")
            flow_prev, mask_prev = self.flow_prev(label, prev_label, prev_image)
            prev_warp = warp(prev_image, flow_prev)
            blend = 1 - mask_prev  # (B, 1, H, W): weight of prev_warp
            if prev_valid is not None:
                # v = 0 gives blend 0 and image * 1 + prev_warp * 0: exactly the output without a previous frame.
                blend = blend * prev_valid.to(blend.dtype).view(-1, 1, 1, 1)
            image = image * (1 - blend) + prev_warp * blend

        return Outputs(
            image=image, raw=raw, ref_warp=ref_warp, prev_warp=prev_warp, mask_ref=mask_ref, mask_prev=mask_prev,
            flow_ref=flow_ref, flow_prev=flow_prev, ref_index=ref_index, ref_weights=ref_weights,
        )

    def forward(
        self,
        label: Tensor,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor | None = None,
        prev_label: Tensor | None = None,
        prev_valid: Tensor | None = None,
    ) -> Outputs:
        """encode_references, extract and synthesize in one call (training; no caching)."""
        memory = self.extract(self.encode_references(ref_images, ref_labels))
        return self.synthesize(label, memory, ref_images, ref_labels, prev_image, prev_label, prev_valid)


__all__ = ["ACAVid2Vid", "Outputs", "RefFeatures", "gather_reference"]
