"""Per-frame latency and throughput of each available backend, as ratios to eager torch from the same run, and
the compact (ACA) vs pixel-wise models exported side by side (issue 7).

For each backend at batch 1 and 8: the median time of one ``synthesize`` call (the per-frame graph: E_in,
aggregation, generator, flows, matting) against a cached memory, and frames per second (batch / median). Then the
ONNX files of both attention kinds: size per graph and onnxruntime's frame latency at batch 1.

    python bench/backends.py [--quick]      # --quick: the tiny preset, fewer repeats
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import median_ms, table, write_section  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.model.vid2vid import ACAVid2Vid  # noqa: E402
from engine.runtime.backends import Backend, available_backends, make_backend  # noqa: E402
from engine.runtime.onnx_backend import example_inputs, memory_names  # noqa: E402


def frame_ms(backend: Backend, model: ACAVid2Vid, batch: int, repeats: int) -> float:
    inputs = example_inputs(model, batch=batch, seed=1)
    memory = backend.extract(*inputs["extract"])
    k = len(memory_names(model))
    frame = inputs["frame"]
    return median_ms(lambda: backend.synthesize(frame[0], memory, *frame[k + 1 :]), repeats)


def model_of(name: str, attention: str) -> ACAVid2Vid:
    torch.manual_seed(0)
    return ACAVid2Vid(preset(name, attention=attention)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny preset, fewer repeats")
    parser.add_argument("--backends", nargs="*", default=None, help="subset of the available backends")
    args = parser.parse_args()
    name, repeats = ("tiny", 5) if args.quick else ("face-128", 10)
    cache = Path(tempfile.mkdtemp(prefix="aca-bench-"))
    names = args.backends or available_backends()

    model = model_of(name, "compact")
    times: dict[tuple[str, int], float] = {}
    for backend_name in names:
        backend = make_backend(backend_name, model, cache_dir=cache, model_id=f"bench-{name}-compact")
        for batch in (1, 8):
            times[backend_name, batch] = frame_ms(backend, model, batch, repeats)
            print(f"{backend_name} batch {batch}: {times[backend_name, batch]:.1f} ms", flush=True)
    rows = []
    for backend_name in names:
        row: list[object] = [backend_name]
        for batch in (1, 8):
            ms = times[backend_name, batch]
            row += [ms, batch * 1e3 / ms, times["torch", batch] / ms if ("torch", batch) in times else "-"]
        rows.append(row)
    body = f"Preset `{name}`, compact attention, fp32 on CPU; per-frame graph against a cached memory.\n\n"
    body += table(["backend", "b1 ms", "b1 fps", "b1 x eager", "b8 ms", "b8 fps", "b8 x eager"], rows)

    side = []
    for attention in ("compact", "pixel"):
        m = model_of(name, attention)
        backend = make_backend("onnxruntime", m, cache_dir=cache, model_id=f"bench-{name}-{attention}")
        directory = backend.directory  # type: ignore[attr-defined]
        sizes = [(directory / f"{g}.onnx").stat().st_size / 1e6 for g in ("encode", "extract", "frame")]
        eager = make_backend("torch", m)
        side.append([attention, *sizes, frame_ms(backend, m, 1, repeats), frame_ms(eager, m, 1, repeats)])
    body += "\n\nCompact vs pixel-wise attention, exported side by side (onnxruntime CPU, batch 1, m = n_refs):\n\n"
    body += table(["attention", "encode MB", "extract MB", "frame MB", "ort frame ms", "eager frame ms"], side)
    write_section("backends", "Backends: per-frame latency and throughput", body)


if __name__ == "__main__":
    main()
