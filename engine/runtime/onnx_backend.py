"""ONNX graphs of the model and the onnxruntime backend ("onnxruntime").

The runtime caches by lifetime (DESIGN.md section 4), so the model is exported as THREE graphs, each with a
dynamic batch axis (and a dynamic reference count m where references appear):

- ``encode``: per identity. E_a, E_l: images (N, 3, H, W), labels (N, L, H, W) -> X_a, X_l (N, c, h, w).
- ``extract``: per reference set. X_l, X_a (B, m, c, h, w) -> the memory: B_l, B_a (B, p, c), ref_share (B, p, m)
  for compact attention (basis extraction, paper eqs 1-4), keys, values (B, m*h*w, c) for the pixel baseline.
- ``frame``: per frame. label, the memory tensors, ref_images, ref_labels, prev_image, prev_label, prev_valid ->
  image (B, 3, H, W): E_in, basis aggregation (eqs 5-6), weight generation, the SPADE generator, f_r, f_p, matting.

The paper's deployment splits the model in two, (a) reference encoding with basis extraction and (b) the per-frame
synthesizer; we split (a) again because encoder features live per identity and bases per reference set.

Compact attention's extraction is ONE node, domain ``aca``, op type ``CompactAttention``. In torch it is the custom
op ``aca::compact_attention`` (``engine.model.compact_attention.extract_bases``, so it takes the fused Triton pass
on CUDA); the dynamo exporter's ``custom_translation_table`` maps it to an onnxscript function that emits the
custom-domain node. The node's schema is registered with ``onnx.defs.register_schema`` (so onnx.checker and
onnxscript know it) and every extract model carries a model-local FunctionProto ``aca.CompactAttention`` whose body
is the same EM iteration in standard opset-18 ops: onnxruntime runs the file as it is, and TensorRT (10.7+) puts
its registered plugin of that name in the function's place (engine/runtime/tensorrt_backend.py).

This module lives in engine/ (not export/) because the onnxruntime backend exports on first use and engine/ imports
nothing from export/; ``export/onnx.py`` is the user-facing command over it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, no_type_check

import numpy as np
import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT
from onnxscript import opset18 as op
from torch import Tensor, nn

from engine.model.attention import Memory
from engine.model.compact_attention import Bases, extract_bases
from engine.model.compact_attention import CompactAttention as CompactAttentionModule
from engine.model.pixel_attention import PixelMemory
from engine.model.vid2vid import ACAVid2Vid, RefFeatures

#: Bumped whenever the exported graphs change meaning: a cache entry of another version is re-exported.
FORMAT = "aca.onnx.v1"
OPSET = 18
DOMAIN = "aca"
OP_TYPE = "CompactAttention"
GRAPHS = ("encode", "extract", "frame")
MANIFEST = "manifest.json"
ACA_OPSET = onnxscript.values.Opset(DOMAIN, 1)


# ------------------------------------------------------------------------------------------- the custom op


@functools.cache
def compact_attention_op() -> Any:
    """``torch.ops.aca.compact_attention``, defined on first use (never at import time).

    (X_l (B, m, c, hw), X_a (B, m, c, hw), B_0 (p, c), s, lambda_) -> B_l (B, p, c), B_a (B, p, c),
    ref_share (B, p, m): paper eqs 1-4 by ``extract_bases``. Opaque to torch.export, so it stays one node.
    """

    @torch.library.custom_op("aca::compact_attention", mutates_args=())
    def compact_attention(
        X_l: Tensor, X_a: Tensor, B_0: Tensor, s: int, lambda_: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        B_l, B_a, ref_share = extract_bases(X_l, X_a, B_0, s, lambda_)
        # A custom op may not return views of its inputs; the transposed ref_share is one without the copy.
        return B_l.contiguous(), B_a.contiguous(), ref_share.contiguous()

    @compact_attention.register_fake
    def _(X_l: Tensor, X_a: Tensor, B_0: Tensor, s: int, lambda_: float) -> tuple[Tensor, Tensor, Tensor]:
        B, m = X_l.shape[0], X_l.shape[1]
        p, c = B_0.shape
        return X_l.new_empty(B, p, c), X_l.new_empty(B, p, c), X_l.new_empty(B, p, m)

    return torch.ops.aca.compact_attention.default


@functools.cache
def register_onnx_schema() -> None:
    """Register ``aca.CompactAttention`` (opset 1) with onnx so the checker and onnxscript know the node."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    param = OpSchema.FormalParameter
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        doc="Adaptive Compact Attention basis extraction (Huang et al. 2020, eqs 1-4), s EM iterations.",
        inputs=[
            param("X_l", "T", "label features (B, m, c, hw)"),
            param("X_a", "T", "appearance features (B, m, c, hw)"),
            param("B_0", "T", "initial bases (p, c)"),
        ],
        outputs=[param("B_l", "T", "semantic bases (B, p, c)"), param("B_a", "T", "appearance bases (B, p, c)"),
                 param("ref_share", "T", "share of each basis per reference (B, p, m)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute("s", OpSchema.AttrType.INT, "EM iterations"),
                    OpSchema.Attribute("lambda_", OpSchema.AttrType.FLOAT, "momentum of eq. 3")],
    )
    onnx.defs.register_schema(schema)


