"""TensorRT export: the parts that need no TensorRT run everywhere; engine building skips without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from engine.config import preset
from engine.model.vid2vid import ACAVid2Vid
from engine.runtime.tensorrt_backend import batch_profiles, prepare_onnx, profile_shapes, tensorrt_unavailable_reason
from export.onnx import export_onnx

REASON = tensorrt_unavailable_reason()


def test_batch_profiles_cover_every_batch_once():
    profiles = batch_profiles((8, 1, 32))
    assert profiles == [(1, 1, 1), (2, 8, 8), (9, 32, 32)]
    covered = [b for lo, _, hi in profiles for b in range(lo, hi + 1)]
    assert covered == list(range(1, 33))
    with pytest.raises(ValueError):
        batch_profiles(())


def test_profile_shapes_vary_batch_and_references():
    lo, opt, hi = profile_shapes("ref_images", [-1, -1, 3, 64, 64], (2, 8, 8), n_refs=3, hw=256)
    assert (lo, opt, hi) == ((2, 1, 3, 64, 64), (8, 3, 3, 64, 64), (8, 3, 3, 64, 64))
    assert profile_shapes("ref_share", [-1, 8, -1], (1, 1, 1), 3, 256)[2] == (1, 8, 3)
    assert profile_shapes("keys", [-1, -1, 16], (1, 4, 4), 3, 256) == ((1, 256, 16), (4, 768, 16), (4, 768, 16))


def test_prepare_onnx_sets_the_plugin_namespace(tmp_path):
    torch.manual_seed(0)
    model = ACAVid2Vid(preset("tiny")).eval()
    paths = export_onnx(model, tmp_path / "onnx", graphs=("extract",))
    prepared = onnx.load(str(prepare_onnx(paths["extract"], tmp_path / "extract.trt.onnx")))
    (node,) = [n for n in prepared.graph.node if n.domain == "aca"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "CompactAttention" and attrs["plugin_namespace"] == b"aca"
    assert attrs["s"] == model.cfg.s


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT cannot run here: {REASON}")
def test_tensorrt_backend_matches_torch(tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    from engine.runtime.backends import TorchBackend, make_backend
    from engine.runtime.onnx_backend import example_inputs

    torch.manual_seed(0)
    model = ACAVid2Vid(preset("tiny")).eval()
    trt_backend = make_backend("tensorrt", model, cache_dir=tmp_path, device="cuda")
    eager = TorchBackend(model)
    inputs = example_inputs(model, batch=3, seed=1)
    memory = eager.extract(*inputs["extract"])
    got_memory = trt_backend.extract(*inputs["extract"])
    for g, w in zip(got_memory.tensors().values(), memory.tensors().values(), strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=1e-3, rtol=0)  # the plugin runs in FP32
    frame = inputs["frame"]
    k = len(memory.tensors())
    got = trt_backend.synthesize(frame[0], memory, *frame[k + 1 :])
    want = eager.synthesize(frame[0], memory, *frame[k + 1 :])
    torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=0)  # FP16 engine


def test_export_tensorrt_explains_why_it_cannot_run(tmp_path):
    if REASON is None:
        pytest.skip("TensorRT is available here")
    from export.tensorrt import export_tensorrt

    with pytest.raises(RuntimeError, match="cannot build TensorRT engines"):
        export_tensorrt(ACAVid2Vid(preset("tiny")), tmp_path)


def test_prepare_onnx_selects_the_aot_or_the_python_plugin(tmp_path):
    torch.manual_seed(0)
    paths = export_onnx(ACAVid2Vid(preset("tiny")).eval(), tmp_path / "onnx", graphs=("extract",))
    for aot in (True, False):
        dst = prepare_onnx(paths["extract"], tmp_path / f"extract.{aot}.trt.onnx", aot=aot)
        # Preparing a prepared graph again must not duplicate attributes (the parser would see two "aot").
        again = onnx.load(str(prepare_onnx(dst, tmp_path / "again.onnx", aot=aot)))
        (node,) = [n for n in again.graph.node if n.domain == "aca"]
        names = [a.name for a in node.attribute]
        assert names.count("aot") == 1 and names.count("plugin_namespace") == 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["aot"] == int(aot)
    plain = onnx.load(str(prepare_onnx(paths["extract"], tmp_path / "plain.onnx", aot=None)))
    (node,) = [n for n in plain.graph.node if n.domain == "aca"]
    assert "aot" not in [a.name for a in node.attribute]  # TensorRT before 10.9 would take it for a plugin field


def test_drop_scratch_params_keeps_exactly_the_launch_arguments():
    from engine.runtime.tensorrt_backend import _drop_scratch_params

    head = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2,\n"
    ptx = head + "\t.param .u64 k_param_3\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n}\n"
    out = _drop_scratch_params(ptx, "k", 3)
    assert out.startswith(".entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)")
    assert "k_param_3" not in out and "ld.param.b64 %rd1, [k_param_0];" in out
    with pytest.raises(RuntimeError, match="reads k_param_3"):
        _drop_scratch_params(ptx.replace("[k_param_0]", "[k_param_3]"), "k", 3)


def test_aot_compile_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton is not interpreting in this process")
    pytest.importorskip("triton")
    from engine.runtime.tensorrt_backend import compile_extract_ptx

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_extract_ptx(16, 16, 3, 0.5, arch=90)


_COMPILE_SCRIPT = """
import dataclasses, json, sys
from triton.backends.nvidia.compiler import get_ptxas
from engine.runtime.tensorrt_backend import compile_extract_ptx
kernel = compile_extract_ptx(128, 128, 3, 0.5, arch=90)
print(json.dumps({**dataclasses.asdict(kernel), "ptxas": get_ptxas(90).path}))
"""


def test_aot_compile_of_the_extraction_kernel_for_sm90_without_a_gpu(tmp_path):
    """What ``@trtp.aot_impl`` runs at engine build, minus TensorRT: ``_extract_kernel`` compiled to PTX for an H100
    at the model's sizes (p = c = 128, s = 3); then the stripped PTX must still assemble.

    In a child process: conftest sets TRITON_INTERPRET=1 here, and an interpreted kernel cannot be compiled."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a hit in the user's cache
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    kernel = json.loads(run.stdout.strip().splitlines()[-1])
    ptx = kernel["ptx"]
    assert kernel["name"] == "_extract_kernel" and kernel["arch"] == 90
    assert kernel["threads"] == 256 and kernel["shared_mem"] > 0  # 8 warps at p = c = 128
    assert ".target sm_90" in ptx
    entry = ptx[ptx.index(".entry _extract_kernel(") : ptx.index(")", ptx.index(".entry _extract_kernel("))]
    params = [line.strip() for line in entry.splitlines()[1:] if line.strip()]
    # TensorRT's launch: 3 input pointers, 4 int32 extra args (m, hw, c, p), 3 output pointers; nothing more.
    kinds = ["u64" if ".u64" in p else "u32" if ".u32" in p else p for p in params]
    assert kinds == ["u64"] * 3 + ["u32"] * 4 + ["u64"] * 3
    src = tmp_path / "extract.ptx"
    src.write_text(ptx)
    asm = subprocess.run(
        [kernel["ptxas"], "-arch=sm_90a", str(src), "-o", str(tmp_path / "extract.cubin")],
        capture_output=True, text=True, timeout=120,
    )
    assert asm.returncode == 0, asm.stderr
    assert (tmp_path / "extract.cubin").stat().st_size > 0


