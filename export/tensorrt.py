"""``aca export tensorrt``: FP16 TensorRT engines of the three ONNX graphs, with the compact-attention plugin.

The plugin, the profiles and the engine runner live in engine/runtime/tensorrt_backend.py (the tensorrt backend
builds engines on first use); this module is the user-facing build. It needs the tensorrt package (10.x) and a
CUDA GPU, neither of which this project's machines have: ``export_tensorrt`` raises with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.model.vid2vid import ACAVid2Vid
from engine.runtime.onnx_backend import GRAPHS
from engine.runtime.tensorrt_backend import (
    DEFAULT_BATCH_SIZES,
    build_engine,
    prepare_onnx,
    tensorrt_unavailable_reason,
)
from export.onnx import export_onnx


def export_tensorrt(
    model: ACAVid2Vid, out_dir: Path, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, fp16: bool = True
) -> dict[str, Path]:
    """ONNX export into ``out_dir``, then ``<graph>.engine`` per graph with one optimisation profile per bucket."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build TensorRT engines: {reason}")
    out_dir = Path(out_dir)
    onnx_paths = export_onnx(model, out_dir)
    cfg = model.cfg
    engines = {}
    for graph in GRAPHS:
        prepared = prepare_onnx(onnx_paths[graph], out_dir / f"{graph}.trt.onnx")
        engines[graph] = build_engine(
            prepared, out_dir / f"{graph}.engine", cfg.n_refs, cfg.feat_size**2, batch_sizes, fp16=fp16
        )
    return engines