# The standard-op body of the FunctionProto: the same EM iteration as extract_bases, with all m*h*w pixels of a
# sample in one MatMul per step (extract_bases goes reference by reference; the sums are the same).
@onnxscript.script(ACA_OPSET, default_opset=op)
@no_type_check  # onnxscript's operator stubs are not meant for mypy
def CompactAttention(  # noqa: N802 (the ONNX op type)
    X_l: FLOAT, X_a: FLOAT, B_0: FLOAT, s: int, lambda_: float
) -> tuple[FLOAT, FLOAT, FLOAT]:
    lam = op.Constant(value_float=lambda_)
    one = op.Constant(value_float=1.0)
    eps = op.Constant(value_float=1e-6)
    n_free = op.Sub(op.Constant(value_int=s), op.Constant(value_int=1))
    batch = op.Shape(X_l, start=0, end=1)
    B_l = op.Expand(op.Unsqueeze(B_0, [0]), op.Concat(batch, op.Shape(B_0), axis=0))  # (B, p, c)
    Xt_l = op.Transpose(X_l, perm=[0, 1, 3, 2])  # (B, m, c, hw) -> (B, m, hw, c)
    for _ in range(n_free):  # the first s - 1 iterations, eqs 1-3
        A = op.Softmax(op.MatMul(op.Unsqueeze(B_l, [1]), X_l), axis=2)  # (B, m, p, hw): softmax over p, eq. 1
        AtX = op.ReduceSum(op.MatMul(A, Xt_l), [1], keepdims=0)  # (B, p, c)
        total = op.ReduceSum(A, [1, 3], keepdims=0)  # (B, p)
        mean = AtX / (eps + op.Unsqueeze(total, [2]))
        B_l = (one - lam) * B_l + lam * (mean / (eps + op.ReduceL2(mean, [2], keepdims=1)))  # eqs 2-3
    A = op.Softmax(op.MatMul(op.Unsqueeze(B_l, [1]), X_l), axis=2)  # the last map, shared with eq. 4
    AtX = op.ReduceSum(op.MatMul(A, Xt_l), [1], keepdims=0)
    AtX_a = op.ReduceSum(op.MatMul(A, op.Transpose(X_a, perm=[0, 1, 3, 2])), [1], keepdims=0)
    mass = op.ReduceSum(A, [3], keepdims=0)  # (B, m, p)
    total = op.ReduceSum(mass, [1], keepdims=0)  # (B, p)
    denom = eps + op.Unsqueeze(total, [2])
    mean = AtX / denom
    B_out = (one - lam) * B_l + lam * (mean / (eps + op.ReduceL2(mean, [2], keepdims=1)))  # eqs 2-3
    mean_a = AtX_a / denom
    B_a = mean_a / (eps + op.ReduceL2(mean_a, [2], keepdims=1))  # eq. 4
    ref_share = op.Transpose(mass / (eps + op.Unsqueeze(total, [1])), perm=[0, 2, 1])  # (B, m, p) -> (B, p, m)
    return B_out, B_a, ref_share


# The exporter inlines the onnxscript function it is given, so this one's only node is the custom-domain op; the
# op's schema must be registered before it is compiled.
register_onnx_schema()


@onnxscript.script(onnxscript.values.Opset("aca_translation", 1), default_opset=op)
def translate_compact_attention(
    X_l: FLOAT, X_a: FLOAT, B_0: FLOAT, s: int, lambda_: float
) -> tuple[FLOAT, FLOAT, FLOAT]:
    B_l, B_a, ref_share = ACA_OPSET.CompactAttention(X_l, X_a, B_0, s=s, lambda_=lambda_)
    return B_l, B_a, ref_share


def compact_attention_function_proto() -> Any:
    """The model-local FunctionProto ``aca.CompactAttention`` (standard opset-18 ops)."""
    return CompactAttention.to_function_proto()


# ------------------------------------------------------------------------------------------------ graphs


def memory_class(model: ACAVid2Vid) -> type[Memory]:
    return Bases if model.cfg.attention == "compact" else PixelMemory


def memory_names(model: ACAVid2Vid) -> tuple[str, ...]:
    """The memory's tensors in the order the extract graph outputs and the frame graph takes them."""
    return tuple(f.name for f in dataclasses.fields(memory_class(model)) if f.name != "n_refs")


