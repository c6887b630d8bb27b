"""Compact (ACA) vs pixel-wise attention as the number of references m grows (issue: foundation benchmark).

For each feature size (32x32, 64x64) and m in (1, 2, 4, 8, 16), at c = 128, p = 128, s = 3, batch 1, fp32,
inference (no_grad): the median time of a whole step (extraction + aggregation), its peak memory, and the cost of
a frame once the bases are cached (aggregation only). Peak memory is measured in a fresh subprocess per case as
the rise of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs) over the inputs.

    python bench/attention.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import median_ms, table, write_section  # noqa: E402
from engine.model.compact_attention import CompactAttention  # noqa: E402
from engine.model.pixel_attention import PixelAttention  # noqa: E402

C, P, S = 128, 128, 3


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (CompactAttention(c=C, p=P, s=S) if kind == "compact" else PixelAttention()).eval()


def inputs(m: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X_l = torch.randn(1, m, C, size, size, generator=g)
    X_a = torch.randn(1, m, C, size, size, generator=g)
    X_in = torch.randn(1, C, size, size, generator=g)
    return X_l, X_a, X_in



def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(kind: str, m: int, size: int, cached: bool) -> None:
    """Runs in a subprocess: print the peak memory (MiB) one step needs above its inputs."""
    att = make(kind)
    X_l, X_a, X_in = inputs(m, size)
    with torch.no_grad():
        memory = att.extract(X_l, X_a) if cached else None
        att(X_in[:, :, :1, :1], X_l[..., :1, :1], X_a[..., :1, :1])  # warm up the thread pool outside the measure
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _proc_kib("VmRSS")
        if memory is not None:
            att.aggregate(X_in, memory)
        else:
            att(X_in, X_l, X_a)
        peak = _proc_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def peak_mib(kind: str, m: int, size: int, cached: bool = False) -> float:
    cmd = [sys.executable, __file__, "--child", kind, str(m), str(size), str(int(cached))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def measure(kind: str, m: int, size: int, repeats: int) -> tuple[float, float, float, float]:
    """(step ms, step peak MiB, cached-frame ms, cached-frame peak MiB)."""
    X_l, X_a, X_in = inputs(m, size)
    att = make(kind)
    with torch.no_grad():
        step = median_ms(lambda: att(X_in, X_l, X_a), repeats)
        memory = att.extract(X_l, X_a)
        frame = median_ms(lambda: att.aggregate(X_in, memory), repeats)
    return step, peak_mib(kind, m, size), frame, peak_mib(kind, m, size, cached=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and no m=16 (for a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kind, m, size, cached = args.child
        peak_child(kind, int(m), int(size), bool(int(cached)))
        return

    ms = (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16)
    repeats = 3 if args.quick else 11
    rows, cached_rows = [], []
    for size in (32, 64):
        for m in ms:
            (tc, mc, fc, fmc), (tp, mp, fp, fmp) = (measure(k, m, size, repeats) for k in ("compact", "pixel"))
            rows.append([f"{size}x{size}", m, tc, tp, tp / tc, mc, mp, mp / max(mc, 1e-3)])
            cached_rows.append([f"{size}x{size}", m, fc, fp, fp / fc, fmc, fmp])
            print(f"{size}x{size} m={m}: compact {tc:.1f} ms {mc:.1f} MiB, pixel {tp:.1f} ms {mp:.1f} MiB", flush=True)

    body = (
        f"c = {C}, p = {P}, s = {S}, batch 1, fp32, inference, {args.threads} torch thread(s), median of {repeats}. "
        "Peak memory: the rise of the process's resident "
        "high-water mark over its inputs, one fresh process per case. Ratios are pixel / compact from the same run.\n\n"
        "### A whole step (extraction + aggregation)\n\n"
        + table(
            ["features", "m", "compact ms", "pixel ms", "speed-up", "compact MiB", "pixel MiB", "memory ratio"], rows
        )
        + "\n\n### A frame with cached bases (aggregation only; pixel-wise has nothing to cache)\n\n"
        + table(["features", "m", "compact ms", "pixel ms", "speed-up", "compact MiB", "pixel MiB"], cached_rows)
        + "\n\nGoals (64x64, m = 8): a step at least 8x faster and 25x less peak memory than pixel-wise; a cached "
        "frame at least 100x cheaper; compact time linear in m."
    )
    write_section("attention", "Compact vs pixel-wise attention", body)


if __name__ == "__main__":
    main()
