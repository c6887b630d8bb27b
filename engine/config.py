"""Typed architecture configuration of the ACA model (../shared/DESIGN.md section 2).

Only dataclasses live here: no I/O and no environment reads. Runtime settings (paths, backends, limits) belong to
``server/settings.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

AttentionKind = Literal["compact", "pixel"]

#: Label channels drawn by engine/labels.py: 0 face oval and nose, 1 brows, eyes and irises, 2 outer and inner lips.
LABEL_CHANNELS = 3


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the few-shot vid2vid generator with Adaptive Compact Attention.

    Symbols follow the paper: the encoders output ``c x h x w`` features with ``h = image_size / 2**feat_downsample``;
    ``p`` bases are extracted with ``s`` EM iterations and momentum ``lambda_`` (eqs 1-3).
    """

    name: str = "custom"
    image_size: int = 256
    image_nc: int = 3
    label_nc: int = LABEL_CHANNELS
    # Encoders E_a, E_l, E_in (paper section 3.1): k conv layers, the first feat_downsample of stride 2 after the stem.
    ngf: int = 32
    k: int = 5
    feat_downsample: int = 2
    c: int = 128
    # Compact attention (eqs 1-6). The paper does not give lambda; 0.5 weighs the running bases and the new estimate
    # equally, which keeps B_l from collapsing in the first iteration while converging within s = 3.
    attention: AttentionKind = "compact"
    p: int = 128
    s: int = 3
    lambda_: float = 0.5
    # References used per frame (the Delaunay triangle gives 3; more expand to neighbouring triangles).
    n_refs: int = 3
    # SPADE generator: it runs at the feature resolution and upsamples feat_downsample times back to image_size;
    # the finest n_adaptive_layers SPADE layers get their modulation weights from X_basis (the hyper-network).
    gen_max_channels: int = 512
    n_adaptive_layers: int = 2
    spade_hidden: int = 64
    weight_gen_hidden: int = 128
    # Flow networks f_r and f_p (few-shot vid2vid): flow_downsample stride-2 convs, n_flow_blocks residual blocks.
    flow_ngf: int = 32
    flow_downsample: int = 3
    n_flow_blocks: int = 2
    flow_scale: float = 20.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size % (2 ** max(self.feat_downsample, self.flow_downsample)) != 0:
            raise ValueError("image_size must be divisible by 2**feat_downsample and 2**flow_downsample")
        if self.feat_downsample > self.k - 1:
            raise ValueError("an encoder of k layers has at most k - 1 strided layers")
        if self.attention not in ("compact", "pixel"):
            raise ValueError(f"attention must be 'compact' or 'pixel', not {self.attention!r}")
        if not 0.0 < self.lambda_ <= 1.0:
            raise ValueError("lambda_ must be in (0, 1]")
        if self.n_adaptive_layers > self.feat_downsample + 1:
            raise ValueError("n_adaptive_layers exceeds the generator's SPADE layers")

    @property
    def feat_size(self) -> int:
        """h = w of the encoder features."""
        return self.image_size // 2**self.feat_downsample

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # Paper settings (section 4.2): p = 128, s = 3 for faces; p = 256 for bodies.
    "face-256": ModelConfig(name="face-256", image_size=256, ngf=32, c=128, p=128, s=3),
    "body-256": ModelConfig(name="body-256", image_size=256, ngf=32, c=128, p=256, s=3),
    # Trains on this CPU in about an hour.
    "face-128": ModelConfig(
        name="face-128", image_size=128, ngf=16, c=64, p=64, s=3, gen_max_channels=128, spade_hidden=32,
        weight_gen_hidden=64, flow_ngf=16, n_flow_blocks=1,
    ),
    # The shipped model (models/aca-face-64.pt) and the paper-table comparisons: what trains on 2 shared CPU cores
    # in under an hour. 16x16 features, so m = 3 references hold 768 positions and p = 32 bases summarise them
    # (about the paper's p / (m h w) ratio at 256 px, where 128 bases summarise several 64x64 feature maps).
    "face-64": ModelConfig(
        name="face-64", image_size=64, ngf=16, c=32, p=32, s=3, gen_max_channels=64, spade_hidden=16,
        weight_gen_hidden=32, flow_ngf=16, n_flow_blocks=1,
    ),
    # For tests: every component, CPU-sized.
    "tiny": ModelConfig(
        name="tiny", image_size=64, ngf=8, c=16, p=8, s=3, gen_max_channels=32, spade_hidden=8, weight_gen_hidden=16,
        flow_ngf=8, n_flow_blocks=1, n_adaptive_layers=2,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced (``preset("tiny", attention="pixel")``)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return cfg.with_(**overrides) if overrides else cfg
