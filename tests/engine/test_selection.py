"""Reference selection on the appearance map (paper section 3.2, engine/selection.py).

Expected answers are computed here independently of the module: containment by solving for barycentric
coordinates, triangle adjacency from shared vertex pairs, point-to-triangle distance by brute force.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial import Delaunay, QhullError

from engine.geometry import Pose
from engine.selection import AppearanceMap, CoverageReport

# ----------------------------------------------------------------------------- independent helpers


def bary(tri_pts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of q in the triangle tri_pts (3, 2) by solving the 3x3 system."""
    M = np.vstack([tri_pts.T, np.ones(3)])  # (3, 3): columns are the corners in homogeneous form
    return np.linalg.solve(M, np.array([q[0], q[1], 1.0]))


def seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    d = b - a
    t = 0.0 if not d.any() else float(np.clip(np.dot(p - a, d) / np.dot(d, d), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * d)))


def tri_dist(p: np.ndarray, c: np.ndarray) -> float:
    if bary(c, p).min() >= 0:
        return 0.0
    return min(seg_dist(p, c[i], c[(i + 1) % 3]) for i in range(3))


def edge_neighbours(triangles: np.ndarray, t: int) -> list[int]:
    """Triangles sharing two vertices (an edge) with triangle t."""
    s = set(triangles[t].tolist())
    return [u for u in range(len(triangles)) if u != t and len(s & set(triangles[u].tolist())) == 2]


def triangle_index(triangles: np.ndarray, verts: np.ndarray) -> int:
    key = sorted(verts.tolist())
    hits = [i for i, t in enumerate(triangles) if sorted(t.tolist()) == key]
    assert len(hits) == 1, f"{key} is not a triangle of the mesh"
    return hits[0]


def jittered_grid(rows: int, cols: int, seed: int = 0, jitter: float = 1.5) -> np.ndarray:
    """(rows*cols, 2) pitch, yaw: a 10-degree grid with jitter (no cocircular ties)."""
    rng = np.random.default_rng(seed)
    p, y = np.meshgrid(
        np.arange(rows) * 10.0 - 10.0 * (rows - 1) / 2, np.arange(cols) * 10.0 - 10.0 * (cols - 1) / 2
    )
    pts = np.stack([p.ravel(), y.ravel()], axis=1)
    return pts + rng.uniform(-jitter, jitter, pts.shape)


# ----------------------------------------------------------------------------- containment (hypothesis)

point_sets = st.builds(
    lambda seed, n, grid: (
        np.random.default_rng(seed).integers(-6, 7, (n, 2)).astype(float) * 5.0  # lattice: cocircular ties
        if grid
        else np.random.default_rng(seed).uniform([-25, -40], [25, 40], (n, 2))
    ),
    st.integers(0, 2**32 - 1),
    st.integers(3, 40),
    st.booleans(),
)
weights = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda w: sum(w) > 1e-3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(pts=point_sets, w=weights, corner=st.integers(0, 10**6))
def test_selected_triangle_contains_query(pts: np.ndarray, w: list[float], corner: int) -> None:
    try:
        ref = Delaunay(pts)
    except QhullError:  # collinear or duplicate-only sets: covered by the fallback tests
        assume(False)
    amap = AppearanceMap(pts)
    assert amap.has_mesh
    # A query inside the hull: a convex combination of a scipy triangle's corners (weights may be 0: edges,
    # vertices).
    c = pts[ref.simplices[corner % ref.nsimplex]]
    q = (np.asarray(w) / sum(w)) @ c
    sel = amap.select(q, k=3)
    assert sel.dtype == np.int64 and len(set(sel.tolist())) == 3
    triangle_index(amap.triangles, sel)  # the three are one triangle of the mesh
    assert bary(pts[sel], q).min() >= -1e-7
    # Nearest vertex first.
    d = np.linalg.norm(pts[sel] - q, axis=1)
    assert np.all(np.diff(d) >= -1e-12)
    # The mesh is scipy's Delaunay triangulation.
    assert {tuple(sorted(t)) for t in amap.triangles.tolist()} == {
        tuple(sorted(t)) for t in ref.simplices.tolist()
    }


# ----------------------------------------------------------------------------- adjacency expansion


