"""``aca export onnx``: the model's three ONNX graphs (encode, extract, frame), checked and validated.

The graphs and the compact-attention custom node are defined in engine/runtime/onnx_backend.py (the onnxruntime
backend exports on first use, and engine/ imports nothing from export/); this module is the user-facing export
and its validation (timm's ``onnx_validate.py``): onnx.checker, the single ``aca.CompactAttention`` node with its
model-local FunctionProto, and onnxruntime against eager torch on random inputs of several batch sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.model.vid2vid import ACAVid2Vid
from engine.runtime.onnx_backend import (
    DOMAIN,
    GRAPHS,
    OP_TYPE,
    example_inputs,
    export_graphs,
    input_names,
    register_onnx_schema,
)
from engine.runtime.onnx_backend import _graph_module as graph_module


def export_onnx(model: ACAVid2Vid, out_dir: Path, graphs: Sequence[str] = GRAPHS) -> dict[str, Path]:
    """Export ``graphs`` of ``model`` into ``out_dir`` as ``<graph>.onnx`` (plus ``manifest.json``)."""
    return export_graphs(model.eval(), Path(out_dir), graphs)


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference; the aca schema must be registered for the custom node."""
    import onnx

    register_onnx_schema()
    onnx.checker.check_model(str(path), full_check=True)


def compact_attention_nodes(path: Path) -> tuple[int, bool]:
    """(number of aca.CompactAttention nodes in the main graph, whether the model carries its FunctionProto)."""
    import onnx

    model = onnx.load(str(path))
    nodes = sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)
    has_function = any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions)
    return nodes, has_function


def torch_oracle(model: ACAVid2Vid, graph: str, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Eager torch outputs of ``graph``, one sample at a time.

    Per sample because eager CPU convolution over a batch of the strided X_basis that aggregation returns takes
    another kernel path whose results differ by up to ~1e-3 from the same samples alone (measured on the tiny
    preset); onnxruntime's batched results do not depend on the batch. Per-sample eager runs are the oracle.
    """
    module = graph_module(model, graph)
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for b in range(int(inputs[0].shape[0])):
            res = module(*(t[b : b + 1] for t in inputs))
            res = res if isinstance(res, tuple) else (res,)
            outs.append([r.numpy() for r in res])
    return [np.concatenate(col) for col in zip(*outs, strict=True)]


def validate(
    model: ACAVid2Vid, directory: Path, batches: Sequence[int] = (1, 3), seed: int = 0, atol: float = 1e-3
) -> dict[str, float]:
    """Run every exported graph in onnxruntime (CPU) on random inputs of each batch size; return the largest
    absolute difference to torch per graph and raise AssertionError when one exceeds ``atol``."""
    import onnxruntime as ort

    model = model.eval()
    worst: dict[str, float] = {}
    for graph in GRAPHS:
        path = Path(directory) / f"{graph}.onnx"
        if not path.exists():
            continue
        check_onnx(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for i, batch in enumerate(batches):
            inputs = example_inputs(model, batch=batch, seed=seed + i)[graph]
            got = sess.run(None, {n: t.numpy() for n, t in zip(input_names(model, graph), inputs, strict=True)})
            want = torch_oracle(model, graph, inputs)
            diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
            worst[graph] = max(worst.get(graph, 0.0), diff)
    bad = {g: d for g, d in worst.items() if d > atol}
    if bad:
        raise AssertionError(f"onnxruntime differs from torch by more than {atol}: {bad}")
    return worst