def test_plugin_functions_get_real_annotations_for_tensorrt_checks():
    """tensorrt.plugin checks plugin signatures with inspect.signature and issubclass; this module's annotations are
    postponed strings, so ``resolved`` must turn them into the classes (and keep a None return None)."""
    import inspect
    import types
    import typing

    from engine.runtime.tensorrt_backend import resolved

    class TensorDesc:  # stands in for trtp.TensorDesc: only its being a class matters here
        pass

    ns = types.SimpleNamespace(TensorDesc=TensorDesc)
    Three = tuple[TensorDesc, TensorDesc, TensorDesc]

    def desc(X_l: ns.TensorDesc, s: int, lambda_: float, outputs: Three) -> None:  # type: ignore[name-defined]
        pass

    assert inspect.signature(desc).parameters["X_l"].annotation == "ns.TensorDesc"  # the postponed form
    sig = inspect.signature(resolved(desc, ns=ns, Three=Three))
    params = sig.parameters
    assert issubclass(params["X_l"].annotation, TensorDesc)
    assert params["s"].annotation is int and params["lambda_"].annotation is float
    assert typing.get_origin(params["outputs"].annotation) is tuple
    assert all(issubclass(a, TensorDesc) for a in typing.get_args(params["outputs"].annotation))
    assert sig.return_annotation is None
