"""Speed of engine/synthetic.py on one CPU thread, mediapipe's detection rate on its renders, and a contact sheet.

    .venv/bin/python bench/synthetic.py [--frames 200] [--no-detect] [--no-sheet]

Writes the "synthetic" section of docs/benchmarks.md (bench/_report.py) and docs/synthetic_samples.png. Threads
are pinned to one before numpy, OpenCV and torch load, so the numbers are per core: training data generated on the
fly runs one renderer per data-loader worker.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import table, write_section  # noqa: E402
from engine import synthetic as syn  # noqa: E402
from engine.geometry import Pose  # noqa: E402

SHEET = ROOT / "docs" / "synthetic_samples.png"


def _time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Fastest seconds per call: on a shared machine other processes only ever add time."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def render_speed(size: int, supersample: int, n_frames: int, passes: int = 3) -> tuple[float, dict[str, float]]:
    """Frames per second over a talking sequence (4 identities, built beforehand; the best of ``passes``), and
    ms per stage."""
    idents = [syn.random_identity(s) for s in range(4)]
    poses, exprs = syn.motion(n_frames, seed=1)
    for ident in idents:  # identity build (geometry, textures, backdrop) is measured separately
        syn.render(ident, poses[0], exprs[0], size, supersample)

    def run() -> None:
        for i, (p, e) in enumerate(zip(poses, exprs, strict=True)):
            syn.render(idents[i % len(idents)], p, e, size, supersample)

    fps = n_frames / _time(run, passes)

    # Stage breakdown on one frame (median of repeats): the same calls render() makes.
    ident, pose, expr = idents[0], Pose(10.0, 25.0, 5.0), syn.Expression(0.4, 0.0, 0.0)
    rig = syn._rig(ident)
    R = size * supersample
    f, dist, cx, cy = syn._camera(ident, R)
    V, Nn = syn._posed_vertices(rig, pose, expr)
    Z = V[:, 2] + dist
    P2 = np.stack([f * V[:, 0] / Z + cx, f * V[:, 1] / Z + cy], 1)
    ids, det, _ = syn._rasterize(rig, P2, Z, R)
    out, _ = syn._shade(rig, ids, P2, det, Nn, syn._background8(ident, R))
    rep = 30
    stages = {
        "pose + deform": _time(lambda: syn._posed_vertices(rig, pose, expr), rep),  # min over repeats
        "rasterize": _time(lambda: syn._rasterize(rig, P2, Z, R), rep),
        "shade": _time(lambda: syn._shade(rig, ids, P2, det, Nn, syn._background8(ident, R)), rep),
        "downsample": _time(lambda: cv2.resize(out.reshape(R, R, 3), (size, size), interpolation=cv2.INTER_AREA),
                            rep) if supersample > 1 else 0.0,
    }
    return fps, {k: v * 1e3 for k, v in stages.items()}


def identity_build_ms(size: int, n: int = 8) -> float:
    """Milliseconds to build a new identity's rig (geometry, texture atlas) and backdrop at ``size``."""
    times = []
    for s in range(1000, 1000 + n):
        ident = syn.random_identity(s)
        t0 = time.perf_counter()
        syn._rig(ident)
        syn._background8(ident, size * syn.SUPERSAMPLE)
        times.append(time.perf_counter() - t0)
    return float(np.min(times)) * 1e3


def detection_rate(n_ids: int = 24, per_id: int = 4, size: int = 256) -> tuple[int, int, float]:
    """How many renders (random poses in range, mouth partly open) mediapipe's face mesh finds, and the median
    distance of its landmarks from the true ones (pixels)."""
    from engine.faces import FaceMesh

    rng = np.random.default_rng(0)
    found, n, err = 0, 0, []
    with FaceMesh(static_image_mode=True) as mesh:
        for i in range(n_ids):
            ident = syn.random_identity(100 + i)
            for _ in range(per_id):
                pose = Pose(*rng.uniform([-25, -40, -15], [25, 40, 15]))
                fr = syn.render(ident, pose, syn.Expression(float(rng.uniform(0, 0.6))), size)
                lm = mesh.detect(fr.image)
                n += 1
                if lm is not None:
                    found += 1
                    err.append(float(np.median(np.linalg.norm(lm[:468, :2] - fr.landmarks[:468, :2], axis=1))))
    return found, n, float(np.median(err)) if err else float("nan")


