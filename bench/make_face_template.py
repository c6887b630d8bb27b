"""Build engine/assets/face_template.npz: a frontal 478-point 3D face in mediapipe's face-mesh topology.

Run by hand (it needs the dev-only scikit-image and mediapipe's face mesh); the runtime only reads the .npz:

    .venv/bin/python bench/make_face_template.py

The mediapipe wheel ships no canonical_face_model.obj, but its face mesh returns 3D landmarks on a real face, so we
take them from scikit-image's astronaut() (offline) and normalise them:

1. landmarks to pixels (x, y, z all scaled by the image width, as mediapipe documents for z);
2. find the left/right mirror partner of every landmark (Hungarian assignment of the points to their mirror
   image), then the face's symmetry plane: its normal is the mean of ``P_i - P_mirror(i)``; iterate twice;
3. rotate so that the plane normal is +x (image right) and the image's y axis (down) stays as close as possible,
   i.e. yaw and roll are removed and the photo's pitch is kept: "frontal" means looking at the camera as the
   astronaut does. z = x cross y points away from the camera, as in engine/geometry.py (OpenCV camera frame);
4. symmetrise (average each point with its mirrored partner), centre on the mean of the 468 mesh points and scale
   so that the face height |P10 - P152| (forehead top to chin) is 1; the astronaut smiles with parted lips
   (13-14 about 0.07 apart), so the inner lips are closed onto their midline (``close_lips``): mouth_open = 0 in
   engine/synthetic.py means the lips touch;
5. triangles: the 3-cliques of FACEMESH_TESSELATION's edge graph, minus the spurious cliques (triangles whose three
   edges each border three cliques), oriented consistently so that ``(b - a) x (c - a)`` points to the camera
   (-z). The mesh has four boundary loops: the face oval and three holes (both eyes, the inner lips).

Saved arrays: ``vertices`` (478, 3) float32, ``triangles`` (T, 3) int32, ``mirror`` (478,) int32.
"""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

OUT = Path(__file__).resolve().parent.parent / "engine" / "assets" / "face_template.npz"


def detect_astronaut() -> np.ndarray:
    """(478, 3) landmarks of skimage's astronaut in pixels (z scaled like x)."""
    import mediapipe as mp
    from skimage.data import astronaut

    img = astronaut()
    h, w = img.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as fm:
        res = fm.process(img)
    if not res.multi_face_landmarks:
        raise RuntimeError("mediapipe found no face on the astronaut")
    lm = res.multi_face_landmarks[0].landmark
    return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64)


def mirror_partners(P: np.ndarray) -> np.ndarray:
    """Index of each point's mirror partner in a roughly frontal P (x = 0 the symmetry plane)."""
    Q = P * np.array([-1.0, 1.0, 1.0])
    perm = np.empty(len(P), dtype=np.int64)
    # Mesh points and iris points are matched separately: an iris point must never pair with a mesh point.
    for idx in (np.arange(0, 468), np.arange(468, len(P))):
        cost = np.linalg.norm(P[idx][:, None, :] - Q[idx][None, :, :], axis=2)
        rows, cols = linear_sum_assignment(cost)
        perm[idx[rows]] = idx[cols]
    return perm


def frontalise(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate P so its symmetry plane is x = 0 (see the module docstring); returns (points, mirror)."""
    pairs = [(33, 263), (133, 362), (61, 291), (234, 454)]
    xaxis = np.mean([(P[b] - P[a]) / np.linalg.norm(P[b] - P[a]) for a, b in pairs], axis=0)
    perm = np.arange(len(P))
    for _ in range(3):
        xaxis /= np.linalg.norm(xaxis)
        # y: the image's down direction made orthogonal to x (keeps the photo's pitch); z = x cross y.
        yaxis = np.array([0.0, 1.0, 0.0]) - xaxis[1] * xaxis
        yaxis /= np.linalg.norm(yaxis)
        zaxis = np.cross(xaxis, yaxis)
        R = np.stack([xaxis, yaxis, zaxis])  # rows: new axes in old coordinates
        centre = P[:468].mean(axis=0)
        # The mean of a mirror-symmetric point set lies on its symmetry plane, so centring puts the plane at x=0.
        F = (P - centre) @ R.T
        perm = mirror_partners(F)
        d = P - P[perm]
        # Sign-align the differences with the current x axis so both members of a pair add up.
        d *= np.sign(d @ xaxis)[:, None]
        xaxis = d[perm != np.arange(len(P))].mean(axis=0)
    return F, perm


def symmetrise(F: np.ndarray, perm: np.ndarray) -> np.ndarray:
    S = (F + F[perm] * np.array([-1.0, 1.0, 1.0])) / 2.0
    S[perm == np.arange(len(F)), 0] = 0.0
    return S


def triangles_from_tesselation() -> np.ndarray:
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    edges = {tuple(sorted(e)) for e in FACEMESH_TESSELATION}
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]}
    count: Counter[tuple[int, int]] = Counter()
    for t in cliques:
        for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])):
            count[e] += 1
    # A spurious clique is a triangle of edges that belong to three real faces around it: every edge counted 3x.
    tris = [t for t in cliques if not all(count[e] == 3 for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))]
    return np.array(sorted(tris), dtype=np.int64)


def orient(tris: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Orient triangles consistently (BFS over shared edges), front faces' normals towards -z."""
    tris = tris.copy()
    by_edge: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tris):
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            by_edge.setdefault((min(a, b), max(a, b)), []).append(i)
    done = np.zeros(len(tris), dtype=bool)
    for seed in range(len(tris)):
        if done[seed]:
            continue
        done[seed] = True
        queue = deque([seed])
        while queue:
            i = queue.popleft()
            t = tris[i]
            for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                for j in by_edge[(min(a, b), max(a, b))]:
                    if done[j]:
                        continue
                    u = tris[j]
                    # Consistent orientation: the neighbour traverses the shared edge the other way (b -> a).
                    directed = {(u[0], u[1]), (u[1], u[2]), (u[2], u[0])}
                    if (a, b) in directed:
                        tris[j] = u[::-1]
                    done[j] = True
                    queue.append(j)
    n = np.cross(V[tris[:, 1]] - V[tris[:, 0]], V[tris[:, 2]] - V[tris[:, 0]])
    if np.sum(n[:, 2] < 0) < len(tris) / 2:
        tris = tris[:, ::-1]
    return tris


