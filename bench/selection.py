"""Reference selection on the appearance map (paper section 3.2): queries per second and mesh build time.

On one core (BLAS / OpenMP / torch threads 1, the process pinned to one CPU). Reference poses follow a
recording in which the person is asked to look around: a Lissajous sweep over yaw +-38, pitch +-22 degrees
with jitter, one pose per frame. Driving poses are uniform over yaw +-45, pitch +-30, so some fall outside the
references' hull and take the nearest-triangle fallback. For each number of references: the build time of
``AppearanceMap`` (Delaunay + index; median of 7) beside scipy's ``Delaunay`` alone, ``select`` one pose at a
time and ``select_many`` over the whole batch, k = 3 and k = 6, and, for comparison, scipy's ``find_simplex``
called per pose (location only, no selection). Also writes docs/appearance_map.png, a sample of ``plot_png``.

    python bench/selection.py [--quick]
"""

from __future__ import annotations

import os

# One core: these must be set before numpy (and its BLAS) is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.spatial import Delaunay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import table, write_section  # noqa: E402
from engine.selection import AppearanceMap  # noqa: E402


def recording(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) pitch, yaw of n frames of someone looking around (a Lissajous sweep with jitter)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n, endpoint=False)
    yaw = 38.0 * np.sin(2 * np.pi * 3.0 * t) + rng.normal(0, 1.5, n)
    pitch = 22.0 * np.sin(2 * np.pi * 4.0 * t + 0.7) + rng.normal(0, 1.5, n)
    return np.stack([pitch, yaw], axis=1)


def best_rate(fn: Callable[[], object], count: int, repeats: int = 3) -> float:
    """Items per second of the fastest of ``repeats`` runs of ``fn`` (which handles ``count`` items)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return count / min(times)


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    n_single = 2_000 if args.quick else 10_000
    n_batch = 20_000 if args.quick else 100_000
    rng = np.random.default_rng(1)
    queries = rng.uniform([-30.0, -45.0], [30.0, 45.0], (n_batch, 2))  # pitch, yaw
    singles = list(queries[:n_single])  # one (2,) array per driving frame, as a stream delivers them

    rows = []
    for n in (50, 300, 1_000):
        refs = recording(n)
        build = median_ms(lambda refs=refs: AppearanceMap(refs))
        qhull = median_ms(lambda refs=refs: Delaunay(refs))
        amap = AppearanceMap(refs)
        tri = Delaunay(refs)
        outside = float((tri.find_simplex(queries[:n_single]) < 0).mean())
        rate = {}
        for k in (3, 6):
            amap.select_many(queries[:100], k=k)  # warm up (the ring cache fills as a real stream would)
            rate["single", k] = best_rate(lambda k=k, m=amap: [m.select(q, k=k) for q in singles], n_single)
            rate["batch", k] = best_rate(lambda k=k, m=amap: m.select_many(queries, k=k), n_batch)
        few = singles[:300]
        scipy_rate = best_rate(lambda tri=tri, few=few: [tri.find_simplex(q) for q in few], len(few), 1)
        rows.append(
            [
                n,
                amap.triangles.shape[0],
                build,
                qhull,
                *(round(rate[key]) for key in [("single", 3), ("single", 6), ("batch", 3), ("batch", 6)]),
                round(scipy_rate),
                f"{outside:.0%}",
            ]
        )

    body = table(
        [
            "references",
            "triangles",
            "build ms",
            "scipy Delaunay ms",
            "select k=3 /s",
            "select k=6 /s",
            "select_many k=3 /s",
            "select_many k=6 /s",
            "scipy find_simplex per pose /s",
            "queries outside hull",
        ],
        rows,
    )
    body += (
        f"\n\nOne core. `select`: {n_single:,} driving poses one at a time; `select_many`: {n_batch:,} in one"
        " call (best of 3). Goal: 10,000 single queries per second.\n"
    )
    write_section("selection", "Reference selection (appearance map)", body)

    sample = AppearanceMap(recording(60, seed=3))
    out = ROOT / "docs" / "appearance_map.png"
    query = sample.poses[sample.select((-10.0, -8.0), k=3)].mean(axis=0)  # mid-triangle: uncluttered
    out.write_bytes(sample.plot_png(query=query, k=6, size=512))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
