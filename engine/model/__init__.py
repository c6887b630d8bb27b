"""The ACA model: one module per paper component (DESIGN.md section 3).

encoders (E_a, E_l, E_in), attention / compact_attention / pixel_attention (eqs 1-6 and the pixel-wise baseline),
weight_generator (the hyper-network), generator (SPADE), flow (f_r, f_p, warping) and vid2vid (the whole step).
"""

from __future__ import annotations

from engine.model.attention import build_attention
from engine.model.vid2vid import ACAVid2Vid, Outputs, RefFeatures

__all__ = ["ACAVid2Vid", "Outputs", "RefFeatures", "build_attention"]