def test_adjacency_expansion_rings() -> None:
    pts = jittered_grid(7, 9)
    amap = AppearanceMap(pts)
    tris = amap.triangles
    q = np.array([1.3, -2.1])
    first = amap.select(q, k=3)
    t0 = triangle_index(tris, first)
    nb = edge_neighbours(tris, t0)
    assert len(nb) == 3  # an interior triangle
    ring1 = set(tris[nb].ravel().tolist()) - set(first.tolist())

    sel6 = amap.select(q, k=6)
    assert len(sel6) == 6 and len(set(sel6.tolist())) == 6
    assert set(sel6[:3].tolist()) == set(first.tolist())
    assert set(sel6[3:].tolist()) <= ring1

    sel = amap.select(q, k=15)
    assert len(set(sel.tolist())) == 15
    n1 = len(ring1)
    assert set(sel[3 : 3 + n1].tolist()) == ring1  # all of ring 1 before anything farther
    # Nearest-first within ring 1.
    d1 = np.linalg.norm(pts[sel[3 : 3 + n1]] - q, axis=1)
    assert np.all(np.diff(d1) >= 0)
    # The next ring comes from triangles adjacent to those of ring 1.
    ring1_tris = set(nb) | {t0}
    ring2_tris = {u for t in nb for u in edge_neighbours(tris, t)} - ring1_tris
    ring2 = set(tris[sorted(ring2_tris)].ravel().tolist()) - set(first.tolist()) - ring1
    n2 = len(ring2)
    assert 3 + n1 + n2 < 15
    assert set(sel[3 + n1 : 3 + n1 + n2].tolist()) == ring2  # then ring 2, before ring 3
    # Prefixes agree: a smaller k is the start of a larger k.
    assert np.array_equal(amap.select(q, k=6), sel[:6])


def test_k_larger_than_n_returns_everything_once() -> None:
    pts = jittered_grid(3, 3, seed=2)
    amap = AppearanceMap(pts)
    sel = amap.select((0.0, 0.0), k=50)
    assert sorted(sel.tolist()) == list(range(9))
    assert amap.select_many(np.zeros((4, 2)), k=50).shape == (4, 9)


# ----------------------------------------------------------------------------- outside the hull


def test_outside_hull_uses_nearest_triangle() -> None:
    rng = np.random.default_rng(5)
    pts = rng.uniform([-20, -30], [20, 30], (40, 2))
    amap = AppearanceMap(pts)
    tris = amap.triangles
    ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    queries = np.stack([30 * np.sin(ang), 45 * np.cos(ang)], axis=1)
    queries = np.vstack([queries, pts[Delaunay(pts).convex_hull[:, 0]] * 1.3])  # just beyond hull vertices
    for q in queries:
        sel = amap.select(q, k=3)
        t = triangle_index(tris, sel)
        dists = np.array([tri_dist(q, pts[c]) for c in tris])
        assert dists.min() > 0  # really outside
        assert tri_dist(q, pts[tris[t]]) <= dists.min() + 1e-9
        more = amap.select(q, k=7)
        assert set(more[:3].tolist()) == set(sel.tolist()) and len(set(more.tolist())) == 7


def test_outside_hull_vertex_wedges() -> None:
    # Poses whose nearest hull point is a hull vertex: every triangle around it is equally near; the one with
    # the nearest centroid is chosen, the same one alone and in a batch.
    pts = np.random.default_rng(11).uniform([-20, -30], [20, 30], (60, 2))
    amap = AppearanceMap(pts)
    tris = amap.triangles
    hull = Delaunay(pts).convex_hull
    queries, expect = [], []
    for w in np.unique(hull):
        nbrs = hull[(hull == w).any(axis=1)].ravel()
        a, b = (v for v in nbrs if v != w)
        ua = (pts[w] - pts[a]) / np.linalg.norm(pts[w] - pts[a])
        ub = (pts[w] - pts[b]) / np.linalg.norm(pts[w] - pts[b])
        q = pts[w] + 4.0 * (ua + ub) / np.linalg.norm(ua + ub)  # along the outward bisector at w
        fan = [t for t in range(len(tris)) if w in tris[t]]
        cent = np.array([pts[tris[t]].mean(axis=0) for t in fan])
        queries.append(q)
        expect.append(fan[int(np.argmin(np.linalg.norm(cent - q, axis=1)))])
    got_single = [triangle_index(tris, amap.select(q, k=3)) for q in queries]
    got_batch = [triangle_index(tris, row) for row in amap.select_many(np.array(queries), k=3)]
    assert got_single == expect and got_batch == expect


def test_rounding_fallback_inside_the_hull_finds_the_containing_triangle() -> None:
    # The path a pose inside the hull takes if rounding defeated the tolerant barycentric test: never hit by
    # real poses, so exercised directly.
    pts = jittered_grid(4, 5, seed=7)
    amap = AppearanceMap(pts)
    tris = amap.triangles
    for q in [np.array([0.7, 1.1]), pts[7], (pts[3] + pts[8]) / 2]:
        t = int(amap._nearest_many(q[None])[0])
        assert bary(pts[tris[t]], q).min() >= -1e-9


