"""ONNX export of tiny compact and pixel models: one custom node, checker, onnxruntime against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine.config import preset
from engine.labels import draw_label
from engine.model.vid2vid import ACAVid2Vid
from engine.runtime.onnx_backend import example_inputs, input_names
from export.onnx import check_onnx, compact_attention_nodes, export_onnx, torch_oracle, validate


def _model(attention: str) -> ACAVid2Vid:
    torch.manual_seed(0)
    return ACAVid2Vid(preset("tiny", attention=attention)).eval()


@pytest.fixture(scope="module", params=["compact", "pixel"])
def exported(request, tmp_path_factory) -> tuple[ACAVid2Vid, Path]:
    model = _model(request.param)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    export_onnx(model, out)
    return model, out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graphs_pass_the_checker_and_have_dynamic_batch(exported):
    model, out = exported
    for graph in ("encode", "extract", "frame"):
        check_onnx(out / f"{graph}.onnx")
        proto = onnx.load(str(out / f"{graph}.onnx"))
        assert [i.name for i in proto.graph.input] == input_names(model, graph)
        for i in proto.graph.input:
            assert i.type.tensor_type.shape.dim[0].dim_param, f"{graph}.{i.name} has a static batch axis"


def test_compact_attention_is_one_custom_node_with_a_function(exported):
    model, out = exported
    nodes, has_function = compact_attention_nodes(out / "extract.onnx")
    if model.cfg.attention == "compact":
        assert (nodes, has_function) == (1, True)
        node = next(n for n in onnx.load(str(out / "extract.onnx")).graph.node if n.domain == "aca")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["s"] == model.cfg.s and attrs["lambda_"] == pytest.approx(model.cfg.lambda_)
    else:
        assert (nodes, has_function) == (0, False)  # the pixel baseline has no basis extraction
    for graph in ("encode", "frame"):
        assert compact_attention_nodes(out / f"{graph}.onnx") == (0, False)


def test_onnxruntime_matches_torch_on_random_inputs_at_batch_1_and_3(exported):
    model, out = exported
    worst = validate(model, out, batches=(1, 3), atol=1e-3)
    assert set(worst) == {"encode", "extract", "frame"}


def test_fewer_references_than_exported_work(exported):
    model, out = exported
    inputs = example_inputs(model, batch=2, m=2, seed=5)
    for graph in ("extract", "frame"):
        got = _session(out / f"{graph}.onnx").run(
            None, {n: t.numpy() for n, t in zip(input_names(model, graph), inputs[graph], strict=True)}
        )
        for g, w in zip(got, torch_oracle(model, graph, inputs[graph]), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-3)


def test_onnxruntime_matches_torch_on_a_real_face(exported):
    """Synthetic talking-head frames through draw_label: encode, extract and frame chained in onnxruntime."""
    model, out = exported
    from engine import synthetic

    S, m = model.cfg.image_size, model.cfg.n_refs
    clip = synthetic.sequence(synthetic.random_identity(3), n_frames=m + 2, seed=1, size=S)
    images = torch.from_numpy(clip.images).float().div(127.5).sub(1).permute(0, 3, 1, 2)  # (T, 3, S, S)
    labels = torch.from_numpy(np.stack([draw_label(lm, S) for lm in clip.landmarks]))  # (T, L, S, S)
    sess = {g: _session(out / f"{g}.onnx") for g in ("encode", "extract", "frame")}

    X_a, X_l = sess["encode"].run(None, {"images": images[:m].numpy(), "labels": labels[:m].numpy()})
    memory = sess["extract"].run(None, {"X_l": X_l[None], "X_a": X_a[None]})
    frame_inputs = (
        labels[m:], *(np.repeat(t, 2, axis=0) for t in memory), images[None, :m].repeat(2, 1, 1, 1, 1),
        labels[None, :m].repeat(2, 1, 1, 1, 1), images[m - 1 : m + 1], labels[m - 1 : m + 1], torch.tensor([0.0, 1.0]),
    )
    frame_inputs = tuple(torch.as_tensor(t) for t in frame_inputs)
    (image,) = sess["frame"].run(
        None, {n: t.numpy() for n, t in zip(input_names(model, "frame"), frame_inputs, strict=True)}
    )

    with torch.no_grad():
        ref_enc = torch_oracle(model, "encode", (images[:m], labels[:m]))
        np.testing.assert_allclose(X_a, ref_enc[0], atol=1e-4)
        ref_mem = torch_oracle(model, "extract", (torch.from_numpy(X_l[None]), torch.from_numpy(X_a[None])))
        for g, w in zip(memory, ref_mem, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4)
    (want,) = torch_oracle(model, "frame", frame_inputs)
    assert image.shape == (2, 3, S, S) and np.isfinite(image).all()
    np.testing.assert_allclose(image, want, atol=1e-3)
