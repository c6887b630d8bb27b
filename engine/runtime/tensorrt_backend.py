"""TensorRT engines of the three exported graphs, with compact attention as a plugin ("tensorrt").

Written against TensorRT's documented Python API (10.x) and NVIDIA's ``samples/python/quickly_deployable_plugins``
(``qdp_defs.py``: ``aot_impl`` with ``triton.compiler.ASTSource``, ``trtp.KernelLaunchParams``,
``trtp.SymIntExprs``); ``tensorrt`` is imported lazily, only here.

- The plugin ``aca::CompactAttention`` (``tensorrt.plugin``): ``@trtp.register`` gives output shapes and types
  (B_l, B_a (B, p, c), ref_share (B, p, m) from X_l (B, m, c, hw) and B_0 (p, c)); ``@trtp.autotune`` keeps it in
  FP32 inside an FP16 engine (the EM softmax over p bases and the 1e-6-guarded normalisations are where half
  precision hurts).
- ``@trtp.aot_impl`` (TensorRT 10.9+, preferred): ``compile_extract_ptx`` compiles ``_extract_kernel``
  (engine/kernels/compact_triton.py: all s EM iterations, eqs 1-4, in ONE launch, one program per sample) to PTX
  for the build GPU, with p, c, s and lambda as constants; TensorRT launches it on a grid of B programs with the
  int32 arguments m, hw, c, p as shape expressions, and bakes it into the engine (no Python at run time). The
  kernel's arguments are ordered inputs, scalars, outputs as TensorRT passes them, and the two scratch pointers
  Triton appends to every kernel (both unused, size 0) are removed from the PTX so its parameter list is exactly
  TensorRT's. ``prepare_onnx(aot=True)`` sets the node attribute ``aot=1`` that selects it.
- ``@trtp.impl`` (fallback): runs ``extract_bases`` on TensorRT's stream, which takes the fused Triton E-step pass
  on CUDA; used with ``prepare_onnx(aot=False)``, on TensorRT before 10.9, or when an AOT build fails
  (``TensorRTBackend`` retries with it and warns).
- The ONNX parser maps the ``aca.CompactAttention`` node to the plugin by op type and namespace (the node's domain
  from TensorRT 10.10, the ``plugin_namespace`` attribute before; both are set), and from 10.7 a registered plugin
  takes priority over the model-local function of the same name.
- Optimisation profiles: one per batch bucket the workers use (``batch_sizes``, default 1 and 8), each min..max
  of its bucket with opt at the bucket size; m spans 1..cfg.n_refs.

What has run, and what has not. TensorRT cannot be installed on our build or GPU machines (REFERENCES.md, "Export
references"), so nothing that imports ``tensorrt`` has executed: ``register_plugin`` (and so the ``impl`` and
``aot_impl`` bodies), ``build_engine``, ``_Engine``, ``TensorRTBackend``; tests/export/test_tensorrt.py skips those
with that reason. Executed on a CPU-only machine (tests/export/test_tensorrt.py): ``prepare_onnx``, the profiles,
and ``compile_extract_ptx`` for sm_90 at p = c = 128, s = 3 (Triton 3.9 compiles for a CUDA target without a GPU, in
a process without TRITON_INTERPRET), with the stripped PTX assembled again by Triton's bundled ptxas: 10 parameters,
256 threads, 104 KiB of shared memory (above the 48 KiB default: TensorRT must opt the kernel in); by hand, ``ptxas
-v`` gave 255 registers with about 1 KiB of spills. The kernel's numerics are checked against ``extract_bases``
under Triton's CPU interpreter (tests/engine/test_kernels.py) and, compiled, in that file's ``gpu`` test (written,
not yet run on a GPU). The plugin signatures were checked by reading TensorRT's ``plugin/_validate.py``, not by
running it; ``resolved`` (tested) gives it real annotations. Not verified anywhere: that TensorRT accepts this PTX
(PTX ISA 9.4 from Triton 3.9: the driver must be new enough to JIT it), the launch with the stripped parameter list,
the shared-memory opt-in, and the engines' outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from engine.model.attention import Memory
from engine.model.vid2vid import ACAVid2Vid

PLUGIN = "aca::CompactAttention"
F = TypeVar("F", bound=typing.Callable[..., Any])
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


def aot_supported() -> bool:
    """Whether this TensorRT has ahead-of-time Python plugins (``tensorrt.plugin.aot_impl``, 10.9 and later)."""
    import tensorrt.plugin as trtp

    return hasattr(trtp, "aot_impl")


def _constant(dim: Any, what: str) -> int:
    """The build-time value of a plugin shape expression (the AOT kernel is compiled for fixed p and c)."""
    if not dim.is_constant:
        raise RuntimeError(f"the AOT CompactAttention kernel needs a fixed {what}; the engine has a dynamic one")
    return int(dim.constant_value())


def resolved(fn: F, **names: Any) -> F:
    """``fn`` with its annotations evaluated (``names``: the locals they mention, e.g. ``trtp``).

    ``tensorrt.plugin`` reads a plugin function's types with ``inspect.signature`` and checks them with
    ``issubclass`` (TensorRT's ``plugin/_validate.py``); under ``from __future__ import annotations`` they are
    strings, which it would reject, so every decorated function goes through this first. A ``None`` return stays
    ``None`` (``get_type_hints`` makes it ``NoneType``, which TensorRT's check of ``impl`` refuses)."""
    hints = typing.get_type_hints(fn, localns=names)
    if hints.get("return") is type(None):
        hints["return"] = None
    fn.__annotations__ = hints
    return fn


@functools.cache
def register_plugin() -> None:
    """Register ``aca::CompactAttention`` with TensorRT's Python plugin registry (once per process): shapes, types,
    the JIT ``impl`` and, where TensorRT has them, the AOT ``aot_impl`` that ``prepare_onnx(aot=True)`` selects.

    Signatures follow TensorRT's schema checks (``plugin/_validate.py``): ``outputs`` is a tuple of exactly three
    (``tuple[T, ...]`` fails its ``issubclass``), and ``aot_impl`` must take ``tactic`` and annotate its return."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    Desc3 = tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]  # the three outputs' descriptors

    def _desc(X_l: trtp.TensorDesc, X_a: trtp.TensorDesc, B_0: trtp.TensorDesc, s: int, lambda_: float) -> Desc3:
        B, m = X_l.shape_expr[0], X_l.shape_expr[1]
        p, c = B_0.shape_expr[0], B_0.shape_expr[1]
        B_l = trtp.from_shape_expr((B, p, c), dtype=trt.float32)
        B_a = trtp.from_shape_expr((B, p, c), dtype=trt.float32)
        return B_l, B_a, trtp.from_shape_expr((B, p, m), dtype=trt.float32)

    def _autotune(
        X_l: trtp.TensorDesc, X_a: trtp.TensorDesc, B_0: trtp.TensorDesc, outputs: Desc3
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, FP32, FP32", "LINEAR")]

    def _impl(
        X_l: trtp.Tensor, X_a: trtp.Tensor, B_0: trtp.Tensor, s: int, lambda_: float,
        outputs: tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int,
    ) -> None:
        from engine.model.compact_attention import extract_bases

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
            x_l, x_a = torch.as_tensor(X_l, device="cuda"), torch.as_tensor(X_a, device="cuda")
            b_0 = torch.as_tensor(B_0, device="cuda")
            for out, value in zip(outputs, extract_bases(x_l, x_a, b_0, int(s), float(lambda_)), strict=True):
                torch.as_tensor(out, device="cuda").copy_(value)

    def _aot_impl(
        X_l: trtp.TensorDesc, X_a: trtp.TensorDesc, B_0: trtp.TensorDesc, s: int, lambda_: float,
        outputs: Desc3, tactic: int,
    ) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # B_0 is the model's bases buffer, an initializer of the exported graph: p and c are build-time constants.
        p = _constant(B_0.shape_expr[0], "number of bases p")
        c = _constant(B_0.shape_expr[1], "number of channels c")
        kernel = compile_extract_ptx(p, c, int(s), float(lambda_))  # for the GPU the engine is built on
        launch = trtp.KernelLaunchParams()
        launch.grid_x = X_l.shape_expr[0]  # one program per sample
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_mem
        # The kernel's int32 scalars M, HW, C_REAL, P_REAL from X_l (B, m, c, hw) and B_0 (p, c), resolved by
        # TensorRT per execution (B and m are dynamic across the optimisation profiles).
        dims = X_l.shape_expr
        scalars = (dims[1], dims[3], dims[2], B_0.shape_expr[0])
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra_args

    names = {"trtp": trtp, "Desc3": Desc3}
    trtp.register(PLUGIN)(resolved(_desc, **names))
    trtp.autotune(PLUGIN)(resolved(_autotune, **names))
    trtp.impl(PLUGIN)(resolved(_impl, **names))
    if aot_supported():
        trtp.aot_impl(PLUGIN)(resolved(_aot_impl, **names))


#: Arguments of ``_extract_kernel`` in launch order, as TensorRT passes them to an AOT kernel: the input tensors,
#: then the int32 scalars (``extra_args``), then the output tensors.
EXTRACT_INPUTS = ("Xl_ptr", "Xa_ptr", "B0_ptr")
EXTRACT_SCALARS = ("M", "HW", "C_REAL", "P_REAL")
EXTRACT_OUTPUTS = ("Bl_out", "Ba_out", "share_out")


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """A Triton kernel compiled ahead of time: what ``@trtp.aot_impl`` hands TensorRT."""

    name: str
    ptx: str
    threads: int  # per block: num_warps * 32
    shared_mem: int  # bytes of dynamic shared memory
    arch: int  # compute capability, e.g. 90


def _drop_scratch_params(ptx: str, name: str, n_args: int) -> str:
    """Remove the trailing ``global_scratch`` and ``profile_scratch`` pointers Triton (>= 3.3 and >= 3.5) appends to
    every kernel's parameter list, so the PTX takes exactly TensorRT's arguments (inputs, extra args, outputs).

    Only done when the PTX never reads them (the caller checks both scratch sizes are 0): a launcher that passes
    fewer arguments than the kernel declares has the driver read past the end of its argument array."""
    head_start = ptx.index(f".entry {name}(")
    head_end = ptx.index(")", head_start)
    params = [line.strip().rstrip(",") for line in ptx[head_start:head_end].splitlines()[1:] if line.strip()]
    body = ptx[head_end:]
    for param in params[n_args:]:
        param_name = param.split()[-1]
        if re.search(rf"\b{re.escape(param_name)}\b", body):
            raise RuntimeError(f"{name} reads {param_name}, which TensorRT's AOT launch does not pass")
    if len(params) < n_args:
        raise RuntimeError(f"{name} declares {len(params)} parameters, expected at least {n_args}")
    head = f".entry {name}(\n" + ",\n".join(f"\t{param}" for param in params[:n_args]) + "\n"
    return ptx[:head_start] + head + body


def compile_extract_ptx(
    p: int, c: int, s: int, lambda_: float, block_n: int = 16, arch: int | None = None
) -> AotKernel:
    """Compile ``_extract_kernel`` (the whole extraction, one launch) to PTX for p bases and c channels.

    ``arch`` (e.g. 90 for an H100) needs no GPU: Triton compiles for any CUDA target on a machine without one, with
    its bundled ptxas (tests/export/test_tensorrt.py runs this). ``arch=None`` takes the current CUDA device's.
    s and lambda become constants of the kernel (TensorRT's AOT scalar arguments are int32 shape expressions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from engine.kernels.compact_triton import _extract_kernel, _pow2, extract_num_warps

    if not isinstance(_extract_kernel, JITFunction):  # an InterpretedFunction
        raise RuntimeError("TRITON_INTERPRET=1 is set in this process: Triton cannot compile kernels here")
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    signature = {name: "*fp32" for name in EXTRACT_INPUTS}
    signature.update({name: "i32" for name in EXTRACT_SCALARS})
    signature.update({name: "*fp32" for name in EXTRACT_OUTPUTS})
    constexprs = {"P": _pow2(p), "C": _pow2(c), "BLOCK_N": block_n, "S": int(s), "LAMBDA": float(lambda_)}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=_extract_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": extract_num_warps(p, c)})
    meta = kernel.metadata
    if meta.global_scratch_size or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs scratch memory, which a TensorRT AOT plugin cannot provide")
    n_args = len(EXTRACT_INPUTS) + len(EXTRACT_SCALARS) + len(EXTRACT_OUTPUTS)
    ptx = _drop_scratch_params(kernel.asm["ptx"], meta.name, n_args)
    return AotKernel(name=meta.name, ptx=ptx, threads=meta.num_warps * 32, shared_mem=meta.shared, arch=arch)

# ---------------------------------------------------------------------------------------------- the ONNX


def prepare_onnx(src: Path, dst: Path, aot: bool | None = True) -> Path:
    """A copy of an exported graph for TensorRT's parser: every ``aca`` node gets ``plugin_namespace="aca"``
    (TensorRT before 10.10 reads the namespace from it, later ones from the domain) and ``aot`` (1: build the
    plugin from its ``@trtp.aot_impl`` kernel, 0: from the Python ``@trtp.impl``; the parser's choice per node),
    except with ``aot=None`` (TensorRT before 10.9, which has no AOT plugins: the node gets no ``aot``)."""
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.domain != "aca":
            continue
        kept = [a for a in node.attribute if a.name != "aot"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("plugin_namespace", "aca"))
        if aot is not None:
            node.attribute.append(onnx.helper.make_attribute("aot", int(aot)))
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
                self._build(onnx_dir, graph, engine_path, batch_sizes)
            self.engines[graph] = _Engine(engine_path, batch_sizes)
        (onnx_dir / f"tensorrt.{tag}.json").write_text(json.dumps({"batch_sizes": list(batch_sizes)}))

    def _build(self, onnx_dir: Path, graph: str, engine_path: Path, batch_sizes: Sequence[int]) -> None:
        """Build with the AOT plugin kernel where TensorRT has ``aot_impl``; if that build fails, with the Python
        ``impl`` (the engine then needs Python and this module at run time)."""
        cfg = self.model.cfg
        for aot in (True, False) if aot_supported() else (None,):
            prepared = prepare_onnx(onnx_dir / f"{graph}.onnx", onnx_dir / f"{graph}.trt.onnx", aot=aot)
            try:
                build_engine(prepared, engine_path, cfg.n_refs, cfg.feat_size**2, batch_sizes)
                return
            except RuntimeError as err:
                if aot is not True:
                    raise
                warnings.warn(f"AOT CompactAttention plugin failed ({err}); using the Python plugin", stacklevel=2)

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