# ----------------------------------------------------------------------------- degenerate reference sets


def test_one_and_two_references() -> None:
    one = AppearanceMap([[3.0, 4.0]])
    assert not one.has_mesh and one.n_refs == 1
    assert one.select((50.0, -50.0), k=3).tolist() == [0]
    two = AppearanceMap([[0.0, 0.0], [0.0, 20.0]])
    assert two.select((0.0, 15.0), k=3).tolist() == [1, 0]
    assert two.select((0.0, 2.0), k=1).tolist() == [0]


def test_collinear_references_fall_back_to_nearest() -> None:
    pitch = np.arange(8) * 3.0
    pts = np.stack([pitch, 2 * pitch], axis=1)  # all on one line
    amap = AppearanceMap(pts)
    assert not amap.has_mesh and amap.triangles.shape == (0, 3)
    q = np.array([10.0, 17.0])
    sel = amap.select(q, k=4)
    expect = np.argsort(np.linalg.norm(pts - q, axis=1), kind="stable")[:4]
    assert sel.tolist() == expect.tolist()


def test_duplicate_poses() -> None:
    same = AppearanceMap(np.full((5, 2), 7.0))  # all identical: Qhull cannot triangulate
    assert not same.has_mesh
    assert sorted(same.select((0.0, 0.0), k=5).tolist()) == [0, 1, 2, 3, 4]
    # A square with one corner recorded twice: the mesh leaves one copy out; it is still reachable.
    pts = np.array([[0, 0], [0, 10], [10, 0], [10, 10], [10, 10], [5, 5]], dtype=float)
    amap = AppearanceMap(pts)
    assert amap.has_mesh
    sel = amap.select((9.0, 9.0), k=6)
    assert sorted(sel.tolist()) == list(range(6))
    three = amap.select((9.0, 9.0), k=3)
    assert bary(pts[three], np.array([9.0, 9.0])).min() >= -1e-9


def test_roll_is_ignored_and_pose_objects_accepted() -> None:
    pts2 = jittered_grid(4, 4, seed=3)
    pts3 = np.concatenate([pts2, np.random.default_rng(0).uniform(-30, 30, (16, 1))], axis=1)
    a2, a3 = AppearanceMap(pts2), AppearanceMap(pts3)
    assert np.array_equal(a2.triangles, a3.triangles)
    assert np.array_equal(
        a2.select(Pose(pitch=2.0, yaw=-3.0, roll=40.0), k=5), a3.select((2.0, -3.0, 0.0), k=5)
    )


@pytest.mark.parametrize(
    "poses",
    [
        [],
        np.zeros((0, 2)),
        np.zeros((3,)),
        np.zeros((4, 4)),
        [[0.0, np.nan], [1.0, 2.0], [3.0, 1.0]],
        [["a", "b"]],
    ],
)
def test_invalid_references_raise_value_error(poses: object) -> None:
    with pytest.raises(ValueError, match=r"reference poses"):
        AppearanceMap(poses)  # type: ignore[arg-type]


def test_invalid_queries_raise_value_error() -> None:
    amap = AppearanceMap(jittered_grid(3, 3))
    for bad in [(np.nan, 0.0), (0.0, np.inf), (1.0,), np.zeros((2, 2)), "up"]:
        with pytest.raises(ValueError, match="pose"):
            amap.select(bad)  # type: ignore[arg-type]
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must"):
            amap.select((0.0, 0.0), k=k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query poses"):
        amap.select_many(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="query poses"):
        amap.select_many([[0.0, np.nan]])


# ----------------------------------------------------------------------------- batch == single


@pytest.mark.parametrize(
    "pts",
    [
        jittered_grid(6, 8, seed=1),
        np.random.default_rng(9).integers(-5, 6, (30, 2)).astype(float) * 5.0,  # lattice: ties on edges
        np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]),  # collinear: no mesh
        np.array([[0.0, 0.0], [3.0, -4.0]]),
    ],
)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_select_many_agrees_with_select(pts: np.ndarray, k: int) -> None:
    amap = AppearanceMap(pts)
    rng = np.random.default_rng(k)
    queries = np.vstack(
        [
            rng.uniform([-40, -55], [40, 55], (200, 2)),  # inside and outside
            pts,  # exactly on references
            (pts[:-1] + pts[1:]) / 2,  # often exactly on edges
            np.round(rng.uniform(-30, 30, (50, 2))),  # integers: on lattice edges
        ]
    )
    batch = amap.select_many(queries, k=k)
    assert batch.shape == (len(queries), min(k, len(pts))) and batch.dtype == np.int64
    single = np.stack([amap.select(q, k=k) for q in queries])
    assert np.array_equal(batch, single)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 30),
    qs=st.lists(st.tuples(st.integers(-60, 60), st.integers(-60, 60)), min_size=1, max_size=30),
    k=st.integers(1, 8),
)
def test_select_many_agrees_with_select_on_lattices(
    seed: int, n: int, qs: list[tuple[int, int]], k: int
) -> None:
    # Integer poses on a lattice: queries on shared edges, on hull edges, equidistant from hull vertices.
    pts = np.random.default_rng(seed).integers(-8, 9, (n, 2)).astype(float) * 4.0
    amap = AppearanceMap(pts)
    queries = np.asarray(qs, dtype=float)
    assert np.array_equal(amap.select_many(queries, k=k), np.stack([amap.select(q, k=k) for q in queries]))


