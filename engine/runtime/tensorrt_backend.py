"""TensorRT engines of the three exported graphs, with compact attention as a plugin ("tensorrt").

Written against TensorRT's documented Python API (10.x) and NVIDIA's ``samples/python/quickly_deployable_plugins``;
``tensorrt`` is imported lazily, only here. TensorRT cannot be installed on our build or GPU machines
(REFERENCES.md, "Export references"), so this file has not been executed: tests/export/test_tensorrt.py skips with
that reason, and the pieces that need no TensorRT (the ONNX rewrite, the profiles) are tested on their own.

- The plugin ``aca::CompactAttention`` (``tensorrt.plugin``): ``@trtp.register`` gives output shapes and types
  (B_l, B_a (B, p, c), ref_share (B, p, m) from X_l (B, m, c, hw) and B_0 (p, c)); ``@trtp.autotune`` keeps it in
  FP32 inside an FP16 engine (the EM softmax over p bases and the 1e-6-guarded normalisations are where half
  precision hurts); ``@trtp.impl`` runs ``extract_bases`` on TensorRT's stream, which takes the fused Triton E-step
  pass (engine/kernels/compact_triton.py ``_em_pass_kernel``) on CUDA.
- The ONNX parser maps the ``aca.CompactAttention`` node to the plugin by op type and namespace (the node's domain
  from TensorRT 10.10, the ``plugin_namespace`` attribute before; both are set), and from 10.7 a registered plugin
  takes priority over the model-local function of the same name.
- ``compile_em_pass_ptx`` compiles ``_em_pass_kernel`` ahead of time (``triton.compile`` of an ``ASTSource``, as
  ``@trtp.aot_impl`` requires). An ``aot_impl`` returns ONE kernel launch, and the E-step pass is one of 2s launches
  plus the M-step arithmetic of the whole op, so the AOT plugin needs a kernel that runs all s iterations; until
  the kernels have one, the plugin uses the JIT ``impl`` (the engine then needs Python and this module at run time).
- Optimisation profiles: one per batch bucket the workers use (``batch_sizes``, default 1 and 8), each min..max
  of its bucket with opt at the bucket size; m spans 1..cfg.n_refs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.model.attention import Memory
from engine.model.vid2vid import ACAVid2Vid

PLUGIN = "aca::CompactAttention"
DEFAULT_BATCH_SIZES = (1, 8)


def tensorrt_unavailable_reason() -> str | None:
    """Why the tensorrt backend cannot run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (it cannot be installed on this project's machines)"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible"
    return None


# ------------------------------------------------------------------------------------------------- plugin


@functools.cache
def register_plugin() -> None:
    """Register ``aca::CompactAttention`` with TensorRT's Python plugin registry (once per process)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN)
    def _desc(
        X_l: trtp.TensorDesc, X_a: trtp.TensorDesc, B_0: trtp.TensorDesc, s: int, lambda_: float
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        B, m = X_l.shape_expr[0], X_l.shape_expr[1]
        p, c = B_0.shape_expr[0], B_0.shape_expr[1]
        B_l = trtp.from_shape_expr((B, p, c), dtype=trt.float32)
        B_a = trtp.from_shape_expr((B, p, c), dtype=trt.float32)
        return B_l, B_a, trtp.from_shape_expr((B, p, m), dtype=trt.float32)

    @trtp.autotune(PLUGIN)
    def _autotune(X_l: Any, X_a: Any, B_0: Any, outputs: Any) -> list[Any]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, FP32, FP32", "LINEAR")]

    @trtp.impl(PLUGIN)
    def _impl(
        X_l: trtp.Tensor, X_a: trtp.Tensor, B_0: trtp.Tensor, s: int, lambda_: float,
        outputs: tuple[trtp.Tensor, ...], stream: int,
    ) -> None:
        from engine.model.compact_attention import extract_bases

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
            x_l, x_a = torch.as_tensor(X_l, device="cuda"), torch.as_tensor(X_a, device="cuda")
            b_0 = torch.as_tensor(B_0, device="cuda")
            for out, value in zip(outputs, extract_bases(x_l, x_a, b_0, int(s), float(lambda_)), strict=True):
                torch.as_tensor(out, device="cuda").copy_(value)


def compile_em_pass_ptx(
    p: int, c: int, block_n: int = 32, chunk: int = 1024, with_a: bool = True
) -> tuple[str, str, int, int]:
    """Compile ``_em_pass_kernel`` ahead of time for p bases and c channels: (kernel name, PTX, threads per block,
    shared memory bytes), what ``@trtp.aot_impl`` hands TensorRT. Needs Triton and a CUDA GPU."""
    import triton

    from engine.kernels.compact_triton import _em_pass_kernel, _pow2

    P, C = _pow2(p), _pow2(c)
    # Pointers X, X_a, B_l, AtX, AtX_a, mass; then M, HW, C_REAL, P_REAL, n_chunks and the three X strides.
    signature = {name: "*fp32" for name in ("X_ptr", "Xa_ptr", "Bl_ptr", "AtX_ptr", "AtXa_ptr", "mass_ptr")}
    for name in ("M", "HW", "C_REAL", "P_REAL", "n_chunks", "stride_xb", "stride_xm", "stride_xc"):
        signature[name] = "i32"
    constexprs = {"P": P, "C": C, "BLOCK_N": block_n, "CHUNK": chunk, "WITH_A": with_a}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=_em_pass_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, options={"num_warps": 8 if P * C >= 128 * 128 else 4})
    return kernel.metadata.name, kernel.asm["ptx"], kernel.metadata.num_warps * 32, kernel.metadata.shared


# ---------------------------------------------------------------------------------------------- the ONNX


def prepare_onnx(src: Path, dst: Path) -> Path:
    """A copy of an exported graph for TensorRT's parser: every ``aca`` node gets ``plugin_namespace="aca"``
    (TensorRT before 10.10 reads the namespace from it, later ones from the domain)."""
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.domain == "aca" and not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("plugin_namespace", "aca"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def batch_profiles(batch_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch of one optimisation profile per bucket: (1, 8) -> [(1, 1, 1), (2, 8, 8)]."""
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    if not sizes:
        raise ValueError("batch_sizes needs at least one size >= 1")
    profiles, low = [], 1
    for size in sizes:
        profiles.append((low, size, size))
        low = size + 1
    return profiles


def profile_shapes(
    name: str, shape: Sequence[int], batch: tuple[int, int, int], n_refs: int, hw: int
) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of the input ``name`` whose exported shape is ``shape`` (dynamic dims -1): axis 0 is
    the batch; the reference count m spans 1..n_refs on the axes where the export made it dynamic."""
    m_axis = {"X_l": 1, "X_a": 1, "ref_images": 1, "ref_labels": 1, "ref_share": 2}.get(name)
    per_m = hw if name in ("keys", "values") else 1  # the pixel memory's rows are m*h*w
    if per_m > 1:
        m_axis = 1
    out = []
    for b, m in zip(batch, (1, n_refs, n_refs), strict=True):
        out.append(tuple(b if i == 0 else (m * per_m if i == m_axis else int(d)) for i, d in enumerate(shape)))
    return tuple(out)


# ------------------------------------------------------------------------------------------------- engine


def build_engine(
    onnx_path: Path, engine_path: Path, n_refs: int, hw: int, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    fp16: bool = True, workspace_bytes: int = 4 << 30,
) -> Path:
    """Parse ``onnx_path`` (prepared by ``prepare_onnx``) and serialise an engine with one profile per bucket."""
    import tensorrt as trt

    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for batch in batch_profiles(batch_sizes):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            lo, opt, hi = profile_shapes(tensor.name, list(tensor.shape), batch, n_refs, hw)
            profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


class _Engine:
    """One deserialised engine with an execution context per optimisation profile."""

    def __init__(self, path: Path, batch_sizes: Sequence[int]) -> None:
        import tensorrt as trt

        register_plugin()
        self._trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        self.profiles = batch_profiles(batch_sizes)
        self.contexts = []
        stream = torch.cuda.current_stream().cuda_stream
        for k in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(k, stream)
            self.contexts.append(context)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, *tensors: Tensor) -> list[Tensor]:
        batch = int(tensors[0].shape[0])
        k = next((i for i, (_, _, hi) in enumerate(self.profiles) if batch <= hi), None)
        if k is None:  # larger than the largest bucket: run it in chunks of that bucket
            step = self.profiles[-1][2]
            parts = [self(*(t[i : i + step] for t in tensors)) for i in range(0, batch, step)]
            return [torch.cat(list(col)) for col in zip(*parts, strict=True)]
        context = self.contexts[k]
        keep = []
        for name, t in zip(self.inputs, tensors, strict=True):
            t = t.to("cuda", torch.float32).contiguous()
            keep.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs


class TensorRTBackend:
    """FP16 TensorRT engines of the encode, extract and frame graphs (built once into the cache, then loaded)."""

    name = "tensorrt"
    device = torch.device("cpu")  # inputs and outputs cross as host tensors

    def __init__(
        self,
        model: ACAVid2Vid,
        cache_dir: Path | None = None,
        model_id: str | None = None,
        device: str = "cuda",
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    ) -> None:
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the tensorrt backend cannot run here: {reason}")
        from engine.runtime.onnx_backend import GRAPHS, cached_export, input_names, make_memory

        self.model = model.eval()
        self._make_memory, self._input_names = make_memory, input_names
        root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "aca" / "tensorrt"
        onnx_dir = cached_export(self.model, root / "onnx", model_id)
        import tensorrt as trt

        gpu = torch.cuda.get_device_name().replace(" ", "_")
        tag = f"trt{trt.__version__}-{gpu}-b{'_'.join(map(str, batch_sizes))}"
        self.engines = {}
        for graph in GRAPHS:
            engine_path = onnx_dir / f"{graph}.{tag}.engine"
            if not engine_path.exists():
                prepared = prepare_onnx(onnx_dir / f"{graph}.onnx", onnx_dir / f"{graph}.trt.onnx")
                cfg = self.model.cfg
                build_engine(prepared, engine_path, cfg.n_refs, cfg.feat_size**2, batch_sizes)
            self.engines[graph] = _Engine(engine_path, batch_sizes)
        (onnx_dir / f"tensorrt.{tag}.json").write_text(json.dumps({"batch_sizes": list(batch_sizes)}))

    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        X_a, X_l = self.engines["encode"](images, labels)
        return X_a.cpu(), X_l.cpu()

    def extract(self, X_l: Tensor, X_a: Tensor) -> Memory:
        # The memory stays on the GPU: it is cached per reference set and read by every frame.
        return self._make_memory(self.model, self.engines["extract"](X_l, X_a), int(X_l.shape[1]))

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
        (image,) = self.engines["frame"](
            label, *memory.tensors().values(), ref_images, ref_labels, prev_image, prev_label, prev_valid
        )
        return image.cpu()
