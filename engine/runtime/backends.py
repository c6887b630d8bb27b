"""Inference backends behind one interface (DESIGN.md habit 2): the one place that maps a backend name to code.

A backend runs the three cached stages of the model (DESIGN.md section 4) on batched tensors:

- ``encode(images, labels)``: per identity, R_a (n, 3, H, W) and R_l (n, L, H, W) -> X_a, X_l (n, c, h, w);
- ``extract(X_l, X_a)``: per reference set, (B, m, c, h, w) each -> a Memory;
- ``synthesize(...)``: per frame, -> the output image (B, 3, H, W) in [-1, 1].

The plain PyTorch model is the oracle every other backend is checked against. Backends, by the name that picks
them (``make_backend``, the ``backend`` argument of ``Synthesizer.load``):

- ``torch``: eager PyTorch (here);
- ``torch-compile``: the same modules through ``torch.compile`` (here);
- ``onnxruntime``: the three exported ONNX graphs in onnxruntime, CUDA or CPU (engine/runtime/onnx_backend.py);
- ``tensorrt``: FP16 TensorRT engines with the compact-attention plugin (engine/runtime/tensorrt_backend.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from engine.model.attention import Memory
from engine.model.vid2vid import ACAVid2Vid, RefFeatures


class Backend(Protocol):
    name: str
    model: ACAVid2Vid  # the architecture and weights; other backends run an export of it
    device: torch.device  # where the caller puts input tensors (outputs come back on it too)

    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]: ...

    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory: ...

    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor,
        prev_label: Tensor,
        prev_valid: Tensor,
    ) -> Tensor: ...


class TorchBackend:
    """Eager PyTorch in inference mode."""

    name = "torch"

    def __init__(self, model: ACAVid2Vid, device: str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ref = self.model.encode_references(images.unsqueeze(0), labels.unsqueeze(0))  # m = n, B = 1
        return ref.X_a[0], ref.X_l[0]

    @torch.inference_mode()
    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory:
        return self.model.extract(RefFeatures(X_a=X_a, X_l=X_l))

    @torch.inference_mode()
    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor,
        prev_label: Tensor,
        prev_valid: Tensor,
    ) -> Tensor:
        out = self.model.synthesize(label, memory, ref_images, ref_labels, prev_image, prev_label, prev_valid)
        return out.image


class TorchCompileBackend(TorchBackend):
    """TorchBackend with ``torch.compile`` (inductor) on the per-identity and per-frame stages.

    Extraction stays eager: it runs once per reference set (then cached), and its EM loop dispatches to the fused
    Triton pass on CUDA already. Shapes are left to dynamo (``dynamic=True`` hits an inductor range error here).
    """

    name = "torch-compile"

    def __init__(self, model: ACAVid2Vid, device: str = "cpu") -> None:
        super().__init__(model, device)
        self._encode = torch.compile(self.model.encode_references)
        self._synthesize = torch.compile(self.model.synthesize)

    @torch.inference_mode()
    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ref = self._encode(images.unsqueeze(0), labels.unsqueeze(0))  # m = n, B = 1
        return ref.X_a[0], ref.X_l[0]

    @torch.inference_mode()
    def synthesize(
        self,
        label: Tensor,
        memory: Memory,
        ref_images: Tensor,
        ref_labels: Tensor,
        prev_image: Tensor,
        prev_label: Tensor,
        prev_valid: Tensor,
    ) -> Tensor:
        return self._synthesize(label, memory, ref_images, ref_labels, prev_image, prev_label, prev_valid).image


BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


def available_backends() -> list[str]:
    """The backends that can run on this machine (tensorrt needs the tensorrt package and a CUDA GPU)."""
    import importlib.util

    names = ["torch", "torch-compile"]
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None:
        names.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        names.append("tensorrt")
    return names


def make_backend(
    name: str,
    model: ACAVid2Vid,
    *,
    model_id: str | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> Backend:
    """The one place that picks a backend by name.

    ``model_id`` keys the export caches of the onnxruntime and tensorrt backends (without it, a hash of the config
    and weights does); ``cache_dir`` is where those exports live (default ``~/.cache/aca/<backend>``).
    """
    if name == "torch":
        return TorchBackend(model, device)
    if name == "torch-compile":
        return TorchCompileBackend(model, device)
    if name == "onnxruntime":
        from engine.runtime.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, cache_dir=cache_dir, model_id=model_id, device=device)
    if name == "tensorrt":
        from engine.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, cache_dir=cache_dir, model_id=model_id, device=device)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
