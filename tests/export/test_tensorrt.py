"""TensorRT export: the parts that need no TensorRT run everywhere; engine building skips without it."""

from __future__ import annotations

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
