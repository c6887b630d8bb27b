"""The appearance map and reference selection (paper section 3.2, Figure 3; DESIGN.md 2.6).

Each reference frame is a point e = (pitch, yaw) of its head pose, in degrees, with the sign convention of
``engine/geometry.py`` (yaw > 0: face turned towards the image's right; pitch > 0: face tilted up). A
Delaunay triangulation of those points is the *appearance map*. For an input pose we find the triangle T_l
that contains it and use its three vertices as the reference set; when more references are wanted we add the
vertices of the triangles that share an edge with T_l, and so on outwards (breadth-first over edge
adjacency), nearest-first within each ring.

What the paper leaves open, and what we chose:

- A pose outside the convex hull of the references uses the triangle nearest to it (point-to-triangle
  distance). When its nearest hull point is a hull vertex, every triangle around that vertex is equally near:
  the one whose centroid is nearest wins (then the lowest index).
- Fewer than 3 references, or poses that are all collinear or identical (Qhull cannot triangulate them),
  give a map without a mesh: selection is then the k nearest references.
- References that Qhull leaves out of the mesh (exact duplicates of another pose) are only reached when the
  mesh runs out of vertices: the remaining slots are filled with the nearest references not yet chosen.

Speed and determinism: the barycentric coordinates of every triangle are precomputed as linear functions of
the query, and a uniform grid over the mesh lists, per cell, the triangles whose bounding box overlaps it, so
a query tests a handful of triangles (outside the hull: the hull edges). ``select`` (one pose, plain Python
floats) and ``select_many`` (numpy) perform the same IEEE operations in the same order, so they agree exactly,
even for poses on shared edges. scipy's ``find_simplex`` is as fast for location alone, but its batch walk
starts from the previous point's triangle, so a pose on a shared edge can land in a different triangle alone
than in a batch (284 of 5,000 integer poses on a lattice mesh, checked here), and it has no nearest-triangle
fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import Delaunay, QhullError, cKDTree

from engine.geometry import Pose

FORMAT = "aca.appearance_map"
VERSION = 1

# A query counts as inside a triangle when every barycentric coordinate is >= -_BARY_EPS. Barycentric
# coordinates are scale-free, so an absolute tolerance is right here; it absorbs rounding for poses on edges.
_BARY_EPS = 1e-9
# Candidate triangles are tried in chunks of at most this many (query, triangle) pairs, to bound memory.
_CHUNK_PAIRS = 1 << 20


def _as_points(poses: object, what: str) -> np.ndarray:
    """Validate an (n, 2) or (n, 3) array of (pitch, yaw[, roll]) degrees and return (n, 2) float64."""
    try:
        arr = np.asarray(poses, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers, an (n, 2) or (n, 3) array of pitch, yaw[, roll]") from exc
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{what} must have shape (n, 2) or (n, 3) (pitch, yaw[, roll]); got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: at least one pose is needed")
    # Roll does not move a reference on the appearance map (paper 3.2: e = (Pitch, Yaw)).
    pts = np.ascontiguousarray(arr[:, :2])
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:10].tolist()
        raise ValueError(f"{what} has non-finite values (NaN or inf) at rows {rows}")
    return pts


def _as_point(pose: object) -> tuple[float, float]:
    """Validate one pose: a ``Pose``, or 2 or 3 numbers (pitch, yaw[, roll]) in degrees."""
    if isinstance(pose, Pose):
        x, y = float(pose.pitch), float(pose.yaw)
    else:
        try:
            arr = np.asarray(pose, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError("pose must be a Pose or 2 or 3 numbers (pitch, yaw[, roll])") from exc
        if arr.shape not in ((2,), (3,)):
            raise ValueError(f"pose must have shape (2,) or (3,) (pitch, yaw[, roll]); got {arr.shape}")
        x, y = float(arr[0]), float(arr[1])
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"pose must be finite; got pitch={x}, yaw={y}")
    return x, y


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    return int(k)


class _Rings:
    """Breadth-first rings of new vertices around one start triangle, extended only as far as asked.

    Ring 0 is the start triangle's vertices; ring j+1 holds the vertices, not seen before, of the triangles
    that share an edge with a triangle of ring j's frontier (paper 3.2: "find out the adjacent triangles that
    share a common edge with T_l and repeat"). Plain lists: a few small rings are faster in Python than numpy.
    """

    __slots__ = ("rings", "n_seen", "_frontier", "_visited", "_seen")

    def __init__(self, start: int, simplices: list[list[int]]) -> None:
        first = simplices[start]
        self.rings: list[list[int]] = [list(first)]
        self.n_seen = 3
        self._frontier = [start]
        self._visited = {start}
        self._seen = set(first)

    @property
    def exhausted(self) -> bool:
        return not self._frontier

    def extend(self, want: int, simplices: list[list[int]], neighbors: list[list[int]]) -> None:
        """Add rings until ``want`` vertices are seen or the mesh is exhausted."""
        while self.n_seen < want and self._frontier:
            nxt: list[int] = []
            new: list[int] = []
            for t in self._frontier:
                for u in neighbors[t]:
                    if u < 0 or u in self._visited:  # -1: no neighbour across this edge (hull)
                        continue
                    self._visited.add(u)
                    nxt.append(u)
                    for v in simplices[u]:
                        if v not in self._seen:
                            self._seen.add(v)
                            new.append(v)
            self._frontier = nxt
            if new:
                self.rings.append(new)
                self.n_seen += len(new)


@dataclass
class UncoveredRegion:
    """One of the 8 directions (or the centre) of the target pose region, and how much of it is uncovered."""

    name: str  # "left", "up-right", "centre", ... in image directions (engine/geometry.py)
    uncovered_fraction: float
    pitch_range: tuple[float, float]
    yaw_range: tuple[float, float]
    hint: str


@dataclass
class CoverageReport:
    """Which head poses of a target region the references cover (DESIGN.md 4: reported with a ready identity).

    A grid cell is covered when it lies inside the convex hull of the references (the appearance map has a
    triangle there) or within ``tolerance`` degrees of a reference.
    """

    covered_fraction: float
    pitch_range: tuple[float, float]
    yaw_range: tuple[float, float]
    step: float
    tolerance: float
    n_refs: int
    regions: list[UncoveredRegion] = field(default_factory=list)

    @property
    def hints(self) -> list[str]:
        return [r.hint for r in self.regions]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hints"] = self.hints
        return d


class AppearanceMap:
    """Delaunay mesh over the (pitch, yaw) head poses of the reference frames (paper 3.2, Figure 3a)."""

    def __init__(self, poses: np.ndarray | Sequence[Sequence[float]]) -> None:
        self._pts = _as_points(poses, "reference poses")  # (n, 2): pitch, yaw
        self.n_refs = int(self._pts.shape[0])
        self._px: list[float] = self._pts[:, 0].tolist()
        self._py: list[float] = self._pts[:, 1].tolist()
        self._tri: Delaunay | None = None
        if self.n_refs >= 3:
            try:
                tri = Delaunay(self._pts)
            except QhullError:  # collinear or identical poses: no 2-D triangle exists
                tri = None
            if tri is not None and tri.nsimplex > 0:
                self._tri = tri
        self._rings: dict[int, _Rings] = {}
        if self._tri is not None:
            self._build_index(self._tri)

    # ------------------------------------------------------------------ mesh index

    def _build_index(self, tri: Delaunay) -> None:
        simp = np.ascontiguousarray(tri.simplices, dtype=np.int64)  # (t, 3) vertex indices
        nbrs = np.ascontiguousarray(tri.neighbors, dtype=np.int64)  # (t, 3): opposite vertex k; -1: hull
        self._simp, self._nbrs = simp, nbrs
        self._simp_l: list[list[int]] = simp.tolist()  # Python lists for the per-query ring walk
        self._nbrs_l: list[list[int]] = nbrs.tolist()
        nt = simp.shape[0]
        corners = self._pts[simp]  # (t, 3, 2)
        self._corners = corners
        self._centroid = corners.mean(axis=1)  # (t, 2)

        # Barycentric coordinates as linear functions of the query q = (x, y): b = A0 * x + A1 * y + C, each
        # (t, 3). With e1 = v0 - v2, e2 = v1 - v2: [e1 e2] (b0, b1)^T = q - v2, b2 = 1 - b0 - b1. That is what
        # scipy's lazy tri.transform holds; the closed form avoids its per-triangle LAPACK solves (measured
        # for 1,000 references: 3-7 ms on one BLAS thread, 30 ms to over 1 s with default threads on a busy
        # 2-core machine).
        v0, v1, v2 = corners[:, 0], corners[:, 1], corners[:, 2]
        e1, e2 = v0 - v2, v1 - v2  # (t, 2)
        det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
        scale = np.sqrt((e1 * e1).sum(1) * (e2 * e2).sum(1))
        bad = ~(np.abs(det) > 1e-12 * scale)  # zero-area triangles (Qhull keeps none, but be safe)
        inv = 1.0 / np.where(bad, 1.0, det)
        T = np.stack([[e2[:, 1], -e2[:, 0]], [-e1[:, 1], e1[:, 0]]]) * inv  # (2, 2, t): T = [e1 e2]^-1
        Tr = T[:, 0] * v2[:, 0] + T[:, 1] * v2[:, 1]  # (2, t): T v2
        A0 = np.stack([T[0, 0], T[1, 0], -T[0, 0] - T[1, 0]], axis=1)
        A1 = np.stack([T[0, 1], T[1, 1], -T[0, 1] - T[1, 1]], axis=1)
        C = np.stack([-Tr[0], -Tr[1], 1.0 + Tr[0] + Tr[1]], axis=1)
        A0[bad], A1[bad], C[bad] = 0.0, 0.0, -1.0  # never contains a point
        self._A0, self._A1, self._C = A0, A1, C

        self._build_hull(simp, nbrs, corners)
        self._build_grid(corners, nt)

    def _build_hull(self, simp: np.ndarray, nbrs: np.ndarray, corners: np.ndarray) -> None:
        """Hull edges (start, direction, outward unit normal, owning triangle) and the triangles at each hull
        vertex: a pose outside the hull is nearest to the triangle that holds its nearest hull point."""
        t_idx, k = np.nonzero(nbrs < 0)  # face k of triangle t (opposite vertex k) is a hull edge
        a = simp[t_idx, (k + 1) % 3]
        b = simp[t_idx, (k + 2) % 3]
        pa, pb, opp = self._pts[a], self._pts[b], corners[t_idx, k]  # (h, 2) each
        d = pb - pa
        nrm = np.stack([d[:, 1], -d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
        flip = ((opp - pa) * nrm).sum(1) > 0  # the normal must point away from the triangle's third vertex
        nrm[flip] *= -1.0
        self._he_a, self._he_b, self._he_p, self._he_d, self._he_n = a, b, pa, d, nrm
        self._he_len2 = (d * d).sum(1)
        self._he_tri = t_idx.astype(np.int64)
        # Triangles around each reference that lies on the hull, padded with -1: (n_refs, max_degree).
        hv = np.unique(np.concatenate([a, b]))
        inc = [np.flatnonzero((simp == v).any(axis=1)) for v in hv]
        width = max(len(x) for x in inc)
        table = np.full((self.n_refs, width), -1, dtype=np.int64)
        for v, x in zip(hv, inc, strict=True):
            table[v, : len(x)] = x
        self._vertex_tris = table
        self._he_py: list[tuple[float, ...]] = [
            tuple(r) for r in np.concatenate([pa, d, nrm, self._he_len2[:, None]], axis=1).tolist()
        ]
        cent = self._centroid
        self._vertex_py: dict[int, list[tuple[int, float, float]]] = {
            int(v): [(int(t), float(cent[t, 0]), float(cent[t, 1])) for t in x]
            for v, x in zip(hv, inc, strict=True)
        }

    def _build_grid(self, corners: np.ndarray, nt: int) -> None:
        """Uniform grid over the mesh's bounding box, about one cell per triangle; each cell lists (ascending)
        the triangles whose bounding box overlaps it, so every triangle containing a point is in its cell."""
        lo = corners.reshape(-1, 2).min(axis=0)
        hi = corners.reshape(-1, 2).max(axis=0)
        span = np.maximum(hi - lo, 1e-9)
        pad = 1e-9 * (1.0 + np.abs(np.concatenate([lo, hi])).max())
        lo, span = lo - pad, span + 2 * pad
        h = math.sqrt(float(span[0] * span[1]) / nt)
        g = np.clip(np.ceil(span / h), 1, 1024).astype(np.int64)  # cells per axis (pitch, yaw)
        self._lo = (float(lo[0]), float(lo[1]))
        self._inv = (float(g[0] / span[0]), float(g[1] / span[1]))  # cells per degree
        self._g = (int(g[0]), int(g[1]))
        tlo, thi = corners.min(axis=1), corners.max(axis=1)  # (t, 2) triangle bounding boxes
        i0, j0 = self._cell_ij(tlo[:, 0], tlo[:, 1])
        i1, j1 = self._cell_ij(thi[:, 0], thi[:, 1])
        ni, nj = i1 - i0 + 1, j1 - j0 + 1
        cnt = ni * nj
        tri_rep = np.repeat(np.arange(nt, dtype=np.int64), cnt)  # one entry per (triangle, cell) pair
        local = np.arange(tri_rep.size, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        ci = i0[tri_rep] + local % ni[tri_rep]
        cj = j0[tri_rep] + local // ni[tri_rep]
        cell = ci * self._g[1] + cj
        order = np.lexsort((tri_rep, cell))  # by cell, then ascending triangle index
        self._cell_tris = tri_rep[order]
        self._cell_start = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=g[0] * g[1]))])
        self._cell_start_l: list[int] = self._cell_start.tolist()
        self._cell_py: dict[int, list[tuple[Any, ...]]] = {}
        # The coefficients again in cell order, so a single query slices (a view) instead of gathering.
        ct = self._cell_tris
        self._cA0, self._cA1, self._cC = self._A0[ct], self._A1[ct], self._C[ct]

    def _cell_ij(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.clip(np.floor((x - self._lo[0]) * self._inv[0]).astype(np.int64), 0, self._g[0] - 1)
        j = np.clip(np.floor((y - self._lo[1]) * self._inv[1]).astype(np.int64), 0, self._g[1] - 1)
        return i, j

    def _cell_of(self, x: float, y: float) -> int:
        """Cell index of one point, or -1 outside the grid (then no triangle contains it)."""
        fi = math.floor((x - self._lo[0]) * self._inv[0])
        fj = math.floor((y - self._lo[1]) * self._inv[1])
        if not (0 <= fi < self._g[0] and 0 <= fj < self._g[1]):
            return -1
        return fi * self._g[1] + fj

    def _cells_of(self, P: np.ndarray) -> np.ndarray:
        """Vectorised ``_cell_of``: (N, 2) -> (N,), -1 outside the grid."""
        fi = np.floor((P[:, 0] - self._lo[0]) * self._inv[0])
        fj = np.floor((P[:, 1] - self._lo[1]) * self._inv[1])
        ok = (fi >= 0) & (fi < self._g[0]) & (fj >= 0) & (fj < self._g[1])
        cell = np.where(ok, fi * self._g[1] + fj, -1.0)
        return cell.astype(np.int64)

    # ------------------------------------------------------------------ point location

    def _bary(self, x: np.ndarray | float, y: np.ndarray | float, t: np.ndarray) -> np.ndarray:
        """Barycentric coordinates of points (x, y) in triangles t: (m, 3)."""
        return self._A0[t] * x + self._A1[t] * y + self._C[t]

    def _point_triangle_distance(self, x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Euclidean distance (degrees) from points (x, y) (m,) to triangles t (m,); 0 inside."""
        c = self._corners[t]  # (m, 3, 2)
        a, b = c, c[:, [1, 2, 0], :]  # the three edges a -> b
        px, py = x[:, None], y[:, None]
        ex, ey = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]  # (m, 3)
        wx, wy = px - a[..., 0], py - a[..., 1]
        len2 = np.maximum(ex * ex + ey * ey, 1e-300)
        s = np.clip((wx * ex + wy * ey) / len2, 0.0, 1.0)
        dx, dy = wx - s * ex, wy - s * ey
        d = np.sqrt((dx * dx + dy * dy).min(axis=1))
        inside = self._bary(px, py, t).min(axis=1) >= 0.0
        return np.where(inside, 0.0, d)

    # A single pose touches a handful of triangles and hull edges: plain Python floats beat numpy's per-call
    # overhead there. The operations are the same IEEE double operations, in the same order, as the vectorised
    # path (``_locate_many``, ``_nearest_many``), so both give the same triangle; tests check that they agree.

    def _locate(self, x: float, y: float) -> int:
        """The triangle containing (x, y) (lowest index among its cell's), else the nearest triangle."""
        cell = self._cell_of(x, y)
        if cell >= 0:
            cands = self._cell_py.get(cell)
            if cands is None:
                cands = self._cell_py[cell] = self._cell_rows(cell)
            eps = -_BARY_EPS
            for t, a0, a1, a2, b0, b1, b2, c0, c1, c2 in cands:
                if (
                    a0 * x + b0 * y + c0 >= eps
                    and a1 * x + b1 * y + c1 >= eps
                    and a2 * x + b2 * y + c2 >= eps
                ):
                    return t
        return self._nearest_one(x, y)

    def _cell_rows(self, cell: int) -> list[tuple[Any, ...]]:
        """(triangle, A0[3], A1[3], C[3]) of one cell's candidates as Python floats, built on first use."""
        a, b = self._cell_start_l[cell], self._cell_start_l[cell + 1]
        cols = zip(
            self._cell_tris[a:b].tolist(),
            self._cA0[a:b].tolist(),
            self._cA1[a:b].tolist(),
            self._cC[a:b].tolist(),
            strict=True,
        )
        return [(t, *a0, *a1, *c) for t, a0, a1, c in cols]

    def _nearest_one(self, x: float, y: float) -> int:
        """``_nearest_many`` for one pose (see there)."""
        best, bj, bs, outside = math.inf, 0, 0.0, False
        for j, (ax, ay, dx, dy, nx, ny, len2) in enumerate(self._he_py):
            wx, wy = x - ax, y - ay
            if wx * nx + wy * ny > 0.0:
                outside = True
            s = (wx * dx + wy * dy) / len2
            s = 0.0 if s < 0.0 else (1.0 if s > 1.0 else s)  # np.clip(s, 0, 1)
            ex, ey = wx - s * dx, wy - s * dy
            d2 = ex * ex + ey * ey
            if d2 < best:  # the first minimum, as np.argmin
                best, bj, bs = d2, j, s
        if not outside:
            return int(self._nearest_many(np.array([[x, y]]))[0])
        if 0.0 < bs < 1.0:
            return int(self._he_tri[bj])
        v = int(self._he_a[bj] if bs <= 0.0 else self._he_b[bj])
        best, bt = math.inf, -1
        for t, cx, cy in self._vertex_py[v]:
            ex, ey = cx - x, cy - y
            d2 = ex * ex + ey * ey
            if d2 < best:
                best, bt = d2, t
        return bt

    def _locate_many(self, P: np.ndarray) -> np.ndarray:
        """Vectorised ``_locate`` with the same arithmetic: (N, 2) -> (N,) triangle indices."""
        N = P.shape[0]
        out = np.full(N, -1, dtype=np.int64)
        cell = self._cells_of(P)
        start = np.where(cell >= 0, self._cell_start[np.maximum(cell, 0)], 0)
        cnt = np.where(cell >= 0, self._cell_start[np.maximum(cell, 0) + 1] - start, 0)
        # Pairs (query, candidate triangle), grouped by query with candidates ascending, in bounded chunks.
        q0 = 0
        while q0 < N:
            csum = np.cumsum(cnt[q0:])
            q1 = q0 + max(1, int(np.searchsorted(csum, _CHUNK_PAIRS, side="right")))
            c = cnt[q0:q1]
            qid = np.repeat(np.arange(q0, q1, dtype=np.int64), c)
            local = np.arange(qid.size, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
            pair = start[qid] + local  # index into the cell-ordered arrays
            cand = self._cell_tris[pair]
            bary = self._cA0[pair] * P[qid, 0:1] + self._cA1[pair] * P[qid, 1:2] + self._cC[pair]  # (M, 3)
            ok = np.minimum.reduce(bary, axis=1) >= -_BARY_EPS
            hit_q, first = np.unique(qid[ok], return_index=True)  # first containing = lowest triangle index
            out[hit_q] = cand[ok][first]
            q0 = q1
        miss = np.flatnonzero(out < 0)
        if miss.size:
            out[miss] = self._nearest_many(P[miss])
        return out

    def _nearest_many(self, P: np.ndarray) -> np.ndarray:
        """Nearest triangle to each pose of P (m, 2) that no triangle contained: (m,) triangle indices.

        Outside the hull the nearest triangle holds the nearest point of the hull boundary: the triangle
        owning the nearest hull edge, or, when that point is a hull vertex, the one among the vertex's
        triangles whose centroid is nearest (then the lowest index). A pose inside the hull that the tolerant
        barycentric test missed (rounding) takes the nearest triangle over the whole mesh.
        """
        m = P.shape[0]
        out = np.empty(m, dtype=np.int64)
        step = max(1, _CHUNK_PAIRS // self._he_tri.size)
        for q0 in range(0, m, step):
            Q = P[q0 : q0 + step]
            wx = Q[:, 0:1] - self._he_p[:, 0]  # (q, h): query relative to each hull edge's start
            wy = Q[:, 1:2] - self._he_p[:, 1]
            side = wx * self._he_n[:, 0] + wy * self._he_n[:, 1]  # signed distance, > 0 outside
            s = np.clip((wx * self._he_d[:, 0] + wy * self._he_d[:, 1]) / self._he_len2, 0.0, 1.0)
            dx, dy = wx - s * self._he_d[:, 0], wy - s * self._he_d[:, 1]
            j = np.argmin(dx * dx + dy * dy, axis=1)  # nearest hull edge per query
            sj = s[np.arange(len(Q)), j]
            res = self._he_tri[j].copy()
            # The nearest hull point is an end of edge j: choose among that vertex's triangles.
            at_v = (sj <= 0.0) | (sj >= 1.0)
            if at_v.any():
                v = np.where(sj[at_v] <= 0.0, self._he_a[j[at_v]], self._he_b[j[at_v]])
                cand = self._vertex_tris[v]  # (r, width), -1 padded
                cx = self._centroid[cand, 0] - Q[at_v, 0:1]
                cy = self._centroid[cand, 1] - Q[at_v, 1:2]
                cd = np.where(cand >= 0, cx * cx + cy * cy, np.inf)
                res[at_v] = cand[np.arange(cand.shape[0]), np.argmin(cd, axis=1)]
            inside = side.max(axis=1) <= 0.0
            for i in np.flatnonzero(inside):  # rounding only: never seen in tests, kept for robustness
                d = self._point_triangle_distance(
                    np.full(self._simp.shape[0], Q[i, 0]),
                    np.full(self._simp.shape[0], Q[i, 1]),
                    np.arange(self._simp.shape[0]),
                )
                res[i] = int(np.argmin(d))
            out[q0 : q0 + step] = res
        return out

    # ------------------------------------------------------------------ selection

    def _by_distance(self, vs: list[int], x: float, y: float) -> list[int]:
        """Vertices nearest-first (stable). Same float operations as the numpy path of ``select_many``."""
        px, py = self._px, self._py
        return sorted(vs, key=lambda v: (px[v] - x) * (px[v] - x) + (py[v] - y) * (py[v] - y))

    def _order_from(self, t: int, x: float, y: float, k: int) -> list[int]:
        """k references around triangle t: its vertices, then ring after ring, nearest-first within a ring."""
        rings = self._rings.get(t)
        if rings is None or (rings.n_seen < k and not rings.exhausted):
            # A cached walk is never extended in place: threads that share this map only ever read a finished
            # one, and the cache entry is swapped for a longer walk in one step.
            rings = _Rings(t, self._simp_l)
            rings.extend(k, self._simp_l, self._nbrs_l)
            self._rings[t] = rings
        sel: list[int] = []
        for ring in rings.rings:
            if len(sel) >= k:
                break
            sel += self._by_distance(ring, x, y)
        if len(sel) < k:  # the mesh ran out of vertices: duplicates left out by Qhull are the rest
            sel += self._nearest_refs(x, y, k, exclude=sel)[: k - len(sel)].tolist()
        return sel[:k]

    def _nearest_refs(self, x: float, y: float, k: int, exclude: list[int] | None = None) -> np.ndarray:
        dx, dy = self._pts[:, 0] - x, self._pts[:, 1] - y
        d = dx * dx + dy * dy
        if exclude:
            d[exclude] = np.inf
        return np.argsort(d, kind="stable")[:k].astype(np.int64)

    def select(self, pose: Pose | Sequence[float] | np.ndarray, k: int = 3) -> np.ndarray:
        """Indices (int64, length min(k, n_refs)) of the references to use for ``pose`` (paper 3.2).

        ``pose`` is a ``Pose`` or (pitch, yaw[, roll]) in degrees. The first three are the vertices of the
        triangle containing the pose (or the nearest triangle), nearest vertex first; then the vertices of the
        edge-adjacent triangles, ring by ring outwards, nearest-first within a ring.
        """
        x, y = _as_point(pose)
        k = min(_check_k(k), self.n_refs)
        if self._tri is None:
            return self._nearest_refs(x, y, k)
        t = self._locate(x, y)
        if k <= 3:
            return np.array(self._by_distance(self._simp_l[t], x, y)[:k], dtype=np.int64)
        return np.array(self._order_from(t, x, y, k), dtype=np.int64)

    def select_many(self, poses: np.ndarray | Sequence[Sequence[float]], k: int = 3) -> np.ndarray:
        """``select`` for each row of ``poses`` (N, 2) or (N, 3): (N, min(k, n_refs)) int64, same answers."""
        P = _as_points(poses, "query poses")
        k = min(_check_k(k), self.n_refs)
        N = P.shape[0]
        if self._tri is None:
            out = np.empty((N, k), dtype=np.int64)
            step = max(1, _CHUNK_PAIRS // self.n_refs)
            for q0 in range(0, N, step):
                Q = P[q0 : q0 + step]
                dx = self._pts[None, :, 0] - Q[:, 0:1]  # (q, n)
                dy = self._pts[None, :, 1] - Q[:, 1:2]
                out[q0 : q0 + step] = np.argsort(dx * dx + dy * dy, axis=1, kind="stable")[:, :k]
            return out
        tris = self._locate_many(P)
        if k <= 3:
            V = self._simp[tris]  # (N, 3)
            dx, dy = self._pts[V, 0] - P[:, 0:1], self._pts[V, 1] - P[:, 1:2]
            order = np.argsort(dx * dx + dy * dy, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(V, order, axis=1)
        rows = [self._order_from(t, x, y, k) for t, (x, y) in zip(tris.tolist(), P.tolist(), strict=True)]
        return np.array(rows, dtype=np.int64).reshape(N, k)

    # ------------------------------------------------------------------ inspection

    @property
    def poses(self) -> np.ndarray:
        """(n_refs, 2) pitch, yaw in degrees (a copy)."""
        return self._pts.copy()

    @property
    def has_mesh(self) -> bool:
        """False when the poses cannot be triangulated (< 3, collinear, identical): nearest-neighbour mode."""
        return self._tri is not None

    @property
    def triangles(self) -> np.ndarray:
        """(t, 3) reference indices of the mesh's triangles; (0, 3) without a mesh."""
        return self._simp.copy() if self._tri is not None else np.zeros((0, 3), dtype=np.int64)

    def __repr__(self) -> str:
        return f"AppearanceMap(n_refs={self.n_refs}, triangles={self.triangles.shape[0]})"

    # ------------------------------------------------------------------ coverage

    def coverage(
        self,
        pitch_range: tuple[float, float] = (-25.0, 25.0),
        yaw_range: tuple[float, float] = (-40.0, 40.0),
        step: float = 2.5,
        tolerance: float = 7.5,
        min_gap: float = 0.25,
    ) -> CoverageReport:
        """How much of a target pose region the references cover, and where to record more.

        The region is split into a grid of ``step``-degree cells; a cell is covered when its centre is inside
        the mesh or within ``tolerance`` degrees of a reference. The region's 3 x 3 parts (8 directions, the
        centre) with at least ``min_gap`` of their cells uncovered are reported, largest gap first, each with
        a hint.
        """
        (p0, p1), (y0, y1) = (tuple(map(float, pitch_range)), tuple(map(float, yaw_range)))
        if not (p1 > p0 and y1 > y0 and step > 0 and tolerance >= 0):
            raise ValueError("coverage needs increasing ranges, step > 0 and tolerance >= 0")
        pc = p0 + step * (np.arange(max(1, round((p1 - p0) / step))) + 0.5)  # cell centres (pitch)
        yc = y0 + step * (np.arange(max(1, round((y1 - y0) / step))) + 0.5)
        PP, YY = np.meshgrid(pc, yc, indexing="ij")  # (np, ny)
        grid = np.stack([PP.ravel(), YY.ravel()], axis=1)  # (np*ny, 2)
        near = cKDTree(self._pts).query(grid, k=1)[0] <= tolerance + 1e-9
        inside = self._tri.find_simplex(grid) >= 0 if self._tri is not None else np.zeros(len(grid), bool)
        covered = (near | inside).reshape(PP.shape)

        # Thirds of each range: 0 = low (down / left), 2 = high (up / right), in engine/geometry.py's signs.
        pb = np.minimum(((pc - p0) / (p1 - p0) * 3).astype(int), 2)
        yb = np.minimum(((yc - y0) / (y1 - y0) * 3).astype(int), 2)
        pedges, yedges = np.linspace(p0, p1, 4), np.linspace(y0, y1, 4)
        regions: list[UncoveredRegion] = []
        for a in range(3):
            for b in range(3):
                cells = covered[np.ix_(pb == a, yb == b)]
                gap = 1.0 - float(cells.mean()) if cells.size else 0.0
                if gap < min_gap or gap == 0.0:
                    continue
                name = _direction(a, b)
                pr = (float(pedges[a]), float(pedges[a + 1]))
                yr = (float(yedges[b]), float(yedges[b + 1]))
                regions.append(UncoveredRegion(name, gap, pr, yr, _hint(name, gap, pr, yr)))
        regions.sort(key=lambda r: -r.uncovered_fraction)
        return CoverageReport(
            covered_fraction=float(covered.mean()),
            pitch_range=(p0, p1),
            yaw_range=(y0, y1),
            step=float(step),
            tolerance=float(tolerance),
            n_refs=self.n_refs,
            regions=regions,
        )

    # ------------------------------------------------------------------ picture

    def plot_png(
        self, query: Pose | Sequence[float] | np.ndarray | None = None, k: int = 3, size: int = 512
    ) -> bytes:
        """A size x size PNG of the map like the paper's Figure 3: the mesh, the references (red), the
        query (blue cross), its triangle (shaded) and the selected references (ringed: blue the first three,
        orange the rest, numbered in selection order).

        Yaw runs left to right and pitch bottom to top at the same scale, so a reference sits where its nose
        points in the image (engine/geometry.py); the grey rectangle is ``coverage``'s default target region.
        """
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 64 <= size <= 4096:
            raise ValueError(f"size must be an integer in [64, 4096]; got {size!r}")
        q = _as_point(query) if query is not None else None
        sel = self.select(q, k) if q is not None else np.zeros(0, dtype=np.int64)
        return _plot(self, q, sel, int(size))

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored with an identity; the mesh is rebuilt (deterministically) on load.

        Only the poses are stored: Qhull is deterministic for the same input and scipy version.
        """
        return {"format": FORMAT, "version": VERSION, "poses": self._pts.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppearanceMap:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a stored appearance map (expected format {FORMAT!r})")
        if d.get("version") != VERSION:
            got = d.get("version")
            raise ValueError(f"unsupported appearance map version {got!r} (this code reads {VERSION})")
        return cls(np.asarray(d.get("poses"), dtype=np.float64))


def _direction(pitch_third: int, yaw_third: int) -> str:
    """Name of a 3 x 3 part of the pose region in image directions: pitch > 0 up, yaw > 0 right."""
    v = ("down", "", "up")[pitch_third]
    h = ("left", "", "right")[yaw_third]
    return "-".join(s for s in (v, h) if s) or "centre"


def _hint(name: str, gap: float, pr: tuple[float, float], yr: tuple[float, float]) -> str:
    where = "straight at the camera" if name == "centre" else f"looking {name}"
    return (
        f"record more frames {where} "
        f"(pitch {pr[0]:+.0f}..{pr[1]:+.0f} deg, yaw {yr[0]:+.0f}..{yr[1]:+.0f} deg; "
        f"{gap:.0%} of that region has no reference nearby)"
    )


def _plot(amap: AppearanceMap, q: tuple[float, float] | None, sel: np.ndarray, size: int) -> bytes:
    """Draw with PIL at twice the size and downsample: cheap anti-aliasing without matplotlib."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    ss = 2 * size  # supersampled canvas
    u = ss / 512.0  # unit: one pixel of a 512-pixel plot
    pts = amap._pts  # (n, 2): pitch, yaw
    # Extent in degrees: the default target region, every reference and the query, plus a margin.
    extent: list[np.ndarray] = [pts, np.array([[-25.0, -40.0], [25.0, 40.0]])]
    if q is not None:
        extent.append(np.array([q]))
    allp = np.vstack(extent)
    pmin, ymin = allp.min(axis=0) - 5.0
    pmax, ymax = allp.max(axis=0) + 5.0
    left, right, top, bottom = 46 * u, 10 * u, 30 * u, 40 * u
    s = min((ss - left - right) / (ymax - ymin), (ss - top - bottom) / (pmax - pmin))  # pixels per degree
    ox = left + ((ss - left - right) - s * (ymax - ymin)) / 2
    oy = top + ((ss - top - bottom) - s * (pmax - pmin)) / 2

    def xy(pitch: float, yaw: float) -> tuple[float, float]:
        return ox + (yaw - ymin) * s, oy + (pmax - pitch) * s

    img = Image.new("RGB", (ss, ss), "white")
    dr = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, round(11 * u)))
    dr.rectangle([*xy(25.0, -40.0), *xy(-25.0, 40.0)], fill=(242, 242, 242), outline=(200, 200, 200))
    # Axes: ticks every 10 degrees along the plot frame.
    dr.rectangle([*xy(pmax, ymin), *xy(pmin, ymax)], outline=(120, 120, 120), width=max(1, round(u)))
    for yaw in range(int(math.ceil(ymin / 10)) * 10, int(ymax) + 1, 10):
        x, yb = xy(pmin, yaw)
        dr.line([x, yb, x, yb + 4 * u], fill=(120, 120, 120), width=max(1, round(u)))
        dr.text((x, yb + 5 * u), f"{yaw}", fill=(60, 60, 60), font=font, anchor="mt")
    for pitch in range(int(math.ceil(pmin / 10)) * 10, int(pmax) + 1, 10):
        xl, y = xy(pitch, ymin)
        dr.line([xl - 4 * u, y, xl, y], fill=(120, 120, 120), width=max(1, round(u)))
        dr.text((xl - 6 * u, y), f"{pitch}", fill=(60, 60, 60), font=font, anchor="rm")
    xlabel = "yaw (deg, + = turned to image right)"
    dr.text((ss / 2, xy(pmin, 0.0)[1] + 20 * u), xlabel, fill=(0, 0, 0), font=font, anchor="mt")
    dr.text((4 * u, oy - 6 * u), "pitch (deg, + = up)", fill=(0, 0, 0), font=font, anchor="ld")

    if amap.has_mesh and q is not None:  # the triangle T_l the query falls in (or the nearest one)
        t = amap._locate(*q)
        dr.polygon([xy(*pts[v]) for v in amap._simp[t]], fill=(190, 215, 255))
    if amap.has_mesh:
        simp = amap._simp
        pairs = np.concatenate([simp[:, [0, 1]], simp[:, [1, 2]], simp[:, [2, 0]]])  # (3t, 2)
        edges = np.unique(np.sort(pairs, axis=1), axis=0)  # each shared edge once
        for a, b in edges:
            dr.line([xy(*pts[a]), xy(*pts[b])], fill=(130, 130, 130), width=max(1, round(u)))
    elif q is not None:  # nearest-neighbour mode: tie the query to its references
        for v in sel:
            dr.line([xy(*q), xy(*pts[v])], fill=(150, 180, 230), width=max(1, round(u)))
    r = max(2.0, 2.6 * u * (1.0 if len(pts) <= 400 else 0.7))
    for p in pts:
        x, y = xy(*p)
        dr.ellipse([x - r, y - r, x + r, y + r], fill=(220, 30, 30))
    for i, v in enumerate(sel):
        x, y = xy(*pts[v])
        col = (30, 80, 220) if i < 3 else (240, 140, 0)
        R = r + 3.5 * u
        dr.ellipse([x - R, y - R, x + R, y + R], outline=col, width=max(2, round(1.6 * u)))
        dr.text((x + R, y - R), str(i + 1), fill=col, font=font, anchor="lb")
    if q is not None:
        x, y = xy(*q)
        c = 7 * u
        w = max(2, round(2 * u))
        dr.line([x - c, y - c, x + c, y + c], fill=(0, 40, 160), width=w)
        dr.line([x - c, y + c, x + c, y - c], fill=(0, 40, 160), width=w)
    title = f"appearance map: {amap.n_refs} references, {amap.triangles.shape[0]} triangles"
    if q is not None:
        title += f"\nquery (x) pitch {q[0]:+.1f}, yaw {q[1]:+.1f}: {len(sel)} references selected, in order"
    dr.multiline_text((ss / 2, 4 * u), title, fill=(0, 0, 0), font=font, anchor="ma", align="center")

    buf = io.BytesIO()
    img.resize((size, size), Image.Resampling.LANCZOS).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
