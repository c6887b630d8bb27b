"""On a CUDA GPU: the fused Triton basis extraction vs the PyTorch reference path vs pixel-wise attention, and the
end-to-end frame latency of the face-256 model (issue: export and kernels; foundation benchmark's GPU half).

Times are medians of CUDA-event-timed repeats after warm-up; peak memory is torch.cuda.max_memory_allocated above
the inputs. All fp32 unless the row says otherwise.

    python bench/gpu.py            # writes the "gpu" section of docs/benchmarks.md
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import table, write_section  # noqa: E402
from engine import kernels  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.model.compact_attention import CompactAttention  # noqa: E402
from engine.model.pixel_attention import PixelAttention  # noqa: E402
from engine.model.vid2vid import ACAVid2Vid, RefFeatures  # noqa: E402

C = P = 128


def cuda_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def with_fused(enabled: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        kernels.set_fused(enabled)
        try:
            return fn()
        finally:
            kernels.set_fused(True)

    return run


@torch.no_grad()
def attention_case(size: int, m: int) -> tuple[list[object], list[object]]:
    """One (feature size, m) case: a whole step and a cached-bases frame, fused vs reference vs pixel-wise."""
    compact, pixel = CompactAttention(c=C, p=P).cuda().eval(), PixelAttention()
    X_l = torch.randn(1, m, C, size, size, device="cuda")
    X_a = torch.randn(1, m, C, size, size, device="cuda")
    X_in = torch.randn(1, C, size, size, device="cuda")
    steps = (
        with_fused(True, lambda: compact(X_in, X_l, X_a)),
        with_fused(False, lambda: compact(X_in, X_l, X_a)),
        lambda: pixel(X_in, X_l, X_a),
    )
    t = [cuda_ms(f) for f in steps]
    mem = [peak_mib(f) for f in steps]
    bases, pmem = compact.extract(X_l, X_a), pixel.extract(X_l, X_a)
    frames = (
        with_fused(True, lambda: compact.aggregate(X_in, bases)),
        with_fused(False, lambda: compact.aggregate(X_in, bases)),
        lambda: pixel.aggregate(X_in, pmem),
    )
    ft = [cuda_ms(f) for f in frames]
    name = f"{size}x{size}"
    return [name, m, *t, t[2] / t[0], t[1] / t[0], *mem, mem[2] / max(mem[0], 1e-3)], [name, m, *ft, ft[2] / ft[0]]


@torch.no_grad()
def frame_rows() -> list[list[object]]:
    rows = []
    for kind in ("compact", "pixel"):
        torch.manual_seed(0)
        model = ACAVid2Vid(preset("face-256", attention=kind)).cuda().eval()
        S, L = 256, model.cfg.label_nc
        for B in (1, 8):
            m = 3
            ref_images = torch.rand(B, m, 3, S, S, device="cuda") * 2 - 1
            ref_labels = torch.rand(B, m, L, S, S, device="cuda")
            label = torch.rand(B, L, S, S, device="cuda")
            prev = torch.rand(B, 3, S, S, device="cuda") * 2 - 1
            valid = torch.ones(B, device="cuda")
            feats: RefFeatures = model.encode_references(ref_images, ref_labels)
            memory = model.extract(feats)

            def frame(model=model, memory=memory, label=label, ref_images=ref_images, ref_labels=ref_labels,
                      prev=prev, valid=valid) -> object:
                return model.synthesize(label, memory, ref_images, ref_labels, prev, label, valid)

            def frame_bf16(frame=frame) -> object:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return frame()

            t32, t16 = cuda_ms(frame), cuda_ms(frame_bf16)  # bf16: autocast, so aggregation takes the SDPA path
            t_extract = cuda_ms(lambda model=model, feats=feats: model.extract(feats))
            rows.append([kind, B, t32, B * 1000 / t32, t16, B * 1000 / t16, t_extract])
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for every path compared here
    cases = [attention_case(size, m) for size in (32, 64) for m in (1, 2, 4, 8, 16)]
    att, frames = [c[0] for c in cases], [c[1] for c in cases]
    e2e = frame_rows()
    body = (
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.version.cuda and torch.__version__}. c = p = {C}, "
        "s = 3, batch 1, fp32 (TF32 off). fused = the Triton E-step kernel + SDPA aggregation; reference = the "
        "PyTorch path (per-reference chunks); pixel = few-shot vid2vid's pixel-wise attention.\n\n"
        "### A whole step (extraction + aggregation)\n\n"
        + table(
            ["features", "m", "fused ms", "reference ms", "pixel ms", "pixel/fused", "reference/fused",
             "fused MiB", "reference MiB", "pixel MiB", "pixel/fused memory"],
            att,
        )
        + "\n\n### A frame with cached bases (aggregation only)\n\n"
        + table(["features", "m", "fused ms", "reference ms", "pixel ms", "pixel/fused"], frames)
        + "\n\n### End to end: one synthesized frame of the face-256 model (m = 3, bases cached)\n\n"
        + table(["attention", "batch", "fp32 ms", "fp32 frames/s", "bf16 ms", "bf16 frames/s", "extract ms"], e2e)
    )
    write_section("gpu", "GPU: fused kernel, reference path, pixel-wise; end-to-end frame latency", body)


if __name__ == "__main__":
    main()