def make_memory(model: ACAVid2Vid, tensors: Sequence[Tensor], n_refs: int) -> Memory:
    return memory_class(model)(n_refs, *tensors)


class EncodeGraph(nn.Module):
    """Per identity: E_a(R_a), E_l(R_l)."""

    def __init__(self, model: ACAVid2Vid) -> None:
        super().__init__()
        self.E_a, self.E_l = model.E_a, model.E_l

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.E_a(images), self.E_l(labels)  # (N, c, h, w) each


class ExtractGraph(nn.Module):
    """Per reference set: basis extraction through the custom op (compact), or the flattened keys (pixel)."""

    def __init__(self, model: ACAVid2Vid) -> None:
        super().__init__()
        self.attention = model.attention
        if isinstance(self.attention, CompactAttentionModule):
            compact_attention_op()

    def forward(self, X_l: Tensor, X_a: Tensor) -> tuple[Tensor, ...]:
        att = self.attention
        if isinstance(att, CompactAttentionModule):
            B, m, c, h, w = X_l.shape
            # (B, m, c, h, w) -> (B, m, c, hw): the layout extract_bases and the Triton kernel read.
            return tuple(
                torch.ops.aca.compact_attention(
                    X_l.reshape(B, m, c, h * w), X_a.reshape(B, m, c, h * w), att.bases_init, att.s, att.lambda_
                )
            )
        return tuple(att.extract(X_l, X_a).tensors().values())


class FrameGraph(nn.Module):
    """Per frame: ACAVid2Vid.synthesize against a memory given as its tensors; returns the output image."""

    def __init__(self, model: ACAVid2Vid) -> None:
        super().__init__()
        self.model = model

    def forward(self, label: Tensor, *args: Tensor) -> Tensor:
        k = len(memory_names(self.model))
        ref_images, ref_labels, prev_image, prev_label, prev_valid = args[k:]
        memory = make_memory(self.model, args[:k], ref_images.shape[1])
        return self.model.synthesize(
            label, memory, ref_images, ref_labels, prev_image, prev_label, prev_valid
        ).image


def example_inputs(
    model: ACAVid2Vid, batch: int = 2, m: int | None = None, seed: int = 0
) -> dict[str, tuple[Tensor, ...]]:
    """Random inputs of every graph, in the ranges the model sees (images in [-1, 1], labels in [0, 1])."""
    cfg = model.cfg
    m = cfg.n_refs if m is None else m
    g = torch.Generator().manual_seed(seed)
    S, L, h = cfg.image_size, cfg.label_nc, cfg.feat_size
    images = torch.rand(batch * m, cfg.image_nc, S, S, generator=g) * 2 - 1
    labels = torch.rand(batch * m, L, S, S, generator=g)
    with torch.no_grad():  # not inference_mode: the exporter traces with these tensors
        X_a, X_l = model.E_a(images), model.E_l(labels)
        X_l5, X_a5 = X_l.reshape(batch, m, cfg.c, h, h), X_a.reshape(batch, m, cfg.c, h, h)
        memory = model.extract(RefFeatures(X_a=X_a5, X_l=X_l5))
    frame = (
        torch.rand(batch, L, S, S, generator=g),
        *memory.tensors().values(),
        images.reshape(batch, m, cfg.image_nc, S, S),
        labels.reshape(batch, m, L, S, S),
        torch.rand(batch, cfg.image_nc, S, S, generator=g) * 2 - 1,
        torch.rand(batch, L, S, S, generator=g),
        (torch.arange(batch) % 2).float(),  # a mix of first frames (0) and later frames (1)
    )
    return {"encode": (images, labels), "extract": (X_l5, X_a5), "frame": frame}


def input_names(model: ACAVid2Vid, graph: str) -> list[str]:
    if graph == "encode":
        return ["images", "labels"]
    if graph == "extract":
        return ["X_l", "X_a"]
    return ["label", *memory_names(model), "ref_images", "ref_labels", "prev_image", "prev_label", "prev_valid"]


def output_names(model: ACAVid2Vid, graph: str) -> list[str]:
    return {"encode": ["X_a", "X_l"], "extract": list(memory_names(model)), "frame": ["image"]}[graph]