# ----------------------------------------------------------------------------- storage


def test_serialisation_round_trip() -> None:
    pts = np.random.default_rng(4).uniform([-25, -40], [25, 40], (60, 2))
    amap = AppearanceMap(pts)
    d = json.loads(json.dumps(amap.to_dict()))
    back = AppearanceMap.from_dict(d)
    assert back.n_refs == 60 and np.array_equal(back.poses, amap.poses)
    assert np.array_equal(back.triangles, amap.triangles)
    q = np.random.default_rng(5).uniform(-45, 45, (100, 2))
    assert np.array_equal(back.select_many(q, k=5), amap.select_many(q, k=5))
    with pytest.raises(ValueError, match="appearance map"):
        AppearanceMap.from_dict({"poses": [[0, 0]]})
    with pytest.raises(ValueError, match="version"):
        AppearanceMap.from_dict({**d, "version": 99})


# ----------------------------------------------------------------------------- coverage


def _names(report: CoverageReport) -> set[str]:
    return {r.name for r in report.regions}


def test_coverage_hints_point_the_right_way() -> None:
    rng = np.random.default_rng(0)
    # References only with the face turned towards the image's right (yaw > 0, engine/geometry.py).
    right = AppearanceMap(np.stack([rng.uniform(-25, 25, 80), rng.uniform(15, 40, 80)], axis=1))
    rep = right.coverage()
    names = _names(rep)
    assert {"left", "up-left", "down-left"} <= names
    assert not any("right" in n for n in names)
    assert any("record more frames looking left" in h for h in rep.hints)
    assert 0.2 < rep.covered_fraction < 0.8
    # Only looking up: the hints ask for down.
    up = AppearanceMap(np.stack([rng.uniform(12, 25, 80), rng.uniform(-40, 40, 80)], axis=1))
    assert {"down", "down-left", "down-right"} <= _names(up.coverage())
    assert not any(n.startswith("up") for n in _names(up.coverage()))


def test_full_coverage_has_no_hints_and_serialises() -> None:
    pitch, yaw = np.meshgrid(np.linspace(-25, 25, 7), np.linspace(-40, 40, 9))
    amap = AppearanceMap(np.stack([pitch.ravel(), yaw.ravel()], axis=1))
    rep = amap.coverage()
    assert rep.covered_fraction == 1.0 and rep.regions == [] and rep.hints == []
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["covered_fraction"] == 1.0 and d["n_refs"] == 63


def test_coverage_without_mesh_uses_tolerance_only() -> None:
    rep = AppearanceMap([[0.0, 0.0]]).coverage(tolerance=7.5)
    # A disc of radius 7.5 deg inside a 50 x 80 deg region.
    assert rep.covered_fraction == pytest.approx(np.pi * 7.5**2 / (50 * 80), rel=0.2)
    # All 8 directions are empty; the centre is partly covered, so it comes last.
    assert len(rep.regions) == 9 and rep.regions[-1].name == "centre"
    assert (
        all(r.uncovered_fraction == 1.0 for r in rep.regions[:8]) and rep.regions[-1].uncovered_fraction < 1
    )


# ----------------------------------------------------------------------------- picture


@pytest.mark.parametrize("size", [128, 300])
def test_plot_png_is_a_valid_png_of_the_requested_size(size: int) -> None:
    amap = AppearanceMap(jittered_grid(5, 7))
    png = amap.plot_png(query=(2.0, 5.0), k=6, size=size)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and img.size == (size, size)
    rgb = np.asarray(img.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 10  # the references are drawn in red


def test_plot_png_without_mesh_and_bad_size() -> None:
    amap = AppearanceMap([[0.0, 0.0], [5.0, 5.0]])
    img = Image.open(io.BytesIO(amap.plot_png(size=200)))
    assert img.size == (200, 200)
    with pytest.raises(ValueError, match="size"):
        amap.plot_png(size=10)