# Inner-lip contour pairs (upper, lower) from mouth corner 78 to mouth corner 308 (mediapipe FACEMESH_LIPS).
INNER_UPPER = [191, 80, 81, 82, 13, 312, 311, 310, 415]
INNER_LOWER = [95, 88, 178, 87, 14, 317, 402, 318, 324]


def close_lips(S: np.ndarray, sigma: float = 0.04) -> np.ndarray:
    """Close the astronaut's smiling lips: a neutral template has mouth_open = 0 mean the lips touch.

    Each inner-lip pair meets at its midpoint; the displacement spreads to nearby vertices of the same lip with a
    Gaussian falloff (sigma in face heights), so the lips get fuller instead of folding.
    """
    S = S.copy()
    up, lo = np.array(INNER_UPPER), np.array(INNER_LOWER)
    mid = (S[up] + S[lo]) / 2.0
    slit_x, slit_y = mid[:, 0], mid[:, 1]
    order = np.argsort(slit_x)
    disp = np.zeros_like(S)
    for side, idx in ((-1.0, up), (1.0, lo)):
        d = mid - S[idx]  # (9, 3) displacement of the contour points
        c = S[idx]
        y_slit = np.interp(S[:468, 0], slit_x[order], slit_y[order])
        # A vertex belongs to this lip when it lies on this side of the slit (above for the upper lip).
        same_side = side * (S[:468, 1] - y_slit) >= -1e-9
        k = np.exp(-(np.linalg.norm(S[:468, None, :] - c[None], axis=2) / sigma) ** 2)  # (468, 9)
        w = k / np.maximum(k.sum(axis=1, keepdims=True), 1e-12)
        fall = k.max(axis=1, keepdims=True)
        disp[:468] += np.where(same_side[:, None], (w @ d) * fall, 0.0)
    disp[up] = mid - S[up]
    disp[lo] = mid - S[lo]
    return S + disp


def main() -> None:
    P = detect_astronaut()
    F, perm = frontalise(P)
    S = symmetrise(F, perm)
    S -= S[:468].mean(axis=0)
    S /= np.linalg.norm(S[10] - S[152])
    gap = np.linalg.norm(S[13] - S[14])
    S = close_lips(S)
    S -= S[:468].mean(axis=0)
    S /= np.linalg.norm(S[10] - S[152])
    tilt = np.degrees(np.arctan2(S[152, 2] - S[10, 2], S[152, 1] - S[10, 1]))
    tris = orient(triangles_from_tesselation(), S)
    n = np.cross(S[tris[:, 1]] - S[tris[:, 0]], S[tris[:, 2]] - S[tris[:, 0]])
    asym = np.abs(F[:, 0] + F[perm, 0]).max() / np.linalg.norm(F[10] - F[152])
    print(f"{len(tris)} triangles, {np.mean(n[:, 2] < 0):.3f} facing the camera; max asymmetry before "
          f"symmetrising {asym:.3f} face heights; mouth gap 13-14 {gap:.4f} closed to "
          f"{np.linalg.norm(S[13] - S[14]):.4f}; the chin is {tilt:.1f} deg further from the camera than the "
          f"forehead top; eye opening 159-145 {np.linalg.norm(S[159] - S[145]):.4f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, vertices=S.astype(np.float32), triangles=tris.astype(np.int32),
                        mirror=perm.astype(np.int32))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