def _dynamic_shapes(model: ACAVid2Vid, graph: str) -> tuple[Any, ...]:
    """Dynamic axes per input, in input order: the batch everywhere, m wherever references appear (the frame
    graph's inputs after ``label`` are its ``*args``, hence the nested tuple)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    if graph == "encode":
        return ({0: batch}, {0: batch})
    m = torch.export.Dim("m", min=1, max=64)
    if graph == "extract":
        return ({0: batch, 1: m}, {0: batch, 1: m})
    # The memory's axes that grow with m: ref_share's last (B, p, m), the pixel baseline's keys (B, m*h*w, c).
    mem: dict[str, dict[int, Any]] = {name: {0: batch} for name in memory_names(model)}
    if model.cfg.attention == "compact":
        mem["ref_share"][2] = m
    else:
        hw = model.cfg.feat_size**2
        mem["keys"][1] = mem["values"][1] = m * hw
    per_sample = {0: batch}
    return (per_sample, (*mem.values(), {0: batch, 1: m}, {0: batch, 1: m}, per_sample, per_sample, per_sample))


def _graph_module(model: ACAVid2Vid, graph: str) -> nn.Module:
    return {"encode": EncodeGraph, "extract": ExtractGraph, "frame": FrameGraph}[graph](model).eval()


def export_graph(model: ACAVid2Vid, graph: str, path: Path) -> Path:
    """Export one graph to ``path`` (weights embedded) with the dynamo exporter at opset 18."""
    model = model.eval()
    module = _graph_module(model, graph)
    inputs = example_inputs(model)[graph]
    table: dict[Any, Any] = {}
    if graph == "extract" and model.cfg.attention == "compact":
        table = {compact_attention_op(): translate_compact_attention}
    with warnings.catch_warnings():
        # The exporter warns about renaming dims it merged and about its own internals: not actionable here.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET, custom_translation_table=table,
            input_names=input_names(model, graph), output_names=output_names(model, graph),
            dynamic_shapes=_dynamic_shapes(model, graph), optimize=True, verbose=False,
        )
    if program is None:
        raise RuntimeError(f"the exporter returned nothing for the {graph} graph")
    proto = program.model_proto
    if any(n.domain == DOMAIN for n in proto.graph.node):
        proto.functions.append(compact_attention_function_proto())
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def export_graphs(model: ACAVid2Vid, out_dir: Path, graphs: Sequence[str] = GRAPHS) -> dict[str, Path]:
    """Export the graphs into ``out_dir`` (``<graph>.onnx`` and ``manifest.json``), atomically per directory."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        for graph in graphs:
            export_graph(model, graph, tmp / f"{graph}.onnx")
        manifest = {
            "format": FORMAT, "opset": OPSET, "config": model.cfg.to_dict(), "graphs": list(graphs),
            "memory": list(memory_names(model)), "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {g: out_dir / f"{g}.onnx" for g in graphs}


def model_key(model: ACAVid2Vid, model_id: str | None = None) -> str:
    """A file-name-safe cache key: the model_id when known, else a hash of the config and the weights."""
    if model_id is None:
        h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        model_id = f"weights-{h.hexdigest()[:24]}"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model_id)
    return f"{safe}-{FORMAT.replace('.', '-')}"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "aca" / "onnx"


def cached_export(model: ACAVid2Vid, cache_dir: Path | None = None, model_id: str | None = None) -> Path:
    """The directory of the model's exported graphs, exporting them the first time."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / model_key(model, model_id)
    manifest = out / MANIFEST
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("format") == FORMAT and data.get("config") == model.cfg.to_dict():
            return out
    export_graphs(model, out)
    return out


# ------------------------------------------------------------------------------------------------ backend


def ort_providers(device: str) -> list[str]:
    """CUDA first when asked for and present, always CPU last (onnxruntime falls back to it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device {device!r} needs onnxruntime's CUDAExecutionProvider; available: {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """onnxruntime InferenceSessions over the three exported graphs; tensors cross as numpy (zero-copy on CPU)."""

    name = "onnxruntime"
    device = torch.device("cpu")  # inputs and outputs cross as host tensors

    def __init__(
        self,
        model: ACAVid2Vid,
        cache_dir: Path | None = None,
        model_id: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model = model.eval()
        self.directory = cached_export(self.model, cache_dir, model_id)
        register_onnx_schema()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ort_providers(device)
        self.sessions = {
            g: ort.InferenceSession(str(self.directory / f"{g}.onnx"), options, providers=providers) for g in GRAPHS
        }
        self._inputs = {g: input_names(self.model, g) for g in GRAPHS}

    def _run(self, graph: str, *tensors: Tensor) -> list[Tensor]:
        feed = {n: t.detach().float().contiguous().numpy() for n, t in zip(self._inputs[graph], tensors, strict=True)}
        return [torch.from_numpy(np.asarray(o)) for o in self.sessions[graph].run(None, feed)]

    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        X_a, X_l = self._run("encode", images, labels)
        return X_a, X_l

    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory:
        return make_memory(self.model, self._run("extract", X_l, X_a), int(X_l.shape[1]))

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
        (image,) = self._run(
            "frame", label, *memory.tensors().values(), ref_images, ref_labels, prev_image, prev_label, prev_valid
        )
        return image