def contact_sheet(path: Path, size: int = 160) -> None:
    """Rows: identities; columns: frontal, yaw -40 / +40, pitch +25 / -25, roll + speech, blink + wide mouth, and
    the frontal frame with its 478 landmarks drawn."""
    views = [
        (Pose(0, 0, 0), syn.Expression()),
        (Pose(0, -40, 0), syn.Expression()),
        (Pose(0, 40, 0), syn.Expression()),
        (Pose(25, 0, 0), syn.Expression()),
        (Pose(-25, 0, 0), syn.Expression()),
        (Pose(5, 15, 15), syn.Expression(0.4)),
        (Pose(0, -10, -10), syn.Expression(1.0, 1.0, 1.0)),
    ]
    rows = []
    for seed in (0, 1, 2, 3, 5, 9):
        ident = syn.random_identity(seed)
        tiles = [syn.render(ident, p, e, size).image for p, e in views]
        fr = syn.render(ident, Pose(0, 0, 0), syn.Expression(), size)
        marked = fr.image.copy()
        for k, (x, y, _) in enumerate(fr.landmarks):
            colour = (255, 60, 60) if k >= 468 else (60, 255, 60)
            cv2.circle(marked, (round(x * 4), round(y * 4)), 3, colour, -1, cv2.LINE_AA, shift=2)
        rows.append(np.concatenate([*tiles, marked], axis=1))
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path} ({sheet.shape[1]}x{sheet.shape[0]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--no-detect", action="store_true", help="skip mediapipe's detection rate")
    ap.add_argument("--no-sheet", action="store_true", help="skip docs/synthetic_samples.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    load = os.getloadavg()[0]
    rows = []
    for size in (128, 256):
        for ss in (syn.SUPERSAMPLE, 1):
            fps, st = render_speed(size, ss, args.frames)
            rows.append([f"{size}x{size}", f"{ss}x" + (" (default)" if ss == syn.SUPERSAMPLE else ""), fps,
                         st["pose + deform"], st["rasterize"], st["shade"], st["downsample"]])
    body = table(["frame", "supersampling", "frames/s", "pose+deform ms", "rasterize ms", "shade ms",
                  "downsample ms"], rows)
    rig = syn._rig(syn.random_identity(0))
    body += (f"\n\nOne thread (numpy, OpenCV, torch); 1-minute load average {load:.1f} when it started (the "
             f"machine is shared: a load above 1 slows these numbers down). Frames/s over a {args.frames}-frame "
             f"talking sequence cycling 4 prepared identities (best of 3 passes); stage times are the fastest of 30 "
             f"repeats on one frame. "
             f"{len(rig.tris)} triangles per head (852 of them the face mesh), painter's algorithm with "
             f"cv2.fillConvexPoly; a new identity costs "
             f"{identity_build_ms(128):.0f} ms once (geometry, 512x512 texture atlas, backdrop), cached after.")
    if not args.no_detect:
        found, n, err = detection_rate()
        body += (f"\n\nmediapipe face mesh (engine.faces.FaceMesh, static images) on 256x256 renders of 24 identities "
                 f"in random poses within yaw +-40, pitch +-25, roll +-15: found a face in {found}/{n} "
                 f"({100 * found / n:.0f}%), median landmark distance from the true landmarks {err:.2f} px.")
    write_section("synthetic", "Synthetic talking heads (engine/synthetic.py)", body)
    if not args.no_sheet:
        contact_sheet(SHEET)


if __name__ == "__main__":
    main()
